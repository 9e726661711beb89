"""The student: any timm backbone + a token-wise projection head aligned to the teacher's grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedus.config import StudentConfig
from fedus.models.backbones import Normalize, create_backbone, feature_maps


class TokenHead(nn.Module):
    """Two-layer MLP applied to every token (1x1 convs = per-position Linear)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Student(nn.Module):
    """`encode` gives the deployable encoder's map; `forward` gives tokens on the teacher's grid."""

    def __init__(self, backbone: nn.Module, head_hidden: int, teacher_dim: int, teacher_grid: tuple[int, int], image_size: int):
        super().__init__()
        self.backbone = backbone
        self.normalize = Normalize(backbone)
        self.teacher_grid = tuple(teacher_grid)
        with torch.no_grad():  # eval: a 1-image probe through BatchNorm must not touch its statistics
            self.dim = self.eval().encode(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.train()
        self.head = TokenHead(self.dim, head_hidden, teacher_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return feature_maps(self.backbone, self.normalize(x), 1)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.head(self.encode(x))
        if tokens.shape[-2:] != self.teacher_grid:
            tokens = F.interpolate(tokens, size=self.teacher_grid, mode="bilinear", align_corners=False)
        return tokens.flatten(2).transpose(1, 2)


def create_student(cfg: StudentConfig, teacher_dim: int, teacher_grid: tuple[int, int], image_size: int, seed: int,
                   dp_compatible: bool = False) -> Student:
    """Seeded, so the server and every site agree on the round-0 student.

    `dp_compatible` (DP-SGD runs) swaps BatchNorm for GroupNorm and reshapes a few
    layers for Opacus; its state-dict keys differ, so server and sites must agree on it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = create_backbone(cfg.arch, image_size)
        if dp_compatible:
            from fedus.privacy import make_dp_compatible

            backbone = make_dp_compatible(backbone, cfg.arch)
        student = Student(backbone, cfg.head_hidden, teacher_dim, teacher_grid, image_size)
    if dp_compatible:
        freeze_unused(student, image_size)
    return student


def freeze_unused(student: Student, image_size: int) -> None:
    """Freeze parameters `forward` never reaches (a ViT's final norm, a CNN's conv_head): DP-SGD
    needs a per-sample gradient for every trainable parameter, and these would never get one."""
    student(torch.zeros(2, 3, image_size, image_size)).sum().backward()
    for p in student.parameters():
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
