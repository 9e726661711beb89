"""Offline evaluation of a finished (or running) run: `fedus evaluate RUN_DIR`.

Reads the run's config and its last global checkpoint, runs the protocol on every
site for teacher / federated student / random-init student, computes the t-SNE
embedding picture's coordinates, and writes RUN_DIR/evaluation.json, which
`fedus report` picks up. Separate from summary.json, which only the server writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.manifold import TSNE

from fedus.config import ConfigError, RunConfig
from fedus.evaluation.protocol import MODELS, evaluate_models, extract, stage_fn

EVALUATION = "evaluation.json"
__all__ = ["EVALUATION", "load_run", "final_checkpoint", "embedding_coords", "evaluate_run"]


def load_run(run_dir: Path) -> tuple[dict, RunConfig]:
    """A run dir's summary.json and the run config it records; a one-line ConfigError when it is not a run dir."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"no summary.json in {run_dir}: not a fedus run directory")
    try:
        summary = json.loads(path.read_text())
        config = summary["config"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a fedus run summary (unreadable, or no run config)") from None
    return summary, RunConfig.from_dict(config)


def final_checkpoint(run_dir: Path, summary: dict) -> tuple[int, Path]:
    done = [(e["round"], run_dir / e["checkpoint"]) for e in summary.get("rounds") or []
            if e.get("checkpoint") and (run_dir / e["checkpoint"]).is_file()]
    if not done:
        raise ConfigError(f"no global checkpoint in {run_dir}")
    return max(done)


def embedding_coords(per_model: dict[str, list[tuple[str, np.ndarray]]], seed: int) -> dict:
    """{model: [(centre, features [n,C])...]} -> {model: {"x", "y", "centre"}} from scikit-learn's t-SNE."""
    out = {}
    for model, parts in per_model.items():
        feats = np.concatenate([f for _, f in parts]) if parts else np.zeros((0, 1))
        if len(feats) < 5:
            continue
        xy = TSNE(n_components=2, perplexity=min(30.0, (len(feats) - 1) / 3), init="pca", random_state=seed
                  ).fit_transform(np.nan_to_num(feats.astype(np.float64)))
        centres = [c for c, f in parts for _ in range(len(f))]
        out[model] = {"x": xy[:, 0].round(4).tolist(), "y": xy[:, 1].round(4).tolist(), "centre": centres}
    return out


def evaluate_run(run_dir: str | Path, sites: list[str] | None = None, models: tuple[str, ...] = MODELS,
                 overrides: list[str] | None = None) -> Path:
    """Evaluate the run's final global student on its sites; returns the path of evaluation.json."""
    from fedus.site import Site

    run_dir = Path(run_dir)
    summary, cfg = load_run(run_dir)
    cfg = cfg.with_overrides(overrides or [])
    rnd, ckpt = final_checkpoint(run_dir, summary)
    from fedus.models.weights import load_state

    state = load_state(ckpt)
    names = sites or list(summary.get("sites") or {})
    if not names:
        raise ConfigError(f"no sites recorded in {run_dir}/summary.json")
    result = {"round": rnd, "checkpoint": ckpt.name, "config_eval": cfg.eval.model_dump(by_alias=True), "sites": {}}
    emb: dict[str, list] = {"teacher": [], "student": []}
    for name in names:
        site = Site(cfg, name)
        result["sites"][name] = evaluate_models(cfg, site, state, models)
        n = min(cfg.eval.embedding_per_site, len(site.data.test))
        if n:
            subset = torch.utils.data.Subset(site.data.test, range(n))
            for model_name, model in (("teacher", site.teacher), ("student", site.student(state))):
                fn = stage_fn(model.to(site.device), 1)
                emb[model_name].append((name, extract(fn, subset, cfg.eval.batch_size, site.device).pooled))
    result["embedding"] = embedding_coords(emb, cfg.seed)
    path = run_dir / EVALUATION
    tmp = run_dir / f".{EVALUATION}.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path
