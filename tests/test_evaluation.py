"""Evaluation protocol: label-fraction subsets, kNN, the stage decoder, offline checkpoint scoring."""

import json

import numpy as np
import pytest
import torch

from fedus.config import ConfigError, RunConfig
from fedus.evaluation.decoder import decoder_probe
from fedus.evaluation.fractions import label_fraction_subset, parse_fractions
from fedus.evaluation.knn import knn_accuracy
from fedus.evaluation.protocol import evaluate_checkpoint, evaluate_models
from fedus.models.weights import save_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny heads: one intra-op thread (see conftest)


FAST = ["eval.label-fractions=\"0.5,1.0\"", "eval.seeds=2", "eval.decoder-steps=15", "eval.decoder-stages=2"]


def test_label_fraction_subset_stratified_and_group_whole():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), rng.integers(1, 6, 100))  # 100 patients, 1-5 images each
    labels = (np.arange(100) % 4 == 0).astype(int)[groups]  # 25 % minority class, constant per group
    for frac in (0.05, 0.1, 0.2, 0.5):
        for seed in range(3):
            idx = label_fraction_subset(labels, groups, frac, seed)
            chosen = np.isin(groups, groups[idx])
            assert np.array_equal(np.flatnonzero(chosen), idx)  # every group wholly in or wholly out
            for c in (0, 1):  # each class near its own fraction, never absent
                n_c = (labels == c).sum()
                assert 1 <= (labels[idx] == c).sum() <= max(frac * n_c + 5, 5)
                assert abs((labels[idx] == c).sum() - frac * n_c) <= 5
    assert len(label_fraction_subset(labels, groups, 1.0, 0)) == len(labels)
    a, b = (label_fraction_subset(labels, groups, 0.2, s) for s in (1, 2))
    assert not np.array_equal(a, b)  # seeds draw different subsets
    assert parse_fractions("1.0, 0.05,0.5") == [0.05, 0.5, 1.0]
    with pytest.raises(ConfigError):
        parse_fractions("0,2")


def test_knn_separable_is_one_and_random_is_chance():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 10
    y = np.repeat(np.arange(3), 60)
    x = centres[y] + rng.normal(size=(180, 16))
    assert knn_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    xr, yr = rng.normal(size=(600, 16)), rng.integers(0, 2, 600)
    assert 0.4 < knn_accuracy(xr[:400], yr[:400], xr[400:], yr[400:]) < 0.6
    assert knn_accuracy(xr, np.zeros(600, int), xr, yr) is None


def _squares(n, gen):
    masks = torch.zeros(n, 1, 32, 32)
    for i in range(n):
        r, c = torch.randint(0, 20, (2,), generator=gen).tolist()
        masks[i, :, r:r + 10, c:c + 10] = 1
    return masks


def test_decoder_learns_learnable_mask_not_impossible_one():
    gen = torch.Generator().manual_seed(0)
    masks = _squares(48, gen)
    fine = torch.nn.functional.avg_pool2d(masks, 4) + 0.05 * torch.randn(48, 1, 8, 8, generator=gen)
    stages = [torch.cat([fine, torch.randn(48, 3, 8, 8, generator=gen)], 1), torch.randn(48, 8, 4, 4, generator=gen)]
    good = decoder_probe([s[:36] for s in stages], masks[:36], [s[36:] for s in stages], masks[36:], steps=150, lr=1e-2)
    assert good["dice"] > 0.8 and good["iou"] > 0.65
    noise = [torch.randn_like(s) for s in stages]  # masks independent of the features
    bad = decoder_probe([s[:36] for s in noise], masks[:36], [s[36:] for s in noise], masks[36:], steps=150, lr=1e-2)
    assert bad["dice"] < 0.4
    assert decoder_probe([s[:4] for s in stages], torch.zeros(4, 1, 32, 32), stages, masks, steps=2) == {}


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg.with_overrides(FAST)


def test_protocol_rows_and_checkpoint_reproduces_in_memory_student(cfg, tmp_path):
    from fedus.site import Site

    site = Site(cfg, 0)
    torch.manual_seed(1)
    student = site.student()
    with torch.no_grad():  # a "trained" student that differs from the random init
        for p in student.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {k: v.clone() for k, v in student.state_dict().items()}
    in_memory = evaluate_models(cfg, site, state, models=("student", "random_init"))
    ckpt = save_state(state, tmp_path / "global-round-002.safetensors")
    offline = evaluate_checkpoint(cfg, ckpt, 0, models=("student", "random_init"))
    assert offline["rows"] == in_memory["rows"]
    rows = [r for r in offline["rows"] if r["model"] == "student"]
    fractions, seeds = {0.5, 1.0}, {0, 1}
    for task, metrics in (("cls", {"acc", "macro_f1", "balanced_acc"}), ("seg", {"dice", "iou"})):
        got = {(r["metric"], r["fraction"], r["seed"]) for r in rows if r["task"] == task}
        assert got == {(m, f, s) for m in metrics for f in fractions for s in seeds}
    assert any(r["task"] == "knn" for r in rows)
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    summ = {(s["model"], s["task"], s["metric"], s["fraction"]): s for s in offline["summary"]}
    assert summ[("student", "cls", "acc", 0.5)]["n"] == 2
    assert not any(r["model"] == "teacher" for r in offline["rows"])


def test_bad_fraction_config_is_one_line_error():
    with pytest.raises(ConfigError) as err:
        RunConfig().with_overrides(["eval.label-fractions=\"0.1,1.5\""])
    assert "\n" not in str(err.value)


def test_evaluate_run_feeds_every_report_section(cfg, tmp_path):
    """`fedus evaluate` on a run dir (config + final checkpoint) -> evaluation.json -> report pictures and table."""
    from fedus.evaluation.run_eval import evaluate_run
    from fedus.reports import write_report
    from fedus.reports.report import SECTIONS
    from fedus.site import Site

    cfg = cfg.with_overrides(["eval.seeds=1", "eval.label-fractions=\"1.0\"", "eval.embedding-per-site=8"])
    names = [Site(cfg, i).name for i in (0, 1)]
    save_state(Site(cfg, 0).student().state_dict(), tmp_path / "global-round-001.safetensors")
    (tmp_path / "summary.json").write_text(json.dumps({
        "status": "completed", "config": cfg.to_dict(), "sites": {n: {} for n in names},
        "rounds": [{"round": 1, "checkpoint": "global-round-001.safetensors"}]}))
    evaluation = json.loads(evaluate_run(tmp_path, sites=names[:1] + names[1:]).read_text())
    assert set(evaluation["sites"]) == set(names) and evaluation["round"] == 1
    assert {r["model"] for r in evaluation["sites"][names[0]]["rows"]} == {"teacher", "student", "random_init"}
    assert set(evaluation["embedding"]["teacher"]["centre"]) == set(names)
    page = write_report(tmp_path)["report_html"].read_text()
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in page
    assert page.count('src="data:image/png;base64,') == 3


def test_last_round_evaluate_carries_the_protocol_as_scalars(cfg):
    """eval.protocol-at = last: the ClientApp's last-round evaluate adds 'le:' scalars; other rounds stay cheap."""
    from fedus.evaluation.protocol import from_metrics
    from fedus.site import Site

    cfg = cfg.with_overrides(["rounds=2", "eval.protocol-at=last", "eval.seeds=1", "eval.probe-rounds=\"0\""])
    site = Site(cfg, 1)
    state = site.student().state_dict()
    assert not any(k.startswith("le:") for k in site.evaluate(state, 1))
    metrics = site.evaluate(state, 2)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    rows = from_metrics(metrics)
    assert {r["model"] for r in rows} == {"teacher", "student", "random_init"}
    assert {(r["task"], r["fraction"]) for r in rows} >= {("cls", 0.5), ("cls", 1.0), ("seg", 1.0), ("knn", 1.0)}
