"""Report sections fed by the offline evaluation (evaluation.json) and the data cards.

Each builder returns rows or PNG bytes, or None when its data are absent, so the page
can say "not available in this run" instead of dropping the section silently.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedus.config import ConfigError

NOT_AVAILABLE = "not available in this run"
MODEL_NAMES = {"teacher": "teacher", "student": "federated student", "local": "local student",
               "central": "central student (pooled)", "random_init": "random init"}
# (task, metric) pairs of the per-site table, at the full label fraction
PROTOCOL_METRICS = (("knn", "acc"), ("cls", "acc"), ("cls", "macro_f1"), ("cls", "balanced_acc"),
                    ("seg", "dice"), ("seg", "iou"), ("cls-ft", "macro_f1"), ("cls-ft", "balanced_acc"),
                    ("seg-ft", "dice"), ("seg-ft", "iou"))  # -ft: full fine-tuning (eval.finetune)
PROTOCOL_HEAD = ["site", "task", "metric", *MODEL_NAMES.values(), "gap to teacher (student − teacher)",
                 "gap to central (student − central)", "student beats random init"]
UNSEEN_HEAD = ["held-out centre", "task", "metric", "teacher", "federated student (never saw it)",
               "central student (pooled)", "random init", "gap to teacher", "student beats random init"]
MATRIX_NAMES = {"cos": "cosine to the teacher", "knn_acc": "kNN accuracy", "cls_balanced_acc": "linear-head balanced accuracy"}
CARD_HEAD = ["site", "train images", "held-out images", "classes", "masks", "skipped images", "data card"]


def read_summary(path: Path) -> dict:
    """A run's summary.json, or a one-line ConfigError for a file that is not one (a truncated copy,
    another tool's file); what it must hold is the reader's to check."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError:
        summary = None
    if not isinstance(summary, dict):
        raise ConfigError(f"{path} is not a fedus run summary (not a JSON object)")
    return summary


def read_evaluation(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "evaluation.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _summary_index(evaluation: dict) -> dict[tuple, dict]:
    out = {}
    for site, res in (evaluation.get("sites") or {}).items():
        for s in (res or {}).get("summary") or []:
            try:  # a hand-edited or truncated evaluation.json must not break the whole report
                key = (site, str(s["model"]), str(s["task"]), str(s["metric"]), float(s["fraction"]))
                out[key] = {**s, "mean": float(s["mean"]), "std": float(s.get("std") or 0.0)}
            except (KeyError, TypeError, ValueError):
                continue
    return out


def _pm(s: dict | None) -> str:
    if s is None:
        return "—"
    return f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s.get("n", 1) > 1 else "")


def _gap(a: dict | None, b: dict | None) -> str:
    return "—" if a is None or b is None else f"{a['mean'] - b['mean']:+.3f}"


def protocol_rows(evaluation: dict | None, unseen: bool = False) -> list[list[str]] | None:
    """Per-site rows (teacher / federated / local / central / random init, mean ± std over seeds) at
    fraction 1.0; `unseen`: only the held-out centres (leave-one-centre-out), else only the federation's."""
    if not evaluation or not evaluation.get("sites"):
        return None
    held_out = set(evaluation.get("held_out") or [])
    idx = _summary_index(evaluation)
    rows = []
    for site in evaluation["sites"]:
        if (site in held_out) != unseen:
            continue
        for task, metric in PROTOCOL_METRICS:
            cells = {m: idx.get((site, m, task, metric, 1.0)) for m in MODEL_NAMES}
            if all(v is None for v in cells.values()):
                continue
            t, s, c, r = cells["teacher"], cells["student"], cells["central"], cells["random_init"]
            beats = "—" if s is None or r is None else ("yes" if s["mean"] > r["mean"] else "no")
            if unseen:
                rows.append([site, task, metric, _pm(t), _pm(s), _pm(c), _pm(r), _gap(s, t), beats])
            else:
                rows.append([site, task, metric, *(_pm(v) for v in cells.values()), _gap(s, t), _gap(s, c), beats])
    return rows or None


def protocol_csv_rows(evaluation: dict | None) -> list[dict[str, Any]]:
    return [{"site": k[0], **s} for k, s in _summary_index(evaluation or {}).items()]


def _matrix(evaluation: dict | None, metric: str):
    from fedus.evaluation.cross_site import matrix_rows

    cells = (evaluation or {}).get("cross_site") or []
    try:
        models, sites, values = matrix_rows(cells, metric)
    except (KeyError, TypeError):  # a hand-edited evaluation.json must not break the whole report
        return None
    if not any(v is not None for row in values for v in row):
        return None
    return models, sites, values


def cross_site_tables(evaluation: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """[(title, head, rows)] per matrix metric: rows are models, columns the sites that scored them."""
    out = []
    held_out = set((evaluation or {}).get("held_out") or [])
    for metric, title in MATRIX_NAMES.items():
        m = _matrix(evaluation, metric)
        if m is None:
            continue
        models, sites, values = m
        head = ["model ↓ · scored on →", *[f"{s} (unseen)" if s in held_out else s for s in sites]]
        out.append((title, head, [[model, *("n/a" if v is None else f"{v:.3f}" for v in row)]
                                  for model, row in zip(models, values)]))
    return out


def cross_site_png(evaluation: dict | None) -> bytes | None:
    """One heat map per matrix metric (models x sites); a site's own local student sits on its diagonal."""
    import numpy as np

    mats = [(metric, m) for metric in MATRIX_NAMES if (m := _matrix(evaluation, metric)) is not None]
    if not mats:
        return None
    models, sites = mats[0][1][0], mats[0][1][1]
    fig = Figure(figsize=(max(4.0, 1.1 * len(sites) + 2.6) * len(mats), 0.45 * len(models) + 2.0), dpi=100)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    held_out = set((evaluation or {}).get("held_out") or [])
    for ax, (metric, (models, sites, values)) in zip(axes, mats):
        grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center",
                        fontsize=7, color="w" if not np.isnan(grid[i, j]) and grid[i, j] < np.nanmean(grid) else "k")
        ax.set_xticks(range(len(sites)), [s.replace("$", "") + (" (unseen)" if s in held_out else "") for s in sites],
                      rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(models)), [m.replace("$", "") for m in models], fontsize=8)
        ax.set(title=MATRIX_NAMES[metric], xlabel="scored on (held-out split)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def label_efficiency_png(evaluation: dict | None) -> bytes | None:
    """One panel per (task, site): mean ± std vs label fraction (log x), one line per model."""
    if not evaluation or not evaluation.get("sites"):
        return None
    idx = _summary_index(evaluation)
    tasks = [(t, m) for t, m in (("cls", "macro_f1"), ("seg", "dice"), ("cls-ft", "macro_f1"), ("seg-ft", "dice"))
             if any(k[2:4] == (t, m) for k in idx)]
    sites = list(evaluation["sites"])
    if not tasks:
        return None
    fig = Figure(figsize=(3.6 * len(sites), 3.2 * len(tasks)), dpi=100)
    axes = fig.subplots(len(tasks), len(sites), squeeze=False)
    for i, (task, metric) in enumerate(tasks):
        for j, site in enumerate(sites):
            ax = axes[i][j]
            for k, (model, label) in enumerate(MODEL_NAMES.items()):
                pts = sorted((f, s) for (st, mo, ta, me, f), s in idx.items() if (st, mo, ta, me) == (site, model, task, metric))
                if pts:
                    ax.errorbar([f for f, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                                marker="o", capsize=3, color=f"C{k}", label=label)
            ax.set_xscale("log")
            ax.set(title=f"{site.replace('$', '')}: {task} {metric}", xlabel="label fraction", ylabel=metric)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def embedding_png(evaluation: dict | None) -> bytes | None:
    """t-SNE of held-out embeddings coloured by centre: teacher and federated student side by side."""
    emb = (evaluation or {}).get("embedding") or {}
    ok = lambda e: isinstance(e, dict) and all(isinstance(e.get(k), list) for k in ("x", "y", "centre")) \
        and len(e["x"]) == len(e["y"]) == len(e["centre"]) > 0  # noqa: E731
    models = [m for m in ("teacher", "student") if ok(emb.get(m))]
    if not models:
        return None
    fig = Figure(figsize=(5.5 * len(models), 4.8), dpi=100)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models):
        e = emb[model]
        centres = list(dict.fromkeys(e["centre"]))
        for k, c in enumerate(centres):
            pts = [(x, y) for x, y, cc in zip(e["x"], e["y"], e["centre"]) if cc == c]
            ax.scatter(*zip(*pts), s=10, alpha=0.7, color=f"C{k % 10}", label=c.replace("$", ""))
        ax.set(title=f"{MODEL_NAMES[model]} (t-SNE, held-out images)", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=2)
    return _png(fig)


def card_rows(summary: dict) -> list[list[str]] | None:
    """Per site: counts the site itself reported, plus its shareable data card when one was recorded."""
    sites = summary.get("sites") or {}
    rows = []
    for name, info in sites.items():
        if not isinstance(info, dict) or not info:
            continue
        g = lambda k: "—" if info.get(k) in (None, "") else info.get(k)  # noqa: E731
        classes = info.get("classes")
        skipped = info.get("skipped") or {}
        card = info.get("data_card") or info.get("card")
        if isinstance(card, str):  # sites send it as JSON text (client/replies.py)
            try:
                card = json.loads(card)
            except ValueError:
                card = None
        rows.append([name, str(g("n_train")), str(g("n_test")),
                     ", ".join(map(str, classes)) if classes else ("none" if classes == [] else "—"),
                     {True: "yes", False: "no"}.get(info.get("has_masks"), "—"),
                     ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none",
                     _card_cell(card)])
    return rows or None


def _card_cell(card: Any) -> str:
    if not card:
        return "no data card recorded"
    from fedus.intake.card import render_line  # here: that module imports pandas (~0.4 s), which a report needs not

    try:
        return render_line(card)
    except (KeyError, TypeError, AttributeError):  # not this version's card shape: show it as sent
        return json.dumps(card, sort_keys=True)


def evaluation_from_summary(summary: dict) -> dict | None:
    """The protocol as sites reported it in their last-round evaluate (eval.protocol-at = last), if any."""
    from fedus.evaluation.protocol import from_metrics

    for entry in sorted(summary.get("rounds") or [], key=lambda e: e.get("round") or 0, reverse=True):
        sites = {site: {"site": site, "rows": [], "summary": rows} for site, m in (entry.get("eval") or {}).items()
                 if isinstance(m, dict) and (rows := from_metrics(m))}
        if sites:
            return {"round": entry.get("round"), "sites": sites, "embedding": {}}
    return None
