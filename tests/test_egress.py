"""Egress audit: every ClientApp handler, driven in-process with a tiny config, against the allow-list
of client/replies.py. Whatever a handler sends must be on the list (record names, keys, value types),
no string may carry a file name, path, patient id, UID or date from the site's manifest, and arrays
leave only as the student that was sent. A key planted in a handler's output must be refused."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.replies import MAX_LIST, RECORDS, VALUE_TYPES, EgressViolation, allowed_key, build_reply
from fedus.config import RunConfig
from fedus.site import initial_student
from server.central_dp import KEY_BELOW_CLIP, KEY_CLIPPING_NORM
from server.strategy import EVAL_ROUND_KEY, KEEP_KEY, SITE_RECORD, THRESHOLD_KEY
from tests.conftest import TINY
from fedus.transfer import reply_layouts, unpack
from wire import server_message

pytestmark = pytest.mark.usefixtures("one_thread", "task_identity")

FAST = TINY + ["train.local-steps=2", "eval.seg-probe-steps=5"]
DP = ["privacy.enabled=true", "privacy.noise-multiplier=1.2"]
UID = re.compile(r"\d+(\.\d+){3,}")  # a DICOM UID's shape
DATE = re.compile(r"(19|20)\d\d-?[01]\d-?[0-3]\d")


@pytest.fixture(scope="module")
def site_dir(synthetic_manifest, tmp_path_factory):
    """A deployed site's own manifest, shaped like `fedus data scan` output: absolute paths, pseudonymised
    study / series ids, a source path and a UID per row."""
    rows = pd.read_csv(synthetic_manifest, dtype=str, keep_default_na=False)
    own = rows[rows["center"] == rows["center"].iloc[0]].copy()
    for col in ("image_path", "mask_path"):
        own[col] = [str(synthetic_manifest.parent / p) if p else "" for p in own[col]]
    n = len(own)
    own["source_path"] = [f"/pacs/export/2023-04-0{i % 9 + 1}/IM{i:05d}.dcm" for i in range(n)]
    own["source_hash"] = [f"{i:040x}" for i in range(n)]
    own["study_id"] = [f"st{i // 4:06d}" for i in range(n)]
    own["series_id"] = [f"se{i // 2:06d}" for i in range(n)]
    own["sop_instance_uid"] = [f"1.2.826.0.1.3680043.8.498.{1000 + i}" for i in range(n)]
    own["manufacturer"], own["model"] = "Acme", "Sono 1"
    path = tmp_path_factory.mktemp("site-a")
    own.to_csv(path / "manifest.csv", index=False)
    return path


@pytest.fixture(scope="module")
def forbidden(synthetic_manifest, site_dir) -> set[str]:
    """Every identifying string in both manifests: paths, file names, patient / study / series ids, UIDs."""
    out = {str(synthetic_manifest), str(synthetic_manifest.parent), str(site_dir)}
    for manifest in (synthetic_manifest, site_dir / "manifest.csv"):
        rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        for col in rows.columns:
            if col.endswith(("_path", "_id", "_uid")):
                values = [v for v in rows[col] if v]
                out.update(values)
                if col.endswith("_path"):
                    out.update(v.replace("\\", "/").rsplit("/", 1)[-1] for v in values)  # file names
    return out


def _message(cfg: RunConfig, kind: str, server_round: int = 1, **config) -> tuple[Message, dict]:
    sent = initial_student(cfg).state_dict()
    return server_message(sent, {"server-round": server_round, **config}, cfg.federation.transfer_dtype, kind), sent


def _context(cfg: RunConfig, **node) -> Context:
    node = node or {"partition-id": 0, "num-partitions": 2}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_flat())


@pytest.fixture(scope="module")
def replies(synthetic_manifest, site_dir, tmp_path_factory) -> dict[str, tuple[Message, dict]]:
    """One reply per kind of message a site answers, with the student it was sent."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # conftest's task_identity, module-wide
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_thread: tiny models on a shared box
    base = RunConfig().with_overrides(FAST + [f'data.manifest="{synthetic_manifest}"'])
    tmp = tmp_path_factory.mktemp("egress")
    out = {}

    def run(name, msg_sent, context):
        msg, sent = msg_sent
        out[name] = (client_app(msg, context), sent)

    run("train", _message(base, MessageType.TRAIN),
        _context(base, **{"site-name": "hospital-a", "data-path": str(site_dir)}))
    dp = base.with_overrides(DP + [f'privacy.ledger-dir="{tmp / "ledgers"}"'])
    run("train-refused", _message(dp, MessageType.TRAIN),
        _context(dp, **{"partition-id": 0, "num-partitions": 2, "epsilon-budget": 1e-6,
                        "privacy-ledger": str(tmp / "refusing.json")}))
    run("train-dp", _message(dp, MessageType.TRAIN),
        _context(dp, **{"partition-id": 1, "num-partitions": 2, "epsilon-budget": 100.0,
                        "privacy-ledger": str(tmp / "training.json")}))
    run("evaluate", _message(base, MessageType.EVALUATE, server_round=0), _context(base))  # probes + teacher's
    run("train-evaluates", _message(base, MessageType.TRAIN, **{EVAL_ROUND_KEY: 0}), _context(base))  # carries round 0's
    coreset = base.with_overrides(["coreset.enabled=true", "coreset.bins=8", "coreset.warmup-steps=1"])
    context = _context(coreset)
    run("query", _message(coreset, MessageType.QUERY), context)
    run("train-coreset", _message(coreset, MessageType.TRAIN, **{THRESHOLD_KEY: 0.5, KEEP_KEY: 5}), context)
    central = base.with_overrides(["central-dp.mode=client-adaptive", "central-dp.clipped-count-stddev=1.0"])
    run("train-central-dp", _message(central, MessageType.TRAIN, **{KEY_CLIPPING_NORM: 0.05}), _context(central))
    torch.set_num_threads(threads)
    return out


def _strings(value):
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, str):
            yield v


def _audit(reply: Message, sent: dict, forbidden: set[str]) -> None:
    assert not reply.has_error(), reply.error
    for name, record in reply.content.items():
        assert name in RECORDS and isinstance(record, RECORDS[name]), name
        if name == "arrays":  # packed on the wire: it must read back as exactly the student's tensors, no more
            try:
                layout = reply_layouts(sent, RunConfig().federation.transfer_dtype)[0]
                arrays = unpack(record.to_torch_state_dict(), layout)
            except ValueError as err:
                raise AssertionError(f"reply arrays are not the student's: {err}") from None
            assert set(arrays) == set(sent), set(arrays) ^ set(sent)
            assert all(arrays[k].shape == sent[k].shape for k in sent)
            continue
        for key, value in record.items():
            assert allowed_key(name, key), (name, key)
            assert isinstance(value, VALUE_TYPES[name]), (name, key, type(value))
            if name != SITE_RECORD:
                assert not isinstance(value, bool), (name, key)
            if isinstance(value, list):
                assert len(value) <= MAX_LIST and all(isinstance(v, (str, int, float)) for v in value), (name, key)
            for text in [key, *_strings(value)]:
                assert "/" not in text and "\\" not in text, (name, key, text)
                assert not UID.search(text) and not DATE.search(text), (name, key, text)
                leaked = [f for f in forbidden if f in text]
                assert not leaked, (name, key, leaked[:3])


@pytest.mark.parametrize("kind", ["train", "train-refused", "train-dp", "evaluate", "train-evaluates", "query",
                                  "train-coreset", "train-central-dp"])
def test_every_reply_is_on_the_allow_list(replies, forbidden, kind):
    reply, sent = replies[kind]
    _audit(reply, sent, forbidden)


def test_the_replies_are_what_each_case_is_about(replies):
    """Guards the audit itself: each case took the path it is named after."""
    content = {k: r.content for k, (r, _) in replies.items()}
    assert content["train"]["site"]["name"] == "hospital-a" and "arrays" in content["train"]
    assert list(json.loads(content["train"]["site"]["data_card"])["by"]["model"]) == ["Sono 1"]  # the card went
    assert content["train-refused"]["metrics"]["refused"] == 1 and "arrays" not in content["train-refused"]
    assert content["train-dp"]["metrics"]["refused"] == 0 and content["train-dp"]["metrics"]["dp_steps"] > 0
    assert "loss_after" not in content["train-dp"]["metrics"]  # training-set losses stay home under DP
    assert set(content["evaluate"].keys()) == {"metrics", "site", "site-scores"}
    assert any(k.startswith("teacher_") for k in content["evaluate"]["site-scores"].keys())
    assert set(content["train-evaluates"].keys()) == {"metrics", "eval", "site", "site-scores", "arrays"}
    assert dict(content["train-evaluates"]["eval"]).keys() == {"cos", "mse", "num-examples", "eval_seconds"}
    assert any(k.startswith("teacher_") for k in content["train-evaluates"]["site-scores"].keys())
    assert set(content["query"].keys()) == {"coreset"}
    assert content["train-coreset"]["metrics"]["coreset_kept"] == 5
    assert content["train-central-dp"]["metrics"][KEY_BELOW_CLIP] in (0, 1)


def test_the_label_efficiency_protocol_keys_are_on_the_list():
    """The last round's full protocol (eval.protocol-at = last) is too slow to run here: its keys are."""
    from fedus.evaluation.protocol import MODELS, to_metrics

    rows = [{"model": m, "task": t, "metric": k, "fraction": f, "mean": 0.5, "std": 0.1, "n": 3}
            for m in MODELS for t, k in (("cls", "acc"), ("knn", "acc"), ("seg", "dice")) for f in (0.05, 1.0)]
    assert all(allowed_key("site-scores", key) for key in to_metrics(rows))


def test_a_planted_key_is_refused(tiny_cfg, monkeypatch):
    """A handler whose training result carries one extra value does not reply at all."""
    from fedus.site import Site

    def planted(self, state, *args, **kwargs):
        return state, {"num-examples": 1, "steps": 1, "patient_age": 54.0}

    monkeypatch.setattr(Site, "train", planted)
    msg, _ = _message(tiny_cfg, MessageType.TRAIN)
    with pytest.raises(EgressViolation, match="patient_age"):
        client_app(msg, _context(tiny_cfg))
    ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.EVALUATE)
    for planted_reply in ({"metrics": {"cos": 0.5, "image_count_per_patient": 2}, "facts": {"name": "a"}},
                          {"metrics": {"cos": 0.5}, "facts": {"name": "a", "study_date": "x"}},
                          {"metrics": {"cos": 0.5}, "facts": {"name": "a"}, "site_scores": {"cls_acc": 0.5, "uid": 1.0}}):
        with pytest.raises(EgressViolation, match="allow-list"):
            build_reply(ask, **planted_reply)
    with pytest.raises(EgressViolation, match="path"):  # an allowed key, a value that is a path
        build_reply(ask, {"cos": 0.5}, {"name": "/srv/pacs/hospital-a"})
    sent = {"w": torch.zeros(3)}
    with pytest.raises(EgressViolation):
        build_reply(ask, {"cos": 0.5}, {"name": "a"}, sent | {"thumbnail": torch.zeros(8, 8)}, {"w": torch.Size([3])})


def test_the_audit_catches_what_it_looks_for(forbidden):
    """A hand-built reply (past the guard) with a patient id, a UID or a foreign array fails the audit."""
    patient = next(f for f in forbidden if f.startswith("syn-"))
    ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    sent = {"w": torch.zeros(3)}
    for content in (RecordDict({"site": ConfigRecord({"name": f"site {patient}"})}),
                    RecordDict({"site": ConfigRecord({"classes": ["a", "1.2.826.0.1.3680043.8.498.7"]})}),
                    RecordDict({"arrays": ArrayRecord(sent | {"image": torch.zeros(32, 32)})}),
                    RecordDict({"extra": ConfigRecord({"name": "a"})})):
        with pytest.raises(AssertionError):
            _audit(Message(content, reply_to=ask), sent, forbidden)
