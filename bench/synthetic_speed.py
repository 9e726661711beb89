"""Images/s of the synthetic ultrasound generator on one core, per device profile and size.

The demo generates its corpus on first run, so this is the cost a fresh machine pays.
Both wall-clock and process-CPU rates are recorded: on a shared machine the CPU rate is
the one that reflects the code. Run: python bench/synthetic_speed.py [--seconds S]
Writes bench/results/synthetic_speed.json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedus.data.synthetic import DEVICE_PROFILES, GENERATOR_VERSION, LABELS, generate_image, write_synthetic_corpus  # noqa: E402,E501


def _limit_torch_threads() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch.__version__


def measure(profile, size: int, seconds: float, min_images: int = 20) -> dict:
    rng = np.random.default_rng(0)
    generate_image(rng, profile, size, "normal")  # build the cached geometry and PSF
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while n < min_images or time.perf_counter() - wall0 < seconds:
        generate_image(rng, profile, size, LABELS[n % 3])
        n += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"profile": profile.name, "size": size, "images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "images_per_s_wall": round(n / wall, 1), "images_per_s_cpu": round(n / cpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per (profile, size)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "synthetic_speed.json")
    args = ap.parse_args()
    torch_version = _limit_torch_threads()

    results = []
    for size in args.sizes:
        for profile in DEVICE_PROFILES.values():
            r = measure(profile, size, args.seconds)
            results.append(r)
            print(f"{size:4d}px  {profile.name:24s} {r['images_per_s_wall']:7.1f} img/s wall "
                  f"{r['images_per_s_cpu']:7.1f} img/s cpu", flush=True)

    # End-to-end cost of the demo's default corpus (3 centres x 120 images at 64 px, PNG writes included).
    with tempfile.TemporaryDirectory() as tmp:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        write_synthetic_corpus(Path(tmp), n_centres=3, images_per_centre=120, size=64, seed=0)
        corpus = {"n_centres": 3, "images_per_centre": 120, "size": 64,
                  "wall_s": round(time.perf_counter() - wall0, 2), "cpu_s": round(time.process_time() - cpu0, 2)}
    print(f"default corpus (360 images, 64 px): {corpus['wall_s']} s wall, {corpus['cpu_s']} s cpu")

    summary = {}
    for size in args.sizes:
        rows = [r for r in results if r["size"] == size]
        summary[str(size)] = {
            "min_images_per_s_cpu": min(r["images_per_s_cpu"] for r in rows),
            "mean_images_per_s_cpu": round(float(np.mean([r["images_per_s_cpu"] for r in rows])), 1),
            "min_images_per_s_wall": min(r["images_per_s_wall"] for r in rows),
        }
    report = {
        "benchmark": "synthetic_speed",
        "generator_version": GENERATOR_VERSION,
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "torch": torch_version,
        },
        "settings": {"threads": 1, "seconds_per_case": args.seconds, "sizes": args.sizes,
                     "labels": "cycled normal/hypoechoic/hyperechoic", "seed": 0},
        "results": results,
        "summary": summary,
        "default_corpus": corpus,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
