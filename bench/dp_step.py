"""Images/s and peak memory of the site step with and without DP-SGD, side by side in one run.

Each (student, dp) variant runs the real `fedus.distill.site_step` in its own
subprocess, so peak CPU RSS (and CUDA max allocated) belongs to that variant
alone. Random [0,1] images and random-init models: throughput does not depend
on content or weights. DP variants, both clipping + Gaussian noise, Poisson
sampling at rate batch/N, fp32 (DP-SGD always runs fp32, no mixup; the non-DP
baseline is also fp32 + mixup off): `per-sample` (Opacus' hooks store every
per-sample gradient) and `ghost` (fedus' default: per-sample norms only, the
clipped gradient by book-keeping in one backward pass, fedus.privacy.bookkeeping).

    python bench/dp_step.py                 # CPU defaults (small, a few minutes)
    python bench/dp_step.py --preset cpu-b64  # the same at batch 64
    python bench/dp_step.py --preset h100   # 224 px, batch 256
    python bench/dp_step.py --targets cached --out bench/results/dp_step-cpu-cached.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import RandomImages, machine, write_result  # noqa: E402

PRESETS = {
    "cpu": dict(targets="live", image_size=64, batch_size=32, steps=8, repeats=3, teacher="vit_tiny_patch16_224", threads=1,
                students=["resnet10t", "resnet18", "vit_tiny_patch16_224"]),
    # the "larger logical batches" lever: the per-step noise and optimizer cost spread over 2x the images
    "cpu-b64": dict(targets="live", image_size=64, batch_size=64, steps=8, repeats=3, teacher="vit_tiny_patch16_224", threads=1,
                    students=["resnet10t", "resnet18", "vit_tiny_patch16_224"]),
    "h100": dict(targets="live", image_size=224, batch_size=256, steps=20, repeats=3, teacher="vit_small_patch16_224", threads=8,
                 students=["resnet10t", "resnet18", "vit_tiny_patch16_224"]),
}
REFERENCE = ("reference (issue 5, quoted, not measured here): one H100, plain Opacus hooks, cached teacher targets: "
             "ViT-tiny 2,892 img/s with DP vs 7,669 without (2.7x); ViT-small 2,000 vs 4,949; goal <= 1.5x")


VARIANTS = ("off", "per-sample", "ghost")  # DP-SGD off, or its clipping


def measure(student_arch: str, clipping: str, p: dict) -> dict:
    """One variant, in this process (called in a fresh subprocess by `main`)."""
    from fedus.config import StudentConfig, TeacherConfig, TrainConfig
    from fedus.distill import site_step
    from fedus.models import create_student, create_teacher
    from fedus.privacy import DPPlan

    torch.set_num_threads(p["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, bs = p["image_size"], p["batch_size"]
    teacher = create_teacher(TeacherConfig(arch=p["teacher"], blocks="2"), size)
    dp = clipping != "off"
    student = create_student(StudentConfig(arch=student_arch), teacher.dim, teacher.grid, size, seed=0, dp_compatible=dp)
    data, reference, targets = RandomImages(bs * 4, size), None, None
    if p["targets"] == "cached":  # the reference setting: the teacher's tokens read, not computed
        data, targets = _filled_cache(teacher, bs * 4, size, Path(tempfile.mkdtemp(prefix="dp_step-targets-")))
        reference = data.images[:8].float().div(255).expand(-1, 3, -1, -1)
    plan = DPPlan.for_site(len(data), bs, noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping) if dp else None
    cfg = TrainConfig(batch_size=bs, local_steps=1, precision="fp32", mixup=False)
    reference = data.x[:8] if reference is None else reference
    site_step(student, teacher, data, reference, cfg, 0, device, privacy=plan, targets=targets)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for rep in range(p["repeats"]):  # the median of a few timed runs: one 8-step run moves by +-5 % here
        t = time.perf_counter()
        r = site_step(student, teacher, data, reference, cfg.model_copy(update={"local_steps": p["steps"]}),
                      1 + rep, device, privacy=plan, targets=targets)
        runs.append((r.metrics["images_per_s"], r.metrics["seconds"], time.perf_counter() - t))
    if targets is not None:
        shutil.rmtree(targets.root, ignore_errors=True)
    ips, seconds, wall = sorted(runs)[len(runs) // 2]
    out = {"student": student_arch, "teacher": p["teacher"], "dp": dp, "clipping": clipping,
           "images_per_s": round(ips, 2), "images_per_s_runs": [round(x[0], 2) for x in runs],
           "seconds": round(seconds, 3), "wall_s": round(wall, 3), "steps": p["steps"],
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if dp:
        out |= {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": plan.sample_rate}
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _filled_cache(teacher, n: int, size: int, root: Path):
    """A site's target cache (one stored view per image, fedus.distill.target_cache) with every slot
    filled: the steady state of a later round, where no step runs the teacher."""
    from fedus.distill.target_cache import CachedViews, TargetCache

    images = (torch.rand(n, 1, size, size) * 255).to(torch.uint8)  # grayscale bytes, as a site stores them
    cache = TargetCache(root, {"bench": "dp_step", "views": 1, "n_images": n},
                        teacher.grid[0] * teacher.grid[1], teacher.dim)
    views = CachedViews(images, cache, None, seed=0)
    views.materialise()
    plain = images.float().div(255).expand(-1, 3, -1, -1)
    for view in range(cache.slots):  # the stored view and the plain image (the reference batch's slot)
        cache.lookup(teacher, torch.arange(n) * cache.slots + view, plain)
    assert bool(cache.filled.all())
    return views, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--targets", choices=["live", "cached"], default=None,
                    help="teacher tokens computed every step (the preset's default) or read from a filled cache")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: 'arch,clipping,preset'
    args = ap.parse_args()
    if args.one:
        arch, clipping, preset, targets = args.one.split(",")
        print("RESULT " + json.dumps(measure(arch, clipping, PRESETS[preset] | {"targets": targets})), flush=True)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("h100" if device == "cuda" else "cpu")
    p = PRESETS[preset] | ({"targets": args.targets} if args.targets else {})
    rows = []
    for arch in p["students"]:
        side = {}
        for clipping in VARIANTS:
            run = subprocess.run([sys.executable, __file__, "--one", f"{arch},{clipping},{preset},{p['targets']}"],
                                 capture_output=True, text=True, check=True)
            row = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("RESULT "))[7:])
            if clipping != "off":
                row["dp_cost_x"] = round(side["off"]["images_per_s"] / max(row["images_per_s"], 1e-9), 2)
            side[clipping] = row
            rows.append(row)
            print(json.dumps(row), flush=True)
        side["ghost"]["speedup_over_per_sample_x"] = round(
            side["ghost"]["images_per_s"] / max(side["per-sample"]["images_per_s"], 1e-9), 2)
    result = {
        "benchmark": "dp_step", "machine": machine() | {"torch_threads": p["threads"]}, "device": device,
        "preset": preset,
        "settings": {k: v for k, v in p.items() if k != "students"} | {
            "loss": "token-mse", "mixup": False, "precision": "fp32", "optimizer": "AdamW lr 1e-4 wd 0.05",
            "dp": ("Opacus 1.6, Poisson sampling, noise 1.0, clip 1.0; clipping 'per-sample' = GradSampleModule + "
                   "DPOptimizer, 'ghost' = fedus.privacy.bookkeeping (Opacus' ghost-clipping hooks, fedus' Conv2d "
                   "norms, the clipped gradient formed from each layer's input and output gradient in one backward "
                   "pass that stops at the first layers' outputs) + DPOptimizerFastGradientClipping (noise on the given gradient; both "
                   "optimizers with fedus' in-place noise, Opacus' own draws)"),
            "dp_student": "dp_compatible=True (GroupNorm, no in-place, ViT prefix tokens as a hooked layer)",
            "baseline_student": "plain (BatchNorm)",
            "teacher_targets": {"live": "computed every step (not cached)",
                                "cached": "read from a filled fedus target cache (1 stored view per image, fp16 "
                                          "tokens), as the issue's reference; the teacher runs on no step"}[p["targets"]],
            "data": "random tensors in [0,1] (throughput only)", "weights": "random init (throughput only)",
            "images_per_s": "median of `repeats` timed runs of `steps` steps each, after one warm-up step",
            "peak_rss": "process peak RSS (ru_maxrss) of the variant's own subprocess, incl. imports"},
        "results": rows, "reference": REFERENCE,
    }
    write_result(result, "dp_step", preset, args.out)


if __name__ == "__main__":
    main()
