"""Deployment figures: ONNX export of a run's student encoder, and teacher/student latency, params, GFLOPs."""

import json
import signal
import sys

import numpy as np
import onnx
import pytest
import timm
import torch
from typer.testing import CliRunner

from fedus.cli import app, main
from fedus.config import RunConfig
from fedus.export import TOLERANCE, Encoder, ExportCheckError, check_onnx, export_run, ort_session
from fedus.latency import compare_latency, models_from_archs
from fedus.models import load_state
from fedus.runs import RunRecorder
from fedus.site import initial_student

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (see conftest)


@pytest.fixture(scope="module", params=["resnet10t", "vit_tiny_patch16_224"])
def run_dir(request, tmp_path_factory):
    """A run dir as the server leaves it: summary.json + a round-0 and a (different) round-2 global checkpoint."""
    cfg = RunConfig().with_overrides(["teacher.arch=vit_tiny_patch16_224", f"student.arch={request.param}",
                                      "student.head-hidden=16", f"data.image-size={SIZE}"])
    path = tmp_path_factory.mktemp(f"run-{request.param}")
    rec = RunRecorder(path, cfg, {"teacher": {"arch": cfg.teacher.arch}})
    student = initial_student(cfg)
    rec.checkpoint(0, student.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():  # "trained": every weight and BatchNorm statistic moved
        for t in student.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    rec.checkpoint(2, student.state_dict())
    rec.finish()
    return path


def _pytorch_encoder(run_dir, rnd):
    cfg = RunConfig.from_dict(json.loads((run_dir / "summary.json").read_text())["config"])
    student = initial_student(cfg)
    student.load_state_dict(load_state(run_dir / f"global-round-{rnd:03d}.safetensors"))
    return student.eval()


def test_onnx_matches_pytorch_at_two_batch_sizes(run_dir):
    done = export_run(run_dir)
    path = run_dir / "student-encoder-round-002.onnx"
    assert done["onnx"] == str(path) and done["round"] == 2 and done["check"]["max_abs_diff"] < TOLERANCE
    batch_dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch axis
    final, first = _pytorch_encoder(run_dir, 2), _pytorch_encoder(run_dir, 0)
    session = ort_session(path)
    for batch in (1, 5):
        x = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        fmap, emb = session.run(["feature_map", "embedding"], {"image": x.numpy()})
        with torch.no_grad():
            want = final.encode(x)
            other = first.encode(x)
        assert fmap.shape == tuple(want.shape) and emb.shape == (batch, want.shape[1])
        assert np.abs(fmap - want.numpy()).max() < 1e-4
        assert np.abs(emb - want.mean((2, 3)).numpy()).max() < 1e-4
        assert np.abs(fmap - other.numpy()).max() > 1e-2  # it is the final round's student, not round 0's


def test_check_rejects_a_graph_of_another_model(run_dir, tmp_path):
    export_run(run_dir, tmp_path / "enc.onnx")
    with pytest.raises(ExportCheckError) as err:
        check_onnx(Encoder(_pytorch_encoder(run_dir, 0)), tmp_path / "enc.onnx", SIZE)
    assert "max abs diff" in str(err.value) and "\n" not in str(err.value)


def test_latency_params_and_flops_ratios():
    teacher, student, prov = models_from_archs("vit_tiny_patch16_224", "resnet10t", SIZE)
    r = compare_latency(teacher, student, SIZE, prov, warmup=1, runs=3)
    n_teacher = sum(p.numel() for p in teacher.backbone.parameters())
    n_student = sum(p.numel() for p in student.backbone.parameters())
    assert (r["teacher"]["params"], r["student"]["params"]) == (n_teacher, n_student)
    assert r["ratios"]["params"] == pytest.approx(n_student / n_teacher)
    assert r["ratios"]["gflops"] == pytest.approx(r["student"]["gflops"] / r["teacher"]["gflops"])
    # ViT-Tiny/16 by hand: patch conv, then per block 2 FLOPs per weight per token and 4*N^2*D of attention
    n, d, depth = (SIZE // 16) ** 2 + 1, 192, 12
    linear_weights = d * 3 * d + d * d + d * 4 * d + 4 * d * d
    by_hand = 2 * 3 * 16 * 16 * d * (n - 1) + depth * (2 * n * linear_weights + 4 * n * n * d)
    assert r["teacher"]["gflops"] * 1e9 == pytest.approx(by_hand)
    for side in ("teacher", "student"):
        lat = r[side]["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"]
    assert r["image_size"] == SIZE and r["machine"]["cpu_count"] and r["teacher"]["weights"].startswith("random init")
    assert r["machine"]["libraries"]["timm"] == timm.__version__  # versions that move figures are recorded


def test_latency_of_a_cnn_teacher_whose_last_blocks_differ_in_width():
    """A ResNet's default taps (its last two stages: 256 and 512 channels) cannot be averaged; the latency
    command takes any timm teacher, so it concatenates them."""
    teacher, student, prov = models_from_archs("resnet18", "resnet10t", SIZE)
    r = compare_latency(teacher, student, SIZE, prov, warmup=0, runs=2)
    assert teacher.dim == 256 + 512 and prov["teacher"]["blocks"] == "default, concatenated"
    assert r["teacher"]["params"] == sum(p.numel() for p in teacher.backbone.parameters())
    assert 0 < r["ratios"]["gflops"] < 1


def test_cli_export_and_latency_on_a_run_dir(run_dir, tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["export", str(run_dir), "--onnx", "--out", str(tmp_path / "s.onnx")])
    assert out.exit_code == 0 and "OK" in out.output and (tmp_path / "s.onnx").is_file()
    out = runner.invoke(app, ["bench", "latency", str(run_dir), "--runs", "2", "--warmup", "0", "--out", str(tmp_path / "l.json")])
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "l.json").read_text())
    assert "global-round-002" in result["student"]["weights"] and result["image_size"] == SIZE


def test_cli_bad_arch_is_one_line(fedus_cli):
    code, _, err = fedus_cli("bench", "latency", "--teacher", "vit_tiny_patch16_244", "--student", "resnet10t",
                             "--image-size", "32")
    assert code == 2 and "vit_tiny_patch16_224" in err  # the typo, and a suggestion
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("summary", [None, "{not json", '{"rounds": []}'])
def test_cli_not_a_run_dir_is_one_line(summary, tmp_path, monkeypatch, capsys):
    """Through `main()` as the `fedus` script runs it (in-process: a fresh interpreter costs ~6 s here)."""
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    monkeypatch.setattr(sys, "argv", ["fedus", "export", str(tmp_path), "--onnx"])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main() installs a SIGTERM handler: not in pytest's process
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(tmp_path) in err and len(err.strip().splitlines()) == 1, err


def test_cli_usage_mistakes(tmp_path):
    runner = CliRunner()
    for args in (["bench", "latency", str(tmp_path), "--teacher", "vit_tiny_patch16_224"], ["bench", "latency"],
                 ["export", str(tmp_path)]):
        out = runner.invoke(app, args)
        assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1, out.output
