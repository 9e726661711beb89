"""Ultrasound-aware augmentation for distillation.

B-mode images have a physical up (the transducer) and carry meaning in grey
level (echogenicity): so moderate zoom, left-right flips and mild blur only,
never a vertical flip, never colour/brightness jitter.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class UltrasoundAugment(torch.nn.Module):
    """Random resized crop (moderate zoom) + horizontal flip + mild Gaussian blur."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.6, 1.0), blur_p: float = 0.3):
        super().__init__()
        self.pipeline = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, ratio=(0.85, 1.18), antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.0))], p=blur_p),
            ]
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image)
