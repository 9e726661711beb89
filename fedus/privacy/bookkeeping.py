"""Ghost clipping in one backward pass: norms from the hooks, the clipped gradient by book-keeping.

Opacus' fast gradient clipping needs a second backward pass of the loss
re-weighted by each image's clipping factor. Every layer's input and output
gradient are already at hand in the first pass, and a weight gradient is just
their product summed over the batch, so the clipped gradient can be formed from
them directly (Bu et al. 2023, "book-keeping"): for Conv2d and Linear the
output gradient is scaled per image and one weight-gradient product runs (for a
conv, its kernel or, on tiny wide maps, a matrix product: `conv2d_weight_grad`), except
where a conv's norm was taken from its per-sample gradients (many positions, few
channels: the stem and early blocks), which are then summed with the factors like
those of the small layers (norms, prefix tokens, depthwise convs; Opacus' per-sample
gradients). The one backward pass asks autograd for no weight gradient, so none is
formed twice: it asks for the gradient towards `anchor`, a zero added to the output
of every layer fed only by tensors that need no gradient (the images). That reaches
every layer's hook, and stops short of the first layer's input gradient (towards the
images: a full convolution that nothing uses).
"""

from __future__ import annotations

from functools import partial

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.utils.module_utils import trainable_parameters
from torch import nn

from fedus.config import ConfigError
from fedus.privacy.ghost_norms import conv2d_norm_sample, conv2d_weight_grad, linear_norm_sample


def _kept_whole(module: nn.Module) -> bool:
    """Layers whose clipped gradient is formed from (input, output gradient) rather than per-sample grads."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1
                                         and isinstance(module.padding, tuple) and module.padding_mode == "zeros")


def _per_image(clip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return clip.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class BookkeepingModule(GradSampleModuleFastGradientClipping):
    """Opacus' ghost-clipping hooks that also keep what the clipped gradient is made of."""

    def __init__(self, module: nn.Module, max_grad_norm: float):
        # on the student's device: a CPU anchor would be copied to the GPU in every forward, a sync per step
        self.anchor = torch.zeros((), device=next(module.parameters()).device, requires_grad=True)
        super().__init__(module, loss_reduction="mean", strict=True, max_grad_norm=max_grad_norm,
                         use_ghost_clipping=True)
        self.kept: list[tuple] = []
        self.batch_size = 0
        self.layer_params = {layer: [p for _, p in trainable_parameters(layer)]
                             for layer in self.iterate_submodules(self._module)}

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Opacus' hooks, but one forward hook per layer that puts a gradient hook on the layer's output,
        instead of a full module backward hook: that one also wraps every input and output in an extra
        autograd node and computes the gradients towards the inputs for it (Python and copies per layer)."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = self.autograd_grad_sample_hooks = []
        for layer in self.iterate_submodules(self._module):
            if force_functorch or type(layer) not in self.GRAD_SAMPLERS:
                prepare_layer(layer, batch_first=batch_first)
            self.autograd_grad_sample_hooks.append(layer.register_forward_hook(self._forward_hook))
        self.enable_hooks()

    def _forward_hook(self, layer: nn.Module, inputs: tuple, output):
        """Keep the layer's input (Opacus), and have its output's gradient sent to `capture_backprops_hook`.
        A layer whose inputs need no gradient (the first) gets `anchor` (zero) added to its output."""
        if not (self.hooks_enabled and layer.training and torch.is_grad_enabled()):
            return None
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"privacy.clipping = \"ghost\" cannot follow {type(layer).__name__} (its output is not "
                              "one tensor); use privacy.clipping = \"per-sample\"")
        if any(p._forward_counter for p in self.layer_params[layer]):  # a second use in this forward
            raise ConfigError(f"privacy.clipping = \"ghost\" needs each layer used once per forward, but a "
                              f"{type(layer).__name__} is used twice (weight tying); use privacy.clipping = \"per-sample\"")
        self.capture_activations_hook(layer, inputs, output)
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            output = output + self.anchor.to(dtype=output.dtype)
        output.register_hook(partial(self._output_gradient, layer))
        return output

    def _output_gradient(self, layer: nn.Module, grad: torch.Tensor) -> None:
        self.capture_backprops_hook(layer, None, (grad,), self.loss_reduction, self.batch_first)

    def backward(self, per_sample_loss: torch.Tensor) -> None:
        """The one backward pass of the batch's mean loss, then each parameter's .grad = its clipped
        per-image gradients, summed."""
        self.batch_size = len(per_sample_loss)
        for params in self.layer_params.values():
            for p in params:
                p._norm_sample = None
        torch.autograd.grad(per_sample_loss.mean(), self.anchor)
        self._unreached_layers()
        self.clipped_gradients()

    def _unreached_layers(self) -> None:
        """A layer whose output never reached the loss (an unused branch, or a layer not called) has a zero
        gradient for every image: zero norms and a zero .grad (the optimizer still noises it), and its kept
        input is dropped, so that the next forward does not count a second use (weight tying)."""
        for layer, params in self.layer_params.items():
            if all(p._norm_sample is not None for p in params):
                continue
            if getattr(layer, "activations", None):
                layer.activations.clear()
            for p in params:
                p._forward_counter = 0
                p._norm_sample = self.anchor.new_zeros(self.batch_size)
                _add_grad(p, torch.zeros_like(p))

    def capture_backprops_hook(self, module: nn.Module, _forward_input, forward_output, loss_reduction: str,
                               batch_first: bool) -> None:
        """Per-image norms, and what the clipped gradient is made of. The output gradient of the mean loss
        is each image's own over the batch size: the norms are scaled back here, and the clipping factors
        once in `clipped_gradients`, rather than every layer's output gradient (Opacus)."""
        if not self.hooks_enabled:
            return
        activations, backprops = module.activations.pop(), forward_output[0].detach()
        params = self.layer_params[module]
        if _kept_whole(module):
            x = activations[0].to(backprops.dtype)
            formed: dict[nn.Parameter, torch.Tensor] = {}
            sampler = conv2d_norm_sample if type(module) is nn.Conv2d else linear_norm_sample
            norms = sampler(module, [x], backprops, formed)
            if formed:  # the per-sample gradients exist already (the stem, early convs): sum them clipped
                self.kept.extend(("sample", p, g) for p, g in formed.items())
            else:
                self.kept.append((module, x, backprops))
        else:
            sampler = self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
            grads = sampler(module, activations, backprops)
            norms = {p: g.reshape(len(g), -1).norm(2, dim=-1) for p, g in grads.items()}
            self.kept.extend(("sample", p, g) for p, g in grads.items())
        for p in params:
            p._norm_sample = norms[p] * self.batch_size
            p._forward_counter -= 1

    def clipped_gradients(self) -> None:
        """Set each parameter's .grad to the sum over images of its clipped per-image gradient."""
        clip = self.get_clipping_coef() * self.batch_size  # the kept output gradients are the mean loss's
        for entry in self.kept:
            if entry[0] == "sample":
                _, p, g = entry
                _add_grad(p, torch.einsum("n,n...->...", clip.to(g.dtype), g))
                continue
            module, x, b = entry
            b = b * _per_image(clip, b)
            if type(module) is nn.Conv2d:
                if module.weight.requires_grad:
                    _add_grad(module.weight, conv2d_weight_grad(module, x, b))
                if module.bias is not None and module.bias.requires_grad:
                    _add_grad(module.bias, b.sum((0, 2, 3)))
            else:  # Linear on [B, D] or [B, ..., D]
                if module.weight.requires_grad:
                    _add_grad(module.weight, b.reshape(-1, b.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
                if module.bias is not None and module.bias.requires_grad:
                    _add_grad(module.bias, b.reshape(-1, b.shape[-1]).sum(0))
        self.kept.clear()


def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
