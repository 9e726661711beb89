"""repulsive-kd: MobileFetalCLIP's selective repulsive KD, in an image-only form.

For B images in two augmented views, the teacher's cosine-similarity matrix
between view-1 and view-2 pooled embeddings, scaled CLIP-style and softened by
tau (teacher only), gives P; the student's matrix with a learnable, clamped
logit scale gives log Q. The soft cross-entropy splits into
L_diag = -(1/B) sum_i P_ii log Q_ii (match each image to itself) and
L_off = -(1/B) sum_{i!=j} P_ij log Q_ij (copy the teacher's view of which
images look alike). beta(t) weights L_off from +2.0 (imitate the teacher's
confusions) down to -0.8 (repel them: the student may separate what the
teacher conflates), crossing 0 at 71.4 % of the run - on the global clock.
With beta < 0 minimising -|beta| L_off would drive off-diagonal Q to 0 and the
loss to -inf; flooring Q at `q-floor` in L_off bounds it (and stops the push
there). A token-MSE base term on view 1 keeps the dense targets (skipped when
`distill.loss` lists token-mse itself, which then is the base).
The logit scale is a parameter on the student (`student.distill.repulsive_kd`)
and federated with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedus.config import RepulsiveKdConfig
from fedus.distill.clock import linear_schedule
from fedus.distill.losses.registry import DistillLoss, LossOutput, StepInputs, parse_loss_spec, register_loss
from fedus.distill.losses.token_mse import token_mse
from fedus.models import Student, Teacher


class LogitScale(nn.Module):
    """log of the student's similarity scale; exp is clamped to `max_scale` as in CLIP."""

    def __init__(self, init: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self, max_scale: float) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(max_scale)).exp()


def beta_at(progress: float, cfg: RepulsiveKdConfig) -> float:
    return linear_schedule(cfg.beta_start, cfg.beta_end, progress)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine matrix [B,B] between pooled embeddings [B,D]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def teacher_targets(t1: torch.Tensor, t2: torch.Tensor, cfg: RepulsiveKdConfig) -> torch.Tensor:
    """P: row-softmax of the teacher's scaled cosines, softened by tau."""
    return torch.softmax(cfg.teacher_logit_scale * similarity(t1, t2) / cfg.tau, dim=1)


def split_soft_ce(p: torch.Tensor, log_q: torch.Tensor, q_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_diag, L_off) of -(1/B) sum_ij P_ij log Q_ij; `q_floor` > 0 floors Q inside L_off only."""
    b = p.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=p.device)
    diag = -(p.diagonal() * log_q.diagonal()).sum() / b
    off_log_q = log_q.clamp(min=math.log(q_floor)) if q_floor > 0 else log_q
    off = -(p * off_log_q).masked_fill(eye, 0.0).sum() / b
    return diag, off


def repulsive_terms(s1, s2, t1, t2, scale: torch.Tensor, cfg: RepulsiveKdConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_diag, L_off) averaged over both directions (view 1 -> 2 and 2 -> 1), pooled embeddings [B,D]."""
    s_sim, p12, p21 = similarity(s1, s2), teacher_targets(t1, t2, cfg), teacher_targets(t2, t1, cfg)
    d12, o12 = split_soft_ce(p12, F.log_softmax(scale * s_sim, dim=1), cfg.q_floor)
    d21, o21 = split_soft_ce(p21, F.log_softmax(scale * s_sim.T, dim=1), cfg.q_floor)
    return (d12 + d21) / 2, (o12 + o21) / 2


@register_loss("repulsive-kd")
class RepulsiveKD(DistillLoss):
    views = 2
    per_sample = False  # an image's row of P and Q depends on every image in its batch

    def __init__(self, cfg, mixup: bool = True):
        super().__init__(cfg, mixup)
        listed = {name for name, _ in parse_loss_spec(cfg.loss)}
        # token-mse listed beside it already is the base term: do not count it twice
        self.base_weight = 0.0 if "token-mse" in listed else cfg.repulsive_kd.base_weight

    def aux_modules(self, student: Student, teacher: Teacher, image_size: int) -> nn.Module:
        c = self.cfg.repulsive_kd
        return LogitScale(min(c.teacher_logit_scale / c.tau, c.max_logit_scale))  # start at the teacher's sharpness

    def __call__(self, inputs: StepInputs) -> LossOutput:
        c = self.cfg.repulsive_kd
        v1 = inputs.views[0]
        v2 = inputs.views[1] if len(inputs.views) > 1 else v1  # no second draw (augment off): same image
        s1, s2 = inputs.student(v1), inputs.student(v2)
        t1, t2 = inputs.teacher(v1), inputs.teacher(v2)
        scale = inputs.aux(self.key)(c.max_logit_scale)
        diag, off = repulsive_terms(s1.mean(1), s2.mean(1), t1.mean(1), t2.mean(1), scale, c)
        beta = beta_at(inputs.progress, c)
        base = token_mse(s1, t1) if self.base_weight > 0 else torch.zeros((), device=v1.device)
        loss = self.base_weight * base + diag + beta * off
        return LossOutput(loss, {"rkd_diag": diag.item(), "rkd_off": off.item(), "rkd_beta": beta,
                                 "rkd_logit_scale": scale.item(), "rkd_base": base.item()})
