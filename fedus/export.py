"""`fedus export RUN_DIR --onnx`: the run's final global student encoder as ONNX, checked with onnxruntime.

What a point-of-care device runs is the student's encoder alone: [0,1] images
[batch, 3, S, S] (float32, normalisation inside) -> the last feature map
[batch, C, h, w] and its global average, the embedding [batch, C], which is
what the evaluation protocol's probes see. The distillation head stays behind.
The batch axis is dynamic. The export uses torch's TorchScript-based exporter
(`dynamo=False`): it needs no onnxscript and takes well under a second for a
small encoder, against several seconds for the torch.export-based one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedus import __version__
from fedus.config import ConfigError, RunConfig
from fedus.models import Student, Teacher

INPUT = "image"
OUTPUTS = ("feature_map", "embedding")
TOLERANCE = 1e-4  # max abs difference, fp32
CHECK_BATCHES = (1, 3)
OPSET = 17


class ExportCheckError(RuntimeError):
    """The exported graph does not reproduce the PyTorch encoder."""


class Encoder(nn.Module):
    """The deployable encoder: images -> (last feature map, its pooled embedding), by `Student.encode`.

    Holds only a backbone and its input normalisation, so `parameters()` are what ships. A teacher
    wrapped alike is its whole backbone measured the same way (its last block; the blocks it
    feeds to distillation cost the same)."""

    def __init__(self, model: Student | Teacher):
        super().__init__()
        self.backbone, self.normalize = model.backbone, model.normalize
        self.eval()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = Student.encode(self, x)  # needs only .backbone and .normalize
        return fmap, fmap.mean((2, 3))


def export_onnx(encoder: Encoder, path: Path, image_size: int, metadata: dict[str, str] | None = None) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings on shape asserts
        torch.onnx.export(encoder.eval(), (torch.rand(2, 3, image_size, image_size),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=[INPUT], output_names=list(OUTPUTS), dynamic_axes=axes)
    model = onnx.load(str(path))
    model.doc_string = (f"fedus {__version__} encoder. Input '{INPUT}': float32 [batch, 3, {image_size}, {image_size}], "
                        f"values in [0, 1] (normalisation inside). Outputs: {', '.join(OUTPUTS)}.")
    onnx.helper.set_model_props(model, {"fedus": __version__, "image_size": str(image_size), **(metadata or {})})
    onnx.save(model, str(path))
    return path


def ort_session(path: Path, threads: int = 1):
    """A CPU onnxruntime session with `threads` intra-op threads (0 = onnxruntime's default: one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(encoder: Encoder, path: Path, image_size: int, batch_sizes: tuple[int, ...] = CHECK_BATCHES,
               tolerance: float = TOLERANCE, seed: int = 0) -> dict:
    """ONNX (onnxruntime) against PyTorch on random [0,1] inputs at each batch size; raises ExportCheckError
    when an output's shape differs or the max abs difference is not below `tolerance`."""
    session = ort_session(path)
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batch_sizes:
        x = torch.rand(b, 3, image_size, image_size, generator=gen)
        with torch.no_grad():
            want = [t.numpy() for t in encoder.eval()(x)]
        got = session.run(list(OUTPUTS), {INPUT: x.numpy()})
        for name, g, w in zip(OUTPUTS, got, want):
            if g.shape != w.shape:
                raise ExportCheckError(f"ONNX '{name}' has shape {list(g.shape)} at batch {b}, PyTorch {list(w.shape)} ({path})")
        diffs[b] = float(max(np.abs(g - w).max() for g, w in zip(got, want)))
    worst = float(np.max(list(diffs.values())))
    if not worst < tolerance:
        raise ExportCheckError(f"ONNX differs from PyTorch: max abs diff {worst:.3g} >= {tolerance:g} "
                               f"(batch sizes {list(batch_sizes)}; file kept: {path})")
    return {"max_abs_diff": worst, "per_batch": {str(b): d for b, d in diffs.items()}, "tolerance": tolerance,
            "batch_sizes": list(batch_sizes), "inputs": f"uniform [0,1], seed {seed}"}


def load_run_student(run_dir: Path) -> tuple[RunConfig, int, Path, Student]:
    """The run's config and its final global student (last checkpoint on disk)."""
    from fedus.evaluation.run_eval import final_checkpoint, load_run
    from fedus.models import load_state
    from fedus.site import initial_student

    summary, cfg = load_run(run_dir)
    rnd, ckpt = final_checkpoint(Path(run_dir), summary)
    student = initial_student(cfg)
    try:
        student.load_state_dict(load_state(ckpt))
    except RuntimeError as err:
        raise ConfigError(f"{ckpt} does not fit the run's student ({cfg.student.arch}): "
                          f"{str(err).splitlines()[0][:200]}") from None
    return cfg, rnd, ckpt, student


def export_run(run_dir: Path, out: Path | None = None) -> dict:
    """Write the run's final global student encoder as ONNX and check it; returns what was written and checked."""
    run_dir = Path(run_dir)
    cfg, rnd, ckpt, student = load_run_student(run_dir)
    out = Path(out) if out else run_dir / f"student-encoder-round-{rnd:03d}.onnx"
    encoder = Encoder(student)
    size = cfg.data.image_size
    export_onnx(encoder, out, size, {"student": cfg.student.arch, "round": str(rnd), "checkpoint": ckpt.name,
                                     "teacher": cfg.teacher.arch, "teacher_source": cfg.teacher.source})
    return {"onnx": str(out), "round": rnd, "checkpoint": ckpt.name, "student": cfg.student.arch, "image_size": size,
            "params": encoder.n_params, "check": check_onnx(encoder, out, size)}
