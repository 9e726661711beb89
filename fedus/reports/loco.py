"""Leave-one-centre-out summary: one row per held-out centre, gathered from the folds' evaluations.

Each fold is an ordinary run (its own report, provenance and teacher) with one
centre in `data.held-out`; this page only lines up what every fold says about the
centre it never trained on, so a reader sees which centres the federation
generalises to and which it does not.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedus.reports.sections import PROTOCOL_METRICS, read_evaluation

__all__ = ["LOCO_FIELDS", "loco_rows", "write_loco_report"]

MODELS = ("teacher", "student", "central", "random_init")
LOCO_FIELDS = ["held_out", "task", "metric", *[f"{m}_{s}" for m in MODELS for s in ("mean", "std")], "n_seeds",
               "teacher_source", "fold_run"]


def loco_rows(folds: dict[str, Path]) -> list[dict]:
    """{held-out centre: fold run dir} -> rows at 100 % labels (mean/std over the protocol's seeds)."""
    rows = []
    for centre, fold in folds.items():
        evaluation = read_evaluation(fold) or {}
        summary = (evaluation.get("sites") or {}).get(centre, {}).get("summary") or []
        at = {(s["model"], s["task"], s["metric"]): s for s in summary if float(s["fraction"]) == 1.0}
        try:
            teacher = json.loads((fold / "summary.json").read_text())["provenance"]["teacher"]["source"]
        except (OSError, ValueError, KeyError, TypeError):
            teacher = "not recorded"
        for task, metric in PROTOCOL_METRICS:
            cells = {m: at.get((m, task, metric)) for m in MODELS}
            if all(c is None for c in cells.values()):
                continue
            row = {"held_out": centre, "task": task, "metric": metric, "teacher_source": teacher, "fold_run": fold.name,
                   "n_seeds": max(int(c.get("n", 1)) for c in cells.values() if c)}
            for m, c in cells.items():
                row[f"{m}_mean"] = None if c is None else round(float(c["mean"]), 4)
                row[f"{m}_std"] = None if c is None else round(float(c["std"]), 4)
            rows.append(row)
    return rows


def write_loco_report(run_dir: Path, folds: dict[str, Path], seed: int, data: str) -> dict[str, Path]:
    """run_dir/loco.csv and run_dir/loco.md; every fold's own report stays in its run dir."""
    import pandas as pd

    rows = loco_rows(folds)
    csv_path, md_path = run_dir / "loco.csv", run_dir / "loco.md"
    pd.DataFrame(rows, columns=LOCO_FIELDS).to_csv(csv_path, index=False)
    fmt = lambda r, m: "—" if r[f"{m}_mean"] is None else f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}"  # noqa: E731
    head = ["held-out centre", "task", "metric", "teacher", "federated student (never saw it)", "central (pooled)",
            "random init", "student beats random init"]
    lines = [f"# Leave-one-centre-out: {len(folds)} folds", "",
             f"Data: {data}. Seed {seed}. Each fold trains on every centre but the held-out one (teacher fit "
             "included, when fedus fits a stand-in teacher) and scores the held-out centre's own held-out split; "
             "100 % of its training labels go to the probes. Teacher per fold: see the teacher column of loco.csv "
             "and each fold's report.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        beats = ("—" if r["student_mean"] is None or r["random_init_mean"] is None
                 else "yes" if r["student_mean"] > r["random_init_mean"] else "no")
        lines.append("| " + " | ".join([r["held_out"], r["task"], r["metric"], *(fmt(r, m) for m in MODELS), beats]) + " |")
    lines += ["", "Fold runs: " + ", ".join(f"{c}: `{p.name}/report/report.html`" for c, p in folds.items()), ""]
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return {"loco_csv": csv_path, "loco_md": md_path}
