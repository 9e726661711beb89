"""Server optimisers (federation.server-optimizer): Flower's update rules on fedus's aggregate, their
state checkpointed per round and restored by resume (no sites, no Flower runtime)."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedus.config import ConfigError
from fedus.runs import SERVER_STATE, RunRecorder
from server.strategy import FedusFedAvg
from wire import site_reply

GLOBAL = {"w": torch.linspace(-1, 1, 20).reshape(4, 5), "b": torch.zeros(3),
          "bn.running_var": torch.ones(3), "bn.num_batches_tracked": torch.tensor(7)}
ETA, B1, B2, TAU = 0.05, 0.9, 0.99, 1e-3


_reply = site_reply


def _site_model(start, server_round, site):
    """A site's trained student: a seeded float update, 3 more BatchNorm batches (draws in GLOBAL's key
    order: a checkpoint comes back with its keys sorted)."""
    g = torch.Generator().manual_seed(100 * server_round + site)
    return {k: start[k] + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else start[k] + 3
            for k, v in GLOBAL.items()}


def _cfg(cfg, *overrides):
    return cfg.with_overrides(list(overrides))


def _strategy(cfg, run_dir, recorder=None, offset=0):
    recorder = recorder or RunRecorder(run_dir, cfg, {})
    return FedusFedAvg(cfg, recorder, round_offset=offset, min_train_nodes=1, min_available_nodes=1)


def _round(strategy, flower_round, start, sites=3):
    """One aggregate_train as Flower would call it; the run record gets an eval so resume counts the round."""
    strategy.sent = ArrayRecord(start)
    true_round = flower_round + strategy.offset
    replies = [_reply(_site_model(start, true_round, i), 10 * (i + 1), f"S{i}", i, strategy.cfg.federation.transfer_dtype)
               for i in range(sites)]
    arrays, _ = strategy.aggregate_train(flower_round, replies)
    strategy.recorder.record(true_round, "eval", {"S0": {"loss": 1.0}})
    return arrays.to_torch_state_dict()


def test_fedadam_is_flowers_formula_on_float_tensors_and_leaves_buffers_to_fedavg(tiny_cfg, task_identity, tmp_path):
    cfg = _cfg(tiny_cfg, "federation.transfer-dtype=fp32", "federation.server-optimizer=fedadam",
               f"federation.server-lr={ETA}", f"federation.beta-1={B1}", f"federation.beta-2={B2}", f"federation.tau={TAU}")
    strategy, plain = _strategy(cfg, tmp_path / "adam"), _strategy(_cfg(cfg, "federation.server-optimizer=none"), tmp_path / "avg")
    weights = np.array([10.0, 20.0, 30.0])
    start, m, v = GLOBAL, {}, {}
    for rnd in (1, 2):
        got, fedavg = _round(strategy, rnd, start), _round(plain, rnd, start)
        # independently, in float64: FedAvg of the site models, then Flower's FedAdam step
        sites = [_site_model(start, rnd, i) for i in range(3)]
        for k in ("w", "b"):
            x = start[k].double().numpy()
            delta = sum(w * s[k].double().numpy() for w, s in zip(weights, sites)) / weights.sum() - x
            m[k] = B1 * m.get(k, 0.0) + (1 - B1) * delta
            v[k] = B2 * v.get(k, 0.0) + (1 - B2) * delta ** 2
            eta_t = ETA * np.sqrt(1 - B2 ** (rnd + 1)) / (1 - B1 ** (rnd + 1))
            np.testing.assert_allclose(got[k].numpy(), x + eta_t * m[k] / (np.sqrt(v[k]) + TAU), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got["w"], fedavg["w"])  # the step is not FedAvg's
        for k in ("bn.running_var", "bn.num_batches_tracked"):  # left to FedAvg, dtype kept
            assert torch.equal(got[k], fedavg[k]) and got[k].dtype == GLOBAL[k].dtype
        assert got["bn.num_batches_tracked"].item() == 7 + 3 * rnd
        start = got
    state = json.loads((tmp_path / "adam" / SERVER_STATE).read_text())
    assert state["optimizer_history"] == {"1": "server-optimizer-round-001.safetensors",
                                          "2": "server-optimizer-round-002.safetensors"}
    assert set(strategy.server_opt.state_dict()) == {"m_t/w", "m_t/b", "v_t/w", "v_t/b"}


@pytest.mark.parametrize("opt", [["federation.server-optimizer=fedadam", "federation.server-lr=0.05"],
                                 ["federation.server-optimizer=fedavgm", "federation.server-momentum=0.9"]])
def test_two_rounds_resumed_plus_two_equal_four_uninterrupted_bit_for_bit(tiny_cfg, task_identity, tmp_path, opt):
    cfg = _cfg(tiny_cfg, *opt)  # default fp16 transfer: the step starts from the model the sites received
    straight, start = _strategy(cfg, tmp_path / "straight"), GLOBAL
    for rnd in range(1, 5):
        start = _round(straight, rnd, start)
    first, resumed = _strategy(cfg, tmp_path / "resumed"), GLOBAL
    for rnd in (1, 2):
        resumed = _round(first, rnd, resumed)
    recorder, done, state = RunRecorder.resume(tmp_path / "resumed", cfg)
    assert done == 2 and recorder.optimizer_state
    second = _strategy(cfg, None, recorder, offset=done)  # a new process: state only from the files
    resumed = state
    for rnd in (1, 2):  # Flower counts from 1 again
        resumed = _round(second, rnd, resumed)
    assert all(torch.equal(start[k], resumed[k]) and start[k].dtype == resumed[k].dtype for k in GLOBAL)


def test_steps_on_the_median_and_on_the_central_dp_release(tiny_cfg, task_identity, tmp_path):
    """Median and trimmed mean are translation-equivariant and central DP's release is DP already,
    so the step acts on the robust / noised aggregate's update."""
    base = _cfg(tiny_cfg, "federation.transfer-dtype=fp32")
    for name, extra in [("median", ["federation.robust=median"]),
                        ("dp", ["central-dp.mode=server-fixed", "central-dp.sampled-sites=3", "central-dp.clipping-norm=0.05"])]:
        plain = _strategy(_cfg(base, *extra), tmp_path / f"{name}-plain")
        if plain.central_dp is not None:
            plain.central_dp.check_sampled(3, population=3)
        aggregate = _round(plain, 1, GLOBAL)
        stepped = _strategy(_cfg(base, *extra, "federation.server-optimizer=fedavgm", "federation.server-lr=2.0"),
                            tmp_path / name)
        if stepped.central_dp is not None:
            stepped.central_dp.check_sampled(3, population=3)
        got = _round(stepped, 1, GLOBAL)
        for k in ("w", "b"):  # FedAvgM, no momentum: x - lr * (x - aggregate)
            torch.testing.assert_close(got[k], GLOBAL[k] + 2.0 * (aggregate[k] - GLOBAL[k]), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got["w"], aggregate["w"])


@pytest.mark.parametrize("bad", ["federation.server-optimizer=adam", "federation.tau=0", "federation.beta-2=1.5",
                                 "federation.server-momentum=0.9"])
def test_bad_server_optimizer_values_are_one_line_config_errors(tiny_cfg, bad):
    with pytest.raises(ConfigError) as err:
        tiny_cfg.with_overrides([bad])
    assert "\n" not in str(err.value) and "federation" in str(err.value)
