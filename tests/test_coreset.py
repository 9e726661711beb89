"""Federated coreset selection (fedus.coreset): the server's budget arithmetic, what may leave a
site, planted junk dropped first, and coreset vs random subset."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.replies import EgressViolation, build_reply
from fedus.coreset import histogram, plan_budget, select
from fedus.coreset.planted import plant
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


def test_query_reply_is_only_counts_per_bin(task_identity):
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type=MessageType.QUERY)
    reply = build_reply(msg, {}, {}, histogram=[0, 3, 5, 2])
    assert set(reply.content.keys()) == {"coreset"}
    assert dict(reply.content["coreset"]) == {"histogram": [0, 3, 5, 2], "count": 10}
    for bad in ([0.1, 0.9, 0.4], list(range(100)), [1, -1], [True, False], [7]):  # scores, per-image lengths, ...
        with pytest.raises(EgressViolation):
            build_reply(msg, {}, {}, histogram=bad)


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

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        self.sent += [m.metadata.message_type for m in messages]
        return [client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


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
    is +0.002 (4/5 seeds) with a fitted teacher, +0.005 (5/5) with planted junk, but -0.003
    (0/5) with the random-init teacher these tests use. So this asserts what was measured - the
    selection costs at most a little agreement (tolerance 0.01) - not a gain that was not."""
    cos = {"coreset": [], "random": []}
    for seed in range(3):
        cfg = tiny_cfg.with_overrides([f"seed={seed}", "train.local-steps=15", "train.lr=1e-3",
                                       "coreset.enabled=true", "coreset.budget=0.2"])
        site = Site(cfg, 0)
        start = initial_student(cfg).state_dict()
        scored = site.coreset_scores(start, 1)
        keep = plan_budget([histogram(scored.scores, cfg.coreset.bins)], cfg.coreset.budget).keep[0]
        picks = {"coreset": scored.select(keep, cfg.coreset.quota),
                 "random": np.random.default_rng(seed).choice(len(site.data.train), keep, replace=False)}
        for name, pick in picks.items():
            state, metrics = site.train(start, 1, subset=pick)
            assert metrics["num-examples"] == keep == round(0.2 * len(site.data.train))
            cos[name].append(site.evaluate(state, 1)["cos"])
    mean = {name: float(np.mean(v)) for name, v in cos.items()}
    print(f"held-out cosine, 3 seeds: coreset {cos['coreset']} random {cos['random']} means {mean}")
    assert mean["coreset"] >= mean["random"] - 0.01, mean
