"""Site evaluation of the global student on the site's held-out split.

Agreement with the teacher (token cosine / MSE) says whether distillation
worked; frozen-feature probes say whether what was distilled is useful for the
site's own labels and masks. Probes are fitted on the site's training split and
scored on its held-out split, so no test image ever trains anything.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from fedus.data.sites import SiteData
from fedus.distill.losses import token_cosine
from fedus.distill.site_step import autocast_for
from fedus.evaluation.probes import linear_probe, segmentation_probe
from fedus.models import Student, Teacher

Encoder = Callable[[torch.Tensor], torch.Tensor]  # [B,3,H,W] -> [B,C,h,w]


@torch.no_grad()
def teacher_agreement(student: Student, teacher: Teacher, site: SiteData, batch_size: int, device: torch.device, precision: str = "auto") -> dict[str, float]:
    student.to(device).eval()
    teacher.to(device)
    cos_sum, mse_sum, n = 0.0, 0.0, 0
    for batch in DataLoader(site.test, batch_size=batch_size):
        images = batch["image"].to(device)
        with autocast_for(device, precision):
            s, t = student(images).float(), teacher(images).float()
        cos_sum += token_cosine(s, t).sum().item()
        mse_sum += (s - t).pow(2).sum(-1).mean(-1).sum().item()
        n += images.shape[0]
    return {"cos": cos_sum / max(n, 1), "mse": mse_sum / max(n, 1)}


@torch.no_grad()
def _features(encoder: Encoder, dataset, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    maps, masks, has_mask, labels = [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        maps.append(encoder(batch["image"].to(device)).float().cpu())
        masks.append(batch["mask"])
        has_mask.append(batch["has_mask"])
        labels.append(batch["label"])
    return {k: torch.cat(v) for k, v in
            dict(maps=maps, masks=masks, has_mask=has_mask, labels=labels).items()}


def probe_scores(encoder: Encoder, site: SiteData, batch_size: int, seg_steps: int, seed: int, device: torch.device) -> dict[str, float]:
    """cls_acc / cls_f1 where the site has class labels, seg_dice / seg_iou where it has masks."""
    train = _features(encoder, site.train, batch_size, device)
    test = _features(encoder, site.test, batch_size, device)
    scores: dict[str, float] = {}
    tr_lab, te_lab = train["labels"] >= 0, test["labels"] >= 0
    if tr_lab.sum() and te_lab.sum():
        cls = linear_probe(train["maps"][tr_lab].mean((2, 3)), train["labels"][tr_lab],
                           test["maps"][te_lab].mean((2, 3)), test["labels"][te_lab], seed=seed)
        scores.update({f"cls_{k}" if k != "macro_f1" else "cls_f1": v for k, v in cls.items()})
    tr_m, te_m = train["has_mask"], test["has_mask"]
    if tr_m.sum() and te_m.sum():
        seg = segmentation_probe(train["maps"][tr_m], train["masks"][tr_m], test["maps"][te_m],
                                 test["masks"][te_m], steps=seg_steps, seed=seed)
        scores.update({f"seg_{k}": v for k, v in seg.items()})
    return scores
