"""Client-level central DP on the server (Flower's clipping, noise and RDP accountant), no runtime."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from fedus.runs import RunRecorder
from server.central_dp import KEY_CLIPPING_NORM, CentralDPError, clip_update, update_norm
from server.strategy import FedusFedAvg
from wire import reply_arrays, server_message, site_reply

GLOBAL = {"w": torch.zeros(6, 5), "b": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(7)}
C, Z = 0.5, 0.8


def _reply(arrays, name, node):
    return site_reply(arrays, 10 * (node + 1), name, node)


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


@pytest.mark.usefixtures("one_thread")
def test_a_site_told_a_clipping_norm_sends_a_clipped_update(tiny_cfg, task_identity):
    from client.app import app as client_app
    from fedus.site import initial_student
    from tests.test_flower_apps import _context

    student = initial_student(tiny_cfg)
    sent = student.state_dict()
    msg = server_message(sent, {"server-round": 1, KEY_CLIPPING_NORM: 0.05})
    reply = client_app(msg, _context(tiny_cfg.with_overrides(["train.lr=1e-2"])))
    assert not reply.has_error(), reply.error
    back = reply_arrays(reply, msg)
    assert update_norm(back, sent) == pytest.approx(0.05, rel=1e-4)  # trained far, clipped to the norm


# --- adaptive clipping (Andrew et al. 2021) ---------------------------------------------------------
ZA, SIGMA_B, C0 = 0.3, 0.3, 0.5  # z < 2 sigma_b, as Theorem 1 needs; count noise std on b: 0.1


def _adaptive(cfg, tmp_path, mode="server-adaptive", name="run", *extra):
    cfg = cfg.with_overrides([f"central-dp.mode={mode}", f"central-dp.initial-clipping-norm={C0}",
                              f"central-dp.noise-multiplier={ZA}", f"central-dp.clipped-count-stddev={SIGMA_B}",
                              "central-dp.sampled-sites=3", "federation.transfer-dtype=fp32", *extra])
    strategy = FedusFedAvg(cfg, RunRecorder(tmp_path / name, cfg, {}), min_train_nodes=1, min_available_nodes=1)
    strategy.sent = ArrayRecord(GLOBAL)
    strategy.central_dp.check_sampled(3, population=3)
    return strategy


def _scaled(norm, seed):
    """An update of exactly `norm` (float tensors), integer buffers moved as training would."""
    u = _update(1.0, seed)
    return clip_update(_update(100.0, seed), GLOBAL, norm) if norm else u


def test_adaptive_norm_steps_down_for_small_updates_and_up_for_large_ones(tiny_cfg, task_identity, tmp_path):
    from fedus.site import derived_seed

    for norm, direction in ((1e-3, -1), (50.0, +1)):
        strategy = _adaptive(tiny_cfg, tmp_path, name=f"r{direction}")
        arrays, _ = strategy.aggregate_train(1, [_reply(_scaled(norm, i), f"S{i}", i) for i in range(3)])
        assert arrays is not None
        below = 3 if direction < 0 else 0
        rng = np.random.default_rng(derived_seed(tiny_cfg.seed, 1, "central-dp-count"))
        b = (below + rng.normal(0.0, SIGMA_B)) / 3
        facts = strategy.recorder.summary["rounds"][0]["aggregate"]
        assert facts["central_dp_below_fraction"] == pytest.approx(b, rel=1e-12)
        assert strategy.central_dp.clipping_norm == pytest.approx(C0 * math.exp(-0.2 * (b - 0.5)), rel=1e-12)
        assert (strategy.central_dp.clipping_norm - C0) * direction > 0
        # the noise is calibrated for the C the updates were clipped to, not the next one
        assert facts["central_dp_clipping_norm"] == C0


def test_adaptive_norm_settles_at_the_target_quantile(tiny_cfg):
    from server.central_dp import CentralDP

    norms = (0.5, 1.0, 2.0)  # target 0.5: the median site's norm
    for start in (0.05, 20.0):
        cfg = tiny_cfg.with_overrides(["central-dp.mode=server-adaptive", f"central-dp.initial-clipping-norm={start}",
                                       f"central-dp.noise-multiplier={ZA}", f"central-dp.clipped-count-stddev={SIGMA_B}",
                                       "central-dp.clip-norm-lr=0.5", "central-dp.sampled-sites=3"])
        dp = CentralDP(cfg.central_dp, 3, seed=0)
        dp.check_sampled(3, 3)
        path = []
        for rnd in range(1, 31):
            assert dp.release(rnd, GLOBAL, [_scaled(n, i) for i, n in enumerate(norms)]) is not None
            path.append(dp.clipping_norm)
        assert path[:5] == sorted(path[:5], reverse=start > 1)  # monotone while every site is on one side
        assert all(0.5 < c < 2.0 for c in path[-10:]), path[-10:]


def test_adaptive_epsilon_is_flowers_accountant_for_the_total_multiplier(tiny_cfg, task_identity, tmp_path):
    """Andrew et al. Thm 1: update noise z_u plus count noise sigma_b is one Gaussian mechanism of
    multiplier z; the update gets z_u = (z^-2 - (2 sigma_b)^-2)^-1/2, the accountant composes z."""
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    strategy = _adaptive(tiny_cfg, tmp_path)
    z_u = (ZA ** -2 - (2 * SIGMA_B) ** -2) ** -0.5
    assert strategy.central_dp.update_multiplier == pytest.approx(z_u) == compute_adaptive_noise_params(ZA, 3, SIGMA_B)[1]
    ref = RdpAccountant(PrivacyConfig(target_delta=tiny_cfg.central_dp.delta, population_size=3,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for rnd in (1, 2):
        c = strategy.central_dp.clipping_norm
        strategy.sent = ArrayRecord(GLOBAL)
        assert strategy.aggregate_train(rnd, [_reply(_update(1.0, i), f"S{i}", i) for i in range(3)])[0] is not None
        facts = strategy.recorder.summary["rounds"][rnd - 1]["aggregate"]
        assert facts["central_dp_noise_std"] == pytest.approx(z_u * c / 3, rel=1e-12)
        ref.compose(GaussianPrivacyEvent(noise_multiplier=ZA, sample_size=3, population_size=3))
        assert facts["central_dp_epsilon"] == pytest.approx(ref.get_epsilon(tiny_cfg.central_dp.delta), rel=1e-9)


def test_adaptive_refuses_a_count_noise_that_would_take_the_whole_budget(tiny_cfg):
    from fedus.config import ConfigError

    with pytest.raises(ConfigError, match="clipped-count-stddev") as err:  # default sigma_b = 3 / 20
        tiny_cfg.with_overrides(["central-dp.mode=client-adaptive", "central-dp.noise-multiplier=0.3",
                                 "federation.min-sites=3"])
    assert "\n" not in str(err.value) and "3 sites / 20" in str(err.value)
    with pytest.raises(ConfigError, match="clipped-count-stddev"):  # z = 2 sigma_b exactly: nothing left
        tiny_cfg.with_overrides(["central-dp.mode=server-adaptive", "central-dp.noise-multiplier=1.0",
                                 "central-dp.clipped-count-stddev=0.5"])
    tiny_cfg.with_overrides(["central-dp.mode=server-fixed", "central-dp.noise-multiplier=5.0"])  # fixed: no count


def test_adaptive_norm_is_checkpointed_and_a_resume_continues_bit_identically(tiny_cfg, task_identity, tmp_path):
    def replies(rnd):
        return [_reply(_update(0.3 * rnd, 10 * rnd + i), f"S{i}", i) for i in range(3)]

    a = _adaptive(tiny_cfg, tmp_path, "server-adaptive", "a")
    for rnd in (1, 2):
        a.sent = ArrayRecord(GLOBAL)
        a.aggregate_train(rnd, replies(rnd))
    saved = json.loads(json.dumps(a.central_dp.state_dict()))  # as server-state.json keeps it
    assert saved["clipping_norm"] == a.central_dp.clipping_norm != C0
    b = _adaptive(tiny_cfg, tmp_path, "server-adaptive", "b")
    b.central_dp.load_state_dict(saved)
    b.central_dp.accountant = None
    b.central_dp.check_sampled(3, 3)
    assert b.central_dp.clipping_norm == a.central_dp.clipping_norm and b.central_dp.accountant.num_releases == 2
    outs = []
    for s in (a, b):
        s.sent = ArrayRecord(GLOBAL)
        outs.append(s.aggregate_train(3, replies(3))[0].to_torch_state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert a.central_dp.state_dict() == b.central_dp.state_dict()
    c = _adaptive(tiny_cfg, tmp_path, "client-adaptive", "c")  # the site is told the restored C
    c.central_dp.load_state_dict(saved)
    assert c.central_dp.train_config() == {KEY_CLIPPING_NORM: saved["clipping_norm"]}


def test_client_adaptive_needs_every_sites_bit(tiny_cfg, task_identity, tmp_path):
    from server.central_dp import KEY_BELOW_CLIP

    strategy = _adaptive(tiny_cfg, tmp_path, "client-adaptive")
    assert strategy.central_dp.train_config() == {KEY_CLIPPING_NORM: C0}
    sent = [clip_update(_update(s, i), GLOBAL, C0) for i, s in enumerate((1e-3, 2.0, 3.0))]
    msgs = [_reply(u, f"S{i}", i) for i, u in enumerate(sent)]
    for m, bit in zip(msgs[:2], (1, 0)):
        m.content["metrics"][KEY_BELOW_CLIP] = bit
    assert strategy.aggregate_train(1, msgs)[0] is None  # S2 sent no bit: not released, C unchanged
    assert strategy.central_dp.clipping_norm == C0 and strategy.central_dp.accountant.num_releases == 0
    msgs = [_reply(u, f"S{i}", i) for i, u in enumerate(sent)]  # the server read the first ones in place
    for m, bit in zip(msgs, (1, 0, 0)):
        m.content["metrics"][KEY_BELOW_CLIP] = bit
    strategy.sent = ArrayRecord(GLOBAL)
    assert strategy.aggregate_train(2, msgs)[0] is not None
    facts = strategy.recorder.summary["rounds"][1]["aggregate"]
    assert facts["central_dp_clipped_sites"] == 2 and strategy.central_dp.clipping_norm > C0  # b ~ 1/3 < 0.5


def test_clip_and_flag_bit_is_norm_within_c(task_identity):
    from server.central_dp import clip_and_flag

    assert clip_and_flag(_scaled(0.4, 0), GLOBAL, C)[1] is True
    assert clip_and_flag(_update(5.0, 0), GLOBAL, C)[1] is False


@pytest.mark.usefixtures("one_thread")
def test_a_client_adaptive_site_sends_its_bit_and_nothing_else_new(tiny_cfg, task_identity):
    """Same training, client-fixed vs client-adaptive: the reply differs by the one bit, nothing else."""
    from client.app import app as client_app
    from fedus.site import initial_student
    from server.central_dp import KEY_BELOW_CLIP
    from tests.test_flower_apps import _context

    sent = initial_student(tiny_cfg).state_dict()
    replies = {}
    for mode in ("client-fixed", "client-adaptive"):
        cfg = tiny_cfg.with_overrides(["train.lr=1e-2", "train.local-steps=2", f"central-dp.mode={mode}",
                                       "central-dp.clipped-count-stddev=1.0"])
        msg = server_message(sent, {"server-round": 1, KEY_CLIPPING_NORM: 0.05})
        replies[mode] = client_app(msg, _context(cfg))
        assert not replies[mode].has_error(), replies[mode].error
    fixed, adaptive = (replies[m].content for m in ("client-fixed", "client-adaptive"))
    assert set(adaptive.keys()) == set(fixed.keys())
    assert set(adaptive["metrics"].keys()) - set(fixed["metrics"].keys()) == {KEY_BELOW_CLIP}
    assert adaptive["metrics"][KEY_BELOW_CLIP] == 0  # trained far past 0.05: clipped
    assert dict(adaptive["site"]) == dict(fixed["site"])
    a, f = adaptive["arrays"].to_torch_state_dict(), fixed["arrays"].to_torch_state_dict()  # packed alike
    assert all(torch.equal(a[k], f[k]) for k in f)  # same seeded training, same clip
