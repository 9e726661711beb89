"""`fedus loco` end to end on the public corpus, through Flower's simulation runtime (Ray)."""

from __future__ import annotations

import csv
import json

import pytest
from cli_runs import alive_for, cli_env, run_cli

pytestmark = pytest.mark.flower


@pytest.mark.corpus
def test_leave_one_centre_out_on_the_public_corpus_gives_one_row_per_held_out_centre(tmp_path, corpus):
    """`fedus loco`: four federations of three centres (tiny settings), each scored on the centre it never saw.
    Also the public-corpus simulation check: at every training site of every fold the distillation loss falls."""
    run_dir = tmp_path / "loco"
    args = ["loco", "--scenario", "public-corpus-by-center", "--rounds", "1", "--run-dir", str(run_dir),
            "--fit-teacher-steps", "20", "--set", "data.max-images-per-site=64", "--set", "train.local-steps=4",
            "--set", "data.image-size=32", "--set", "eval.seeds=1", "--set", 'eval.label-fractions="1.0"',
            "--set", "eval.decoder-steps=20", "--set", "eval.embedding-per-site=0", "--set", "eval.probe-rounds=\"0\""]
    proc, seconds = run_cli(args, cli_env(tmp_path, str(corpus)), timeout=900)
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
    assert not any(alive_for(run_dir / f"held-out-{c}") for c in centres)
