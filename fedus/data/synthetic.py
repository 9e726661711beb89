"""Synthetic multi-centre B-mode ultrasound, so the demo and the tests need no data.

Images are simulated rather than drawn, because what the federated models must
cope with is ultrasound physics, not shapes on noise: texture is speckle (random
scatterers convolved with a pulse, envelope-detected, log-compressed), deep
tissue is darker or noisier depending on attenuation/TGC, lesions cast acoustic
shadows, and each "device" differs in resolution, gain, dynamic range, noise and
geometry (linear, convex, phased sector). That gives real domain shift between
centres, which is the point of a federated benchmark.

Pipeline per image, on a (depth, lateral) grid (lateral = position for linear
arrays, steering angle for sector/convex) at about twice the output resolution:
echogenicity map (layers, smooth variation, lesion) x two-way attenuation (with
extra attenuation through the lesion, accumulated along the beam -> shadowing)
-> Gaussian scatterers on every sample (plus sparse strong reflectors) -> RF lines
from a Gaussian-modulated-cosine pulse and a Gaussian beam (narrower at the focus),
envelope-detected by IQ demodulation in the Fourier domain (same envelope as
scipy.signal.hilbert on the RF, which a test checks, without having to resolve
the carrier) -> receive noise -> TGC, gain, log compression, scanner gray map ->
scan conversion (scipy.ndimage.map_coordinates) -> 8-bit.

The PSF is specified relative to the field of view, not in millimetres: at the
thumbnail sizes fedus trains on (64-128 px), true speckle (~0.1-0.5 mm) would be
sub-pixel and average away, removing exactly the texture that makes ultrasound
hard. Centre frequency drives attenuation; bandwidth sets the pulse's carrier.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy.ndimage import map_coordinates

GENERATOR_NAME = "fedus.data.synthetic"
GENERATOR_VERSION = "1.1.0"  # 1.1: intake columns (scanner, probe, size) in the manifest; same pixels
LABELS = ("normal", "hypoechoic", "hyperechoic")
TASK = "lesion_segmentation;classification_3class"
MANIFEST_HEADER = ("image_path", "mask_path", "label", "patient_id", "center", "device", "organ", "task",
                   # what `fedus intake` records of a PNG, so a site's data card names its simulated scanner
                   "manufacturer", "model", "transducer", "photometric", "rows", "cols", "n_frames")
MANUFACTURER = "fedus synthetic"
NEAR_DUP_R = 0.97  # same threshold as the public corpus' near_duplicates.csv
_WHITE_DB = 15.0  # display white level, dB above the RMS echo of unit-echogenicity tissue


@dataclass(frozen=True)
class DeviceProfile:
    """One scanner/probe/preset. Sizes are fractions of the field of view (depth for
    axial, lateral extent for lateral) so a profile looks the same at any output size."""

    name: str
    geometry: str  # "linear" | "convex" | "sector"
    centre_frequency_mhz: float
    fractional_bandwidth: float  # -6 dB; sets carrier cycles under the pulse envelope
    depth_cm: float
    axial_psf: float  # pulse envelope sigma / depth (speckle length)
    lateral_psf: float  # beam sigma at focus / lateral extent (speckle width)
    focus: float  # focal depth / depth
    defocus: float  # beam sigma grows by this factor far from the focus
    gain_db: float
    tgc_db_per_cm: float  # time-gain compensation slope
    attenuation_db_cm_mhz: float  # one-way; applied round trip
    noise_level: float  # receive noise amplitude relative to unit-tissue echo
    dynamic_range_db: float
    fan_angle_deg: float = 0.0  # sector/convex only
    apex_radius: float = 0.0  # convex: radius of curvature / depth; sector: near 0
    bright_scatterers: float = 0.002  # fraction of samples with strong (specular-like) scatterers
    gray_gamma: float = 1.6  # post-processing gray map (>1 darkens the low end, as scanner gray maps do)


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        # High-frequency linear (breast/thyroid): fine speckle, shallow, well compensated, wide DR.
        DeviceProfile("linear-hf-breast", "linear", 10.0, 0.7, 4.0, 0.010, 0.016, 0.45, 0.8,
                      gain_db=-7.0, tgc_db_per_cm=9.5, attenuation_db_cm_mhz=0.5, noise_level=0.003,
                      dynamic_range_db=60.0, gray_gamma=2.2),
        # Curvilinear abdominal: deep, coarser speckle, curved top, bright preset.
        DeviceProfile("convex-abdominal", "convex", 3.5, 0.6, 15.0, 0.013, 0.020, 0.5, 1.0,
                      gain_db=-3.0, tgc_db_per_cm=3.3, attenuation_db_cm_mhz=0.5, noise_level=0.004,
                      dynamic_range_db=55.0, fan_angle_deg=60.0, apex_radius=0.6, gray_gamma=1.8),
        # Low-resolution phased array: narrow apex, wide fan, blurred laterally, low DR, dark.
        DeviceProfile("sector-phased-lowres", "sector", 2.5, 0.5, 16.0, 0.018, 0.028, 0.4, 1.6,
                      gain_db=-4.0, tgc_db_per_cm=2.1, attenuation_db_cm_mhz=0.5, noise_level=0.006,
                      dynamic_range_db=45.0, fan_angle_deg=80.0, apex_radius=0.03, gray_gamma=1.6),
        # Cheap portable linear: under-compensated TGC and strong receive noise (grainy, dark depth).
        DeviceProfile("linear-noisy-portable", "linear", 7.5, 0.5, 5.0, 0.014, 0.024, 0.35, 1.3,
                      gain_db=-3.0, tgc_db_per_cm=5.5, attenuation_db_cm_mhz=0.5, noise_level=0.03,
                      dynamic_range_db=48.0, bright_scatterers=0.004, gray_gamma=2.0),
    )
}


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Grid:
    n_ax: int  # core simulation samples along depth (rays)
    n_lat: int  # core samples across
    pad_ax: int
    pad_lat: int
    X: np.ndarray  # physical coords (units of depth) of the padded sim grid, (N_ax, N_lat)
    Y: np.ndarray
    d: np.ndarray  # depth fraction along the beam, (N_ax,)
    u: np.ndarray  # lateral fraction, (N_lat,)
    coords: np.ndarray  # (2, size, size) sim-grid indices of output pixels
    valid: np.ndarray  # (size, size) bool: inside the imaged region
    Xo: np.ndarray  # physical coords of output pixels
    Yo: np.ndarray
    display_offset: np.ndarray  # (TGC + gain - white level + DR) / DR per depth sample, (N_ax,)
    log_attenuation: np.ndarray  # ln of the two-way tissue attenuation per depth sample, (N_ax,)


def _polar_to_phys(profile: DeviceProfile, d, u):
    """(depth fraction, lateral fraction) -> physical (X, Y) in units of depth."""
    if profile.geometry == "linear":
        return (u - 0.5) + 0 * d, d + 0 * u
    r0 = profile.apex_radius
    theta = (u - 0.5) * np.deg2rad(profile.fan_angle_deg)
    r = r0 + d
    return r * np.sin(theta), r * np.cos(theta) - r0


def _phys_to_polar(profile: DeviceProfile, X, Y):
    if profile.geometry == "linear":
        return Y, X + 0.5
    r0 = profile.apex_radius
    r = np.hypot(X, Y + r0)
    theta = np.arctan2(X, Y + r0)
    return r - r0, theta / np.deg2rad(profile.fan_angle_deg) + 0.5


@lru_cache(maxsize=64)
def _grid(profile: DeviceProfile, size: int) -> _Grid:
    # ~2x oversampling of the output, and PSF sigma >= 1.2 samples so the (baseband) PSF is not aliased.
    n_ax = max(2 * size, int(np.ceil(1.2 / profile.axial_psf)))
    n_lat = max(2 * size, int(np.ceil(1.2 / profile.lateral_psf)))
    pad_ax = int(np.ceil(4 * profile.axial_psf * n_ax))
    pad_lat = int(np.ceil(3 * profile.lateral_psf * (1 + profile.defocus) * n_lat))
    N_ax = sfft.next_fast_len(n_ax + 2 * pad_ax)
    N_lat = sfft.next_fast_len(n_lat + 2 * pad_lat)
    pad_ax_hi, pad_lat_hi = N_ax - n_ax - pad_ax, N_lat - n_lat - pad_lat
    d = (np.arange(-pad_ax, n_ax + pad_ax_hi) + 0.5) / n_ax
    u = (np.arange(-pad_lat, n_lat + pad_lat_hi) + 0.5) / n_lat
    X, Y = _polar_to_phys(profile, d[:, None], u[None, :])

    # Output box: bounding square of the imaged region, top-aligned, centred laterally.
    edge_d = np.linspace(0, 1, 65)
    bx, by = [], []
    for dd, uu in ((edge_d, 0 * edge_d), (edge_d, 0 * edge_d + 1), (0 * edge_d, edge_d), (0 * edge_d + 1, edge_d)):
        x, y = _polar_to_phys(profile, dd, uu)
        bx.append(x)
        by.append(y)
    bx, by = np.concatenate(bx), np.concatenate(by)
    side = max(bx.max() - bx.min(), by.max() - by.min())
    x0, y0 = (bx.max() + bx.min()) / 2 - side / 2, by.min()
    centres = (np.arange(size) + 0.5) / size * side
    Xo, Yo = np.meshgrid(x0 + centres, y0 + centres)  # Xo varies along columns
    do, uo = _phys_to_polar(profile, Xo, Yo)
    valid = (do >= 0) & (do <= 1) & (uo >= 0) & (uo <= 1)
    coords = np.stack([do * n_ax - 0.5 + pad_ax, uo * n_lat - 0.5 + pad_lat]).astype(np.float32)

    depth_cm = np.clip(d, 0, None) * profile.depth_cm
    att_db = 2 * profile.attenuation_db_cm_mhz * profile.centre_frequency_mhz * depth_cm
    display_db = profile.tgc_db_per_cm * depth_cm + profile.gain_db - _WHITE_DB
    for a in (X, Y, d, u, coords, valid, Xo, Yo):
        a.setflags(write=False)
    return _Grid(n_ax, n_lat, pad_ax, pad_lat, X.astype(np.float32), Y.astype(np.float32), d.astype(np.float32),
                 u.astype(np.float32), coords, valid, Xo, Yo,
                 ((display_db + profile.dynamic_range_db) / profile.dynamic_range_db).astype(np.float32),
                 (-att_db * np.log(10) / 20).astype(np.float32))


def _carrier(profile: DeviceProfile, n_ax: int) -> float:
    """Carrier in cycles per depth sample: a Gaussian pulse with -6 dB fractional bandwidth B
    has envelope sigma 0.375 / (B f0), so the axial PSF size fixes f0 given B."""
    return 0.375 / (profile.fractional_bandwidth * profile.axial_psf * n_ax)


@lru_cache(maxsize=64)
def _psf_filters(profile: DeviceProfile, shape: tuple[int, int], resolution: tuple[int, int]):
    """Baseband PSF spectra (focused / defocused beam) and the demodulation phase ramp.

    Normalised so unit-amplitude white scatterers give E|IQ|^2 = 1, which makes
    echogenicity maps read directly as RMS echo levels."""
    N_ax, N_lat = shape
    n_ax, n_lat = resolution
    sig_ax = profile.axial_psf * n_ax
    kz = sfft.fftfreq(N_ax)
    h_ax = np.exp(-0.5 * (2 * np.pi * kz * sig_ax) ** 2)  # spectrum of the Gaussian pulse envelope
    kx = sfft.fftfreq(N_lat)
    out = []
    for s in (profile.lateral_psf, profile.lateral_psf * (1 + profile.defocus)):
        g = np.exp(-0.5 * (2 * np.pi * kx * s * n_lat) ** 2)
        H = h_ax[:, None] * g[None, :]
        H = (H / np.sqrt(np.mean(H ** 2))).astype(np.float32)
        H.setflags(write=False)
        out.append(H)
    z = np.arange(N_ax)
    ramp = np.exp(-2j * np.pi * _carrier(profile, n_ax) * z).astype(np.complex64)
    ramp.setflags(write=False)
    return out[0], out[1], ramp


def simulate_envelope(rng: np.random.Generator, profile: DeviceProfile, amplitude: np.ndarray,
                      resolution: tuple[int, int] | None = None, return_rf: bool = False):
    """Pre-log envelope of RF lines through a scatterer field (rows = depth samples).

    Computed as scanners do, by IQ demodulation: the RF line is sum_z' s(z') p(z - z') with
    p = Gaussian envelope x cos(2 pi f0 z); demodulating by exp(-i 2 pi f0 z) and low-passing
    gives conv(s(z) exp(-i 2 pi f0 z), envelope), whose modulus is the Hilbert envelope of
    the RF (to within the pulse's negligible negative-frequency overlap). Working at baseband
    means the grid need not resolve the carrier, which keeps 64-128 px images cheap.

    Exposed so tests can check the physics (Rayleigh speckle: std/mean ~ 0.52 where
    `amplitude` is constant). `amplitude` is the RMS scatterer strength per sample
    (echogenicity x attenuation); convolution is circular, so callers pad.
    `resolution` = samples per depth / per lateral extent (default: amplitude.shape).
    With `return_rf`, also returns the RF lines (remodulated IQ; only meaningful when the
    grid resolves the carrier, i.e. resolution[0] * axial_psf is several samples).
    """
    shape = amplitude.shape
    resolution = tuple(resolution or shape)
    n = shape[0] * shape[1]
    scat = rng.standard_normal(shape, dtype=np.float32)
    scat *= amplitude
    k = rng.poisson(profile.bright_scatterers * n)
    if k:  # sparse strong reflectors (fibres, microcalcification-like): bright dots, non-Rayleigh tail
        idx = rng.integers(0, n, size=k)
        scat.ravel()[idx] *= rng.uniform(3.0, 6.0, size=k).astype(np.float32)
    H_focus, H_wide, ramp = _psf_filters(profile, shape, resolution)
    S = sfft.fft2(scat * ramp[:, None], workers=1)
    iq_focus = sfft.ifft2(S * H_focus, workers=1)
    iq_wide = sfft.ifft2(S * H_wide, workers=1)
    # Beam is narrowest at the focus and widens with distance from it (depth-dependent PSF,
    # approximated by blending two separable PSFs).
    d = (np.arange(shape[0]) + 0.5) / resolution[0]
    w = np.clip(np.abs(d - profile.focus) / max(profile.focus, 1 - profile.focus), 0, 1).astype(np.float32)
    w = np.sqrt(w)[:, None]
    iq_wide -= iq_focus
    iq_wide *= w
    iq = iq_focus
    iq += iq_wide
    if profile.noise_level > 0:  # receive (electronic) noise: after the beam, so spatially white
        noise = rng.standard_normal(shape + (2,), dtype=np.float32).view(np.complex64)[..., 0]
        noise *= np.float32(profile.noise_level / np.sqrt(2))
        iq += noise
    env = np.abs(iq)
    if return_rf:
        return env, (iq * np.conj(ramp)[:, None]).real.copy()
    return env


# ----------------------------------------------------------------------------- anatomy


def _waves(rng, n, amp):
    """A few random low harmonics: smooth random boundaries."""
    k = np.arange(1, n + 1)
    return rng.uniform(-1, 1, n) * amp / k, k, rng.uniform(0, 2 * np.pi, n)


def _sample_anatomy(rng: np.random.Generator, profile: DeviceProfile, label: str) -> dict:
    """Patient-level parameters (layers, texture, lesion): shared by images of one patient."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    skin = rng.uniform(0.02, 0.035)
    fat = skin + rng.uniform(0.06, 0.16)
    fascia1 = fat + rng.uniform(0.008, 0.015)
    muscle = fascia1 + rng.uniform(0.06, 0.14)
    fascia2 = muscle + rng.uniform(0.008, 0.015)
    deep = rng.uniform(0.72, 0.9)
    layers = {
        "bounds": np.array([skin, fat, fascia1, muscle, fascia2, deep]),
        # echo of: skin, fat, fascia, muscle, fascia, parenchyma, deep tissue
        "echo": np.array([rng.uniform(1.6, 2.2), rng.uniform(0.2, 0.35), rng.uniform(1.8, 2.6),
                          rng.uniform(0.55, 0.8), rng.uniform(1.6, 2.4), rng.uniform(0.85, 1.2),
                          rng.uniform(0.6, 1.1)]),
        "wave": [_waves(rng, 3, rng.uniform(0.005, 0.03)) for _ in range(6)],
        "striation_freq": rng.uniform(25, 45),
    }
    # heterogeneous parenchyma: coarse + finer log-echogenicity patches (lobules, fibroglandular mix)
    texture = [rng.standard_normal((6, 6)) * rng.uniform(0.15, 0.3), rng.standard_normal((16, 16)) * rng.uniform(0.15, 0.3)]
    # bright thin interfaces (ligaments, septa, vessel walls) below the muscle layer
    strands = []
    for _ in range(int(rng.integers(2, 7))):
        u0 = rng.uniform(-0.2, 0.8)
        strands.append((rng.uniform(fascia2 + 0.03, 0.95), _waves(rng, 3, rng.uniform(0.01, 0.06)), u0,
                        u0 + rng.uniform(0.2, 0.7), rng.uniform(0.004, 0.009), rng.uniform(1.0, 2.5)))
    lesion = None
    if label != "normal":
        hypo = label == "hypoechoic"
        dc, uc = rng.uniform(0.38, 0.6), rng.uniform(0.32, 0.68)
        if profile.geometry != "linear":
            uc = 0.5 + (uc - 0.5) * 0.7
        xc, yc = _polar_to_phys(profile, np.float64(dc), np.float64(uc))
        a = rng.uniform(0.09, 0.17)
        lesion = {
            "hypo": hypo,
            "centre": (float(xc), float(yc)),
            "axes": (a, a * rng.uniform(0.55, 0.95) if hypo else a * rng.uniform(0.6, 1.0)),
            "angle": rng.uniform(-0.4, 0.4),
            # malignant-looking hypoechoic lesions are lobulated/irregular, hyperechoic ones smoother
            "harmonics": _waves(rng, 6, rng.uniform(0.15, 0.35) if hypo else rng.uniform(0.03, 0.1)),
            "echo": rng.uniform(0.05, 0.18) if hypo else rng.uniform(3.5, 6.0),
            # total extra round-trip attenuation through the lesion, dB (negative = enhancement)
            "shadow_db": rng.uniform(10, 20) if hypo else (-rng.uniform(2, 5) if rng.random() < 0.5 else 0.0),
        }
    return {"layers": layers, "texture": texture, "strands": strands, "lesion": lesion, "shift": 0.0}


def _perturb_anatomy(rng: np.random.Generator, anatomy: dict) -> dict:
    """Another view of the same patient: probe moved a little, lesion slightly resized."""
    out = dict(anatomy)
    out["shift"] = float(rng.uniform(-0.06, 0.06))
    if anatomy["lesion"] is not None:
        les = dict(anatomy["lesion"])
        s = rng.uniform(0.9, 1.1)
        les["axes"] = (les["axes"][0] * s, les["axes"][1] * s)
        les["angle"] = les["angle"] + rng.uniform(-0.1, 0.1)
        les["centre"] = (les["centre"][0], les["centre"][1] + rng.uniform(-0.03, 0.03))
        out["lesion"] = les
    return out


def _lesion_field(lesion: dict, X: np.ndarray, Y: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-ness in [0,1] (edge>0) or hard indicator (edge=0) of the lesion.

    Boundary radius is 1 + sum_k a_k cos(k phi + ph_k) in the ellipse's own frame, evaluated
    only near the lesion and with complex powers instead of trig (this is the hot spot)."""
    xc, yc = lesion["centre"]
    a, b = lesion["axes"]
    amp, k, ph = lesion["harmonics"]
    c, s = np.cos(lesion["angle"]), np.sin(lesion["angle"])
    dx, dy = X - np.float32(xc), Y - np.float32(yc)
    p = (c * dx + s * dy) * np.float32(1 / a)
    q = (s * -dx + c * dy) * np.float32(1 / b)
    rho2 = p * p + q * q
    reach = 1 + float(np.abs(amp).sum()) + edge
    near = rho2 < reach * reach
    out = np.zeros(X.shape, np.float32 if edge > 0 else bool)
    pn, qn = p[near], q[near]
    rho = np.sqrt(pn * pn + qn * qn) + np.float32(1e-12)
    z = (pn + 1j * qn) / rho  # e^{i phi}
    coef = (amp * np.exp(1j * ph)).astype(np.complex64)
    boundary = np.ones_like(rho)
    zk = z
    for i in range(len(k)):  # k = 1, 2, ... in order
        boundary += (coef[i] * zk).real
        zk = zk * z
    if edge <= 0:
        out[near] = rho < boundary
    else:
        out[near] = np.clip((boundary - rho) / edge + 0.5, 0, 1)
    return out


def _log_echogenicity(anatomy: dict, g: _Grid, profile: DeviceProfile):
    """ln of the RMS scatterer strength (before attenuation), and the lesion's soft map.

    Built in the log domain (one exp at the end) because this runs per image on the full grid."""
    lay = anatomy["layers"]
    d = g.d
    u = g.u + np.float32(anatomy["shift"])
    N_ax, N_lat = g.X.shape
    bounds = np.stack([b + np.sum(a[:, None] * np.sin(2 * np.pi * k[:, None] * u + p[:, None]), axis=0)
                       for b, (a, k, p) in zip(lay["bounds"], lay["wave"])]).astype(np.float32)
    le = np.log(lay["echo"]).astype(np.float32)
    # piecewise-constant layers: add each step where its boundary crosses a column, then cumsum
    steps = np.zeros((N_ax + 1, N_lat), np.float32)
    cols = np.arange(N_lat)
    for i in range(len(bounds)):
        np.add.at(steps, (np.searchsorted(d, bounds[i]), cols), le[i + 1] - le[i])
    steps[0] += le[0]
    logv = np.cumsum(steps[:-1], axis=0)
    # muscle striations: fibrous bands parallel to the skin
    lo, hi = np.searchsorted(d, [bounds[2].min(), bounds[3].max()])
    band = d[lo:hi, None]
    inside = (band > bounds[2]) & (band < bounds[3])
    logv[lo:hi] += 0.45 * inside * np.sin(2 * np.pi * lay["striation_freq"] * (band - 0.5 * bounds[2]))
    # smooth echogenicity variation: random control grids, Gaussian-interpolated as W_d @ R @ W_u.T
    for R in anatomy["texture"]:
        logv += _smooth_basis(d, R.shape[0]) @ R.astype(np.float32) @ _smooth_basis(u, R.shape[1]).T
    for base, (a, k, p), u0, u1, w, gain in anatomy["strands"]:
        y = base + np.sum(a[:, None] * np.sin(2 * np.pi * k[:, None] * u + p[:, None]), axis=0)
        lo = max(int(np.searchsorted(d, y.min() - 3 * w)), 0)
        hi = int(np.searchsorted(d, y.max() + 3 * w))
        if hi <= lo:
            continue
        win = np.clip(np.minimum(u - u0, u1 - u) / 0.05, 0, 1)
        logv[lo:hi] += gain * win * np.exp(-0.5 * ((d[lo:hi, None] - y) / w) ** 2)
    les = anatomy["lesion"]
    soft = None
    if les is not None:
        soft = _lesion_field(_lesion_in_view(anatomy, profile), g.X, g.Y, edge=0.15)
        inner = np.log(les["echo"]) + 0.22 * np.outer(np.cos(d * 60), np.cos(g.u * 50))  # mild internal texture
        logv += soft * (inner.astype(np.float32) - logv)
    return logv, soft


def _smooth_basis(x: np.ndarray, n: int) -> np.ndarray:
    """(len(x), n) Gaussian interpolation weights from n control points spanning [0, 1]."""
    c = np.arange(n, dtype=np.float32) * np.float32(1.1 / (n - 1)) - np.float32(0.05)
    t = (x[:, None] - c[None, :]) * np.float32((n - 1) / 1.1)
    return np.exp(-0.5 * t * t)


def _shift_lesion(les: dict, dx: float) -> dict:
    out = dict(les)
    out["centre"] = (les["centre"][0] + dx, les["centre"][1])
    return out


def _rotate_lesion(les: dict, shift: float, profile: DeviceProfile) -> dict:
    """Probe motion for a fan: rotate the anatomy about the apex (same as shifting the angle)."""
    r0 = profile.apex_radius
    t = -shift * np.deg2rad(profile.fan_angle_deg)
    x, y = les["centre"]
    y0 = y + r0
    c, s = np.cos(t), np.sin(t)
    out = dict(les)
    out["centre"] = (c * x + s * y0, -s * x + c * y0 - r0)
    out["angle"] = les["angle"] - t
    return out


def _lesion_in_view(anatomy: dict, profile: DeviceProfile) -> dict | None:
    les = anatomy["lesion"]
    if les is None:
        return None
    if profile.geometry == "linear":
        return _shift_lesion(les, -anatomy["shift"])
    return _rotate_lesion(les, anatomy["shift"], profile)


def _render(rng: np.random.Generator, profile: DeviceProfile, size: int, anatomy: dict):
    g = _grid(profile, size)
    logamp, soft = _log_echogenicity(anatomy, g, profile)
    logamp += g.log_attenuation[:, None]
    if soft is not None:
        # extra attenuation accumulated along each beam through the lesion: shadow / enhancement
        thickness = np.cumsum(soft, axis=0)
        thickness *= np.float32(-anatomy["lesion"]["shadow_db"] * np.log(10) / 20 / max(float(thickness[-1].max()), 1.0))
        logamp += thickness
    env = simulate_envelope(rng, profile, np.exp(logamp), resolution=(g.n_ax, g.n_lat))
    # log compression to the dynamic range, then the gray map: all in place on the sim grid
    env += np.float32(1e-6)
    img = np.log(env, out=env)
    img *= np.float32(20 / np.log(10) / profile.dynamic_range_db)
    img += g.display_offset[:, None]
    np.clip(img, 0, 1, out=img)
    img **= np.float32(profile.gray_gamma)
    # [1,2,1] anti-alias before the ~2x down-sampling (receive noise is white at the sim grid)
    img[1:-1] = 0.5 * img[1:-1] + 0.25 * (img[:-2] + img[2:])
    img[:, 1:-1] = 0.5 * img[:, 1:-1] + 0.25 * (img[:, :-2] + img[:, 2:])
    out = map_coordinates(img, g.coords, order=1, mode="constant", cval=0.0)
    out *= 255
    out[~g.valid] = 0
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    les = _lesion_in_view(anatomy, profile)
    if les is None:
        mask = np.zeros((size, size), np.uint8)
    else:
        mask = ((_lesion_field(les, g.Xo, g.Yo, edge=0) & g.valid) * 255).astype(np.uint8)
    return image, mask


def generate_image(rng: np.random.Generator, profile: DeviceProfile, size: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One image of a new random patient -> (image uint8 [size,size], mask uint8 [size,size] in {0,255}).

    All randomness comes from `rng`, so a seeded generator gives identical bytes."""
    anatomy = _sample_anatomy(rng, profile, label)
    return _render(rng, profile, size, anatomy)


# ----------------------------------------------------------------------------- corpus


def _patient_plan(rng: np.random.Generator, n_images: int) -> list[tuple[int, str, int]]:
    """(patient index, label, n images) covering n_images; labels cycle so classes stay balanced."""
    plan, j, left = [], 0, n_images
    offset = int(rng.integers(3))
    while left > 0:
        k = min(int(rng.integers(1, 4)), left)
        plan.append((j, LABELS[(j + offset) % 3], k))
        left -= k
        j += 1
    return plan


def _near_duplicates(images: list[np.ndarray], names: list[str], patients: list[str], labels: list[str]):
    """Pairs with Pearson r >= 0.97 at 64 px, like the public corpus (usually none: new speckle per view)."""
    vecs = []
    for im in images:
        if im.shape != (64, 64):
            im = np.asarray(Image.fromarray(im).resize((64, 64), Image.BILINEAR))
        v = im.astype(np.float64).ravel()
        v = v - v.mean()
        vecs.append(v / (np.linalg.norm(v) or 1.0))
    if not vecs:
        return []
    V = np.stack(vecs)
    R = V @ V.T
    rows = []
    ia, ib = np.nonzero(np.triu(R >= NEAR_DUP_R, k=1))
    for a, b in zip(ia, ib):
        rows.append((names[a], names[b], f"{R[a, b]:.4f}", str(patients[a] == patients[b]), str(labels[a] == labels[b])))
    return rows


def write_synthetic_corpus(out_dir: Path, n_centres: int = 3, images_per_centre: int = 120, size: int = 64,
                           seed: int = 0) -> Path:
    """Writes a corpus in the same layout as the public corpus and returns the manifest path.

    Each centre gets its own device profile and its own child seed, so centre i's
    images do not change when n_centres does. Patients have 1-3 views sharing
    anatomy and lesion class, so patient-grouped splitting is exercised."""
    out_dir = Path(out_dir)
    names = list(DEVICE_PROFILES)
    children = np.random.SeedSequence(seed).spawn(n_centres)
    rows, all_imgs, all_names, all_pat, all_lab = [], [], [], [], []
    used = {}
    for i, child in enumerate(children):
        profile = DEVICE_PROFILES[names[i % len(names)]]
        used[f"synthetic-centre-{i}"] = asdict(profile)
        rng = np.random.default_rng(child)
        (out_dir / "images" / f"c{i}").mkdir(parents=True, exist_ok=True)
        (out_dir / "masks" / f"c{i}").mkdir(parents=True, exist_ok=True)
        k = 0
        for j, label, n_views in _patient_plan(rng, images_per_centre):
            anatomy = _sample_anatomy(rng, profile, label)
            pid = f"syn-c{i}-p{j:04d}"
            for _ in range(n_views):
                image, mask = _render(rng, profile, size, _perturb_anatomy(rng, anatomy))
                img_rel, mask_rel = f"images/c{i}/{k:05d}.png", f"masks/c{i}/{k:05d}.png"
                Image.fromarray(image).save(out_dir / img_rel)
                Image.fromarray(mask).save(out_dir / mask_rel)
                rows.append((img_rel, mask_rel, label, pid, f"synthetic-centre-{i}", profile.name, "synthetic", TASK,
                             MANUFACTURER, profile.name, profile.geometry, "L", size, size, 1))
                all_imgs.append(image)
                all_names.append(img_rel)
                all_pat.append(pid)
                all_lab.append(label)
                k += 1
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(MANIFEST_HEADER)
        w.writerows(rows)
    with open(out_dir / "near_duplicates.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("image_a", "image_b", "pearson_r_64px", "same_patient_id", "same_label"))
        w.writerows(_near_duplicates(all_imgs, all_names, all_pat, all_lab))
    provenance = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_centres": n_centres,
        "images_per_centre": images_per_centre,
        "size": size,
        "labels": list(LABELS),
        "profiles": used,
        "note": "Simulated B-mode ultrasound (speckle physics); no real patient data. No timestamps here, "
                "so a seed gives byte-identical files (given numpy's stable Generator streams).",
    }
    (out_dir / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return manifest


__all__ = ["DEVICE_PROFILES", "LABELS", "DeviceProfile", "generate_image", "simulate_envelope",
           "write_synthetic_corpus"]
