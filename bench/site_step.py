"""The plain distillation recipe vs the fedus site step, side by side in one run on one machine.

*Plain* is the textbook loop a user would write with PyTorch + timm: the same
teacher and student modules, batches already on the device (no data loader
at all, the most favourable case for it), mixup, default AdamW, the teacher
run on every batch; measured fp32, bf16, bf16 + channels_last, and (GPU)
bf16 + channels_last + torch.compile - the reference's four steps.

*fedus* is the real `fedus.distill.site_step` with its defaults (bf16 on CUDA,
channels_last for CNN students, compiled student and teacher, fused AdamW,
pinned loader workers, images sent as bytes):
  - `fedus live`: the teacher runs on every batch, like plain;
  - `fedus cached K`: K seeded ultrasound views per image are drawn once and the
    frozen teacher's tokens for them stored (fp16 memmap, read by the loader's
    workers); round 1 fills the cache (one epoch, teacher on every view), later
    rounds never run the teacher. Reported: the fill round, the steady rounds,
    and the amortised rate over a run of `--epochs` epochs.

Every variant trains a fresh student from the same seed on the same number
of images (warm-up/compile steps included) and is then scored on held-out
images against the live teacher (token MSE, fp32, eval mode): the
comparison is at equal images seen, and the losses say whether the faster
recipe learns as much. Images: the fedus synthetic B-mode generator (content
matters for the held-out loss, not for speed); weights: random init.

    python bench/site_step.py                 # CPU: small sizes, minutes
    python bench/site_step.py --preset h100   # reference-sized: 256 px, batch 256, ViT-B/16 (2 blocks) -> ResNet-50
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.config import StudentConfig, TeacherConfig, TrainConfig  # noqa: E402
from fedus.data import synthetic  # noqa: E402
from fedus.distill import site_step  # noqa: E402
from fedus.distill.fast_path import fast_path  # noqa: E402
from fedus.distill.site_step import distill_loss_on, fused_available, site_loader  # noqa: E402
from fedus.distill.target_cache import CachedViews, TargetCache  # noqa: E402
from fedus.distill.resident import use_resident  # noqa: E402
from fedus.models import create_student, create_teacher  # noqa: E402

PRESETS = {
    "cpu": dict(image_size=64, batch_size=32, warmup=2, steps=10, images=32, held_out=64, views=2, epochs=20,
                teacher="vit_small_patch16_224", student="resnet18"),
    "h100": dict(image_size=256, batch_size=256, warmup=8, steps=32, images=1024, held_out=256, views=4, epochs=20,
                 teacher="vit_base_patch16_224", student="resnet50"),
}
REFERENCE = {"source": "issue 8, quoted, not measured here: one H100, plain PyTorch + timm, random weights, 256 px, "
                       "batch 256, ViT-B/16 (2 blocks) -> ResNet-50 + MLP head",
             "images_per_s": {"fp32": 695, "bf16": 869, "bf16+channels_last": 1520, "bf16+channels_last+compile": 1749},
             "goal": ">= 2x the best plain figure (>= 3,500 img/s on an H100) at equal held-out distillation loss"}
LOSS_TOLERANCE = 0.05  # 'equal' held-out loss: within 5 % of the best plain variant's


def _image(args: tuple[int, int]) -> np.ndarray:
    i, size = args
    profiles = list(synthetic.DEVICE_PROFILES.values())
    rng = np.random.default_rng(i)
    return synthetic.generate_image(rng, profiles[i % len(profiles)], size, synthetic.LABELS[i % len(synthetic.LABELS)])[0]


def synthetic_pool(n: int, size: int) -> torch.Tensor:
    """n synthetic B-mode images (uint8 [n, H, W]) from all device profiles, generated in parallel."""
    with multiprocessing.get_context("fork").Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
        return torch.from_numpy(np.stack(pool.map(_image, [(i, size) for i in range(n)], chunksize=8)))


class PoolImages(torch.utils.data.Dataset):
    """The pool as the site step's dataset: bytes, 3 channels (what a site's loader hands over)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].expand(3, -1, -1).contiguous()}


def models(p: dict, device: torch.device):
    teacher = create_teacher(TeacherConfig(arch=p["teacher"], blocks="2"), p["image_size"]).to(device).eval()
    student = create_student(StudentConfig(arch=p["student"]), teacher.dim, teacher.grid, p["image_size"], seed=0)
    return teacher, student.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(v: dict, p: dict, pool: torch.Tensor, device: torch.device):
    """The textbook loop: device-resident batches, the teacher on every (mixed-up) batch."""
    teacher, student = models(p, device)
    fmt = torch.channels_last if v["channels_last"] else torch.contiguous_format
    teacher, student = teacher.to(memory_format=fmt), student.to(memory_format=fmt).train()
    t_fwd, s_fwd = (torch.compile(teacher), torch.compile(student)) if v["compile"] else (teacher, student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)
    x_all = pool.to(device).unsqueeze(1).expand(-1, 3, -1, -1).float().div(255)
    gen = torch.Generator(device).manual_seed(0)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if v["precision"] == "bf16" and device.type == "cuda"
           else torch.autocast("cpu", enabled=False))

    def step() -> float:
        x = x_all[torch.randint(0, len(x_all), (p["batch_size"],), device=device, generator=gen)]
        lam = torch.rand((), device=device, generator=gen)
        x = (lam * x + (1 - lam) * x[torch.randperm(len(x), device=device, generator=gen)]).contiguous(memory_format=fmt)
        with amp:
            with torch.no_grad():
                target = t_fwd(x)
            loss = torch.nn.functional.mse_loss(s_fwd(x).float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(p["warmup"]):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(p["steps"]):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return student, teacher, {"images_per_s": p["steps"] * p["batch_size"] / seconds, "seconds": seconds}


def fedus_live(p: dict, pool: torch.Tensor, device: torch.device):
    teacher, student = models(p, device)
    cfg = TrainConfig(batch_size=p["batch_size"], local_steps=p["warmup"], mixup=True)
    data, ref = PoolImages(pool), pool[:8].unsqueeze(1).expand(-1, 3, -1, -1).float().div(255)
    site_step(student, teacher, data, ref, cfg, seed=0, device=device)  # warm-up (and compile)
    m = site_step(student, teacher, data, ref, cfg.model_copy(update={"local_steps": p["steps"]}), 1, device).metrics
    return student, teacher, {"images_per_s": m["images_per_s"], "seconds": m["seconds"],
                              "fast_path": str(fast_path(cfg, device, student))}


def fedus_cached(p: dict, pool: torch.Tensor, device: torch.device, cache_root: Path):
    """Round 1 fills the cache (one epoch over the N x K views); round 2 runs on stored targets only."""
    teacher, student = models(p, device)
    n, k, bs = len(pool), p["views"], p["batch_size"]
    fill_steps = math.ceil(n * k / bs)
    steady_steps = p["warmup"] + p["steps"] - fill_steps
    assert steady_steps > 0, "preset: the fill epoch must be shorter than the run"
    cache = TargetCache(cache_root, bench_cache_fields(p, n), teacher.grid[0] * teacher.grid[1], teacher.dim)
    cfg = TrainConfig(batch_size=bs, local_steps=fill_steps, mixup=False, target_views=k)
    views = CachedViews(pool, cache, "ultrasound", seed=0)
    fast = fast_path(cfg, device, student)
    began = time.perf_counter()
    views.materialise(fast.num_workers)
    draw_s = time.perf_counter() - began
    ref = pool[:8].unsqueeze(1).expand(-1, 3, -1, -1).float().div(255)
    fill = site_step(student, teacher, views, ref, cfg, seed=0, device=device, targets=cache).metrics
    resident = use_resident(cfg, device, views)  # train.cache-on-device = auto: the steady round's input path
    steady = site_step(student, teacher, views, ref, cfg.model_copy(update={"local_steps": steady_steps}), 1, device,
                       targets=cache).metrics
    epoch_fill = fill["seconds"]  # includes compiling the student (once per process, like round 1 of a run)
    epoch_steady = n * k / steady["images_per_s"]
    e = p["epochs"]
    amortised = e * n * k / (draw_s + epoch_fill + (e - 1) * epoch_steady)
    return student, teacher, {
        "images_per_s": steady["images_per_s"], "seconds": steady["seconds"], "steps": steady_steps,
        "fast_path": str(fast),
        "fill_round": {"steps": fill_steps, "images_per_s": fill["images_per_s"], "seconds": fill["seconds"],
                       "hit_rate": fill["target_cache_hit_rate"], "includes": "compiling the student"},
        "steady_hit_rate": steady["target_cache_hit_rate"], "views_drawn_s": draw_s,
        "steady_input": "views + tokens held on the device" if resident else "loader workers from the memory maps",
        f"amortised_images_per_s_{e}_epochs": amortised,
        "cache_gib": (cache.targets.nbytes + n * k * 3 * p["image_size"] ** 2) / 2**30}


def loader_alone(p: dict, pool: torch.Tensor, device: torch.device, cache_root: Path) -> list[dict]:
    """The fedus input path with no model: batches from the site step's own loader, copied to the device
    (cached views + tokens from the cached run's cache at `cache_root`, once that run has filled it).
    If these rates sit near the fedus step's, the loader is what limits it."""
    rows = []
    for name, data in [("loader alone: pool bytes", PoolImages(pool)),
                       ("loader alone: cached views + tokens", _filled_views(p, pool, cache_root))]:
        if data is None:
            continue
        fast = fast_path(TrainConfig(), device, torch.nn.Conv2d(3, 3, 3))
        loader = site_loader(data, p["batch_size"], fast, torch.Generator().manual_seed(0))
        batches, n = iter(loader), 0
        next(batches)  # workers started
        sync(device)
        start = time.perf_counter()
        for _ in range(p["steps"]):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            for v in batch.values():
                v.to(device, non_blocking=True)
            n += len(batch["image"])
        sync(device)
        seconds = time.perf_counter() - start
        rows.append({"variant": name, "images_per_s": n / seconds, "seconds": seconds, "fast_path": str(fast),
                     "mb_per_batch": sum(v.numel() * v.element_size() for v in batch.values()) / 2**20})
        del loader, batches
    return rows


def bench_cache_fields(p: dict, n: int) -> dict:
    return {"views": p["views"], "n_images": n, "teacher_arch": p["teacher"], "image_size": p["image_size"], "bench": True}


def _filled_views(p: dict, pool: torch.Tensor, root: Path) -> CachedViews | None:
    """The cached run's views and tokens (same fields and shape, so the cache opens instead of being wiped)."""
    header = root / "header.json"
    if not header.exists():
        return None
    _, tokens, dim = json.loads(header.read_text())["shape"]
    return CachedViews(pool, TargetCache(root, bench_cache_fields(p, len(pool)), tokens, dim), "ultrasound", 0)


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("h100" if device.type == "cuda" else "cpu")
    p = PRESETS[preset] | {k: v for k, v in vars(args).items() if k in PRESETS["cpu"] and v is not None}
    images_each = (p["warmup"] + p["steps"]) * p["batch_size"]
    began = time.perf_counter()
    everything = synthetic_pool(p["images"] + p["held_out"], p["image_size"])
    pool, held = everything[:p["images"]], everything[p["images"]:]
    held = held.unsqueeze(1).expand(-1, 3, -1, -1).float().div(255).to(device)
    pool_s = time.perf_counter() - began
    cuda = device.type == "cuda"
    plain_variants = [dict(name="bf16+channels_last+compile", precision="bf16", channels_last=True, compile=True)] if cuda else []
    plain_variants += ([dict(name="bf16+channels_last", precision="bf16", channels_last=True, compile=False),
                        dict(name="bf16", precision="bf16", channels_last=False, compile=False)] if cuda else
                       [dict(name="fp32+channels_last", precision="fp32", channels_last=True, compile=False)])
    plain_variants += [dict(name="fp32", precision="fp32", channels_last=False, compile=False)]
    result = {
        "benchmark": "site_step", "machine": machine(), "device": str(device), "preset": preset,
        "settings": p | {"loss": "token-mse (2 teacher blocks, mean)", "optimizer": "AdamW lr 1e-4 wd 0.05",
                         "images_per_variant": images_each, "pool_generation_s": round(pool_s, 1),
                         "fused_adamw": fused_available(device), "torch": torch.__version__},
        "teacher": f"{p['teacher']}, random init (throughput and a like-for-like loss; not a foundation model)",
        "data": (f"fedus synthetic B-mode generator, {p['images']} training + {p['held_out']} held-out images "
                 f"(4 device profiles), {p['image_size']} px, seed 0"),
        "reference": REFERENCE, "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        jobs = ([("fedus cached K=%d" % p["views"], lambda: fedus_cached(p, pool, device, Path(tmp) / "cache"))]
                + [("fedus live", lambda: fedus_live(p, pool, device))]
                + [(f"plain {v['name']}", lambda v=v: plain(v, p, pool, device)) for v in plain_variants])
        if cuda:  # the must-show pair first: a run cut short still has it
            jobs = [jobs[2], jobs[0], jobs[1]] + jobs[3:]
        for name, job in jobs:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                student, teacher, row = job()
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' figures
                row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
                print(row, flush=True)
                result["results"].append(row)
                continue
            row = {"variant": name, **row, "held_out_loss": distill_loss_on(student, teacher, held, "fp32"),
                   "images_seen": images_each, "wall_s": time.perf_counter() - t0}
            if cuda:
                row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["results"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del student, teacher
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            result["summary"] = summary(result["results"])
            write_result(result, "site_step", preset, args.out)
        for row in loader_alone(p, pool, device, Path(tmp) / "cache"):
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            result["results"].append(row)
        write_result(result, "site_step", preset, args.out)
    return result


def summary(rows: list[dict]) -> dict:
    plain_rows = [r for r in rows if r["variant"].startswith("plain") and "error" not in r]
    loader_rows = [r for r in rows if r["variant"].startswith("loader")]
    fedus_rows = [r for r in rows if r["variant"].startswith("fedus") and "error" not in r]
    if not plain_rows or not fedus_rows:
        return {}
    best_plain = max(plain_rows, key=lambda r: r["images_per_s"])
    out = {"best_plain": best_plain["variant"], "best_plain_images_per_s": best_plain["images_per_s"]}
    out |= {r["variant"]: r["images_per_s"] for r in loader_rows}
    for r in fedus_rows:
        key = r["variant"].replace(" ", "_").replace("=", "")
        loss_ratio = r["held_out_loss"] / best_plain["held_out_loss"]
        out[key] = {"speedup_vs_best_plain": r["images_per_s"] / best_plain["images_per_s"],
                    "held_out_loss_ratio_vs_best_plain": loss_ratio,
                    "equal_loss": loss_ratio <= 1 + LOSS_TOLERANCE}
        amortised = [v for k, v in r.items() if k.startswith("amortised")]
        if amortised:
            out[key]["amortised_speedup_vs_best_plain"] = amortised[0] / best_plain["images_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    for k in ("images", "views", "steps", "warmup", "batch_size", "image_size", "epochs"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
