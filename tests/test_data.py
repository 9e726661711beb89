import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fedus.config import DataConfig
from fedus.data import grouped_split, leakage_groups, list_sites, load_site, read_manifest, read_near_duplicates
from fedus.data.augment import UltrasoundAugment
from fedus.data.dataset import ManifestDataset


def _rows(n, patients, labels=None):
    return pd.DataFrame({"image_path": [f"/x/{i}.png" for i in range(n)], "patient_id": patients,
                         "label": labels or ["a"] * n, "mask_path": [""] * n})


def test_groups_join_patients_and_near_duplicates_transitively():
    df = _rows(6, ["p1", "p1", "", "", "p2", ""])
    groups = leakage_groups(df, [("/x/1.png", "/x/2.png"), ("/x/2.png", "/x/3.png")])
    assert len({groups[0], groups[1], groups[2], groups[3]}) == 1
    assert len(set(groups)) == 3


def test_split_never_separates_a_group():
    rng = np.random.default_rng(0)
    patients = [f"p{rng.integers(0, 30)}" for _ in range(200)]
    labels = [str(rng.integers(0, 3)) for _ in range(200)]
    df = _rows(200, patients, labels)
    pairs = [(f"/x/{i}.png", f"/x/{i + 1}.png") for i in range(0, 200, 17)]
    groups = leakage_groups(df, pairs)
    for seed in range(5):
        tr, te = grouped_split(df, pairs, 0.2, seed)
        assert set(groups[tr]).isdisjoint(groups[te])
        assert len(tr) + len(te) == 200 and 0.1 < len(te) / 200 < 0.35


@pytest.mark.corpus
def test_no_patient_or_near_duplicate_group_crosses_train_test_on_the_corpus(corpus):
    manifest = corpus / "all_manifest.csv"
    df = read_manifest(manifest)
    pairs = read_near_duplicates(manifest)
    assert len(pairs) > 250  # every dataset's near_duplicates.csv was found
    cfg = DataConfig(source="manifest", manifest=str(manifest), site_column="dataset")
    for site in list_sites(df, "dataset"):
        data = load_site(cfg, 0, site, manifest)
        train, test = set(data.train_rows["image_path"]), set(data.test_rows["image_path"])
        assert train and test and train.isdisjoint(test)
        pids = lambda rows: {p for p in rows["patient_id"] if p}
        assert pids(data.train_rows).isdisjoint(pids(data.test_rows)), site
        crossing = [(a, b) for a, b in pairs if (a in train and b in test) or (a in test and b in train)]
        assert not crossing, (site, crossing[:3])
    for name in ["busi", "hc18", "ddti_roi", "pocus_lung"]:  # each dataset's own manifest too
        m = corpus / name / "manifest.csv"
        rows, p = read_manifest(m), read_near_duplicates(m)
        tr, te = grouped_split(rows, p, 0.2, 0)
        g = leakage_groups(rows, p)
        assert set(g[tr]).isdisjoint(g[te]), name


def test_bad_files_are_counted_and_skipped(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)).save(good)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "blank.png")
    df = pd.DataFrame({"image_path": [str(tmp_path / n) for n in ["good.png", "corrupt.png", "missing.png", "text.png", "blank.png"]],
                       "mask_path": [""] * 5, "label": ["a"] * 5})
    ds = ManifestDataset(df, 32, ["a"])
    assert len(ds) == 1 and ds.report.loaded == 1
    assert ds.report.skipped == {"unreadable-image": 2, "missing-file": 1, "blank-image": 1}
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and torch.equal(item["image"][0], item["image"][2])


def test_letterbox_keeps_aspect(tmp_path):
    img = np.full((20, 60), 200, np.uint8)  # wide image -> black bands top and bottom
    Image.fromarray(img).save(tmp_path / "wide.png")
    df = pd.DataFrame({"image_path": [str(tmp_path / "wide.png")], "mask_path": [""], "label": [""]})
    x = ManifestDataset(df, 60, []).images[0].numpy()
    assert x[:15].max() == 0 and x[-15:].max() == 0 and x[30].min() > 150


def test_augmentation_never_flips_vertically_nor_changes_grey_levels():
    torch.manual_seed(0)
    aug = UltrasoundAugment(32, blur_p=0.0)
    depth = torch.linspace(1.0, 0.2, 32).view(1, 32, 1)  # echoes fade with depth
    image = (depth * torch.ones(3, 32, 32)).clone()
    image[:, :, :3] = 0.0  # a dark left edge, to see horizontal flips
    for _ in range(200):
        out = aug(image)
        assert out[:, :4, 8:24].mean() > out[:, -4:, 8:24].mean()  # near field stays on top
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # no colour jitter
        assert out.max() <= 1.0 + 1e-6
    flips = sum(aug(image)[0, 16, -1] < 0.1 for _ in range(200))
    assert 50 < flips < 150  # horizontal flips do happen


def test_sites_partition_by_column(synthetic_manifest):
    df = read_manifest(synthetic_manifest)
    sites = list_sites(df, "center")
    assert len(sites) == 2
    cfg = DataConfig(manifest=str(synthetic_manifest))
    a, b = load_site(cfg, 0, 0), load_site(cfg, 0, 1)
    assert a.name == sites[0] and b.name == sites[1]
    assert set(a.train_rows["center"]) == {sites[0]} and a.classes == ["hyperechoic", "hypoechoic", "normal"]
    capped = load_site(cfg.model_copy(update={"max_images_per_site": 20}), 0, 0)
    assert len(capped.train_rows) + len(capped.test_rows) <= 20
