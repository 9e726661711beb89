"""Teacher targets computed once per (image, view) and kept on the site's disk.

The teacher is frozen, so its tokens for a given input never change: a site
draws a fixed set of K augmented views per image (view k of image i is seeded,
so it is the same view every time), stores the views as bytes, computes the
teacher's tokens for a view the first time the view is used, and stores them
as fp16. Both live in memory-mapped files; later steps and rounds read them
(in the data loader's workers, pinned, off the training thread) instead of
running the augmentation and the teacher. Slot K of each image is the image
itself, un-augmented (the site step's reference loss).

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

VERSION = 2  # bump when the view recipe (seeding, augmentation code, storage) changes
HEADER, TARGETS, FILLED, VIEWS = "header.json", "targets.f16", "filled.u8", "views.u8"
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
            for name in (FILLED, TARGETS, VIEWS):
                (self.root / name).unlink(missing_ok=True)
        mode = "w+" if fresh else "r+"
        self.shape = shape
        self.filled = np.memmap(self.root / FILLED, dtype=np.uint8, mode=mode, shape=(shape[0],))
        self.targets = np.memmap(self.root / TARGETS, dtype=np.float16, mode=mode, shape=shape)
        self.views_ready = bool(old.get("views_ready")) and not fresh
        if fresh:
            self._write_header(views_ready=False)
        self.hits = self.misses = 0

    def _write_header(self, views_ready: bool) -> None:
        tmp = self.root / f".{HEADER}.tmp"
        tmp.write_text(json.dumps({"key": self.key, "shape": list(self.shape), "dtype": "float16",
                                   "views_ready": views_ready, "fields": self.fields}, indent=1))
        os.replace(tmp, self.root / HEADER)
        self.views_ready = views_ready

    def slot(self, image: int, view: int) -> int:
        """Flat slot of view `view` (K = the plain image) of image `image`."""
        return image * self.slots + view

    def reference_slots(self, n: int) -> torch.Tensor:
        return torch.arange(n) * self.slots + self.views

    def lookup(self, teacher: torch.nn.Module, slots: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Teacher tokens [B, N, D] (fp32, on `images`' device) for these slots (e.g. the reference
        batch's), read here rather than by a loader worker; as `complete`."""
        idx = slots.cpu().numpy()
        batch = {"slot": slots.cpu(), "filled": torch.from_numpy(np.ascontiguousarray(self.filled[idx])),
                 "target": torch.from_numpy(np.ascontiguousarray(self.targets[idx]))}
        return self.complete(teacher, batch, images)

    def complete(self, teacher: torch.nn.Module, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Targets [B, N, D] for a loader batch of `CachedViews` items: the stored tokens the workers read,
        with the teacher run (and its tokens stored) only for the views not filled when they were read."""
        wanted = batch["target"].to(images.device, non_blocking=True).float()
        missing = torch.nonzero(batch["filled"] == 0).flatten()
        if missing.numel():
            idx = batch["slot"][missing].numpy()
            with torch.no_grad():
                fresh = teacher(images[missing.to(images.device)]).float()
            self.store(idx, fresh)
            wanted[missing.to(images.device)] = fresh.half().float()  # as stored: a target is the same hit or miss
        self.misses += int(missing.numel())
        self.hits += int(len(batch["slot"]) - missing.numel())
        return wanted

    def store(self, idx: np.ndarray, tokens: torch.Tensor) -> None:
        self.targets[idx] = tokens.cpu().to(torch.float16).numpy()
        self.targets.flush()  # targets reach the file before their filled flags do
        self.filled[idx] = 1
        self.filled.flush()

    def reset_counts(self) -> None:
        self.hits = self.misses = 0

    def metrics(self) -> dict[str, float]:
        total = max(self.hits + self.misses, 1)
        return {"target_cache_hit_rate": self.hits / total, "target_cache_filled": float(self.filled.mean())}


class CachedViews(Dataset):
    """Item j = view j % K of image j // K as stored bytes, with its stored teacher tokens and whether
    they were filled. Opens its memory maps lazily in each process (loader workers included)."""

    def __init__(self, images: torch.Tensor, cache: TargetCache, policy: str | None, seed: int):
        self.images, self.cache, self.seed, self.policy = images, cache, seed, policy
        self.augment = create_augment(policy, images.shape[-1]) if policy else None
        self._maps: tuple | None = None

    def __len__(self) -> int:
        return len(self.images) * self.cache.views

    def __getstate__(self) -> dict:  # spawned workers reopen the files instead of copying them
        return self.__dict__ | {"_maps": None}

    def draw(self, image: int, view: int) -> torch.Tensor:
        """View `view` of image `image`, re-drawn from its own seed (the same pixels every time)."""
        raw = self.images[image].float().div(255).expand(3, -1, -1)
        if self.augment is None:
            return raw.contiguous()
        with torch.random.fork_rng(devices=[]):  # the augmentations draw from the global RNG
            torch.manual_seed(hash((self.seed, VERSION, image, view)) & 0x7FFF_FFFF)
            return self.augment(raw).contiguous()

    def view_shape(self) -> tuple[int, ...]:
        return (len(self), 3, *self.images.shape[-2:])

    def materialise(self, num_workers: int = 0) -> None:
        """Draw every view once and store it as bytes (quantised as any 8-bit image: the targets are
        computed on exactly these pixels), so that later epochs and rounds only read them."""
        path = self.cache.root / VIEWS
        if self.cache.views_ready and path.exists() and path.stat().st_size == int(np.prod(self.view_shape())):
            return
        out = np.memmap(path, dtype=np.uint8, mode="w+", shape=self.view_shape())
        drawn = torch.utils.data.DataLoader(_Drawn(self), batch_size=64, num_workers=num_workers)
        start = 0
        for chunk in drawn:
            out[start:start + len(chunk)] = chunk.numpy()
            start += len(chunk)
        out.flush()
        self.cache._write_header(views_ready=True)
        self._maps = None

    def _open(self) -> tuple:
        if self._maps is None:
            root = self.cache.root
            self._maps = (np.memmap(root / VIEWS, dtype=np.uint8, mode="r", shape=self.view_shape()),
                          np.memmap(root / TARGETS, dtype=np.float16, mode="r", shape=self.cache.shape),
                          np.memmap(root / FILLED, dtype=np.uint8, mode="r", shape=(self.cache.shape[0],)))
        return self._maps

    def view(self, j: int) -> torch.Tensor:
        """Stored view j (uint8 [3, H, W]); `materialise` first."""
        return torch.from_numpy(np.array(self._open()[0][j]))

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        image, view = divmod(j, self.cache.views)
        slot = self.cache.slot(image, view)
        views, targets, filled = self._open()
        done = int(filled[slot])  # read before the tokens: a slot filled meanwhile is simply recomputed
        return {"image": torch.from_numpy(np.array(views[j])), "slot": torch.tensor(slot),
                "target": torch.from_numpy(np.array(targets[slot])), "filled": torch.tensor(done, dtype=torch.uint8)}


class _Drawn(Dataset):
    def __init__(self, views: CachedViews):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.views.draw(*divmod(j, self.views.cache.views)).mul(255).round_().clamp_(0, 255).to(torch.uint8)


def site_target_cache(cfg: RunConfig, site: str, images: torch.Tensor, teacher,
                      num_workers: int = 0) -> tuple[TargetCache, CachedViews]:
    """The site's cache (opened, or rebuilt if anything it depends on changed) and its view dataset."""
    cache = TargetCache(cache_dir(cfg, site), cache_fields(cfg, images), teacher.grid[0] * teacher.grid[1], teacher.dim)
    policy = cfg.data.augment_policy if cfg.train.augment else None
    views = CachedViews(images, cache, policy, cfg.seed)
    views.materialise(num_workers)
    return cache, views


__all__ = ["CachedViews", "TargetCache", "cache_dir", "cache_fields", "file_sha256", "site_target_cache"]
