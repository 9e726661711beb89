"""Run report: numbers land in the right cells, provenance is verbatim, HTML is escaped."""

import csv
import html
import json

import pytest

from fedus.reports import write_report

SOURCE = ("teacher fitted here on synthetic-devices train split (supervised lesion class + mask, 2 epochs); "
          "not a foundation model")
EVIL = "<script>alert(1)</script>"


def _eval(cos, mse, **probes):
    return {"cos": cos, "mse": mse, "num-examples": 24, **probes}


def _train(before, after):
    return {"loss_before": before, "loss_after": after, "num-examples": 96, "steps": 20, "seconds": 4.1,
            "images_per_s": 230.0}


def _summary(status="completed"):
    """3 sites, rounds 0..2: site-a full; site-b no labels (seg only); EVIL no masks and missing in round 2."""
    teacher_a = {"teacher_cls_acc": 0.9, "teacher_cls_f1": 0.88, "teacher_seg_dice": 0.7, "teacher_seg_iou": 0.6}
    return {
        "fedus_version": "0.1.0", "status": status, "started": "2026-11-23T10:00:00Z",
        "finished": "2026-11-23T10:05:00Z" if status == "completed" else None,
        "scenario": "synthetic-devices", "config": {"seed": 0, "rounds": 2},
        "provenance": {
            "teacher": {"arch": "vit_tiny_patch16_224", "weights": "/abs/teacher.safetensors", "source": SOURCE,
                        "blocks": [10, 11]},
            "student": {"arch": "resnet18", "init": "random init, seed 0", "params": 11200000},
            "data": {"source": "synthetic (fedus built-in generator, seed 0)", "manifest": "/abs/manifest.csv",
                     "site_column": "center"},
            "splits": "per site, grouped by patient_id, test fraction 0.2, seed 0", "seed": 0,
        },
        "sites": {
            "site-a": {"n_train": 96, "n_test": 24, "classes": ["normal", "hypo", "hyper"], "has_masks": True},
            "site-b": {"n_train": 80, "n_test": 20, "classes": [], "has_masks": True},
            EVIL: {"n_train": 64, "n_test": 16, "classes": ["normal", "hypo"], "has_masks": False},
        },
        "rounds": [
            {"round": 0, "eval": {
                "site-a": _eval(0.01, 1.3, cls_acc=0.4, cls_f1=0.3, seg_dice=0.2, seg_iou=0.1, **teacher_a),
                "site-b": _eval(0.02, 1.4, seg_dice=0.25, seg_iou=0.15, teacher_seg_dice=0.8, teacher_seg_iou=0.7),
                EVIL: _eval(0.03, 1.5, cls_acc=0.6, cls_f1=0.5, teacher_cls_acc=0.95, teacher_cls_f1=0.9)}},
            {"round": 1, "train": {"site-a": _train(1.2, 0.8), "site-b": _train(1.1, 0.7), EVIL: _train(1.0, 0.9)},
             "eval": {"site-a": _eval(0.3, 0.9), "site-b": _eval(0.35, 0.85), EVIL: _eval(0.2, 1.0)},
             "aggregate": {"num_sites_replied": 3, "num_sites_failed": 0}},
            {"round": 2, "train": {"site-a": _train(0.7, 0.5), "site-b": _train(0.65, 0.45)},
             "eval": {"site-a": _eval(0.6, 0.5, cls_acc=0.8, cls_f1=0.75, seg_dice=0.6, seg_iou=0.45),
                      "site-b": _eval(0.55, 0.6, seg_dice=0.1, seg_iou=0.05)},
             "aggregate": {"num_sites_replied": 2, "num_sites_failed": 1}},
        ],
    }


@pytest.fixture
def report(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    return write_report(tmp_path)


def _rows(path):
    with path.open(newline="") as f:
        return {r["site"]: r for r in csv.DictReader(f)}


def test_files_exist(report, tmp_path):
    assert set(report) == {"sites_csv", "rounds_csv", "report_md", "report_html", "per_round_png"}
    for p in report.values():
        assert p.is_file() and p.parent == tmp_path / "report"


def test_sites_csv_values(report):
    rows = _rows(report["sites_csv"])
    assert list(rows) == ["site-a", "site-b", EVIL]
    a, b, evil = rows["site-a"], rows["site-b"], rows[EVIL]
    assert (float(a["cos_round0"]), float(a["cos_final"]), a["final_round"]) == (0.01, 0.6, "2")
    assert (float(a["mse_round0"]), float(a["mse_final"])) == (1.3, 0.5)
    assert (float(a["loss_first_round_before"]), float(a["loss_last_round_after"])) == (1.2, 0.5)
    assert (float(a["teacher_cls_acc"]), float(a["random_init_cls_acc"]), float(a["student_cls_acc"])) == (0.9, 0.4, 0.8)
    assert a["student_beats_random_seg_dice"] == "True" and float(a["student_seg_iou"]) == 0.45
    # site-b: no labels -> empty cls cells; its distilled seg probe got worse than random init.
    assert b["teacher_cls_acc"] == b["student_cls_acc"] == b["student_beats_random_cls_acc"] == ""
    assert float(b["teacher_seg_dice"]) == 0.8 and b["student_beats_random_seg_dice"] == "False"
    # EVIL: missing from round 2 -> final is its last recorded round; no student probe after round 0.
    assert (float(evil["cos_final"]), evil["final_round"], float(evil["loss_last_round_after"])) == (0.2, "1", 0.9)
    assert float(evil["random_init_cls_acc"]) == 0.6 and evil["student_cls_acc"] == ""
    assert evil["teacher_seg_dice"] == "" and evil["n_train"] == "64"


def test_rounds_csv_long_format(report):
    with report["rounds_csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["round", "site", "metric", "value"]
    got = {(r["round"], r["site"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("1", "site-a", "train_loss_before")] == 1.2
    assert got[("2", "site-b", "cos")] == 0.55
    assert got[("2", "", "aggregate_num_sites_failed")] == 1.0
    assert ("2", EVIL, "cos") not in got


def test_provenance_verbatim_and_escaped(report):
    md, page = report["report_md"].read_text(), report["report_html"].read_text()
    for text in (md, page):
        assert SOURCE in text
        assert "vit_tiny_patch16_224" in text and "random init, seed 0" in text and "synthetic-devices" in text
        assert text.index(SOURCE) < text.index("Per-site results")  # provenance comes first
        assert "INCOMPLETE" not in text
    assert EVIL not in page and html.escape(EVIL) in page
    assert "<script" not in page.lower()
    assert "n/a (no labels)" in md and "n/a (no masks)" in page


def test_png_valid(report):
    data = report["per_round_png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_incomplete_run_flagged(tmp_path):
    summary = _summary(status="running")
    summary["rounds"] = summary["rounds"][:1]  # only round 0 so far: no "final" values yet
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    paths = write_report(tmp_path)
    for key in ("report_md", "report_html"):
        assert "INCOMPLETE RUN" in paths[key].read_text()
    assert _rows(paths["sites_csv"])["site-a"]["cos_final"] == ""


def test_robust_to_sparse_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": [{"eval": {"x": {"cos": None}}}]}))
    paths = write_report(tmp_path)
    assert list(_rows(paths["sites_csv"])) == ["x"]
    assert "INCOMPLETE RUN" in paths["report_md"].read_text()
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")
