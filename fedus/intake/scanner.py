"""`scan`: a site's archive folder -> manifest CSV + intake log, incrementally and in parallel.

Files are listed and stat-ed, unchanged ones (same size, mtime and settings)
reuse their cached outcome, the rest are decoded by worker processes. Outputs
stay at the site: decoded frames under `<out_dir>/frames/`, the log of skipped
files, the cache and the pseudonym secret.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from fedus.config import ConfigError
from fedus.intake.card import card_paths
from fedus.intake.cache import CACHE_FILE, OutcomeCache
from fedus.intake.readers import FRAMES_DIR, FileOutcome, FrameSampling, IntakeContext, intake_file
from fedus.intake.secret import SECRET_FILE, site_secret
from fedus.progress import progress_bar

LOG_FILE = "intake-log.csv"
# fedus.data.manifest.MANIFEST_COLUMNS, repeated because importing fedus.data pulls in torch,
# which intake (CLI start-up, worker processes) does not need; tests keep the two equal.
MANIFEST_COLUMNS = ("image_path", "mask_path", "label", "patient_id", "center", "device", "organ", "task")
EXTRA_COLUMNS = (
    "study_id", "series_id", "source_path", "source_kind", "source_hash", "manufacturer", "model",
    "transducer", "photometric", "transfer_syntax", "n_frames", "frame_index", "rows", "cols", "region",
    "crop_box", "pixel_spacing_x_mm", "pixel_spacing_y_mm", "burned_in",
)
COLUMNS = (*MANIFEST_COLUMNS, *EXTRA_COLUMNS)
CHUNK = 8  # files per worker task: amortises inter-process overhead on small files


@dataclass
class ScanResult:
    manifest: Path
    log: Path
    files: int = 0
    rows: int = 0
    decoded: int = 0  # files opened and decoded in this scan (0 when everything was cached)
    cached: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())) or "none"
        return (f"{self.files} files -> {self.rows} rows ({self.decoded} decoded, {self.cached} cached) "
                f"in {self.seconds:.1f}s; skipped: {skipped}")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def list_files(site_dir: Path, exclude: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every non-hidden file, outside the scan's own outputs."""
    found: dict[str, tuple[int, int]] = {}
    stack = [site_dir]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if Path(entry.path).resolve() != exclude:
                        stack.append(Path(entry.path))
                elif entry.is_file():
                    st = entry.stat()
                    found[os.path.relpath(entry.path, site_dir)] = (st.st_size, st.st_mtime_ns)
            except OSError:
                continue
    return dict(sorted(found.items()))


def scan(
    site_dir: str | Path,
    out: str | Path,
    *,
    sampling: FrameSampling | None = None,
    workers: int | None = None,
    center: str | None = None,
    label_from_folder: bool = False,
) -> ScanResult:
    """Scan `site_dir` into manifest `out`; raises ConfigError only when nothing usable was found."""
    started = time.perf_counter()
    site_dir = Path(site_dir).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if not site_dir.is_dir():
        raise ConfigError(f"site folder not found: {site_dir}")
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out must be a .csv manifest path, got {out.name}")
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = IntakeContext(site_dir, out_dir, site_secret(out_dir), center or site_dir.name,
                        sampling or FrameSampling(), label_from_folder)
    settings = ctx.settings_key()
    own = {out, out_dir / LOG_FILE, out_dir / CACHE_FILE, out_dir / SECRET_FILE, *card_paths(out_dir)}
    files = {rel: stat for rel, stat in list_files(site_dir, out_dir / FRAMES_DIR).items()
             if site_dir / rel not in own}
    cache = OutcomeCache(out_dir)
    try:
        known = cache.load()
        outcomes: dict[str, FileOutcome] = {}
        todo: list[str] = []
        for rel, (size, mtime) in files.items():
            hit = known.get(rel)
            if hit and hit[:3] == (size, mtime, settings) and _outputs_exist(hit[3], out_dir):
                outcomes[rel] = hit[3]
            else:
                todo.append(rel)
        gone = [p for p in known if p not in files]
        _remove_frames([known[p][3] for p in gone + [p for p in todo if p in known]], out_dir)
        cache.forget(gone)
        batch: list = []
        for rel, outcome in _decode(ctx, todo, workers or default_workers()):
            outcomes[rel] = outcome
            batch.append((rel, *files[rel], outcome))
            if len(batch) >= 256:  # an interrupted scan keeps what it decoded
                cache.store(batch, settings)
                batch = []
        cache.store(batch, settings)
    finally:
        cache.close()
    result = ScanResult(out, out_dir / LOG_FILE, files=len(files), decoded=len(todo), cached=len(files) - len(todo))
    rows = [row for rel in files for row in outcomes[rel].rows]
    skips = [(rel, outcomes[rel]) for rel in files if outcomes[rel].skip]
    result.skipped = dict(Counter(o.skip for _, o in skips))
    _write_log(result.log, skips)
    result.rows = len(rows)
    result.seconds = time.perf_counter() - started
    if not rows:
        raise ConfigError(f"no usable ultrasound images in {site_dir} ({result.summary()}); see {result.log}")
    _write_manifest(out, rows, site_dir)
    return result


def _decode(ctx: IntakeContext, todo: list[str], workers: int):
    """(path, outcome) for every file to decode, in parallel worker processes when it pays off."""
    if not todo:
        return
    work = partial(intake_file, ctx)
    with progress_bar(f"decoding {len(todo)} files", total=len(todo)) as bar:
        if workers <= 1 or len(todo) < 2 * CHUNK:
            results = map(work, todo)
            for rel, outcome in zip(todo, results):
                bar.advance()
                yield rel, outcome
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for rel, outcome in zip(todo, pool.map(work, todo, chunksize=CHUNK)):
                bar.advance()
                yield rel, outcome


def _outputs_exist(outcome: FileOutcome, out_dir: Path) -> bool:
    return all((out_dir / row["image_path"]).is_file() for row in outcome.rows if row["image_path"])


def _remove_frames(outcomes: list[FileOutcome], out_dir: Path) -> None:
    """Frames of files that vanished or are decoded again must not linger as orphans."""
    for outcome in outcomes:
        for row in outcome.rows:
            if row["image_path"].startswith(FRAMES_DIR + "/"):
                (out_dir / row["image_path"]).unlink(missing_ok=True)


def _write_log(path: Path, skips: list[tuple[str, FileOutcome]]) -> None:
    log = pd.DataFrame([{"path": rel, "reason": o.skip, "detail": o.detail} for rel, o in skips],
                       columns=["path", "reason", "detail"])
    log.to_csv(path, index=False)


def _write_manifest(out: Path, rows: list[dict], site_dir: Path) -> None:
    """Frame rows point into frames/; plain images point at the original file (relative to the manifest)."""
    df = pd.DataFrame([{c: row.get(c, "") for c in COLUMNS} for row in rows], columns=list(COLUMNS))
    plain = df["image_path"] == ""
    df.loc[plain, "image_path"] = [os.path.relpath(site_dir / rel, out.parent) for rel in df.loc[plain, "source_path"]]
    tmp = out.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(out)
