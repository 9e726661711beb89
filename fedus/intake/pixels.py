"""DICOM frames -> 8-bit grayscale, whatever the photometric interpretation.

Students train on grayscale B-mode, so colour (Doppler overlays, palette maps,
RGB screen captures) is reduced to luma (ITU-R BT.601). YCbCr data is decoded
without pydicom's YBR -> RGB step (`as_rgb=False`) and its Y plane kept as is:
Y already is the luma, and the round trip through 8-bit RGB clips saturated
chroma (colour flow), moving grey levels by tens of levels. Only data a decoder
returns as RGB goes through RGB -> luma.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, as_pixel_options, get_decoder
from pydicom.uid import ImplicitVRLittleEndian

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
# Y is BT.601 luma for YBR_FULL(_422) and YBR_ICT; for YBR_RCT it is (R + 2G + B) / 4, near enough for grey.
YCBCR_FULL = ("YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
YCBCR_PARTIAL = ("YBR_PARTIAL_420",)  # Y in 16..235 (studio range)
PALETTE = "PALETTE COLOR"
SUPPORTED_PHOTOMETRIC = (*MONOCHROME, *COLOUR, PALETTE)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class UnsupportedPhotometric(ValueError):
    """Pixel data whose photometric interpretation fedus cannot map to grayscale."""


def _to_8bit(arr: np.ndarray, bits: int) -> np.ndarray:
    """Scale by the declared bit depth (not by content), so frames of one cine stay comparable."""
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    arr = arr.astype(np.float32)
    return np.clip(arr * (255.0 / (2**bits - 1)), 0, 255).round().astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) @ _LUMA, 0, 255).round().astype(np.uint8)


def gray_frame(ds: Dataset, index: int) -> np.ndarray:
    """Frame `index` of `ds` as uint8 [rows, cols]; raises on decode errors."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedPhotometric(photometric or "missing")
    arr, decoded_as = _decode(ds, index)
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric in MONOCHROME:
        if arr.ndim != 2:
            raise UnsupportedPhotometric(f"{photometric} with {arr.shape[-1]} samples per pixel")
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:  # signed: shift to unsigned range
            arr = arr.astype(np.int32) + 2 ** (bits - 1)
        gray = _to_8bit(arr, bits)
        return 255 - gray if photometric == "MONOCHROME1" else gray
    if photometric == PALETTE:
        rgb = apply_color_lut(arr, ds)
        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _luma(_to_8bit(rgb, lut_bits))
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnsupportedPhotometric(f"{photometric} with shape {arr.shape}")
    if decoded_as in YCBCR_FULL:
        return _to_8bit(arr[..., 0], bits)
    if decoded_as in YCBCR_PARTIAL:
        y = arr[..., 0].astype(np.float32) * (255.0 / (2**bits - 1))
        return np.clip((y - 16.0) * (255.0 / 219.0), 0, 255).round().astype(np.uint8)
    return _luma(_to_8bit(arr, bits))


def _decode(ds: Dataset, index: int) -> tuple[np.ndarray, str]:
    """Frame `index` with no colour conversion, and the photometric the decoder says it is in.

    Decoders may convert on their own (pylibjpeg-openjpeg returns YBR_ICT/RCT as RGB), so the
    decoder's reported interpretation, not the header's, decides how to get the grey.
    """
    syntax = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID") or ImplicitVRLittleEndian  # as readers
    arr, changes = get_decoder(syntax).as_array(ds, index=index, validate=True, as_rgb=False,
                                                **as_pixel_options(ds))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    return arr, str(changes.get("photometric_interpretation", photometric))
