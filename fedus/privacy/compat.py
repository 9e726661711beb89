"""Make a student trainable with Opacus' per-sample gradients (DP-SGD).

Opacus computes per-sample gradients with hooks on the layers that own
parameters, and refuses or silently skips three things fedus students contain:

* BatchNorm mixes samples within a batch -> GroupNorm (`ModuleValidator.fix`);
  timm's BatchNormAct (MobileNet/EfficientNet) is split into GroupNorm + act.
* In-place ops on a hooked layer's output (timm ResNet's `x += shortcut`,
  `ReLU(inplace=True)`) break the backward hooks -> in-place off, and the
  residual branch ends in a parameter-free `Clone` so the add hits a copy.
* A ViT's bare `cls_token`/`reg_token`/`pos_embed` sit on the VisionTransformer
  itself, which makes Opacus treat the whole ViT as one opaque layer whose
  `forward` fedus never calls -> no per-sample grads at all. They move into a
  `PrefixTokens` module with its own grad sampler.

The result has different state-dict keys from the plain student, so the server
must build the global student the same way (`create_student(dp_compatible=True)`).
"""

from __future__ import annotations

import copy
from functools import cache

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.validators import ModuleValidator
from torch import nn

from fedus.config import ConfigError


class Clone(nn.Module):
    """Parameter-free: hands the residual add a copy, not the hooked layer's own output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class GroupNormAct(nn.Module):
    """GroupNorm + the activation/dropout of a timm BatchNormAct2d (a plain GroupNorm Opacus can hook)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        c = bn.num_features
        self.norm = nn.GroupNorm(_groups(c), c, eps=bn.eps, affine=bn.affine)
        self.drop, self.act = bn.drop, bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


class PrefixTokens(nn.Module):
    """A ViT's class/register tokens and absolute position embedding, as one hookable layer."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        for name in ("cls_token", "reg_token", "pos_embed"):
            value = getattr(vit, name, None)
            if name in vit._parameters:
                del vit._parameters[name]
            setattr(vit, name, None)  # timm code tests `is not None`; the parameters live here now
            setattr(self, name, value)
        self.no_embed_class = bool(getattr(vit, "no_embed_class", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # dynamic_img_size gives NHWC
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is None:
            return torch.cat(prefix + [x], dim=1)
        if self.no_embed_class:
            return torch.cat(prefix + [x + self.pos_embed], dim=1)
        return torch.cat(prefix + [x], dim=1) + self.pos_embed


def _timm_layer_norm() -> None:
    """timm's ViT LayerNorm is nn.LayerNorm's math under its own class (a fast-norm switch), which
    Opacus looks up by exact type: unregistered, its per-sample gradients went through functorch's
    vmap, 1.2 ms per layer per step on CPU (a tenth of a ViT-Ti DP step). Not LayerNorm2d (channels
    first: another layout)."""
    from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
    from timm.layers.norm import LayerNorm

    register_grad_sampler(LayerNorm)(compute_layer_norm_grad_sample)


_timm_layer_norm()


@register_grad_sampler(PrefixTokens)
def _prefix_tokens_grad_sample(layer: PrefixTokens, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Each sample's gradient is its own slice of the output gradient (the tokens are added/concatenated)."""
    out, start = {}, 0
    for t in (layer.cls_token, layer.reg_token):
        if t is not None:
            if t.requires_grad:
                out[t] = backprops[:, start:start + t.shape[1]].unsqueeze(1)
            start += t.shape[1]
    p = layer.pos_embed
    if p is not None and p.requires_grad:
        g = backprops[:, start:] if layer.no_embed_class else backprops
        out[p] = g.reshape(g.shape[0], *p.shape)
    return out


@cache
def _dp_vit_class(cls: type) -> type:
    def _pos_embed(self, x):
        return self.pos_drop(self.prefix_tokens(x))

    return type(f"DP{cls.__name__}", (cls,), {"_pos_embed": _pos_embed})


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def make_dp_compatible(model: nn.Module, arch: str = "") -> nn.Module:
    """Return a copy of `model` that Opacus can train; raises ConfigError if it still cannot."""
    from timm.layers import BatchNormAct2d
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import VisionTransformer

    model = copy.deepcopy(model)
    for module in list(model.modules()):  # before fix(), which would drop the fused activation
        for child_name, child in list(module.named_children()):
            if isinstance(child, BatchNormAct2d):
                setattr(module, child_name, GroupNormAct(child))
    model = ModuleValidator.fix(model)  # BatchNorm -> GroupNorm
    for module in list(model.modules()):
        if isinstance(module, (BasicBlock, Bottleneck)) and module.drop_path is None:
            module.drop_path = Clone()
        if isinstance(module, VisionTransformer) and not hasattr(module, "prefix_tokens"):
            tokens = PrefixTokens(module)
            module.__class__ = _dp_vit_class(type(module))
            module.prefix_tokens = tokens
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"student '{arch}' cannot be trained with DP-SGD: {str(errors[0]).splitlines()[0][:160]}")
    return model
