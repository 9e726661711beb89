"""Teacher targets computed once per (image, view) and kept on the site's disk.

The teacher is frozen, so its tokens for a given input never change: a site
draws a fixed set of K augmented views per image (view k of image i is seeded,
so it is the same view every time it is drawn), computes the teacher's tokens
for a view the first time the view is used, and stores them as fp16 in a
memory-mapped file. Later steps and rounds read them instead of running the
teacher. Slot K of each image is the image itself, un-augmented (the site
step's reference loss).

The cache is keyed by a hash of everything the targets depend on - teacher
(arch, weights file hash, blocks, combine), image size, augmentation policy,
K, the seed of the views and the site's pixels - written in a small JSON
header; any change wipes and restarts it. Only token-MSE can use it (other
losses run the teacher on views they make themselves), and without mixup:
the teacher's tokens of a mixed image are not a mix of its tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fedus.config import RunConfig
from fedus.data.augment import create_augment

VERSION = 1  # bump when the view recipe (seeding, augmentation code) changes
HEADER, TARGETS, FILLED = "header.json", "targets.f16", "filled.u8"
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """Hash of a weights file, remembered per (path, size, mtime): files are large, rounds many."""
    if not path:
        return ""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def cache_fields(cfg: RunConfig, images: torch.Tensor) -> dict:
    """Everything the cached targets depend on (its hash is the cache key)."""
    t = cfg.teacher
    return {
        "version": VERSION, "teacher_arch": t.arch, "teacher_weights_sha256": file_sha256(t.weights),
        "blocks": t.blocks, "combine": t.combine, "image_size": cfg.data.image_size,
        "augment": cfg.data.augment_policy if cfg.train.augment else "none", "views": cfg.train.target_views,
        "view_seed": cfg.seed, "n_images": int(images.shape[0]),
        "data_sha256": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(),
    }


def cache_dir(cfg: RunConfig, site: str) -> Path:
    """`train.target-cache-dir`/<site>, or $FEDUS_CACHE/targets/<site> (a per-site folder in simulation)."""
    root = cfg.train.target_cache_dir or os.path.join(
        os.environ.get("FEDUS_CACHE", Path.home() / ".cache" / "fedus"), "targets")
    return Path(root).expanduser() / "".join(c if c.isalnum() or c in "-_." else "_" for c in str(site))


class TargetCache:
    """fp16 teacher tokens for N images x (K views + the plain image), filled on first use."""

    def __init__(self, root: Path, fields: dict, tokens: int, dim: int):
        self.root, self.fields = Path(root), fields
        self.views, self.n = int(fields["views"]), int(fields["n_images"])
        self.slots = self.views + 1
        self.key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
        shape = (self.n * self.slots, tokens, dim)
        self.root.mkdir(parents=True, exist_ok=True)
        header = self.root / HEADER
        try:
            old = json.loads(header.read_text())
        except (OSError, ValueError):
            old = {}
        fresh = old.get("key") != self.key or old.get("shape") != list(shape)
        if fresh:  # invalid or absent: start over (filled flags first, so no stale slot survives)
            header.unlink(missing_ok=True)
            for name in (FILLED, TARGETS):
                (self.root / name).unlink(missing_ok=True)
        mode = "w+" if fresh else "r+"
        self.filled = np.memmap(self.root / FILLED, dtype=np.uint8, mode=mode, shape=(shape[0],))
        self.targets = np.memmap(self.root / TARGETS, dtype=np.float16, mode=mode, shape=shape)
        if fresh:
            tmp = self.root / f".{HEADER}.tmp"
            tmp.write_text(json.dumps({"key": self.key, "shape": list(shape), "dtype": "float16", "fields": fields}, indent=1))
            os.replace(tmp, header)
        self.hits = self.misses = 0

    def slot(self, image: int, view: int) -> int:
        """Flat slot of view `view` (K = the plain image) of image `image`."""
        return image * self.slots + view

    def reference_slots(self, n: int) -> torch.Tensor:
        return torch.arange(n) * self.slots + self.views

    def lookup(self, teacher: torch.nn.Module, slots: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Teacher tokens [B, N, D] (fp32, on `images`' device) for these slots; the teacher runs
        only on the slots never seen before, and its fp16 result is stored."""
        idx = slots.cpu().numpy()
        missing = np.flatnonzero(self.filled[idx] == 0)
        if missing.size:
            with torch.no_grad():
                fresh = teacher(images[torch.from_numpy(missing).to(images.device)]).float()
            self.targets[idx[missing]] = fresh.cpu().to(torch.float16).numpy()
            self.targets.flush()  # targets reach the file before their filled flags do
            self.filled[idx[missing]] = 1
            self.filled.flush()
        self.misses += int(missing.size)
        self.hits += int(idx.size - missing.size)
        return torch.from_numpy(np.ascontiguousarray(self.targets[idx])).to(images.device).float()

    def metrics(self) -> dict[str, float]:
        total = max(self.hits + self.misses, 1)
        return {"target_cache_hit_rate": self.hits / total, "target_cache_filled": float(self.filled.mean())}


class CachedViews(Dataset):
    """Item j = view j % K of image j // K, re-drawn from its own seed (identical every time)."""

    def __init__(self, images: torch.Tensor, cache: TargetCache, policy: str | None, seed: int):
        self.images, self.cache, self.seed = images, cache, seed
        self.augment = create_augment(policy, images.shape[-1]) if policy else None

    def __len__(self) -> int:
        return len(self.images) * self.cache.views

    def view(self, image: int, view: int) -> torch.Tensor:
        raw = self.images[image].float().div(255).expand(3, -1, -1)
        if self.augment is None:
            return raw.contiguous()
        with torch.random.fork_rng(devices=[]):  # the augmentations draw from the global RNG
            torch.manual_seed(hash((self.seed, VERSION, image, view)) & 0x7FFF_FFFF)
            return self.augment(raw).contiguous()

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        image, view = divmod(j, self.cache.views)
        return {"image": self.view(image, view), "slot": torch.tensor(self.cache.slot(image, view))}


def site_target_cache(cfg: RunConfig, site: str, images: torch.Tensor, teacher) -> tuple[TargetCache, CachedViews]:
    """The site's cache (opened, or rebuilt if anything it depends on changed) and its view dataset."""
    cache = TargetCache(cache_dir(cfg, site), cache_fields(cfg, images), teacher.grid[0] * teacher.grid[1], teacher.dim)
    policy = cfg.data.augment_policy if cfg.train.augment else None
    return cache, CachedViews(images, cache, policy, cfg.seed)


__all__ = ["CachedViews", "TargetCache", "cache_dir", "cache_fields", "file_sha256", "site_target_cache"]
