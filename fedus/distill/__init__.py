"""Distillation: losses and the site training step."""

from fedus.distill.losses import mixup, token_cosine, token_mse
from fedus.distill.site_step import StepResult, site_step

__all__ = ["StepResult", "mixup", "site_step", "token_cosine", "token_mse"]
