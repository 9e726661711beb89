"""The global training clock: where the whole federated run is, not where one site is.

Schedules that span the run (repulsive-KD's beta) must agree across sites that
run different numbers of local steps, so progress is defined by the server's
round counter: progress = (server_round - 1 + local_step / local_steps) / rounds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundClock:
    """What the server sends each round (`server-round`, `rounds`); 1-based rounds."""

    server_round: int = 1
    rounds: int = 1

    def progress(self, local_step: int, local_steps: int) -> float:
        """Fraction of the run done before `local_step` (0-based) of this round, in [0, 1]."""
        within = min(max(local_step, 0), local_steps) / max(local_steps, 1)
        done = (max(self.server_round, 1) - 1 + within) / max(self.rounds, 1)
        return min(max(done, 0.0), 1.0)


def linear_schedule(start: float, end: float, progress: float) -> float:
    """start at progress 0, end at progress 1, linear between (clamped outside)."""
    p = min(max(progress, 0.0), 1.0)
    return start + (end - start) * p
