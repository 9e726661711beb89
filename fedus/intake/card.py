"""The site data card: the only intake output that may leave the site.

It holds aggregate counts only, over a fixed allow-list of technical fields
(manufacturer, model, transducer, photometric, frame count, image size) — never
paths, UIDs, dates, patient data or institution names, because none of those
columns are ever read. Small cells are suppressed: a value seen in fewer than
k files is not named at all but pooled into "other", and any count under k is
shown as "<k", so a rare device cannot single out a patient or a site.

Every dimension sums to the published file total, so a lone "<k" cell could be
recovered by subtraction. Complementary suppression closes that: when the pooled
rare values alone are under k, the smallest named value is pooled with them too,
so "other" is itself >= k and neither part can be derived. A dimension therefore
never holds a "<k" cell unless the total is "<k" as well.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from fedus.config import ConfigError

CARD_VERSION = 1
K_ANONYMITY = 5
FIELDS = ("manufacturer", "model", "transducer", "photometric", "frames", "image_size")
FRAME_BINS = ((1, "1"), (10, "2-10"), (50, "11-50"), (200, "51-200"))
OTHER = "other"
UNKNOWN = "unknown"


def _frames_bin(value: str) -> str:
    try:
        n = int(float(value))
    except ValueError:
        return UNKNOWN
    return next((label for top, label in FRAME_BINS if n <= top), ">200")


def _count(n: int, k: int) -> int | str:
    return n if n >= k else f"<{k}"


def _suppressed(values: list[str], k: int) -> dict[str, int | str]:
    counts = Counter(v or UNKNOWN for v in values)
    shown = {v: n for v, n in counts.most_common() if n >= k and v != OTHER}
    rare = sum(n for v, n in counts.items() if v not in shown)
    if 0 < rare < k and shown:  # "other" = total - named cells: pool the next-smallest cell too
        rare += shown.pop(min(shown, key=lambda v: (shown[v], v)))
    out: dict[str, int | str] = dict(shown)
    if rare:
        out[OTHER] = _count(rare, k)
    return out


def data_card(manifest: str | Path, k: int = K_ANONYMITY) -> dict:
    """Aggregate, small-cell-suppressed counts of a manifest, per source file."""
    path = Path(manifest).expanduser()
    if not path.is_file():
        raise ConfigError(f"manifest not found: {path}")
    if k < 2:
        raise ConfigError(f"k must be >= 2, got {k}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ConfigError(f"{path}: not a readable CSV ({err.__class__.__name__})") from None
    if "image_path" not in df.columns:  # the intake columns are optional (a corpus manifest has none); this one is not
        raise ConfigError(f"{path}: not a manifest (no image_path column)")
    return card_of_rows(df, k)


def card_of_rows(df: pd.DataFrame, k: int = K_ANONYMITY) -> dict:
    """The card of manifest rows already in memory (a site's share of a simulation manifest)."""
    df = df.astype(str).replace({"nan": "", "None": ""}).reset_index(drop=True)  # rows of two splits may share labels
    get = lambda col: df[col] if col in df.columns else pd.Series([""] * len(df), dtype=str)  # noqa: E731
    files = df.drop_duplicates("source_hash") if "source_hash" in df.columns else df
    fcol = lambda col: list(get(col).loc[files.index])  # noqa: E731
    sizes = [f"{c}x{r}" if r and c else "" for r, c in zip(fcol("rows"), fcol("cols"))]
    by = {
        "manufacturer": _suppressed(fcol("manufacturer"), k),
        "model": _suppressed(fcol("model"), k),
        "transducer": _suppressed(fcol("transducer"), k),
        "photometric": _suppressed(fcol("photometric"), k),
        "frames": _suppressed([_frames_bin(v) if v else "" for v in fcol("n_frames")], k),
        "image_size": _suppressed(sizes, k),
    }
    burned = (get("burned_in").loc[files.index].str.lower() == "true").sum()
    return {
        "card": "fedus site data card", "version": CARD_VERSION, "k": k,
        "files": _count(len(files), k), "images": _count(len(df), k),
        "burned_in_annotation": _count(int(burned), k) if burned else 0,
        "by": by,
    }


def render_markdown(card: dict) -> str:
    lines = [f"# Site data card (counts per source file; cells under {card['k']} shown as <{card['k']})", "",
             f"- files: {card['files']}", f"- images (rows): {card['images']}",
             f"- flagged burned-in annotation: {card['burned_in_annotation']}", ""]
    for field_name in FIELDS:
        lines += [f"## {field_name.replace('_', ' ')}", "", "| value | files |", "|---|---|"]
        lines += [f"| {value} | {n} |" for value, n in card["by"][field_name].items()]
        lines.append("")
    return "\n".join(lines)


def render_line(card: dict) -> str:
    """The card in one line, for a report's table cell: fields nobody recorded are named once, not counted."""
    parts = [f"{card['files']} files, {card['images']} images", f"burned-in annotation: {card['burned_in_annotation']}"]
    unrecorded = []
    for field_name in FIELDS:
        values = card["by"][field_name]
        label = field_name.replace("_", " ")
        if set(values) <= {UNKNOWN}:
            unrecorded.append(label)
        else:
            parts.append(f"{label}: " + ", ".join(f"{value} ({n})" for value, n in values.items()))
    if unrecorded:
        parts.append("not recorded: " + ", ".join(unrecorded))
    return "; ".join(parts)


def card_paths(folder: Path) -> tuple[Path, Path]:
    """Default card files (JSON, Markdown) beside a manifest."""
    return folder / "data-card.json", folder / "data-card.md"


def write_card(manifest: str | Path, out: str | Path | None = None, k: int = K_ANONYMITY) -> tuple[Path, Path]:
    """Write `<out>.json` and its Markdown beside it (default: data-card.json next to the manifest)."""
    card = data_card(manifest, k)
    json_path = Path(out) if out else card_paths(Path(manifest).expanduser().parent)[0]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(card, indent=1))
    md_path = json_path.with_suffix(".md")
    md_path.write_text(render_markdown(card))
    return json_path, md_path


def check_card(card: dict, k_min: int = K_ANONYMITY) -> dict:
    """Egress check: `card` has exactly the card's shape, counts >= k or "<k", short value names, nothing else."""
    if set(card) != {"card", "version", "k", "files", "images", "burned_in_annotation", "by"} or set(card["by"]) != set(FIELDS):
        raise ValueError("not a fedus data card")
    k = int(card["k"])
    if k < k_min:
        raise ValueError(f"data card suppression k={k} is below {k_min}")
    def ok(n) -> bool:
        return n == f"<{k}" or (isinstance(n, int) and (n == 0 or n >= k))
    counts = [card["files"], card["images"], card["burned_in_annotation"]]
    for field, values in card["by"].items():
        for name, n in values.items():
            if not isinstance(name, str) or len(name) > 64 or "/" in name or "\\" in name:
                raise ValueError(f"data card value name in '{field}' looks like free text or a path")
            counts.append(n)
    if not all(ok(n) for n in counts):
        raise ValueError("data card holds a count below its suppression threshold")
    return card
