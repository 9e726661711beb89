"""Server side: one global budget over all sites, from their score histograms alone.

Pure function of (histograms, budget fraction): no per-image value ever reaches it.
The threshold falls inside one bin; there the images are taken as spread evenly, so
each site's keep count is its images in the bins above plus the same fraction of its
boundary bin (rounded so the counts add up to the global target exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class BudgetPlan:
    threshold: float  # global score threshold in [0, 1]
    keep: list[int]  # per site, in the order of the histograms
    target: int  # round(budget x all images)
    total: int  # all images

    @property
    def kept(self) -> int:
        return sum(self.keep)


def plan_budget(histograms: Sequence[Sequence[int]], budget: float) -> BudgetPlan:
    """`histograms`: one fixed-bin histogram over [0, 1] per site (equal bin counts)."""
    if not 0 < budget <= 1:
        raise ValueError("budget must be in (0, 1]")
    h = np.asarray(histograms, dtype=np.int64).reshape(len(histograms), -1)
    bins = h.shape[1]
    total = int(h.sum())
    target = min(total, max(1, int(round(budget * total)))) if total else 0
    summed = h.sum(0)
    above = np.concatenate([np.cumsum(summed[::-1])[::-1][1:], [0]])  # images in bins strictly above each bin
    # the boundary bin b: above[b] < target <= above[b] + summed[b]
    b = int(np.flatnonzero((above < target) & (above + summed >= target))[-1]) if target else bins - 1
    frac = (target - above[b]) / summed[b] if summed[b] else 0.0
    threshold = float((b + 1 - frac) / bins)
    site_above = np.concatenate([np.cumsum(h[:, ::-1], axis=1)[:, ::-1][:, 1:], np.zeros((len(h), 1), np.int64)], 1)
    exact = site_above[:, b] + frac * h[:, b]
    keep = np.floor(exact).astype(np.int64)
    short = target - int(keep.sum())  # largest remainders get the rest
    for i in np.argsort(-(exact - keep), kind="stable")[:short]:
        keep[i] += 1
    return BudgetPlan(threshold, [int(k) for k in keep], target, total)
