"""Reference students a federated student is judged against: "local" and "central".

- local: the same student, start weights and site step, distilled on one site's
  training split only, round after round, as if that site were the whole
  federation. What a hospital would get without the consortium.
- central: the same on the union of every site's training split, with the
  federation's whole step budget (rounds x sites x local steps). What pooling the
  images would give; it needs every site's data in one place, so it exists only
  where the data are (simulation, offline evaluation), never in a deployment.

Both are trained without DP-SGD whatever the run's privacy settings, and the
report says so: they are references, not something a site would send anywhere.
"""

from __future__ import annotations

import pandas as pd
import torch

from fedus.config import RunConfig
from fedus.data.sites import SiteData

__all__ = ["BASELINES", "reference_config", "pooled_data", "distil_local", "distil_central"]

BASELINES = ("local", "central")
CENTRAL = "central (pooled)"


def reference_config(cfg: RunConfig) -> RunConfig:
    """The run's config with DP-SGD off: references never charge a site's privacy ledger."""
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"enabled": False})})


def pooled_data(parts: list[SiteData]) -> SiteData:
    """Every site's own train and held-out rows, concatenated: no image changes side of the split."""
    return SiteData(name=CENTRAL, train_rows=pd.concat([p.train_rows for p in parts], ignore_index=True),
                    test_rows=pd.concat([p.test_rows for p in parts], ignore_index=True),
                    classes=sorted({c for p in parts for c in p.classes}), image_size=parts[0].image_size)


def _rounds(site, start: dict[str, torch.Tensor], rounds: int) -> dict[str, torch.Tensor]:
    """Rounds 1..`rounds` on the run's own clock (its configured total), as the federation ran them."""
    state = start
    for server_round in range(1, rounds + 1):
        state, _ = site.train(state, server_round, max(rounds, site.cfg.rounds))
    return state


def distil_local(cfg: RunConfig, site_data: SiteData, start: dict[str, torch.Tensor], rounds: int,
                 manifest=None) -> dict[str, torch.Tensor]:
    """`rounds` site steps on this site alone, from `start` (the run's round-0 global student)."""
    from fedus.site import Site

    return _rounds(Site.of(reference_config(cfg), site_data, manifest), start, rounds)


def distil_central(cfg: RunConfig, parts: list[SiteData], start: dict[str, torch.Tensor], rounds: int,
                   manifest=None) -> dict[str, torch.Tensor]:
    """`rounds` steps of len(parts) x local-steps on the pooled training splits (as many batches as the federation)."""
    from fedus.site import Site

    ref = reference_config(cfg)
    ref = ref.model_copy(update={"train": ref.train.model_copy(update={"local_steps": ref.train.local_steps * len(parts)})})
    return _rounds(Site.of(ref, pooled_data(parts), manifest), start, rounds)
