"""The one place that builds what leaves a site.

A reply may carry the student's weights (keys and shapes exactly those of the
student that was sent), scalar metrics, a few aggregate facts about the site
(counts, class names), and for coreset selection a fixed-bin histogram of its
scores with their count. Anything else - an image-shaped array, a string that
is a path, a per-image list - is refused here, before it can be sent.
"""

from __future__ import annotations

import json
import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedus.intake.card import check_card
from server.strategy import CORESET_RECORD, SCORES_RECORD, SITE_RECORD

MAX_LIST = 64  # a longer list could be one value per image


class EgressViolation(RuntimeError):
    """Raised instead of sending something that must not leave the site."""


def _check_arrays(state: dict[str, torch.Tensor], expected: dict[str, torch.Size] | None) -> None:
    if expected is not None:
        if set(state) != set(expected):
            raise EgressViolation("reply arrays do not match the student that was sent")
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k])]
        if bad:
            raise EgressViolation(f"reply array shapes differ from the student's: {bad[:3]}")


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EgressViolation(f"metric '{key}' is not a scalar number")
        out[key] = value
    return out


def _check_site_facts(facts: dict) -> dict:
    out = {}
    for key, value in facts.items():
        if key == "data_card":  # the one structured fact: only the card's own shape may leave
            try:
                check_card(json.loads(value))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise EgressViolation(f"data card refused: {err}") from None
            out[key] = value
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str) and (os.sep in v or os.path.exists(v) or len(v) > 120):
                raise EgressViolation(f"site fact '{key}' looks like a path or free text")
        if isinstance(value, list) and len(value) > MAX_LIST:
            raise EgressViolation(f"site fact '{key}' is a long list (per-image values?)")
        out[key] = value
    return out


def _check_histogram(histogram: list[int]) -> dict:
    """Counts per fixed score bin (fedus.coreset), nothing per image: a short list of counts."""
    if not isinstance(histogram, list) or not 2 <= len(histogram) <= MAX_LIST:
        raise EgressViolation(f"coreset histogram must be a list of 2..{MAX_LIST} bin counts")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in histogram):
        raise EgressViolation("coreset histogram holds something other than bin counts")
    return {"histogram": histogram, "count": sum(histogram)}


def site_facts(name: str, describe: dict) -> dict:
    """Flatten `Site.describe()` into ConfigRecord-friendly values (no nested dicts)."""
    facts = {"name": name, "n_train": describe["n_train"], "n_test": describe["n_test"],
             "classes": list(describe["classes"]) or [""], "has_masks": bool(describe["has_masks"])}
    for reason, count in describe.get("skipped", {}).items():
        facts[f"skipped_{reason}"] = int(count)
    if describe.get("data_card"):
        facts["data_card"] = json.dumps(describe["data_card"], sort_keys=True)
    return facts


def build_reply(
    msg: Message,
    metrics: dict[str, float],
    facts: dict,
    state: dict[str, torch.Tensor] | None = None,
    expected: dict[str, torch.Size] | None = None,
    site_scores: dict[str, float] | None = None,
    histogram: list[int] | None = None,
) -> Message:
    """`metrics` must have the same keys at every site (Flower aggregates them);
    `site_scores` are the site-specific ones (probes exist only where labels/masks do);
    `histogram`: coreset score counts per bin (a query reply: pass no metrics and no facts)."""
    content = RecordDict()
    if metrics or histogram is None:
        content["metrics"] = MetricRecord(_check_metrics(metrics))
    if facts or histogram is None:
        content[SITE_RECORD] = ConfigRecord(_check_site_facts(facts))
    if histogram is not None:
        content[CORESET_RECORD] = MetricRecord(_check_histogram(histogram))
    if site_scores:
        content[SCORES_RECORD] = ConfigRecord(_check_metrics(site_scores))
    if state is not None:
        _check_arrays(state, expected)
        content["arrays"] = ArrayRecord(state)
    return Message(content, reply_to=msg)
