"""The site training step: global student in, locally distilled student out.

This is all a hospital's data is used for during a round; what it returns
(weights + a handful of scalars) is everything that leaves the site.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from fedus.config import DistillConfig, TrainConfig
from fedus.distill.clock import RoundClock
from fedus.distill.fast_path import FastPath, compile_in_place, eager, fast_path, with_eager_fallback
from fedus.distill.losses.registry import LossOutput
from fedus.distill.resident import ResidentBatches, use_resident
from fedus.distill.target_cache import TargetCache
from fedus.distill.losses import (  # noqa: F401 (mixup: re-export)
    StepInputs, create_objective, mixup, per_image_token_mse, token_mse,
)
from fedus.models import Student, Teacher
from fedus.privacy.dp_sgd import DPPlan, PrivateTraining, private_train_config


@dataclass
class StepResult:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA ('auto' or 'bf16'); fp32 on CPU, where bf16 is slower."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def adamw(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per step over all parameters instead of a chain of foreach ops) when
    `train.fused-optimizer` is on and torch has the kernel for every parameter's device and dtype;
    torch's default implementation otherwise - the same update up to float rounding."""
    params = list(params)
    fused = cfg.fused_optimizer and bool(params) and all(fused_available(p.device, p.dtype) for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))


@functools.lru_cache(maxsize=None)
def fused_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether fused AdamW runs for `dtype` parameters on `device`. torch 2.14 accepts `fused=True` at
    construction for any device and refuses only at the first step, so one step on a throwaway
    parameter is the test (once per device and dtype)."""
    try:
        p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError, NotImplementedError, TypeError):
        return False


def site_loader(train_set: Dataset, batch_size: int, fast: FastPath, generator: torch.Generator) -> DataLoader:
    """The site step's batches: shuffled, full batches only (when there are enough), on the fast path's workers."""
    return DataLoader(
        train_set, batch_size=batch_size, shuffle=True, generator=generator,
        drop_last=len(train_set) >= batch_size, num_workers=fast.num_workers, pin_memory=fast.pin_memory,
        persistent_workers=fast.num_workers > 0,
    )


@torch.no_grad()
def distill_loss_on(student: Student, teacher: Teacher, images: torch.Tensor, precision: str,
                    targets: TargetCache | None = None) -> float:
    """Loss on a fixed batch in eval mode: comparable before/after, unlike noisy training losses.
    With `targets`, the batch is the site's first images, un-augmented (their cache slots)."""
    was_training = student.training
    student.eval()
    with autocast_for(images.device, precision), eager():
        wanted = (targets.lookup(teacher, targets.reference_slots(len(images)), images) if targets is not None
                  else teacher(images))
        loss = token_mse(student(images), wanted).item()
    student.train(was_training)
    return loss


def site_step(
    student: Student,
    teacher: Teacher,
    train_set: Dataset,
    reference_images: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    distill: DistillConfig | None = None,
    clock: RoundClock | None = None,
    privacy: DPPlan | None = None,
    targets: TargetCache | None = None,
) -> StepResult:
    """Distil for `cfg.local_steps` AdamW steps (fused where supported) on the site's (augmented) training images.

    `distill` picks the loss(es) (default token-MSE); `clock` is the server's round
    clock, so run-long schedules (repulsive-KD's beta) agree across sites.
    `privacy` turns the loop into DP-SGD (Poisson batches, clipped + noised steps).
    `targets`: cached teacher tokens (token-MSE only, no mixup); `train_set` must then be
    its `CachedViews`, whose items carry their cache `slot`."""
    if privacy is not None:
        cfg = private_train_config(cfg, distill)  # no mixup, fp32, per-sample loss
    objective = create_objective(distill, mixup=cfg.mixup)
    clock = clock or RoundClock()
    fast = fast_path(cfg, device, student)
    torch.manual_seed(seed)  # torchvision's augmentations draw from the global RNG
    generator = torch.Generator().manual_seed(seed)
    if targets is not None and privacy is None and use_resident(cfg, device, train_set):  # a filled cache
        loader = ResidentBatches(train_set, device, cfg.batch_size, generator)
    else:
        loader = site_loader(train_set, cfg.batch_size, fast, generator)
    student.to(device, memory_format=fast.memory_format).train()
    teacher.to(device, memory_format=fast.memory_format)
    compiled = [student] + ([teacher] if targets is None else [])  # cached targets: the teacher runs only on misses
    compiling = fast.compile and privacy is None  # DP-SGD's per-sample hooks stay eager
    if compiling:
        for module in compiled:
            compile_in_place(module)
    reference_images = reference_images.to(device)
    optimizer = adamw(student.parameters(), cfg)
    dp = PrivateTraining(student, optimizer, train_set, privacy, seed, device, fast.num_workers) if privacy else None
    if dp is not None:
        loader, optimizer = dp.loader, dp.optimizer

    def on_device(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # stored views travel as bytes, 4x less than float
            x = x.float().div_(255)
        return x.contiguous(memory_format=fast.memory_format)

    def train_on(batch: dict, images: torch.Tensor, step: int) -> LossOutput:
        optimizer.zero_grad(set_to_none=True)
        views = [images] + [on_device(batch[k]) for k in ("view2",) if k in batch and objective.views > 1]
        inputs = StepInputs(student, teacher, views, generator, clock.progress(step, cfg.local_steps))
        with autocast_for(device, cfg.precision):
            wanted = targets.complete(teacher, batch, images) if targets is not None else None  # cached tokens
            if dp is not None:  # token-MSE without mixup (private_train_config): clipped image by image
                per_image = per_image_token_mse(student(images), teacher(images) if wanted is None else wanted)
                out = LossOutput(per_image.detach().mean())
            elif wanted is not None:
                out = LossOutput(token_mse(student(images), wanted))
            else:
                out = objective(inputs)  # mixup (train.mixup) happens inside token-mse
        if dp is not None:
            dp.backward(per_image)
        else:
            out.loss.backward()
        optimizer.step()
        return out

    if targets is not None:
        targets.reset_counts()  # hit rate per round
    loss_before = distill_loss_on(student, teacher, reference_images, cfg.precision, targets)
    losses: list = []
    seen, start = 0, time.perf_counter()
    batches = iter(loader)
    parts_sum: dict[str, float] = {}
    for step in range(cfg.local_steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        images = on_device(batch["image"])
        if dp is not None and images.shape[0] == 0:
            dp.noise_only_step()  # Poisson sampling drew nobody: still a (noise-only) step
            continue
        out = with_eager_fallback(lambda: train_on(batch, images, step), compiled,
                                  compiling and step == 0)
        for key, value in out.parts.items():
            parts_sum[key] = parts_sum.get(key, 0.0) + value
        losses.append(out.loss.detach())  # no sync per step: the host can run ahead of the GPU
        seen += images.shape[0]
    losses = torch.stack(losses).float().tolist() if losses else []  # waits for the last step
    seconds = time.perf_counter() - start
    if dp is not None:
        dp.close()
    loss_after = distill_loss_on(student, teacher, reference_images, cfg.precision, targets)

    k = max(1, min(3, len(losses) // 3))
    metrics = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "train_loss_first": sum(losses[:k]) / k,
        "train_loss_last": sum(losses[-k:]) / k,
        "num-examples": len(train_set),
        "examples_seen": seen,
        "steps": len(losses),
        "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
        "progress_end": clock.progress(cfg.local_steps, cfg.local_steps),
    } | {f"train_{k}": v / max(len(losses), 1) for k, v in parts_sum.items()} | (dp.metrics() if dp else {}) | (
        targets.metrics() if targets is not None else {})
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    return StepResult(state=state, metrics=metrics)
