"""token-MSE: the DINOv3 -> ResNet-50 recipe.

The student's projected tokens regress the teacher's intermediate tokens
(n blocks, `teacher.blocks`) position by position, so spatial structure (what
segmentation needs) is distilled, not just a global embedding. Its settings
live where they always did: `teacher.blocks`, `student.head-hidden` (the MLP
token head) and `train.mixup`.
"""

from __future__ import annotations

import torch

from fedus.distill.losses.registry import DistillLoss, LossOutput, StepInputs, register_loss


def token_mse(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared L2 distance, averaged over the batch. Shapes [B, N, D]."""
    return per_image_token_mse(student_tokens, teacher_tokens).mean()


def per_image_token_mse(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Each image's own term of `token_mse`, [B] (what DP-SGD clips)."""
    return (student_tokens.float() - teacher_tokens.float()).pow(2).sum(-1).mean(-1)


def token_cosine(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Per-image mean cosine similarity over tokens, [B]."""
    return torch.nn.functional.cosine_similarity(student_tokens.float(), teacher_tokens.float(), dim=-1).mean(-1)


def mixup(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """In-batch mixup with lambda ~ U(0,1); the same mixed image goes to teacher and student."""
    lam = torch.rand((), generator=generator).item()
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    return lam * images + (1.0 - lam) * images[perm]


@register_loss("token-mse")
class TokenMSE(DistillLoss):
    """Token-wise MSE on (optionally mixed-up) view 1."""

    def __init__(self, cfg, mixup: bool = True):
        super().__init__(cfg)
        self.mixup = mixup

    @property
    def per_sample(self) -> bool:
        return not self.mixup  # mixup blends each image with another of its batch

    def __call__(self, inputs: StepInputs) -> LossOutput:
        images = inputs.views[0]
        if self.mixup and images.shape[0] > 1:
            images = mixup(images, inputs.generator)
        loss = token_mse(inputs.student(images), inputs.teacher(images))
        return LossOutput(loss)
