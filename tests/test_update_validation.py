"""Server-side update validation and robust aggregation (no sites, no Flower runtime)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from fedus.runs import RunRecorder
from server.strategy import FedusFedAvg
from server.validation import NORM_OUTLIER, NOT_FINITE, WRONG_KEYS, WRONG_SHAPES, validate_updates
from wire import site_reply

GLOBAL = {"w": torch.zeros(4, 5), "b": torch.zeros(2)}


_reply = site_reply  # fp32 on the wire: these tests are about what the server accepts


def _honest(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in GLOBAL.items()}


def _strategy(cfg, tmp_path, robust="none"):
    cfg = cfg.with_overrides([f"federation.robust={robust}", "federation.transfer-dtype=fp32"])
    strategy = FedusFedAvg(cfg, RunRecorder(tmp_path / f"run-{robust}", cfg, {}), min_train_nodes=1, min_available_nodes=1)
    strategy.sent = ArrayRecord(GLOBAL)  # what configure_train would have sent
    return strategy


def _sites():
    honest = [_reply(_honest(i), 10 + i, f"H{i}", i) for i in range(3)]
    nan = _honest(7)
    nan["w"][1, 2] = float("nan")
    big = {k: 100 * v for k, v in _honest(8).items()}
    return honest, [_reply(nan, 50, "NaN-site", 7), _reply(big, 50, "Big-site", 8)]


@pytest.mark.parametrize("robust", ["none", "median", "trimmed-mean"])
def test_nan_and_100x_updates_are_rejected_and_the_aggregate_is_the_honest_one(tiny_cfg, task_identity, tmp_path, robust):
    honest, bad = _sites()
    strategy = _strategy(tiny_cfg, tmp_path, robust)
    arrays, metrics = strategy.aggregate_train(1, honest[:2] + bad + honest[2:])
    ref_honest, _ = _sites()
    expected, _ = _strategy(tiny_cfg, tmp_path / "ref", robust).aggregate_train(1, ref_honest)
    got, want = arrays.to_torch_state_dict(), expected.to_torch_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert metrics["num-examples"] == 10 + 11 + 12
    entry = strategy.recorder.summary["rounds"][0]
    assert entry["train"]["NaN-site"]["rejected"] == NOT_FINITE
    assert entry["train"]["Big-site"]["rejected"] == NORM_OUTLIER
    assert "rejected" not in entry["train"]["H0"]
    assert entry["aggregate"]["train_sites_rejected"] == 2


def test_wrong_keys_and_shapes_are_rejected(task_identity):
    """On replies as the server has read them (FedusFedAvg.arrived: unpacked by name)."""
    def named(arrays):
        return Message(RecordDict({"arrays": ArrayRecord(arrays)}),
                       reply_to=Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN))

    ok = named(_honest(0))
    keys = named({"w": torch.zeros(4, 5), "extra": torch.zeros(2)})
    shapes = named({"w": torch.zeros(5, 4), "b": torch.zeros(2)})
    verdicts = validate_updates([ok, keys, shapes], ArrayRecord(GLOBAL))
    assert [v.reason for v in verdicts] == [None, WRONG_KEYS, WRONG_SHAPES]


def test_robust_median_resists_one_outlier_that_passes_the_norm_rule(tiny_cfg, task_identity, tmp_path):
    """A 5x update is below the 10x rule: FedAvg moves towards it, the median does not."""
    sites = [_reply({"w": torch.full((4, 5), v), "b": torch.zeros(2)}, 10, f"S{i}", i) for i, v in enumerate([1.0, 1.1, 0.9, 5.0])]
    arrays, _ = _strategy(tiny_cfg, tmp_path, "median").aggregate_train(1, sites)
    np.testing.assert_allclose(arrays.to_torch_state_dict()["w"].numpy(), 1.05, rtol=1e-6)
