"""Leakage-safe train/test splits.

Images of one patient, and near-duplicate images (the same frame exported twice,
or crops of one frame), must never sit on both sides of a split, or held-out
scores measure memory instead of generalisation. Rows are joined into groups
(union-find over patient ids and near-duplicate pairs) and whole groups are
assigned to a side.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def leakage_groups(df: pd.DataFrame, near_duplicates: list[tuple[str, str]]) -> np.ndarray:
    """Group id per row: rows sharing a patient id or a near-duplicate pair share a group."""
    parent = list(range(len(df)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    first_of: dict[str, int] = {}
    for i, pid in enumerate(df["patient_id"]):
        if pid:
            union(i, first_of.setdefault(pid, i))
    row_of = {p: i for i, p in enumerate(df["image_path"])}
    for a, b in near_duplicates:
        if a in row_of and b in row_of:
            union(row_of[a], row_of[b])
    roots = np.array([find(i) for i in range(len(df))])
    _, group = np.unique(roots, return_inverse=True)
    return group


def grouped_split(
    df: pd.DataFrame, near_duplicates: list[tuple[str, str]], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test); groups are shuffled by `seed` and filled up to the test fraction.

    Groups are stratified by their majority label so that small classes reach
    the held-out side too (a probe on a test set without a class says little).
    """
    groups = leakage_groups(df, near_duplicates)
    rng = np.random.default_rng(seed)
    labels = df["label"].to_numpy()
    group_label = {g: pd.Series(labels[groups == g]).mode().iloc[0] for g in np.unique(groups)}
    test_groups: set[int] = set()
    for label in sorted(set(group_label.values())):
        members = np.array([g for g, lab in group_label.items() if lab == label])
        if len(members) < 2:
            continue  # a class seen in one group only stays on the training side
        rng.shuffle(members)
        target = test_fraction * int(np.isin(groups, members).sum())
        taken = 0
        for g in members:  # take a group only if it brings the count closer to the target
            size = int((groups == g).sum())
            if abs(taken + size - target) < abs(taken - target):
                test_groups.add(int(g))
                taken += size
    is_test = np.isin(groups, list(test_groups))
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
