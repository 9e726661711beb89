"""SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod) for fedus students, in one process.

The real ServerApp main and the real ClientApp run against `LoopbackGrid` (tests/loopback.py). Nothing of the protocol is replaced: key agreement, shares, masks,
unmasking are Flower's; training, egress and the run record are fedus's. The grid keeps
every reply the server received, so the test can look at all the server ever held.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import client.app as client_module
from client.replies import allowed_key
from fedus.config import ConfigError, RunConfig
from fedus.models.weights import load_state
from fedus.transfer import decode, encode
from server.app import main as server_main
from server.strategy import SECURE_SITE_KEY
from tests.conftest import TINY
from tests.loopback import LoopbackGrid


@pytest.fixture(scope="module")
def three_centres(tmp_path_factory) -> Path:
    from fedus.data.synthetic import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path_factory.mktemp("synth3"), n_centres=3, images_per_centre=40, size=32, seed=0)


def _cfg(manifest: Path, run_dir: Path, *extra: str) -> RunConfig:
    return RunConfig().with_overrides(TINY + [
        f'data.manifest="{manifest}"', f'run-dir="{run_dir}"', "rounds=1", "train.lr=1e-3", 'eval.probe-rounds=""',
        "federation.min-sites=3", "secure-aggregation.enabled=true", *extra])


def _run(cfg: RunConfig, lost=lambda msg: False, node_extra: dict[int, dict] | None = None) -> tuple[LoopbackGrid, dict[str, dict]]:
    """The ServerApp's main over three in-process sites; returns the grid and each site's update as
    its train handler built it (before SecAgg+ masked it), by site name."""
    flat = cfg.to_flat()
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": 3} | (node_extra or {}).get(n, {}),
                           state=RecordDict(), run_config=flat) for i, n in enumerate((11, 12, 13))}
    updates = {}
    real = client_module.as_fitres

    def keep(msg, reply, keys, weight):  # instrumentation at the site: what it is about to hand to the mask
        name = str(reply.content["site"]["name"])
        updates[name] = {"update": reply.content["arrays"].to_torch_state_dict(), "n": weight, "keys": keys}
        return real(msg, reply, keys, weight)

    grid = LoopbackGrid(client_module.app, contexts, lost)
    client_module.as_fitres = keep
    try:
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=flat))
    finally:
        client_module.as_fitres = real
    return grid, updates


def _expected(run_dir: Path, updates: dict[str, dict], sites: list[str]) -> dict[str, torch.Tensor]:
    """Plain FedAvg of the named sites' updates, example-weighted, on the global as the sites received it."""
    base = load_state(run_dir / "global-round-000.safetensors")
    base = decode(encode(base, "fp16"), "fp16", base)
    total = sum(updates[s]["n"] for s in sites)
    return {k: v + sum(updates[s]["n"] * updates[s]["update"][k] for s in sites) / total if v.is_floating_point() else v
            for k, v in base.items()}


def _relative_error(got: dict, want: dict, base: dict) -> float:
    diff = sum(float((got[k].float() - want[k].float()).pow(2).sum()) for k in want if want[k].is_floating_point())
    step = sum(float((want[k].float() - base[k].float()).pow(2).sum()) for k in want if want[k].is_floating_point())
    return (diff / step) ** 0.5


def test_secure_sum_is_fedavg_and_the_server_never_holds_one_sites_update(three_centres, tmp_path, task_identity):
    cfg = _cfg(three_centres, tmp_path / "run")
    grid, updates = _run(cfg)
    assert len(updates) == 3
    got = load_state(tmp_path / "run" / "global-round-001.safetensors")
    base = load_state(tmp_path / "run" / "global-round-000.safetensors")
    want = _expected(tmp_path / "run", updates, sorted(updates))
    moved = max(float((want[k] - base[k]).abs().max()) for k in want if want[k].is_floating_point())
    assert moved > 1e-3  # a real update, so the tolerance below means something
    assert _relative_error(got, want, base) < 1e-3  # quantisation (2^24 levels over +-4) only

    # all the server ever held: no arrays at all, and masked vectors unrelated to any one site's update
    assert all(not rec for m in grid.received for rec in m.content.array_records.values())
    masked = [m for m in grid.received if Key.MASKED_PARAMETERS in m.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 3
    for m in masked:
        vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                 m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        for site in updates.values():
            flat = torch.cat([site["update"][k].flatten().double() for k in site["keys"]]).numpy()
            flat = np.concatenate([flat, [0.0]])  # Flower appends the weight factor as one more array
            assert abs(np.corrcoef(vector[: len(flat)].astype(float), flat)[0, 1]) < 0.05

    # and the legacy metrics a site sends beside its masked vector pass the same egress allow-list
    fitres = [m.content.config_records["fitres.metrics"] for m in grid.received if "fitres.metrics" in m.content]
    assert len(fitres) == 3
    assert all(allowed_key("metrics", k) or k == SECURE_SITE_KEY for r in fitres for k in r)

    summary = _summary(tmp_path / "run")
    train = summary["rounds"][-1]["train"]
    assert set(train) == set(updates) and all(0 <= m["secagg_clipped"] < 0.01 for m in train.values())
    assert summary["rounds"][-1]["aggregate"]["secure_aggregation"] == 1


def test_a_site_lost_after_sharing_its_keys_is_unmasked_out_of_the_sum(three_centres, tmp_path, task_identity):
    """SecAgg+'s dropout recovery: the other sites' shares remove the lost site's pairwise masks, and
    the aggregate is FedAvg of the two that finished."""
    cfg = _cfg(three_centres, tmp_path / "run", "federation.quorum=2", "federation.straggler-wait=0.5")

    def lost(msg):  # node 13 dies during the masked-vector stage: its reply never arrives
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        return msg.metadata.dst_node_id == 13 and stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)

    grid, updates = _run(cfg, lost)
    summary = _summary(tmp_path / "run")
    finished = sorted(summary["rounds"][-1]["train"])
    assert len(finished) == 2
    got = load_state(tmp_path / "run" / "global-round-001.safetensors")
    base = load_state(tmp_path / "run" / "global-round-000.safetensors")
    assert _relative_error(got, _expected(tmp_path / "run", updates, finished), base) < 1e-3


def test_a_site_whose_privacy_budget_says_no_takes_part_with_weight_zero(three_centres, tmp_path, task_identity):
    """DP-SGD at the sites under SecAgg+: node 13's own budget cannot afford the round, it refuses with its
    reason (which reaches the record), and the secure sum is FedAvg of the other two."""
    cfg = _cfg(three_centres, tmp_path / "run", "privacy.enabled=true", "privacy.noise-multiplier=1.0",
               "federation.quorum=2")
    grid, updates = _run(cfg, node_extra={13: {"epsilon-budget": 1e-3}})
    summary = _summary(tmp_path / "run")
    train = summary["rounds"][-1]["train"]
    refused = [s for s, m in train.items() if "refusal" in m]
    assert len(refused) == 1 and "budget" in train[refused[0]]["refusal"]
    assert summary["privacy"][refused[0]]["refused_rounds"] == {"1": train[refused[0]]["refusal"]}
    trained = sorted(s for s in train if s not in refused)
    got = load_state(tmp_path / "run" / "global-round-001.safetensors")
    base = load_state(tmp_path / "run" / "global-round-000.safetensors")
    assert _relative_error(got, _expected(tmp_path / "run", updates, trained), base) < 1e-3


def test_client_fixed_central_dp_noises_the_secure_mean_of_clipped_updates(three_centres, tmp_path, task_identity):
    """SecAgg+ with client-level DP: each site clips its update to C and weighs 1, the server unmasks the uniform
    mean and adds the seeded Gaussian noise (std z C / sites) that plain central DP would; epsilon is Flower's."""
    from flwr.supercore.differential_privacy import compute_stdv

    from fedus.site import derived_seed

    clip = 0.05
    cfg = _cfg(three_centres, tmp_path / "run", "central-dp.mode=client-fixed", f"central-dp.clipping-norm={clip}",
               "central-dp.noise-multiplier=0.5", "central-dp.sampled-sites=3")
    grid, updates = _run(cfg)
    assert {u["n"] for u in updates.values()} == {1}
    for u in updates.values():  # each site clipped before masking
        assert sum(float(v.double().pow(2).sum()) for v in u["update"].values() if v.is_floating_point()) ** 0.5 <= clip * 1.001
    base = load_state(tmp_path / "run" / "global-round-000.safetensors")
    want = _expected(tmp_path / "run", updates, sorted(updates))
    rng = np.random.default_rng(derived_seed(cfg.seed, 1, "central-dp"))
    std = compute_stdv(0.5, clip, 3)
    for k in next(iter(updates.values()))["keys"]:  # the student's order, in which the server draws the noise
        if base[k].is_floating_point():
            want[k] = want[k] + torch.from_numpy(rng.normal(0.0, std, size=tuple(base[k].shape)).astype(np.float32))
    got = load_state(tmp_path / "run" / "global-round-001.safetensors")
    worst = max(float((got[k] - want[k]).abs().max()) for k in want if want[k].is_floating_point())
    assert worst < 1e-5, worst  # quantisation only, against noise of std ~0.008
    agg = _summary(tmp_path / "run")["rounds"][-1]["aggregate"]
    assert agg["secure_aggregation"] == 1 and agg["central_dp_epsilon"] > 0 and agg["central_dp_noise_std"] == pytest.approx(std)


@pytest.mark.parametrize("setting, message", [
    ("federation.robust=median", "federation.robust"),
    ("central-dp.mode=server-fixed", "central-dp"),
    ("central-dp.mode=client-adaptive", "central-dp"),
    ("federation.transfer-dtype=int8-delta", "transfer-dtype"),
])
def test_what_needs_one_sites_update_is_refused_with_secure_aggregation(setting, message, tiny_cfg):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg.with_overrides(["secure-aggregation.enabled=true", setting])


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
