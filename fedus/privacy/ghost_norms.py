"""Per-sample gradient norms of Conv2d and Linear layers without (all) per-sample gradients.

Opacus' fast gradient clipping needs only each sample's gradient *norm*; it ships
norm samplers for Linear and Embedding and, for every other layer, builds the
per-sample gradients just to take their norms. For a convolution that is a
[B, C_out, C_in*k*k] tensor per layer, most of what made DP-SGD 4-5x slower than
plain training for the ResNet students. These norms (Opacus' norm-sampler
signature, used by fedus.privacy.bookkeeping) pick per layer the cheaper of two
exact forms (Li et al. 2022, "mixed ghost clipping"; Bu et al. 2023):

* ghost: ||sum_t b_t a_t^T||^2 = <A^T A, B^T B> over the T x T output positions,
  cost ~ T^2 (D + P) per sample - cheap in deep layers (few positions, wide channels);
* direct: form the per-sample gradient B A^T and square it, cost ~ T D P - cheap in
  the stem (many positions, few channels),

with A the input [D, T] (a conv's unfolded: D = C_in*k*k; a Linear's tokens) and B
the output gradient [P, T]. Where the direct form built the per-sample gradients,
they are handed over (`formed`) for book-keeping to sum with the clipping factors.
Grouped (depthwise) convolutions are left to Opacus' per-sample gradient: theirs are small.
"""

from __future__ import annotations

import torch
from opacus.utils.tensor_utils import unfold2d
from torch import nn


def ghost_is_cheaper(positions: int, fan_in: int, fan_out: int) -> bool:
    """T^2 (D + P) multiply-adds for the Gram form against T D P for the per-sample gradient."""
    return positions * (fan_in + fan_out) < fan_in * fan_out


# Direct form: from this many input channels, the per-image gradients come from one convolution with the
# batch as its groups; below it (an RGB stem) from unfold + bmm, which is faster there (CPU, 1 thread: 64->64
# channels 3x3 at 16x16, batch 32: 4.9 vs 7.3-8.1 ms; 32->32 at 32x32: 5.3 vs 23 ms; 3->64 7x7 stem: 12.1 vs 11.1 ms).
GROUPED_MIN_CHANNELS = 16


def per_sample_conv_grads(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """[B, *weight.shape]: each image's weight gradient, as the weight gradient of one convolution whose
    groups are the images (no unfolded copy of the input, which is k*k times its size)."""
    n = x.shape[0]
    stacked = x.reshape(1, n * x.shape[1], *x.shape[2:])
    grads = torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:]), stacked,
        stacked.new_empty((n * layer.out_channels, *layer.weight.shape[1:])), None, layer.stride, layer.padding,
        layer.dilation, False, (0, 0), n, (False, True, False))[1]
    return grads.view(n, *layer.weight.shape)


def conv2d_weight_grad(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """The weight gradient summed over the batch. Where the output map is tiny and the layer wide (a
    ResNet's last stage, the distillation head's 1x1 convs), one matrix product over the unfolded input
    beats the convolution kernel's own weight gradient (CPU, 1 thread, batch 32: 512->512 3x3 at 2x2
    7.7 vs 27 ms, 512->4096 1x1 at 2x2 4.5 vs 15 ms; at 4x4 22.7 vs 33 ms for 512->512, but 7.3 vs
    5.6 ms for 256->256); elsewhere the kernel is faster (64->64 at 16x16: 4.3 vs 16 ms)."""
    positions = backprops.shape[2] * backprops.shape[3]
    if positions <= 4 or (positions <= 16 and layer.in_channels + layer.out_channels >= 1024):
        a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                     dilation=layer.dilation)  # [B, D, T]
        b = backprops.reshape(len(backprops), backprops.shape[1], -1)
        return torch.einsum("bpt,bdt->pd", b, a).view(layer.weight.shape)
    return torch.nn.grad.conv2d_weight(x, layer.weight.shape, backprops, layer.stride, layer.padding,
                                       layer.dilation, layer.groups)


def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor,
                       formed: dict[nn.Parameter, torch.Tensor] | None = None) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus norm-sampler signature: {parameter: [B] per-sample gradient L2 norms}. Ungrouped convs only.

    `formed`, if given, receives the per-sample gradients ({parameter: [B, *shape]}) where the direct
    form built them anyway, so book-keeping can sum them with the clipping factors instead of running
    a second weight-gradient convolution over the layer's many positions."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    b = backprops.reshape(n, backprops.shape[1], -1)  # [B, P, T]
    squared = grads = None
    if layer.weight.requires_grad:
        unfold = dict(kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
        fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        if ghost_is_cheaper(b.shape[2], fan_in, b.shape[1]):
            squared = _gram_squared(unfold2d(x, **unfold).transpose(1, 2), b.transpose(1, 2))
        else:
            if layer.in_channels >= GROUPED_MIN_CHANNELS:
                grads = per_sample_conv_grads(layer, x, backprops)
            else:  # D ordered as the weight's (C_in, kh, kw)
                grads = torch.bmm(b, unfold2d(x, **unfold).transpose(1, 2)).view(n, *layer.weight.shape)
            squared = grads.pow(2).sum((1, 2, 3, 4))
    bias_grads = b.sum(2) if layer.bias is not None and layer.bias.requires_grad else None
    return _norms(layer, squared, grads, bias_grads, formed)


def _gram_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared per-sample gradient norms from the inputs [B, T, D] and output gradients [B, T, P]."""
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum((1, 2)).clamp(min=0)


def _norms(layer: nn.Module, squared: torch.Tensor | None, grads: torch.Tensor | None,
           bias_grads: torch.Tensor | None, formed: dict | None) -> dict[nn.Parameter, torch.Tensor]:
    """{parameter: [B] norms}; the per-sample gradients go to `formed` where the direct form built them."""
    norms = {}
    if squared is not None:
        norms[layer.weight] = squared.sqrt()
        if grads is not None and formed is not None:
            formed[layer.weight] = grads
    if bias_grads is not None:
        norms[layer.bias] = bias_grads.norm(2, dim=1)
        if formed:
            formed[layer.bias] = bias_grads
    return norms


def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor,
                       formed: dict[nn.Parameter, torch.Tensor] | None = None) -> dict[nn.Parameter, torch.Tensor]:
    """As `conv2d_norm_sample`, for a Linear on [B, D] or [B, ..., D] (tokens). Opacus' own forms the
    output gradients' Gram twice (weight and bias) and takes no direct form (at 224 px a ViT's 197 tokens
    make the Gram the dearer one)."""
    n = backprops.shape[0]
    b = backprops.reshape(n, -1, backprops.shape[-1])  # [B, T, P]
    squared = grads = None
    if layer.weight.requires_grad:
        a = activations[0].to(backprops.dtype).reshape(n, -1, activations[0].shape[-1])  # [B, T, D]
        if ghost_is_cheaper(b.shape[1], a.shape[2], b.shape[2]):
            squared = _gram_squared(a, b)
        else:
            grads = torch.bmm(b.transpose(1, 2), a)  # [B, P, D]
            squared = grads.pow(2).sum((1, 2))
    bias_grads = b.sum(1) if layer.bias is not None and layer.bias.requires_grad else None
    return _norms(layer, squared, grads, bias_grads, formed)
