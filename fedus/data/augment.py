"""Augmentation policies for distillation: `ultrasound` (default) and `natural`.

B-mode images have a physical up (the transducer) and carry meaning in grey
level (echogenicity). The `ultrasound` policy therefore uses moderate zoom,
left-right flips and mild blur only - never a vertical flip, never colour - plus
transforms that mimic what really varies between scans: depth attenuation
(time-gain compensation), acoustic shadows behind strong reflectors, haze
(near-field clutter / poor windows) and speckle reduction (vendor filters).
Each of those is one field applied to every channel alike, so a grey image
stays grey. `natural` is the ImageNet-style baseline the ablation compares
against (crop, both flips, colour jitter).

Teacher and student see the same augmented image; a loss that needs two views
gets a second, independent draw of the same policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from fedus.config import ConfigError

AUGMENT_POLICIES = ("ultrasound", "natural")


def _uniform(lo: float, hi: float) -> float:
    """Draws from the global RNG, like torchvision's own transforms (seeded by the site step)."""
    return lo + (hi - lo) * torch.rand(()).item()


class DepthAttenuation(torch.nn.Module):
    """Echoes fade with depth (row 0 = transducer): multiply by exp(-alpha * depth), depth in [0, 1]."""

    def __init__(self, alpha: tuple[float, float] = (0.1, 0.8)):
        super().__init__()
        self.alpha = alpha

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = image.shape[-2]
        depth = torch.linspace(0.0, 1.0, h, dtype=image.dtype, device=image.device).view(h, 1)
        return image * torch.exp(-_uniform(*self.alpha) * depth)


class AcousticShadow(torch.nn.Module):
    """A dark band below a strong reflector: from a random depth to the bottom, soft-edged, never brighter."""

    def __init__(self, strength: tuple[float, float] = (0.2, 0.6), width: tuple[float, float] = (0.08, 0.25)):
        super().__init__()
        self.strength, self.width = strength, width

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        ys = torch.linspace(0.0, 1.0, h, dtype=image.dtype, device=image.device).view(h, 1)
        xs = torch.linspace(0.0, 1.0, w, dtype=image.dtype, device=image.device).view(1, w)
        centre, half, top = _uniform(0.1, 0.9), _uniform(*self.width) / 2, _uniform(0.2, 0.6)
        across = torch.clamp(1.0 - ((xs - centre).abs() - half) / max(half, 1e-3), 0.0, 1.0)  # 1 inside, soft edge
        down = torch.clamp((ys - top) / 0.1, 0.0, 1.0)  # onset over 10 % of the depth
        return image * (1.0 - _uniform(*self.strength) * across * down)


class Haze(torch.nn.Module):
    """A smooth low-contrast veil blended in (clutter, poor acoustic window): out = (1-h) x + h fog."""

    def __init__(self, amount: tuple[float, float] = (0.05, 0.25), cells: int = 4):
        super().__init__()
        self.amount, self.cells = amount, cells

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        coarse = torch.rand(1, 1, self.cells, self.cells).to(image)
        fog = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0]
        amount = _uniform(*self.amount)
        return (1.0 - amount) * image + amount * fog


class SpeckleReduction(torch.nn.Module):
    """Vendor-style speckle filtering: blend towards a 3x3 median, which smooths speckle but keeps edges."""

    def __init__(self, amount: tuple[float, float] = (0.3, 1.0)):
        super().__init__()
        self.amount = amount

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        c, h, w = image.shape
        patches = F.unfold(F.pad(image.unsqueeze(0), (1, 1, 1, 1), mode="replicate"), 3)  # [1, C*9, H*W]
        median = patches.view(c, 9, h * w).median(dim=1).values.view(c, h, w)
        amount = _uniform(*self.amount)
        return (1.0 - amount) * image + amount * median


class UltrasoundAugment(torch.nn.Module):
    """Moderate zoom + horizontal flip + mild blur, then (each with prob `us_p`) attenuation,
    shadow, haze and speckle reduction; output clamped to [0, 1]."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.6, 1.0), blur_p: float = 0.3, us_p: float = 0.25):
        super().__init__()
        self.pipeline = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, ratio=(0.85, 1.18), antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.0))], p=blur_p),
                v2.RandomApply([DepthAttenuation()], p=us_p),
                v2.RandomApply([AcousticShadow()], p=us_p),
                v2.RandomApply([Haze()], p=us_p),
                v2.RandomApply([SpeckleReduction()], p=us_p),
            ]
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image).clamp(0.0, 1.0)


class NaturalAugment(torch.nn.Module):
    """ImageNet-style (the ablation's 'default'): wide crop, both flips, colour jitter."""

    def __init__(self, size: int):
        super().__init__()
        self.pipeline = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomVerticalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            ]
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image).clamp(0.0, 1.0)


def create_augment(policy: str, size: int) -> torch.nn.Module:
    if policy == "ultrasound":
        return UltrasoundAugment(size)
    if policy == "natural":
        return NaturalAugment(size)
    raise ConfigError(f"unknown augment policy '{policy}' (known: {', '.join(AUGMENT_POLICIES)})")


__all__ = ["AUGMENT_POLICIES", "AcousticShadow", "DepthAttenuation", "Haze", "NaturalAugment", "SpeckleReduction",
           "UltrasoundAugment", "create_augment"]
