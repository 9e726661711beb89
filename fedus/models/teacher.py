"""The frozen teacher: tokens from intermediate blocks, never trained at a site."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedus.config import ConfigError, TeacherConfig, parse_blocks
from fedus.models.backbones import Normalize, create_backbone, feature_maps


class Teacher(nn.Module):
    """Frozen timm model -> token grid [B, N, D] from n intermediate blocks (mean or concat)."""

    def __init__(self, backbone: nn.Module, blocks: int | list[int], combine: str, image_size: int):
        super().__init__()
        self.backbone = backbone
        self.normalize = Normalize(backbone)
        self.blocks = blocks
        self.combine = combine
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            probe = self.feature_map(torch.zeros(1, 3, image_size, image_size))
        self.dim, self.grid = probe.shape[1], tuple(probe.shape[2:])

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: dropout/BN stay in inference mode

    @torch.no_grad()
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.combined_map(x)

    def combined_map(self, x: torch.Tensor) -> torch.Tensor:
        """Grad-capable version of `feature_map`, for fitting a demo teacher."""
        maps = feature_maps(self.backbone, self.normalize(x), self.blocks)
        grid = maps[-1].shape[-2:]
        maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear") for m in maps]
        if self.combine == "concat":
            return torch.cat(maps, dim=1)
        if len({m.shape[1] for m in maps}) > 1:
            raise ConfigError("teacher.combine = 'mean' needs blocks of equal width; use 'concat'")
        return torch.stack(maps).mean(0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).flatten(2).transpose(1, 2)


def create_teacher(cfg: TeacherConfig, image_size: int, seed: int | None = None) -> Teacher:
    """`seed`: a teacher without weights is drawn from it, so that every site and every round (each a
    fresh process in a deployment) distils toward the same frozen teacher; None = the global RNG."""
    if seed is not None and not cfg.weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = create_backbone(cfg.arch, image_size, cfg.weights)
    else:
        backbone = create_backbone(cfg.arch, image_size, cfg.weights)
    # Frozen and only read up to its last chosen block: drop the rest (memory at every site, and the
    # demo teacher's fit no longer trains blocks nobody reads). Weights were loaded before pruning.
    backbone.prune_intermediate_layers(parse_blocks(cfg.blocks), prune_norm=False, prune_head=True)
    return Teacher(backbone, parse_blocks(cfg.blocks), cfg.combine, image_size)
