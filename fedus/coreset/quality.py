"""Quality rank: how the distillation gradient on each image behaves over a short warm-up.

The per-sample gradient of token-MSE w.r.t. the student's projected tokens is
(2/T)(s - t): its norm is how hard the image pulls on the student. Tracked from the
incoming global student over a few warm-up steps, its mean is large where the teacher's
response is one the student cannot follow (corrupted, saturated, off-distribution
frames), and its variance is large where the pull oscillates as the student moves
(noisy, conflicting images). `scores.fuse` ranks both down.

The gradient is taken w.r.t. the tokens, not the weights, so scoring costs forward
passes only; the warm-up trains a copy, the student itself is untouched.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fedus.coreset.feature import as_images
from fedus.distill.losses import token_mse
from fedus.distill.site_step import autocast_for
from fedus.models import Student, Teacher


def token_grad_norms(student: Student, teacher: Teacher, raw: torch.Tensor, batch_size: int,
                     device: torch.device, precision: str = "auto") -> np.ndarray:
    """||d L_i / d s_i|| per image, L_i = token-MSE of image i alone, student in eval mode: [N]."""
    was_training = student.training
    student.to(device).eval()
    teacher.to(device)
    norms = []
    for start in range(0, len(raw), batch_size):
        images = as_images(raw[start:start + batch_size]).to(device)
        with torch.no_grad(), autocast_for(device, precision):
            s, t = student(images).float(), teacher(images).float()
        s.requires_grad_(True)
        # the sum of per-image losses: its gradient w.r.t. image i's tokens is image i's own gradient
        (grad,) = torch.autograd.grad((s - t).pow(2).sum(-1).mean(-1).sum(), s)
        norms.append(grad.flatten(1).norm(dim=1).cpu())
    student.train(was_training)
    return torch.cat(norms).numpy() if norms else np.zeros(0, np.float32)


def warmup_grad_stats(student: Student, teacher: Teacher, raw: torch.Tensor, steps: int, lr: float,
                      weight_decay: float, batch_size: int, seed: int, device: torch.device,
                      precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each image's token-gradient norm over `steps` + 1 scorings, one
    AdamW token-MSE step (random batch, un-augmented) between scorings, on a copy of `student`."""
    student = copy.deepcopy(student).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = [token_grad_norms(student, teacher, raw, batch_size, device, precision)]
    for _ in range(steps if len(raw) > 1 else 0):  # BatchNorm cannot train on a single image
        student.train()
        pick = torch.randperm(len(raw), generator=generator)[:batch_size]
        images = as_images(raw[pick]).to(device)
        with autocast_for(device, precision):
            loss = token_mse(student(images), teacher(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(token_grad_norms(student, teacher, raw, batch_size, device, precision))
    stack = np.stack(history)
    return stack.mean(0), stack.var(0)
