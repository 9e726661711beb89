"""One archive file -> manifest rows or one skip reason. Runs in worker processes.

Every failure is caught here and becomes a reason (never an exception), so one
bad file cannot stop a scan of a hospital archive.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import ImplicitVRLittleEndian

from fedus.config import ConfigError
from fedus.intake.pixels import UnsupportedPhotometric, gray_frame
from fedus.intake.region import Region, detect_region, dicom_region, pixel_spacing_mm
from fedus.intake.secret import pseudonym

INTAKE_VERSION = "2"  # bump when outputs change, so caches of older scans are redone (2: YCbCr -> Y plane)
FRAMES_DIR = "frames"
IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
US_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
}
SKIP_REASONS = (
    "empty-file", "not-dicom", "corrupt-dicom", "not-ultrasound", "no-pixel-data",
    "unsupported-transfer-syntax", "too-small", "unknown-photometric", "decode-error",
    "blank-image", "unreadable-image",
)


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a cine become rows: every k-th (`every`) or `count` evenly spaced."""

    every: int = 0
    count: int = 8

    @classmethod
    def parse(cls, every: int | None, count: int | None) -> "FrameSampling":
        if every is not None and count is not None:
            raise ConfigError("give either --every K or --frames N, not both")
        if every is not None:
            if every < 1:
                raise ConfigError(f"--every must be >= 1, got {every}")
            return cls(every=every, count=0)
        if count is not None and count < 1:
            raise ConfigError(f"--frames must be >= 1, got {count}")
        return cls(count=count if count is not None else cls.count)

    def indices(self, n_frames: int) -> list[int]:
        if self.every:
            return list(range(0, n_frames, self.every))
        if n_frames <= self.count:
            return list(range(n_frames))
        return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, self.count)})


@dataclass(frozen=True)
class IntakeContext:
    """Everything a worker needs; small and picklable."""

    site_dir: Path
    out_dir: Path
    secret: bytes
    center: str
    sampling: FrameSampling = field(default_factory=FrameSampling)
    label_from_folder: bool = False

    def settings_key(self) -> str:
        """Cached outcomes are valid only for the settings that produced them."""
        return f"v{INTAKE_VERSION}|{asdict(self.sampling)}|{self.center}|{self.label_from_folder}"


@dataclass
class FileOutcome:
    rows: list[dict] = field(default_factory=list)
    skip: str = ""
    detail: str = ""


def _skip(reason: str, detail: str = "") -> FileOutcome:
    return FileOutcome(skip=reason, detail=detail[:200])


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = next(iter(value), "")
    return " ".join(str(value).split())


def is_ultrasound(ds: Dataset) -> bool:
    return _text(ds, "Modality").upper() == "US" or str(ds.get("SOPClassUID", "")) in US_SOP_CLASSES


def sniff(path: Path, head: bytes) -> str:
    """'png' | 'jpeg' | 'dicom' | '' by content first, then by suffix."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return IMAGE_SUFFIXES[suffix]
    return "dicom" if suffix in DICOM_SUFFIXES else ""


def intake_file(ctx: IntakeContext, rel: str) -> FileOutcome:
    """Rows for one file (path relative to the site folder), or the reason it was skipped."""
    path = ctx.site_dir / rel
    try:
        data = path.read_bytes()
    except OSError as err:
        return _skip("unreadable-image" if path.suffix.lower() in IMAGE_SUFFIXES else "corrupt-dicom", str(err))
    if not data:
        return _skip("empty-file")
    kind = sniff(path, data[:132])
    if not kind:
        return _skip("not-dicom", "neither DICOM nor PNG/JPEG")
    base = {"source_path": rel, "source_kind": kind, "source_hash": _content_hash(ctx.secret, data),
            "center": ctx.center, "label": _folder_label(rel) if ctx.label_from_folder else ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if kind == "dicom":
                return _intake_dicom(ctx, path, base)
            return _intake_image(path, base)
        except MemoryError:
            return _skip("decode-error", "out of memory")
        except Exception as err:  # noqa: BLE001 - any failure of one file is a counted skip
            return _skip("decode-error", f"{err.__class__.__name__}: {err}")


def _content_hash(secret: bytes, data: bytes) -> str:
    return pseudonym(secret, hashlib.sha256(data).hexdigest())


def _folder_label(rel: str) -> str:
    parts = Path(rel).parts
    return parts[0] if len(parts) > 1 else ""


def _intake_image(path: Path, base: dict) -> FileOutcome:
    try:
        with Image.open(path) as img:
            img.load()
            gray = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return _skip("unreadable-image", f"{err.__class__.__name__}: {err}")
    if gray.shape[0] < 2 or gray.shape[1] < 2:
        return _skip("too-small", f"{gray.shape[1]}x{gray.shape[0]}")
    if gray.max() == gray.min():
        return _skip("blank-image")
    row = base | {"image_path": "", "rows": gray.shape[0], "cols": gray.shape[1], "n_frames": 1,
                  "frame_index": 0, "photometric": img.mode,
                  "region": "none"}
    return FileOutcome(rows=[row])


def _intake_dicom(ctx: IntakeContext, path: Path, base: dict) -> FileOutcome:
    try:
        ds = dcmread(path)
        ds.get("Modality")  # force parsing far enough to catch garbage early
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on bad files
        return _skip("corrupt-dicom", f"{err.__class__.__name__}: {err}")
    meta = getattr(ds, "file_meta", None) or Dataset()
    if not any(k in ds for k in ("SOPClassUID", "Modality", "PixelData")) and "MediaStorageSOPClassUID" not in meta:
        return _skip("corrupt-dicom", "no recognisable DICOM attributes")
    if not is_ultrasound(ds):
        return _skip("not-ultrasound", _text(ds, "Modality") or "no modality")
    if "PixelData" not in ds:
        return _skip("no-pixel-data")
    syntax = meta.get("TransferSyntaxUID") or ImplicitVRLittleEndian
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return _skip("unsupported-transfer-syntax", getattr(syntax, "name", str(syntax)))
    if not decoder.is_available:
        return _skip("unsupported-transfer-syntax", f"{syntax.name}: no decoder plugin installed")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 2 or cols < 2:
        return _skip("too-small", f"{cols}x{rows}")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    indices = ctx.sampling.indices(n_frames)
    try:
        frames = [gray_frame(ds, i) for i in indices]
    except UnsupportedPhotometric as err:
        return _skip("unknown-photometric", str(err))
    except Exception as err:  # noqa: BLE001
        return _skip(_decode_reason(err), f"{err.__class__.__name__}: {err}")
    if all(f.max() == f.min() for f in frames):
        return _skip("blank-image")
    region = dicom_region(ds, frames[0].shape) or detect_region(frames)
    spacing = region.spacing_mm if region.source == "dicom" else pixel_spacing_mm(ds)
    return FileOutcome(rows=_write_frames(ctx, base, ds, region, spacing, indices, frames, n_frames))


def _decode_reason(err: Exception) -> str:
    """Pixel data shorter than its header promises is a truncated (corrupt) file."""
    text = str(err).lower()
    truncated = any(s in text for s in ("less than", "shorter", "expected", "truncat", "not enough", "end of"))
    return "corrupt-dicom" if truncated or isinstance(err, EOFError) else "decode-error"


def _write_frames(ctx: IntakeContext, base: dict, ds: Dataset, region: Region, spacing, indices, frames,
                  n_frames: int) -> list[dict]:
    secret = ctx.secret
    patient = (_text(ds, "PatientID") or _text(ds, "StudyInstanceUID") or _text(ds, "SeriesInstanceUID")
               or "file:" + base["source_path"])
    key = hmac.new(secret, base["source_path"].encode(), hashlib.sha256).hexdigest()[:20]
    out = ctx.out_dir / FRAMES_DIR / key[:2]
    out.mkdir(parents=True, exist_ok=True)
    manufacturer, model = _text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")
    box = region.box
    common = base | {
        "patient_id": pseudonym(secret, patient),
        "study_id": pseudonym(secret, _text(ds, "StudyInstanceUID")),
        "series_id": pseudonym(secret, _text(ds, "SeriesInstanceUID")),
        "device": " ".join(v for v in (manufacturer, model) if v),
        "organ": _text(ds, "BodyPartExamined").lower(),
        "manufacturer": manufacturer, "model": model,
        "transducer": _text(ds, "TransducerType") or _text(ds, "TransducerData"),
        "photometric": _text(ds, "PhotometricInterpretation"),
        "transfer_syntax": str((getattr(ds, "file_meta", None) or Dataset()).get("TransferSyntaxUID", "")),
        "n_frames": n_frames, "rows": frames[0].shape[0], "cols": frames[0].shape[1],
        "region": region.source, "crop_box": ",".join(map(str, box)) if box else "",
        "pixel_spacing_x_mm": spacing[0] or "", "pixel_spacing_y_mm": spacing[1] or "",
        "burned_in": _text(ds, "BurnedInAnnotation").upper() == "YES",
    }
    rows = []
    for index, frame in zip(indices, frames):
        name = out / f"{key}_f{index:05d}.png"
        Image.fromarray(region.apply(frame)).save(name, compress_level=1)
        rows.append(common | {"image_path": f"{FRAMES_DIR}/{key[:2]}/{name.name}", "frame_index": index})
    return rows
