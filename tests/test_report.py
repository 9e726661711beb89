"""Run report: numbers land in the right cells, provenance is verbatim, HTML is escaped."""

import csv
import html
import json
import os
import shutil

import pytest

from fedus.reports import write_report
from fedus.reports.report import SECTIONS

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
                        "blocks": "10,11"},
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
    assert set(report) == {"sites_csv", "rounds_csv", "protocol_csv", "cross_site_csv", "report_md", "report_html", "per_round_png"}
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
        assert "blocks 10, 11" in text  # the setting "10,11" as a reader takes it (block indices)
        assert text.index(SOURCE) < text.index("Per-site results")  # provenance comes first
        assert "INCOMPLETE" not in text
    assert EVIL not in page and html.escape(EVIL) in page
    assert "<script" not in page.lower()
    assert "n/a (no labels)" in md and "n/a (no masks)" in page


def test_provenance_says_which_training_images_a_coreset_run_kept(tmp_path):
    summary = _summary()
    summary["config"]["coreset"] = {"enabled": False, "budget": 0.2}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert "every image of each site's train split (no coreset selection)" in write_report(tmp_path)["report_md"].read_text()
    summary["config"]["coreset"] = {"enabled": True, "budget": 0.2, "prefer": "hard", "rescore-every": 1}
    for r, kept in ((1, 48), (2, 47)):
        summary["rounds"][r]["coreset"] = {"rescored": True, "kept": kept, "total": 240}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    paths = write_report(tmp_path)
    for text in (paths["report_md"].read_text(), paths["report_html"].read_text()):
        assert ("a coreset (fedus.coreset): 20 % of all sites' training images, ranking 'hard', re-scored every "
                "1 round(s); kept round 1: 48 of 240; round 2: 47 of 240") in html.unescape(text)


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


def _evaluation():
    """evaluation.json as `fedus evaluate` writes it: site-a full protocol, site-b seg only."""
    def summ(site_rows):
        return [{"model": m, "task": t, "metric": k, "fraction": f, "n": 3, "mean": v, "std": 0.02}
                for m, t, k, f, v in site_rows]
    a = [(m, "cls", k, f, base * f ** 0.2) for m, base in (("teacher", 0.9), ("student", 0.8), ("local", 0.7),
                                                           ("central", 0.85), ("random_init", 0.4))
         for k in ("acc", "macro_f1", "balanced_acc") for f in (0.05, 0.1, 0.2, 0.5, 1.0)]
    a += [(m, "knn", "acc", 1.0, v) for m, v in (("teacher", 0.85), ("student", 0.7), ("random_init", 0.35))]
    b = [(m, "seg", k, f, base * f ** 0.3) for m, base in (("teacher", 0.7), ("student", 0.6), ("random_init", 0.2))
         for k in ("dice", "iou") for f in (0.05, 0.1, 0.2, 0.5, 1.0)]
    c = [(m, "cls", "acc", 1.0, v) for m, v in (("teacher", 0.88), ("student", 0.75), ("central", 0.8), ("random_init", 0.5))]
    xs = [float(i) for i in range(12)]
    models = ("federated", "local:site-a", "local:site-b", "central")
    cells = [{"model": m, "site": st, "metric": "cos", "value": 0.5 + 0.1 * i - 0.05 * j}
             for i, m in enumerate(models) for j, st in enumerate(("site-a", "site-b", "site-c"))]
    cells += [{"model": m, "site": st, "metric": "knn_acc", "value": 0.6} for m in models for st in ("site-a", "site-c")]
    return {"round": 2, "checkpoint": "global-round-002.safetensors", "held_out": ["site-c"], "cross_site": cells,
            "sites": {"site-a": {"site": "site-a", "rows": [], "summary": summ(a)},
                      "site-b": {"site": "site-b", "rows": [], "summary": summ(b)},
                      "site-c": {"site": "site-c", "rows": [], "summary": summ(c)}},
            "embedding": {m: {"x": xs, "y": xs[::-1], "centre": ["site-a"] * 6 + ["site-b"] * 6}
                          for m in ("teacher", "student")}}


def _section_text(page: str, name: str) -> str:
    start = page.index(f"<h2>{html.escape(name)}</h2>")
    return page[start:page.index("</section>", start)]


@pytest.fixture
def evaluated(tmp_path):
    summary = _summary()
    summary["privacy"] = {"site-a": {"epsilon_per_round": {"1": 0.5, "2": 0.4}, "epsilon_total": 0.9,
                                     "epsilon_budget": 8.0, "delta": 1e-3, "refused_rounds": {}}}
    summary["sites"]["site-a"]["data_card"] = {"images": 120, "devices": {"vendor-x": 120}}
    summary["config"] = {"seed": 0, "rounds": 2, "eval": {"label-fractions": "0.05,0.1,0.2,0.5,1.0", "seeds": 3,
                                                          "decoder-stages": 3, "decoder-width": 32,
                                                          "decoder-steps": 200, "knn-k": 10}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "evaluation.json").write_text(json.dumps(_evaluation()))
    return write_report(tmp_path)


def test_every_section_with_data(evaluated):
    page = evaluated["report_html"].read_text()
    md = evaluated["report_md"].read_text()
    for name in SECTIONS:
        assert f"<h2>{html.escape(name)}</h2>" in page and f"## {name}" in md
    for name in ("Label-efficiency curves", "Per-round curves", "Epsilon per round", "Embeddings (t-SNE)", "Cross-site matrix"):
        assert 'src="data:image/png;base64,' in _section_text(page, name)
    assert "not available" not in page
    results = _section_text(page, "Per-site results")
    # teacher / federated / local / central / random init, gaps to the teacher and to the central student
    assert ("<td>site-a</td><td>cls</td><td>acc</td><td>0.900 ± 0.020</td><td>0.800 ± 0.020</td><td>0.700 ± 0.020</td>"
            "<td>0.850 ± 0.020</td><td>0.400 ± 0.020</td><td>-0.100</td><td>-0.050</td><td>yes</td>") in results
    assert "<td>site-b</td><td>seg</td><td>dice</td>" in results and "<td>site-b</td><td>cls</td>" not in results
    assert "site-c" not in results  # a held-out centre is not one of the federation's sites...
    unseen = _section_text(page, "Unseen centres")  # ...it has its own section
    assert ("<td>site-c</td><td>cls</td><td>acc</td><td>0.880 ± 0.020</td><td>0.750 ± 0.020</td><td>0.800 ± 0.020</td>"
            "<td>0.500 ± 0.020</td><td>-0.130</td><td>yes</td>") in unseen
    matrix = _section_text(page, "Cross-site matrix")
    assert "<th>site-c (unseen)</th>" in matrix and "<td>local:site-b</td>" in matrix
    assert "<td>central</td><td>0.800</td><td>0.750</td><td>0.700</td>" in matrix  # cos row: one cell per site
    assert "<td>federated</td><td>0.600</td><td>n/a</td><td>0.600</td>" in matrix  # site-b has no class labels
    assert "0.900" in _section_text(page, "Privacy and update validation")
    assert "vendor-x" in _section_text(page, "Data cards")
    assert "label fractions 0.05,0.1,0.2,0.5,1.0" in _section_text(page, "Provenance")
    assert "Run config" in page and "<script" not in page.lower()
    with evaluated["protocol_csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 3 * 5 + 3 + 3 * 2 * 5 + 4
    with evaluated["cross_site_csv"].open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 4 * 3 + 4 * 2
    for key in ("label_efficiency_png", "embedding_png", "cross_site_png"):
        assert evaluated[key].read_bytes()[:4] == b"\x89PNG"


def test_every_section_renders_when_its_data_are_absent(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": []}))
    page = write_report(tmp_path)["report_html"].read_text()
    for name in SECTIONS:
        assert f"<h2>{html.escape(name)}</h2>" in page
    for name in ("Label-efficiency curves", "Privacy and update validation", "Data cards", "Embeddings (t-SNE)"):
        assert "not available in this run" in _section_text(page, name)
    assert "fedus evaluate" in _section_text(page, "Embeddings (t-SNE)")


def test_stale_pictures_removed_when_evaluation_gone(evaluated, tmp_path):
    (tmp_path / "evaluation.json").unlink()
    paths = write_report(tmp_path)
    assert "embedding_png" not in paths and not (tmp_path / "report" / "embedding.png").exists()


CHROMIUMS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "google-chrome-stable")
NO_CHROMIUM = ("no headless Chromium: install one (Debian: `apt-get install chromium`; `.ci/run` does this as root) "
               "or `python -m playwright install chromium` where cdn.playwright.dev is reachable")
# A closed network refuses Chromium's background connections; these keep it from trying.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _no_browser():
    """CI sets FEDUS_REQUIRE_CHROMIUM=1 so that a missing browser fails the render test instead of skipping it."""
    if os.environ.get("FEDUS_REQUIRE_CHROMIUM") == "1":
        pytest.fail(NO_CHROMIUM)
    pytest.skip(NO_CHROMIUM)


def test_html_renders_in_headless_chromium(evaluated, tmp_path):
    """Every section heading is visible with a real box, and every embedded picture decodes."""
    try:
        from playwright import sync_api as playwright
    except ImportError:
        _no_browser()
    binary = next((shutil.which(b) for b in CHROMIUMS if shutil.which(b)), None)
    shot = evaluated["report_html"].with_name("report-screenshot.png")
    with playwright.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        except Exception:  # noqa: BLE001 - no bundled browser and none on PATH
            _no_browser()
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(evaluated["report_html"].as_uri())
        page.wait_for_load_state("load")
        headings = page.eval_on_selector_all("h2", "els => els.map(e => [e.innerText.trim(), e.getBoundingClientRect().height])")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete && e.naturalWidth > 0])")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert [h for h, _ in headings] == list(SECTIONS) and all(height > 0 for _, height in headings)
    assert len(images) == 5 and all(ok for _, ok in images), images  # incl. the epsilon curves and the heat map
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def test_protocol_from_last_round_metrics(tmp_path):
    """eval.protocol-at = last: the sites' scalar 'le:' metrics fill the three-way table and the curves."""
    from fedus.evaluation.protocol import from_metrics, to_metrics

    summ = [s for s in _evaluation()["sites"]["site-a"]["summary"]]
    canon = lambda rows: sorted(tuple(sorted(r.items())) for r in rows)  # noqa: E731
    assert canon(from_metrics(to_metrics(summ))) == canon(summ)
    summary = _summary()
    summary["rounds"][-1]["eval"]["site-a"].update(to_metrics(summ))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    paths = write_report(tmp_path)
    page = paths["report_html"].read_text()
    assert "<td>site-a</td><td>cls</td><td>acc</td><td>0.900 ± 0.020</td>" in page
    assert "label_efficiency_png" in paths and "embedding_png" not in paths
    assert "not available in this run" in _section_text(page, "Embeddings (t-SNE)")


def test_malformed_evaluation_does_not_break_the_report(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    bad = {"sites": {"site-a": {"summary": [{"model": "student"}, {"model": "teacher", "task": "cls", "metric": "acc",
                                                                   "fraction": "x", "mean": 1}]}, "site-b": None}}
    (tmp_path / "evaluation.json").write_text(json.dumps(bad))
    page = write_report(tmp_path)["report_html"].read_text()
    assert "not available in this run" in _section_text(page, "Label-efficiency curves")


def _dp_run(tmp_path, privacy=True, central="server-fixed"):
    """A run recorded through RunRecorder as the strategy records it: site replies, ledgers, central DP facts.

    site-a's ledger already held some epsilon from an earlier run; site-b refuses round 2 (budget)."""
    from fedus.config import RunConfig
    from fedus.runs import RunRecorder

    cfg = RunConfig.from_dict({"scenario": "dp", "privacy": {"enabled": privacy}, "central-dp": {"mode": central}})
    rec = RunRecorder(tmp_path, cfg, {})
    rec.record_sites({"site-a": {"n_train": 100}, "site-b": {"n_train": 50}})
    a = {"epsilon_budget": 8.0, "delta": 1e-3}
    b = {"epsilon_budget": 2.0, "delta": 2e-3}
    replies = {1: {"site-a": a | {"epsilon_round": 0.5, "epsilon_total": 0.7},
                   "site-b": b | {"epsilon_round": 1.0, "epsilon_total": 1.0}},
               2: {"site-a": a | {"epsilon_round": 0.4, "epsilon_total": 1.1},
                   "site-b": b | {"refusal": "budget exhausted", "epsilon_total": 1.0}},
               3: {"site-a": a | {"epsilon_round": 0.3, "epsilon_total": 1.4},
                   "site-b": b | {"epsilon_round": 0.8, "epsilon_total": 1.8}}}
    for rnd, per_site in replies.items():
        rec.record(rnd, "train", {s: {"loss_before": 1.0, "loss_after": 0.5} for s in per_site})
        if privacy:
            rec.record_privacy(rnd, per_site)
        if central != "off":
            rec.record_counts(rnd, {"central_dp_epsilon": {1: 0.9, 2: 1.5, 3: 2.0}[rnd], "central_dp_delta": 1e-5})
    rec.finish()
    return write_report(tmp_path)


def test_epsilon_per_round_from_the_recorder(tmp_path):
    paths = _dp_run(tmp_path)
    page, md = paths["report_html"].read_text(), paths["report_md"].read_text()
    section = _section_text(page, "Epsilon per round")
    assert 'src="data:image/png;base64,' in section and paths["epsilon_png"].read_bytes()[:4] == b"\x89PNG"
    # cumulative per round: site-a from its ledger's prior 0.2; site-b refused round 2; central from the accountant
    for row in (("1", "0.700", "1.000", "0.900"), ("2", "1.100", "refused", "1.500"), ("3", "1.400", "1.800", "2.000")):
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" in section
        assert "| " + " | ".join(row) + " |" in md
    assert "δ per site: site-a 1.0e-03, site-b 2.0e-03" in section and "δ = 1.0e-05" in section
    assert "site-a: its ledger held ε = 0.200" in section
    with paths["rounds_csv"].open(newline="") as f:
        got = {(r["round"], r["site"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}
    assert got[("2", "site-a", "privacy_epsilon_cumulative")] == pytest.approx(1.1)
    assert got[("3", "site-b", "privacy_epsilon_round")] == 0.8 and got[("3", "site-b", "privacy_delta")] == 2e-3
    assert ("2", "site-b", "privacy_epsilon_cumulative") not in got
    assert got[("3", "", "aggregate_central_dp_epsilon")] == 2.0


def test_epsilon_section_of_a_run_without_dp(tmp_path):
    from fedus.reports.privacy import NO_DP

    paths = _dp_run(tmp_path, privacy=False, central="off")
    section = _section_text(paths["report_html"].read_text(), "Epsilon per round")
    assert html.escape(NO_DP) in section and "<img" not in section and "<table" not in section
    assert "epsilon_png" not in paths and NO_DP in paths["report_md"].read_text()
    assert "privacy_epsilon" not in paths["rounds_csv"].read_text()


def test_epsilon_section_when_dp_is_on_but_nothing_spent_yet(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"privacy": {"enabled": True}}, "rounds": [],
                                                       "privacy": {"s": {"refused_rounds": {"1": "no budget"}}}}))
    section = _section_text(write_report(tmp_path)["report_html"].read_text(), "Epsilon per round")
    assert "no epsilon has been recorded yet" in section and "used no differential privacy" not in section


def test_console_summary_fits_80_columns(tmp_path, monkeypatch):
    """The demo's closing table: every header readable (no "teac…") in an 80-column terminal."""
    import io

    import pandas as pd
    from rich.console import Console

    import fedus.cli as cli

    (tmp_path / "report").mkdir()
    cols = ["site", "cos_round0", "cos_final", "teacher_cls_f1", "random_init_cls_f1", "student_cls_f1",
            "random_init_seg_dice", "student_seg_dice"]
    rows = [[f"synthetic-centre-{i}", 0.4123, 0.8123, 0.9, 0.5, 0.8, 0.3, 0.6] for i in range(3)]
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "report" / "sites.csv", index=False)
    monkeypatch.setattr(cli, "console", Console(width=80, file=io.StringIO(), record=True))
    cli._print_summary(tmp_path)
    text = cli.console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for word in ("teacher", "student", "random", "final", "synthetic-centre-2", "0.812"):
        assert word in text


@pytest.mark.parametrize("summary", [None, "{not json", "[1, 2]"])
def test_report_of_a_folder_that_is_not_a_run_is_one_line(summary, tmp_path, fedus_cli):
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    code, _, err = fedus_cli("report", tmp_path)
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "report").exists()
