"""The evaluation protocol for one encoder on one site, and for saved checkpoints.

Per encoder (teacher, federated student, random-init student): kNN accuracy on
frozen pooled features; a linear head (accuracy, macro-F1, balanced accuracy)
and a stage decoder (Dice, IoU) trained on label fractions of the site's train
split, several seeds each, scored on the held-out split. Features are computed
once per encoder; only heads train. Result rows are long format
(model, task, metric, fraction, seed, value) so reports can take mean +- std.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from fedus.config import EvalConfig, RunConfig
from fedus.data.manifest import read_near_duplicates
from fedus.data.sites import SiteData, resolve_manifest
from fedus.data.splits import leakage_groups
from fedus.evaluation.decoder import decoder_probe
from fedus.evaluation.fractions import label_fraction_subset, parse_fractions
from fedus.evaluation.knn import knn_accuracy
from fedus.models import Student, Teacher
from fedus.models.backbones import feature_maps
from fedus.models.weights import load_state

__all__ = ["MODELS", "Features", "extract", "linear_head", "class_metrics", "run_protocol", "site_groups", "stage_fn",
           "evaluate_models", "evaluate_checkpoint", "summarise", "to_metrics", "from_metrics"]

MODELS = ("teacher", "student", "random_init")
StageFn = Callable[[torch.Tensor], list[torch.Tensor]]  # [B,3,H,W] -> maps, fine to coarse


def stage_fn(model: Student | Teacher, stages: int) -> StageFn:
    """The last `stages` intermediate maps of a frozen encoder (teacher or student alike)."""
    model.eval()
    return lambda x: feature_maps(model.backbone, model.normalize(x), stages)


@dataclass
class Features:
    pooled: np.ndarray  # [N, C] global average of the last stage
    labels: np.ndarray  # [N], -1 = unlabelled
    mask_idx: np.ndarray  # images with a mask
    stages: list[torch.Tensor]  # float16 maps of the masked images only
    masks: torch.Tensor  # [M,1,H,W] bool

    def pooled_only(self) -> "Features":
        """Without the stage maps and masks (the large part), for later consumers of the pooled features."""
        return Features(self.pooled, self.labels, self.mask_idx, [], self.masks[:0])


@torch.no_grad()
def extract(fn: StageFn, dataset, batch_size: int, device: torch.device) -> Features:
    pooled, labels, has_mask, masks, stages = [], [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        maps = fn(batch["image"].to(device))
        pooled.append(maps[-1].float().mean((2, 3)).cpu())
        labels.append(batch["label"])
        keep = batch["has_mask"].bool()
        has_mask.append(keep)
        masks.append(batch["mask"][keep] > 0.5)
        stages.append([m[keep.to(m.device)].half().cpu() for m in maps])
    if not pooled:
        return Features(np.zeros((0, 0)), np.zeros(0, int), np.zeros(0, int), [], torch.zeros(0, 1, 1, 1, dtype=torch.bool))
    return Features(torch.cat(pooled).numpy(), torch.cat(labels).numpy(), torch.cat(has_mask).nonzero().flatten().numpy(),
                    [torch.cat(s) for s in zip(*stages)], torch.cat(masks))


def linear_head(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int) -> dict[str, float]:
    """Standardised features, L2 logistic regression (C=1, class-balanced): a deliberately weak head, so
    differences between encoders reflect their features; {} when undefined (one class, empty test)."""
    if len(test_x) == 0 or len(np.unique(train_y)) < 2:
        return {}
    train_x, test_x = np.nan_to_num(train_x.astype(np.float64)), np.nan_to_num(test_x.astype(np.float64))
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed)
    pred = clf.fit(scaler.transform(train_x), train_y).predict(scaler.transform(test_x))
    return class_metrics(test_y, pred, np.union1d(train_y, test_y))


def class_metrics(true: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 over `labels`, balanced accuracy (scikit-learn), for every classification head."""
    with warnings.catch_warnings():  # a predicted class absent from a small test split is expected, not news
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(true, pred))
    return {"acc": float(accuracy_score(true, pred)),
            "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
            "balanced_acc": balanced}


def site_groups(data: SiteData, manifest: Path | None) -> np.ndarray:
    """Leakage group of every loaded train image (patient + near-duplicates); each image its own group
    when some rows failed to load (their order can no longer be matched to the manifest)."""
    n = len(data.train)
    if manifest is None or len(data.train_rows) != n:
        return np.arange(n)
    return leakage_groups(data.train_rows, read_near_duplicates(manifest))


def _sub_seed(seed: int, fraction: float, rep: int) -> int:
    return (seed * 1_000_003 + int(round(fraction * 1000)) * 101 + rep) % (2**31 - 1)


@contextmanager
def _timed(timings: dict[str, float] | None, part: str):
    began = time.perf_counter()
    yield
    if timings is not None:
        timings[part] = timings.get(part, 0.0) + time.perf_counter() - began


def run_protocol(fn: StageFn, data: SiteData, groups: np.ndarray, ecfg: EvalConfig, seed: int,
                 device: torch.device, timings: dict[str, float] | None = None, model=None,
                 pooled_out: dict[str, Features] | None = None) -> list[dict]:
    """Rows {task, metric, fraction, seed, value} for one encoder on one site.

    `model` (the encoder `fn` reads) with eval.finetune: also "cls-ft" / "seg-ft" rows from full
    fine-tuning (fedus.evaluation.finetune) on the same label-fraction subsets and seeds.
    `timings`: seconds per part are added to it ("extract", "knn", "cls:<fraction>", "seg:<fraction>",
    "cls-ft:<fraction>", ...), so bench/eval_cost.py times this very code rather than a copy of it.
    `pooled_out`: gets {"train", "test"} pooled features (`Features.pooled_only`), so the cross-site
    matrix and the embedding picture need no second pass of the same encoder."""
    with _timed(timings, "extract"):
        train = extract(fn, data.train, ecfg.batch_size, device)
        test = extract(fn, data.test, ecfg.batch_size, device)  # ends in .cpu(): synchronised
    if pooled_out is not None:
        pooled_out.update(train=train.pooled_only(), test=test.pooled_only())
    rows: list[dict] = []
    add = lambda task, scores, frac, rep: rows.extend(  # noqa: E731
        {"task": task, "metric": k, "fraction": frac, "seed": rep, "value": v} for k, v in scores.items())
    lab_tr, lab_te = np.flatnonzero(train.labels >= 0), np.flatnonzero(test.labels >= 0)
    if len(lab_tr) and len(lab_te):
        with _timed(timings, "knn"):
            acc = knn_accuracy(train.pooled[lab_tr], train.labels[lab_tr], test.pooled[lab_te], test.labels[lab_te], ecfg.knn_k)
        if acc is not None:
            add("knn", {"acc": acc}, 1.0, 0)
    seg = len(train.mask_idx) > 0 and len(test.mask_idx) > 0
    for frac in parse_fractions(ecfg.label_fractions):
        for rep in range(ecfg.seeds):
            s = _sub_seed(seed, frac, rep)
            if len(lab_tr) and len(lab_te):
                with _timed(timings, f"cls:{frac:g}"):
                    sub = lab_tr[label_fraction_subset(train.labels[lab_tr], groups[lab_tr], frac, s)]
                    add("cls", linear_head(train.pooled[sub], train.labels[sub], test.pooled[lab_te], test.labels[lab_te], s),
                        frac, rep)
            if seg:
                with _timed(timings, f"seg:{frac:g}"):
                    sub = label_fraction_subset(train.labels[train.mask_idx], groups[train.mask_idx], frac, s)
                    add("seg", decoder_probe([m[sub] for m in train.stages], train.masks[sub], test.stages, test.masks,
                                             ecfg.decoder_width, ecfg.decoder_steps, seed=s), frac, rep)
            if ecfg.finetune and model is not None:
                rows += _finetune_rows(model, data, groups, train, test, ecfg, frac, rep, s, device, timings)
    return rows


def _finetune_rows(model, data: SiteData, groups: np.ndarray, train: Features, test: Features, ecfg: EvalConfig,
                   frac: float, rep: int, s: int, device: torch.device, timings: dict[str, float] | None) -> list[dict]:
    from fedus.evaluation.finetune import finetune

    rows = []
    lab_tr, lab_te = np.flatnonzero(train.labels >= 0), np.flatnonzero(test.labels >= 0)
    tasks = []
    if len(lab_tr) and len(lab_te) and len(data.classes) > 1:
        tasks.append(("cls", lab_tr[label_fraction_subset(train.labels[lab_tr], groups[lab_tr], frac, s)], lab_te))
    if len(train.mask_idx) and len(test.mask_idx):
        sub = train.mask_idx[label_fraction_subset(train.labels[train.mask_idx], groups[train.mask_idx], frac, s)]
        tasks.append(("seg", sub, test.mask_idx))
    for task, tr, te in tasks:
        with _timed(timings, f"{task}-ft:{frac:g}"):
            scores, _ = finetune(model, task, data.train, tr, data.test, te, len(data.classes), ecfg, s, device)
        rows += [{"task": f"{task}-ft", "metric": k, "fraction": frac, "seed": rep, "value": v} for k, v in scores.items()]
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and (population) std over seeds per (model, task, metric, fraction)."""
    keys: dict[tuple, list[float]] = {}
    for r in rows:
        keys.setdefault((r.get("model", ""), r["task"], r["metric"], r["fraction"]), []).append(r["value"])
    return [{"model": m, "task": t, "metric": k, "fraction": f, "n": len(v), "mean": float(np.mean(v)),
             "std": float(np.std(v))} for (m, t, k, f), v in keys.items()]


def evaluate_models(cfg: RunConfig, site, state: dict[str, torch.Tensor] | None,
                    models: tuple[str, ...] = MODELS, references: dict[str, dict[str, torch.Tensor]] | None = None,
                    features: dict[str, dict[str, Features]] | None = None) -> dict:
    """The protocol for the chosen models on a `fedus.site.Site`: teacher, student (from `state`), random init,
    and the reference students in `references` ({"local": state, "central": state}, fedus.evaluation.baselines).
    `features`: filled per model name with its pooled train/test features (see `run_protocol`)."""
    from fedus.site import derived_seed

    groups = site_groups(site.data, site.manifest or resolve_manifest(cfg.data, cfg.seed))
    seed = derived_seed(cfg.seed, "protocol", site.name)
    students = {"student": state, "random_init": None, **(references or {})}
    rows = []
    for name in [*models, *(references or {})]:
        if name == "student" and state is None:
            continue
        model = site.teacher if name == "teacher" else site.student(students[name])
        fn = stage_fn(model.to(site.device), cfg.eval.decoder_stages)
        sink = features.setdefault(name, {}) if features is not None else None
        rows += [{"model": name, **r} for r in run_protocol(fn, site.data, groups, cfg.eval, seed, site.device,
                                                            model=model, pooled_out=sink)]
    return {"site": site.name, "rows": rows, "summary": summarise(rows)}


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str | Path, site: str | int,
                        models: tuple[str, ...] = MODELS, manifest: Path | None = None) -> dict:
    """Score a saved global student (`global-round-XXX.safetensors`) on a site, with the same protocol
    for the teacher and the random-init student."""
    from fedus.site import Site

    out = evaluate_models(cfg, Site(cfg, site, manifest), load_state(checkpoint), models)
    return {**out, "checkpoint": str(checkpoint)}


PREFIX = "le"  # scalar-metric form of a summary row, for the ClientApp's last-round evaluate


def to_metrics(summary: list[dict]) -> dict[str, float]:
    """Summary rows -> flat scalar metrics 'le:model:task:metric:fraction:{mean,std,n}' (what may leave a site)."""
    out: dict[str, float] = {}
    for s in summary:
        key = f"{PREFIX}:{s['model']}:{s['task']}:{s['metric']}:{s['fraction']:g}"
        out.update({f"{key}:mean": s["mean"], f"{key}:std": s["std"], f"{key}:n": s["n"]})
    return out


def from_metrics(metrics: dict) -> list[dict]:
    """Inverse of `to_metrics` (keys without the prefix are ignored)."""
    rows: dict[tuple, dict] = {}
    for key, value in metrics.items():
        parts = str(key).split(":")
        if len(parts) != 6 or parts[0] != PREFIX or parts[5] not in ("mean", "std", "n"):
            continue
        try:
            frac = float(parts[4])
        except ValueError:
            continue
        row = rows.setdefault(tuple(parts[1:4]) + (frac,), dict(zip(("model", "task", "metric", "fraction"), parts[1:4] + [frac])))
        row[parts[5]] = value
    return [{**r, "n": int(r.get("n", 1))} for r in rows.values() if "mean" in r and "std" in r]
