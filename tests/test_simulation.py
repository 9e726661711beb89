"""End to end through the real CLI and Flower's simulation runtime (Ray), as a user runs it.

Each test gets a private run dir, FLWR_HOME and synthetic-data cache, and checks
afterwards that no process it started is still alive.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from cli_runs import alive_for, cli_env, run_cli

pytestmark = pytest.mark.flower


def _sites(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "report" / "sites.csv") as f:
        return list(csv.DictReader(f))


def test_demo_runs_without_corpus_or_weights_and_every_site_learns(tmp_path):
    run_dir = tmp_path / "demo"
    proc, seconds = run_cli(["demo", "--run-dir", str(run_dir)], cli_env(tmp_path, None), timeout=600)
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
    assert not alive_for(run_dir)


def test_secure_aggregation_runs_on_flowers_runtime_and_the_student_still_learns(tmp_path):
    """SecAgg+ through the real SuperLink and SuperNodes (serialised messages, Flower's simulation runtime);
    the protocol's numbers are checked in tests/test_secure_aggregation.py."""
    run_dir = tmp_path / "secagg"
    proc, seconds = run_cli(["simulate", "--scenario", "synthetic-devices", "--rounds", "2", "--fit-teacher-steps", "5",
                          "--image-size", "32", "--run-dir", str(run_dir), "--set", "data.synthetic-images-per-centre=40",
                          "--set", "train.local-steps=4", "--set", "federation.min-sites=3",
                          "--set", "secure-aggregation.enabled=true", "--set", 'eval.probe-rounds="0"'],
                         cli_env(tmp_path, None), timeout=600)
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
    assert not alive_for(run_dir)


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
                             env=cli_env(tmp_path, None) | {"FEDUS_CACHE": str(shared_cache)})
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_unreadable_weights_are_one_line_error(tmp_path, fedus_cli):
    junk = tmp_path / "teacher.safetensors"
    junk.write_bytes(os.urandom(256))
    code, _, stderr = fedus_cli("simulate", "--scenario", "synthetic-devices", "--teacher-weights", junk,
                             "--run-dir", tmp_path / "r", env=cli_env(tmp_path, None))
    assert code == 2 and "cannot load weights" in stderr and "Traceback" not in stderr
