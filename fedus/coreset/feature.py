"""Feature rank: where an image sits among its site's images in the frozen teacher's embedding.

k-means on the teacher's pooled, L2-normalised embeddings groups a site's appearances
(devices, presets, anatomy). Within a group, an image close to the centre of the *other*
members is representative; one far from it is atypical, and an image alone in its group
has no support at all (leave-one-out distance = infinity), which is where corrupted
frames end up. By default representative images are kept (Sorscher et al. 2022,
"Beyond neural scaling laws": keep easy prototypes when data are scarce, hard,
atypical ones when data are abundant; `coreset.prefer` picks, `scores.fuse` applies
it); the per-cluster quotas in `scores.select` keep the rarer groups represented.

Duplicates carry no new information however typical they are: an image much closer to
another than the site's typical distance to its 10th neighbour is marked redundant
(SemDeDup-style, Abbas et al. 2023), except the first of each duplicate group; so are
the other frames of a cine clip, which real exports are full of.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedus.models import Teacher


def as_images(raw: torch.Tensor) -> torch.Tensor:
    """Site pixels (uint8 [N,H,W], grayscale) -> float [N,3,H,W] in [0,1], as the models take them."""
    return raw.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)


@torch.no_grad()
def teacher_embeddings(teacher: Teacher, raw: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Token-mean of the teacher's tokens, L2-normalised: [N, D] float32 (cosine geometry)."""
    teacher.to(device)
    out = []
    for start in range(0, len(raw), batch_size):
        tokens = teacher(as_images(raw[start:start + batch_size]).to(device)).float()
        out.append(torch.nn.functional.normalize(tokens.mean(1), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


@dataclass
class FeatureRank:
    clusters: np.ndarray  # int [N], k-means cluster of each image
    distance: np.ndarray  # float [N], leave-one-out distance to the cluster centre (inf when alone)
    redundant: np.ndarray  # bool [N], a later copy of a (near-)duplicate


def feature_rank(embeddings: np.ndarray, clusters: int, seed: int, duplicate_ratio: float = 0.25,
                 duplicate_neighbours: int = 10) -> FeatureRank:
    """Duplicates are found first and left out of the clustering, so the one copy that stays
    is judged among the other images, not next to its own copies."""
    n = len(embeddings)
    redundant = duplicates(embeddings, duplicate_ratio, duplicate_neighbours)
    unique = embeddings[~redundant].astype(np.float64)
    k = max(1, min(clusters, len(unique)))
    from sklearn.cluster import KMeans  # here: scikit-learn costs every ClientApp process start-up

    km = KMeans(n_clusters=k, n_init=4, random_state=seed % (2**31)).fit(unique)
    labels = km.predict(embeddings.astype(np.float64)).astype(np.int64)
    labels[~redundant] = km.labels_
    sizes = np.bincount(km.labels_, minlength=k)[labels]
    to_centre = np.linalg.norm(embeddings - km.cluster_centers_[labels], axis=1)
    # centre of the other members = (n c - x) / (n - 1): the distance to it is n / (n - 1) x the distance to c
    distance = np.full(n, np.inf)
    alone = sizes <= 1
    distance[~alone] = to_centre[~alone] * sizes[~alone] / (sizes[~alone] - 1)
    distance[redundant] = np.inf
    return FeatureRank(labels, distance, redundant)


def duplicates(embeddings: np.ndarray, ratio: float, neighbours: int = 10, block: int = 2048) -> np.ndarray:
    """True for every image but the first of a group lying within `ratio` x the site's median distance
    to the `neighbours`-th nearest neighbour (exact copies, frames of one cine clip, near-constant frames).
    The reference is a farther neighbour, not the nearest: where most images come in clips, the nearest
    neighbour is a sibling frame, and a rule relative to it would call no frame a duplicate. Clips
    longer than `neighbours` frames need a larger value. Distances are taken a block of rows at a
    time, so memory stays O(block x N)."""
    n = len(embeddings)
    if n < 3 or ratio <= 0:
        return np.zeros(n, bool)
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))

    def rows(start: int) -> torch.Tensor:
        d = torch.cdist(emb[start:start + block], emb)
        idx = torch.arange(d.shape[0])
        d[idx, idx + start] = float("inf")
        return d

    k = min(max(1, neighbours), n - 1)
    kth = torch.cat([rows(s).topk(k, dim=1, largest=False).values[:, -1] for s in range(0, n, block)])
    radius = ratio * kth.median().item()
    redundant = np.zeros(n, bool)
    for start in range(0, n, block):
        close = (rows(start) <= radius).numpy()
        for r, i in enumerate(range(start, min(start + block, n))):
            if not redundant[i]:  # the first of a group keeps its place; later copies go
                redundant[np.flatnonzero(close[r, i + 1:]) + i + 1] = True
    return redundant
