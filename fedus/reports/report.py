"""Turn a run's summary.json into per-site CSV tables, a plot, and a Markdown/HTML report.

The report is per site on purpose: sites differ in devices and case mix, and an average
would hide a site where distillation did not help. Everything here is read-only with
respect to the run and tolerant of partial summaries (the server rewrites summary.json
every round, so a report may be generated mid-run).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedus.config import describe_blocks
from fedus.reports.sections import (CARD_HEAD, NOT_AVAILABLE, PROTOCOL_HEAD, UNSEEN_HEAD, card_rows, cross_site_png,
                                    cross_site_tables, embedding_png, evaluation_from_summary, label_efficiency_png,
                                    protocol_csv_rows, protocol_rows, read_evaluation, read_summary)
from fedus.reports.privacy import (EpsilonRecord, epsilon_csv_rows, epsilon_png, epsilon_record, epsilon_table, epsilon_text,
                                   secure_aggregation_text)
from matplotlib.ticker import MaxNLocator

__all__ = ["write_report", "PROBE_METRICS", "SECTIONS"]

PROBE_METRICS = ("cls_acc", "cls_f1", "seg_dice", "seg_iou")
_NOT_FM = "not a foundation model"

# ---------------------------------------------------------------------------- reading


def _num(value: Any) -> float | None:
    """A finite number or None: summaries may hold null/NaN/strings for failed evaluations."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _rounds(summary: dict) -> list[dict]:
    """Round entries sorted by round number (position used when "round" is missing)."""
    out = []
    for i, entry in enumerate(summary.get("rounds") or []):
        if isinstance(entry, dict):
            r = entry.get("round")
            out.append({**entry, "round": int(r) if _num(r) is not None else i})
    return sorted(out, key=lambda e: e["round"])


def _site_names(summary: dict, rounds: list[dict]) -> list[str]:
    """Sites declared in summary["sites"] first, then any that only appear in rounds."""
    names = list((summary.get("sites") or {}).keys())
    extra = {s for e in rounds for sec in ("eval", "train") for s in (e.get(sec) or {}) if s not in names}
    return names + sorted(extra)


def _series(rounds: list[dict], section: str, site: str, metric: str) -> list[tuple[int, float]]:
    """(round, value) pairs where the site reported a finite value for the metric."""
    pts = []
    for e in rounds:
        v = _num(((e.get(section) or {}).get(site) or {}).get(metric))
        if v is not None:
            pts.append((e["round"], v))
    return pts


def _at(pts: list[tuple[int, float]], rnd: int) -> float | None:
    return next((v for r, v in pts if r == rnd), None)


def _first(pts):
    return pts[0][1] if pts else None


def _last_trained(pts: list[tuple[int, float]]) -> tuple[int | None, float | None]:
    """Last value after at least one federated round (round > 0): round 0 is the random init."""
    after = [p for p in pts if p[0] > 0]
    return after[-1] if after else (None, None)


# ---------------------------------------------------------------------------- tables


def _site_row(site: str, info: dict, rounds: list[dict]) -> dict[str, Any]:
    """One sites.csv row; None where a value does not exist (site lacks labels, round missing)."""
    cos = _series(rounds, "eval", site, "cos")
    mse = _series(rounds, "eval", site, "mse")
    final_round, cos_final = _last_trained(cos)
    row: dict[str, Any] = {
        "site": site,
        "n_train": info.get("n_train"),
        "n_test": info.get("n_test"),
        "cos_round0": _at(cos, 0),
        "cos_final": cos_final,
        "mse_round0": _at(mse, 0),
        "mse_final": _last_trained(mse)[1],
        "final_round": final_round,
        "loss_first_round_before": _first(_series(rounds, "train", site, "loss_before")),
        "loss_last_round_after": (_series(rounds, "train", site, "loss_after") or [(None, None)])[-1][1],
    }
    for m in PROBE_METRICS:
        student_round, student = _last_trained(_series(rounds, "eval", site, m))
        rand = _at(_series(rounds, "eval", site, m), 0)
        row[f"teacher_{m}"] = _first(_series(rounds, "eval", site, f"teacher_{m}"))  # frozen: any round
        row[f"random_init_{m}"] = rand
        row[f"student_{m}"] = student
        row[f"student_round_{m}"] = student_round
        row[f"student_beats_random_{m}"] = None if student is None or rand is None else student > rand
    return row


def _rounds_long(rounds: list[dict]) -> list[dict[str, Any]]:
    """Long format (round, site, metric, value); train_/aggregate_ prefixes, aggregate has no site."""
    rows = []
    for e in rounds:
        for section, prefix in (("eval", ""), ("train", "train_")):
            for site, metrics in (e.get(section) or {}).items():
                for k, v in (metrics or {}).items():
                    if _num(v) is not None:
                        rows.append({"round": e["round"], "site": site, "metric": prefix + k, "value": _num(v)})
        for k, v in (e.get("aggregate") or {}).items():
            if _num(v) is not None:
                rows.append({"round": e["round"], "site": "", "metric": "aggregate_" + k, "value": _num(v)})
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "True" if v else "False"
    return repr(v) if isinstance(v, float) else str(v)


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: _cell(r.get(k)) for k in fields} for r in rows)


def _site_fields() -> list[str]:
    base = ["site", "n_train", "n_test", "cos_round0", "cos_final", "mse_round0", "mse_final", "final_round",
            "loss_first_round_before", "loss_last_round_after"]
    for m in PROBE_METRICS:
        base += [f"teacher_{m}", f"random_init_{m}", f"student_{m}", f"student_round_{m}", f"student_beats_random_{m}"]
    return base


# ---------------------------------------------------------------------------- plot


def _label(site: str) -> str:
    """Matplotlib hides labels starting with "_" and parses $...$ as math: neutralise both."""
    s = site.replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _plot(path: Path, rounds: list[dict], sites: list[str]) -> None:
    """Two panels: held-out cosine to teacher vs round; local train loss (before dashed, after solid)."""
    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax_cos, ax_loss = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(sites))]
    for site, c in zip(sites, colours):
        cos = _series(rounds, "eval", site, "cos")
        if cos:
            ax_cos.plot(*zip(*cos), marker="o", color=c, label=_label(site))
        for metric, style in (("loss_before", "--"), ("loss_after", "-")):
            pts = _series(rounds, "train", site, metric)
            if pts:
                name = f"{_label(site)} ({metric.split('_')[1]})"
                ax_loss.plot(*zip(*pts), linestyle=style, marker=".", color=c, label=name)
    ax_cos.set(title="Held-out cosine to teacher (per site)", xlabel="round", ylabel="cosine")
    ax_loss.set(title="Local train loss (dashed: before, solid: after)", xlabel="round", ylabel="loss")
    for ax in (ax_cos, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------- text


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _provenance_items(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs for the provenance block, in reading order; missing values say so."""
    prov = summary.get("provenance") or {}
    t, s, d = prov.get("teacher") or {}, prov.get("student") or {}, prov.get("data") or {}
    seed = prov.get("seed", (summary.get("config") or {}).get("seed"))
    g = lambda obj, k: "(not recorded)" if obj.get(k) in (None, "") else str(obj.get(k))  # noqa: E731
    return [
        ("Teacher", f"{g(t, 'arch')}, {describe_blocks(t['blocks']) if t.get('blocks') else 'blocks (not recorded)'}"),
        ("Teacher weights", g(t, "weights")),
        ("Teacher source", g(t, "source")),
        ("Student", f"{g(s, 'arch')} ({g(s, 'params')} params)"),
        ("Student init", g(s, "init")),
        ("Data", g(d, "source")),
        ("Manifest", f"{g(d, 'manifest')} (site column: {g(d, 'site_column')})"),
        ("Splits", g(prov, "splits")),
        ("Training images", _training_images_note(summary)),
        ("Seed", "(not recorded)" if seed is None else str(seed)),
        ("Scenario", g(summary, "scenario")),
        ("fedus version", g(summary, "fedus_version")),
        ("Status", g(summary, "status")),
        ("Started / finished", f"{g(summary, 'started')} / {g(summary, 'finished')}"),
        ("Evaluation protocol", _protocol_note(summary)),
    ]


def _training_images_note(summary: dict) -> str:
    """A coreset run trained on a fraction of the data: the report must say so, and how much each round kept."""
    c = (summary.get("config") or {}).get("coreset") or {}
    if not c:
        return "(not recorded)"
    if not c.get("enabled"):
        return "every image of each site's train split (no coreset selection)"
    kept = [f"round {e['round']}: {e['coreset'].get('kept')} of {e['coreset'].get('total')}"
            for e in summary.get("rounds") or [] if isinstance(e.get("coreset"), dict)]
    return (f"a coreset (fedus.coreset): {c.get('budget', 0) * 100:g} % of all sites' training images, "
            f"ranking '{c.get('prefer')}', re-scored every {c.get('rescore-every')} round(s); kept "
            + ("; ".join(kept) if kept else "(not recorded)"))


def _protocol_note(summary: dict) -> str:
    ev = (summary.get("config") or {}).get("eval") or {}
    if not ev.get("label-fractions"):
        return "(not recorded)"
    return (f"label fractions {ev['label-fractions']} of each site's train split (stratified, whole leakage groups), "
            f"{ev.get('seeds')} seeds each; linear head on pooled frozen features; stage decoder "
            f"({ev.get('decoder-stages')} stages, width {ev.get('decoder-width')}, {ev.get('decoder-steps')} steps) "
            f"for masks; kNN k={ev.get('knn-k')}")


def _warnings(summary: dict) -> list[str]:
    """Statements that must be impossible to miss: incomplete run, teacher not a foundation model."""
    out = []
    status = summary.get("status")
    if status != "completed":
        out.append(f"INCOMPLETE RUN: status is '{status or 'unknown'}', not 'completed'; "
                   "final values below are from the last round recorded so far.")
    source = str(((summary.get("provenance") or {}).get("teacher") or {}).get("source") or "")
    if _NOT_FM in source.lower():
        out.append(f"Teacher: {source}")
    return out


def _na_reason(info: dict, metric: str) -> str | None:
    """Why a probe metric cannot exist for a site (no labels / no masks), else None."""
    if metric.startswith("cls_") and "classes" in info and len(info.get("classes") or []) < 2:
        return "n/a (no labels)"
    if metric.startswith("seg_") and info.get("has_masks") is False:
        return "n/a (no masks)"
    return None


def _probe_rows(rows: list[dict], infos: dict) -> list[list[str]]:
    out = []
    for r in rows:
        info = infos.get(r["site"]) or {}
        for m in PROBE_METRICS:
            na = _na_reason(info, m)
            vals = [r[f"teacher_{m}"], r[f"random_init_{m}"], r[f"student_{m}"], r[f"student_beats_random_{m}"]]
            if na and all(v is None for v in vals):
                out.append([r["site"], m, na, na, na, "", ""])
            else:
                rnd = r[f"student_round_{m}"]
                student = _fmt(vals[2]) + ("" if rnd is None else f" (round {rnd})")
                gap = "—" if vals[0] is None or vals[2] is None else f"{vals[2] - vals[0]:+.3f}"
                out.append([r["site"], m, _fmt(vals[0]), _fmt(vals[1]), student, gap, _fmt(vals[3])])
    return out


def _overview_rows(rows: list[dict]) -> list[list[str]]:
    def final(r, key):  # name the round: a site that missed later rounds has an older "final"
        return _fmt(r[key]) + ("" if r["final_round"] is None else f" (round {r['final_round']})")

    return [[r["site"], _fmt(r["n_train"]), _fmt(r["n_test"]),
             f"{_fmt(r['cos_round0'])} → {final(r, 'cos_final')}", f"{_fmt(r['mse_round0'])} → {final(r, 'mse_final')}",
             f"{_fmt(r['loss_first_round_before'])} → {_fmt(r['loss_last_round_after'])}"] for r in rows]


OVERVIEW_HEAD = ["site", "n_train", "n_test", "cosine to teacher: round 0 → final", "MSE: round 0 → final",
                 "train loss: first (before) → last (after)"]
PROBE_HEAD = ["site", "probe metric", "teacher", "random-init student (round 0)", "distilled student",
              "gap to teacher (student − teacher)", "student beats random init"]
SECTIONS = ("Provenance", "Per-site results", "Cross-site matrix", "Unseen centres", "Label-efficiency curves",
            "Per-round curves", "Epsilon per round", "Privacy and update validation", "Data cards", "Embeddings (t-SNE)",
            "How to read this")
_NO_EVAL = f"{NOT_AVAILABLE} (run `fedus evaluate RUN_DIR`, then `fedus report RUN_DIR`)"
_NO_UNSEEN = ("no centre was held out of this run (leave-one-centre-out: `fedus loco --scenario NAME` runs one "
              "federation per held-out centre)")
_PROTOCOL_TITLE = ("Evaluation protocol: teacher / federated student / local student / central student / random init "
                   "(100 % labels, mean ± std)")
_REFERENCES = ("Local student: the same start weights and site step on that site's data alone, for as many rounds. "
               "Central student: the same on every site's training split pooled, with the federation's whole step "
               "budget (simulation only). Both are trained by `fedus evaluate` without DP-SGD, as references.")
HOW_TO_READ = (
    "Every number is per site, never averaged across sites, because sites differ in device "
    "and case mix and an average would hide a site where distillation did not help. Cosine and MSE compare the "
    "global student's features with the frozen teacher's on the site's held-out split (round 0 is the random-init "
    "student, before any federated training). Probe metrics come from light heads on frozen features (logistic "
    "regression for the class, a small U-Net-style decoder over the last encoder stages for the mask; the same "
    "heads as the evaluation protocol, at 100 % labels and one seed), fitted on the site's train split and scored "
    "on its held-out split; they are only as trustworthy as the teacher they are compared with. A dash means the "
    "value was not recorded; n/a means the site has no labels or masks for that probe."
)


def _md_cell(v: str) -> str:
    """Markdown table cell: '|' would split the cell, '<' could inject HTML when rendered."""
    return v.replace("|", r"\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(summary: dict, rows: list[dict], evaluation: dict | None, png_names: dict[str, str | None],
              eps: EpsilonRecord) -> str:
    infos = summary.get("sites") or {}
    table = lambda head, body: _md_table(head, body) if body else f"*{NOT_AVAILABLE}*"  # noqa: E731
    img = lambda key, alt: f"![{alt}]({png_names[key]})" if png_names.get(key) else f"*{_NO_EVAL}*"  # noqa: E731
    parts = [f"# fedus run report — {_md_cell(str(summary.get('scenario') or 'unnamed scenario'))}", ""]
    parts += [f"> **⚠ {_md_cell(w)}**\n" for w in _warnings(summary)]
    parts += ["## Provenance", ""]
    parts += [f"- **{k}:** {_md_cell(v)}" for k, v in _provenance_items(summary)]
    parts += ["", "## Per-site results", "", _md_table(OVERVIEW_HEAD, _overview_rows(rows)), "",
              "### Probes: teacher / random-init student / distilled student", "",
              _md_table(PROBE_HEAD, _probe_rows(rows, infos)), "",
              f"### {_PROTOCOL_TITLE}", "", _REFERENCES, "",
              _md_table(PROTOCOL_HEAD, protocol_rows(evaluation)) if protocol_rows(evaluation) else f"*{_NO_EVAL}*", "",
              "## Cross-site matrix", "",
              *([f"### {t}\n\n{_md_table(h, b)}\n" for t, h, b in cross_site_tables(evaluation)]
                + [img("cross_site_png", "cross-site heat map"), ""] if cross_site_tables(evaluation) else [f"*{_NO_EVAL}*", ""]),
              "## Unseen centres", "",
              _md_table(UNSEEN_HEAD, protocol_rows(evaluation, unseen=True)) if protocol_rows(evaluation, unseen=True)
              else f"*{_NO_UNSEEN}*", "",
              "## Label-efficiency curves", "", img("label_efficiency_png", "label-efficiency curves"), "",
              "## Per-round curves", "", img("per_round_png", "per-round curves"), "",
              "## Epsilon per round", "", *[f"{_md_cell(t)}\n" for t in epsilon_text(eps)],
              *([img("epsilon_png", "cumulative epsilon per round"), "", _md_table(*epsilon_table(eps)), ""]
                if eps.spent else []),
              "## Privacy and update validation", "", *[f"{_md_cell(t)}\n" for t in secure_aggregation_text(summary)],
              table(PRIVACY_HEAD, _privacy_rows(summary)), "",
              "## Data cards", "", table(CARD_HEAD, card_rows(summary)), "",
              "## Embeddings (t-SNE)", "", img("embedding_png", "t-SNE of held-out embeddings"), "",
              "## How to read this", "", HOW_TO_READ, ""]
    return "\n".join(parts)


PRIVACY_HEAD = ["site", "epsilon per round", "epsilon total", "budget", "delta", "refused rounds", "rejected updates"]


def _privacy_rows(summary: dict) -> list[list[str]]:
    """Sites' DP spend as their ledgers reported it, refusals, and updates the server rejected."""
    privacy = summary.get("privacy") or {}
    rejected: dict[str, list[str]] = {}
    for entry in summary.get("rounds") or []:
        for site, m in (entry.get("train") or {}).items():
            if isinstance(m, dict) and "rejected" in m:
                rejected.setdefault(site, []).append(f"{entry.get('round')}: {m['rejected']}")
    rows = []
    for site in sorted(set(privacy) | set(rejected)):
        p = privacy.get(site, {})
        per_round = ", ".join(f"r{r}: {_fmt(v)}" for r, v in (p.get("epsilon_per_round") or {}).items())
        refused = ", ".join(f"r{r}: {why}" for r, why in (p.get("refused_rounds") or {}).items())
        rows.append([site, per_round or "-", _fmt(p.get("epsilon_total")), _fmt(p.get("epsilon_budget")),
                     f"{p['delta']:.1e}" if isinstance(p.get("delta"), float) else "-", refused or "-", "; ".join(rejected.get(site, [])) or "-"])
    return rows


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}"
        ".warn{background:#fff3cd;border:2px solid #d39e00;padding:.8em;font-weight:bold;margin:.6em 0}"
        ".prov{background:#eef3fb;border:1px solid #9db4d9;padding:.8em}img{max-width:100%}"
        ".na{color:#666;font-style:italic}pre{font-size:80%;white-space:pre-wrap}")


def _html(summary: dict, rows: list[dict], evaluation: dict | None, pngs: dict[str, bytes | None],
          eps: EpsilonRecord) -> str:
    e = html.escape
    title = f"fedus run report — {summary.get('scenario') or 'unnamed scenario'}"
    warn = "".join(f'<div class="warn">⚠ {e(w)}</div>' for w in _warnings(summary))
    prov = "".join(f"<li><b>{e(k)}:</b> {e(v)}</li>" for k, v in _provenance_items(summary))
    config = json.dumps(summary.get("config"), indent=1, sort_keys=True) if summary.get("config") else None
    prov += ("<li><details><summary><b>Run config</b></summary><pre>" + e(config) + "</pre></details></li>" if config
             else f"<li><b>Run config:</b> {NOT_AVAILABLE}</li>")

    def na(text: str = NOT_AVAILABLE) -> str:
        return f'<p class="na">{e(text)}</p>'

    def table(head, body) -> str:
        return _html_table(head, body) if body else na()

    def img(key: str, alt: str, missing: str = _NO_EVAL) -> str:
        data = pngs.get(key)
        return (f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
                if data else na(missing))

    sec = lambda name, body: f'<section id="{name.split()[0].lower()}"><h2>{e(name)}</h2>\n{body}</section>\n'  # noqa: E731
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>{e(title)}</h1>\n{warn}\n"
        f'<div class="prov">{sec("Provenance", f"<ul>{prov}</ul>")}</div>\n'
        + sec("Per-site results", _html_table(OVERVIEW_HEAD, _overview_rows(rows))
              + "<h3>Probes: teacher / random-init student / distilled student</h3>\n"
              + _html_table(PROBE_HEAD, _probe_rows(rows, summary.get("sites") or {}))
              + f"<h3>{e(_PROTOCOL_TITLE)}</h3>\n<p>{e(_REFERENCES)}</p>\n"
              + (_html_table(PROTOCOL_HEAD, protocol_rows(evaluation)) if protocol_rows(evaluation) else na(_NO_EVAL)))
        + sec("Cross-site matrix", "".join(f"<h3>{e(t)}</h3>\n" + _html_table(h, b) for t, h, b in cross_site_tables(evaluation))
              + img("cross_site_png", "cross-site heat map"))
        + sec("Unseen centres", _html_table(UNSEEN_HEAD, protocol_rows(evaluation, unseen=True))
              if protocol_rows(evaluation, unseen=True) else na(_NO_UNSEEN))
        + sec("Label-efficiency curves", img("label_efficiency_png", "label-efficiency curves"))
        + sec("Per-round curves", img("per_round_png", "per-round curves", NOT_AVAILABLE))
        + sec("Epsilon per round", "".join(f"<p>{e(t)}</p>" for t in epsilon_text(eps))
              + (img("epsilon_png", "cumulative epsilon per round") + _html_table(*epsilon_table(eps)) if eps.spent else ""))
        + sec("Privacy and update validation", "".join(f"<p>{e(t)}</p>" for t in secure_aggregation_text(summary))
              + table(PRIVACY_HEAD, _privacy_rows(summary)))
        + sec("Data cards", table(CARD_HEAD, card_rows(summary)))
        + sec("Embeddings (t-SNE)", img("embedding_png", "t-SNE of held-out embeddings"))
        + sec("How to read this", f"<p>{e(HOW_TO_READ)}</p>")
        + "</body></html>\n"
    )


# ---------------------------------------------------------------------------- entry point


def write_report(run_dir: Path) -> dict[str, Path]:
    """Reads run_dir/summary.json (and evaluation.json from `fedus evaluate`, when present); writes
    run_dir/report/{sites.csv, rounds.csv, protocol.csv, cross_site.csv, report.md, report.html, *.png}; returns their paths.

    Keys: sites_csv, rounds_csv, protocol_csv, cross_site_csv, report_md, report_html, per_round_png, and
    label_efficiency_png / embedding_png / cross_site_png only when the run has been evaluated offline,
    epsilon_png only when the run spent epsilon (DP-SGD at sites or central DP).
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no summary.json in {run_dir}")
    summary = read_summary(summary_path)
    evaluation = read_evaluation(run_dir) or evaluation_from_summary(summary)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sites_csv": out / "sites.csv", "rounds_csv": out / "rounds.csv", "protocol_csv": out / "protocol.csv",
             "cross_site_csv": out / "cross_site.csv",
             "report_md": out / "report.md", "report_html": out / "report.html", "per_round_png": out / "per_round.png"}

    rounds = _rounds(summary)
    sites = _site_names(summary, rounds)
    infos = summary.get("sites") or {}
    rows = [_site_row(s, infos.get(s) or {}, rounds) for s in sites]
    _write_csv(paths["sites_csv"], rows, _site_fields())
    eps = epsilon_record(summary, rounds)
    long = sorted(_rounds_long(rounds) + epsilon_csv_rows(eps), key=lambda r: r["round"])  # stable: order within a round kept
    _write_csv(paths["rounds_csv"], long, ["round", "site", "metric", "value"])
    _write_csv(paths["protocol_csv"], protocol_csv_rows(evaluation),
               ["site", "model", "task", "metric", "fraction", "n", "mean", "std"])
    _write_csv(paths["cross_site_csv"], (evaluation or {}).get("cross_site") or [], ["model", "site", "metric", "value"])
    _plot(paths["per_round_png"], rounds, sites)
    pngs = {"per_round_png": paths["per_round_png"].read_bytes(), "label_efficiency_png": label_efficiency_png(evaluation),
            "embedding_png": embedding_png(evaluation), "epsilon_png": epsilon_png(eps),
            "cross_site_png": cross_site_png(evaluation)}
    for key in ("label_efficiency_png", "embedding_png", "epsilon_png", "cross_site_png"):
        stale = out / f"{key[:-4]}.png"
        if pngs[key]:
            paths[key] = stale
            stale.write_bytes(pngs[key])
        elif stale.exists():
            stale.unlink()  # from an earlier evaluation/report: must not sit beside a report that lacks it
    names = {k: p.name for k, p in paths.items() if k.endswith("_png")}
    paths["report_md"].write_text(_markdown(summary, rows, evaluation, names, eps), encoding="utf-8")
    paths["report_html"].write_text(_html(summary, rows, evaluation, pngs, eps), encoding="utf-8")
    return paths
