"""Fit a stand-in teacher when no foundation-model weights are available.

No DINOv3/USFM weights can be downloaded on an offline machine, and distilling
a random network proves nothing. So the demo first fits the teacher briefly,
supervised (class labels + lesion masks, on the tokens that will be distilled),
on the pooled *training* splits of all sites (held-out images never train it),
saves it as safetensors, and every report says so: "not a foundation model".
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from fedus.config import RunConfig
from fedus.data.sites import list_sites, load_site, resolve_manifest
from fedus.data.manifest import read_manifest
from fedus.models.backbones import create_backbone
from fedus.models import create_teacher, save_state
from fedus.progress import progress_bar


def fit_teacher(cfg: RunConfig, out: Path, steps: int = 150, lr: float = 3e-4, data_label: str = "") -> RunConfig:
    """Returns `cfg` with teacher.weights/source pointing at the fitted file."""
    torch.manual_seed(cfg.seed)
    manifest = resolve_manifest(cfg.data, cfg.seed)
    names = list_sites(read_manifest(manifest), cfg.data.site_column, cfg.data.held_out_sites)  # never the unseen centres
    sites = [load_site(cfg.data, cfg.seed, name, manifest) for name in names]
    # one label space over all sites: "site/label", so same words at two sites stay apart
    vocab = sorted({f"{s.name}/{c}" for s in sites for c in s.classes})
    sets = []
    for s in sites:
        ds = s.train_augmented()
        remap = torch.tensor([vocab.index(f"{s.name}/{c}") for c in s.classes] + [-1])
        ds.labels = remap[ds.labels]  # -1 (unlabelled) indexes the trailing -1
        sets.append(ds)
    pooled = ConcatDataset(sets)

    teacher = create_teacher(cfg.teacher.model_copy(update={"weights": ""}), cfg.data.image_size)
    teacher.requires_grad_(True)
    backbone = teacher.backbone.train()
    cls_head = nn.Linear(teacher.dim, max(len(vocab), 1))
    seg_head = nn.Conv2d(teacher.dim, 1, 1)
    params = [*backbone.parameters(), *cls_head.parameters(), *seg_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    loader = DataLoader(pooled, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)
    with progress_bar("fitting demo teacher", total=steps) as bar:
        for _ in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            fmap = teacher.combined_map(batch["image"])
            loss = torch.zeros(())
            labelled = batch["label"] >= 0
            if labelled.any():
                loss = loss + F.cross_entropy(cls_head(fmap.mean((2, 3)))[labelled], batch["label"][labelled])
            masked = batch["has_mask"]
            if masked.any():
                target = F.adaptive_avg_pool2d(batch["mask"][masked], fmap.shape[-2:])
                loss = loss + F.binary_cross_entropy_with_logits(seg_head(fmap[masked]), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.advance()

    # the teacher was pruned after its last used block; save a complete timm state dict (the unused
    # blocks stay at their random init, as they were never trained) so the file loads like any checkpoint
    full = create_backbone(cfg.teacher.arch, cfg.data.image_size)
    unexpected = full.load_state_dict(backbone.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"pruned teacher does not fit {cfg.teacher.arch}: {unexpected[:3]}")
    save_state(full.state_dict(), out, metadata={"arch": cfg.teacher.arch, "fitted_by": "fedus.teacher_fit"})
    data_label = data_label or (cfg.scenario if cfg.data.source == "synthetic" else str(manifest))
    kept_out = f", {', '.join(cfg.data.held_out_sites)} held out" if cfg.data.held_out else ""
    source = (f"teacher fitted here on the pooled training splits of {data_label}{kept_out} "
              f"(supervised: site labels + masks, {steps} steps, lr {lr:g}, seed {cfg.seed}); not a foundation model")
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"weights": str(out), "source": source})})
