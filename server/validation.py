"""Server-side checks on site updates before they can touch the global student.

A reply is rejected (never aggregated) when its arrays are not the student's
(keys, shapes), hold NaN/Inf, or move the student far more than the round's
other sites do: norm of (reply - global) above `max_norm_ratio` x the round's
median. The median needs a majority of honest sites, so the norm rule only
applies from 3 replies on. A rejection has a short fixed reason for the run record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

WRONG_KEYS, WRONG_SHAPES, NOT_FINITE, NORM_OUTLIER, NO_ARRAYS = (
    "wrong-keys", "wrong-shapes", "not-finite", "norm-outlier", "no-arrays")


@dataclass
class Verdict:
    reply: Message
    reason: str | None = None  # None = accepted
    norm: float | None = None


def _arrays(reply: Message) -> dict[str, np.ndarray] | None:
    records = list(reply.content.array_records.values())
    if len(records) != 1:
        return None
    return {k: a.numpy() for k, a in records[0].items()}


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of the update over all floating-point tensors (float64, so fp32 overflow is not an issue)."""
    total = 0.0
    for k, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            d = arrays[k].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
    return total ** 0.5


def check_one(arrays: dict[str, np.ndarray] | None, reference: dict[str, np.ndarray]) -> str | None:
    if arrays is None:
        return NO_ARRAYS
    if set(arrays) != set(reference):
        return WRONG_KEYS
    if any(arrays[k].shape != v.shape for k, v in reference.items()):
        return WRONG_SHAPES
    if any(np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all() for a in arrays.values()):
        return NOT_FINITE
    return None


def validate_updates(replies: list[Message], global_arrays: ArrayRecord | None,
                     max_norm_ratio: float = 10.0) -> list[Verdict]:
    """One verdict per reply, in order. Without the global arrays (a strategy driven outside
    a run) keys/shapes are checked against the first reply and norms are not judged."""
    parsed = [_arrays(r) for r in replies]
    if global_arrays is not None:
        reference = {k: a.numpy() for k, a in global_arrays.items()}
    else:
        reference = next((a for a in parsed if a is not None), {})
    verdicts = []
    for reply, arrays in zip(replies, parsed):
        reason = check_one(arrays, reference)
        norm = update_norm(arrays, reference) if reason is None and global_arrays is not None else None
        verdicts.append(Verdict(reply, reason, norm))
    norms = [v.norm for v in verdicts if v.reason is None and v.norm is not None]
    if max_norm_ratio > 0 and len(norms) >= 3:
        limit = max_norm_ratio * float(np.median(norms))
        for v in verdicts:
            if v.reason is None and v.norm > limit and v.norm > 0:
                v.reason = NORM_OUTLIER
    return verdicts
