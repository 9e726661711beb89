"""A torch Dataset over manifest rows: grayscale -> 3-channel, letterboxed to a square.

Letterboxing (pad to square, then resize) keeps the whole field of view and its
aspect ratio; ultrasound backgrounds are black, so zero padding is neutral.
Images are decoded once and kept as uint8 at the training size: site datasets
at 32-256 px fit in memory, and decoding dominates otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fedus.data.augment import create_augment


@dataclass
class LoadReport:
    """Files that could not be read are skipped and counted, never fatal."""

    loaded: int = 0
    skipped: dict[str, int] | None = None

    def skip(self, reason: str) -> None:
        self.skipped = self.skipped or {}
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def letterbox(img: Image.Image, size: int, resample: int) -> np.ndarray:
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return np.asarray(canvas.resize((size, size), resample), dtype=np.uint8)


def _load(path: str, size: int, resample: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return letterbox(img.convert("L"), size, resample)


class ManifestDataset(Dataset):
    """Items: image float [3,S,S] in [0,1], mask float [1,S,S], has_mask, label (-1 = none);
    with `views=2` also `view2`, a second independent draw of the augmentation (two-view losses).

    `augment`: False, True (= 'ultrasound') or a policy name (fedus.data.augment)."""

    def __init__(self, df: pd.DataFrame, image_size: int, classes: list[str], augment: bool | str = False, views: int = 1):
        self.size = image_size
        self.classes = classes
        self.report = LoadReport()
        policy = "ultrasound" if augment is True else augment
        self.augment = create_augment(policy, image_size) if policy else None
        self.views = views
        images, masks, has_mask, labels = [], [], [], []
        class_index = {c: i for i, c in enumerate(classes)}
        for row in df.itertuples(index=False):
            try:
                image = _load(row.image_path, image_size, Image.BILINEAR)
                mask = _load(row.mask_path, image_size, Image.NEAREST) if row.mask_path else None
            except FileNotFoundError:
                self.report.skip("missing-file")
                continue
            except (UnidentifiedImageError, OSError, ValueError):
                self.report.skip("unreadable-image")
                continue
            if image.max() == image.min():
                self.report.skip("blank-image")
                continue
            images.append(image)
            masks.append(mask if mask is not None else np.zeros_like(image))
            has_mask.append(mask is not None)
            labels.append(class_index.get(row.label, -1))
        self.report.loaded = len(images)
        shape = (0, image_size, image_size)
        self.images = torch.from_numpy(np.stack(images)) if images else torch.zeros(shape, dtype=torch.uint8)
        self.masks = torch.from_numpy(np.stack(masks) > 127) if masks else torch.zeros(shape, dtype=torch.bool)
        self.has_mask = torch.tensor(has_mask, dtype=torch.bool)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raw = self.images[i].float().div(255).expand(3, -1, -1)
        image = self.augment(raw) if self.augment is not None else raw
        item = {
            "image": image.contiguous(),
            "mask": self.masks[i].float().unsqueeze(0),
            "has_mask": self.has_mask[i],
            "label": self.labels[i],
        }
        if self.views > 1:
            item["view2"] = (self.augment(raw) if self.augment is not None else raw).contiguous()
        return item
