"""Quality rank: how the distillation gradient on each image behaves over a short warm-up.

The loss is the run's own (`distill.loss`, built by the registry as the site step builds it):
its per-image gradient w.r.t. the student's projected tokens is how hard the image pulls on
the student (token-MSE on the teacher's grid: (2/T)(s - t)). Tracked from the incoming
global student over a few warm-up steps, its mean is large where the teacher's response is
one the student cannot follow (corrupted, saturated, off-distribution frames), and its
variance is large where the pull oscillates as the student moves (noisy, conflicting
images). `scores.fuse` ranks both down.

The gradient is taken w.r.t. the tokens (the token head's output, made a leaf of the graph),
not the weights, so scoring costs the loss's forward passes only; the warm-up trains a copy,
the student itself is untouched.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager

import numpy as np
import torch

from fedus.config import DistillConfig
from fedus.coreset.feature import as_images
from fedus.distill.losses import Objective, StepInputs, create_loss, create_objective
from fedus.distill.site_step import autocast_for
from fedus.models import Student, Teacher

log = logging.getLogger(__name__)
_NOTED: set[str] = set()  # loss specs whose fallback was logged (once per process, not per query)


def scoring_objective(distill: DistillConfig | None = None) -> Objective:
    """The site step's loss mix for scoring: same registry, same weights, mixup off.

    A per-image gradient needs a batch loss that is a mean of per-image terms
    (`DistillLoss.per_sample`). A term that is not (repulsive-kd: batch-contrastive, an image's
    gradient depends on which images share its batch; masked-consistency with per-sample
    weights, a softmax over the batch) is scored by token-MSE at its weight instead -
    repulsive-kd's own base term, the part of it that is per image; logged once."""
    distill = distill or DistillConfig()
    terms, swapped = [], {}
    for loss, weight in create_objective(distill, mixup=False).terms:
        if loss.per_sample:
            terms.append((loss, weight))
        else:
            swapped[loss.name] = weight
    if swapped:
        extra = sum(swapped.values())
        mse = next((i for i, (loss, _) in enumerate(terms) if loss.name == "token-mse"), None)
        if mse is None:
            terms.append((create_loss("token-mse", distill, mixup=False), extra))
        else:
            terms[mse] = (terms[mse][0], terms[mse][1] + extra)
        if distill.loss not in _NOTED:
            _NOTED.add(distill.loss)
            log.warning("coreset quality rank: %s has no per-image gradient (its terms depend on the whole "
                        "batch); scored by token-mse at its weight instead", ", ".join(swapped))
    return Objective(terms)


@contextmanager
def token_leaves(student: Student):
    """While open, every output of the student's token head is detached into a fresh leaf (fp32),
    collected in the yielded list, and the student's weights are frozen: the loss's gradient
    w.r.t. the tokens then needs no backward through the student."""
    leaves: list[torch.Tensor] = []

    def hook(module, args, out):
        leaf = out.detach().float().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    flags = [p.requires_grad for p in student.parameters()]
    student.requires_grad_(False)
    handle = student.head.register_forward_hook(hook)
    try:
        yield leaves
    finally:
        handle.remove()
        for p, flag in zip(student.parameters(), flags):
            p.requires_grad_(flag)


def token_grad_norms(student: Student, teacher: Teacher, raw: torch.Tensor, batch_size: int,
                     device: torch.device, precision: str = "auto", objective: Objective | None = None,
                     progress: float = 0.0, seed: int = 0) -> np.ndarray:
    """||d L_i / d z_i|| per image: [N]. L_i = `objective`'s loss (default token-MSE) of image i,
    z_i = its projected tokens over every student call the loss makes (both views of
    masked-consistency), student in eval mode. The objective's batch loss is a mean of per-image
    terms, so B x its gradient w.r.t. z_i is image i's own. Its random draws (patch masks) come from
    a generator seeded alike at every scoring: re-scorings differ by the student only."""
    objective = objective or scoring_objective()
    was_training = student.training
    student.to(device).eval()
    teacher.to(device)
    generator = torch.Generator().manual_seed(seed)
    norms = []
    with token_leaves(student) as leaves:
        for start in range(0, len(raw), batch_size):
            images = as_images(raw[start:start + batch_size]).to(device)
            leaves.clear()
            with autocast_for(device, precision):
                loss = objective(StepInputs(student, teacher, [images] * objective.views, generator, progress)).loss
            square = torch.zeros(len(images), device=device)
            if loss.requires_grad and leaves:  # every view's tokens of image i count towards its norm
                for g in torch.autograd.grad(loss.float(), leaves, allow_unused=True):
                    if g is not None:
                        square = square + g.flatten(1).pow(2).sum(1)
            norms.append((len(images) * square.sqrt()).cpu())
    student.train(was_training)
    return torch.cat(norms).numpy() if norms else np.zeros(0, np.float32)


def warmup_grad_stats(student: Student, teacher: Teacher, raw: torch.Tensor, steps: int, lr: float,
                      weight_decay: float, batch_size: int, seed: int, device: torch.device,
                      precision: str = "auto", distill: DistillConfig | None = None,
                      progress: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each image's token-gradient norm over `steps` + 1 scorings, one AdamW
    step of the site step's loss mix (random batch, un-augmented, no mixup) between scorings, on a
    copy of `student`. `progress`: the run's global clock (repulsive-kd's beta)."""
    student = copy.deepcopy(student).to(device)
    train_objective, score_objective = create_objective(distill, mixup=False), scoring_objective(distill)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)

    def scored() -> np.ndarray:
        return token_grad_norms(student, teacher, raw, batch_size, device, precision, score_objective, progress, seed)

    history = [scored()]
    for _ in range(steps if len(raw) > 1 else 0):  # BatchNorm cannot train on a single image
        student.train()
        pick = torch.randperm(len(raw), generator=generator)[:batch_size]
        images = as_images(raw[pick]).to(device)
        with autocast_for(device, precision):
            loss = train_objective(StepInputs(student, teacher, [images] * train_objective.views, generator,
                                              progress)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(scored())
    stack = np.stack(history)
    return stack.mean(0), stack.var(0)
