"""Per distillation loss: site-step images/s and held-out teacher agreement after a fixed number of images.

Each loss (and one weighted combination) runs the real `fedus.distill.site_step`
from the same seeded student on one site's training split (ultrasound
augmentation, one round of a `--rounds`-round run's clock), then the student's
held-out token cosine to the teacher (`teacher_agreement`, the site's test
split) is measured. images/s counts training images per second (a two-view
loss sees each image twice; that cost is in the figure); on a shared CPU the
process-CPU rate (images_per_cpu_s, all threads' CPU time) and the load average
at the start say how far wall-clock figures can be trusted. Data: the synthetic
demo corpus, and the public corpus at $FEDUS_CORPUS (one dataset as one site)
when it is present. Teacher: random init unless --teacher-weights is given, so
the cosine measures how fast each loss makes the student agree with *this*
teacher, not the quality of a foundation model.

    python bench/methods.py                 # CPU defaults (small, minutes)
    python bench/methods.py --preset gpu    # 224 px, ViT-B/16 -> ResNet-50, batch 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.config import RunConfig  # noqa: E402
from fedus.data.synthetic import write_synthetic_corpus  # noqa: E402
from fedus.distill.clock import RoundClock  # noqa: E402
from fedus.distill.losses import required_views  # noqa: E402
from fedus.distill.site_step import site_step  # noqa: E402
from fedus.evaluation.site_eval import teacher_agreement  # noqa: E402
from fedus.scenarios import corpus_root  # noqa: E402
from fedus.site import Site, initial_student, pick_device  # noqa: E402

LOSSES = ["token-mse", "masked-consistency", "repulsive-kd", "token-mse:1.0,repulsive-kd:0.5"]
PRESETS = {
    "cpu": dict(image_size=64, batch_size=16, images=160, teacher="vit_tiny_patch16_224", student="resnet10t",
                head_hidden=512, lr=1e-3, synthetic_images=120, corpus_site="busi", corpus_cap=160),
    "gpu": dict(image_size=224, batch_size=64, images=6400, teacher="vit_base_patch16_224", student="resnet50",
                head_hidden=4096, lr=1e-3, synthetic_images=400, corpus_site="busi", corpus_cap=0),
}


def base_config(p: dict, data: list[str]) -> RunConfig:
    return RunConfig().with_overrides([
        f"teacher.arch={p['teacher']}", f"student.arch={p['student']}", f"student.head-hidden={p['head_hidden']}",
        f"data.image-size={p['image_size']}", f"train.batch-size={p['batch_size']}", f"train.lr={p['lr']}",
        "rounds=1", *data])


def measure(cfg: RunConfig, site_key: str | int, loss: str, images: int, device: torch.device) -> dict:
    cfg = cfg.with_overrides([f"distill.loss={loss}"])
    site = Site(cfg, site_key)
    teacher = site.teacher
    student = initial_student(cfg, teacher)
    steps = max(1, math.ceil(images / cfg.train.batch_size))
    train_cfg = cfg.train.model_copy(update={"local_steps": steps})
    train_set = site.data.train_augmented(cfg.data.augment_policy, required_views(cfg.distill))
    reference = site.data.train.images[: cfg.train.batch_size].float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    before = teacher_agreement(student, teacher, site.data, 64, device, cfg.train.precision)
    # warm-up (2 steps on a copy) so lazy init / cudnn autotune do not count against the first loss
    warm = initial_student(cfg, teacher)
    site_step(warm, teacher, train_set, reference, train_cfg.model_copy(update={"local_steps": 2}), 1, device,
              cfg.distill, RoundClock(1, 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load, cpu0 = os.getloadavg()[0], time.process_time()
    result = site_step(student, teacher, train_set, reference, train_cfg, 0, device, cfg.distill, RoundClock(1, 1))
    cpu_s = time.process_time() - cpu0
    after = teacher_agreement(student, teacher, site.data, 64, device, cfg.train.precision)
    row = {"loss": loss, "site": site.name, "n_train": len(site.data.train), "n_test": len(site.data.test),
           "images": result.metrics["examples_seen"], "steps": steps,
           "images_per_s": round(result.metrics["images_per_s"], 2), "seconds": round(result.metrics["seconds"], 2),
           "images_per_cpu_s": round(result.metrics["examples_seen"] / max(cpu_s, 1e-9), 2),
           "load_avg_1m_at_start": round(load, 2),
           "held_out_cos_before": round(before["cos"], 4), "held_out_cos_after": round(after["cos"], 4),
           "held_out_mse_after": round(after["mse"], 4),
           "n_params_trained": sum(p.numel() for p in student.parameters())}
    if device.type == "cuda":
        row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def datasets(p: dict, workdir: Path) -> list[tuple[str, RunConfig, str | int]]:
    manifest = write_synthetic_corpus(workdir, n_centres=1, images_per_centre=p["synthetic_images"],
                                      size=p["image_size"], seed=0)
    out = [("synthetic", base_config(p, [f'data.manifest="{manifest}"']), 0)]
    root = corpus_root()
    if (root / "all_manifest.csv").is_file():
        cfg = base_config(p, [f'data.manifest="{root / "all_manifest.csv"}"', "data.source=manifest",
                              "data.site-column=dataset", f"data.max-images-per-site={p['corpus_cap']}"])
        out.append(("public-corpus", cfg, p["corpus_site"]))
    else:
        print(f"public corpus not found at {root}: skipped", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--images", type=int, default=None, help="training images per loss (default: preset)")
    ap.add_argument("--losses", nargs="+", default=LOSSES)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = pick_device()
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    p = dict(PRESETS[preset])
    if args.images:
        p["images"] = args.images
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for data_name, cfg, site_key in datasets(p, Path(tmp)):
            for loss in args.losses:
                row = {"data": data_name} | measure(cfg, site_key, loss, p["images"], device)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "benchmark": "methods", "machine": machine(), "device": str(device), "preset": preset,
        "settings": p | {"augment_policy": "ultrasound", "optimizer": "AdamW wd 0.05", "mixup": True,
                         "clock": "round 1 of 1 (beta from +2.0 towards -0.8 over the fixed images)",
                         "teacher_weights": "random init (agreement and throughput only; not a foundation model)",
                         "student_init": "seeded random init, same for every loss"},
        "results": rows, "wall_s": round(time.perf_counter() - start, 1),
    }
    write_result(result, "methods", preset, args.out)


if __name__ == "__main__":
    main()
