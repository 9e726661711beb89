"""Images/s of the site distillation step (token-MSE, teacher frozen), side by side in one run.

Each variant runs the real `fedus.distill.site_step` on random [0,1] images
(throughput does not depend on content) with random-init teacher and student
(throughput does not depend on weights either). Variants: fp32, bf16 autocast,
channels_last, torch.compile (GPU only, where they matter). Ratios are to the
plain fp32 variant measured in the same process.

    python bench/site_step.py                 # CPU defaults (small, minutes)
    python bench/site_step.py --preset h100   # reference-sized: 256 px, batch 256, ViT-B/16 -> ResNet-50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import RandomImages, machine, write_result  # noqa: E402
from fedus.config import StudentConfig, TeacherConfig, TrainConfig  # noqa: E402
from fedus.distill import site_step  # noqa: E402
from fedus.distill.site_step import fused_available  # noqa: E402
from fedus.models import create_student, create_teacher  # noqa: E402

PRESETS = {
    "cpu": dict(image_size=64, batch_size=32, steps=8, teachers=["vit_small_patch16_224"],
                students=["resnet18", "vit_tiny_patch16_224"]),
    "h100": dict(image_size=256, batch_size=256, steps=30, teachers=["vit_base_patch16_224"],
                 students=["resnet50", "vit_tiny_patch16_224"]),
}
REFERENCE = ("reference (quoted, not measured here): one H100, plain PyTorch, 256 px, batch 256, "
             "ViT-B/16 teacher -> ResNet-50: 695 img/s fp32, 1,749 img/s bf16 + channels_last + compile")


def variants(device: torch.device) -> list[dict]:
    out = [dict(name="fp32", precision="fp32", channels_last=False, compile=False)]
    if device.type == "cuda":
        out += [dict(name="bf16", precision="bf16", channels_last=False, compile=False),
                dict(name="bf16+channels_last", precision="bf16", channels_last=True, compile=False),
                dict(name="bf16+channels_last+compile", precision="bf16", channels_last=True, compile=True)]
    else:
        out += [dict(name="fp32+channels_last", precision="fp32", channels_last=True, compile=False)]
    return out


def measure(teacher_arch: str, student_arch: str, v: dict, p: dict, device: torch.device) -> dict:
    size, bs = p["image_size"], p["batch_size"]
    teacher = create_teacher(TeacherConfig(arch=teacher_arch, blocks="2"), size)
    student = create_student(StudentConfig(arch=student_arch), teacher.dim, teacher.grid, size, seed=0)
    if v["compile"]:
        student.backbone = torch.compile(student.backbone)
        teacher.backbone = torch.compile(teacher.backbone)
    data = RandomImages(bs * 4, size)
    ref = data.x[:8]
    cfg = TrainConfig(batch_size=bs, local_steps=2, precision=v["precision"], channels_last=v["channels_last"], mixup=True)
    site_step(student, teacher, data, ref, cfg, seed=0, device=device)  # warm-up (and compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = site_step(student, teacher, data, ref, cfg.model_copy(update={"local_steps": p["steps"]}), 1, device)
    out = {"teacher": teacher_arch, "student": student_arch, "variant": v["name"],
           "images_per_s": round(result.metrics["images_per_s"], 2), "seconds": round(result.metrics["seconds"], 3),
           "steps": p["steps"]}
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("h100" if device.type == "cuda" else "cpu")
    p = PRESETS[preset]
    rows = []
    for t in p["teachers"]:
        for s in p["students"]:
            base = None
            for v in variants(device):
                row = measure(t, s, v, p, device)
                base = base or row["images_per_s"]
                row["ratio_to_fp32"] = round(row["images_per_s"] / base, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "benchmark": "site_step", "machine": machine(), "device": str(device), "preset": preset,
        "settings": {k: v for k, v in p.items() if k not in ("teachers", "students")} | {
            "loss": "token-mse", "mixup": True, "optimizer": "AdamW lr 1e-4 wd 0.05", "blocks": 2,
            "fused_adamw": fused_available(device),  # train.fused-optimizer (default on where torch has it)
            "data": "random tensors in [0,1] (throughput only)", "weights": "random init (throughput only)"},
        "results": rows, "reference": REFERENCE,
    }
    write_result(result, "site_step", preset, args.out)


if __name__ == "__main__":
    main()
