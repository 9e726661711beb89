"""The synthetic generator must be physically plausible (speckle, shadowing, geometry) and
deterministic, since the demo's federated centres and many tests are built on it."""

from __future__ import annotations

import csv
import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image
from scipy.signal import hilbert

from fedus.data.synthetic import (
    DEVICE_PROFILES,
    LABELS,
    DeviceProfile,
    generate_image,
    simulate_envelope,
    write_synthetic_corpus,
)

PROFILES = list(DEVICE_PROFILES.values())
LINEAR = [p for p in PROFILES if p.geometry == "linear"]
FANS = [p for p in PROFILES if p.geometry in ("sector", "convex")]


def test_api_shapes_and_types():
    assert LABELS == ("normal", "hypoechoic", "hyperechoic")
    assert len(DEVICE_PROFILES) >= 4 and {p.geometry for p in PROFILES} >= {"linear", "sector", "convex"}
    for name, p in DEVICE_PROFILES.items():
        assert isinstance(p, DeviceProfile) and p.name == name
        with pytest.raises(Exception):
            p.gain_db = 1.0  # frozen
    for label in LABELS:
        img, mask = generate_image(np.random.default_rng(0), PROFILES[0], 48, label)
        assert img.shape == mask.shape == (48, 48) and img.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask.max() == 0) == (label == "normal")
    with pytest.raises(ValueError):
        generate_image(np.random.default_rng(0), PROFILES[0], 48, "benign")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_deterministic(profile):
    a = generate_image(np.random.default_rng(7), profile, 64, "hypoechoic")
    b = generate_image(np.random.default_rng(7), profile, 64, "hypoechoic")
    c = generate_image(np.random.default_rng(8), profile, 64, "hypoechoic")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_rayleigh_speckle(profile):
    """Fully developed speckle: envelope std/mean = sqrt(4/pi - 1) = 0.523 in a homogeneous region."""
    env = simulate_envelope(np.random.default_rng(1), profile, np.ones((256, 256), np.float32))
    patch = env[32:-32, 32:-32]
    ratio = patch.std() / patch.mean()
    assert abs(ratio - 0.523) < 0.08, ratio


def test_envelope_is_hilbert_envelope_of_rf():
    """The IQ shortcut must agree with RF + scipy.signal.hilbert when the grid resolves the carrier."""
    profile = DEVICE_PROFILES["linear-hf-breast"]
    env, rf = simulate_envelope(np.random.default_rng(2), profile, np.ones((512, 16), np.float32), return_rf=True)
    ref = np.abs(hilbert(rf, axis=0))
    inner = slice(40, -40)
    r = np.corrcoef(env[inner].ravel(), ref[inner].ravel())[0, 1]
    assert r > 0.97, r
    assert abs(ref[inner].mean() / env[inner].mean() - 1) < 0.05


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    inside = mask > 0
    return binary_dilation(inside, iterations=width) & ~binary_dilation(inside, iterations=2)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_lesion_contrast(profile):
    rng = np.random.default_rng(3)
    hypo, hyper = [], []
    for _ in range(6):
        for label, out in (("hypoechoic", hypo), ("hyperechoic", hyper)):
            img, mask = generate_image(rng, profile, 64, label)
            ring = _ring(mask, 5) & (img > 0)
            out.append(img[mask > 0].mean() - img[ring].mean())
    assert np.mean(hypo) < -20 and max(hypo) < 0, hypo
    assert np.mean(hyper) > 20 and min(hyper) > 0, hyper


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_posterior_shadowing(profile):
    """Mean intensity just below a hypoechoic lesion is lower than at the same depth beside it."""
    rng = np.random.default_rng(4)
    below, beside = [], []
    for _ in range(8):
        img, mask = generate_image(rng, profile, 64, "hypoechoic")
        rows, cols = np.nonzero(mask)
        bottom, c0, c1 = rows.max(), cols.min(), cols.max()
        w = c1 - c0 + 1
        band = img[bottom + 2: bottom + 12].astype(float)
        valid = band > 0
        centre = slice(c0 + w // 4, c1 - w // 4 + 1)
        side = np.zeros(64, bool)
        side[max(c0 - w, 0): max(c0 - 3, 0)] = True
        side[c1 + 4: c1 + w + 1] = True
        b, s = band[:, centre][valid[:, centre]], band[:, side][valid[:, side]]
        if b.size and s.size:
            below.append(b.mean())
            beside.append(s.mean())
    assert len(below) >= 5
    assert np.mean(below) < np.mean(beside) - 8, (np.mean(below), np.mean(beside))


def test_geometry_corners():
    rng = np.random.default_rng(5)
    for p in FANS:
        img, _ = generate_image(rng, p, 64, "normal")
        for corner in (img[:3, :3], img[:3, -3:], img[-3:, :3], img[-3:, -3:]):
            assert corner.max() == 0, p.name
        assert img[20:44, 28:36].mean() > 20
    for p in LINEAR:
        img, _ = generate_image(rng, p, 64, "normal")
        for corner in (img[:6, :6], img[:6, -6:], img[-6:, :6], img[-6:, -6:]):
            assert corner.mean() > 5, p.name


def _stats(profile: DeviceProfile):
    rng = np.random.default_rng(6)
    imgs = np.stack([generate_image(rng, profile, 64, "normal")[0] for _ in range(6)]).astype(float)
    patch = imgs[:, 24:40, 26:38]
    z = patch - patch.mean(axis=(1, 2), keepdims=True)
    lat = (z[:, :, 1:] * z[:, :, :-1]).mean() / z.var()  # lag-1 correlation: speckle width
    ax = (z[:, 1:] * z[:, :-1]).mean() / z.var()  # lag-1 correlation: speckle length
    return np.array([imgs[imgs > 0].mean(), patch.std(), lat * 100, ax * 100, (imgs == 0).mean() * 100])


def test_profiles_differ():
    """Centres must show domain shift: some image statistic separates every pair of profiles."""
    stats = {p.name: _stats(p) for p in PROFILES}
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.max(np.abs(stats[a] - stats[b])) > 5, (a, b, stats[a], stats[b])
    means = [s[0] for s in stats.values()]
    assert max(means) - min(means) > 10


def _read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_corpus_layout(tmp_path):
    out = tmp_path / "corpus"
    manifest = write_synthetic_corpus(out, n_centres=2, images_per_centre=15, size=32, seed=3)
    assert manifest == out / "manifest.csv"
    with open(manifest, newline="") as f:
        assert next(csv.reader(f)) == ["image_path", "mask_path", "label", "patient_id", "center", "device",
                                       "organ", "task", "manufacturer", "model", "transducer", "photometric",
                                       "rows", "cols", "n_frames"]
    rows = _read_manifest(manifest)
    assert len(rows) == 30
    names = list(DEVICE_PROFILES)
    patient_label = {}
    for r in rows:
        img = np.asarray(Image.open(out / r["image_path"]))
        mask = np.asarray(Image.open(out / r["mask_path"]))
        assert img.shape == mask.shape == (32, 32) and img.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask.max() == 0) == (r["label"] == "normal")
        i = int(r["center"].rsplit("-", 1)[1])
        assert r["image_path"].startswith(f"images/c{i}/") and r["device"] == names[i % len(names)]
        profile = DEVICE_PROFILES[r["device"]]  # recorded as intake records a PNG, for the data card
        assert (r["model"], r["transducer"], r["photometric"], r["rows"], r["cols"], r["n_frames"]) == (
            profile.name, profile.geometry, "L", "32", "32", "1")
        assert r["patient_id"].startswith(f"syn-c{i}-p")
        assert r["organ"] == "synthetic" and r["task"] == "lesion_segmentation;classification_3class"
        assert patient_label.setdefault(r["patient_id"], r["label"]) == r["label"]
    for c in ("synthetic-centre-0", "synthetic-centre-1"):
        assert {r["label"] for r in rows if r["center"] == c} == set(LABELS)
    counts = {}
    for r in rows:
        counts[r["patient_id"]] = counts.get(r["patient_id"], 0) + 1
    assert set(counts.values()) <= {1, 2, 3} and max(counts.values()) > 1
    with open(out / "near_duplicates.csv", newline="") as f:
        assert next(csv.reader(f)) == ["image_a", "image_b", "pearson_r_64px", "same_patient_id", "same_label"]
    prov = json.loads((out / "PROVENANCE.json").read_text())
    assert prov["seed"] == 3 and prov["n_centres"] == 2 and prov["size"] == 32
    assert set(prov["profiles"]) == {"synthetic-centre-0", "synthetic-centre-1"}


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_corpus_deterministic_and_centre_independent(tmp_path):
    a = write_synthetic_corpus(tmp_path / "a", n_centres=1, images_per_centre=6, size=32, seed=11).parent
    b = write_synthetic_corpus(tmp_path / "b", n_centres=1, images_per_centre=6, size=32, seed=11).parent
    c = write_synthetic_corpus(tmp_path / "c", n_centres=2, images_per_centre=6, size=32, seed=11).parent
    assert _digest(a) == _digest(b)
    assert _digest(a / "images" / "c0") == _digest(c / "images" / "c0")
    assert _digest(a / "masks" / "c0") == _digest(c / "masks" / "c0")


def test_speed_sanity():
    rng = np.random.default_rng(0)
    for p in PROFILES:  # warm the geometry/PSF caches
        generate_image(rng, p, 64, "normal")
    t = time.perf_counter()
    for k in range(50):
        generate_image(rng, PROFILES[k % len(PROFILES)], 64, LABELS[k % 3])
    assert time.perf_counter() - t < 2.0
