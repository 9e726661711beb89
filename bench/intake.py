"""Files/s of `fedus data scan` on a generated archive: a cold scan (decode everything) and a warm one (cache).

The archive mixes transfer syntaxes the way hospital exports do (uncompressed,
RLE, JPEG-LS, JPEG 2000, JPEG baseline YBR_FULL_422) with a share of cine loops,
plus a few bad files. Distinct pixel templates are encoded once and written
under fresh UIDs/patients, so generating 2,000+ files takes seconds while every
file is still decoded for real by the scan.

    python bench/intake.py                       # 2,000 files, workers = CPU count
    python bench/intake.py --files 10000 --workers 8
    python bench/intake.py --tiny-files 100000   # 100k tiny files: does a warm scan only re-stat?

`--tiny-files N` is the archive-scale check: N files of 16-32 px (uncompressed and
RLE DICOM, PNG) under --tmp (never the repository), where per-file overhead, not
decoding, dominates; the warm scan must decode nothing. The archive is deleted after.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from bench.machine import machine  # noqa: E402
from dicom_factory import jpeg_baseline_ybr422, save, sector_frames, us_dataset  # noqa: E402
from fedus.intake import FrameSampling, scan  # noqa: E402
from fedus.intake.scanner import default_workers  # noqa: E402

MIX = {"explicit-le": 0.35, "rle": 0.2, "jpeg-ls": 0.15, "jpeg2000": 0.15, "jpeg-baseline-ybr422": 0.15}
TINY_MIX = {"explicit-le": 0.6, "rle": 0.2, "png": 0.2}
TINY_SIZES = (16, 24, 32)
PATIENT_SLOT = b"PT99999999"  # fixed-length PatientID placeholder, patched per file (DICOM pads to even length)


def template(kind: str, frames: np.ndarray):
    if kind == "jpeg-baseline-ybr422":
        return jpeg_baseline_ybr422(np.repeat(frames[0][..., None], 3, axis=2))
    ds = us_dataset(frames if len(frames) > 1 else frames[0])
    syntax = {"rle": RLELossless, "jpeg-ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless}.get(kind)
    if syntax:
        ds.compress(syntax)
    return ds


def build_archive(root: Path, n_files: int, rows: int, cols: int, cine_share: float, cine_frames: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    kinds = list(MIX)
    templates = {}
    for k, kind in enumerate(kinds):
        for t in range(4):
            n = cine_frames if t == 0 and kind != "jpeg-baseline-ybr422" else 1
            templates[(kind, t)] = template(kind, sector_frames(n, rows, cols, seed=seed + 10 * k + t))
    counts: dict[str, int] = {}
    for i in range(n_files):
        kind = kinds[rng.choice(len(kinds), p=list(MIX.values()))]
        cine = kind != "jpeg-baseline-ybr422" and rng.random() < cine_share
        ds = copy.deepcopy(templates[(kind, 0 if cine else int(rng.integers(1, 4)))])
        ds.PatientID = f"P{i // 4:05d}"  # ~4 files per patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        save(ds, root / f"patient{i // 4:05d}" / f"{i:06d}.dcm")
        label = kind + ("+cine" if cine else "")
        counts[label] = counts.get(label, 0) + 1
    (root / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + rng.bytes(512))
    (root / "notes.txt").write_text("not an image")
    return dict(sorted(counts.items()))


def build_tiny_archive(root: Path, n_files: int, seed: int) -> dict:
    """`n_files` tiny images, 1,000 per folder. Templates are encoded once and written as bytes with the
    PatientID patched, because pydicom writing 100k files would take longer than scanning them."""
    rng = np.random.default_rng(seed)
    templates: dict[tuple[str, int, int], bytes] = {}
    for kind in TINY_MIX:
        for rows in TINY_SIZES:
            for cols in TINY_SIZES:
                frame = sector_frames(1, rows, cols, seed=seed + rows * 100 + cols)[0]
                if kind == "png":
                    buf = io.BytesIO()
                    Image.fromarray(frame).save(buf, "PNG")
                else:
                    ds = us_dataset(frame, PatientID=PATIENT_SLOT.decode())
                    if kind == "rle":
                        ds.compress(RLELossless)
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
                    assert buf.getvalue().count(PATIENT_SLOT) == 1
                templates[(kind, rows, cols)] = buf.getvalue()
    kinds = list(TINY_MIX)
    picks = rng.choice(len(kinds), size=n_files, p=list(TINY_MIX.values()))
    sizes = rng.choice(TINY_SIZES, size=(n_files, 2))
    counts: dict[str, int] = {}
    for i in range(n_files):
        kind = kinds[picks[i]]
        data = templates[(kind, int(sizes[i, 0]), int(sizes[i, 1]))]
        folder = root / f"batch{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        if kind == "png":
            (folder / f"{i:06d}.png").write_bytes(data)
        else:
            (folder / f"{i:06d}.dcm").write_bytes(data.replace(PATIENT_SLOT, f"PT{i // 4:08d}".encode()))
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def timed_scan(archive: Path, out: Path, workers: int, sampling: FrameSampling) -> dict:
    result = scan(archive, out, sampling=sampling, workers=workers)
    return {"files": result.files, "rows": result.rows, "decoded": result.decoded, "cached": result.cached,
            "skipped": result.skipped, "seconds": round(result.seconds, 3),
            "files_per_s": round(result.files / result.seconds, 1), "workers": workers}


def cold_and_warm(archive: Path, manifest: Path, workers: int, sampling: FrameSampling) -> tuple[dict, dict]:
    """A first scan (decodes everything) and a second of the unchanged archive (the cache's case)."""
    cold = timed_scan(archive, manifest, workers, sampling) | {"scan": "cold"}
    print(json.dumps(cold), flush=True)
    warm = timed_scan(archive, manifest, workers, sampling) | {"scan": "warm (unchanged archive)"}
    print(json.dumps(warm), flush=True)
    return cold, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--cols", type=int, default=320)
    ap.add_argument("--cine-share", type=float, default=0.1)
    ap.add_argument("--cine-frames", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8, help="frames sampled per cine")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--tiny-files", type=int, default=0, help="run the tiny-file archive-scale check instead")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the generated archive lives (not the repo)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/intake[-Nk]-cpu.json)")
    args = ap.parse_args()
    if args.tiny_files:
        return tiny_main(args)
    args.out = args.out or ROOT / "bench" / "results" / "intake-cpu.json"
    work = Path(tempfile.mkdtemp(prefix="fedus-intake-bench-"))
    try:
        started = time.perf_counter()
        mix = build_archive(work / "archive", args.files, args.rows, args.cols, args.cine_share, args.cine_frames, 0)
        generate_s = time.perf_counter() - started
        cold, warm = cold_and_warm(work / "archive", work / "out" / "manifest.csv", args.workers,
                                   FrameSampling(count=args.frames))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "intake", "machine": machine(),
        "settings": {"files": args.files + 2, "dicom_files": args.files, "image": f"{args.cols}x{args.rows} 8-bit",
                     "mix": mix, "cine_share": args.cine_share, "cine_frames": args.cine_frames,
                     "sampling": f"{args.frames} evenly spaced frames per cine", "workers": args.workers,
                     "bad_files": "1 corrupt DICOM, 1 text file", "archive_generation_s": round(generate_s, 1)},
        "results": [cold, warm], "warm_speedup": round(cold["seconds"] / warm["seconds"], 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def tiny_main(args) -> None:
    """Cold and warm scan of a large archive of tiny files; figures and settings to JSON."""
    tmp = args.tmp.expanduser().resolve()
    if tmp == ROOT or ROOT in tmp.parents:
        sys.exit(f"error: --tmp {tmp} is inside the repository; the archive must live elsewhere")
    n = args.tiny_files
    name = f"intake-{n // 1000}k-cpu.json" if n % 1000 == 0 else f"intake-{n}-cpu.json"
    out = args.out or ROOT / "bench" / "results" / name
    work = Path(tempfile.mkdtemp(prefix="fedus-intake-tiny-", dir=tmp))
    load_before = os.getloadavg()
    try:
        started = time.perf_counter()
        mix = build_tiny_archive(work / "archive", n, 0)
        generate_s = time.perf_counter() - started
        print(f"generated {n} files in {generate_s:.0f}s", flush=True)
        cold, warm = cold_and_warm(work / "archive", work / "out" / "manifest.csv", args.workers,
                                   FrameSampling(count=args.frames))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "intake-tiny-archive", "machine": machine(),
        "settings": {"files": n, "image": f"{'/'.join(map(str, TINY_SIZES))} px per side, 8-bit, single frame",
                     "mix": mix, "folders": -(-n // 1000), "workers": args.workers,
                     "archive": f"generated under {tmp}, deleted after the run",
                     "archive_generation_s": round(generate_s, 1)},
        "conditions": {"load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()],
                       "note": "shared machine: other jobs were running during the measurement, so the cold "
                               "figure is a lower bound for an idle machine"},
        "results": [cold, warm], "warm_decodes": warm["decoded"],
        "warm_speedup": round(cold["seconds"] / warm["seconds"], 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
