"""What every benchmark shares: machine facts in each JSON (figures are never read without their
context), the JSON writer, and random images for throughput-only runs."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


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
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class RandomImages(torch.utils.data.Dataset):
    """Random [0,1] images: throughput only, never a quality figure."""

    def __init__(self, n: int, size: int):
        self.x = torch.rand(n, 3, size, size)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def write_result(result: dict, name: str, preset: str, out: Path | None = None) -> Path:
    out = out or Path(__file__).parent / "results" / f"{name}-{preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return out
