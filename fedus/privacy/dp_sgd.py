"""DP-SGD for the site step: per-sample clipping, Gaussian noise, Poisson sampling (Opacus).

Built from Opacus' parts (its grad-sample modules, DP optimizers, the uniform
with-replacement sampler) rather than `PrivacyEngine.make_private`, because
accounting lives in the site's ledger (it must outlive the engine) and fedus
batches are dicts, which Opacus' empty-batch collate does not handle.
The hooks go onto the student itself, so `student(x)` - the unchanged loss
code of the site step - records what clipping needs.

Two ways to clip, the same clipped sum (`privacy.clipping`):
* "ghost" (default): per-sample gradient *norms* from each layer's input and
  output gradient (Linear and Conv2d by `fedus.privacy.ghost_norms`), and
  the clipped gradient formed from the same two in one backward pass
  (`fedus.privacy.bookkeeping`); per-sample gradients are kept only where a conv's
  norm formed them anyway (the stem and first blocks: few channels, small);
* "per-sample": Opacus' classic hooks keep every parameter's per-sample gradient
  (B x the model in memory), clip each, sum. 2-4x slower (bench/dp_step.py).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from fedus.config import ConfigError, DistillConfig, PrivacyConfig, TrainConfig


CLIPPING = PrivacyConfig().clipping  # the run config's default: one place for it


@dataclass(frozen=True)
class DPPlan:
    """What one round of DP-SGD at a site will do (and what its ledger entry will say)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    clipping: str = CLIPPING  # how the per-sample clipping is computed, not what it is

    @classmethod
    def for_site(cls, n_train: int, batch_size: int, noise_multiplier: float, max_grad_norm: float,
                 clipping: str = CLIPPING) -> "DPPlan":
        rate = min(1.0, batch_size / max(n_train, 1))
        return cls(noise_multiplier, max_grad_norm, rate, max(1, round(rate * n_train)), clipping)

    def with_noise(self, noise_multiplier: float) -> "DPPlan":
        return replace(self, noise_multiplier=noise_multiplier)


# Images never require grad, so the first hooked layer always triggers this (harmless, intended) notice.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


class _EmptyAware:
    """Collate that returns an empty batch (Poisson sampling can draw no sample) instead of failing."""

    def __init__(self, example: dict):
        self.empty = {k: v.new_empty((0, *v.shape)) for k, v in example.items() if torch.is_tensor(v)}

    def __call__(self, batch: list):
        return default_collate(batch) if batch else dict(self.empty)


class _InPlaceNoise:
    """Opacus' noise step with the same draws and the same arithmetic, in place.

    Opacus makes four model-sized tensors per step (a deep copy of the gradient, zeros,
    the noise, their sum), each new allocation page-faulted in: 6-7 % of a ResNet-18 ghost
    step on CPU. Here the noise is drawn into one buffer per parameter, kept across steps,
    and added to the summed gradient in place. Opacus' secure mode (fedus does not set it) keeps Opacus' own."""

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        if self.secure_mode:  # Opacus' secure draws (several per value), as they are
            return super().add_noise()
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        buffers = self.__dict__.setdefault("_noise_buffers", {})
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std != 0:
                noise = buffers.get(p)
                if noise is None or noise.shape != p.summed_grad.shape:
                    noise = buffers[p] = torch.empty_like(p.summed_grad)
                p.summed_grad.add_(noise.normal_(0, std, generator=self.generator))
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)


@functools.cache
def _optimizer_class(clipping: str):
    """Opacus' DP optimizer for the clipping mode, with fedus' in-place noise."""
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    if clipping == "per-sample":  # clips the stored per-sample gradients into a new summed_grad
        return type("DPOptimizer", (_InPlaceNoise, DPOptimizer), {})

    def accumulate(self) -> None:
        """The summed gradient is book-keeping's .grad itself (Opacus deep-copies it): one step per
        backward pass, and .grad is replaced by the noised sum in `add_noise`."""
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad.add_(p.grad)

    return type("DPOptimizerFastGradientClipping", (_InPlaceNoise, DPOptimizerFastGradientClipping),
                {"accumulate": accumulate})


class PrivateTraining:
    def __init__(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer, train_set: Dataset, plan: DPPlan,
                 seed: int, device: torch.device, num_workers: int = 0):
        self.plan = plan
        self.student = student
        # here, not at module level: Opacus (and the scipy it pulls) costs ~1 s in every ClientApp process,
        # and a deployed site starts one per message, DP or not
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.ghost = plan.clipping == "ghost"
        if self.ghost:
            from fedus.privacy.bookkeeping import BookkeepingModule

            self.module = BookkeepingModule(student, plan.max_grad_norm)
        elif plan.clipping == "per-sample":
            from opacus import GradSampleModule

            self.module = GradSampleModule(student, loss_reduction="mean", strict=True)
        else:
            raise ConfigError(f"privacy.clipping must be 'ghost' or 'per-sample', got '{plan.clipping}'")
        Optimizer = _optimizer_class(plan.clipping)  # ghost: noises the given .grad
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.optimizer = Optimizer(optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                                   expected_batch_size=plan.expected_batch_size, loss_reduction="mean",
                                   generator=noise_gen)
        self.steps = 0
        self.optimizer.attach_step_hook(self._count)
        sampler = UniformWithReplacementSampler(num_samples=len(train_set), sample_rate=plan.sample_rate,
                                                generator=torch.Generator().manual_seed(seed))
        self.loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers,
                                 collate_fn=_EmptyAware(train_set[0]))

    def _count(self, _optimizer) -> None:
        self.steps += 1

    def backward(self, per_sample_loss: torch.Tensor) -> None:
        """Set .grad to the batch's summed gradient with each sample's part clipped to `max_grad_norm` (the
        optimizer adds the noise and divides by the expected batch size): the per-sample losses, [B], must
        each depend on their own sample only.

        Ghost: one backward pass that forms no weight gradient: the hooks see every layer's input and
        output gradient, take the per-sample norms from them, and keep them to form the clipped
        gradient afterwards (fedus.privacy.bookkeeping)."""
        if self.ghost:
            self.module.backward(per_sample_loss)
        else:
            per_sample_loss.mean().backward()  # the optimizer clips the stored per-sample gradients

    def noise_only_step(self) -> None:
        """An empty Poisson batch is still a step: the update is pure noise, as the accountant assumes."""
        for p in self.student.parameters():
            if p.requires_grad:
                if self.ghost:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Remove the hooks and per-sample buffers: the student leaves as a plain module."""
        self.module._close()

    def metrics(self) -> dict[str, float]:
        return {"dp_steps": self.steps, "noise_multiplier": self.plan.noise_multiplier,
                "sample_rate": self.plan.sample_rate, "max_grad_norm": self.plan.max_grad_norm}


def private_train_config(cfg: TrainConfig, distill: DistillConfig | None) -> TrainConfig:
    """The training settings DP-SGD can account for.

    * no mixup: a mixed image carries two training images, so clipping it bounds
      neither image's influence and the per-sample accounting would not hold;
    * fp32: Opacus' grad samplers run in the backward hooks, outside autocast;
    * eager and contiguous: Opacus' hooks see the modules torch.compile would replace;
    * per-sample losses only (token-MSE): losses that compare samples within a
      batch (in-batch contrast) give no per-sample gradient to clip.
    """
    loss = (distill.loss if distill is not None else "token-mse").replace(" ", "")
    if loss not in ("token-mse", "token-mse:1", "token-mse:1.0"):
        raise ConfigError(f"privacy.enabled needs distill.loss = 'token-mse' (per-sample), got '{loss}'")
    return cfg.model_copy(update={"mixup": False, "precision": "fp32", "compile": "off", "channels_last": False})
