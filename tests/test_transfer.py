"""Students on the wire: half the bytes at fp16, fp32 again on arrival, same held-out cosine as fp32;
a quarter at int8-delta, within half a quantisation step, nothing lost for good with error feedback."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.replies import EgressViolation, build_reply
from fedus.config import ConfigError
from fedus.runs import RunRecorder
from fedus.site import get_site, initial_student
from fedus.transfer import (INT8_DELTA, SCALES_RECORD, decode, decode_delta, dequantise, encode, encode_delta,
                            from_wire, layout_of, nbytes, pack, reply_layouts, to_wire, unpack)
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


def test_a_packed_student_is_a_few_arrays_and_unpacks_exactly(tiny_cfg):
    """Flower moves each array as its own object (one request per hop): on the wire a student is one
    flat array per dtype; the layout in the config gives every tensor back, bit for bit."""
    state = initial_student(tiny_cfg).state_dict()
    for dtype in ("fp32", "fp16", "bf16", INT8_DELTA):
        packed, entries = to_wire(state, dtype)
        assert len(packed) <= 3 < len(state)
        record = ArrayRecord(packed)  # through Flower's record (numpy) and back
        named = encode(state, dtype)
        back = unpack(record.to_torch_state_dict(), entries["wire-layout"])
        assert set(back) == set(named) and all(torch.equal(back[k], named[k]) for k in named)
        shuffled = dict(reversed(list(named.items())))  # a checkpoint's key order is not the model's
        assert all(torch.equal(a, b) for a, b in zip(pack(shuffled).values(), packed.values()))
        assert nbytes(packed) == nbytes(named)
    bad = dict(pack(encode(state, "fp16")))
    bad["float16"] = bad["float16"][:-1]  # one element short
    for broken in (bad, {"float32": torch.zeros(3)}, {}):
        with pytest.raises(ValueError):
            unpack(broken, layout_of(encode(state, "fp16")))


def test_a_reply_that_does_not_fit_the_layout_is_not_aggregated(tiny_cfg, task_identity, tmp_path):
    strategy = FedusFedAvg(tiny_cfg, RunRecorder(tmp_path, tiny_cfg, {}), min_train_nodes=1, min_available_nodes=1)
    strategy.sent = ArrayRecord(_student_like())
    packed = pack(encode(_student_like(1), tiny_cfg.federation.transfer_dtype))
    short = {k: v[:-1] if v.numel() > 1 else v for k, v in packed.items()}
    ok, bad = (Message(RecordDict({"arrays": ArrayRecord(a)}), reply_to=Message(
        RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)) for a in (packed, short))
    strategy.arrived([ok, bad])
    assert "arrays" not in bad.content  # validation will say no-arrays
    assert set(ok.content["arrays"]) == set(_student_like())


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


# --- int8-delta: int8 update + fp32 scales up, error feedback at the site ---------------------------

def _student_like(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small stand-in student: conv and linear weights (per-channel), a long 1-D tensor (per-tensor),
    a tiny float tensor and an integer buffer (both sent as they are)."""
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(16, 8, 3, 3, generator=g), "fc.weight": torch.randn(32, 64, generator=g),
            "fc.long_bias": torch.randn(2048, generator=g), "fc.bias": torch.randn(32, generator=g),
            "bn.num_batches_tracked": torch.tensor(7)}


def _moved(state: dict, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1 for k, v in state.items()}


def _per_element(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def test_int8_delta_round_trip_is_within_half_a_step():
    base = decode(encode(_student_like(), INT8_DELTA), INT8_DELTA)  # what a site received: fp16 down
    assert {v.dtype for v in encode(base, INT8_DELTA).values() if v.is_floating_point()} == {torch.float16}
    new = _moved(base, 1e-2, seed=1)
    payload, scales, residual = encode_delta(new, base)
    payload = ArrayRecord(payload).to_torch_state_dict()  # through Flower's records, as sent
    scales = ArrayRecord(scales).to_torch_state_dict()
    assert set(payload) == set(new) and set(scales) == set(residual) == {"conv.weight", "fc.weight", "fc.long_bias"}
    assert scales["conv.weight"].shape == (16,) and scales["fc.weight"].shape == (32,)  # per output channel
    assert scales["fc.long_bias"].shape == ()  # per tensor
    back = decode_delta(payload, scales, base)
    for key, value in new.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        if key in scales:
            assert payload[key].dtype == torch.int8
            half = _per_element(scales[key], value.ndim) / 2
            assert ((back[key] - value).abs() <= half * (1 + 1e-5) + 1e-7).all(), key
            torch.testing.assert_close(residual[key], value - back[key], rtol=0, atol=1e-6)
        else:  # tiny float tensors and integer buffers: as they are
            assert torch.equal(back[key], value), key


def test_error_feedback_tracks_the_sum_of_deltas_while_no_feedback_loses_small_ones():
    """One element moves by 1 each round (setting the step to ~1/127); the others by 0.3 of a step, which
    rounds to 0 every time without feedback. With feedback the sent sum trails the true sum by at most
    half a step (the residual), every round."""
    base = {"w": torch.zeros(2048)}
    true = torch.full((2048,), 0.3 / 127)
    true[0] = 1.0
    residual, sent_fb, sent_plain = None, torch.zeros(2048), torch.zeros(2048)
    for r in range(1, 21):
        payload, scales, residual = encode_delta({"w": true}, base, residual)
        sent_fb += dequantise(payload["w"], scales["w"])
        payload, scales, _ = encode_delta({"w": true}, base, None)
        sent_plain += dequantise(payload["w"], scales["w"])
        assert (r * true - sent_fb).abs().max() <= scales["w"] / 2 * (1 + 1e-5)
        torch.testing.assert_close(r * true - sent_fb, residual["w"], rtol=0, atol=1e-5)
    assert sent_plain[1:].abs().max() == 0  # 20 rounds of updates below half a step: all lost
    assert (20 * true[1:] - sent_fb[1:]).abs().max() < (20 * true[1:]).min() / 10  # kept, up to one step


def _train_reply(msg, new: dict, base: dict, dtype: str, name: str, n: int):
    if dtype == INT8_DELTA:
        payload, scales, _ = encode_delta(new, base)
    else:
        payload, scales = encode(new, dtype), None
    metrics = {"num-examples": n, "bytes_sent": nbytes(payload) + nbytes(scales or {})}
    return build_reply(msg, metrics, {"name": name}, payload, {k: v.shape for k, v in base.items()}, scales=scales)


def test_arrived_rebuilds_updates_that_fedavg_aggregates_within_quantisation_error(tiny_cfg, task_identity, tmp_path):
    """The same site students sent fp32 and int8-delta: FedAvg of the rebuilt fp32 updates differs by at
    most half a quantisation step; a reply without its scales is rejected, not averaged as int8 codes."""
    global_ = _student_like()
    aggregates, bounds = {}, 0
    for dtype in ("fp32", INT8_DELTA):
        cfg = tiny_cfg.with_overrides([f"federation.transfer-dtype={dtype}"])
        strategy = FedusFedAvg(cfg, RunRecorder(tmp_path / dtype, cfg, {}), min_train_nodes=1, min_available_nodes=1)
        strategy.sent = ArrayRecord(global_)
        wire, config = strategy.on_the_wire(strategy.sent, ConfigRecord({"server-round": 1}))
        received, _ = from_wire(wire.to_torch_state_dict(), config)  # what each site starts from
        msg = Message(RecordDict({"arrays": wire, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN)
        news = [_moved(global_, 1e-2, seed=s) for s in (1, 2, 3)]  # the same site students in both runs
        replies = [_train_reply(msg, new, received, dtype, f"site-{s}", 10 * (s + 1)) for s, new in enumerate(news)]
        if dtype == INT8_DELTA:
            assert all(SCALES_RECORD in m.content for m in replies)
            bounds = {k: torch.stack([_per_element(encode_delta(n, received)[1][k], n[k].ndim).expand_as(n[k])
                                      for n in news]).amax(0) / 2 for k in encode_delta(news[0], received)[1]}
        arrays, _ = strategy.aggregate_train(1, replies)
        aggregates[dtype] = arrays.to_torch_state_dict()
        # FedAvg of what was meant: example-weighted mean of the site students
        want = {k: sum(n[k].double() * 10 * (s + 1) for s, n in enumerate(news)) / 60 for k in news[0]}
        for k, v in aggregates[dtype].items():
            assert v.dtype == global_[k].dtype and v.shape == global_[k].shape, k
            if v.is_floating_point():
                tol = bounds[k] * (1 + 1e-4) + 1e-6 if dtype == INT8_DELTA and k in bounds else 1e-6
                assert ((v.double() - want[k]).abs() <= tol).all(), (dtype, k)
    for k in bounds:
        assert ((aggregates[INT8_DELTA][k] - aggregates["fp32"][k]).abs() <= bounds[k] * (1 + 1e-4) + 2e-6).all(), k
    lost = _train_reply(msg, news[0], received, INT8_DELTA, "site-x", 10)
    del lost.content[SCALES_RECORD]
    strategy.arrived([lost])
    assert "arrays" not in lost.content  # validation will say no-arrays


def test_int8_delta_is_a_quarter_of_the_fp32_bytes(tiny_cfg):
    """On the tiny tests' student (resnet10t + head): measured 0.2525 of fp32 (int8 + per-channel scales
    + tiny tensors in fp32 + int buffers), against 0.5 for fp16."""
    from fedus.models import create_student

    student = create_student(tiny_cfg.student, 192, (2, 2), tiny_cfg.data.image_size, seed=0).state_dict()
    payload, scales, _ = encode_delta(_moved(student, 1e-3, seed=1), student)
    ratio = (nbytes(payload) + nbytes(scales)) / nbytes(encode(student, "fp32"))
    print(f"int8-delta / fp32 bytes: {ratio:.4f}")
    assert 0.25 <= ratio < 0.26


def test_the_egress_guard_lets_only_one_scale_per_int8_tensor_or_channel_go(task_identity):
    base = _student_like()
    payload, scales, _ = encode_delta(_moved(base, 1e-2, seed=1), base)
    expected = {k: v.shape for k, v in base.items()}
    ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    reply = build_reply(ask, {"num-examples": 1}, {"name": "a"}, payload, expected, scales=scales)
    back = unpack(reply.content[SCALES_RECORD].to_torch_state_dict(), layout_of(scales))
    assert all(torch.equal(back[k], v) for k, v in scales.items())
    for bad in (scales | {"conv.weight": torch.zeros(16, 8, 3, 3)},  # one number per element: a copy of the update
                scales | {"fc.bias": torch.zeros(())},  # a tensor that went as fp32 values
                scales | {"thumbnail": torch.zeros(())},  # not the student's
                scales | {"fc.weight": torch.zeros(32, dtype=torch.float64)}):
        with pytest.raises(EgressViolation):
            build_reply(ask, {"num-examples": 1}, {"name": "a"}, payload, expected, scales=bad)
    with pytest.raises(EgressViolation):  # scales alone
        build_reply(ask, {"num-examples": 1}, {"name": "a"}, scales=scales)


def test_a_site_keeps_its_residual_and_sends_int8(tiny_cfg, task_identity, monkeypatch):
    """Through the real ClientApp's train handler (local training stubbed: it is not what is tested):
    int8 codes and scales leave, the residual stays in context.state and feeds the next round; a config
    with central DP refuses int8-delta in one line."""
    from client.app import RESIDUAL_STATE
    from fedus.site import Site

    monkeypatch.setattr(Site, "train", lambda self, state, server_round, *a, **k: (
        _moved(state, 1e-2, seed=server_round), {"num-examples": 1, "steps": 1}))
    cfg = tiny_cfg.with_overrides([f"federation.transfer-dtype={INT8_DELTA}"])
    student = _student_like()
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_flat())
    residuals = []
    for r in (1, 2):
        packed, entries = to_wire(student, INT8_DELTA)
        msg = Message(RecordDict({"arrays": ArrayRecord(packed), "config": ConfigRecord({
            "server-round": r, "rounds": 2} | entries)}), dst_node_id=1, message_type=MessageType.TRAIN)
        reply = client_app(msg, ctx)
        assert not reply.has_error(), reply.error
        layout, scales_layout = reply_layouts(from_wire(packed, entries)[0], INT8_DELTA)
        arrays = unpack(reply.content["arrays"].to_torch_state_dict(), layout)
        scales = unpack(reply.content[SCALES_RECORD].to_torch_state_dict(), scales_layout)
        assert set(arrays) == set(student) and {arrays[k].dtype for k in scales} == {torch.int8}
        assert reply.content["metrics"]["bytes_sent"] == nbytes(arrays) + nbytes(scales)
        residuals.append(ctx.state[RESIDUAL_STATE].to_torch_state_dict())
        assert set(residuals[-1]) == {"float32"}  # packed like the wire: one flat array
        assert residuals[-1]["float32"].numel() == sum(student[k].numel() for k in scales)
    assert any(not torch.equal(residuals[0][k], residuals[1][k]) for k in residuals[0])
    with pytest.raises(ConfigError, match="int8-delta"):
        cfg.with_overrides(["central-dp.mode=server-fixed"])
