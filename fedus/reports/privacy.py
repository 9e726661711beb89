"""The report's epsilon section: privacy spent per round, as the run record holds it.

Two guarantees with different units are kept apart (never summed, never on one axis):
sample-level DP-SGD at each site (cumulative epsilon from the site's own ledger, its own
delta) and client-level central DP on the aggregate (the server's accountant, one delta).
A run with no DP says so in words: an empty plot would read as "nothing spent yet".
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["EpsilonRecord", "SiteEpsilon", "epsilon_record", "epsilon_text", "epsilon_table", "epsilon_png",
           "epsilon_csv_rows", "NO_DP"]

NO_DP = ("This run used no differential privacy: no site ran DP-SGD (no privacy ledger reported any epsilon) and "
         "the server applied no central DP, so there is no epsilon to plot and the student carries no formal "
         "privacy guarantee.")


@dataclass
class SiteEpsilon:
    site: str
    points: list[tuple[int, float]]  # (round, cumulative epsilon of the site's ledger after that round)
    per_round: dict[int, float]
    refused: dict[int, str]
    delta: float | None
    budget: float | None
    prior: float  # ledger spend outside this run's recorded rounds (an earlier run, a round re-run after resume)


@dataclass
class EpsilonRecord:
    sites: list[SiteEpsilon] = field(default_factory=list)
    central: list[tuple[int, float]] = field(default_factory=list)  # (round, cumulative client-level epsilon)
    central_delta: float | None = None
    configured: list[str] = field(default_factory=list)  # DP mechanisms the run config switched on
    accountant: str | None = None

    @property
    def spent(self) -> bool:
        return bool(self.central) or any(s.points for s in self.sites)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _round_keys(d: Any) -> dict[int, Any]:
    out = {}
    for k, v in (d or {}).items() if isinstance(d, dict) else ():
        try:
            out[int(k)] = v
        except (TypeError, ValueError):
            continue
    return out


def epsilon_record(summary: dict, rounds: list[dict]) -> EpsilonRecord:
    """Epsilon per round from summary["privacy"] (sites' ledgers) and each round's aggregate (central DP).

    A site's cumulative epsilon is its ledger's prior spend plus the per-round increments, so the
    last point equals the `epsilon_total` the ledger reported."""
    config = summary.get("config") or {}
    rec = EpsilonRecord()
    if (config.get("privacy") or {}).get("enabled"):
        rec.configured.append("DP-SGD at the sites (privacy.enabled)")
        rec.accountant = (config.get("privacy") or {}).get("accountant")
    mode = (config.get("central-dp") or {}).get("mode")
    if mode and mode != "off":
        rec.configured.append(f"central DP (central-dp.mode = {mode})")
    for site, p in sorted((summary.get("privacy") or {}).items()):
        if not isinstance(p, dict):
            continue
        per_round = {r: v for r, raw in sorted(_round_keys(p.get("epsilon_per_round")).items())
                     if (v := _num(raw)) is not None}
        total = _num(p.get("epsilon_total"))
        prior = 0.0 if total is None else total - sum(per_round.values())
        prior = prior if prior > 1e-9 * max(1.0, total or 0.0) else 0.0  # float residue of the telescoping sum
        points, cum = [], prior
        for r, v in per_round.items():
            cum += v
            points.append((r, cum))
        refused = {r: str(w) for r, w in _round_keys(p.get("refused_rounds")).items()}
        rec.sites.append(SiteEpsilon(site, points, per_round, refused, _num(p.get("delta")), _num(p.get("epsilon_budget")), prior))
    for e in rounds:
        agg = e.get("aggregate") or {}
        if (eps := _num(agg.get("central_dp_epsilon"))) is not None:
            rec.central.append((e["round"], eps))
            rec.central_delta = _num(agg.get("central_dp_delta")) or rec.central_delta
    if rec.central and rec.central_delta is None:
        rec.central_delta = _num((config.get("central-dp") or {}).get("delta"))
    return rec


def _delta(d: float | None) -> str:
    return "not recorded" if d is None else f"{d:.1e}"


def epsilon_text(rec: EpsilonRecord) -> list[str]:
    """The sentences that go with (or instead of) the plot: what each epsilon bounds, and at which delta."""
    if not rec.spent:
        if rec.configured or rec.sites:
            why = ", ".join(rec.configured) or "site privacy ledgers"
            return [f"DP is on in this run ({why}), but no epsilon has been recorded yet: no DP round has finished, "
                    "every site refused its rounds (see Privacy and update validation), or no central-DP aggregate "
                    "was released."]
        return [NO_DP]
    out = []
    sites = [s for s in rec.sites if s.points]
    if sites:
        acc = f" ({rec.accountant.upper()} accountant)" if rec.accountant else ""
        deltas = {s.delta for s in sites}
        delta = (f"δ = {_delta(deltas.pop())} at every site" if len(deltas) == 1
                 else "δ per site: " + ", ".join(f"{s.site} {_delta(s.delta)}" for s in sites))
        out.append(f"Sample-level DP-SGD at the sites: cumulative ε after each round, as each site's own privacy "
                   f"ledger reported it{acc}; {delta}. A site's ε bounds what the run reveals about any one of its "
                   "images; sites' ε are separate guarantees and are not added.")
        for s in sites:
            if s.prior:
                out.append(f"{s.site}: its ledger held ε = {s.prior:.3f} before this run's recorded rounds "
                           "(an earlier run on the same ledger, or a round re-run after a resume); its curve starts there.")
        if any(s.refused for s in rec.sites):
            out.append("A round a site refused (its reason is under Privacy and update validation) spent nothing there.")
    if rec.central:
        out.append(f"Client-level central DP on the aggregate: cumulative ε of the server's accountant after each "
                   f"released round, δ = {_delta(rec.central_delta)}. It bounds what the global student reveals about "
                   "any one site's whole contribution, a different unit from the sites' sample-level ε.")
    return out


def _cell(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def epsilon_table(rec: EpsilonRecord) -> tuple[list[str], list[list[str]]] | None:
    """One row per round: each site's cumulative ε ("refused" where it refused), then central ε."""
    if not rec.spent:
        return None
    sites = [s for s in rec.sites if s.points or s.refused]
    head = ["round"] + [f"{s.site}: ε (sample-level, cumulative)" for s in sites]
    head += ["central DP: ε (client-level, cumulative)"] if rec.central else []
    central = dict(rec.central)
    rounds = sorted({r for s in sites for r, _ in s.points} | {r for s in sites for r in s.refused} | set(central))
    rows = []
    for r in rounds:
        row = [str(r)]
        for s in sites:
            row.append("refused" if r in s.refused and r not in s.per_round else _cell(dict(s.points).get(r)))
        if rec.central:
            row.append(_cell(central.get(r)))
        rows.append(row)
    return head, rows


def epsilon_csv_rows(rec: EpsilonRecord) -> list[dict[str, Any]]:
    """Long rows for rounds.csv (the central epsilon is already there as aggregate_central_dp_epsilon)."""
    rows = []
    for s in rec.sites:
        for r, cum in s.points:
            rows += [{"round": r, "site": s.site, "metric": "privacy_epsilon_cumulative", "value": cum},
                     {"round": r, "site": s.site, "metric": "privacy_epsilon_round", "value": s.per_round[r]}]
            if s.delta is not None:
                rows.append({"round": r, "site": s.site, "metric": "privacy_delta", "value": s.delta})
    return rows


def _label(site: str) -> str:
    """Matplotlib hides labels starting with "_" and parses $...$ as math: neutralise both."""
    s = site.replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def epsilon_png(rec: EpsilonRecord) -> bytes | None:
    """A panel per guarantee that spent anything: sites' cumulative ε (budget dashed), central ε."""
    sites = [s for s in rec.sites if s.points]
    panels = (["sites"] if sites else []) + (["central"] if rec.central else [])
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 4.0), dpi=100)
    axes = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0]))
    if "sites" in axes:
        ax = axes["sites"]
        for i, s in enumerate(sites):
            ax.plot(*zip(*s.points), marker="o", color=f"C{i % 10}", label=f"{_label(s.site)} (δ {_delta(s.delta)})")
            before = lambda r: next((c for rr, c in reversed(s.points) if rr < r), s.prior)  # noqa: E731
            if refused := [(r, before(r)) for r in sorted(s.refused) if r not in s.per_round]:
                ax.plot(*zip(*refused), linestyle="", marker="x", markersize=9, color=f"C{i % 10}")
            if s.budget:
                ax.axhline(s.budget, color=f"C{i % 10}", linestyle=":", linewidth=1)
        ax.set(title="Sample-level DP-SGD: cumulative ε per site\n(dotted: the site's budget; x: round refused)", ylabel="ε")
    if "central" in axes:
        ax = axes["central"]
        ax.plot(*zip(*rec.central), marker="s", color="black", label=f"global aggregate (δ {_delta(rec.central_delta)})")
        ax.set(title="Client-level central DP: cumulative ε", ylabel="ε")
    for ax in axes.values():
        ax.set_xlabel("round")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def secure_aggregation_text(summary: dict) -> list[str]:
    """What SecAgg+ changed about the round's guarantees, in the words a reader of the report needs."""
    rounds = [e for e in summary.get("rounds") or [] if (e.get("aggregate") or {}).get("secure_aggregation")]
    if not rounds:
        return []
    sa = (summary.get("config") or {}).get("secure-aggregation") or {}
    clipped = [(float(m["secagg_clipped"]), site, e.get("round")) for e in rounds
               for site, m in (e.get("train") or {}).items() if isinstance(m, dict) and "secagg_clipped" in m]
    worst = max(clipped, default=None)
    text = (f"Secure aggregation (SecAgg+, Flower's protocol) ran in {len(rounds)} round(s): the server unmasked only "
            "the weighted sum of each round's site updates, never one site's update, so the per-site update "
            "checks (non-finite values, norm outliers) could not run and only the sum was checked. Each site's "
            f"weighted update was bounded to +-{sa.get('clipping-range', '?')} per coordinate and quantised to "
            f"2^{sa.get('quantization-bits', '?')} levels before masking.")
    if worst is not None:
        text += (f" Largest share of one site's coordinates clipped by that bound: {worst[0]:.2e} "
                 f"({worst[1]}, round {worst[2]}).")
    return [text]
