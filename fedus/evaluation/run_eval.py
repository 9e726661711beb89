"""Offline evaluation of a finished (or running) run: `fedus evaluate RUN_DIR`.

Reads the run's config and its last global checkpoint, runs the protocol on every
site for teacher / federated student / local and central reference students /
random-init student, fills the cross-site matrix, computes the t-SNE
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
from fedus.reports.sections import read_summary

EVALUATION = "evaluation.json"
__all__ = ["EVALUATION", "load_run", "final_checkpoint", "start_state", "embedding_coords", "evaluate_run"]


def load_run(run_dir: Path) -> tuple[dict, RunConfig]:
    """A run dir's summary.json and the run config it records; a one-line ConfigError when it is not a run dir."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"no summary.json in {run_dir}: not a fedus run directory")
    summary = read_summary(path)
    if not isinstance(summary.get("config"), dict):
        raise ConfigError(f"{path} is not a fedus run summary (no run config)")
    return summary, RunConfig.from_dict(summary["config"])


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


def start_state(run_dir: Path, summary: dict, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The round-0 global student every site started from (rebuilt from the config when its file is gone)."""
    from fedus.models.weights import load_state
    from fedus.site import initial_student

    zero = next((run_dir / e["checkpoint"] for e in summary.get("rounds") or []
                 if e.get("round") == 0 and e.get("checkpoint")), None)
    return load_state(zero) if zero is not None and zero.is_file() else initial_student(cfg).state_dict()


def evaluate_run(run_dir: str | Path, sites: list[str] | None = None, models: tuple[str, ...] = MODELS,
                 overrides: list[str] | None = None, references: tuple[str, ...] = ("local", "central")) -> Path:
    """Evaluate the run's final global student on its sites (and its held-out, unseen centres);
    returns the path of evaluation.json.

    `references`: which reference students to distil from the run's round-0 student and score with
    the same protocol (fedus.evaluation.baselines): "local" (one per site; with it the cross-site
    matrix, every model on every site, is filled) and "central" (pooled)."""
    from fedus.evaluation.baselines import distil_central, distil_local
    from fedus.evaluation.cross_site import site_cells
    from fedus.models.weights import load_state
    from fedus.progress import progress_bar
    from fedus.site import Site, derived_seed

    run_dir = Path(run_dir)
    summary, cfg = load_run(run_dir)
    cfg = cfg.with_overrides(overrides or [])
    rnd, ckpt = final_checkpoint(run_dir, summary)
    state = load_state(ckpt)
    federation = list(summary.get("sites") or {})
    held_out = list(cfg.data.held_out_sites)
    names = sites or federation + held_out
    if not federation and not sites:
        raise ConfigError(f"no sites recorded in {run_dir}/summary.json")
    every = {n: Site(cfg, n) for n in dict.fromkeys(federation + names)}
    result = {"round": rnd, "checkpoint": ckpt.name, "config_eval": cfg.eval.model_dump(by_alias=True),
              "held_out": held_out, "sites": {}}
    local: dict[str, dict] = {}
    central = None
    wanted = [r for r in references if r in ("local", "central")]
    if wanted and federation:
        start = start_state(run_dir, summary, cfg)
        total = len(federation) * ("local" in wanted) + ("central" in wanted)
        with progress_bar(f"reference students ({', '.join(wanted)})", total=total) as bar:
            for n in federation if "local" in wanted else []:
                local[n] = distil_local(cfg, every[n].data, start, rnd)
                bar.advance()
            if "central" in wanted:
                central = distil_central(cfg, [every[n].data for n in federation], start, rnd)
                bar.advance()
        result["references"] = {"rounds": rnd, "models": wanted, "sites": federation, "private": False,
                                "note": "distilled here from the run's round-0 student without DP-SGD; "
                                        "central pools every site's training split (simulation only)"}
    emb: dict[str, list] = {"teacher": [], "student": []}
    cells: list[dict] = []
    for name in names:
        site = every[name]
        refs = {k: v for k, v in (("local", local.get(name)), ("central", central)) if v is not None}
        feats: dict[str, dict] = {}  # pooled features the protocol extracted, reused below
        result["sites"][name] = evaluate_models(cfg, site, state, models, refs, features=feats)
        if local:
            produced = {"federated": state, **{f"local:{n}": s for n, s in local.items()},
                        **({"central": central} if central is not None else {})}
            known = {cell: feats[model] for cell, model in (("federated", "student"), (f"local:{name}", "local"),
                                                             ("central", "central")) if model in feats}
            cells += site_cells(site, produced, cfg.eval.knn_k, cfg.eval.batch_size,
                                derived_seed(cfg.seed, "matrix", name), cfg.train.precision, known)
        n = min(cfg.eval.embedding_per_site, len(site.data.test))
        if n:
            subset = torch.utils.data.Subset(site.data.test, range(n))
            for model_name in ("teacher", "student"):
                if model_name in feats:
                    pooled = feats[model_name]["test"].pooled[:n]
                else:
                    model = site.teacher if model_name == "teacher" else site.student(state)
                    pooled = extract(stage_fn(model.to(site.device), 1), subset, cfg.eval.batch_size, site.device).pooled
                emb[model_name].append((name, pooled))
    result["embedding"] = embedding_coords(emb, cfg.seed)
    if cells:
        result["cross_site"] = cells
    path = run_dir / EVALUATION
    tmp = run_dir / f".{EVALUATION}.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path
