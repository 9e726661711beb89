"""What every benchmark shares: machine facts in each JSON (figures are never read without their
context), the JSON writer, and random images for throughput-only runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedus.machine import machine  # noqa: F401  (the package's, so `fedus bench` records the same facts)


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
