"""The run directory: global checkpoints per round and a summary JSON, written atomically.

The summary is the single source for reports; it is rewritten after every
round so a crashed or running run can still be reported on (as incomplete).
"""

from __future__ import annotations

import json
import os
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fedus import __version__
from fedus.config import RunConfig
from fedus.config import ConfigError
from fedus.models import load_state, save_state

SUMMARY = "summary.json"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_run_dir(scenario: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path.cwd() / "runs" / f"{scenario}-{stamp}").resolve()


def provenance(cfg: RunConfig, data_description: str, student_params: int) -> dict[str, Any]:
    """What every figure must carry: which teacher (and whose weights), which data, splits, seed."""
    t = cfg.teacher
    return {
        "teacher": {"arch": t.arch, "weights": t.weights or f"none (random init, seed derived from {cfg.seed})", "source": t.source, "blocks": t.blocks, "combine": t.combine},
        "student": {"arch": cfg.student.arch, "init": f"random init, seed {cfg.seed}", "params": student_params},
        "data": {"source": data_description, "manifest": cfg.data.manifest, "site_column": cfg.data.site_column,
                 "image_size": cfg.data.image_size},
        "splits": (f"per site, grouped by patient_id and near-duplicate groups (no group on both sides), "
                   f"label-stratified by group, test fraction {cfg.data.test_fraction}, seed {cfg.seed}"),
        "seed": cfg.seed,
    }


def describe_data(cfg: RunConfig) -> str:
    d = cfg.data
    if d.source == "synthetic":
        return (f"synthetic B-mode (fedus built-in generator: {d.synthetic_centres} centres x "
                f"{d.synthetic_images_per_centre} images, seed {cfg.seed})")
    return f"manifest {d.manifest} (sites = '{d.site_column}' column)"


def round_line(summary: dict[str, Any], server_round: int) -> str | None:
    """The operator's one line for a finished round: who answered, training loss, held-out cosine
    to the teacher (under evaluate-with-train the latest evaluated student's, one round behind),
    privacy spent. None while the round is not in the record."""
    rounds = {e["round"]: e for e in summary.get("rounds", [])}
    entry = rounds.get(server_round)
    if entry is None:
        return None
    agg = entry.get("aggregate", {})
    parts = [f"round {server_round}:"]

    def mean(e: dict[str, Any], kind: str, key: str) -> float | None:
        values = [float(m[key]) for m in e.get(kind, {}).values() if key in m]
        return sum(values) / len(values) if values else None

    for kind, verb in (("train", "trained"), ("eval", "evaluated")):
        if f"{kind}_sites_replied" in agg:
            failed = agg.get(f"{kind}_sites_failed", 0)
            parts.append(f"{agg[f'{kind}_sites_replied']} sites {verb}" + (f" ({failed} failed)" if failed else "") + ",")
    if (loss := mean(entry, "train", "train_loss_last")) is not None:
        parts.append(f"train loss {loss:.4g},")
    evaluated = [r for r in sorted(rounds) if r <= server_round and mean(rounds[r], "eval", "cos") is not None]
    if evaluated:
        r = evaluated[-1]
        whose = f" (round {r}'s student)" if r != server_round else ""
        parts.append(f"held-out cos {mean(rounds[r], 'eval', 'cos'):.3f}{whose},")
    spent = [float(s["epsilon_total"]) for s in summary.get("privacy", {}).values() if "epsilon_total" in s]
    if spent:
        parts.append(f"site epsilon up to {max(spent):.3g},")
    if "central_dp_epsilon" in agg:
        parts.append(f"central epsilon {float(agg['central_dp_epsilon']):.3g},")
    if "quorum_not_met" in agg:
        parts.append("quorum not met (global student kept),")
    return " ".join(parts).rstrip(",")


SERVER_STATE = "server-state.json"


def _rng_from_json(value: list) -> tuple:
    version, internal, gauss = value
    return version, tuple(internal), gauss


class RunRecorder:
    def __init__(self, run_dir: str | Path, cfg: RunConfig, prov: dict[str, Any]):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.strategy_state: dict | None = None  # restored by `resume`
        self.optimizer_state: dict[str, torch.Tensor] | None = None  # restored by `resume`
        self.summary: dict[str, Any] = {
            "fedus_version": __version__, "status": "running", "started": now(), "finished": None,
            "scenario": cfg.scenario, "config": cfg.to_dict(), "provenance": prov, "sites": {}, "rounds": [],
        }
        self.flush()

    @classmethod
    def resume(cls, run_dir: str | Path, cfg: RunConfig) -> tuple["RunRecorder", int, dict[str, torch.Tensor]]:
        """Continue a run from its last *completed* round (trained, aggregated, checkpointed; its
        evaluation, if still owed, is done by the resumed run first or carried by its first train message).

        Rounds after it are dropped from the record and run again; the server's RNG state
        saved with that round is restored, so the continuation equals an uninterrupted run.
        """
        run_dir = Path(run_dir)
        try:
            summary = json.loads((run_dir / SUMMARY).read_text())
            state_file = json.loads((run_dir / SERVER_STATE).read_text())
        except FileNotFoundError:
            raise ConfigError(f"nothing to resume in {run_dir}: no {SUMMARY} / {SERVER_STATE}") from None
        saved = RunConfig.from_dict(summary["config"]).model_copy(update={"run_dir": "", "resume": False, "rounds": 0})
        if saved != cfg.model_copy(update={"run_dir": "", "resume": False, "rounds": 0}):
            raise ConfigError(f"cannot resume {run_dir} with a different run config (only rounds may change)")
        done = [e["round"] for e in summary["rounds"] if "checkpoint" in e
                and (run_dir / e["checkpoint"]).is_file() and e["round"] <= int(state_file["round"])]
        if not done:
            raise ConfigError(f"nothing to resume in {run_dir}: no completed round")
        last = max(done)
        rec = cls.__new__(cls)
        rec.dir = run_dir
        rec.summary = summary
        summary["rounds"] = [e for e in summary["rounds"] if e["round"] <= last]
        summary.setdefault("resumed", []).append({"at": now(), "from_round": last})
        summary.update(status="running", finished=None, config=cfg.to_dict())
        history = state_file.get("rng_history", {})
        if str(last) in history:
            random.setstate(_rng_from_json(history[str(last)]))
        rec.strategy_state = state_file.get("strategy_history", {}).get(str(last))
        rec.optimizer_state = None
        if opt_file := state_file.get("optimizer_history", {}).get(str(last)):
            if not (run_dir / opt_file).is_file():
                raise ConfigError(f"cannot resume {run_dir}: {opt_file} (server optimiser state of round {last}) is missing")
            rec.optimizer_state = load_state(run_dir / opt_file)
        rec.flush()
        return rec, last, load_state(run_dir / f"global-round-{last:03d}.safetensors")

    def _round(self, server_round: int) -> dict[str, Any]:
        for entry in self.summary["rounds"]:
            if entry["round"] == server_round:
                return entry
        entry = {"round": server_round}
        self.summary["rounds"].append(entry)
        self.summary["rounds"].sort(key=lambda e: e["round"])
        return entry

    def record_sites(self, sites: dict[str, dict[str, Any]]) -> None:
        self.summary["sites"].update(sites)

    def record(self, server_round: int, kind: str, per_site: dict[str, dict[str, float]], failed: int = 0) -> None:
        entry = self._round(server_round)
        entry.setdefault(kind, {}).update(per_site)
        entry.setdefault("aggregate", {})[f"{kind}_sites_replied"] = len(per_site)
        entry["aggregate"][f"{kind}_sites_failed"] = failed
        self.flush()

    def record_counts(self, server_round: int, counts: dict[str, int]) -> None:
        """Extra per-round counters (refused / rejected sites); zeros are left out."""
        self._round(server_round).setdefault("aggregate", {}).update({k: v for k, v in counts.items() if v})
        self.flush()

    def record_privacy(self, server_round: int, per_site: dict[str, dict[str, Any]]) -> None:
        """Per site: epsilon spent each round, total so far (as the site's ledger reports it), refusals."""
        privacy = self.summary.setdefault("privacy", {})
        for site, m in per_site.items():
            if "epsilon_total" not in m and "refusal" not in m:
                continue
            entry = privacy.setdefault(site, {"epsilon_per_round": {}, "refused_rounds": {}})
            for key in ("epsilon_total", "epsilon_budget", "delta"):
                if key in m:
                    entry[key] = m[key]
            if "refusal" in m:
                entry["refused_rounds"][str(server_round)] = m["refusal"]
            else:
                entry["epsilon_per_round"][str(server_round)] = m.get("epsilon_round", 0.0)
        self.flush()

    def record_coreset(self, server_round: int, facts: dict[str, Any]) -> None:
        """The round's coreset plan: global threshold, images kept of all (sites' own counts are in `train`)."""
        self._round(server_round)["coreset"] = facts
        self.flush()

    def checkpoint(self, server_round: int, state: dict[str, torch.Tensor], strategy_state: dict | None = None,
                   optimizer_state: dict[str, torch.Tensor] | None = None) -> Path:
        """`strategy_state`: what the server's strategy must carry over a resume (e.g. the central-DP
        accountant), JSON-serialisable, saved with the round. `optimizer_state`: the server optimiser's
        tensors (FedAdam moments, ...), too large for JSON: a safetensors file beside the checkpoint,
        written before server-state.json names it, so a crash in between leaves the previous round current."""
        name = f"global-round-{server_round:03d}.safetensors"
        path = save_state(state, self.dir / name, metadata={"round": str(server_round), "fedus": __version__})
        self._round(server_round)["checkpoint"] = name
        opt_file = None
        if optimizer_state is not None:
            opt_file = f"server-optimizer-round-{server_round:03d}.safetensors"
            save_state(optimizer_state, self.dir / opt_file, metadata={"round": str(server_round), "fedus": __version__})
        self._save_server_state(server_round, strategy_state, opt_file)
        self.flush()
        return path

    def _save_server_state(self, server_round: int, strategy_state: dict | None = None, optimizer_file: str | None = None) -> None:
        """Round number, the server's RNG state and the strategy's state per checkpoint, written atomically."""
        path = self.dir / SERVER_STATE
        state = json.loads(path.read_text()) if path.is_file() else {}
        history = state.get("rng_history", {})
        history[str(server_round)] = random.getstate()
        if strategy_state is not None:
            state.setdefault("strategy_history", {})[str(server_round)] = strategy_state
        if optimizer_file is not None:
            state.setdefault("optimizer_history", {})[str(server_round)] = optimizer_file
        state.update(round=server_round, strategy="FedAvg" if self.summary["config"]["federation"].get("robust", "none") == "none"
                     else self.summary["config"]["federation"]["robust"], rng_history=history,
                     server_optimizer=self.summary["config"]["federation"].get("server-optimizer", "none"))
        tmp = self.dir / f".{SERVER_STATE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def finish(self, status: str = "completed") -> None:
        self.summary.update(status=status, finished=now())
        self.flush()

    def flush(self) -> None:
        tmp = self.dir / f".{SUMMARY}.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=float))
        os.replace(tmp, self.dir / SUMMARY)
