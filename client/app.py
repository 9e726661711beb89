"""fedus ClientApp: a site distils (train) and evaluates (evaluate) the global student, and
scores its images for coreset selection (query; only a histogram and a count go back).

With `secure-aggregation.enabled` the train messages follow Flower's SecAgg+ protocol
(`secure_aggregation_mod`): the site sends its update masked, the server sees only the sum.

Which site this node is comes from Flower's node_config: `partition-id` in
simulation (index into the sorted site list), or `site-name` + `data-path`
(the site's own manifest) in deployment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.replies import as_fitres, build_reply, site_facts
from fedus.config import RunConfig
from fedus.coreset import SiteScores
from fedus.privacy import PrivacyLedger
from fedus.processes import process_age
from fedus.site import Site, get_site
from fedus.transfer import (INT8_DELTA, TRANSFER_KEY, decode, encode, encode_delta, from_wire, layout_of, nbytes, pack,
                            unpack)
from server.central_dp import KEY_BELOW_CLIP, KEY_CLIPPING_NORM, clip_and_flag
from server.secure_aggregation import CLIP_KEY, KEYS_KEY, MAX_WEIGHT_KEY, is_secure_instruction
from server.strategy import EVAL_ROUND_KEY, KEEP_KEY, THRESHOLD_KEY

app = ClientApp()
CORESET_STATE = "coreset-scores"  # this node's scores between re-scorings (context.state: never sent)
RESIDUAL_STATE = "transfer-residual"  # int8-delta's quantisation error, carried to the next round (never sent)
RESIDUAL_LAYOUT = "transfer-residual-layout"  # how RESIDUAL_STATE's packed arrays split (fedus.transfer)


def site_for(context: Context) -> Site:
    cfg = RunConfig.from_flat(context.run_config)
    node = context.node_config
    if "data-path" in node:
        path = Path(str(node["data-path"])).expanduser()
        manifest = path / "manifest.csv" if path.is_dir() else path
        name = str(node.get("site-name", "")) or f"node-{context.node_id}"
        return get_site(cfg, name, manifest, own_manifest=True)
    return get_site(cfg, int(node["partition-id"]))


def site_privacy(site: Site, context: Context) -> tuple[PrivacyLedger | None, float | None]:
    """The site's own ledger file and epsilon budget, from its node config (`privacy-ledger`,
    `epsilon-budget`): the server cannot raise a site's budget. In simulation, unset values fall
    back to the run config (a per-site ledger under the run dir); a deployed site without a
    budget refuses every DP round."""
    if not site.cfg.privacy.enabled:
        return None, None
    node = context.node_config
    ledger = None
    if "privacy-ledger" in node:
        ledger = PrivacyLedger(Path(str(node["privacy-ledger"])).expanduser(), site.cfg.privacy.accountant)
    elif "data-path" in node:
        path = Path(str(node["data-path"])).expanduser()
        ledger = PrivacyLedger((path if path.is_dir() else path.parent) / "privacy-ledger.json", site.cfg.privacy.accountant)
    budget = float(node["epsilon-budget"]) if "epsilon-budget" in node else None
    return ledger, budget


def received(msg: Message, context: Context) -> tuple[Site, ConfigRecord, str, dict[str, torch.Tensor]]:
    """This node's site, the instruction's config, its wire dtype (both ways) and the student sent (back
    in fp32). Under secure aggregation the instruction is Flower's legacy FitIns: unnamed arrays, named
    by the config's key list; otherwise packed (fedus.transfer)."""
    if is_secure_instruction(msg):
        ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = ConfigRecord(ins.config)
        arrays = parameters_to_ndarrays(ins.parameters)
        wire = {k: torch.from_numpy(a.copy()) for k, a in zip(str(config[KEYS_KEY]).split("\n"), arrays, strict=True)}
        dtype = str(config.get(TRANSFER_KEY, "fp32"))
        return site_for(context), config, dtype, decode(wire, dtype)
    config = msg.content["config"]
    sent, dtype = from_wire(msg.content["arrays"].to_torch_state_dict(), config)
    return site_for(context), config, dtype, sent


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ site half (key agreement, shares, masking), for a secure-aggregation run's
    train messages; every other message passes straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    startup = process_age()  # before this node's site is built: the message's process start-up only
    site, config, dtype, sent = received(msg, context)
    rounds = int(config["rounds"]) if "rounds" in config else None  # the server's clock (server/app.py sends it)
    evaluation = None
    if EVAL_ROUND_KEY in config:  # the student sent is the previous round's global: score it before training on it
        evaluation = split_evaluation(site.evaluate(sent, int(config[EVAL_ROUND_KEY])))
    ledger, budget = site_privacy(site, context)
    subset = coreset_subset(site, context, config, sent)
    state, metrics = site.train(sent, int(config["server-round"]), rounds, ledger, budget, subset=subset)
    metrics = metrics | {"startup_seconds": startup}
    expected = {k: v.shape for k, v in sent.items()}  # what may leave: the student that was sent, no other shapes
    if state is not None and KEY_CLIPPING_NORM in config:  # central DP, client side: the update is clipped here
        state, below = clip_and_flag(state, sent, float(config[KEY_CLIPPING_NORM]))
        if site.cfg.central_dp.mode == "client-adaptive":  # the one bit the server's adaptive norm needs
            metrics = metrics | {KEY_BELOW_CLIP: int(below)}
    if is_secure_instruction(msg):
        return secure_reply(msg, site, sent, state, metrics, config, expected)
    scales = None
    if state is not None and dtype == INT8_DELTA:
        state, scales = upload_delta(state, sent, context)
    elif state is not None:
        state = encode(state, dtype)
    metrics = metrics | {"bytes_sent": nbytes(state) + nbytes(scales or {}) if state is not None else 0}
    if subset is not None:
        metrics |= {"coreset_kept": len(subset), "coreset_threshold": float(config[THRESHOLD_KEY])}
    return build_reply(msg, metrics, site_facts(site.name, site.describe()), state, expected, scales=scales,
                       evaluation=evaluation)


def secure_reply(msg: Message, site: Site, sent: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None,
                 metrics: dict, config: ConfigRecord, expected: dict[str, torch.Size]) -> Message:
    """The update (student - global as received; zero after a refusal, whose weight is 0 too) for
    SecAgg+ to quantise and mask. Integer buffers are not summed (zero). `secagg_clipped`: the fraction
    of coordinates the quantiser will clip at its range, so a run can see it is set too tight."""
    update = {k: (state[k] - v if state is not None else torch.zeros_like(v)) if v.is_floating_point()
              else torch.zeros_like(v) for k, v in sent.items()}
    weight = float(metrics.get("num-examples", 0))
    if KEY_CLIPPING_NORM in config:  # central DP: the uniform mean of clipped updates, so weight 1 (0 if refused)
        weight = float(state is not None)
    ratio = weight / float(config[MAX_WEIGHT_KEY])
    limit = float(config[CLIP_KEY])
    clipped = sum(int((v.abs() * ratio > limit).sum()) for v in update.values())
    metrics = metrics | {"secagg_clipped": clipped / max(1, sum(v.numel() for v in update.values()))}
    reply = build_reply(msg, metrics, site_facts(site.name, site.describe()), update, expected, packed=False)
    return as_fitres(msg, reply, str(config[KEYS_KEY]).split("\n"), int(weight))


def upload_delta(new: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                 context: Context) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """int8-delta with error feedback (fedus.transfer): the residual stays in this node's context.state;
    a node without one (fresh process, first round here) starts from zero."""
    stored, layout, carried = context.state.get(RESIDUAL_STATE), context.state.get(RESIDUAL_LAYOUT), None
    if stored is not None and layout is not None:
        try:  # kept packed too: Flower moves context.state between SuperNode and ClientApp every message
            carried = unpack(stored.to_torch_state_dict(), str(layout["layout"]))
        except (ValueError, KeyError):
            carried = None
    payload, scales, residual = encode_delta(new, sent, carried)
    context.state[RESIDUAL_STATE] = ArrayRecord(pack(residual))
    context.state[RESIDUAL_LAYOUT] = ConfigRecord({"layout": layout_of(residual)})
    return payload, scales


def store_scores(context: Context, scores: SiteScores) -> None:
    context.state[CORESET_STATE] = ArrayRecord({k: torch.from_numpy(v) for k, v in scores.to_arrays().items()})


def coreset_subset(site: Site, context: Context, config: ConfigRecord, sent: dict) -> np.ndarray | None:
    """The training images this round uses: None (all) unless the server sent a coreset threshold.
    Scores come from the last query round; a node without them (restarted, newly sampled) scores
    now with the student it was sent. Its own keep count if the server had its histogram, else
    as many as score at or above the threshold; never fewer than two (a batch BatchNorm can train on)."""
    if THRESHOLD_KEY not in config:
        return None
    stored = context.state.get(CORESET_STATE)
    scores = SiteScores.from_arrays({k: v.numpy() for k, v in stored.to_torch_state_dict().items()}) if stored else None
    if scores is None or len(scores.scores) != len(site.data.train):
        scores = site.coreset_scores(sent, int(config["server-round"]))
        store_scores(context, scores)
    keep = int(config[KEEP_KEY]) if KEEP_KEY in config else scores.keep_at(float(config[THRESHOLD_KEY]))
    return scores.select(max(keep, min(2, len(scores.scores))), site.cfg.coreset.quota)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Coreset scoring with the global student sent: the scores stay here, the histogram goes back,
    small bins merged first (`coreset.min-bin-count`)."""
    site, config, _, sent = received(msg, context)
    scores = site.coreset_scores(sent, int(config["server-round"]))
    store_scores(context, scores)
    return build_reply(msg, {}, {}, histogram=scores.sent_histogram(site.cfg.coreset),
                       min_bin_count=site.cfg.coreset.min_bin_count)


def split_evaluation(scores: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Site.evaluate's scores as (the metrics every site has, which Flower may average; this site's own probes)."""
    common = {k: scores.pop(k) for k in ("cos", "mse", "num-examples", "eval_seconds")}
    return common, scores


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    startup = process_age()
    site, _, _, state = received(msg, context)
    common, scores = split_evaluation(site.evaluate(state, int(msg.content["config"]["server-round"])))
    return build_reply(msg, common | {"startup_seconds": startup}, site_facts(site.name, site.describe()),
                       site_scores=scores)
