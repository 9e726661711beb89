"""masked-consistency: TinyUSFM's consistency-driven dynamic distillation, fedus's own design.

TinyUSFM's code is not public; this follows the paper's description:
- two views of each image: spatial (random patches masked out, 16 px at 224 px,
  scaled to the image size) and frequency (band-stop: an annulus of the centred
  spectrum zeroed), so the student learns from both domains' corruptions;
- the frozen teacher encodes both; per token (or per sample), the cosine between
  its two representations is its *consistency*: tokens whose meaning survives
  both corruptions are reliable targets, so a softmax over consistency turns it
  into weights (mean 1) and those tokens are distilled harder;
- stage-wise feature distillation on both views: the teacher's token grid via
  the student's own token head (the deployable one, reused), earlier teacher
  stages via linear (1x1) projectors from evenly spaced student stages;
- a light decoder reconstructs the masked pixels from the student's masked-view
  map (MIM term, weight lambda_rec).
Projectors and decoder live on the student (`student.distill.masked_consistency`)
and are federated with it: every site trains the same alignment, and FedAvg of
site-specific projectors would otherwise have nothing shared to average towards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedus.distill.losses.registry import DistillLoss, LossOutput, StepInputs, register_loss
from fedus.distill.losses.stages import depth_of, evenly_spaced, student_tokens_and_stages, teacher_tokens_and_stages
from fedus.models import Student, Teacher


def patch_mask(batch: int, size: int, patch_px: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[B,1,S,S], 1 where masked: round(ratio * patches) random patches of `patch_px` per image (>= 1, < all)."""
    g = math.ceil(size / patch_px)
    n = g * g
    k = min(max(round(ratio * n), 1), n - 1) if n > 1 else 1
    order = torch.rand(batch, n, generator=generator).argsort(1)
    mask = torch.zeros(batch, n).scatter_(1, order[:, :k], 1.0).view(batch, 1, g, g)
    return mask.repeat_interleave(patch_px, 2).repeat_interleave(patch_px, 3)[..., :size, :size]


def scaled_patch(patch_size: int, image_size: int, reference: int = 224) -> int:
    return max(1, round(patch_size * image_size / reference))


def band_keep(h: int, w: int, low: float, high: float, device=None) -> torch.Tensor:
    """[H,W] 0/1 keep-mask in FFT order: 0 on low <= r < high, r = |f| / 0.5 (1 = Nyquist on an axis).

    |f| is symmetric under f -> -f, so the mask is Hermitian-symmetric and the filtered image stays real."""
    fy = torch.fft.fftfreq(h, device=device).abs().view(h, 1)
    fx = torch.fft.fftfreq(w, device=device).abs().view(1, w)
    r = torch.sqrt(fy**2 + fx**2) / 0.5
    return (~((r >= low) & (r < high))).float()


def band_stop(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Zero the annulus low <= r < high of each channel's spectrum (fp32: no bf16 FFT)."""
    with torch.autocast(images.device.type, enabled=False):
        x = images.float()
        keep = band_keep(x.shape[-2], x.shape[-1], low, high, x.device)
        return torch.fft.ifft2(torch.fft.fft2(x) * keep).real


def consistency_weights(a: torch.Tensor, b: torch.Tensor, temperature: float, per: str = "token") -> torch.Tensor:
    """Weights [B,N] (mean 1) increasing with the teacher's cosine between its two views' tokens [B,N,D]."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # [B,N]
    bsz, n = cos.shape
    if per == "sample":
        w = bsz * torch.softmax(cos.mean(1) / temperature, dim=0)
        return w.view(bsz, 1).expand(bsz, n).detach()
    return (n * torch.softmax(cos / temperature, dim=1)).detach()


def weighted_token_mse(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """token-MSE with per-token weights [B,N]; equals `token_mse` when all weights are 1."""
    return (weights * (student.float() - teacher.float()).pow(2).sum(-1)).mean()


def masked_pixel_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over masked pixels only (MAE-style: visible pixels are trivial to copy)."""
    return ((pred.float() - target.float()).pow(2) * mask).sum() / mask.sum().clamp(min=1.0)


def _resize_weights(w: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    if tuple(grid) == tuple(to):
        return w
    m = F.interpolate(w.view(w.shape[0], 1, *grid), size=to, mode="bilinear", align_corners=False).flatten(1)
    return m / m.mean(1, keepdim=True).clamp(min=1e-6)


class MaskedConsistencyModules(nn.Module):
    """Per-stage linear projectors (student stage -> teacher stage width) and the MIM decoder."""

    def __init__(self, student_dims: list[int], teacher_dims: list[int], final_dim: int, stride: int, hidden: int,
                 student_stages: list[int], teacher_stages: list[int]):
        super().__init__()
        self.student_stages, self.teacher_stages, self.stride = student_stages, teacher_stages, stride
        self.projectors = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(student_dims, teacher_dims))
        self.decoder = nn.Sequential(nn.Conv2d(final_dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, stride * stride, 1),
                                     nn.PixelShuffle(stride))


@register_loss("masked-consistency")
class MaskedConsistency(DistillLoss):
    views = 1

    @property
    def per_sample(self) -> bool:
        return self.cfg.masked_consistency.consistency == "token"  # per-sample weights: a softmax over the batch

    def aux_modules(self, student: Student, teacher: Teacher, image_size: int) -> nn.Module:
        c = self.cfg.masked_consistency
        t_stages = evenly_spaced(depth_of(teacher.backbone), c.stages)[:-1]  # the last stage is the token grid
        s_stages = evenly_spaced(depth_of(student.backbone), len(t_stages) + 1)[:-1]
        t_stages = t_stages[len(t_stages) - len(s_stages):]  # a shallow student distils the deepest stages
        size = image_size
        probe = torch.zeros(1, 3, size, size)
        t_device = next(teacher.parameters()).device  # the shared teacher may already sit on the GPU
        s_device = next(student.parameters()).device
        was = student.training
        with torch.no_grad():
            _, t_maps = teacher_tokens_and_stages(teacher, probe.to(t_device), t_stages)
            student.eval()
            _, s_maps, final = student_tokens_and_stages(student, probe.to(s_device), s_stages)
            student.train(was)
        stride = max(1, size // final.shape[-1])
        return MaskedConsistencyModules([m.shape[1] for m in s_maps], [m.shape[1] for m in t_maps], final.shape[1],
                                        stride, c.decoder_hidden, s_stages, t_stages)

    def __call__(self, inputs: StepInputs) -> LossOutput:
        c = self.cfg.masked_consistency
        mods: MaskedConsistencyModules = inputs.aux(self.key)
        student, teacher, x = inputs.student, inputs.teacher, inputs.views[0]
        bsz, _, size, _ = x.shape
        mask = patch_mask(bsz, size, scaled_patch(c.patch_size, size), c.mask_ratio, inputs.generator).to(x)
        spatial, frequency = x * (1.0 - mask), band_stop(x, c.band_low, c.band_high).to(x.dtype)

        targets = [teacher_tokens_and_stages(teacher, v, mods.teacher_stages) for v in (spatial, frequency)]
        weights = consistency_weights(targets[0][0], targets[1][0], c.weight_temperature, c.consistency)
        grid = student.teacher_grid

        feat, terms, masked_final = 0.0, 0, None
        for view, (t_tokens, t_maps) in zip((spatial, frequency), targets):
            s_tokens, s_maps, final = student_tokens_and_stages(student, view, mods.student_stages)
            masked_final = final if masked_final is None else masked_final
            feat = feat + weighted_token_mse(s_tokens, t_tokens, weights)
            terms += 1
            for proj, s_map, t_map in zip(mods.projectors, s_maps, t_maps):
                p = proj(s_map)
                if p.shape[-2:] != t_map.shape[-2:]:
                    p = F.interpolate(p, size=t_map.shape[-2:], mode="bilinear", align_corners=False)
                w = _resize_weights(weights, grid, tuple(t_map.shape[-2:]))
                feat = feat + weighted_token_mse(p.flatten(2).transpose(1, 2), t_map.flatten(2).transpose(1, 2), w)
                terms += 1
        feat = feat / terms

        recon = mods.decoder(masked_final)
        if recon.shape[-2:] != (size, size):
            recon = F.interpolate(recon, size=(size, size), mode="bilinear", align_corners=False)
        rec = masked_pixel_mse(recon, x.mean(1, keepdim=True), mask)
        loss = feat + c.lambda_rec * rec
        return LossOutput(loss, {"mc_feature": feat.item(), "mc_reconstruction": rec.item(),
                                 "mc_teacher_consistency": F.cosine_similarity(
                                     targets[0][0].float(), targets[1][0].float(), dim=-1).mean().item()})
