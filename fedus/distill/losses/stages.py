"""Stage-wise features of teacher and student in one forward pass each.

Losses that distil several depths (masked-consistency) need intermediate maps
as well as the token grid the student's head is aligned to; getting all of them
from one `forward_intermediates` call keeps the cost at one pass per view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedus.models import Student, Teacher
from fedus.models.backbones import feature_maps


def depth_of(backbone: nn.Module) -> int:
    """Number of intermediates `forward_intermediates` can return (ViT blocks, CNN stages)."""
    if hasattr(backbone, "blocks") and isinstance(backbone.blocks, nn.Sequential | nn.ModuleList):
        return len(backbone.blocks)
    info = getattr(backbone, "feature_info", None)
    if info is not None:
        return len(info)
    raise ValueError(f"cannot tell the depth of {type(backbone).__name__}")


def evenly_spaced(depth: int, n: int) -> list[int]:
    """n indices ending at the last block, e.g. depth 12, n 3 -> [3, 7, 11] (after blocks 4/8/12)."""
    n = max(1, min(n, depth))
    return sorted({round((i + 1) * depth / n) - 1 for i in range(n)})


def combined_indices(teacher: Teacher) -> list[int]:
    depth = depth_of(teacher.backbone)
    return list(range(depth - teacher.blocks, depth)) if isinstance(teacher.blocks, int) else list(teacher.blocks)


@torch.no_grad()
def teacher_tokens_and_stages(teacher: Teacher, x: torch.Tensor, stages: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The teacher's token grid (as `teacher(x)`, [B,N,D]) and NCHW maps after `stages`, in one pass."""
    combo = combined_indices(teacher)
    wanted = sorted(set(combo) | set(stages))
    maps = dict(zip(wanted, feature_maps(teacher.backbone, teacher.normalize(x), wanted)))
    grid = maps[combo[-1]].shape[-2:]
    parts = [maps[i] if maps[i].shape[-2:] == grid else F.interpolate(maps[i], size=grid, mode="bilinear") for i in combo]
    combined = torch.cat(parts, 1) if teacher.combine == "concat" else torch.stack(parts).mean(0)
    return combined.flatten(2).transpose(1, 2), [maps[i] for i in stages]


def student_tokens_and_stages(student: Student, x: torch.Tensor, stages: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Student tokens (as `student(x)`), maps after `stages`, and the final encoder map, in one pass."""
    last = depth_of(student.backbone) - 1
    wanted = sorted(set(stages) | {last})
    maps = dict(zip(wanted, feature_maps(student.backbone, student.normalize(x), wanted)))
    final = maps[last]
    tokens = student.head(final)
    if tokens.shape[-2:] != student.teacher_grid:
        tokens = F.interpolate(tokens, size=student.teacher_grid, mode="bilinear", align_corners=False)
    return tokens.flatten(2).transpose(1, 2), [maps[i] for i in stages], final
