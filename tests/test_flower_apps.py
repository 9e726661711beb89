"""The Flower adapters, called directly (no Ray, no SuperLink)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.replies import EgressViolation, build_reply
from fedus.config import RunConfig
from fedus.runs import RunRecorder
from fedus.site import get_site, initial_student
from server.strategy import FedusFedAvg
from wire import reply_arrays, server_message, site_reply


def _context(cfg, partition=0):
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition, "num-partitions": 2},
                   state=RecordDict(), run_config=cfg.to_flat())


def _instruction(cfg, kind, server_round=1):
    student = initial_student(cfg)
    return server_message(student.state_dict(), {"server-round": server_round}, cfg.federation.transfer_dtype,
                          kind), student


def _strings(record_dict):
    for record in record_dict.config_records.values():
        for value in record.values():
            yield from (value if isinstance(value, list) else [value])


def test_train_reply_carries_only_student_arrays_and_metrics(tiny_cfg, task_identity, synthetic_manifest):
    tiny_cfg = tiny_cfg.with_overrides(["train.lr=1e-3"])  # 4 steps at the 1e-4 default barely move the loss
    msg, student = _instruction(tiny_cfg, MessageType.TRAIN)
    reply = client_app(msg, _context(tiny_cfg))
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    arrays = reply_arrays(reply, msg)
    expected = student.state_dict()
    assert set(arrays) == set(expected)
    assert all(arrays[k].shape == v.shape for k, v in expected.items())
    size = tiny_cfg.data.image_size
    for k, v in arrays.items():  # nothing image-shaped (HxW of the input) left
        assert tuple(v.shape[-2:]) != (size, size), k
    metrics = dict(content["metrics"])
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["loss_after"] < metrics["loss_before"], (metrics["loss_before"], metrics["loss_after"])
    corpus_dir = str(synthetic_manifest.parent)
    for s in _strings(content):
        if isinstance(s, str):
            assert "/" not in s and corpus_dir not in s and not s.endswith(".png"), s


def test_evaluate_reply_has_common_metrics_and_site_scores(tiny_cfg, task_identity):
    msg, _ = _instruction(tiny_cfg, MessageType.EVALUATE, server_round=0)
    reply = client_app(msg, _context(tiny_cfg, partition=1))
    assert not reply.has_error(), reply.error
    assert set(reply.content["metrics"].keys()) == {"cos", "mse", "num-examples", "eval_seconds", "startup_seconds"}
    assert {"cls_acc", "seg_dice", "teacher_cls_acc"} <= set(reply.content["site-scores"].keys())
    assert "arrays" not in reply.content


def test_egress_guard_refuses_images_paths_and_foreign_arrays(task_identity, tmp_path):
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    ok = {"num-examples": 8}  # an allowed metric, so each case is refused for its own reason
    with pytest.raises(EgressViolation, match="do not match the student"):
        build_reply(msg, ok, {"name": "a"}, {"image": torch.zeros(64, 64)}, {"w": torch.Size([3])})
    with pytest.raises(EgressViolation, match="looks like a path"):
        build_reply(msg, ok, {"name": str(tmp_path)})
    with pytest.raises(EgressViolation, match="allow-list"):
        build_reply(msg, {"per_image": [0.1, 0.2]}, {"name": "a"})
    with pytest.raises(EgressViolation, match="allow-list|long list"):
        build_reply(msg, ok, {"name": "a", "ids": [f"x{i}" for i in range(100)]})


def _reply(arrays, n, name):
    return site_reply(arrays, n, name)


def test_fedavg_of_two_sites_is_the_example_weighted_mean(tiny_cfg, task_identity, tmp_path):
    recorder = RunRecorder(tmp_path / "run", tiny_cfg, {})
    strategy = FedusFedAvg(tiny_cfg.with_overrides(["federation.transfer-dtype=fp32"]), recorder, min_train_nodes=1,
                           min_available_nodes=1)
    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.array([1.0, 2.0], np.float32)}
    b = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.array([5.0, -2.0], np.float32)}
    strategy.sent = ArrayRecord({k: torch.zeros(v.shape) for k, v in a.items()})  # what configure_train sent
    arrays, metrics = strategy.aggregate_train(1, [_reply({k: torch.from_numpy(v) for k, v in a.items()}, 30, "A"),
                                                   _reply({k: torch.from_numpy(v) for k, v in b.items()}, 10, "B")])
    out = arrays.to_torch_state_dict()
    assert torch.equal(out["b"], torch.tensor([2.0, 1.0]))  # (30*[1,2] + 10*[5,-2]) / 40, exact in fp32
    ref = (30 * a["w"].astype(np.float64) + 10 * b["w"].astype(np.float64)) / 40
    np.testing.assert_allclose(out["w"].numpy(), ref, rtol=1e-6, atol=1e-7)
    assert metrics["num-examples"] == 40
    summary = recorder.summary["rounds"][0]
    assert set(summary["train"]) == {"A", "B"} and summary["checkpoint"] == "global-round-001.safetensors"
    assert (tmp_path / "run" / "global-round-001.safetensors").is_file()


def test_a_failed_site_does_not_stop_the_round(tiny_cfg, task_identity, tmp_path):
    from flwr.app import Error

    recorder = RunRecorder(tmp_path / "run", tiny_cfg, {})
    strategy = FedusFedAvg(tiny_cfg.with_overrides(["federation.transfer-dtype=fp32"]), recorder, min_train_nodes=1,
                           min_available_nodes=1)
    strategy.sent = ArrayRecord({"w": torch.zeros(3)})
    good = _reply({"w": torch.ones(3)}, 10, "A")
    failed = Message(Error(code=0, reason="site crashed"),
                     reply_to=Message(RecordDict(), dst_node_id=2, message_type=MessageType.TRAIN))
    arrays, _ = strategy.aggregate_train(1, [good, failed])
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.ones(3))
    assert recorder.summary["rounds"][0]["aggregate"] == {"train_sites_replied": 1, "train_sites_failed": 1}


def test_deployed_site_reads_its_own_manifest(tiny_cfg, task_identity, synthetic_manifest, tmp_path):
    """Deployment: node_config names the site and its manifest; every row there is the site's."""
    import pandas as pd

    rows = pd.read_csv(synthetic_manifest, dtype=str, keep_default_na=False)
    own = rows[rows["center"] == rows["center"].iloc[0]].copy()
    for col in ("image_path", "mask_path"):
        own[col] = [str(synthetic_manifest.parent / p) if p else "" for p in own[col]]
    own["center"] = "whatever the scanner export says"
    own.to_csv(tmp_path / "manifest.csv", index=False)
    msg, _ = _instruction(tiny_cfg, MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=tiny_cfg.to_flat(),
                      node_config={"site-name": "hospital-a", "data-path": str(tmp_path)})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    site = dict(reply.content["site"])
    assert site["name"] == "hospital-a" and site["n_train"] + site["n_test"] == len(own)


def test_each_site_sends_its_data_card_and_the_report_shows_it(tiny_cfg, task_identity, tmp_path):
    import json

    from client.replies import site_facts
    from fedus.intake.card import check_card
    from fedus.reports.sections import card_rows
    from fedus.site import Site

    site = Site(tiny_cfg, 0)
    facts = site_facts(site.name, site.describe())
    card = check_card(json.loads(facts["data_card"]))
    n = len(site.data.train_rows) + len(site.data.test_rows)
    assert card["images"] == (n if n >= 5 else "<5")
    assert all(sum(v for v in values.values() if isinstance(v, int)) == n for values in card["by"].values()), card
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type=MessageType.EVALUATE)
    reply = build_reply(msg, {"cos": 0.5, "num-examples": 3}, facts)
    assert json.loads(reply.content["site"]["data_card"]) == card

    small = json.loads(facts["data_card"]) | {"files": 2}  # a count under k must not leave
    with pytest.raises(EgressViolation):
        build_reply(msg, {"cos": 0.5, "num-examples": 3}, facts | {"data_card": json.dumps(small)})
    pathy = json.loads(facts["data_card"])
    pathy["by"]["model"] = {"/srv/pacs/patient-17": 9}
    with pytest.raises(EgressViolation):
        build_reply(msg, {"cos": 0.5, "num-examples": 3}, facts | {"data_card": json.dumps(pathy)})

    rows = card_rows({"sites": {site.name: dict(reply.content["site"])}})
    assert rows[0][0] == site.name
    # the synthetic generator records its simulated scanner as intake would: the report names it
    assert f"model: {site.data.train_rows['model'].iloc[0]} ({card['files']})" in rows[0][-1]
    assert "not recorded" not in rows[0][-1] and "{" not in rows[0][-1]


def test_coreset_query_sends_only_a_histogram_and_train_keeps_its_share(tiny_cfg, task_identity):
    """Query: the site scores its images with the student sent and answers with bin counts and their
    sum only; the scores stay in the node's state, and the next train message's keep count is used."""
    cfg = tiny_cfg.with_overrides(["coreset.enabled=true", "coreset.bins=8", "coreset.warmup-steps=1"])
    context = _context(cfg)
    msg, _ = _instruction(cfg, MessageType.QUERY)
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"coreset"}
    record = dict(reply.content["coreset"])
    n_train = len(get_site(cfg, 0).data.train)
    assert set(record) == {"histogram", "count"} and len(record["histogram"]) == 8
    assert sum(record["histogram"]) == record["count"] == n_train
    assert len(context.state["coreset-scores"].to_torch_state_dict()["scores"]) == n_train  # kept at the site
    train, _ = _instruction(cfg, MessageType.TRAIN)
    train.content["config"]["coreset-threshold"], train.content["config"]["coreset-keep"] = 0.5, 5
    metrics = dict(client_app(train, context).content["metrics"])
    assert metrics["coreset_kept"] == 5 and metrics["num-examples"] == 5


def _loopback_run(cfg: RunConfig, run_dir) -> tuple[dict, list[str]]:
    """The real ServerApp main and ClientApp over two sites, in one process (tests/loopback.py): the run
    record, and the kinds of the messages the sites received."""
    import json

    from server.app import main as server_main
    from tests.loopback import LoopbackGrid

    cfg = cfg.with_overrides([f'run-dir="{run_dir}"'])
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": 2},
                           state=RecordDict(), run_config=cfg.to_flat()) for i, n in enumerate((21, 22))}
    grid = LoopbackGrid(client_app, contexts)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat()))
    return json.loads((run_dir / "summary.json").read_text()), [m.metadata.message_type for m in grid.received]


def test_evaluate_every_skips_federated_evaluation_between_rounds(tiny_cfg, task_identity, tmp_path):
    """federation.evaluate-every = 2 over 3 rounds, evaluate messages of their own: evaluation at rounds 0, 2
    and 3 (the last) only, so round 1 costs each site one message instead of two; its wall time is still recorded."""
    cfg = tiny_cfg.with_overrides(["rounds=3", "federation.evaluate-every=2", "federation.evaluate-with-train=false",
                                   "federation.min-sites=2", 'eval.probe-rounds=""'])
    summary, kinds = _loopback_run(cfg, tmp_path / "run")
    rounds = {e["round"]: e for e in summary["rounds"]}
    assert summary["status"] == "completed" and sorted(rounds) == [0, 1, 2, 3]
    assert [r for r in rounds if "eval" in rounds[r]] == [0, 2, 3]
    assert all(len(rounds[r]["eval"]) == 2 for r in (0, 2, 3))
    assert all(len(rounds[r]["train"]) == 2 and rounds[r]["aggregate"]["round_wall_s"] > 0 for r in (1, 2, 3))
    assert kinds.count(MessageType.EVALUATE) == 6 and kinds.count(MessageType.TRAIN) == 6
    from fedus.reports.report import write_report

    write_report(tmp_path / "run")  # per-round curves with a round that has no evaluation
    assert "round" in (tmp_path / "run" / "report" / "rounds.csv").read_text()


def test_evaluation_carried_by_train_messages_equals_separate_evaluation(tiny_cfg, task_identity, tmp_path):
    """evaluate-with-train (the default): each round's global student is scored by the next round's train
    message, only the last by an evaluate message of its own - 2 rounds cost each site 3 messages, not 5.
    The run record is the same as with separate evaluate messages: every round's per-site scores (probes
    and the teacher's at round 0 included) and the final student, bit for bit."""
    from fedus.models.weights import load_state

    cfg = tiny_cfg.with_overrides(["rounds=2", "federation.min-sites=2", 'eval.probe-rounds="0"'])
    runs = {}
    for carried in (True, False):
        run_dir = tmp_path / f"carried-{carried}"
        summary, kinds = _loopback_run(cfg.with_overrides([f"federation.evaluate-with-train={str(carried).lower()}"]),
                                       run_dir)
        assert summary["status"] == "completed"
        final = load_state(run_dir / "global-round-002.safetensors")
        runs[carried] = ({e["round"]: e for e in summary["rounds"]}, kinds, final)
    (with_train, kinds, final), (apart, kinds_apart, final_apart) = runs[True], runs[False]
    assert kinds.count(MessageType.TRAIN) == 4 and kinds.count(MessageType.EVALUATE) == 2
    assert kinds_apart.count(MessageType.TRAIN) == 4 and kinds_apart.count(MessageType.EVALUATE) == 6
    assert sorted(with_train) == sorted(apart) == [0, 1, 2]
    for r in range(3):
        assert len(apart[r]["eval"]) == 2 and with_train[r]["eval"].keys() == apart[r]["eval"].keys(), r
        for site, scores in apart[r]["eval"].items():
            carried = with_train[r]["eval"][site]
            assert carried.keys() - {"startup_seconds"} == scores.keys() - {"startup_seconds"}, (r, site)
            assert all(carried[k] == scores[k] for k in scores if not k.endswith("_seconds")), (r, site)
        assert (with_train[r]["aggregate"]["eval_sites_replied"], with_train[r]["aggregate"]["eval_sites_failed"]) == (2, 0)
    assert all(any(k.startswith("teacher_") for k in scores) for scores in with_train[0]["eval"].values())
    assert all(torch.equal(final[k], final_apart[k]) for k in final_apart)
