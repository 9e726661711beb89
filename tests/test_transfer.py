"""Students on the wire: half the bytes at fp16, fp32 again on arrival, same held-out cosine as fp32."""

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from fedus.runs import RunRecorder
from fedus.site import get_site, initial_student
from fedus.transfer import TRANSFER_KEY, decode, encode, nbytes
from server.strategy import FedusFedAvg


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_is_half_the_bytes_and_comes_back_fp32(tiny_cfg, dtype):
    state = initial_student(tiny_cfg).state_dict()
    wire, full = encode(state, dtype), encode(state, "fp32")
    ints = sum(v.numel() * v.element_size() for v in state.values() if not v.is_floating_point())
    assert nbytes(wire) <= (nbytes(full) + ints) / 2  # int/bool buffers are sent as they are
    assert nbytes(wire) / nbytes(full) < 0.501
    back = decode(ArrayRecord(wire).to_torch_state_dict(), dtype)  # through Flower's record (no bf16 in numpy)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        if v.is_floating_point():
            torch.testing.assert_close(back[k], v, rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(back[k], v), k


def _run(cfg, rounds, tmp_path):
    """A few rounds of FedAvg over 2 sites through the real ClientApp and strategy (no messaging runtime)."""
    strategy = FedusFedAvg(cfg, RunRecorder(tmp_path / cfg.federation.transfer_dtype, cfg, {}),
                           min_train_nodes=1, min_available_nodes=1)
    arrays = ArrayRecord(initial_student(cfg).state_dict())
    for r in range(1, rounds + 1):
        strategy.sent = arrays
        wire, config = strategy.on_the_wire(arrays, {"server-round": r, "rounds": rounds})
        replies = []
        for site in (0, 1):
            msg = Message(RecordDict({"arrays": wire, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN)
            ctx = Context(run_id=1, node_id=1, node_config={"partition-id": site, "num-partitions": 2},
                          state=RecordDict(), run_config=cfg.to_flat())
            replies.append(client_app(msg, ctx))
            assert not replies[-1].has_error(), replies[-1].error
        wire_dtypes = {v.dtype for m in replies for v in m.content["arrays"].to_torch_state_dict().values()
                       if v.is_floating_point()}
        assert wire_dtypes == {torch.float16 if cfg.federation.transfer_dtype == "fp16" else torch.float32}
        arrays, _ = strategy.aggregate_train(r, replies)  # replies' students back to fp32 first
    state = arrays.to_torch_state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}  # the aggregate is fp32
    cos = [get_site(cfg, s).evaluate(state, rounds)["cos"] for s in (0, 1)]
    return sum(cos) / 2, replies, strategy.recorder.summary["rounds"][-1]["aggregate"]


def test_fp16_transfer_matches_fp32_transfer_on_held_out_cosine(tiny_cfg, task_identity, tmp_path):
    cfg = tiny_cfg.with_overrides(["train.local-steps=2", "rounds=2"])
    cos16, replies16, agg16 = _run(cfg, 2, tmp_path)
    cos32, replies32, agg32 = _run(cfg.with_overrides(["federation.transfer-dtype=fp32"]), 2, tmp_path)
    assert abs(cos16 - cos32) <= 0.01
    sent16 = [dict(r.content["metrics"])["bytes_sent"] for r in replies16]
    sent32 = [dict(r.content["metrics"])["bytes_sent"] for r in replies32]
    assert all(a / b < 0.501 for a, b in zip(sent16, sent32))
    assert agg16["bytes_up"] == sum(sent16) and agg32["bytes_up"] == sum(sent32)
