"""FedAvg (example-weighted, Flower's Message-API strategy) that also keeps fedus's run record.

Aggregation itself is Flower's: this subclass only records each site's reply
(per-site metrics, failures) and checkpoints the global student every round.
With `federation.server-optimizer`, Flower's FedAdam / FedYogi / FedAdagrad /
FedAvgM step on that aggregate (server/optimizer.py), their state checkpointed too.
By default a round's global student is evaluated by the next round's train message
(`federation.evaluate-with-train`): the site scores the student it was sent before
training on it, the reply carries both, and only the last round has an evaluate
message of its own.
With coreset selection on, it also runs a query round before training every R
rounds (sites send score histograms) and puts the threshold and each site's keep
count in that site's train config.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from fedus.config import RunConfig
from fedus.coreset import plan_budget
from fedus.privacy.accounting import REFUSALS
from fedus.runs import RunRecorder
from fedus.transfer import (INT8_DELTA, LAYOUT_KEY, SCALES_RECORD, TRANSFER_KEY, decode, decode_delta, encode, nbytes,
                            reply_layouts, to_wire, unpack)
from server.central_dp import KEY_BELOW_CLIP, CentralDP
from server.optimizer import ServerOptimizer
from server.validation import validate_updates

SITE_RECORD = "site"
SCORES_RECORD = "site-scores"
CORESET_RECORD = "coreset"
THRESHOLD_KEY, KEEP_KEY = "coreset-threshold", "coreset-keep"  # train config a site reads (client/app.py)
EVAL_RECORD = "eval"  # a train reply's evaluation of the student it was sent (evaluate-with-train)
EVAL_ROUND_KEY = "evaluate-round"  # train config: evaluate the received student first, as this round's global
SECURE_SITE_KEY = "site"  # under SecAgg+ a reply is Flower's legacy FitRes: the site's name rides in its metrics


def mean_of_common_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of the metrics every site reported (sites differ in probes)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    common = set.intersection(*(set(m.keys()) for m in metrics)) - {weight_key}
    weights = [float(m[weight_key]) for m in metrics]
    total = sum(weights) or 1.0
    out = {k: sum(float(m[k]) * w for m, w in zip(metrics, weights)) / total for k in sorted(common)
           if all(isinstance(m[k], (int, float)) for m in metrics)}
    out[weight_key] = int(total)
    return MetricRecord(out)


def refusal(metrics) -> str | None:
    """A site's reason for refusing the round (its privacy budget), from its train metrics; None if it trained."""
    if not int(metrics.get("refused", 0)):
        return None
    return REFUSALS.get(int(metrics.get("refusal_code", 0)), "unknown")


def site_name(reply: Message) -> str:
    if not reply.has_error() and SITE_RECORD in reply.content:
        return str(reply.content[SITE_RECORD].get("name", ""))
    return f"~node-{reply.metadata.src_node_id}"


class FedusFedAvg(FedAvg):
    def __init__(self, cfg: RunConfig, recorder: RunRecorder, round_offset: int = 0, **kwargs):
        """`round_offset`: rounds already completed before this process (a resumed run); Flower counts
        from 1 again, sites and the run record see the true round."""
        super().__init__(train_metrics_aggr_fn=mean_of_common_metrics,
                         evaluate_metrics_aggr_fn=mean_of_common_metrics, **kwargs)
        self.cfg = cfg
        self.recorder = recorder
        self.beta = cfg.federation.trim_beta  # read by FedTrimmedAvg.aggregate_train
        self.sent: ArrayRecord | None = None  # the global student of the round being trained
        self.offset = round_offset
        self.asked = {"train": 0, "eval": 0}  # sites asked this round: one that never answers is a failure too
        self.quorum = cfg.federation.quorum or cfg.federation.min_sites
        self.bytes_down = 0  # server -> sites, this round's train messages
        self.began: dict[str, float] = {}  # when each phase was configured: round wall times for the record
        self.coreset: tuple[float, dict[int, int]] | None = None  # last threshold, keep count per node id
        fed = cfg.federation  # evaluation rides in train messages only where those reach every site, unmasked
        self.with_train = fed.evaluate_with_train and fed.fraction_train >= 1.0 and not cfg.secure_aggregation.enabled
        self.carried: int | None = None  # the round whose evaluation this round's train messages carry
        self.central_dp = (CentralDP(cfg.central_dp, cfg.federation.min_sites, cfg.seed)
                           if cfg.central_dp.mode != "off" else None)
        if self.central_dp is not None:
            self.central_dp.load_state_dict(recorder.strategy_state.get("central_dp") if recorder.strategy_state else None)
        # Flower's FedAdam & co., stepping on whichever aggregate this strategy made (server/optimizer.py)
        self.server_opt = ServerOptimizer(cfg.federation) if cfg.federation.server_optimizer != "none" else None
        if self.server_opt is not None and recorder.optimizer_state is not None:
            self.server_opt.load_state_dict(recorder.optimizer_state)

    def on_the_wire(self, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """The global student as sent (`federation.transfer-dtype`, packed: fedus.transfer), and a copy
        of the config saying how to read it."""
        packed, entries = to_wire(arrays.to_torch_state_dict(), self.cfg.federation.transfer_dtype)
        return ArrayRecord(packed), ConfigRecord(dict(config) | entries)

    def arrived(self, replies: list[Message]) -> None:
        """Replies' students unpacked and back to fp32 in place, so validation and the aggregate are fp32.
        Under int8-delta each is rebuilt as received + scale * q on the student as the sites received it.
        One that cannot be (arrays that do not fit the layout the site was sent, scales missing or
        malformed) loses its arrays, so validation rejects it (no-arrays) rather than aggregating it."""
        if self.sent is None:
            return
        dtype = self.cfg.federation.transfer_dtype
        base = self.received()
        layout, scales_layout = reply_layouts(base, dtype)
        like = self.sent.to_torch_state_dict()
        for m in replies:
            if m.has_error() or "arrays" not in m.content:
                continue
            try:
                arrays = unpack(m.content["arrays"].to_torch_state_dict(), layout)
                if dtype != INT8_DELTA:
                    m.content["arrays"] = ArrayRecord(decode(arrays, dtype, like))
                    continue
                if SCALES_RECORD not in m.content:
                    raise ValueError("no scales")
                scales = unpack(m.content[SCALES_RECORD].to_torch_state_dict(), scales_layout)
                m.content["arrays"] = ArrayRecord(decode_delta(arrays, scales, base))
                del m.content[SCALES_RECORD]  # validation expects the one ArrayRecord
            except ValueError as err:
                log(WARNING, "node %s: update not read (%s)", m.metadata.src_node_id, err)
                del m.content["arrays"]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.began["train"] = time.monotonic()
        if server_round > 1 or self.offset:  # all min-sites started the run; later rounds go on at quorum
            self.min_available_nodes = self.min_train_nodes = self.min_evaluate_nodes = self.quorum
        self.sent = arrays  # updates are validated against what was sent
        # Flower passes the same ConfigRecord every round: on_the_wire copies before adding to it.
        wire, config = self.on_the_wire(arrays, config)
        previous = server_round + self.offset - 1
        self.carried = previous if self.with_train and self.evaluates(previous) else None
        if self.carried is not None:
            config = ConfigRecord(dict(config) | {EVAL_ROUND_KEY: self.carried})
        if self.central_dp is not None:
            config = ConfigRecord(dict(config) | self.central_dp.train_config())
        messages = list(super().configure_train(server_round + self.offset, wire, config, grid))
        if self.central_dp is not None:  # refuses when Flower sampled other than what the noise assumes
            self.central_dp.check_sampled(len(messages), population=len(list(grid.get_node_ids())))
        if self.cfg.coreset.enabled:
            messages = self.with_coreset(server_round + self.offset, messages, wire, grid)
        self.asked["train"] = len(messages)
        self.bytes_down = nbytes(wire.to_torch_state_dict()) * len(messages)
        return messages

    def with_coreset(self, server_round: int, messages: list[Message], wire: ArrayRecord, grid: Grid) -> list[Message]:
        """Re-score in rounds 1, 1+R, ... (and the first round of a resumed run); every round, each
        site's train config gets the threshold and, where its histogram arrived, its keep count."""
        if self.coreset is None or (server_round - 1) % self.cfg.coreset.rescore_every == 0:
            self.coreset = self.query_histograms(server_round, [m.metadata.dst_node_id for m in messages], wire,
                                                 messages[0].content["config"], grid)
        else:
            self.recorder.record_coreset(server_round, {"rescored": False, "threshold": self.coreset[0]})
        if self.coreset is None:  # no site answered: this round trains on all images
            return messages
        threshold, keep = self.coreset
        out = []
        for m in messages:  # Flower's messages share one RecordDict: each site gets its own config
            node = m.metadata.dst_node_id
            config = ConfigRecord(dict(m.content["config"]) | {THRESHOLD_KEY: threshold}
                                  | ({KEEP_KEY: keep[node]} if node in keep else {}))
            out.append(Message(RecordDict({"arrays": m.content["arrays"], "config": config}),
                               dst_node_id=node, message_type=m.metadata.message_type))
        return out

    def query_histograms(self, server_round: int, nodes: list[int], wire: ArrayRecord, train_config: ConfigRecord,
                         grid: Grid) -> tuple[float, dict[int, int]] | None:
        """One query round: the global student out (as the train messages carry it), score histograms +
        counts back, budget planned."""
        config = ConfigRecord({"server-round": server_round}
                              | {k: train_config[k] for k in (TRANSFER_KEY, LAYOUT_KEY)})
        messages = [Message(RecordDict({"arrays": wire, "config": config}), dst_node_id=n, message_type=MessageType.QUERY)
                    for n in nodes]
        replies = [r for r in grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout)
                   if not r.has_error() and CORESET_RECORD in r.content]
        if len(replies) < len(nodes):
            log(WARNING, "round %s coreset: %s of %s sites sent no histogram", server_round, len(nodes) - len(replies), len(nodes))
        if not replies:
            self.recorder.record_coreset(server_round, {"rescored": False, "sites_replied": 0})
            return None
        plan = plan_budget([list(r.content[CORESET_RECORD]["histogram"]) for r in replies], self.cfg.coreset.budget)
        self.recorder.record_coreset(server_round, {
            "rescored": True, "threshold": plan.threshold, "target": plan.target, "kept": plan.kept,
            "total": plan.total, "sites_replied": len(replies)})
        return plan.threshold, {r.metadata.src_node_id: k for r, k in zip(replies, plan.keep)}

    def evaluates(self, server_round: int) -> bool:
        """Federated evaluation in this (true) round: round 0 and the last always, else every `evaluate-every`."""
        return server_round <= 0 or server_round >= self.cfg.rounds or server_round % self.cfg.federation.evaluate_every == 0

    def evaluated_apart(self, server_round: int) -> bool:
        """Whether this (true) round's global student gets evaluate messages of its own: always without
        evaluate-with-train, else only the last round's (no train message follows it)."""
        return self.evaluates(server_round) and (not self.with_train or server_round >= self.cfg.rounds)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.began["eval"] = time.monotonic()
        if not self.evaluated_apart(server_round + self.offset):
            self.asked["eval"] = 0
            return []
        messages = list(super().configure_evaluate(server_round + self.offset, *self.on_the_wire(arrays, config), grid))
        self.asked["eval"] = len(messages)
        return messages

    def _per_site(self, server_round: int, kind: str, replies: Iterable[Message],
                  notes: dict[int, dict] | None = None, record: str | None = None) -> list[Message]:
        """`notes`: extra per-site fields (refusal, rejection) keyed by id() of the reply. `record`: the
        MetricRecord holding this kind's metrics, if not the reply's first (a train reply's carried
        evaluation is in EVAL_RECORD)."""
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        per_site, sites = {}, {}
        for m in ok:
            info = dict(m.content[SITE_RECORD]) if SITE_RECORD in m.content else {}
            name = str(info.pop("name", f"node-{m.metadata.src_node_id}"))
            per_site[name] = dict(m.content[record] if record else next(iter(m.content.metric_records.values())))
            if SCORES_RECORD in m.content:
                per_site[name].update(dict(m.content[SCORES_RECORD]))
            per_site[name].update((notes or {}).get(id(m), {}))
            sites[name] = info
        for m in replies:
            if m.has_error():
                log(WARNING, "round %s %s: node %s failed: %s", server_round, kind, m.metadata.src_node_id, m.error.reason)
        self.recorder.record_sites(sites)
        self.recorder.record(server_round, kind, per_site, failed=max(len(replies), self.asked[kind]) - len(ok))
        return replies

    def screen(self, server_round: int, replies: list[Message]) -> tuple[list[Message], dict[int, dict]]:
        """Drop refusals (a site's privacy budget said no) and invalid updates before aggregation."""
        ok = [m for m in replies if not m.has_error()]
        notes, offered = {}, []
        for m in ok:
            reason = refusal(next(iter(m.content.metric_records.values()), {}))
            if reason is not None:
                notes[id(m)] = {"refusal": reason}
                log(WARNING, "round %s: node %s refused to train (%s)", server_round, m.metadata.src_node_id, reason)
            else:
                offered.append(m)
        usable = []
        for v in validate_updates(offered, self.sent, self.cfg.federation.max_norm_ratio):
            if v.reason is None:
                usable.append(v.reply)
                notes[id(v.reply)] = {"update_norm": v.norm} if v.norm is not None else {}
            else:
                notes[id(v.reply)] = {"rejected": v.reason} | ({"update_norm": v.norm} if v.norm is not None else {})
                log(WARNING, "round %s: update from node %s rejected (%s)", server_round, v.reply.metadata.src_node_id, v.reason)
        return usable, notes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        # sent -> every reply in, as the server saw it (0 = not configured here: left out of the record)
        train_wall = time.monotonic() - self.began["train"] if "train" in self.began else 0
        # a fixed order (by site name) makes the floating-point sum independent of arrival order
        replies = sorted(replies, key=site_name)
        self.carried_evaluation(replies)
        self.arrived(replies)
        usable, notes = self.screen(server_round, replies)
        self._per_site(server_round, "train", replies, notes)
        counts = {"train_sites_refused": sum("refusal" in n for n in notes.values()),
                  "train_sites_rejected": sum("rejected" in n for n in notes.values()),
                  "train_wall_s": round(train_wall, 3), "bytes_down": self.bytes_down, "bytes_up": sum(
                      int(next(iter(m.content.metric_records.values())).get("bytes_sent", 0))
                      for m in replies if not m.has_error())}
        self.recorder.record_counts(server_round, counts)
        train = next(e for e in self.recorder.summary["rounds"] if e["round"] == server_round).get("train", {})
        self.recorder.record_privacy(server_round, train)
        robust = {"median": FedMedian.aggregate_train, "trimmed-mean": FedTrimmedAvg.aggregate_train}
        aggregate = robust.get(self.cfg.federation.robust, FedAvg.aggregate_train)  # Flower's own aggregation
        if len(usable) < self.quorum:  # keep the previous global student; the record says why
            log(WARNING, "round %s: %s usable replies, quorum is %s: not aggregated", server_round, len(usable), self.quorum)
            self.recorder.record_counts(server_round, {"quorum_not_met": 1})
            return None, None
        if self.central_dp is not None:
            arrays, metrics = self.release(server_round, usable)
        else:
            arrays, metrics = aggregate(self, server_round, usable)
        return self.commit(server_round, arrays), metrics

    def carried_evaluation(self, replies: list[Message]) -> None:
        """Record the previous round's evaluation that this round's train replies carried, then drop it
        from them (Flower's aggregation expects one ArrayRecord and one MetricRecord per reply). A site
        that failed the train message is a failed evaluation too; one that answered without the
        evaluation (it could not, or ignored the key) likewise."""
        if self.carried is None:
            return
        carried = [m for m in replies if not m.has_error() and EVAL_RECORD in m.content]
        self.asked["eval"] = max(len(replies), self.asked["train"])
        self._per_site(self.carried, "eval", carried, record=EVAL_RECORD)
        self.recorder.record_counts(self.carried, {"eval_with_train": 1})
        for m in carried:
            del m.content[EVAL_RECORD]
            if SCORES_RECORD in m.content:
                del m.content[SCORES_RECORD]
        self.carried = None

    def commit(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The round's aggregate becomes the global student: dtypes as sent, the server optimiser's step
        (if any), a checkpoint."""
        if arrays is None:
            return None
        if self.sent is not None:  # Flower averages int buffers into float64: restore dtypes
            like = self.sent.to_torch_state_dict()
            arrays = ArrayRecord({k: v.to(like[k].dtype) if k in like else v
                                  for k, v in arrays.to_torch_state_dict().items()})
        if self.server_opt is not None:  # the update is relative to the model the sites received
            arrays = ArrayRecord(self.server_opt.step(server_round, self.received(), arrays.to_torch_state_dict()))
        extra = {"central_dp": self.central_dp.state_dict()} if self.central_dp is not None else None
        self.recorder.checkpoint(server_round, arrays.to_torch_state_dict(), extra,
                                 self.server_opt.state_dict() if self.server_opt is not None else None)
        return arrays

    def aggregate_secure(self, server_round: int, sites: list[tuple[int, dict]],
                         mean_update: dict[str, torch.Tensor] | None) -> ArrayRecord | None:
        """A SecAgg+ round (server/secure_aggregation.py): the sites' own metrics, and the one thing the
        server could unmask, the example-weighted mean update. Refusals ride in the metrics, with weight 0."""
        server_round += self.offset
        train_wall = time.monotonic() - self.began["train"] if "train" in self.began else 0
        per_site = {}
        for node, metrics in sorted(sites, key=lambda s: str(s[1].get(SECURE_SITE_KEY, ""))):
            metrics = dict(metrics)
            name = str(metrics.pop(SECURE_SITE_KEY, f"node-{node}"))
            if (reason := refusal(metrics)) is not None:
                metrics["refusal"] = reason
                log(WARNING, "round %s: %s refused to train (%s)", server_round, name, reason)
            per_site[name] = metrics
        self.recorder.record(server_round, "train", per_site, failed=max(0, self.asked["train"] - len(sites)))
        contributed = sum("refusal" not in m for m in per_site.values())
        self.recorder.record_counts(server_round, {
            "train_sites_refused": len(per_site) - contributed, "train_wall_s": round(train_wall, 3),
            "bytes_down": self.bytes_down, "secure_aggregation": 1})
        self.recorder.record_privacy(server_round, per_site)
        if mean_update is None or contributed < self.quorum:
            log(WARNING, "round %s: %s sites contributed to the secure sum, quorum is %s: not aggregated",
                server_round, contributed if mean_update is not None else 0, self.quorum)
            self.recorder.record_counts(server_round, {"quorum_not_met": 1})
            return None
        base = self.received()
        if set(mean_update) != set(base) or not all(torch.isfinite(v).all() for v in mean_update.values()):
            log(WARNING, "round %s: the unmasked sum is not a finite update of the student: not aggregated", server_round)
            self.recorder.record_counts(server_round, {"secure_sum_rejected": 1})
            return None
        if self.central_dp is not None:  # client-fixed: every site clipped and weighed 1; noise on the mean
            out = self.central_dp.release_mean(server_round, base, mean_update, contributed)
            if out is None:
                log(WARNING, "round %s: central DP not released (%s sites contributed, noise calibrated for %s)",
                    server_round, contributed, self.central_dp.sites)
                self.recorder.record_counts(server_round, {"central_dp_not_released": 1})
                return None
            self.recorder.record_counts(server_round, out.facts)
            return self.commit(server_round, ArrayRecord(out.state))
        # integer buffers (BatchNorm's batch counters) are not summed: the global keeps its own
        new = {k: v + mean_update[k].to(v.dtype) if v.is_floating_point() else v for k, v in base.items()}
        return self.commit(server_round, ArrayRecord(new))

    def received(self) -> dict:
        """The global student as the sites received it (through the wire dtype and back)."""
        dtype = self.cfg.federation.transfer_dtype
        return decode(encode(self.sent.to_torch_state_dict(), dtype), dtype, self.sent.to_torch_state_dict())

    def release(self, server_round: int, usable: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Central DP: the noised uniform mean of clipped updates, relative to the model the sites received."""
        base = self.received()
        below = [next(iter(m.content.metric_records.values()), {}).get(KEY_BELOW_CLIP) for m in usable]
        out = self.central_dp.release(server_round, base, [m.content["arrays"].to_torch_state_dict() for m in usable], below)
        if out is None:
            log(WARNING, "round %s: central DP not released (%s usable updates, noise calibrated for %s, or an "
                "unclipped update / a missing clipping bit)", server_round, len(usable), self.central_dp.sites)
            self.recorder.record_counts(server_round, {"central_dp_not_released": 1})
            return None, None
        self.recorder.record_counts(server_round, out.facts)
        return ArrayRecord(out.state), mean_of_common_metrics([m.content for m in usable], self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        now = time.monotonic()
        if not self.evaluated_apart(server_round + self.offset):  # no evaluate messages this round: its wall time only
            if "train" in self.began:
                self.recorder.record_counts(server_round + self.offset,
                                            {"round_wall_s": round(now - self.began["train"], 3)})
            return None
        replies = self._per_site(server_round + self.offset, "eval", replies)
        walls = {"eval_wall_s": round(now - self.began["eval"], 3) if "eval" in self.began else 0}
        if server_round > 0 and "train" in self.began:  # configure_train -> every eval reply in (with aggregation)
            walls["round_wall_s"] = round(now - self.began["train"], 3)
        self.recorder.record_counts(server_round + self.offset, walls)
        return super().aggregate_evaluate(server_round, replies)

    def evaluate_pending(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Before this process's first round, the global student in hand - round 0's (the random-init
        student; the teacher's probes), or a resumed run's last checkpoint's - is evaluated now, unless
        that is on record already or the next train message carries it."""
        done = any(e["round"] == self.offset and "eval" in e for e in self.recorder.summary["rounds"])
        if done or not self.evaluated_apart(self.offset):
            return
        messages = self.configure_evaluate(0, arrays, ConfigRecord(), grid)
        self.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=timeout))
