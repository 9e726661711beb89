"""The linear head shared by the per-round probes and the offline protocol: it must separate
informative from uninformative features, and count classes it never saw."""

import numpy as np

from fedus.evaluation.protocol import linear_head


def _blobs(n_per_class: int, n_classes: int, dim: int, rng: np.random.Generator, sep: float = 6.0):
    centres = rng.normal(size=(n_classes, dim)) * sep
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + rng.normal(size=(len(y), dim)), y


def test_linear_head_separable_blobs():
    rng = np.random.default_rng(0)
    x, y = _blobs(60, 3, 16, rng)
    perm = rng.permutation(len(y))
    x, y = x[perm], y[perm]
    out = linear_head(x[:120], y[:120], x[120:], y[120:], seed=0)
    assert set(out) == {"acc", "macro_f1", "balanced_acc"}
    assert min(out.values()) > 0.95


def test_linear_head_random_labels_near_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(600, 32)), rng.integers(0, 2, 600)
    out = linear_head(x[:400], y[:400], x[400:], y[400:], seed=0)
    assert 0.35 < out["acc"] < 0.65


def test_linear_head_degenerate_non_finite_and_unseen_class():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 4))
    assert linear_head(x, np.zeros(10, int), x, np.zeros(10, int), seed=0) == {}
    y = np.array([0, 1] * 5)
    assert linear_head(x, y, x[:0], y[:0], seed=0) == {}
    bad = x.copy()
    bad[0, 0] = np.nan  # a diverged encoder must give a score, not a scikit-learn crash
    assert set(linear_head(bad, y, bad, y, seed=0)) == {"acc", "macro_f1", "balanced_acc"}
    # A test class never seen in training counts in macro-F1 (as 0), it is not dropped.
    out = linear_head(x, y, x[:3], np.array([2, 2, 2]), seed=0)
    assert out["acc"] == 0.0 and out["macro_f1"] == 0.0
