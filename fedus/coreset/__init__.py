"""Federated coreset selection: TinyUSFM's feature-gradient "dual rank", fedus's own design
(the paper's code is not public).

At each site: a feature rank (`feature`: teacher embeddings, k-means, distance to the
cluster centre, duplicates) and a quality rank (`quality`: per-sample gradient norms of
the distillation loss over a short warm-up) are fused into one score in [0, 1]
(`scores`). Only a fixed-bin histogram of those scores (small bins merged: by default no
bin of 1-4 images) and the site's image count leave the site; the server turns the summed
histograms and one global budget into a threshold and each site's keep count (`budget`, a
pure function); the site keeps that many of its best-scored images, per-cluster quotas
first (`scores.select`).
"""

from fedus.coreset.budget import BudgetPlan, plan_budget
from fedus.coreset.feature import FeatureRank, feature_rank, teacher_embeddings
from fedus.coreset.quality import token_grad_norms, warmup_grad_stats
from fedus.coreset.scores import SiteScores, fuse, histogram, score_site, select, suppress_small_bins

__all__ = [
    "BudgetPlan", "FeatureRank", "SiteScores", "feature_rank", "fuse", "histogram", "plan_budget", "score_site",
    "select", "suppress_small_bins", "teacher_embeddings", "token_grad_norms", "warmup_grad_stats",
]
