"""Deployment figures at the TinyUSFM paper's shapes: ViT-B/16 teacher vs small students at 224 px, CPU, batch 1.

Runs `fedus.latency.compare_latency` (what `fedus bench latency --teacher ... --student ...`
runs) for each student: onnxruntime latency, parameters and GFLOPs, student/teacher ratios.
All models are random init, and labelled so: latency, parameters and GFLOPs do not depend on
weight values. The paper's ratios (6.36 % params, 6.40 % GFLOPs) are quoted beside them.

    python bench/latency.py                  # -> bench/results/latency-cpu.json
    python bench/latency.py --threads 0      # onnxruntime's default threads (all cores)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import write_result  # noqa: E402
from fedus.latency import REFERENCE, compare_latency, latency_table, models_from_archs  # noqa: E402

PRESETS = {
    "cpu": dict(image_size=224, teacher="vit_base_patch16_224",
                students=["vit_tiny_patch16_224", "resnet18"], warmup=10, runs=50),
}
WHY = {"vit_tiny_patch16_224": "the TinyUSFM student's shape (ViT-Tiny/16)", "resnet18": "fedus's default student"}


def without_attention(side: dict) -> float:
    """GFLOPs less the attention matmuls (aten.bmm: SDPA's q@k and attn@v on its math backend)."""
    return sum(v for op, v in side["gflops_by_op"].items() if op != "aten.bmm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0 = its default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    comparisons = []
    for student in p["students"]:
        teacher_model, student_model, provenance = models_from_archs(p["teacher"], student, p["image_size"])
        result = compare_latency(teacher_model, student_model, p["image_size"], provenance,
                                 warmup=p["warmup"], runs=p["runs"], threads=args.threads)
        result["student"]["why"] = WHY.get(student, "")
        result["ratios"]["gflops_without_attention_matmuls"] = (  # how the paper's 6.40 % seems to count
            without_attention(result["student"]) / without_attention(result["teacher"]))
        Console().print(latency_table(result))
        comparisons.append(result)
    write_result({"benchmark": __doc__.splitlines()[0], "preset": args.preset, "reference": REFERENCE,
                  "comparisons": comparisons}, "latency", args.preset, args.out)


if __name__ == "__main__":
    main()
