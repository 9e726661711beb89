"""Server optimisers (`federation.server-optimizer`): Flower's FedAdam, FedYogi, FedAdagrad, FedAvgM
applied to the aggregate fedus already made.

fedus aggregates itself (validation, FedAvg or a robust rule, central DP), so only the optimiser
step is wanted from Flower. Each Flower strategy computes its own FedAvg first
(`super().aggregate_train`) and then steps; putting `_Given` between it and FedAvg in the MRO
makes that first call return fedus's aggregate, so the step is Flower's code, unchanged.

Only floating tensors that are trained are stepped: integer buffers (BatchNorm's
`num_batches_tracked`) and BatchNorm running statistics keep the plain aggregate, because a
pseudo-gradient step can push a running variance below zero.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedus.config import FederationConfig

FLOWER = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "fedavgm": FedAvgM}
DEFAULT_LR = {"fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1, "fedavgm": 1.0}  # Flower's own defaults
NOT_STEPPED = ("running_mean", "running_var")


class _Given(FedAvg):
    """Stands in for FedAvg's aggregation under a Flower optimiser: the aggregate fedus made."""

    given: ArrayRecord | None = None

    def aggregate_train(self, server_round, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.given, None


def stepped(key: str, value: torch.Tensor) -> bool:
    return value.is_floating_point() and not key.endswith(NOT_STEPPED)


class ServerOptimizer:
    """One Flower optimiser strategy, used only for its step; its state is a flat tensor dict so a
    checkpoint can hold it (`state_dict` / `load_state_dict`)."""

    def __init__(self, fed: FederationConfig):
        name = fed.server_optimizer
        lr = fed.server_lr or DEFAULT_LR[name]
        if name == "fedavgm":
            kwargs = {"server_learning_rate": lr, "server_momentum": fed.server_momentum}
        else:
            kwargs = {"eta": lr, "tau": fed.tau} | ({} if name == "fedadagrad" else {"beta_1": fed.beta_1, "beta_2": fed.beta_2})
        self.name = name
        self.flower = type(f"{FLOWER[name].__name__}OnAggregate", (FLOWER[name], _Given), {})(**kwargs)
        self.keys: list[str] = []  # the stepped keys, in the model's order (FedAvgM keeps a list)

    def step(self, server_round: int, current: dict[str, torch.Tensor],
             aggregate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`current`: the model the sites trained from; `aggregate`: fedus's aggregate of their models.
        `server_round` is the true round (FedAdam's bias correction uses it), also after a resume."""
        self.keys = [k for k, v in aggregate.items() if stepped(k, v)]
        opt = self.flower
        opt.given = ArrayRecord({k: aggregate[k] for k in self.keys})
        if isinstance(opt, FedAvgM):
            opt.current_arrays = ArrayRecord({k: current[k] for k in self.keys})
            if isinstance(opt.momentum_vector, dict):  # restored from a checkpoint, keyed by name
                opt.momentum_vector = [opt.momentum_vector[k] for k in self.keys]
        else:  # FedOpt takes it in configure_train, as numpy, every round
            opt.current_arrays = {k: current[k].numpy() for k in self.keys}
        new, _ = opt.aggregate_train(server_round, [])
        new = new.to_torch_state_dict()
        return aggregate | {k: new[k].to(aggregate[k].dtype) for k in self.keys}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Moments (FedOpt: m_t, v_t; FedAvgM: momentum). The current arrays are the round's global
        checkpoint and Flower's step takes the round number, so nothing else is needed."""
        opt = self.flower
        if isinstance(opt, FedAvgM):  # a list in self.keys' order, or still the restored dict
            vector = opt.momentum_vector or {}
            moments = {"momentum": vector if isinstance(vector, dict) else dict(zip(self.keys, vector, strict=True))}
        else:
            moments = {"m_t": opt.m_t or {}, "v_t": opt.v_t or {}}
        return {f"{moment}/{k}": torch.from_numpy(np.ascontiguousarray(v))
                for moment, arrays in moments.items() for k, v in arrays.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        moments: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            moment, name = key.split("/", 1)
            moments.setdefault(moment, {})[name] = value.numpy()
        if isinstance(self.flower, FedAvgM):
            self.flower.momentum_vector = moments.get("momentum") or None  # a list again at the next step
        else:
            self.flower.m_t, self.flower.v_t = moments.get("m_t") or None, moments.get("v_t") or None
