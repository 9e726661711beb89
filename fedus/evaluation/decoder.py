"""Segmentation with a frozen encoder: a light U-Net-style decoder over several of its stages.

The decoder is the same for every encoder (width, depth, steps, optimiser), so a
difference in Dice says which *features* carry the mask. Stage maps are computed
once (frozen encoder) and cached; only the decoder trains, on CPU in seconds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, jaccard_score
from torch import nn

__all__ = ["StageDecoder", "decoder_probe", "dice_iou"]


class StageDecoder(nn.Module):
    """Stages (coarse last) -> 1x1 projections to `width` -> top-down: upsample, concat skip, 3x3 conv."""

    def __init__(self, channels: list[int], width: int = 32):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU())
            for _ in channels[:-1])
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, stages: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.proj[-1](stages[-1])
        for i in range(len(stages) - 2, -1, -1):
            skip = self.proj[i](stages[i])
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fuse[i](torch.cat([x, skip], 1))
        return F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=False)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean per-image Dice (binary F1) and IoU (Jaccard) from scikit-learn; empty vs empty scores 1."""
    p = np.asarray(pred).reshape(len(pred), -1).astype(bool)
    t = np.asarray(truth).reshape(len(truth), -1).astype(bool)
    dice = [f1_score(ti, pi, zero_division=1.0) for pi, ti in zip(p, t)]
    iou = [jaccard_score(ti, pi, zero_division=1.0) for pi, ti in zip(p, t)]
    return float(np.mean(dice)), float(np.mean(iou))


def _standardise(train: list[torch.Tensor], test: list[torch.Tensor]) -> tuple[list, list]:
    """Per-channel train mean/std: encoders with different feature scales get the same problem."""
    out_tr, out_te = [], []
    for a, b in zip(train, test):
        a, b = a.float(), b.float()
        mean = a.mean((0, 2, 3), keepdim=True)
        std = a.std((0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-6)
        out_tr.append(torch.nan_to_num((a - mean) / std))
        out_te.append(torch.nan_to_num((b - mean) / std))
    return out_tr, out_te


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice: BCE alone lets small lesions drown in background pixels."""
    prob, flat = torch.sigmoid(logits).flatten(1), target.flatten(1)
    soft_dice = 1 - (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice.mean()


def decoder_probe(train_stages: list[torch.Tensor], train_masks: torch.Tensor, test_stages: list[torch.Tensor],
                  test_masks: torch.Tensor, width: int = 32, steps: int = 200, lr: float = 3e-3, seed: int = 0,
                  batch_size: int = 32) -> dict[str, float]:
    """Train a `StageDecoder` on frozen stage maps ([N,C_i,h_i,w_i], fine to coarse) -> {"dice", "iou"} on test.

    BCE + soft Dice, Adam, minibatches from a local torch.Generator(seed) (the global RNG
    is untouched). {} when undefined: empty split or no foreground in any train mask.
    """
    ytr = (torch.as_tensor(train_masks).float().reshape(len(train_masks), 1, *train_masks.shape[-2:]) > 0.5).float()
    yte = (torch.as_tensor(test_masks).float().reshape(len(test_masks), 1, *test_masks.shape[-2:]) > 0.5)
    if len(ytr) == 0 or len(yte) == 0 or ytr.sum() == 0:
        return {}
    xtr, xte = _standardise(train_stages, test_stages)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = StageDecoder([x.shape[1] for x in xtr], width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    size = tuple(ytr.shape[-2:])
    bs = min(batch_size, len(ytr))
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(ytr), generator=gen)[:bs]
        loss = seg_loss(model([x[idx] for x in xtr], size), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(yte), batch_size):
            preds.append(model([x[s:s + batch_size] for x in xte], tuple(yte.shape[-2:])) > 0)
    dice, iou = dice_iou(torch.cat(preds).numpy(), yte.numpy())
    return {"dice": dice, "iou": iou}
