"""Files/s of `fedus data scan` on a generated archive: a cold scan (decode everything) and a warm one (cache).

The archive mixes transfer syntaxes the way hospital exports do (uncompressed,
RLE, JPEG-LS, JPEG 2000, JPEG baseline YBR_FULL_422) with a share of cine loops,
plus a few bad files. Distinct pixel templates are encoded once and written
under fresh UIDs/patients, so generating 2,000+ files takes seconds while every
file is still decoded for real by the scan.

    python bench/intake.py                       # 2,000 files, workers = CPU count
    python bench/intake.py --files 10000 --workers 8
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from bench.machine import machine  # noqa: E402
from dicom_factory import jpeg_baseline_ybr422, save, sector_frames, us_dataset  # noqa: E402
from fedus.intake import FrameSampling, scan  # noqa: E402
from fedus.intake.scan import default_workers  # noqa: E402

MIX = {"explicit-le": 0.35, "rle": 0.2, "jpeg-ls": 0.15, "jpeg2000": 0.15, "jpeg-baseline-ybr422": 0.15}


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


def timed_scan(archive: Path, out: Path, workers: int, sampling: FrameSampling) -> dict:
    result = scan(archive, out, sampling=sampling, workers=workers)
    return {"files": result.files, "rows": result.rows, "decoded": result.decoded, "cached": result.cached,
            "skipped": result.skipped, "seconds": round(result.seconds, 3),
            "files_per_s": round(result.files / result.seconds, 1), "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--cols", type=int, default=320)
    ap.add_argument("--cine-share", type=float, default=0.1)
    ap.add_argument("--cine-frames", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8, help="frames sampled per cine")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "intake-cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedus-intake-bench-"))
    try:
        started = time.perf_counter()
        mix = build_archive(work / "archive", args.files, args.rows, args.cols, args.cine_share, args.cine_frames, 0)
        generate_s = time.perf_counter() - started
        sampling = FrameSampling(count=args.frames)
        manifest = work / "out" / "manifest.csv"
        cold = timed_scan(work / "archive", manifest, args.workers, sampling) | {"scan": "cold"}
        print(json.dumps(cold), flush=True)
        warm = timed_scan(work / "archive", manifest, args.workers, sampling) | {"scan": "warm (unchanged archive)"}
        print(json.dumps(warm), flush=True)
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


if __name__ == "__main__":
    main()
