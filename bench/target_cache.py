"""Teacher target cache: K cached views per image vs the live teacher, on held-out cosine and images/s.

One synthetic site distils a student over several rounds (state carried from
round to round, as a site would see it under FedAvg with one site) for each
variant: the live teacher (with and without mixup - cached targets cannot be
mixed up) and cached targets with K = 1, 4, 16 views per image. Reported:
held-out token cosine to the teacher after the last round, images/s of the
first round (the cache fills as views are first drawn) and of the later rounds.

    python bench/target_cache.py            # CPU, small settings, a few minutes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.config import RunConfig  # noqa: E402
from fedus.site import Site  # noqa: E402

PRESETS = {
    "cpu": dict(image_size=32, batch_size=16, steps=6, rounds=4, images=60,
                teacher="vit_tiny_patch16_224", student="resnet10t", head_hidden=256),
}
VARIANTS = [("live", 0, True), ("live-no-mixup", 0, False), ("K=1", 1, False), ("K=4", 4, False), ("K=16", 16, False)]


def run(name: str, views: int, mixup: bool, p: dict, cache_root: Path) -> dict:
    cfg = RunConfig().with_overrides({
        "teacher.arch": p["teacher"], "student.arch": p["student"], "student.head-hidden": p["head_hidden"],
        "data.image-size": p["image_size"], "data.synthetic-centres": 1,
        "data.synthetic-images-per-centre": p["images"], "train.batch-size": p["batch_size"],
        "train.local-steps": p["steps"], "train.mixup": mixup, "train.target-views": views,
        "train.target-cache-dir": str(cache_root / name), "rounds": p["rounds"], "eval.probe-rounds": "0",
    })
    site = Site(cfg, 0)
    state = site.student().state_dict()
    cos0 = site.evaluate(state, 1)["cos"]
    rates, wall = [], time.perf_counter()
    for r in range(1, p["rounds"] + 1):
        state, m = site.train(state, r)
        rates.append(m["images_per_s"])
    out = {"variant": name, "views": views, "mixup": mixup, "cos_before": cos0,
           "cos_after": site.evaluate(state, p["rounds"])["cos"], "images_per_s_round1": rates[0],
           "images_per_s_later": sum(rates[1:]) / max(len(rates) - 1, 1), "seconds": time.perf_counter() - wall,
           "n_train": len(site.data.train)}
    if views:
        out |= {k: v for k, v in m.items() if k.startswith("target_cache")}
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    args = ap.parse_args()
    p = PRESETS[args.preset]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, k, mixup, p, Path(tmp)) for name, k, mixup in VARIANTS]
    live = next(r for r in rows if r["variant"] == "live-no-mixup")
    for r in rows:
        r["speedup_later_vs_live_no_mixup"] = r["images_per_s_later"] / live["images_per_s_later"]
    write_result({"machine": machine(), "preset": p, "variants": rows,
                  "note": "random-init teacher (not a foundation model), synthetic images; CPU timings on a shared "
                          "machine are noisy"}, "target_cache", args.preset)


if __name__ == "__main__":
    main()
