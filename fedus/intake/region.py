"""Where the ultrasound image is inside a frame, and blanking of everything else.

Scanners put the image inside a screen of burned-in text, logos, colour bars and
calipers; a student must not learn "hospital X prints its name top left". The
DICOM SequenceOfUltrasoundRegions states the image region exactly (with its
physical pixel size); without it the region is detected as the largest bright
(or, in cine, moving) connected area, filled to its convex hull so dark anatomy
inside a sector stays in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

SPATIAL_2D = 1  # RegionSpatialFormat: tissue or flow image (not M-mode, spectra, graphics)
UNITS_CM = 3  # PhysicalUnitsX/YDirection
DARK = 12  # grey level below which a pixel is background
MOVING = 3.0  # temporal std (grey levels) above which a cine pixel is live image
MIN_AREA = 0.02  # a detected region smaller than this fraction of the frame is not trusted


@dataclass(frozen=True)
class Region:
    mask: np.ndarray | None  # bool [rows, cols]; None = keep the whole frame
    source: str  # "dicom" | "auto" | "none"
    spacing_mm: tuple[float | None, float | None] = (None, None)  # (x, y)

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1), end-exclusive."""
        if self.mask is None:
            return None
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if self.mask is None:
            return frame
        x0, y0, x1, y1 = self.box
        return np.where(self.mask[y0:y1, x0:x1], frame[y0:y1, x0:x1], 0).astype(np.uint8)


def _cm_to_mm(delta, units) -> float | None:
    if delta is None or units is None or int(units) != UNITS_CM or float(delta) <= 0:
        return None
    return round(float(delta) * 10.0, 6)


def dicom_region(ds: Dataset, shape: tuple[int, int]) -> Region | None:
    """Union of the 2D image regions the scanner declared, or None if it declared none."""
    regions = list(ds.get("SequenceOfUltrasoundRegions", []) or [])
    chosen = [r for r in regions if r.get("RegionSpatialFormat") == SPATIAL_2D] or regions
    mask = np.zeros(shape, dtype=bool)
    for r in chosen:
        try:
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        mask[max(y0, 0):max(y1 + 1, 0), max(x0, 0):max(x1 + 1, 0)] = True
    if not mask.any():
        return None
    first = next((r for r in chosen if "PhysicalDeltaX" in r), None)
    spacing = (None, None)
    if first is not None:
        spacing = (_cm_to_mm(first.get("PhysicalDeltaX"), first.get("PhysicalUnitsXDirection")),
                   _cm_to_mm(first.get("PhysicalDeltaY"), first.get("PhysicalUnitsYDirection")))
    return Region(mask, "dicom", spacing)


def _largest_component(binary: np.ndarray) -> np.ndarray | None:
    binary = ndimage.binary_opening(binary, structure=np.ones((3, 3), bool), iterations=2)
    labels, n = ndimage.label(binary)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    if sizes.max() < MIN_AREA * binary.size:
        return None
    return labels == (int(sizes.argmax()) + 1)


def _convex_fill(component: np.ndarray) -> np.ndarray:
    edge = component & ~ndimage.binary_erosion(component)
    points = np.argwhere(edge)[:, ::-1]  # (x, y)
    try:
        hull = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):
        return ndimage.binary_fill_holes(component)
    canvas = Image.new("1", (component.shape[1], component.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(int, p)) for p in hull], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def detect_region(frames: list[np.ndarray]) -> Region:
    """Largest moving (cine) or non-dark (still) area, convex-filled; whole frame if none is found."""
    stack = np.stack(frames)
    component = None
    if len(frames) >= 3:
        component = _largest_component(stack.std(axis=0) > MOVING)
    if component is None:
        component = _largest_component(stack.max(axis=0) > DARK)
    if component is None:
        return Region(None, "none")
    return Region(_convex_fill(component), "auto")


def pixel_spacing_mm(ds: Dataset) -> tuple[float | None, float | None]:
    """(x, y) from PixelSpacing (row spacing first in DICOM), for files without regions."""
    try:
        row, col = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return (None, None)
    return (col if col > 0 else None, row if row > 0 else None)
