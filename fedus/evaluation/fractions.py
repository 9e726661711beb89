"""Label-fraction subsets of a site's train split: stratified by class, whole leakage groups only.

A 5 % subset that split a patient's images would let near-identical frames sit on
both sides of nothing (the test split is fixed), but it would also make the
fraction a lie: five frames of one patient are one labelled case, not five. So
subsets are drawn group by group, per class stratum (a group's class is its
majority label, as in `fedus.data.splits.grouped_split`).
"""

from __future__ import annotations

import numpy as np

from fedus.config import ConfigError

__all__ = ["parse_fractions", "label_fraction_subset"]


def parse_fractions(spec: str) -> list[float]:
    """'0.05,0.1,1.0' -> sorted unique fractions in (0, 1]."""
    try:
        fracs = sorted({float(p) for p in str(spec).split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"eval.label-fractions must be comma-separated numbers, got '{spec}'") from None
    if not fracs or fracs[0] <= 0 or fracs[-1] > 1:
        raise ConfigError(f"eval.label-fractions must lie in (0, 1], got '{spec}'")
    return fracs


def label_fraction_subset(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of about `fraction` of the images of every class, taking whole groups only.

    Per class stratum, groups are shuffled by `seed` and added while that brings the
    image count closer to `fraction` x the stratum size; every stratum keeps at least
    one group, so no class vanishes at 5 %. `fraction` = 1 returns everything.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(labels) != len(groups):
        raise ValueError(f"labels/groups length mismatch: {len(labels)} vs {len(groups)}")
    if fraction >= 1.0 or len(labels) == 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    group_label = np.array([np.bincount(labels[inverse == g] - labels.min()).argmax() + labels.min()
                            for g in range(len(uniq))])
    chosen: list[int] = []
    for label in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == label))
        target = fraction * sizes[members].sum()
        taken = 0
        for i, g in enumerate(members):
            if i == 0 or abs(taken + sizes[g] - target) < abs(taken - target):
                chosen.append(int(g))
                taken += int(sizes[g])
    return np.flatnonzero(np.isin(inverse, chosen))
