"""Which rows belong to a site, and its leakage-safe train/held-out split.

In simulation a site is a partition id (sites are the sorted distinct values
of the site column); in deployment it is a site name with its own manifest.
Both resolve to the same `SiteData`, so the site step cannot tell them apart.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from fedus.config import ConfigError, DataConfig
from fedus.data.dataset import ManifestDataset
from fedus.data.manifest import read_manifest, read_near_duplicates
from fedus.data.splits import grouped_split, leakage_groups


@dataclass
class SiteData:
    name: str
    train_rows: pd.DataFrame
    test_rows: pd.DataFrame
    classes: list[str]
    image_size: int

    @property
    def has_masks(self) -> bool:
        return bool((self.train_rows["mask_path"] != "").any())

    @cached_property
    def train(self) -> ManifestDataset:
        return ManifestDataset(self.train_rows, self.image_size, self.classes)

    @cached_property
    def test(self) -> ManifestDataset:
        return ManifestDataset(self.test_rows, self.image_size, self.classes)

    def train_augmented(self, policy: str = "ultrasound", views: int = 1) -> ManifestDataset:
        """Shares decoded pixels with `train`; only the view(s) differ (`policy`: fedus.data.augment)."""
        ds = ManifestDataset(self.train_rows.iloc[:0], self.image_size, self.classes, augment=policy, views=views)
        ds.images, ds.masks, ds.has_mask, ds.labels = (
            self.train.images, self.train.masks, self.train.has_mask, self.train.labels)
        ds.report = self.train.report
        return ds


def resolve_manifest(cfg: DataConfig, seed: int) -> Path:
    """The manifest a run reads; a synthetic corpus is generated (once, atomically) if needed."""
    if cfg.manifest:
        return Path(cfg.manifest).expanduser().resolve()
    if cfg.source == "manifest":
        raise ConfigError("data.source = 'manifest' needs data.manifest = PATH")
    return ensure_synthetic_corpus(cfg, seed)


def ensure_synthetic_corpus(cfg: DataConfig, seed: int, cache_root: Path | None = None) -> Path:
    from fedus.data.synthetic import GENERATOR_VERSION, write_synthetic_corpus

    # the generator's version too: a corpus cached by an older generator is not this one's
    key = f"{cfg.synthetic_centres}-{cfg.synthetic_images_per_centre}-{cfg.image_size}-{seed}-{GENERATOR_VERSION}"
    root = cache_root or Path(os.environ.get("FEDUS_CACHE", Path.home() / ".cache" / "fedus"))
    target = root / "synthetic" / hashlib.sha1(key.encode()).hexdigest()[:12]
    if not (target / "manifest.csv").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        write_synthetic_corpus(tmp, cfg.synthetic_centres, cfg.synthetic_images_per_centre, cfg.image_size, seed)
        try:
            tmp.rename(target)  # atomic: concurrent sites either win or reuse the winner's copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "manifest.csv"


def list_sites(df: pd.DataFrame, site_column: str, held_out: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The federation's sites, sorted (partition i is the i-th); `held_out` ones are left out."""
    if site_column not in df.columns:
        raise ConfigError(f"manifest has no site column '{site_column}'")
    every = sorted(v for v in df[site_column].unique() if v)
    unknown = sorted(set(held_out) - set(every))
    if unknown:
        raise ConfigError(f"data.held-out names no site of the manifest: {', '.join(unknown)} (sites: {', '.join(every)})")
    sites = [s for s in every if s not in held_out]
    if not sites:
        raise ConfigError("data.held-out leaves no site in the federation")
    return sites


def load_site(cfg: DataConfig, seed: int, site: str | int, manifest: Path | None = None, own_manifest: bool = False) -> SiteData:
    """Rows of one site (by name, or by index into the sorted site list), split by groups.

    `own_manifest`: the manifest is the site's own (deployment), so every row is
    the site's, whatever its site column says, and `site` is just its name.
    """
    manifest = manifest or resolve_manifest(cfg, seed)
    df = read_manifest(manifest)
    if own_manifest:
        df = df.assign(**{cfg.site_column: str(site)})
    sites = list_sites(df, cfg.site_column, () if own_manifest else cfg.held_out_sites)
    if isinstance(site, int):
        if not 0 <= site < len(sites):
            raise ConfigError(f"partition {site} out of range: manifest has {len(sites)} sites")
        site = sites[site]
    rows = df[df[cfg.site_column] == site].reset_index(drop=True)
    if rows.empty:
        raise ConfigError(f"no rows for site '{site}' in {manifest}")
    pairs = read_near_duplicates(manifest)
    rows = _cap(rows, pairs, cfg.max_images_per_site, seed)
    train_idx, test_idx = grouped_split(rows, pairs, cfg.test_fraction, seed)
    classes = sorted(v for v in rows["label"].unique() if v)
    return SiteData(
        name=site,
        train_rows=rows.iloc[train_idx].reset_index(drop=True),
        test_rows=rows.iloc[test_idx].reset_index(drop=True),
        classes=classes,
        image_size=cfg.image_size,
    )


def _cap(rows: pd.DataFrame, pairs: list[tuple[str, str]], cap: int, seed: int) -> pd.DataFrame:
    """Keep whole leakage groups up to `cap` rows (for CI-sized runs)."""
    if not cap or len(rows) <= cap:
        return rows
    groups = leakage_groups(rows, pairs)
    order = np.random.default_rng(seed).permutation(np.unique(groups))
    sizes = np.bincount(groups)
    keep = order[np.cumsum(sizes[order]) <= cap]
    return rows[np.isin(groups, keep)].reset_index(drop=True)
