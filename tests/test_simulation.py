"""End to end through the real CLI and Flower's simulation runtime (Ray), as a user runs it.

Each test gets a private run dir, FLWR_HOME and synthetic-data cache, and checks
afterwards that no process it started is still alive.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedus.processes import flower_home_pids

pytestmark = pytest.mark.flower
FEDUS = [sys.executable, "-m", "fedus"]


def _env(tmp_path: Path, corpus: str | None) -> dict[str, str]:
    # no OMP_NUM_THREADS: the CLI's own work (teacher fit, offline evaluation) uses the cores as a user's
    # would, and Ray gives each ClientApp actor one thread (its CPU share) by itself
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"FEDUS_CACHE": str(tmp_path / "cache")}
    env["FEDUS_CORPUS"] = corpus or str(tmp_path / "no-corpus-here")
    return env


def _alive_for(run_dir: Path) -> list[int]:
    return flower_home_pids(run_dir / "flwr-home")


def _run(args: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(FEDUS + args, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _sites(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "report" / "sites.csv") as f:
        return list(csv.DictReader(f))


def test_demo_runs_without_corpus_or_weights_and_every_site_learns(tmp_path):
    run_dir = tmp_path / "demo"
    proc, seconds = _run(["demo", "--run-dir", str(run_dir)], _env(tmp_path, None), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"fedus demo took {seconds:.0f} s")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert "not a foundation model" in summary["provenance"]["teacher"]["source"]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    assert all((run_dir / f"global-round-{r:03d}.safetensors").is_file() for r in range(4))
    rows = _sites(run_dir)
    assert len(rows) == 3
    for row in rows:  # distillation worked at every site: the student moved towards the teacher
        assert float(row["cos_final"]) > float(row["cos_round0"]) + 0.2, row["site"]
    # ...and carried label information over: at every site the federated student's linear probe beats the
    # random-init student's, and the stand-in teacher is worth distilling (~96 held-out images per site)
    for row in rows:
        f1 = {k: float(row[f"{k}_cls_f1"]) for k in ("teacher", "student", "random_init")}
        assert f1["student"] > f1["random_init"] and f1["teacher"] > f1["random_init"] + 0.05, (row["site"], f1)
    html = (run_dir / "report" / "report.html").read_text()
    assert "not a foundation model" in html and "synthetic" in html
    assert not _alive_for(run_dir)


def test_secure_aggregation_runs_on_flowers_runtime_and_the_student_still_learns(tmp_path):
    """SecAgg+ through the real SuperLink and SuperNodes (serialised messages, Flower's simulation runtime);
    the protocol's numbers are checked in tests/test_secure_aggregation.py."""
    run_dir = tmp_path / "secagg"
    proc, seconds = _run(["simulate", "--scenario", "synthetic-devices", "--rounds", "2", "--fit-teacher-steps", "5",
                          "--image-size", "32", "--run-dir", str(run_dir), "--set", "data.synthetic-images-per-centre=40",
                          "--set", "train.local-steps=4", "--set", "federation.min-sites=3",
                          "--set", "secure-aggregation.enabled=true", "--set", 'eval.probe-rounds="0"'],
                         _env(tmp_path, None), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"secure-aggregation simulation took {seconds:.0f} s")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    trained = [r for r in summary["rounds"] if r["round"] > 0]
    assert [r["aggregate"].get("secure_aggregation") for r in trained] == [1, 1]
    assert all(r.get("checkpoint") and len(r["train"]) == 3 for r in trained)
    for row in _sites(run_dir):
        assert float(row["cos_final"]) > float(row["cos_round0"]) + 0.2, row["site"]
    assert "Secure aggregation (SecAgg+" in (run_dir / "report" / "report.md").read_text()
    assert not _alive_for(run_dir)


@pytest.mark.corpus
def test_leave_one_centre_out_on_the_public_corpus_gives_one_row_per_held_out_centre(tmp_path, corpus):
    """`fedus loco`: four federations of three centres (tiny settings), each scored on the centre it never saw.
    Also the public-corpus simulation check: at every training site of every fold the distillation loss falls."""
    run_dir = tmp_path / "loco"
    args = ["loco", "--scenario", "public-corpus-by-center", "--rounds", "1", "--run-dir", str(run_dir),
            "--fit-teacher-steps", "20", "--set", "data.max-images-per-site=64", "--set", "train.local-steps=4",
            "--set", "data.image-size=32", "--set", "eval.seeds=1", "--set", 'eval.label-fractions="1.0"',
            "--set", "eval.decoder-steps=20", "--set", "eval.embedding-per-site=0", "--set", "eval.probe-rounds=\"0\""]
    proc, seconds = _run(args, _env(tmp_path, str(corpus)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"leave-one-centre-out took {seconds:.0f} s")
    centres = {"busi", "ddti_roi", "hc18", "pocus_lung"}
    with open(run_dir / "loco.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["held_out"] for r in rows} == centres
    for centre in centres:
        fold = run_dir / f"held-out-{centre}"
        summary = json.loads((fold / "summary.json").read_text())
        trained = [set(r["train"]) for r in summary["rounds"] if "train" in r]
        assert trained == [centres - {centre}], (centre, trained)  # the held-out centre never trained...
        for site, train in next(r["train"] for r in summary["rounds"] if "train" in r).items():
            assert train["loss_after"] < train["loss_before"], (centre, site, train)
        assert "manifest" in summary["provenance"]["data"]["source"]
        assert summary["config"]["data"]["held-out"] == centre
        teacher = summary["provenance"]["teacher"]["source"]
        assert f"{centre} held out" in teacher and "not a foundation model" in teacher  # ...nor fitted the fold's stand-in teacher (fedus.teacher_fit)
        mine = [r for r in rows if r["held_out"] == centre]
        assert len({(r["task"], r["metric"]) for r in mine}) == len(mine)  # one row per centre and metric
        assert all(r["student_mean"] and r["teacher_mean"] and r["random_init_mean"] for r in mine)
        assert "Unseen centres" in (fold / "report" / "report.html").read_text()
    hc18 = {r["task"] for r in rows if r["held_out"] == "hc18"}
    assert "seg" in hc18 and "cls" not in hc18  # HC18 has masks, no class labels
    assert not any(_alive_for(run_dir / f"held-out-{c}") for c in centres)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One FEDUS_CACHE for the user-mistake cases: the synthetic corpus some of them read is made once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("args, message", [
    (["simulate", "--scenario", "public-corpus-by-center"], "FEDUS_CORPUS"),
    (["simulate", "--scenario", "synthetic-devices", "--teacher", "vit_not_a_model"], "unknown timm model"),
    (["simulate", "--scenario", "synthetic-devices", "--teacher-weights", "/nonexistent/w.safetensors"], "not found"),
    (["simulate", "--scenario", "nope"], "unknown scenario"),
    (["simulate", "--scenario", "synthetic-devices", "--set", "train.lr=-3"], "train.lr"),
    (["report", "/nonexistent-run"], "no summary.json"),
    (["simulate", "--resume", "/nonexistent-run"], "not a fedus simulation run"),
    (["loco", "--scenario", "synthetic-devices", "--centre", "nowhere"], "no centre 'nowhere'"),
    (["simulate", "--scenario", "synthetic-devices", "--set", "data.held-out=nowhere"], "data.held-out names no site"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, message, fedus_cli, shared_cache):
    code, _, stderr = fedus_cli(*(args + ["--run-dir", str(tmp_path / "r")] if args[0] in ("simulate", "loco") else args),
                             env=_env(tmp_path, None) | {"FEDUS_CACHE": str(shared_cache)})
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_unreadable_weights_are_one_line_error(tmp_path, fedus_cli):
    junk = tmp_path / "teacher.safetensors"
    junk.write_bytes(os.urandom(256))
    code, _, stderr = fedus_cli("simulate", "--scenario", "synthetic-devices", "--teacher-weights", junk,
                             "--run-dir", tmp_path / "r", env=_env(tmp_path, None))
    assert code == 2 and "cannot load weights" in stderr and "Traceback" not in stderr
