"""A filled target cache held on the device for the round: batches are index gathers.

Once every view a site trains on has its teacher tokens stored, a round needs
no teacher and no augmentation, only bytes: per image ~0.2 MB of view and,
for a ViT-B/16 teacher's two blocks at 256 px, ~0.8 MB of fp16 tokens. Read
through loader workers, that is gigabytes a second of memory-map reads,
inter-process copies and host-to-device transfers, which is what bounds the
cached site step on a GPU. Held on the device, a batch is two gathers.
The batches are the loader path's own (the same sampler, drawn from the same
generator), so the two paths train identically.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fedus.config import TrainConfig
from fedus.distill.target_cache import CachedViews

SHARE_OF_FREE_MEMORY = 0.25  # auto: at most this share of the device's free memory


def _views_and_indices(train_set: Dataset) -> tuple[CachedViews, np.ndarray] | None:
    """The cache's view dataset under `train_set` (a coreset `Subset` of it, or itself) and the items used."""
    if isinstance(train_set, Subset) and isinstance(train_set.dataset, CachedViews):
        return train_set.dataset, np.asarray(train_set.indices, dtype=np.int64)
    if isinstance(train_set, CachedViews):
        return train_set, np.arange(len(train_set), dtype=np.int64)
    return None


def resident_bytes(train_set: Dataset) -> int:
    found = _views_and_indices(train_set)
    if found is None:
        return 0
    views, items = found
    per_item = int(np.prod(views.view_shape()[1:])) + int(np.prod(views.cache.shape[1:])) * 2  # uint8 + fp16
    return per_item * len(items)


def use_resident(cfg: TrainConfig, device: torch.device, train_set: Dataset) -> bool:
    """`train.cache-on-device`: on / off, or auto = on CUDA when every view trained on is filled and
    the views and tokens take at most a quarter of the device's free memory."""
    found = _views_and_indices(train_set)
    if cfg.cache_on_device == "off" or found is None:
        return False
    views, items = found
    slots = _slots(views, items)
    if not bool(np.all(views.cache.filled[slots])):  # a fill round: the teacher must still run (loader path)
        return False
    if cfg.cache_on_device == "on":
        return True
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return resident_bytes(train_set) <= SHARE_OF_FREE_MEMORY * free


def _slots(views: CachedViews, items: np.ndarray) -> np.ndarray:
    return views.cache.slot(*np.divmod(items, views.cache.views))  # CachedViews' item -> slot, for many items


class ResidentBatches:
    """Loader-path batches (image uint8, slot, target fp16, filled) of a filled cache, from device copies."""

    def __init__(self, train_set: Dataset, device: torch.device, batch_size: int, generator: torch.Generator):
        found = _views_and_indices(train_set)
        if found is None:
            raise ValueError("a device-resident cache needs the cache's own view dataset")
        views, items = found
        stored_views, stored_targets, _ = views._open()
        self.slots = torch.from_numpy(_slots(views, items))
        order = np.argsort(items)  # memmap reads in file order, then back to the item order
        self.images = torch.empty((len(items), *views.view_shape()[1:]), dtype=torch.uint8, device=device)
        self.targets = torch.empty((len(items), *views.cache.shape[1:]), dtype=torch.float16, device=device)
        for chunk in np.array_split(order, max(1, len(order) // 256)):  # bounded host memory
            at = torch.from_numpy(chunk).to(device)
            self.images[at] = torch.from_numpy(np.ascontiguousarray(stored_views[items[chunk]])).to(device)
            self.targets[at] = torch.from_numpy(np.ascontiguousarray(stored_targets[self.slots[chunk].numpy()])).to(device)
        self.device = device
        # the loader path's sampler, drawn from the same generator: the same batches in the same order
        self.batches = DataLoader(range(len(items)), batch_size=batch_size, shuffle=True, generator=generator,
                                  drop_last=len(items) >= batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in self.batches:
            at = index.to(self.device)
            yield {"image": self.images[at], "slot": self.slots[index], "target": self.targets[at],
                   "filled": torch.ones(len(index), dtype=torch.uint8)}


__all__ = ["ResidentBatches", "resident_bytes", "use_resident"]
