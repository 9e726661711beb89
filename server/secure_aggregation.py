"""Secure aggregation (SecAgg+) rounds: the server unmasks only the sum of the sites' updates.

Flower 1.41/1.42 runs SecAgg+ only on its legacy workflow path: `SecAggPlusWorkflow`
driving a legacy `Strategy`, with `secaggplus_mod` at each site. This module is the
bridge to it and nothing more. Sampling, per-site train configs (coreset), evaluation,
the run record and checkpoints stay FedusFedAvg's; the protocol (key agreement,
Shamir shares of the mask seeds, masking, recovery of dropped sites, unmasking) is
Flower's own. Each site sends its update (student minus the global it received),
weighted by its training images; the server adds the unmasked weighted mean to the
global student. A site that refuses a round (its privacy budget) still takes part
with weight 0, so its refusal reaches the record without revealing anything.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedus.config import ConfigError
from fedus.transfer import LAYOUT_KEY, unpack
from server.strategy import FedusFedAvg

KEYS_KEY = "secagg-keys"  # the student's tensor names, in the order of the legacy Parameters list
CLIP_KEY, MAX_WEIGHT_KEY = "secagg-clipping-range", "secagg-max-weight"  # so a site can report what it clipped
MODULUS = 2 ** 32  # Flower's largest mask modulus
DEFAULT_MAX_WEIGHT = 1000.0  # before any site said its size (a resumed run without round 0): Flower's default


class _Instructions(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: hands out fedus's per-site instructions and keeps
    what it is given back, which is only the unmasked mean and each site's metrics."""

    def __init__(self, instructions: dict[int, FitIns], grid: Grid):
        self.instructions, self.grid = instructions, grid
        self.results: list[tuple[int, dict]] | None = None
        self.mean: Parameters | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, self.grid.run.run_id), ins) for node, ins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):
        # Flower sets every result's parameters to the one unmasked mean before this call
        self.results = [(proxy.node_id, dict(res.metrics)) for proxy, res in results]
        self.mean = results[0][1].parameters if results else None
        return self.mean, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def max_weight(strategy: FedusFedAvg) -> float:
    """`secure-aggregation.max-weight`, or the largest training set the sites reported (round 0); 1 under
    central DP, where every site weighs 1 (the noise is calibrated for the uniform mean)."""
    if strategy.central_dp is not None:
        return 1.0
    set_value = strategy.cfg.secure_aggregation.max_weight
    if set_value:
        return set_value
    sizes = [int(s.get("n_train", 0)) for s in strategy.recorder.summary.get("sites", {}).values()]
    return float(max(sizes)) if any(sizes) else DEFAULT_MAX_WEIGHT


def secure_round(strategy: FedusFedAvg, grid: Grid, context: Context, server_round: int, arrays: ArrayRecord,
                 train_config: ConfigRecord, timeout: float) -> ArrayRecord | None:
    """One training round under SecAgg+; the new global student, or None (kept as it was)."""
    sa = strategy.cfg.secure_aggregation
    messages = strategy.configure_train(server_round, arrays, train_config, grid)
    if not messages:
        return None
    if len(messages) * 2 ** sa.quantization_bits >= MODULUS:  # the unmasked sum would wrap around
        raise ConfigError(f"secure-aggregation: {len(messages)} sites x 2^{sa.quantization_bits} levels exceed the "
                          f"2^32 mask modulus; lower secure-aggregation.quantization-bits")
    # the global student as sent (transfer dtype), by name: SecAgg+ masks Flower's legacy unnamed arrays
    wire = unpack(messages[0].content["arrays"].to_torch_state_dict(), str(messages[0].content["config"][LAYOUT_KEY]))
    keys = list(arrays)  # the student's own order (the server draws central DP noise in it), not the packed one
    params = ndarrays_to_parameters([wire[k].numpy() for k in keys])
    weight = max_weight(strategy)
    extra = {KEYS_KEY: "\n".join(keys), CLIP_KEY: sa.clipping_range, MAX_WEIGHT_KEY: weight}
    bridge = _Instructions({m.metadata.dst_node_id: FitIns(params, {k: v for k, v in dict(m.content["config"]).items()
                                                                    if k != LAYOUT_KEY} | extra)
                            for m in messages}, grid)
    legacy = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                                   state=RecordDict(), run_config=context.run_config),
                           config=ServerConfig(num_rounds=strategy.cfg.rounds, round_timeout=timeout), strategy=bridge)
    legacy.state[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round + strategy.offset})
    legacy.state[MAIN_PARAMS_RECORD] = ArrayRecord()  # Flower reads it for configure_fit, which sends `params` itself
    workflow = SecAggPlusWorkflow(
        num_shares=sa.count(sa.num_shares), reconstruction_threshold=sa.count(sa.reconstruction_threshold),
        max_weight=weight, clipping_range=sa.clipping_range, quantization_range=2 ** sa.quantization_bits,
        modulus_range=MODULUS, timeout=timeout)
    try:
        workflow(grid, legacy)
    except ZeroDivisionError:  # Flower divides by the total weight: every site refused (weight 0)
        log(WARNING, "round %s: every site that took part refused (total weight 0)", server_round + strategy.offset)
    mean = None
    if bridge.mean is not None:
        mean = {k: torch.from_numpy(a) for k, a in zip(keys, parameters_to_ndarrays(bridge.mean), strict=True)}
    return strategy.aggregate_secure(server_round, bridge.results or [], mean)


def run_secure(strategy: FedusFedAvg, grid: Grid, context: Context, arrays: ArrayRecord, num_rounds: int,
               timeout: float, train_config: ConfigRecord, evaluate_config: ConfigRecord) -> ArrayRecord:
    """Flower's `Strategy.start` round loop with the training exchange under SecAgg+; evaluation as ever."""
    for server_round in range(1, num_rounds + 1):
        new = secure_round(strategy, grid, context, server_round, arrays, train_config, timeout)
        arrays = new if new is not None else arrays
        replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, evaluate_config, grid),
                                        timeout=timeout)
        strategy.aggregate_evaluate(server_round, replies)
    return arrays


def is_secure_instruction(msg: Message) -> bool:
    """A train message of the SecAgg+ path (legacy FitIns records), not a Message-API one."""
    return "fitins.parameters" in msg.content.array_records
