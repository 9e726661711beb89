"""Planted junk, to check that a selection drops it: extra copies of some images, and
saturated, blank and noise frames (what a scanner export also contains); and cine-like
redundancy (each image followed by a few near-identical frames, as exported clips are).
Used by the coreset test and benchmark; the kinds are returned so a check can name what was kept."""

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


def add_cine_frames(dataset, seed: int, frames: int = 4, noise: float = 4.0) -> list[str]:
    """Turn each training image into a short clip in place: it is followed by `frames` - 1 copies
    shifted by up to one pixel sideways with Gaussian grey-level noise (std `noise`), same mask and
    label, as consecutive frames of a cine export are. Returns the kind of every image."""
    g = torch.Generator().manual_seed(seed)
    raw = dataset.images
    out, kinds = [], []
    for i in range(len(raw)):
        out.append(raw[i])
        kinds.append("clean")
        for _ in range(frames - 1):
            shift = int(torch.randint(-1, 2, (1,), generator=g))
            frame = torch.roll(raw[i].float(), shift, dims=-1) + noise * torch.randn(raw[i].shape, generator=g)
            out.append(frame.round().clamp(0, 255).to(torch.uint8))
            kinds.append("cine")
    repeat = torch.full((len(raw),), frames)
    dataset.images = torch.stack(out)
    dataset.masks = dataset.masks.repeat_interleave(repeat, 0)
    dataset.has_mask = dataset.has_mask.repeat_interleave(repeat, 0)
    dataset.labels = dataset.labels.repeat_interleave(repeat, 0)
    return kinds
