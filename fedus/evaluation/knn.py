"""kNN accuracy on frozen pooled features: a training-free check of what an encoder's space holds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

__all__ = ["knn_accuracy"]


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 10) -> float | None:
    """Cosine kNN (L2-normalised features, distance-weighted vote), as in DINO-style evaluations.

    k is capped by the train size; None when undefined (empty split, fewer than 2 classes)."""
    train_x, test_x = np.nan_to_num(np.asarray(train_x, np.float64)), np.nan_to_num(np.asarray(test_x, np.float64))
    if len(test_x) == 0 or len(np.unique(train_y)) < 2:
        return None
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), weights="distance")
    clf.fit(normalize(train_x.reshape(len(train_x), -1)), np.asarray(train_y))
    return float(accuracy_score(test_y, clf.predict(normalize(test_x.reshape(len(test_x), -1)))))
