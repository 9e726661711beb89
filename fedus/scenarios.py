"""Scenario files (`simulations/*.toml`): a named run config plus how to set the run up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedus.config import ConfigError, RunConfig, read_toml

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulations"
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


def corpus_root() -> Path:
    """$FEDUS_CORPUS, defaulting to ../shared/corpus beside the repository."""
    return Path(os.environ.get("FEDUS_CORPUS", DEFAULT_CORPUS)).expanduser().resolve()


def corpus_manifest(manifest: str = "$FEDUS_CORPUS/all_manifest.csv") -> Path:
    """A manifest path that may name $FEDUS_CORPUS, resolved (the variable defaulting to corpus_root())
    and checked to exist."""
    os.environ.setdefault("FEDUS_CORPUS", str(corpus_root()))
    path = Path(os.path.expandvars(manifest)).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"corpus manifest not found: {path} (set FEDUS_CORPUS to the corpus folder)")
    return path


@dataclass
class Scenario:
    name: str
    description: str
    fit_teacher_steps: int
    fit_teacher_lr: float
    config: RunConfig


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str, overrides: list[str] | None = None) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario '{name_or_path}' (available: {', '.join(available())})")
    raw = read_toml(path)
    meta = raw.get("scenario", {})
    run = raw.get("run", {})
    run.setdefault("scenario", path.stem)
    cfg = RunConfig.from_dict(run).with_overrides(overrides or [])
    if cfg.data.manifest:
        cfg = cfg.with_overrides({"data.manifest": str(corpus_manifest(cfg.data.manifest))})
    return Scenario(path.stem, meta.get("description", ""), int(meta.get("fit-teacher-steps", 200)),
                    float(meta.get("fit-teacher-lr", 3e-4)), cfg)
