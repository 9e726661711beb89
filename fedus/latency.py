"""`fedus bench latency`: what a point-of-care device pays for the teacher and for the student.

Both encoders (`fedus.export.Encoder`: backbone + input normalisation, no
distillation head) are exported to ONNX and timed on CPU with onnxruntime at
batch 1: warm-up runs, then the median and p90 of timed runs. Parameters are all
of the encoder's parameters; GFLOPs come from torch's FlopCounterMode at batch 1
(2 FLOPs per multiply-add). Attention is counted: while counting, SDPA runs on
its math backend, because FlopCounterMode has no formula for CPU fused attention.
Latency, parameters and GFLOPs do not depend on weight values, so random-init
models give the same figures as trained ones; the JSON says which were used.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fedus.config import ConfigError, StudentConfig, TeacherConfig
from fedus.export import OPSET, Encoder, export_onnx, ort_session
from fedus.machine import machine
from fedus.models import Student, Teacher, create_student, create_teacher

REFERENCE = {
    "source": "TinyUSFM (arXiv 2510.19239); quoted, not measured here",
    "teacher": "USFM (ViT-B/16), 224 px",
    "student": "ViT-Tiny/16, 224 px: 5.5 M params, 2.16 GFLOPs",
    "params_ratio": 0.0636,
    "gflops_ratio": 0.0640,
}
RANDOM_INIT = "random init (latency, parameters and GFLOPs do not depend on weight values)"


def count_flops(encoder: Encoder, image_size: int) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one batch-1 forward pass, and FLOPs per aten op."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        encoder(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def ort_latency(path: Path, image_size: int, warmup: int, runs: int, threads: int) -> dict[str, float]:
    """Milliseconds per batch-1 inference with onnxruntime on CPU."""
    session = ort_session(path, threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": float(np.median(times)), "p90": float(np.percentile(times, 90)),
            "min": float(np.min(times)), "mean": float(np.mean(times))}


def measure(model: Student | Teacher, image_size: int, onnx_path: Path, warmup: int, runs: int, threads: int) -> dict:
    encoder = Encoder(model)
    flops, by_op = count_flops(encoder, image_size)
    export_onnx(encoder, onnx_path, image_size)
    return {"params": encoder.n_params, "gflops": flops / 1e9, "gflops_by_op": {k: v / 1e9 for k, v in by_op.items()},
            "latency_ms": ort_latency(onnx_path, image_size, warmup, runs, threads)}


def models_from_archs(teacher_arch: str, student_arch: str, image_size: int, seed: int = 0
                      ) -> tuple[Teacher, Student, dict]:
    """Random-init teacher and student (the student's head shaped by the teacher, as in a run). The teacher's
    tapped blocks are concatenated: a CNN's last blocks differ in width, which 'mean' cannot combine, and the
    combination costs nothing next to the backbone."""
    teacher = create_teacher(TeacherConfig(arch=teacher_arch, combine="concat"), image_size)
    student = create_student(StudentConfig(arch=student_arch), teacher.dim, teacher.grid, image_size, seed)
    return teacher, student, {
        "source": "architectures given on the command line",
        "teacher": {"arch": teacher_arch, "weights": RANDOM_INIT, "blocks": "default, concatenated"},
        "student": {"arch": student_arch, "weights": f"random init, seed {seed}"}}


def models_from_run(run_dir: Path) -> tuple[Teacher, Student, int, dict]:
    """The run's final global student and its teacher's architecture (random init: its weights file is
    not needed for timing and need not be on this machine); returns the run's image size too."""
    from fedus.export import load_run_student

    cfg, rnd, ckpt, student = load_run_student(run_dir)
    teacher = create_teacher(cfg.teacher.model_copy(update={"weights": ""}), cfg.data.image_size)
    return teacher, student, cfg.data.image_size, {
        "source": f"run {Path(run_dir).resolve()}",
        "teacher": {"arch": cfg.teacher.arch, "weights": RANDOM_INIT, "run_teacher_source": cfg.teacher.source,
},
        "student": {"arch": cfg.student.arch, "weights": f"the run's final global checkpoint {ckpt.name} (round {rnd})"}}


def compare_latency(teacher: Teacher, student: Student, image_size: int, provenance: dict,
                    warmup: int = 10, runs: int = 50, threads: int = 1) -> dict:
    """Latency (batch 1), parameters and GFLOPs of teacher and student, and the student/teacher ratios."""
    import onnxruntime

    if warmup < 0 or runs < 1 or threads < 0:
        raise ConfigError(f"need warmup >= 0, runs >= 1, threads >= 0 (got {warmup}, {runs}, {threads})")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedus-latency-") as tmp:
        t = measure(teacher, image_size, Path(tmp) / "teacher.onnx", warmup, runs, threads)
        s = measure(student, image_size, Path(tmp) / "student.onnx", warmup, runs, threads)
    return {
        "what": "CPU inference of the teacher and student encoders (image -> feature map + pooled embedding)",
        "machine": machine(),
        "image_size": image_size, "batch_size": 1,
        "settings": {"warmup": warmup, "runs": runs, "intra_op_threads": threads or "onnxruntime default",
                     "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},  # other work on the machine
                     "runtime": f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, opset {OPSET}",
                     "flops": "torch.utils.flop_counter.FlopCounterMode, 2 per multiply-add, SDPA counted on its math backend",
                     "params": "every parameter of the encoder (backbone; the student's distillation head excluded)"},
        "source": provenance["source"],
        "teacher": {**provenance["teacher"], **t},
        "student": {**provenance["student"], **s},
        "ratios": {"params": s["params"] / t["params"], "gflops": s["gflops"] / t["gflops"],
                   "latency_median": s["latency_ms"]["median"] / t["latency_ms"]["median"]},
        "reference": REFERENCE,
    }


def latency_table(result: dict) -> Table:
    t, s, r = result["teacher"], result["student"], result["ratios"]
    settings = result["settings"]
    table = Table(title=f"CPU, batch 1, {result['image_size']} px, onnxruntime ({settings['intra_op_threads']} intra-op "
                        f"threads, median of {settings['runs']}); ratio = student / teacher")
    for col in ("", "teacher", "student", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("model", t["arch"], s["arch"], "")
    table.add_row("params (M)", f"{t['params'] / 1e6:.2f}", f"{s['params'] / 1e6:.2f}", f"{r['params']:.2%}")
    table.add_row("GFLOPs", f"{t['gflops']:.2f}", f"{s['gflops']:.2f}", f"{r['gflops']:.2%}")
    table.add_row("latency median (ms)", f"{t['latency_ms']['median']:.2f}", f"{s['latency_ms']['median']:.2f}",
                  f"{r['latency_median']:.2%}")
    table.add_row("latency p90 (ms)", f"{t['latency_ms']['p90']:.2f}", f"{s['latency_ms']['p90']:.2f}", "")
    ref = result["reference"]
    table.caption = (f"teacher weights: {t['weights']}\nstudent weights: {s['weights']}\nreference ({ref['source']}): "
                     f"{ref['params_ratio']:.2%} params, {ref['gflops_ratio']:.2%} GFLOPs")
    return table
