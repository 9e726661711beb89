"""Federated coreset selection (fedus.coreset): the server's budget arithmetic, what may leave a
site, planted junk dropped first, and coreset vs random subset."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.replies import EgressViolation, build_reply
from fedus.coreset import fuse, histogram, plan_budget, select, suppress_small_bins, token_grad_norms
from fedus.coreset import quality
from fedus.coreset.feature import as_images
from fedus.coreset.planted import plant
from fedus.distill.losses import StepInputs, create_loss, token_mse
from fedus.runs import RunRecorder
from fedus.site import Site, get_site, initial_student
from server.strategy import KEEP_KEY, THRESHOLD_KEY, FedusFedAvg


def test_budget_is_global_and_split_by_the_histograms():
    # site A's scores sit high, site B's low: a 25 % global budget is all A's
    plan = plan_budget([[0] * 6 + [10, 10], [10, 10] + [0] * 6], 0.25)
    assert (plan.target, plan.kept, plan.keep, plan.total) == (10, 10, [10, 0], 40)
    assert 7 / 8 <= plan.threshold < 1
    # the threshold falls 80 % into the top bin (8 of its 10 images): each site keeps 80 % of its own
    # top-bin images, rounded so the counts add up to the target exactly
    plan = plan_budget([[0, 4, 4], [0, 2, 6]], 0.5)
    assert plan.threshold == pytest.approx((3 - 0.8) / 3) and plan.keep == [3, 5]
    assert plan_budget([[3, 1], [0, 2]], 1.0).keep == [4, 2]


def test_cluster_quotas_keep_a_rare_appearance():
    rng = np.random.default_rng(0)
    clusters = np.array([0] * 90 + [1] * 10)
    scores = np.concatenate([rng.uniform(0.5, 1.0, 90), rng.uniform(0.0, 0.4, 10)])  # the rare cluster scores low
    redundant = np.zeros(100, bool)
    redundant[95:] = True  # copies never fill a quota
    assert not np.any(clusters[select(scores, clusters, 20, quota=0.0)] == 1)
    kept = select(scores, clusters, 20, quota=1.0, redundant=redundant)
    assert len(kept) == 20 and np.sum(clusters[kept] == 1) == 2 and not redundant[kept].any()
    assert set(kept[clusters[kept] == 1]) <= set(range(90, 95))


def test_fuse_prefers_prototypes_or_hard_images_and_always_drops_lone_noisy_and_copied_ones():
    # images: 0 near its centre, small gradient; 1 far, large gradient; both steady. 2 alone in its
    # cluster (distance inf), 3 a copy, 4 far with a large but oscillating gradient, 5..9 filler
    distance = np.array([0.1, 0.9, np.inf, 0.1, 0.9, 0.4, 0.5, 0.5, 0.6, 0.3])
    redundant = np.arange(10) == 3
    grad_mean = np.array([0.1, 2.0, 1.0, 0.1, 2.0, 0.5, 0.8, 0.6, 1.2, 0.7])
    grad_var = (grad_mean * np.array([0.05, 0.05, 0.05, 0.05, 3.0, 0.3, 0.3, 0.3, 0.3, 0.3])) ** 2
    rep = fuse(distance, redundant, grad_mean, grad_var)
    hard = fuse(distance, redundant, grad_mean, grad_var, prefer="hard")
    assert np.array_equal(rep, fuse(distance, redundant, grad_mean, grad_var, prefer="representative"))
    assert rep.argmax() == 0 and hard.argmax() == 1
    assert rep[0] > rep[1] and hard[1] > hard[0]
    for prefer, scores in (("representative", rep), ("hard", hard)):
        assert scores[3] == 0.0  # a copy, whatever its ranks
        feature_only = fuse(distance, redundant, grad_mean, grad_var, quality_weight=0.0, prefer=prefer)
        assert feature_only[2] == 0.0  # alone in its cluster: the worst feature rank either way
        quality_only = fuse(distance, redundant, grad_mean, grad_var, feature_weight=0.0, prefer=prefer)
        assert quality_only[4] < quality_only[1]  # same mean gradient as 1, but oscillating


def test_query_reply_is_only_counts_per_bin(task_identity):
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type=MessageType.QUERY)
    reply = build_reply(msg, {}, {}, histogram=[0, 6, 5, 0])
    assert set(reply.content.keys()) == {"coreset"}
    assert dict(reply.content["coreset"]) == {"histogram": [0, 6, 5, 0], "count": 11}
    for bad in ([0.1, 0.9, 0.4], list(range(100)), [1, -1], [True, False], [7]):  # scores, per-image lengths, ...
        with pytest.raises(EgressViolation):
            build_reply(msg, {}, {}, histogram=bad)
    # small-cell suppression, the second line: a bin of 1..k-1 images does not leave (k = 5 unless told)
    for small in ([0, 3, 5, 2], [0, 4, 0, 0], [6, 0, 0, 1]):
        with pytest.raises(EgressViolation, match="fewer than 5"):
            build_reply(msg, {}, {}, histogram=small)
    assert dict(build_reply(msg, {}, {}, histogram=[4, 0, 0, 0]).content["coreset"])["count"] == 4  # bin 0: says nothing
    assert dict(build_reply(msg, {}, {}, histogram=[0, 3, 5, 2], min_bin_count=0).content["coreset"])["count"] == 10
    with pytest.raises(EgressViolation):
        build_reply(msg, {}, {}, histogram=[0, 6, 7, 1], min_bin_count=2)


def test_small_bins_merge_downwards_keeping_edges_and_total():
    # from the top: 4 + 9 -> bin 6; 1 + 0 + 2 + 6 -> bin 2; the bottom 3 are left under k, so they
    # and the lowest group go to bin 0 - every image at or below its own bin
    assert suppress_small_bins([3, 0, 6, 2, 0, 1, 9, 4], 5) == [12, 0, 0, 0, 0, 0, 13, 0]
    assert suppress_small_bins([0, 7, 5, 0], 5) == [0, 7, 5, 0]  # nothing small: untouched
    assert suppress_small_bins([0, 3, 0, 1], 5) == [4, 0, 0, 0]  # fewer than k in all: bin 0
    assert suppress_small_bins([0, 3, 5, 2], 0) == [0, 3, 5, 2]  # k = 0: off
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = (rng.poisson(rng.uniform(0, 6), 32) * (rng.random(32) < 0.6)).tolist()
        k = int(rng.integers(2, 8))
        sent = suppress_small_bins(counts, k)
        assert sum(sent) == sum(counts)
        assert not any(0 < c < k for c in sent) or sent[0] == sum(counts) < k
        # never more images above any bin edge than there are: the server's threshold cannot rise
        assert (np.cumsum(sent[::-1]) <= np.cumsum(counts[::-1])).all()


@pytest.mark.parametrize("budget", [0.1, 0.2])
def test_suppressed_histograms_plan_the_budget_within_tolerance(budget):
    """40 federations of 3 sites (60-400 images, fused scores of random ranks), 32 bins, k = 5: every
    site's exact histogram has small bins. With them merged, the plan still keeps exactly the target;
    its threshold is at or below the exact histograms' one; each site's keep count is within k - 1 of
    the exact plan's; and the images whose true score is at or above the threshold are within 10 % of
    the target (measured: <= 7.3 %; the exact histograms' own within-bin interpolation: <= 8.7 %)."""
    k = 5
    for seed in range(40):
        rng = np.random.default_rng(seed)
        sites = [fuse(rng.random(n), rng.random(n) < 0.05, rng.gamma(2.0, 1.0, n), rng.random(n))
                 for n in rng.integers(60, 400, 3)]
        exact = [histogram(s, 32) for s in sites]
        sent = [suppress_small_bins(h, k) for h in exact]
        assert all(any(0 < c < k for c in h) for h in exact)
        assert not any(0 < c < k for h in sent for c in h) and [sum(h) for h in sent] == [len(s) for s in sites]
        planned, ideal = plan_budget(sent, budget), plan_budget(exact, budget)
        assert planned.kept == planned.target == ideal.target == round(budget * sum(map(len, sites)))
        assert planned.threshold <= ideal.threshold
        assert max(abs(a - b) for a, b in zip(planned.keep, ideal.keep)) <= k - 1
        truly_above = sum(int(np.sum(s >= planned.threshold)) for s in sites)
        assert abs(truly_above - planned.target) <= 0.1 * planned.target, (seed, truly_above, planned.target)


def scoring_models(cfg, n=4):
    """Eval-mode round-0 student (with the losses' modules), the shared teacher and n images of site 0."""
    site = Site(cfg, 0)
    return site.student().eval(), site.teacher, site.data.train.images[:n]


@pytest.mark.usefixtures("one_thread")
def test_quality_rank_is_the_gradient_of_the_configured_loss(tiny_cfg):
    """Per-image gradient norms w.r.t. the projected tokens, of the loss mix the site step uses."""
    cpu = torch.device("cpu")
    student, teacher, raw = scoring_models(tiny_cfg)
    # token-mse (the default): each image's own gradient, whatever shares its batch
    norms = token_grad_norms(student, teacher, raw, 3, cpu)
    for i in range(len(raw)):
        x = as_images(raw[i:i + 1])
        with torch.no_grad():
            t, h = teacher(x), student.head(student.encode(x))
        h.requires_grad_(True)
        s = F.interpolate(h, size=student.teacher_grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        (g,) = torch.autograd.grad(token_mse(s, t), h)
        assert norms[i] == pytest.approx(g.norm().item(), rel=1e-4)
    # masked-consistency: scored by that loss (its masked and band-stopped views, consistency weights),
    # checked against the loss object's own gradient through the whole student, image 0 on its own
    cfg = tiny_cfg.with_overrides(['distill.loss="masked-consistency"'])
    student, teacher, raw = scoring_models(cfg)
    objective = quality.scoring_objective(cfg.distill)
    assert [(loss.name, w) for loss, w in objective.terms] == [("masked-consistency", 1.0)]
    mc = token_grad_norms(student, teacher, raw, 4, cpu, objective=objective, seed=7)
    outputs = []
    hook = student.head.register_forward_hook(lambda module, args, out: outputs.append(out))
    loss = create_loss("masked-consistency", cfg.distill)(
        StepInputs(student, teacher, [as_images(raw[:1])], torch.Generator().manual_seed(7))).loss
    hook.remove()
    own = torch.cat([g.flatten() for g in torch.autograd.grad(loss, outputs)]).norm().item()
    assert len(outputs) == 2 and mc[0] == pytest.approx(own, rel=1e-4)
    assert not np.allclose(mc, norms, rtol=0.1)
    # the warm-up scores the same way (its first scoring is `mc`) and trains with the same mix: one
    # step moves every image's norm
    mean, var = quality.warmup_grad_stats(student, teacher, raw, 1, 1e-3, 0.0, 4, 7, cpu, distill=cfg.distill)
    after = 2 * mean - mc
    np.testing.assert_allclose(var, ((after - mc) / 2) ** 2, rtol=1e-3, atol=1e-9)
    assert np.all(np.abs(after - mc) > 1e-4 * mc)


@pytest.mark.usefixtures("one_thread")
def test_batch_contrastive_loss_is_scored_by_its_token_mse_term(tiny_cfg, caplog, monkeypatch):
    """repulsive-kd has no per-image gradient (an image's row of P and Q depends on its whole batch): in
    the quality rank it counts as token-mse at its weight - its own base term - and a note is logged."""
    monkeypatch.setattr(quality, "_NOTED", set())
    cpu = torch.device("cpu")
    cfg = tiny_cfg.with_overrides(['distill.loss="repulsive-kd"'])
    student, teacher, raw = scoring_models(cfg)
    with caplog.at_level("WARNING", logger=quality.__name__):
        objective = quality.scoring_objective(cfg.distill)
    assert [(loss.name, w) for loss, w in objective.terms] == [("token-mse", 1.0)]
    assert "repulsive-kd" in caplog.text and "token-mse" in caplog.text
    np.testing.assert_array_equal(token_grad_norms(student, teacher, raw, 4, cpu, objective=objective),
                                  token_grad_norms(student, teacher, raw, 4, cpu))
    for spec, terms in (("masked-consistency:1,repulsive-kd:0.5", [("masked-consistency", 1.0), ("token-mse", 0.5)]),
                        ("token-mse:1,repulsive-kd:0.5", [("token-mse", 1.5)])):
        mixed = tiny_cfg.with_overrides([f'distill.loss="{spec}"']).distill
        assert [(loss.name, w) for loss, w in quality.scoring_objective(mixed).terms] == terms


def test_planted_duplicates_and_corrupted_frames_are_dropped_before_clean_images(tiny_cfg):
    site = Site(tiny_cfg, 0)
    kinds = np.array(plant(site.data.train, seed=0))
    clean = kinds == "clean"
    scored = site.coreset_scores(initial_student(tiny_cfg).state_dict(), 1)
    # every extra copy is redundant; of each group of identical images exactly one (the original) stays
    assert scored.redundant[kinds == "duplicate"].all() and not scored.redundant[clean].any()
    # ranking: a clean image outscores a planted one in >= 90 % of the pairs
    junk = scored.scores[~clean]
    auc = np.mean(scored.scores[clean][:, None] > junk[None, :])
    assert auc >= 0.9, auc
    # keeping half the clean count keeps no planted image at all
    kept = scored.select(int(clean.sum()) // 2, tiny_cfg.coreset.quota)
    assert clean[kept].all(), list(kinds[kept])


class InProcessGrid:
    """Delivers the ServerApp's messages to the real ClientApp in this process, one node per
    partition with its own state (the part of Flower's runtime a unit test can stand in for)."""

    def __init__(self, cfg, nodes: int):
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": nodes},
                                    state=RecordDict(), run_config=cfg.to_flat()) for n in range(1, nodes + 1)}
        self.sent: list[str] = []
        self.replies: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        self.sent += [m.metadata.message_type for m in messages]
        self.replies = [client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
        return self.replies


def test_server_queries_histograms_and_sends_each_site_its_keep_count(tiny_cfg, task_identity, tmp_path):
    cfg = tiny_cfg.with_overrides(["coreset.enabled=true", "coreset.budget=0.25", "coreset.rescore-every=2",
                                   "coreset.warmup-steps=1"])
    recorder = RunRecorder(tmp_path / "run", cfg, {})
    strategy = FedusFedAvg(cfg, recorder, min_train_nodes=2, min_available_nodes=2)
    grid = InProcessGrid(cfg, 2)
    arrays = ArrayRecord(initial_student(cfg).state_dict())
    n_train = sum(len(get_site(cfg, i).data.train) for i in range(2))
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"rounds": 2}), grid))
    assert grid.sent == [MessageType.QUERY] * 2
    sent = [list(r.content["coreset"]["histogram"]) for r in grid.replies]  # small bins merged at the site
    assert sum(map(sum, sent)) == n_train and not any(0 < c < cfg.coreset.min_bin_count for h in sent for c in h)
    keep = {m.metadata.dst_node_id: int(m.content["config"][KEEP_KEY]) for m in messages}
    assert sum(keep.values()) == round(0.25 * n_train)
    assert len({float(m.content["config"][THRESHOLD_KEY]) for m in messages}) == 1
    facts = recorder.summary["rounds"][0]["coreset"]
    assert facts["rescored"] and facts["kept"] == sum(keep.values()) and facts["total"] == n_train
    # round 2 is not a re-scoring round (every 2: rounds 1, 3, ...): no query, the same keep counts
    again = list(strategy.configure_train(2, arrays, ConfigRecord({"rounds": 2}), grid))
    assert grid.sent == [MessageType.QUERY] * 2
    assert {m.metadata.dst_node_id: int(m.content["config"][KEEP_KEY]) for m in again} == keep


def test_coreset_student_is_no_worse_than_a_random_subset_at_equal_steps(tiny_cfg):
    """20 % budget, equal steps, 3 seeds: held-out cosine to the teacher of the student trained on
    the coreset vs on a random subset of the same size (mean over seeds).

    Measured in bench/coreset.py (bench/results/coreset-cpu.json, 5 seeds): coreset minus random
    is +0.002 (3/5 seeds) with a fitted teacher, +0.007 (5/5) with planted junk, +0.000 (1/5)
    with the random-init teacher these tests use; with cine-like redundancy -0.003 (2/5). So this
    asserts what was measured - the selection costs at most a little agreement (tolerance 0.01) -
    not a gain that was not. The gain that was measured needs the demo's scale: `prefer = "hard"`
    re-scored every round of the demo's 3, +0.008 (stderr 0.003, 7/8 seeds; coreset-demo-rescore-cpu.json);
    at this size the same setting is -0.005 (3 seeds), so it is a benchmark figure, not a test."""
    cos = {"coreset": [], "random": []}
    for seed in range(3):
        cfg = tiny_cfg.with_overrides([f"seed={seed}", "train.local-steps=15", "train.lr=1e-3",
                                       "coreset.enabled=true", "coreset.budget=0.2"])
        site = Site(cfg, 0)
        start = initial_student(cfg).state_dict()
        scored = site.coreset_scores(start, 1)
        keep = plan_budget([scored.sent_histogram(cfg.coreset)], cfg.coreset.budget).keep[0]
        picks = {"coreset": scored.select(keep, cfg.coreset.quota),
                 "random": np.random.default_rng(seed).choice(len(site.data.train), keep, replace=False)}
        for name, pick in picks.items():
            state, metrics = site.train(start, 1, subset=pick)
            assert metrics["num-examples"] == keep == round(0.2 * len(site.data.train))
            cos[name].append(site.evaluate(state, 1)["cos"])
    mean = {name: float(np.mean(v)) for name, v in cos.items()}
    print(f"held-out cosine, 3 seeds: coreset {cos['coreset']} random {cos['random']} means {mean}")
    assert mean["coreset"] >= mean["random"] - 0.01, mean
