"""The site step's speed settings, resolved for the device and student at hand.

`train.compile`, `train.channels-last` and `train.num-workers` default to
'auto' so that a site with a GPU gets the fast path without tuning and a
CPU-only site (or CI) is not slowed by it: compiling costs minutes that a CPU
round of a few steps never earns back, and channels_last only helps
convolutions. A compile that fails (no compiler, an unsupported op) falls back
to eager with a warning instead of failing the round.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fedus.config import TrainConfig

MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class FastPath:
    channels_last: bool
    compile: bool
    num_workers: int
    pin_memory: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def is_convolutional(model: nn.Module) -> bool:
    """A backbone with more than a patch-embedding convolution: channels_last pays off."""
    return sum(isinstance(m, nn.Conv2d) for m in getattr(model, "backbone", model).modules()) > 2


def fast_path(cfg: TrainConfig, device: torch.device, student: nn.Module) -> FastPath:
    cuda = device.type == "cuda"
    channels_last = (cuda and is_convolutional(student)) if cfg.channels_last == "auto" else bool(cfg.channels_last)
    compiled = cuda if cfg.compile == "auto" else cfg.compile == "on"
    return FastPath(channels_last, compiled, loader_workers(cfg, device), pin_memory=cuda)


def usable_cpus() -> int:
    """The CPUs this process's share is: its affinity mask (containers, taskset), narrowed by
    OMP_NUM_THREADS where a launcher set it to the process's share - Ray does, to an actor's num-cpus,
    so a simulation running several sites per machine does not start 8 loader workers per site."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        return max(1, min(cpus, int(os.environ.get("OMP_NUM_THREADS", cpus))))
    except ValueError:
        return cpus


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """auto: on a GPU, one worker per usable CPU but the main process's (at most 8); on CPU none,
    the step itself uses the cores."""
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    return min(MAX_AUTO_WORKERS, usable_cpus() - 1) if device.type == "cuda" else 0


BACKEND = "inductor"  # tests swap in a cheaper or a failing backend


def compile_in_place(module: nn.Module) -> None:
    """`nn.Module.compile`: the module keeps its identity and state_dict keys (no `_orig_mod.` prefix),
    which the federation's weight exchange relies on. Compiles once per module object."""
    if getattr(module, "_compiled_call_impl", None) is None:
        module.compile(backend=BACKEND)


def uncompile(*modules: nn.Module) -> None:
    for m in modules:
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


def eager():
    """Run compiled modules eagerly (odd batch sizes in eval mode would each cost a recompile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def with_eager_fallback(step, modules: list[nn.Module], enabled: bool):
    """Run `step()`; if it fails while `modules` are compiled (their first call is where torch.compile
    works), warn, turn compiling off for good and run it again eagerly. Errors of eager code re-raise."""
    if not enabled:
        return step()
    try:
        return step()
    except Exception as e:  # noqa: BLE001 - compile backends raise many kinds of error
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                      "continuing eagerly", RuntimeWarning, stacklevel=2)
        uncompile(*modules)
        return step()


__all__ = ["FastPath", "compile_in_place", "eager", "fast_path", "is_convolutional", "loader_workers", "uncompile",
           "usable_cpus", "with_eager_fallback"]
