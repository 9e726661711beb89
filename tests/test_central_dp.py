"""Client-level central DP on the server (Flower's clipping, noise and RDP accountant), no runtime."""

import json
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from fedus.runs import RunRecorder
from server.central_dp import KEY_CLIPPING_NORM, CentralDPError, clip_update, update_norm
from server.strategy import FedusFedAvg

GLOBAL = {"w": torch.zeros(6, 5), "b": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(7)}
C, Z = 0.5, 0.8


def _reply(arrays, name, node):
    content = RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 10 * (node + 1), "loss": 1.0}),
                          "site": ConfigRecord({"name": name})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _update(scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3)
            for k, v in GLOBAL.items()}


def _strategy(cfg, tmp_path, mode="server-fixed", sites=3, noise=Z, name="run"):
    cfg = cfg.with_overrides([f"central-dp.mode={mode}", f"central-dp.clipping-norm={C}",
                              f"central-dp.noise-multiplier={noise}", f"central-dp.sampled-sites={sites}",
                              "federation.transfer-dtype=fp32"])
    strategy = FedusFedAvg(cfg, RunRecorder(tmp_path / name, cfg, {}), min_train_nodes=1, min_available_nodes=1)
    strategy.sent = ArrayRecord(GLOBAL)
    strategy.central_dp.check_sampled(sites, population=sites)  # what configure_train does with Flower's sample
    return strategy


def test_clip_update_bounds_the_float_update_and_leaves_integer_buffers(task_identity):
    big = _update(5.0, 0)
    clipped = clip_update(big, GLOBAL, C)
    assert update_norm(big, GLOBAL) > 10 * C
    assert update_norm(clipped, GLOBAL) == pytest.approx(C, rel=1e-5)
    assert torch.equal(clipped["bn.num_batches_tracked"], big["bn.num_batches_tracked"])
    small = _update(1e-3, 1)
    assert all(torch.allclose(clip_update(small, GLOBAL, C)[k].float(), small[k].float()) for k in small)


def test_aggregate_is_the_noised_uniform_mean_of_clipped_updates_with_flower_epsilon(tiny_cfg, task_identity, tmp_path):
    strategy = _strategy(tiny_cfg, tmp_path)
    updates = [_update(s, i) for i, s in enumerate([5.0, 1e-3, 2.0])]
    eps = []
    for rnd in (1, 2):
        strategy.sent = ArrayRecord(GLOBAL)
        arrays, _ = strategy.aggregate_train(rnd, [_reply(u, f"S{i}", i) for i, u in enumerate(updates)])
        got = arrays.to_torch_state_dict()
        entry = next(e for e in strategy.recorder.summary["rounds"] if e["round"] == rnd)["aggregate"]
        eps.append(entry["central_dp_epsilon"])
        assert entry["central_dp_clipped_sites"] == 2 and entry["central_dp_noise_std"] == pytest.approx(Z * C / 3)
    # noise: what is left after removing the mean clipped update has the calibrated std (30+3 values, loose)
    mean = {k: sum(clip_update(u, GLOBAL, C)[k] - GLOBAL[k] for u in updates) / 3 for k in ("w", "b")}
    residual = torch.cat([(got[k] - GLOBAL[k] - mean[k]).flatten() for k in ("w", "b")])
    assert 0.5 * Z * C / 3 < residual.std().item() < 1.6 * Z * C / 3
    assert torch.equal(got["bn.num_batches_tracked"], GLOBAL["bn.num_batches_tracked"])  # never noised
    ref = RdpAccountant(PrivacyConfig(target_delta=tiny_cfg.central_dp.delta, population_size=3,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for e in eps:
        ref.compose(GaussianPrivacyEvent(noise_multiplier=Z, sample_size=3, population_size=3))
        assert e == pytest.approx(ref.get_epsilon(tiny_cfg.central_dp.delta), rel=1e-9)
    assert eps[1] > eps[0] > 0


def test_same_seed_same_noise_so_resume_stays_identical(tiny_cfg, task_identity, tmp_path):
    outs = []
    for name in ("a", "b"):
        strategy = _strategy(tiny_cfg, tmp_path, name=name)
        arrays, _ = strategy.aggregate_train(1, [_reply(_update(1.0, i), f"S{i}", i) for i in range(3)])
        outs.append(arrays.to_torch_state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    restored = _strategy(tiny_cfg, tmp_path, name="c")
    saved = json.loads(json.dumps(strategy.central_dp.state_dict()))  # as server-state.json keeps it
    restored.central_dp.load_state_dict(saved)
    restored.central_dp.accountant = None
    restored.central_dp.check_sampled(3, 3)
    assert restored.central_dp.accountant.num_releases == 1


def test_a_missing_site_means_no_release_and_a_wrong_sample_size_refuses(tiny_cfg, task_identity, tmp_path):
    strategy = _strategy(tiny_cfg, tmp_path)
    arrays, _ = strategy.aggregate_train(1, [_reply(_update(1.0, i), f"S{i}", i) for i in range(2)])
    assert arrays is None  # noise calibrated for 3 sites: 2 are not released
    assert strategy.central_dp.accountant.num_releases == 0
    with pytest.raises(CentralDPError, match="calibrated for 3 sites"):
        strategy.central_dp.check_sampled(2, population=3)


def test_client_side_mode_tells_sites_the_norm_and_rejects_an_unclipped_round(tiny_cfg, task_identity, tmp_path):
    strategy = _strategy(tiny_cfg, tmp_path, mode="client-fixed")
    assert strategy.central_dp.train_config() == {KEY_CLIPPING_NORM: C}
    clipped = [clip_update(_update(2.0, i), GLOBAL, C) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, [_reply(u, f"S{i}", i) for i, u in enumerate(clipped)])
    assert arrays is not None
    strategy.sent = ArrayRecord(GLOBAL)
    unclipped = clipped[:2] + [_update(2.0, 9)]
    arrays, _ = strategy.aggregate_train(2, [_reply(u, f"S{i}", i) for i, u in enumerate(unclipped)])
    assert arrays is None and strategy.central_dp.accountant.num_releases == 1


def test_a_site_told_a_clipping_norm_sends_a_clipped_update(tiny_cfg, task_identity):
    from client.app import app as client_app
    from fedus.site import initial_student
    from tests.test_flower_apps import _context

    student = initial_student(tiny_cfg)
    sent = student.state_dict()
    msg = Message(RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({
        "server-round": 1, KEY_CLIPPING_NORM: 0.05, "transfer-dtype": "fp32"})}), dst_node_id=1,
        message_type=MessageType.TRAIN)
    reply = client_app(msg, _context(tiny_cfg.with_overrides(["train.lr=1e-2"])))
    assert not reply.has_error(), reply.error
    back = reply.content["arrays"].to_torch_state_dict()
    assert update_norm(back, sent) == pytest.approx(0.05, rel=1e-4)  # trained far, clipped to the norm
