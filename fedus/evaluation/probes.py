"""Frozen-feature probes: how much task information an encoder's features carry.

Both probes are deliberately weak (linear) and cheap, so that differences between
teacher, random-init student and distilled student reflect the *features*, not the
probe's capacity. They are fitted on a site's train split and scored on its held-out
split; the encoder is never updated.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

__all__ = ["linear_probe", "segmentation_probe"]


def _as_numpy_features(x: torch.Tensor) -> np.ndarray:
    """[N, ...] tensor -> float64 [N, D] array; non-finite values become 0 so sklearn never crashes."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    arr = t.reshape(t.shape[0], -1 if t.numel() else int(np.prod(t.shape[1:]))).numpy()
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)


def _as_numpy_labels(y: torch.Tensor) -> np.ndarray:
    return torch.as_tensor(y).detach().to("cpu").reshape(-1).long().numpy()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """Frozen pooled features [N,C] + int labels -> {"acc": ..., "macro_f1": ...} on the test split.

    StandardScaler + L2 logistic regression with a fixed C=1.0 (no inner CV: the probe
    must stay cheap and identical across encoders). class_weight="balanced" because
    site class balance varies. Macro-F1 is taken over every class seen in train or
    test, so a class the probe never predicts counts as F1 = 0 instead of vanishing.
    Returns {} when the probe is undefined (fewer than 2 train classes, or an empty
    split); callers skip the metric rather than logging a misleading number.
    """
    xtr, ytr = _as_numpy_features(train_x), _as_numpy_labels(train_y)
    xte, yte = _as_numpy_features(test_x), _as_numpy_labels(test_y)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"features/labels length mismatch: {len(xtr)}/{len(ytr)} train, {len(xte)}/{len(yte)} test")
    if len(xte) == 0 or len(np.unique(ytr)) < 2:
        return {}
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"feature dim mismatch: train {xtr.shape[1]} vs test {xte.shape[1]}")

    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(scaler.transform(xtr), ytr)
    pred = clf.predict(scaler.transform(xte))
    labels = np.union1d(ytr, yte)
    return {
        "acc": float(accuracy_score(yte, pred)),
        "macro_f1": float(f1_score(yte, pred, labels=labels, average="macro", zero_division=0)),
    }


def _prepare_masks(masks: torch.Tensor) -> torch.Tensor:
    """Accept [N,H,W] or [N,1,H,W], any dtype -> float {0,1} [N,1,H,W]."""
    m = torch.as_tensor(masks).detach()
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"masks must be [N,1,H,W] or [N,H,W], got {tuple(m.shape)}")
    return (m.float() > 0.5).float()


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-image soft Dice, averaged; complements BCE on small foreground regions."""
    prob = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1)
    inter = (prob * tgt).sum(1)
    return (1 - (2 * inter + eps) / (prob.sum(1) + tgt.sum(1) + eps)).mean()


def _dice_iou(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image hard Dice/IoU for boolean [B,1,H,W]; empty prediction on empty truth scores 1."""
    p, g = pred.flatten(1).float(), gt.flatten(1).float()
    inter = (p * g).sum(1)
    total = p.sum(1) + g.sum(1)
    union = total - inter
    both_empty = total == 0
    dice = torch.where(both_empty, torch.ones_like(inter), 2 * inter / total.clamp_min(1))
    iou = torch.where(both_empty, torch.ones_like(inter), inter / union.clamp_min(1))
    return dice, iou


def segmentation_probe(
    train_maps: torch.Tensor,
    train_masks: torch.Tensor,
    test_maps: torch.Tensor,
    test_masks: torch.Tensor,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Frozen feature maps [N,C,h,w] + binary masks [N,1,H,W] -> {"dice": ..., "iou": ...} on the test split.

    Probe: channels standardised with train mean/std (so encoders with different
    feature scales get the same optimisation problem), then a 1x1 conv C->1 with bias
    (no BatchNorm), bilinear upsampling to mask size, BCE-with-logits + soft Dice, Adam
    for `steps` minibatch steps. Initialisation and minibatch sampling use a local
    torch.Generator(seed): deterministic, and the global RNG is left untouched.

    Metrics: hard Dice/IoU at probability 0.5 per test image, averaged over *all* test
    images; an image whose mask and prediction are both empty scores 1.0 (correctly
    predicted absence). Returns {} when undefined: an empty split, or no foreground pixel
    in any train mask (nothing to learn; the empty/empty rule would inflate the score).
    """
    xtr = torch.as_tensor(train_maps).detach().float()
    xte = torch.as_tensor(test_maps).detach().float().to(xtr.device)
    ytr = _prepare_masks(train_masks).to(xtr.device)
    yte = _prepare_masks(test_masks).to(xtr.device)
    if xtr.dim() != 4 or xte.dim() != 4 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"maps must be [N,C,h,w] with equal C, got {tuple(xtr.shape)} and {tuple(xte.shape)}")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("maps/masks length mismatch")
    if len(xtr) == 0 or len(xte) == 0 or ytr.sum() == 0:
        return {}

    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-6)
    xtr, xte = torch.nan_to_num((xtr - mean) / std), torch.nan_to_num((xte - mean) / std)

    gen = torch.Generator().manual_seed(seed)
    n_ch = xtr.shape[1]
    weight = (torch.randn(1, n_ch, 1, 1, generator=gen) * 0.01).to(xtr.device).requires_grad_()
    bias = torch.zeros(1, device=xtr.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)

    def logits(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(F.conv2d(x, weight, bias), size=size, mode="bilinear", align_corners=False)

    size = tuple(ytr.shape[-2:])
    bs = min(batch_size, len(xtr))
    for _ in range(steps):
        idx = torch.randperm(len(xtr), generator=gen)[:bs].to(xtr.device)
        out, tgt = logits(xtr[idx], size), ytr[idx]
        loss = F.binary_cross_entropy_with_logits(out, tgt) + _soft_dice_loss(out, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dices, ious = [], []
    with torch.no_grad():
        for start in range(0, len(xte), batch_size):
            gt = yte[start : start + batch_size]
            pred = logits(xte[start : start + batch_size], tuple(gt.shape[-2:])) > 0
            d, i = _dice_iou(pred, gt > 0.5)
            dices.append(d)
            ious.append(i)
    return {"dice": float(torch.cat(dices).mean()), "iou": float(torch.cat(ious).mean())}
