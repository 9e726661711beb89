"""Loss registry in timm's style: `@register_loss(name)` and `create_loss(name, cfg)`.

A loss is a small stateless object: it reads its own config block, does its
own forwards (it may need masked or second views), and returns a scalar. Any
trainable piece it needs (projectors, a decoder, a logit scale) lives on the
student under `student.distill[<name>]`, so it is in the student's state dict
and federated with it: FedAvg averages it like the token head, the server
checkpoints it, and every site starts each round from the same one.
`distill.loss = "token-mse:1.0,repulsive-kd:0.5"` combines losses with weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fedus.config import ConfigError, DistillConfig
from fedus.models import Student, Teacher

AUX_ATTR = "distill"  # student.distill: ModuleDict of per-loss trainable modules


@dataclass
class StepInputs:
    """What a loss sees at one optimiser step."""

    student: Student
    teacher: Teacher
    views: list[torch.Tensor]  # 1 or 2 augmented views of the same images, [B,3,H,W] in [0,1]
    generator: torch.Generator  # the site step's RNG (masks, mixup): reproducible per (seed, round, site)
    progress: float = 0.0  # global run progress in [0,1] (fedus.distill.clock), same at every site

    def aux(self, key: str) -> nn.Module:
        return getattr(self.student, AUX_ATTR)[key]


@dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)  # scalars for the site's metrics


class DistillLoss:
    """Base class: `views` it needs, optional trainable `aux_modules`, and `__call__`."""

    name: str = ""
    views: int = 1
    # The batch loss is a mean of per-image terms as far as the student's tokens go (no image's term
    # depends on another's), so B x its gradient w.r.t. one image's tokens is that image's own:
    # coreset scoring (fedus.coreset.quality) relies on it. Batch-contrastive losses set False.
    per_sample: bool = True

    def __init__(self, cfg: DistillConfig, mixup: bool = True):
        self.cfg = cfg

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    def aux_modules(self, student: Student, teacher: Teacher, image_size: int) -> nn.Module | None:
        return None

    def __call__(self, inputs: StepInputs) -> LossOutput:
        raise NotImplementedError


_LOSSES: dict[str, type[DistillLoss]] = {}


def register_loss(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    def wrap(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return wrap


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(name: str, cfg: DistillConfig | None = None, mixup: bool = True) -> DistillLoss:
    if name not in _LOSSES:
        raise ConfigError(f"unknown distillation loss '{name}' (known: {', '.join(list_losses())})")
    return _LOSSES[name](cfg or DistillConfig(), mixup=mixup)


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """'token-mse' -> [('token-mse', 1.0)]; 'token-mse:1,repulsive-kd:0.5' -> both, weighted."""
    terms: list[tuple[str, float]] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ConfigError(f"distill.loss: weight of '{name.strip()}' is not a number: '{weight}'") from None
        if w < 0:
            raise ConfigError(f"distill.loss: weight of '{name.strip()}' must be >= 0")
        terms.append((name.strip(), w))
    if not terms:
        raise ConfigError("distill.loss is empty (e.g. 'token-mse' or 'token-mse:1.0,repulsive-kd:0.5')")
    names = [n for n, _ in terms]
    if len(set(names)) != len(names):
        raise ConfigError(f"distill.loss lists a loss twice: '{spec}'")
    return terms


class Objective:
    """Weighted sum of registered losses; each term is reported as `loss_<name>` plus its own parts."""

    def __init__(self, terms: list[tuple[DistillLoss, float]]):
        self.terms = terms
        self.views = max(loss.views for loss, _ in terms)

    def __call__(self, inputs: StepInputs) -> LossOutput:
        total, parts = None, {}
        for loss, weight in self.terms:
            out = loss(inputs)
            total = out.loss * weight if total is None else total + out.loss * weight
            parts.update(out.parts)
            parts[f"loss_{loss.key}"] = out.loss.item()
        return LossOutput(total, parts)


def create_objective(cfg: DistillConfig | None = None, mixup: bool = True) -> Objective:
    cfg = cfg or DistillConfig()
    return Objective([(create_loss(name, cfg, mixup), w) for name, w in parse_loss_spec(cfg.loss)])


def attach_distill_modules(student: Student, teacher: Teacher, cfg: DistillConfig | None, image_size: int, seed: int) -> Student:
    """Add the losses' trainable modules as `student.distill` (seeded: server and sites agree)."""
    modules = nn.ModuleDict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for loss, _ in create_objective(cfg).terms:
            module = loss.aux_modules(student, teacher, image_size)
            if module is not None:
                modules[loss.key] = module
    if len(modules):
        student.add_module(AUX_ATTR, modules)
    return student


def required_views(cfg: DistillConfig | None) -> int:
    return create_objective(cfg).views
