"""Planted junk, to check that a selection drops it: extra copies of some images, and
saturated, blank and noise frames (what a scanner export also contains). Used by the
coreset test and benchmark; the kinds are returned so a check can name what was kept."""

from __future__ import annotations

import torch

KINDS = ("duplicate", "saturated", "blank", "noise")


def planted(raw: torch.Tensor, seed: int, per_kind: int = 3) -> tuple[torch.Tensor, list[str]]:
    """uint8 [N,H,W] -> the same images followed by 3 extra copies of `per_kind` of them and
    `per_kind` saturated, blank and noise frames each (blank = grey levels 0-3, so it is not
    a constant image, which the loader would skip), and the kind of every image ("clean" first)."""
    g = torch.Generator().manual_seed(seed)
    n, size = len(raw), raw.shape[-1]
    copies = raw[torch.randperm(n, generator=g)[:per_kind]].repeat_interleave(3, 0)
    saturated = 250 + torch.randint(0, 6, (per_kind, size, size), generator=g)
    blank = torch.randint(0, 4, (per_kind, size, size), generator=g)
    noise = torch.randint(0, 256, (per_kind, size, size), generator=g)
    frames = [x.clamp(0, 255).to(torch.uint8) for x in (saturated, blank, noise)]
    kinds = ["clean"] * n + ["duplicate"] * len(copies) + [k for k in KINDS[1:] for _ in range(per_kind)]
    return torch.cat([raw, copies, *frames]), kinds


def plant(dataset, seed: int, per_kind: int = 3) -> list[str]:
    """Append `planted` images to a site's training dataset (fedus.data.dataset) in place, without
    masks or labels; returns the kind of every image."""
    n = len(dataset.images)
    dataset.images, kinds = planted(dataset.images, seed, per_kind)
    extra = len(dataset.images) - n
    dataset.masks = torch.cat([dataset.masks, dataset.masks.new_zeros((extra, *dataset.masks.shape[1:]))])
    dataset.has_mask = torch.cat([dataset.has_mask, torch.zeros(extra, dtype=torch.bool)])
    dataset.labels = torch.cat([dataset.labels, torch.full((extra,), -1, dtype=torch.long)])
    return kinds
