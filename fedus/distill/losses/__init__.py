"""Distillation losses: a registry (`create_loss`, `create_objective`) and one module per loss."""

from fedus.distill.losses.registry import (
    DistillLoss, LossOutput, Objective, StepInputs, attach_distill_modules, create_loss, create_objective,
    list_losses, parse_loss_spec, register_loss, required_views,
)
from fedus.distill.losses.token_mse import TokenMSE, mixup, per_image_token_mse, token_cosine, token_mse
from fedus.distill.losses.masked_consistency import MaskedConsistency  # noqa: E402  (registers)
from fedus.distill.losses.repulsive_kd import RepulsiveKD  # noqa: E402  (registers)

__all__ = [
    "DistillLoss", "LossOutput", "MaskedConsistency", "Objective", "RepulsiveKD", "StepInputs", "TokenMSE",
    "attach_distill_modules", "create_loss", "create_objective", "list_losses", "mixup", "parse_loss_spec", "per_image_token_mse",
    "register_loss", "required_views", "token_cosine", "token_mse",
]
