"""Site evaluation of the global student on the site's held-out split.

Agreement with the teacher (token cosine / MSE) says whether distillation
worked; frozen-feature probes say whether what was distilled is useful for the
site's own labels and masks. Probes are fitted on the site's training split and
scored on its held-out split, so no test image ever trains anything.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedus.config import EvalConfig
from fedus.data.sites import SiteData
from fedus.distill.losses import token_cosine
from fedus.distill.site_step import autocast_for
from fedus.models import Student, Teacher


def teacher_agreement(student: Student, teacher: Teacher, site: SiteData, batch_size: int, device: torch.device, precision: str = "auto") -> dict[str, float]:
    return teacher_agreements({"student": student}, teacher, site, batch_size, device, precision)["student"]


@torch.no_grad()
def teacher_agreements(students: dict[str, Student], teacher: Teacher, site: SiteData, batch_size: int,
                       device: torch.device, precision: str = "auto") -> dict[str, dict[str, float]]:
    """Token cosine / MSE to the teacher of several students in one pass over the held-out split:
    the teacher (the expensive model) runs once per batch, however many students are scored."""
    teacher.to(device)
    for student in students.values():
        student.to(device).eval()
    sums = {name: [0.0, 0.0] for name in students}
    n = 0
    for batch in DataLoader(site.test, batch_size=batch_size):
        images = batch["image"].to(device)
        with autocast_for(device, precision):
            t = teacher(images).float()
        for name, student in students.items():
            with autocast_for(device, precision):
                s = student(images).float()
            sums[name][0] += token_cosine(s, t).sum().item()
            sums[name][1] += (s - t).pow(2).sum(-1).mean(-1).sum().item()
        n += images.shape[0]
    return {name: {"cos": c / max(n, 1), "mse": m / max(n, 1)} for name, (c, m) in sums.items()}


def probe_scores(model: Student | Teacher, site: SiteData, ecfg: EvalConfig, seed: int, device: torch.device) -> dict[str, float]:
    """cls_acc / cls_f1 where the site has class labels, seg_dice / seg_iou where it has masks.

    The protocol's own heads (fedus.evaluation.protocol: linear head on pooled last-stage features,
    `StageDecoder` over the last `eval.decoder-stages` maps) at 100 % labels and one seed, with
    `eval.seg-probe-steps` decoder steps: a round's probe and `fedus evaluate` measure the same thing."""
    from fedus.evaluation.decoder import decoder_probe
    from fedus.evaluation.protocol import extract, linear_head, stage_fn

    fn = stage_fn(model.to(device), ecfg.decoder_stages)
    train, test = extract(fn, site.train, ecfg.batch_size, device), extract(fn, site.test, ecfg.batch_size, device)
    scores: dict[str, float] = {}
    tr, te = np.flatnonzero(train.labels >= 0), np.flatnonzero(test.labels >= 0)
    if len(tr) and len(te):
        cls = linear_head(train.pooled[tr], train.labels[tr], test.pooled[te], test.labels[te], seed=seed)
        scores.update({"cls_acc": cls["acc"], "cls_f1": cls["macro_f1"]} if cls else {})
    if len(train.mask_idx) and len(test.mask_idx):
        seg = decoder_probe(train.stages, train.masks, test.stages, test.masks, ecfg.decoder_width,
                            ecfg.seg_probe_steps, seed=seed)
        scores.update({f"seg_{k}": v for k, v in seg.items()})
    return scores
