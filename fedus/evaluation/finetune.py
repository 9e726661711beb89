"""Full fine-tuning, the protocol's other half: the encoder trains together with its head.

Frozen probes say what the features already hold; fine-tuning says how good a
starting point the encoder is when a site has labels to spend (the reference
papers report both). Same heads as the frozen protocol (a linear classifier on
pooled last-stage features; the `StageDecoder` over the last `decoder-stages`
maps), the same label-fraction subsets and seeds, the same metrics. The encoder
is a copy: the model evaluated is never changed.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from fedus.config import EvalConfig
from fedus.evaluation.decoder import StageDecoder, dice_iou, seg_loss
from fedus.evaluation.protocol import class_metrics
from fedus.models.backbones import feature_maps

__all__ = ["finetune"]


def _encoder(model) -> tuple[nn.Module, nn.Module]:
    backbone = copy.deepcopy(model.backbone).train()
    backbone.requires_grad_(True)
    return backbone, model.normalize


def _batches(dataset, idx: np.ndarray, batch_size: int, seed: int):
    """Endless shuffled minibatches of `idx` from a local generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(Subset(dataset, [int(i) for i in idx]), batch_size=min(batch_size, len(idx)), shuffle=True,
                        generator=gen, drop_last=len(idx) > batch_size)
    while True:
        yield from loader


def finetune(model, task: str, train_set, train_idx: np.ndarray, test_set, test_idx: np.ndarray, classes: int,
             ecfg: EvalConfig, seed: int, device: torch.device) -> tuple[dict[str, float], list[float]]:
    """Fine-tune a copy of `model`'s encoder with a fresh head on `train_idx` of `train_set`; score `test_idx` of
    `test_set`. task "cls": acc / macro_f1 / balanced_acc (scikit-learn); "seg": dice / iou.
    Returns (metrics, training loss per step); ({}, []) when the task is undefined on these images."""
    if len(train_idx) < 2 or len(test_idx) == 0:
        return {}, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, normalize = _encoder(model)
        stages = 1 if task == "cls" else ecfg.decoder_stages
        with torch.no_grad():
            probe = feature_maps(backbone.eval(), normalize(train_set[int(train_idx[0])]["image"][None]), stages)
        backbone.train()
        head: nn.Module = (nn.Linear(probe[-1].shape[1], classes) if task == "cls"
                           else StageDecoder([p.shape[1] for p in probe], ecfg.decoder_width))
    backbone.to(device), head.to(device)
    opt = torch.optim.AdamW([{"params": backbone.parameters(), "lr": ecfg.finetune_lr},
                             {"params": head.parameters(), "lr": ecfg.finetune_lr * 10}], weight_decay=0.01)

    def forward(images: torch.Tensor) -> torch.Tensor:
        maps = feature_maps(backbone, normalize(images.to(device)), stages)
        return head(maps[-1].float().mean((2, 3))) if task == "cls" else head(maps, tuple(images.shape[-2:]))

    losses = []
    batches = _batches(train_set, train_idx, ecfg.batch_size, seed)
    for _ in range(ecfg.finetune_steps):
        batch = next(batches)
        out = forward(batch["image"])
        if task == "cls":
            loss = F.cross_entropy(out, batch["label"].to(device))
        else:
            loss = seg_loss(out, (batch["mask"].to(device) > 0.5).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    backbone.eval(), head.eval()
    preds, truth = [], []
    with torch.no_grad():
        for batch in DataLoader(Subset(test_set, [int(i) for i in test_idx]), batch_size=ecfg.batch_size):
            out = forward(batch["image"]).cpu()
            preds.append(out.argmax(1) if task == "cls" else out > 0)
            truth.append(batch["label"] if task == "cls" else batch["mask"] > 0.5)
    pred, true = torch.cat(preds).numpy(), torch.cat(truth).numpy()
    if task == "seg":
        dice, iou = dice_iou(pred, true)
        return {"dice": dice, "iou": iou}, losses
    return class_metrics(true, pred, np.arange(classes)), losses
