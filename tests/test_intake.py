"""Site data intake: real and generated ultrasound DICOMs, bad files, cache, data card, CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dicom_factory import (
    TEXT_BOX, US_IMAGE, fan_mask, hot_lut, jpeg_baseline_ybr422, native_ybr422, palette, save, sector_frames,
    ultrasound_region, us_dataset,
)
from fedus.intake import FrameSampling, data_card, render_markdown, scan
from fedus.intake.card import card_of_rows, check_card, render_line
from fedus.intake.readers import SKIP_REASONS
from fedus.intake.secret import SECRET_FILE

pydicom = pytest.importorskip("pydicom")
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, MPEG2MPML, RLELossless  # noqa: E402

REAL_US = ("US1_UNCR.dcm", "US1_J2KR.dcm", "US1_J2KI.dcm", "gdcm-US-ALOKA-16.dcm")


def _manifest(result) -> pd.DataFrame:
    return pd.read_csv(result.manifest, dtype=str, keep_default_na=False)


def _image(result, row) -> np.ndarray:
    return np.asarray(Image.open(result.manifest.parent / row["image_path"]))


def _by_source(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {name: rows.reset_index(drop=True) for name, rows in df.groupby("source_path")}


def _reasons(result) -> dict[str, str]:
    log = pd.read_csv(result.log, dtype=str, keep_default_na=False)
    return dict(zip(log["path"], log["reason"]))


def test_manifest_columns_match_fedus_data():
    from fedus.data.manifest import MANIFEST_COLUMNS
    from fedus.intake.scanner import MANIFEST_COLUMNS as INTAKE_COLUMNS

    assert INTAKE_COLUMNS == MANIFEST_COLUMNS


def test_real_ultrasound_dicoms(tmp_path):
    get = pytest.importorskip("pydicom.data").get_testdata_file
    site = tmp_path / "site"
    site.mkdir()
    for name in REAL_US:
        shutil.copy(get(name), site / name)
    result = scan(site, tmp_path / "out" / "manifest.csv", workers=1)
    assert result.rows == 4 and result.skipped == {}
    rows = {r["source_path"]: r for _, r in _manifest(result).iterrows()}
    images = {name: _image(result, rows[name]).astype(int) for name in REAL_US}
    for name, img in images.items():
        live = img[img > 0]
        assert img.ndim == 2 and img.dtype == np.int64
        assert 20 < live.mean() < 120 and live.std() > 20, name  # B-mode texture, not a flat or saturated image
    # GE screen capture (RGB, no regions): auto-detected region drops the burned-in text band on top
    uncr = pydicom.dcmread(get("US1_UNCR.dcm")).pixel_array.mean(axis=2)
    assert uncr[:100].max() > 200  # the text is there in the source ...
    x0, y0, x1, y1 = map(int, rows["US1_UNCR.dcm"]["crop_box"].split(","))
    assert 95 < y0 < 115 and 330 < y1 < 350 and x1 - x0 > 550  # ... and outside the crop
    assert rows["US1_UNCR.dcm"]["region"] == "auto"
    # lossless JPEG 2000 (YBR_RCT) decodes to the same pixels; lossy (YBR_ICT, 16:1) to nearly the same
    assert rows["US1_J2KR.dcm"]["crop_box"] == rows["US1_UNCR.dcm"]["crop_box"]
    assert np.array_equal(images["US1_J2KR.dcm"], images["US1_UNCR.dcm"])
    assert images["US1_J2KI.dcm"].shape == images["US1_UNCR.dcm"].shape
    assert np.abs(images["US1_J2KI.dcm"] - images["US1_UNCR.dcm"]).mean() < 3.0
    # ALOKA: 16-bit palette colour with two declared 2D regions side by side
    aloka = rows["gdcm-US-ALOKA-16.dcm"]
    assert aloka["photometric"] == "PALETTE COLOR" and aloka["region"] == "dicom"
    assert aloka["crop_box"] == "32,24,640,416"
    assert float(aloka["pixel_spacing_x_mm"]) == pytest.approx(0.38265, abs=1e-4)
    assert images["gdcm-US-ALOKA-16.dcm"].shape == (392, 608)


@pytest.fixture(scope="module")
def written_site(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Every supported encoding plus every kind of bad file the issue names."""
    site = tmp_path_factory.mktemp("written")
    frames = sector_frames(12)
    f0 = frames[0]
    save(us_dataset(frames, BurnedInAnnotation="YES"), site / "cine" / "cine.dcm")
    ds = us_dataset(frames)
    ds.compress(RLELossless)
    save(ds, site / "cine" / "cine_rle.dcm")
    ds = us_dataset(f0)
    ds.compress(JPEGLSLossless)
    save(ds, site / "jpegls.dcm")
    ds = us_dataset(f0)
    ds.compress(JPEG2000Lossless)
    save(ds, site / "j2k.dcm")
    save(jpeg_baseline_ybr422(np.repeat(f0[..., None], 3, axis=2)), site / "ybr422.dcm")
    save(us_dataset(255 - f0, "MONOCHROME1"), site / "mono1.dcm")
    save(palette(us_dataset(f0), hot_lut()), site / "palette.dcm")
    save(ultrasound_region(us_dataset(f0), 10, 12, 100, 80), site / "regions.dcm")
    save(us_dataset(f0, modality="CT"), site / "ct.dcm")
    data = (site / "cine" / "cine.dcm").read_bytes()
    (site / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (site / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    (site / "random_noext").write_bytes(np.random.default_rng(1).bytes(4096))
    (site / "random_dicm.dcm").write_bytes(b"\x00" * 128 + b"DICM" + np.random.default_rng(2).bytes(512))
    (site / "empty.dcm").write_bytes(b"")
    save(us_dataset(np.full((1, 1), 7, np.uint8)), site / "one_pixel.dcm")
    save(us_dataset(f0, PhotometricInterpretation="HSV"), site / "hsv.dcm")
    ds = us_dataset(f0)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    save(ds, site / "mpeg2.dcm")
    Image.fromarray(f0).save(site / "plain.png")
    (site / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    Image.fromarray(np.full((1, 1), 9, np.uint8)).save(site / "tiny.png")
    return site, frames


EXPECTED_SKIPS = {
    "ct.dcm": "not-ultrasound", "truncated.dcm": "corrupt-dicom", "random.dcm": "corrupt-dicom", "random_dicm.dcm": "corrupt-dicom",
    "random_noext": "not-dicom", "empty.dcm": "empty-file", "one_pixel.dcm": "too-small",
    "hsv.dcm": "unknown-photometric", "mpeg2.dcm": "unsupported-transfer-syntax",
    "broken.png": "unreadable-image", "tiny.png": "too-small",
}


def test_written_dicoms_end_as_rows_or_counted_skips(written_site, tmp_path):
    site, frames = written_site
    f0 = frames[0].astype(int)
    result = scan(site, tmp_path / "manifest.csv", sampling=FrameSampling(count=4), workers=2)
    assert _reasons(result) == EXPECTED_SKIPS and set(EXPECTED_SKIPS.values()) <= set(SKIP_REASONS)
    assert sum(result.skipped.values()) == len(EXPECTED_SKIPS) and result.files == len(EXPECTED_SKIPS) + 9
    rows = _by_source(_manifest(result))
    assert set(rows) == {"cine/cine.dcm", "cine/cine_rle.dcm", "jpegls.dcm", "j2k.dcm", "ybr422.dcm",
                         "mono1.dcm", "palette.dcm", "regions.dcm", "plain.png"}
    # cine: 4 evenly spaced frames, one group for splits, and the right frame in each row
    for name in ("cine/cine.dcm", "cine/cine_rle.dcm"):
        cine = rows[name]
        assert list(cine["frame_index"].astype(int)) == [0, 4, 7, 11]
        assert cine[["patient_id", "study_id", "series_id"]].nunique().tolist() == [1, 1, 1]
        for _, row in cine.iterrows():
            x0, y0, x1, y1 = map(int, row["crop_box"].split(","))
            out = _image(result, row).astype(int)
            live = out > 0
            assert np.array_equal(out[live], frames[int(row["frame_index"])][y0:y1, x0:x1][live])
    assert rows["cine/cine.dcm"]["burned_in"][0] == "True" and rows["j2k.dcm"]["burned_in"][0] == "False"
    # auto-detected sector: burned-in text blanked/cropped away, the fan kept
    fan = fan_mask(*f0.shape)
    hot_grey = np.round(hot_lut() @ [0.299, 0.587, 0.114]).astype(int)  # BT.601 luma of the palette
    for name, expected in [("jpegls.dcm", f0), ("j2k.dcm", f0), ("mono1.dcm", f0), ("palette.dcm", hot_grey[f0])]:
        row = rows[name].iloc[0]
        out = _image(result, row).astype(int)
        x0, y0, x1, y1 = map(int, row["crop_box"].split(","))
        assert row["region"] == "auto" and (y0 >= TEXT_BOX[0].stop or x0 >= TEXT_BOX[1].stop), name
        assert out.max() < expected[TEXT_BOX].min(), name  # no burned-in text pixel survives
        live = out > 0
        assert live.sum() >= 0.97 * fan.sum(), name
        assert np.abs(out[live] - expected[y0:y1, x0:x1][live]).max() <= 1, name  # lossless, inverted/mapped right
    # JPEG baseline, YBR_FULL_422: lossy but close in grey levels
    row = rows["ybr422.dcm"].iloc[0]
    x0, y0, x1, y1 = map(int, row["crop_box"].split(","))
    out = _image(result, row).astype(int)
    live = out > 0
    assert row["photometric"] == "YBR_FULL_422" and np.abs(out[live] - f0[y0:y1, x0:x1][live]).mean() < 3
    # declared ultrasound region: exact crop, physical spacing kept in mm
    row = rows["regions.dcm"].iloc[0]
    assert row["region"] == "dicom" and row["crop_box"] == "10,12,101,81"
    assert np.array_equal(_image(result, row), frames[0][12:81, 10:101])
    assert float(row["pixel_spacing_x_mm"]) == pytest.approx(0.2)
    # plain PNGs point at the original file
    assert Path(result.manifest.parent / rows["plain.png"]["image_path"][0]).resolve() == (site / "plain.png").resolve()


def test_every_kth_frame_policy(written_site, tmp_path):
    site, _ = written_site
    result = scan(site, tmp_path / "manifest.csv", sampling=FrameSampling.parse(every=5, count=None), workers=1)
    assert list(_by_source(_manifest(result))["cine/cine.dcm"]["frame_index"].astype(int)) == [0, 5, 10]
    assert FrameSampling(count=3).indices(2) == [0, 1] and FrameSampling(count=3).indices(9) == [0, 4, 8]


def test_native_ybr_full_422_is_its_luma(tmp_path):
    """Uncompressed YBR_FULL_422 with saturated colour-flow chroma scans to its stored Y plane."""
    y = sector_frames(1, 48, 64)[0]
    fan = fan_mask(*y.shape)
    pair_fan = fan[:, 0::2] | fan[:, 1::2]
    cb = np.where(pair_fan, np.random.default_rng(3).choice([0, 255], pair_fan.shape), 128).astype(np.uint8)
    cr = np.where(pair_fan, 255 - cb, 128).astype(np.uint8)  # red/blue flow at full saturation
    path = save(native_ybr422(y, cb, cr), tmp_path / "site" / "ybr422_native.dcm")
    # the hand-made Y1 Y2 Cb Cr layout is what pydicom (PS3.3 C.7.6.3.1.2) reads back
    ybr = pydicom.pixels.pixel_array(path, as_rgb=False)
    assert np.array_equal(ybr[..., 0], y) and np.array_equal(ybr[..., 2], np.repeat(cr, 2, axis=1))
    result = scan(path.parent, tmp_path / "out" / "manifest.csv", workers=1)
    row = _manifest(result).iloc[0]
    assert (row["photometric"], row["transfer_syntax"], row["region"]) == (
        "YBR_FULL_422", "1.2.840.10008.1.2.1", "auto")
    x0, y0, x1, y1 = map(int, row["crop_box"].split(","))
    out = _image(result, row).astype(int)
    live = out > 0
    assert live.sum() >= 0.97 * fan.sum() and out.max() < 255  # fan kept, burned-in text gone
    # tolerance 0: Y *is* the BT.601 luma and is stored losslessly, so no arithmetic may touch it
    assert np.array_equal(out[live], y[y0:y1, x0:x1][live])
    # whereas luma of pydicom's 8-bit RGB clips the saturated flow: that route would be off by tens of levels
    via_rgb = np.round(pydicom.pixels.pixel_array(path).astype(float) @ [0.299, 0.587, 0.114])
    assert np.abs(via_rgb - y)[fan].max() > 20


def test_jpeg_extended_12bit(tmp_path):
    """Real JPEG extended (process 2/4, 12-bit) files from pydicom-data, relabelled as ultrasound."""
    get = pytest.importorskip("pydicom.data").get_testdata_file
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    site = tmp_path / "site"
    site.mkdir()
    # JPGExtended.dcm is the repaired copy of JPEG-lossy.dcm, whose codestream has a misplaced marker
    for name in ("JPGExtended.dcm", "JPEG-lossy.dcm"):
        ds = pydicom.dcmread(get(name))
        assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.BitsStored == 12
        ds.Modality, ds.SOPClassUID = "US", US_IMAGE
        ds.file_meta.MediaStorageSOPClassUID = US_IMAGE
        ds.save_as(site / name)  # encapsulated pixel data kept as is
    result = scan(site, tmp_path / "out" / "manifest.csv", workers=1)
    if set(get_decoder(JPEGExtended12Bit).available_plugins) <= {"pylibjpeg", "pillow"}:  # GDCM would repair it
        assert _reasons(result) == {"JPEG-lossy.dcm": "decode-error"}
    row = _by_source(_manifest(result))["JPGExtended.dcm"].iloc[0]
    assert (row["transfer_syntax"], row["photometric"], row["rows"], row["cols"]) == (
        JPEGExtended12Bit, "MONOCHROME2", "1024", "256")
    ref = pydicom.dcmread(site / "JPGExtended.dcm").pixel_array.astype(float)
    assert ref.shape == (1024, 256) and 200 < ref.max() < 4096  # pydicom's own decode: genuine 12-bit values
    out = _image(result, row).astype(int)
    assert row["region"] == "none" and out.shape == ref.shape
    # scaled by the declared 12 bits like every DICOM; <= 1 for float32 (scanner) vs float64 (here) rounding
    assert np.abs(out - np.round(ref * 255 / 4095)).max() <= 1
    assert out.max() == 16 and 0.3 < (out > 0).mean() < 0.6  # a dim, textured image, not noise or blank


def test_scanned_manifest_feeds_dataset_and_grouped_splits(written_site, tmp_path):
    from fedus.data import grouped_split, read_manifest
    from fedus.data.dataset import ManifestDataset

    site, _ = written_site
    result = scan(site, tmp_path / "manifest.csv", workers=1)
    df = read_manifest(result.manifest)
    data = ManifestDataset(df, 32, [])
    assert data.report.loaded == len(df) and not data.report.skipped
    train, test = grouped_split(df, [], 0.3, seed=0)
    cine = set(np.flatnonzero(df["source_path"].str.startswith("cine/").to_numpy()))
    assert cine <= set(train) or cine <= set(test)  # same PatientID: one side only


def test_plain_image_folder_keeps_originals(tmp_path):
    from fedus.data import read_manifest
    from fedus.data.dataset import ManifestDataset

    site = tmp_path / "site"
    for label in ("benign", "malignant"):
        for i in range(3):
            (site / label).mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(sector_frames(1, 40, 48, seed=i)[0])
            img.save(site / label / f"{i}.png") if i % 2 else img.convert("RGB").save(site / label / f"{i}.jpg")
    result = scan(site, tmp_path / "out" / "manifest.csv", workers=1, label_from_folder=True)
    df = read_manifest(result.manifest)
    assert sorted(df["label"].unique()) == ["benign", "malignant"] and len(df) == 6
    assert all(Path(p).parent.parent == site.resolve() for p in df["image_path"])
    assert ManifestDataset(df, 32, ["benign", "malignant"]).report.loaded == 6


PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-98765", "PatientBirthDate": "19700314",
       "StudyDate": "20240305", "InstitutionName": "St Example Hospital", "ReferringPhysicianName": "Who^Doctor",
       "AccessionNumber": "ACC4242"}


def test_data_card_reveals_nothing(tmp_path):
    site = tmp_path / "site"
    frames = sector_frames(3)
    planted = list(PHI.values()) + ["Doe_Jane", "PID-98765", "2024-03-05", "1970-03-14", "rareco"]
    for i in range(6):
        ds = us_dataset(frames, **PHI, StudyInstanceUID=f"1.2.826.0.1.3680043.8.498.{1000 + i}")
        planted += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
        save(ds, site / f"Doe_Jane_PID-98765_{i}.dcm")
    save(us_dataset(frames[0], Manufacturer="RareCo", ManufacturerModelName="X1"), site / "rare.dcm")
    result = scan(site, tmp_path / "out" / "manifest.csv", workers=1)
    card = data_card(result.manifest)
    text = (json.dumps(card) + render_markdown(card)).lower()
    leaked = [value for value in planted if value.lower() in text]
    assert not leaked, leaked
    # a lone "<5" beside the total 7 would give RareCo's 1 away: the smallest named cell is pooled too
    assert card["files"] == 7 and card["by"]["manufacturer"] == {"other": 7}
    assert card["by"]["frames"] == {"other": 7}
    assert card["by"]["image_size"] == {"128x96": 7}


def _recoverable(card: dict) -> list[tuple[str, str, int]]:
    """Subtraction attack: "<k" cells whose count the rest of their dimension and the file total pin down.

    Each dimension sums to `files`; a hidden cell is 1..k-1, so with `h` hidden cells one of them
    lies in [rest - (h-1)(k-1), rest - (h-1)]; a single feasible value gives it away.
    """
    k, total, found = card["k"], card["files"], []
    if not isinstance(total, int):
        return found
    for dim, cells in card["by"].items():
        hidden = [v for v, n in cells.items() if not isinstance(n, int)]
        rest = total - sum(n for n in cells.values() if isinstance(n, int))
        for value in hidden:
            lo = max(1, rest - (len(hidden) - 1) * (k - 1))
            hi = min(k - 1, rest - (len(hidden) - 1))
            if lo == hi:
                found.append((dim, value, lo))
    return found


def _card_of(manufacturers: dict[str, int]) -> dict:
    names = [m for m, n in manufacturers.items() for _ in range(n)]
    return card_of_rows(pd.DataFrame({"source_hash": [f"h{i}" for i in range(len(names))], "manufacturer": names,
                                      "rows": "64", "cols": "80", "n_frames": "1"}))


def test_data_card_reads_as_one_line_in_the_report():
    from fedus.reports.sections import card_rows

    card = _card_of({"GE": 9, "Acme": 6})  # no model, transducer or photometric recorded
    line = render_line(card)
    assert line == ("15 files, 15 images; burned-in annotation: 0; manufacturer: GE (9), Acme (6); frames: 1 (15); "
                    "image size: 80x64 (15); not recorded: model, transducer, photometric"), line
    rows = card_rows({"sites": {"a": {"n_train": 6, "data_card": json.dumps(card)}, "b": {"data_card": "{\"v\": 1}"},
                               "c": {"n_train": 3}}})
    assert [r[-1] for r in rows] == [line, '{"v": 1}', "no data card recorded"]


def test_data_card_resists_subtraction_attack():
    # the attack is real: with primary suppression only, "other" = 7 - 6 = 1
    assert _recoverable({"k": 5, "files": 7, "by": {"manufacturer": {"Acme Medical": 6, "other": "<5"}}}) == [
        ("manufacturer", "other", 1)]
    cases = [
        ({"Acme": 6, "RareCo": 1}, {"other": 7}),
        ({"Acme": 20, "GE": 5, "R1": 2, "R2": 2}, {"Acme": 20, "other": 9}),  # GE pooled with the rare 4
        ({"B": 5, "A": 5, "C": 1}, {"B": 5, "other": 6}),  # tie: the first name goes
        ({"A": 10, "r1": 2, "r2": 3}, {"A": 10, "other": 5}),  # rare pool already >= k: nothing more to hide
        ({"A": 3}, {"other": "<5"}),  # total itself suppressed
    ]
    rng = np.random.default_rng(0)
    for _ in range(30):  # random archives: a few big vendors, a tail of rare ones
        sizes = rng.choice([1, 2, 4, 5, 6, 30], rng.integers(1, 6))
        cases.append(({f"v{i}": int(n) for i, n in enumerate(sizes)}, None))
    for counts, expected in cases:
        card = check_card(_card_of(counts))
        assert card["files"] == (sum(counts.values()) if sum(counts.values()) >= 5 else "<5")
        if expected is not None:
            assert card["by"]["manufacturer"] == expected, counts
        assert _recoverable(card) == [], (counts, card["by"])
        for cells in card["by"].values():  # never a lone "<5" beside a published total
            assert isinstance(card["files"], str) or all(isinstance(n, int) for n in cells.values())


def test_data_card_of_public_corpus_manifest(corpus):
    card = data_card(corpus / "all_manifest.csv")
    assert card["images"] > 100 and card["by"]["manufacturer"] == {"unknown": card["files"]}


def test_second_scan_decodes_nothing(tmp_path):
    site = tmp_path / "site"
    frames = sector_frames(6, 64, 80)
    for i in range(40):
        ds = us_dataset(frames if i % 4 == 0 else frames[i % 6])
        if i % 3 == 0:
            ds.compress(RLELossless)
        save(ds, site / f"{i:03d}.dcm")
    out = tmp_path / "out" / "manifest.csv"
    cold = scan(site, out, workers=1)
    manifest = out.read_text()
    warm = scan(site, out, workers=1)
    assert (cold.decoded, warm.decoded, warm.cached) == (40, 0, 40)
    assert out.read_text() == manifest
    print(f"\ncold {cold.seconds:.3f}s, warm {warm.seconds:.3f}s: {cold.seconds / warm.seconds:.0f}x")
    os.utime(site / "005.dcm", ns=(time.time_ns(), time.time_ns() + 10**9))
    (site / "007.dcm").unlink()
    again = scan(site, out, workers=1)
    assert (again.decoded, again.cached, again.files) == (1, 38, 39)
    assert (out.parent / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert pd.read_csv(out)["patient_id"].nunique() == 1  # same secret, same pseudonym across scans
    assert scan(site, out, sampling=FrameSampling(count=2), workers=1).decoded == 39  # new policy: redo


def test_cli_nothing_usable_is_one_line_error(tmp_path, fedus_cli):
    site = tmp_path / "site"
    site.mkdir()
    (site / "notes.txt").write_text("not an image")
    (site / "scan.dcm").write_bytes(b"garbage")
    code, _, err = fedus_cli("data", "scan", site, "--out", tmp_path / "m.csv")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable ultrasound images" in errors[0]
    assert "Traceback" not in err
    assert (tmp_path / "intake-log.csv").is_file()


def test_cli_card_of_a_csv_that_is_not_a_manifest_is_one_line_error(tmp_path, fedus_cli):
    other = tmp_path / "other.csv"
    other.write_text("patient,age\np1,40\n")
    code, _, err = fedus_cli("data", "card", other)
    assert code == 2 and "not a manifest (no image_path column)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "data-card.json").exists()
