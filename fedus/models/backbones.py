"""timm backbones: one place that turns a name (+ optional local weights) into a model.

Weights only ever come from a local file through timm's own loading path
(`pretrained_cfg_overlay=dict(file=...)`), so a `.safetensors` export of DINOv3
or USFM loads exactly as timm would load it from the hub.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from fedus.config import ConfigError


def create_backbone(arch: str, image_size: int, weights: str = "") -> nn.Module:
    """A headless timm model; ViT-style models are built for `image_size` (pos-embed resampled)."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        hint = f" (did you mean: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown timm model '{arch}'{hint}")
    kwargs: dict = dict(num_classes=0)
    if weights:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"weights file not found: {path}")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    try:
        try:
            return timm.create_model(arch, img_size=image_size, **kwargs)
        except TypeError:  # CNNs take no img_size
            return timm.create_model(arch, **kwargs)
    except Exception as err:  # safetensors, pickle and shape errors all mean "these weights don't fit"
        if weights:
            reason = str(err).splitlines()[0][:200]
            raise ConfigError(f"cannot load weights {weights} into {arch}: {reason}") from None
        raise


class Normalize(nn.Module):
    """Each network normalises its own [0,1] input with its own pretrained statistics."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def feature_maps(model: nn.Module, x: torch.Tensor, indices: int | list[int]) -> list[torch.Tensor]:
    """NCHW maps after the chosen blocks, for CNNs and ViTs alike (blocks after the last one never run)."""
    return model.forward_intermediates(x, indices=indices, intermediates_only=True, output_fmt="NCHW", stop_early=True)
