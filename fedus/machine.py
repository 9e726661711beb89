"""Machine facts that every benchmark figure carries (figures are never read without their context)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch


LIBRARIES = ("numpy", "scipy", "scikit-learn", "timm", "flwr", "opacus")  # their versions move figures too


def machine() -> dict:
    info = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["libraries"] = {name: _version(name) for name in LIBRARIES}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
