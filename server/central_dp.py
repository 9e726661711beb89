"""Client-level central DP: each site's update clipped to a norm, uniform mean, Gaussian noise,
epsilon composed per released round by Flower's RDP accountant (`flwr[dp]`).

The norm is fixed (`*-fixed`) or adaptive (`*-adaptive`, Andrew et al. 2021): after each released
round C <- C exp(-lr (b - target-quantile)), b the noised fraction of sites whose update norm was
<= C. Flower's adaptive wrappers count the *clipped* sites (its norm_bit) in that same formula, which
moves C the wrong way (all updates large -> C shrinks), and noise with the already-updated C; here b
is the paper's, and the noise uses the C the updates were clipped to. The count's noise takes part of
the budget: the update gets the larger multiplier of `CentralDPConfig.update_noise_multiplier`, the
accountant composes the total one. With client-side clipping each site sends one bit, norm <= C.

Flower's clipping and noise primitives are used on the student's *float* tensors
only, in fp32: Flower's strategy wrappers would also clip and noise integer
buffers (BatchNorm counters), see updates already rounded to fp16 for the wire,
and draw noise from numpy's unseeded global RNG, which would break `--resume`'s
guarantee of the same final model. Here the noise comes from a generator seeded
by (run seed, round), and the accountant's state (and the adaptive C) is checkpointed every round.

The noise is calibrated for exactly `sampled-sites` updates per round: a round
with fewer usable replies is not released (the previous global model stays),
and a federation that samples a different number of sites refuses to start.
With secure aggregation (client-fixed only) the server noises the unmasked uniform mean (`release_mean`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_adaptive_clip_model_update, compute_stdv

from fedus.config import CentralDPConfig, ConfigError
from fedus.site import derived_seed
from server.validation import update_norm as validated_norm

__all__ = ["KEY_BELOW_CLIP", "KEY_CLIPPING_NORM", "CentralDP", "CentralDPError", "clip_and_flag", "clip_update"]

CLIENT_CLIP_TOLERANCE = 1.01  # fp16 on the wire moves a clipped norm by far less than 1 %
KEY_BELOW_CLIP = "central_dp_below_clip"  # client-adaptive: a site's one bit, norm <= C (Flower's norm_bit negated)


class CentralDPError(ConfigError):
    """The federation does not match what the noise was calibrated for."""


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def clip_and_flag(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                  clipping_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """`new` with its float update (new - base) clipped to `clipping_norm` (Flower's FlatClip), in fp32,
    and whether the update was within the norm already (the adaptive-clipping bit)."""
    keys = float_keys(base)
    params = [new[k].detach().float().cpu().numpy().copy() for k in keys]
    clipped = compute_adaptive_clip_model_update(params, [base[k].float().cpu().numpy() for k in keys], clipping_norm)
    return new | {k: torch.from_numpy(p).to(new[k].dtype) for k, p in zip(keys, params)}, not clipped


def clip_update(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor], clipping_norm: float) -> dict[str, torch.Tensor]:
    """`new` with its float update clipped to `clipping_norm` (see `clip_and_flag`)."""
    return clip_and_flag(new, base, clipping_norm)[0]


def update_norm(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """The same norm the server's update validation uses (float tensors, float64)."""
    return validated_norm({k: v.detach().cpu().numpy() for k, v in new.items()},
                          {k: v.detach().cpu().numpy() for k, v in base.items()})


@dataclass
class Release:
    state: dict[str, torch.Tensor]
    facts: dict[str, float]


class CentralDP:
    def __init__(self, cfg: CentralDPConfig, min_sites: int, seed: int):
        self.cfg = cfg
        self.sites = cfg.sampled_sites or min_sites
        self.seed = seed
        self.accountant = None
        self._restored: dict | None = None
        self.clipping_norm = cfg.initial_clipping_norm if cfg.adaptive else cfg.clipping_norm  # this round's C
        try:
            self.update_multiplier = cfg.update_noise_multiplier(self.sites)
        except ValueError as err:
            raise CentralDPError(str(err)) from None

    @property
    def client_side(self) -> bool:
        return self.cfg.mode in ("client-fixed", "client-adaptive")

    def train_config(self) -> dict[str, float]:
        """What the sites are told: with client-side clipping, the norm to clip their update to."""
        return {KEY_CLIPPING_NORM: self.clipping_norm} if self.client_side else {}

    def check_sampled(self, sampled: int, population: int) -> None:
        """Refuse to go on when Flower sampled a different number of sites than the noise assumes."""
        if sampled != self.sites:
            raise CentralDPError(
                f"central DP noise is calibrated for {self.sites} sites per round but {sampled} were sampled; "
                "set central-dp.sampled-sites (or federation.min-sites / fraction-train) to match")
        if self.accountant is None:
            from flwr.serverapp import RdpAccountant  # needs flwr[dp] (dp-accounting)

            self.accountant = RdpAccountant(PrivacyConfig(
                target_delta=self.cfg.delta, population_size=max(population, self.sites),
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION))
            if self._restored:
                self.accountant.load_state_dict(self._restored)

    def release(self, server_round: int, base: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                below: list | None = None) -> Release | None:
        """The noised mean of the clipped updates, or None when the round cannot be released.
        `below`: client-adaptive, each site's bit (its update norm was <= the C it was sent)."""
        if len(updates) != self.sites or self.accountant is None:
            return None
        c = self.clipping_norm
        norms = [update_norm(u, base) for u in updates]
        if not self.client_side:
            updates, below = (list(x) for x in zip(*(clip_and_flag(u, base, c) for u in updates)))
        elif max(norms) > c * CLIENT_CLIP_TOLERANCE:  # a site that did not clip: never released unclipped
            return None
        if self.cfg.adaptive and (below is None or len(below) != self.sites or any(b not in (0, 1) for b in below)):
            return None  # a client-adaptive site without its bit: C cannot be updated as accounted
        mean = {k: sum(u[k].float() - base[k].float() for u in updates) / self.sites for k in float_keys(base)}
        release = self.noised(server_round, base, mean)
        release.facts["central_dp_clipped_sites"] = sum(n > c for n in norms)
        if self.cfg.adaptive:
            release.facts |= self.adapt(server_round, [int(b) for b in below])
        return release

    def release_mean(self, server_round: int, base: dict[str, torch.Tensor], mean: dict[str, torch.Tensor],
                     contributed: int) -> Release | None:
        """Under secure aggregation: the noised uniform mean of `contributed` site-clipped updates, which the
        server only ever sees summed (client-fixed mode; it cannot check one site's norm, SecAgg+ bounds
        each coordinate). None when the round cannot be released as calibrated."""
        if contributed != self.sites or self.accountant is None or not self.client_side or self.cfg.adaptive:
            return None
        return self.noised(server_round, base, {k: mean[k].float() for k in float_keys(base)})

    def noised(self, server_round: int, base: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> Release:
        """base + mean update + Gaussian noise (std z C / sites, seeded by run seed and round), composed
        into the accountant."""
        c, z = self.clipping_norm, self.cfg.noise_multiplier
        std = compute_stdv(self.update_multiplier, c, self.sites)
        rng = np.random.default_rng(derived_seed(self.seed, server_round, "central-dp"))
        state = dict(base)
        for k in float_keys(base):
            noise = torch.from_numpy(rng.normal(0.0, std, size=tuple(base[k].shape)).astype(np.float32))
            state[k] = (base[k].float() + mean[k] + noise).to(base[k].dtype)
        self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=self.sites,
                                                     population_size=self.accountant.config.population_size))
        spent = self.accountant.get_privacy_spent()
        return Release(state, {"central_dp_epsilon": spent.epsilon, "central_dp_delta": spent.delta,
                               "central_dp_noise_std": std})

    def adapt(self, server_round: int, below: list[int]) -> dict[str, float]:
        """Andrew et al.'s geometric step of C towards the target quantile, from the noised count of
        sites within C (seeded like the update's noise, so a resumed run takes the same steps)."""
        rng = np.random.default_rng(derived_seed(self.seed, server_round, "central-dp-count"))
        b = (sum(below) + rng.normal(0.0, self.cfg.count_stddev(self.sites))) / self.sites
        used, self.clipping_norm = self.clipping_norm, self.clipping_norm * math.exp(
            -self.cfg.clip_norm_lr * (b - self.cfg.target_quantile))
        return {"central_dp_clipping_norm": used, "central_dp_next_clipping_norm": self.clipping_norm,
                "central_dp_clipped_sites": self.sites - sum(below), "central_dp_below_fraction": b}

    def state_dict(self) -> dict | None:
        if self.accountant is None:
            return None
        return {"accountant": self.accountant.state_dict(), "clipping_norm": self.clipping_norm}

    def load_state_dict(self, state: dict | None) -> None:
        """A resumed run's adaptive C (now) and accountant history (applied when the accountant is built).
        Also reads the older form, the accountant's state alone."""
        if state and "accountant" in state:
            if self.cfg.adaptive:
                self.clipping_norm = float(state["clipping_norm"])
            state = state["accountant"]
        self._restored = state
