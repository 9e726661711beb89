"""A site's privacy ledger: every DP-SGD round it ever ran, in one JSON file at the site.

The file, not the process, is the source of truth: a restarted client (or a
new run) reads it back and keeps composing, so epsilon never resets. It is
rewritten atomically (temp file + os.replace) so a crash mid-write leaves the
previous ledger, never a truncated one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedus.privacy.accounting import Entry, epsilon

VERSION = 1


class PrivacyLedger:
    def __init__(self, path: str | Path, mechanism: str = "rdp"):
        self.path = Path(path)
        self.mechanism = mechanism
        self.rounds: list[dict] = []
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("mechanism", mechanism) != mechanism:
                # composing RDP and PRV figures would give neither accountant's guarantee
                raise ValueError(f"ledger uses the {data['mechanism']} accountant, config asks for {mechanism}")
            self.rounds = list(data.get("rounds", []))

    @property
    def history(self) -> list[Entry]:
        """Opacus accountant history: (noise_multiplier, sample_rate, steps) per round trained."""
        return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in self.rounds]

    def epsilon(self, delta: float, extra: list[Entry] | None = None) -> float:
        return epsilon(self.history + list(extra or []), delta, self.mechanism)

    def record(self, entry: Entry, delta: float, **facts) -> float:
        """Append one round's DP-SGD and persist; returns the new total epsilon."""
        before = self.epsilon(delta)
        noise, rate, steps = entry
        row = {"noise_multiplier": float(noise), "sample_rate": float(rate), "steps": int(steps), "delta": delta}
        self.rounds.append(row | facts)
        total = self.epsilon(delta)
        row.update(epsilon_round=total - before, epsilon_total=total)
        self.save()
        return total

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": VERSION, "mechanism": self.mechanism, "rounds": self.rounds}, indent=1))
        os.replace(tmp, self.path)


def simulation_ledger_path(cfg, site_name: str) -> Path:
    """Simulation only: one ledger per site under privacy.ledger-dir (or the run dir)."""
    from fedus.config import ConfigError

    root = cfg.privacy.ledger_dir or (str(Path(cfg.run_dir) / "privacy-ledgers") if cfg.run_dir else "")
    if not root:
        raise ConfigError("privacy.enabled needs privacy.ledger-dir (or run-dir) for the sites' privacy ledgers")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in site_name)
    return Path(root).expanduser() / f"{safe}.json"
