"""Sample-level differential privacy at a site: DP-compatible students, DP-SGD, the privacy ledger."""

from fedus.privacy.accounting import BUDGET_EXHAUSTED, NO_BUDGET, REFUSALS, epsilon, noise_for_round
from fedus.privacy.dp_sgd import DPPlan, PrivateTraining
from fedus.privacy.ledger import PrivacyLedger

__all__ = ["BUDGET_EXHAUSTED", "NO_BUDGET", "REFUSALS", "DPPlan", "PrivacyLedger", "PrivateTraining", "epsilon",
           "noise_for_round", "make_dp_compatible"]


def make_dp_compatible(model, arch: str = ""):
    """Lazy: importing timm model classes is only needed when a DP student is built."""
    from fedus.privacy.compat import make_dp_compatible as _fix

    return _fix(model, arch)
