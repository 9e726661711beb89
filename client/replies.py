"""The one place that builds what leaves a site.

A reply may carry the student's weights (keys and shapes exactly those of the
student that was sent; under int8-delta, int8 deltas with one fp32 scale per
quantised tensor or output channel in their own record), scalar metrics, a few aggregate facts about the site
(counts, class names), and for coreset selection a fixed-bin histogram of its
scores with their count. Anything else - an image-shaped array, a string that
is a path, a per-image list, a record or key not on the allow-list below - is
refused here, before it can be sent. A new metric has to be added to the list:
that is the point (tests/test_egress.py drives every handler against it).
"""

from __future__ import annotations

import json
import os
import re

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedus.intake.card import K_ANONYMITY, check_card
from fedus.transfer import SCALES_RECORD, pack, scale_shape
from server.central_dp import KEY_BELOW_CLIP
from server.strategy import CORESET_RECORD, EVAL_RECORD, SCORES_RECORD, SECURE_SITE_KEY, SITE_RECORD

MAX_LIST = 64  # a longer list could be one value per image


class EgressViolation(RuntimeError):
    """Raised instead of sending something that must not leave the site."""


# --- the allow-list: record name -> record type, and the keys each record may hold ---------------
RECORDS = {"metrics": MetricRecord, EVAL_RECORD: MetricRecord, SITE_RECORD: ConfigRecord,
           SCORES_RECORD: ConfigRecord, CORESET_RECORD: MetricRecord, "arrays": ArrayRecord, SCALES_RECORD: ArrayRecord}
_WORD = r"[a-z0-9_-]+"  # keys made by code from loss / probe names: no dots, no slashes, no data
TRAIN_METRICS = frozenset({
    "num-examples", "loss_before", "loss_after", "examples_seen", "steps", "seconds", "images_per_s",
    "progress_end", "target_cache_hit_rate", "target_cache_filled", "bytes_sent", "coreset_kept",
    "coreset_threshold", KEY_BELOW_CLIP, "train_seconds",
    "startup_seconds",  # this ClientApp process's age when the message reached it (deployment: its start-up)
    # DP-SGD and the site's ledger (fedus/site.py: charge, privacy_plan)
    "dp_steps", "noise_multiplier", "sample_rate", "max_grad_norm", "refused", "refusal_code",
    "epsilon_round", "epsilon_total", "epsilon_projected", "epsilon_budget", "delta",
    "secagg_clipped"})  # secure aggregation: share of the update's coordinates clipped before quantisation
EVAL_METRICS = frozenset({"cos", "mse", "num-examples", "eval_seconds", "startup_seconds"})  # *_seconds: the site's own work time
SITE_FACTS = frozenset({"name", "n_train", "n_test", "classes", "has_masks", "data_card"})
ALLOWED_KEYS: dict[str, tuple[frozenset[str], re.Pattern | None]] = {
    "metrics": (TRAIN_METRICS | EVAL_METRICS, re.compile(rf"train_{_WORD}")),  # loss parts (site_step)
    EVAL_RECORD: (EVAL_METRICS - {"startup_seconds"}, None),  # a train reply's evaluation of the student it was sent
    SITE_RECORD: (SITE_FACTS, re.compile(rf"skipped_{_WORD}")),
    SCORES_RECORD: (frozenset(), re.compile(  # probes, and the label-efficiency protocol's summary rows
        rf"(teacher_)?(cls|seg)_{_WORD}|le:{_WORD}:{_WORD}:{_WORD}:[0-9.e+-]+:(mean|std|n)")),
    CORESET_RECORD: (frozenset({"histogram", "count"}), None),
}
VALUE_TYPES = {"metrics": (int, float), EVAL_RECORD: (int, float), SITE_RECORD: (str, int, bool, list),
               SCORES_RECORD: (int, float), CORESET_RECORD: (int, list)}  # lists: of scalars, at most MAX_LIST long


def allowed_key(record: str, key: str) -> bool:
    """Whether `key` may leave in the record named `record` (arrays are checked against the student)."""
    keys, pattern = ALLOWED_KEYS.get(record, (frozenset(), None))
    return key in keys or (pattern is not None and pattern.fullmatch(key) is not None)


def _check_keys(record: str, values: dict) -> None:
    bad = [k for k in values if not allowed_key(record, k)]
    if bad:
        raise EgressViolation(f"'{record}' keys not on the egress allow-list: {bad[:3]}")


def _check_arrays(state: dict[str, torch.Tensor], expected: dict[str, torch.Size] | None) -> None:
    if expected is None:  # arrays leave only as the student that was sent, so it must be known
        raise EgressViolation("reply arrays without the student they must match")
    if set(state) != set(expected):
        raise EgressViolation("reply arrays do not match the student that was sent")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k])]
    if bad:
        raise EgressViolation(f"reply array shapes differ from the student's: {bad[:3]}")


def _check_scales(scales: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None,
                  expected: dict[str, torch.Size] | None) -> None:
    """int8-delta's scales: only beside the arrays, only for int8 tensors of the student, one fp32 number
    per tensor or per output channel (`fedus.transfer.scale_shape`) - nothing else can ride along."""
    if state is None or expected is None:
        raise EgressViolation(f"'{SCALES_RECORD}' without the student's arrays")
    bad = [k for k, v in scales.items() if k not in expected or state[k].dtype != torch.int8
           or v.dtype != torch.float32 or tuple(v.shape) != scale_shape(tuple(expected[k]))]
    if bad:
        raise EgressViolation(f"'{SCALES_RECORD}' entries that are not one scale per int8 tensor or channel: {bad[:3]}")


def _check_metrics(metrics: dict[str, float], record: str = "metrics") -> dict[str, float]:
    _check_keys(record, metrics)
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EgressViolation(f"metric '{key}' is not a scalar number")
        out[key] = value
    return out


def _check_site_facts(facts: dict) -> dict:
    _check_keys(SITE_RECORD, facts)
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


def _check_histogram(histogram: list[int], min_count: int) -> dict:
    """Counts per fixed score bin (fedus.coreset), nothing per image: a short list of counts, none
    of 1..min_count-1 (a small bin can single out rare images; `suppress_small_bins` merges them
    first, this is the second line). Bin 0 may hold all of fewer than min_count images: that says
    nothing about their scores."""
    if not isinstance(histogram, list) or not 2 <= len(histogram) <= MAX_LIST:
        raise EgressViolation(f"coreset histogram must be a list of 2..{MAX_LIST} bin counts")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in histogram):
        raise EgressViolation("coreset histogram holds something other than bin counts")
    if any(0 < c < min_count for c in histogram) and not histogram[0] == sum(histogram) < min_count:
        raise EgressViolation(f"coreset histogram has a bin of fewer than {min_count} images (small-cell suppression)")
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
    scales: dict[str, torch.Tensor] | None = None,
    min_bin_count: int = K_ANONYMITY,
    evaluation: tuple[dict[str, float], dict[str, float]] | None = None,
    packed: bool = True,
) -> Message:
    """`metrics` must have the same keys at every site (Flower aggregates them);
    `site_scores` are the site-specific ones (probes exist only where labels/masks do);
    `histogram`: coreset score counts per bin (a query reply: pass no metrics and no facts), no bin
    of 1..`min_bin_count`-1 images (the run's `coreset.min-bin-count`; strict by default);
    `scales`: int8-delta's per-tensor / per-channel scales of `state` (fedus.transfer);
    `evaluation`: a train reply's (metrics, site_scores) for the student it was sent (evaluate-with-train);
    `packed`: the arrays as one flat array per dtype (the Message API wire form), or by name (SecAgg+'s FitRes)."""
    content = RecordDict()
    if metrics or histogram is None:
        content["metrics"] = MetricRecord(_check_metrics(metrics))
    if facts or histogram is None:
        content[SITE_RECORD] = ConfigRecord(_check_site_facts(facts))
    if histogram is not None:
        content[CORESET_RECORD] = MetricRecord(_check_histogram(histogram, min_bin_count))
    if evaluation is not None:
        carried, site_scores = evaluation
        content[EVAL_RECORD] = MetricRecord(_check_metrics(carried, EVAL_RECORD))
    if site_scores:
        content[SCORES_RECORD] = ConfigRecord(_check_metrics(site_scores, SCORES_RECORD))
    if state is not None:  # checked by name, then packed as the wire carries it (fedus.transfer)
        _check_arrays(state, expected)
        content["arrays"] = ArrayRecord(pack(state) if packed else state)
    if scales is not None:
        _check_scales(scales, state, expected)
        content[SCALES_RECORD] = ArrayRecord(pack(scales) if packed else scales)
    _audit(content)
    return Message(content, reply_to=msg)


def _audit(content: RecordDict) -> None:
    """The reply as it will be sent, against the allow-list as a whole: catches a record or value
    added above without its own check."""
    for name, record in content.items():
        if not isinstance(record, RECORDS.get(name, ())):
            raise EgressViolation(f"record '{name}' ({type(record).__name__}) is not on the egress allow-list")
        if name == SCALES_RECORD and "arrays" not in content:
            raise EgressViolation(f"'{SCALES_RECORD}' for arrays that are not in the reply")
        if name in ("arrays", SCALES_RECORD):  # checked against the student in build_reply
            continue
        _check_keys(name, record)
        for key, value in record.items():
            items = value if isinstance(value, list) else [value]
            if (not isinstance(value, VALUE_TYPES[name]) or len(items) > MAX_LIST
                    or any(not isinstance(v, (str, int, float)) for v in items)):
                raise EgressViolation(f"'{name}.{key}' has a value of a type that may not leave")


def as_fitres(msg: Message, reply: Message, keys: list[str], weight: int) -> Message:
    """A built (so audited) train reply repacked as Flower's legacy FitRes, the form SecAgg+'s mod
    quantises and masks: the update in `keys` order, its `weight` in the sum (the example count, or
    1 under central DP), the metrics and the site's name. Nothing is added; the site's other facts stay home."""
    content = reply.content
    state = content["arrays"].to_torch_state_dict()
    metrics = dict(content["metrics"]) | {SECURE_SITE_KEY: str(content[SITE_RECORD]["name"])}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([state[k].numpy() for k in keys]),
                 weight, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
