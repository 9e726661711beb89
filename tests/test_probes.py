"""Frozen-feature probes: they must separate informative from uninformative features."""

import torch
import torch.nn.functional as F

from fedus.evaluation.probes import linear_probe, segmentation_probe


def _blobs(n_per_class: int, n_classes: int, dim: int, gen: torch.Generator, sep: float = 6.0):
    centres = torch.randn(n_classes, dim, generator=gen) * sep
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=gen)
    return x, y


def test_linear_probe_separable_blobs():
    gen = torch.Generator().manual_seed(0)
    x, y = _blobs(60, 3, 16, gen)
    perm = torch.randperm(len(y), generator=gen)
    x, y = x[perm], y[perm]
    out = linear_probe(x[:120], y[:120], x[120:], y[120:])
    assert set(out) == {"acc", "macro_f1"}
    assert out["acc"] > 0.95 and out["macro_f1"] > 0.95


def test_linear_probe_random_labels_near_chance():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(600, 32, generator=gen)
    y = torch.randint(0, 2, (600,), generator=gen)
    out = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert 0.35 < out["acc"] < 0.65


def test_linear_probe_degenerate_and_unseen_class():
    x = torch.randn(10, 4)
    assert linear_probe(x, torch.zeros(10, dtype=torch.long), x, torch.zeros(10, dtype=torch.long)) == {}
    y = torch.tensor([0, 1] * 5)
    assert linear_probe(x, y, x[:0], y[:0]) == {}
    # A test class never seen in training counts in macro-F1 (as 0), it is not dropped.
    out = linear_probe(x, y, x[:3], torch.tensor([2, 2, 2]))
    assert out["acc"] == 0.0 and out["macro_f1"] == 0.0


def _seg_data(n: int, gen: torch.Generator, informative: bool):
    """Masks 32x32 with a random square; feature maps 16x16 with 4 channels."""
    masks = torch.zeros(n, 1, 32, 32)
    for i in range(n):
        r, c = torch.randint(0, 20, (2,), generator=gen).tolist()
        s = int(torch.randint(8, 13, (1,), generator=gen))
        masks[i, :, r : r + s, c : c + s] = 1
    maps = torch.randn(n, 4, 16, 16, generator=gen) * 3.0 + 5.0  # unnormalised on purpose
    if informative:
        maps[:, 2:3] = F.avg_pool2d(masks, 2) * 10.0 + 0.1 * torch.randn(n, 1, 16, 16, generator=gen)
    return maps, masks


def test_segmentation_probe_informative_channel():
    gen = torch.Generator().manual_seed(0)
    maps, masks = _seg_data(80, gen, informative=True)
    out = segmentation_probe(maps[:60], masks[:60], maps[60:], masks[60:], steps=150, lr=5e-2)
    assert set(out) == {"dice", "iou"}
    assert out["dice"] > 0.9 and out["iou"] > 0.8


def test_segmentation_probe_noise_features():
    gen = torch.Generator().manual_seed(1)
    maps, masks = _seg_data(80, gen, informative=False)
    out = segmentation_probe(maps[:60], masks[:60], maps[60:], masks[60:], steps=100, lr=5e-2)
    assert out["dice"] < 0.4


def test_segmentation_probe_deterministic_and_leaves_global_rng():
    gen = torch.Generator().manual_seed(2)
    maps, masks = _seg_data(20, gen, informative=True)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = segmentation_probe(maps[:15], masks[:15], maps[15:], masks[15:], steps=20, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    b = segmentation_probe(maps[:15], masks[:15, 0], maps[15:], masks[15:, 0], steps=20, seed=3)  # [N,H,W] masks
    assert a == b


def test_segmentation_probe_degenerate():
    maps = torch.randn(4, 3, 4, 4)
    empty = torch.zeros(4, 1, 16, 16)
    assert segmentation_probe(maps, empty, maps, empty, steps=5) == {}  # nothing to learn
    full = torch.ones(4, 1, 16, 16)
    assert segmentation_probe(maps, full, maps[:0], full[:0], steps=5) == {}  # empty test split
