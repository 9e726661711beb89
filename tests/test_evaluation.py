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


def test_evaluate_run_references_matrix_unseen_centre_and_every_report_section(cfg, tmp_path, monkeypatch):
    """`fedus evaluate` on a run dir whose second centre was held out (leave-one-centre-out): the protocol
    for teacher / federated / local / central / random init, the cross-site matrix with the unseen centre
    as a column, and every report section (pictures included) rendered from it."""
    import csv

    from fedus.evaluation.run_eval import evaluate_run
    from fedus.reports import write_report
    from fedus.reports.report import SECTIONS
    from fedus.site import Site

    cfg = cfg.with_overrides(["eval.seeds=1", "eval.label-fractions=\"1.0\"", "eval.embedding-per-site=8", "train.lr=1e-3",
                              "rounds=2"])
    names = [Site(cfg, i).name for i in (0, 1)]
    cfg = cfg.with_overrides({"data.held-out": names[1]})
    assert Site(cfg, 0).name == names[0]
    with pytest.raises(ConfigError, match="out of range"):
        Site(cfg, 1).data  # the held-out centre is no partition of the federation
    start = Site(cfg, 0).student().state_dict()
    for r in (0, 2):  # an untrained "federated" student: the references must move past it
        save_state(start, tmp_path / f"global-round-00{r}.safetensors")
    (tmp_path / "summary.json").write_text(json.dumps({
        "status": "completed", "config": cfg.to_dict(), "sites": {names[0]: {}},
        "rounds": [{"round": r, "checkpoint": f"global-round-00{r}.safetensors"} for r in (0, 2)]}))
    import fedus.evaluation.cross_site as cross_site
    import fedus.evaluation.run_eval as run_eval

    second_passes = []  # feature passes after the protocol's own: only for students the protocol never saw
    for module in (cross_site, run_eval):
        monkeypatch.setattr(module, "extract", lambda *a, _f=module.extract, _m=module.__name__, **k:
                            second_passes.append(_m) or _f(*a, **k))
    evaluation = json.loads(evaluate_run(tmp_path).read_text())
    # the unseen centre's matrix column needs the local student of names[0] (train + test); nothing else
    assert second_passes == ["fedus.evaluation.cross_site"] * 2, second_passes
    assert list(evaluation["sites"]) == names and evaluation["held_out"] == [names[1]] and evaluation["round"] == 2
    own, unseen = ({r["model"] for r in evaluation["sites"][n]["rows"]} for n in names)
    assert own == {"teacher", "student", "local", "central", "random_init"}
    assert unseen == {"teacher", "student", "central", "random_init"}  # no local student where nothing trained
    assert evaluation["references"]["private"] is False
    cells = evaluation["cross_site"]
    assert {(c["model"], c["site"]) for c in cells} == {(m, n) for m in ("federated", f"local:{names[0]}", "central") for n in names}
    cos = {(c["model"], c["site"]): c["value"] for c in cells if c["metric"] == "cos"}
    for n in names:  # 2 rounds of the site step (local) and of pooled steps (central) moved towards the teacher
        assert cos[(f"local:{names[0]}", n)] > cos[("federated", n)] + 0.01, (n, cos)
        assert cos[("central", n)] > cos[("federated", n)] + 0.01, (n, cos)
    assert {c["metric"] for c in cells} >= {"cos", "knn_acc", "cls_balanced_acc"}
    assert set(evaluation["embedding"]["teacher"]["centre"]) == set(names)
    paths = write_report(tmp_path)
    page = paths["report_html"].read_text()
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in page
    assert page.count('src="data:image/png;base64,') == 4  # per-round, label efficiency, matrix heat map, t-SNE
    assert f"{names[1]} (unseen)" in page and "never saw it" in page
    with open(paths["cross_site_csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(cells)


def test_finetuning_trains_a_copy_of_the_encoder_for_both_tasks(cfg):
    """eval.finetune: the encoder trains with its head (the training loss falls, the weights move), the
    evaluated model itself is untouched, and the protocol gains cls-ft / seg-ft rows per fraction and seed."""
    from fedus.evaluation.finetune import finetune
    from fedus.site import Site

    site = Site(cfg, 0)
    model = site.student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ecfg = cfg.eval.model_copy(update={"finetune_steps": 40, "finetune_lr": 1e-3, "batch_size": 16})
    train, test = site.data.train, site.data.test
    for task, tr, te in (("cls", np.flatnonzero(train.labels.numpy() >= 0), np.flatnonzero(test.labels.numpy() >= 0)),
                         ("seg", np.flatnonzero(train.has_mask.numpy()), np.flatnonzero(test.has_mask.numpy()))):
        assert len(tr) > 10 and len(te) > 2, task
        scores, losses = finetune(model, task, train, tr, test, te, len(site.data.classes), ecfg, 0, site.device)
        assert set(scores) == ({"acc", "macro_f1", "balanced_acc"} if task == "cls" else {"dice", "iou"})
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, (task, losses[:8], losses[-8:])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ft = cfg.with_overrides(["eval.finetune=true", "eval.finetune-steps=3", "eval.seeds=1"])
    rows = evaluate_models(ft, site, before, models=("student",))["rows"]
    got = {(r["task"], r["fraction"]) for r in rows}
    assert got >= {(t, f) for t in ("cls", "seg", "cls-ft", "seg-ft") for f in (0.5, 1.0)}


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


def test_teacher_agreements_score_many_students_with_one_teacher_pass(tiny_cfg):
    """The cross-site matrix scores every produced student on a site: the teacher (the costly
    model) must run once per held-out batch, and each cosine must equal the one-student form."""
    from fedus.evaluation.site_eval import teacher_agreement, teacher_agreements
    from fedus.site import Site, initial_student

    site = Site(tiny_cfg, 0)
    students = {f"s{seed}": initial_student(tiny_cfg.with_overrides([f"seed={seed}"]), site.teacher)
                for seed in range(3)}
    cpu, batch = torch.device("cpu"), 8
    calls = []
    hook = site.teacher.register_forward_hook(lambda *_: calls.append(1))
    together = teacher_agreements(students, site.teacher, site.data, batch, cpu)
    batches = -(-len(site.data.test) // batch)
    assert len(calls) == batches  # not one pass per student
    hook.remove()
    for name, student in students.items():
        alone = teacher_agreement(student, site.teacher, site.data, batch, cpu)
        assert together[name] == pytest.approx(alone, rel=1e-5)
    assert len({round(v["cos"], 6) for v in together.values()}) == 3  # three different students, three scores
