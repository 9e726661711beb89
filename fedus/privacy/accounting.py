"""Epsilon from an accountant history, computed by Opacus' own accountants.

A history is Opacus' format: a list of (noise_multiplier, sample_rate, steps).
Composition over the whole list is what makes a site's epsilon cumulative
across rounds and runs, instead of resetting with each new PrivacyEngine.
"""

from __future__ import annotations

from collections.abc import Sequence


Entry = tuple[float, float, int]

# Why a site refused a round: numeric codes travel in the reply's metrics
# (no free text leaves a site); the server maps them back to these names.
REFUSALS = {1: "budget-exhausted", 2: "no-budget-set"}
BUDGET_EXHAUSTED, NO_BUDGET = 1, 2


def epsilon(history: Sequence[Entry], delta: float, mechanism: str = "rdp") -> float:
    """(epsilon, delta)-DP guarantee of everything in `history` (0 for an empty history)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # lazy: see fedus/privacy/dp_sgd.py

    accountant = create_accountant(mechanism)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta))


def noise_for_round(target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str = "rdp") -> float:
    """Noise multiplier that makes one round (alone) reach `target_epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=mechanism))
