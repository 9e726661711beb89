"""Ultrasound DICOM files written with pydicom for intake tests and the intake benchmark.

Images are a fan-shaped speckle sector on black with a static burned-in "text"
block outside it, so region detection and blanking have something to find.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian, JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID, UID, generate_uid,
)

US_IMAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
US_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
TEXT_BOX = (slice(2, 8), slice(2, 30))  # rows, cols of the burned-in block


def fan_mask(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    apex_x, apex_y = cols / 2, rows * 0.1
    r = np.hypot(x - apex_x, y - apex_y)
    angle = np.degrees(np.arctan2(x - apex_x, y - apex_y))
    return (r > rows * 0.12) & (r < rows * 0.85) & (np.abs(angle) < 35)


def sector_frames(n_frames: int = 1, rows: int = 96, cols: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 [n, rows, cols]: new speckle each frame in the fan, static text outside it."""
    rng = np.random.default_rng(seed)
    fan = fan_mask(rows, cols)
    frames = np.zeros((n_frames, rows, cols), np.uint8)
    for i in range(n_frames):
        speckle = rng.rayleigh(45.0, (rows, cols)) + 30
        frames[i][fan] = np.clip(speckle, 30, 230)[fan].astype(np.uint8)
        frames[i][TEXT_BOX] = 255
    return frames


def us_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", modality: str = "US", **tags) -> Dataset:
    """A complete, writable ultrasound dataset holding `pixels` ([n,]rows,cols[,3] uint8)."""
    multi = pixels.ndim == 4 or (pixels.ndim == 3 and photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"))
    sop_class = CT_IMAGE if modality != "US" else (US_MULTIFRAME if multi else US_IMAGE)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID, ds.PatientName = "PAT-0001", "Test^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Manufacturer, ds.ManufacturerModelName = "Acme Medical", "Sono 1"
    ds.set_pixel_data(pixels, photometric if photometric != "PALETTE COLOR" else "MONOCHROME2", 8)
    ds.PhotometricInterpretation = photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def hot_lut() -> np.ndarray:
    """[256, 3] 8-bit 'hot' colour map (black -> red -> yellow -> white), as scanners use for flow."""
    i = np.arange(256) * 3
    return np.stack([np.clip(i, 0, 255), np.clip(i - 255, 0, 255), np.clip(i - 510, 0, 255)], axis=1)


def palette(ds: Dataset, lut: np.ndarray) -> Dataset:
    """Make `ds` PALETTE COLOR with 16-bit tables from an 8-bit `lut` [256, 3]."""
    for colour, column in zip(("Red", "Green", "Blue"), lut.T):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", (column * 257).astype("<u2").tobytes())
    ds.PhotometricInterpretation = "PALETTE COLOR"
    return ds


def jpeg_baseline_ybr422(rgb: np.ndarray, **tags) -> Dataset:
    """JPEG baseline with 4:2:2 chroma subsampling: the common YBR_FULL_422 form in the wild."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=95, subsampling=1)
    ds = us_dataset(rgb, "RGB", **tags)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    return ds


def native_ybr422(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, **tags) -> Dataset:
    """Uncompressed YBR_FULL_422 (PS3.3 C.7.6.3.1.2): each pixel pair stored as Y1 Y2 Cb Cr.

    `y` is [rows, cols] (cols even); `cb`, `cr` are [rows, cols // 2], one per pixel pair. The bytes
    are laid out here by hand rather than by pydicom's encoder, so the test checks the layout.
    """
    rows, cols = y.shape
    packed = np.empty((rows, cols // 2, 4), np.uint8)
    packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = y[:, 0::2], y[:, 1::2], cb, cr
    ds = us_dataset(np.repeat(y[..., None], 3, axis=2), "RGB", **tags)  # sets SamplesPerPixel 3, 8 bits
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.PixelData = packed.tobytes()  # 2 bytes per pixel, not 3
    return ds


def ultrasound_region(ds: Dataset, x0: int, y0: int, x1: int, y1: int, delta_cm: float = 0.02) -> Dataset:
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = x0, y0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x1, y1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = region.PhysicalDeltaY = delta_cm
    ds.SequenceOfUltrasoundRegions = [region]
    return ds
