"""Fused score, its histogram (the only thing that leaves a site) and the site's selection.

Ranks, not raw values, are fused: distances and gradient norms have no common scale,
while percentiles do. The fused score is a weighted mean of percentiles, so it lies in
[0, 1] at every site and fixed-bin histograms from different sites add up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fedus.config import CoresetConfig, DistillConfig
from fedus.coreset.feature import feature_rank, teacher_embeddings
from fedus.coreset.quality import warmup_grad_stats
from fedus.models import Student, Teacher


def percentile(better: np.ndarray) -> np.ndarray:
    """0 for the worst, 1 for the best (ties share their mean rank); inf/nan count as worst."""
    better = np.where(np.isfinite(better), better, -np.inf)
    if len(better) < 2:
        return np.ones(len(better))
    from scipy.stats import rankdata  # here: scipy.stats is ~0.5 s of every ClientApp process's start

    return (rankdata(better) - 1) / (len(better) - 1)


def fuse(distance: np.ndarray, redundant: np.ndarray, grad_mean: np.ndarray, grad_var: np.ndarray,
         feature_weight: float = 1.0, quality_weight: float = 1.0, prefer: str = "representative") -> np.ndarray:
    """Feature rank and quality rank -> [0, 1]. `prefer = "representative"`: near its cluster's
    centre and a small gradient are good (scarce data: keep easy prototypes); `"hard"`: far from
    the centre and a large gradient are good (abundant data: keep what the student has not learnt;
    Sorscher et al. 2022). Either way a steady gradient is good (steadiness as std/mean, so
    large-but-steady is not called noisy twice), an image alone in its cluster (distance inf,
    where corrupted frames land) is worst, and redundant copies score 0 whatever their ranks."""
    sign = {"representative": -1.0, "hard": 1.0}[prefer]
    feature = percentile(sign * distance)  # inf (alone) is the worst either way: percentile's rule
    cv = np.sqrt(grad_var) / np.maximum(grad_mean, 1e-12)
    quality = (percentile(sign * grad_mean) + percentile(-cv)) / 2
    fused = (feature_weight * feature + quality_weight * quality) / (feature_weight + quality_weight)
    return np.where(redundant, 0.0, fused)


def histogram(scores: np.ndarray, bins: int) -> list[int]:
    """Counts of scores in `bins` equal bins over [0, 1] (the last bin includes 1)."""
    counts, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return [int(c) for c in counts]


def suppress_small_bins(counts: list[int], k: int) -> list[int]:
    """Coarsen a histogram before it leaves the site: no non-empty bin holds 1..k-1 images (a bin
    that small can single out rare images; the data card suppresses counts under 5 likewise).

    Edges stay fixed (the server sums histograms) and the total exact. From the top bin down, a
    small bin's images join the next bins below until the merged count reaches k, and sit at
    that lowest bin; a leftover under k at the bottom joins the lowest group, at its own bin.
    Why downwards: every image is then reported at or below its true bin, so the server never
    counts more images above a score than there are. Its threshold is never above the exact
    histograms' one (a site falling back to the threshold is not starved), and (up to the
    within-bin interpolation) no site's keep count rests on scores it does not have. Merging
    upwards would drag whole bins into a rare top bin, where small budgets put the threshold.
    Fewer than k images in all go to bin 0, which says nothing about their scores. k <= 1: off."""
    counts = [int(c) for c in counts]
    total = sum(counts)
    if k <= 1 or not any(0 < c < k for c in counts):
        return counts
    out = [0] * len(counts)
    if total < k:
        out[0] = total
        return out
    carry, lowest = 0, 0
    for j in range(len(counts) - 1, -1, -1):
        carry += counts[j]
        lowest = j if counts[j] else lowest
        if carry >= k:
            out[j], carry = carry, 0
    if carry:  # the bottom leftover and the lowest group merge, at the leftover's lowest bin
        group = next(j for j, c in enumerate(out) if c)
        out[lowest], out[group] = out[group] + carry, 0
    return out


def select(scores: np.ndarray, clusters: np.ndarray, keep: int, quota: float = 0.5,
           redundant: np.ndarray | None = None) -> np.ndarray:
    """Indices of the `keep` images a site trains on (sorted).

    First each cluster gets floor(quota x keep x its share of the site) of its own best
    non-redundant images, so a rare appearance is not crowded out by a tight, high-scoring
    one; the rest go by score over the whole site. Redundant copies come last."""
    n = len(scores)
    keep = max(0, min(int(keep), n))
    redundant = np.zeros(n, bool) if redundant is None else redundant
    order = np.lexsort((np.arange(n), -scores, redundant))  # non-redundant first, then best score, then index
    chosen = np.zeros(n, bool)
    for c in np.unique(clusters):
        members = order[(clusters[order] == c) & ~redundant[order]]
        share = int(np.floor(quota * keep * np.sum(clusters == c) / max(n, 1)))
        chosen[members[:share]] = True
    rest = order[~chosen[order]][: keep - int(chosen.sum())]
    chosen[rest] = True
    return np.flatnonzero(chosen)


@dataclass
class SiteScores:
    """A site's scores, kept at the site between re-scorings (never sent)."""

    scores: np.ndarray  # float [N] in [0, 1]
    clusters: np.ndarray  # int [N]
    redundant: np.ndarray  # bool [N]
    seconds: float = 0.0

    def select(self, keep: int, quota: float) -> np.ndarray:
        return select(self.scores, self.clusters, keep, quota, self.redundant)

    def sent_histogram(self, cfg: CoresetConfig) -> list[int]:
        """All that leaves the site about its scores: their histogram, small bins merged (`coreset.min-bin-count`)."""
        return suppress_small_bins(histogram(self.scores, cfg.bins), cfg.min_bin_count)

    def keep_at(self, threshold: float) -> int:
        """How many of this site's images score at or above `threshold`."""
        return int(np.sum(self.scores >= threshold))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores.astype(np.float64), "clusters": self.clusters.astype(np.int64),
                "redundant": self.redundant.astype(np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "SiteScores":
        return cls(np.asarray(arrays["scores"], np.float64), np.asarray(arrays["clusters"], np.int64),
                   np.asarray(arrays["redundant"]).astype(bool))


def score_site(student: Student, teacher: Teacher, raw: torch.Tensor, cfg: CoresetConfig, lr: float,
               weight_decay: float, batch_size: int, seed: int, device: torch.device,
               precision: str = "auto", distill: DistillConfig | None = None, progress: float = 0.0) -> SiteScores:
    """Both ranks of a site's training images (uint8 [N,H,W]) with the current global student;
    the quality rank with the run's loss mix `distill` at the run's `progress`."""
    start = time.perf_counter()
    ranks = feature_rank(teacher_embeddings(teacher, raw, batch_size, device), cfg.clusters, seed, cfg.duplicate_ratio,
                         cfg.duplicate_neighbours)
    mean, var = warmup_grad_stats(student, teacher, raw, cfg.warmup_steps, lr, weight_decay, batch_size, seed,
                                  device, precision, distill, progress)
    scores = fuse(ranks.distance, ranks.redundant, mean, var, cfg.feature_weight, cfg.quality_weight, cfg.prefer)
    return SiteScores(scores, ranks.clusters, ranks.redundant, time.perf_counter() - start)
