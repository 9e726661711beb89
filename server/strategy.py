"""FedAvg (example-weighted, Flower's Message-API strategy) that also keeps fedus's run record.

Aggregation itself is Flower's: this subclass only records each site's reply
(per-site metrics, failures) and checkpoints the global student every round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from fedus.config import RunConfig
from fedus.privacy.accounting import REFUSALS
from fedus.runs import RunRecorder
from fedus.transfer import TRANSFER_KEY, decode, encode, nbytes
from server.validation import validate_updates

SITE_RECORD = "site"
SCORES_RECORD = "site-scores"


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

    def on_the_wire(self, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """The global student as sent (`federation.transfer-dtype`), and a copy of the config saying so."""
        dtype = self.cfg.federation.transfer_dtype
        return ArrayRecord(encode(arrays.to_torch_state_dict(), dtype)), ConfigRecord(dict(config) | {TRANSFER_KEY: dtype})

    def arrived(self, replies: list[Message]) -> None:
        """Replies' students back to fp32 in place, so validation and the aggregate are fp32."""
        like = self.sent.to_torch_state_dict() if self.sent is not None else None
        for m in replies:
            if not m.has_error() and "arrays" in m.content:
                m.content["arrays"] = ArrayRecord(decode(m.content["arrays"].to_torch_state_dict(),
                                                         self.cfg.federation.transfer_dtype, like))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if server_round > 1 or self.offset:  # all min-sites started the run; later rounds go on at quorum
            self.min_available_nodes = self.min_train_nodes = self.min_evaluate_nodes = self.quorum
        self.sent = arrays  # updates are validated against what was sent
        # Flower passes the same ConfigRecord every round: on_the_wire copies before adding to it.
        wire, config = self.on_the_wire(arrays, config)
        messages = list(super().configure_train(server_round + self.offset, wire, config, grid))
        self.asked["train"] = len(messages)
        self.bytes_down = nbytes(wire.to_torch_state_dict()) * len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_evaluate(server_round + self.offset, *self.on_the_wire(arrays, config), grid))
        self.asked["eval"] = len(messages)
        return messages

    def _per_site(self, server_round: int, kind: str, replies: Iterable[Message],
                  notes: dict[int, dict] | None = None) -> list[Message]:
        """`notes`: extra per-site fields (refusal, rejection) keyed by id() of the reply."""
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        per_site, sites = {}, {}
        for m in ok:
            info = dict(m.content[SITE_RECORD]) if SITE_RECORD in m.content else {}
            name = str(info.pop("name", f"node-{m.metadata.src_node_id}"))
            per_site[name] = dict(next(iter(m.content.metric_records.values())))
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
            metrics = next(iter(m.content.metric_records.values()), {})
            if int(metrics.get("refused", 0)):
                reason = REFUSALS.get(int(metrics.get("refusal_code", 0)), "unknown")
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
        # a fixed order (by site name) makes the floating-point sum independent of arrival order
        replies = sorted(replies, key=site_name)
        self.arrived(replies)
        usable, notes = self.screen(server_round, replies)
        self._per_site(server_round, "train", replies, notes)
        counts = {"train_sites_refused": sum("refusal" in n for n in notes.values()),
                  "train_sites_rejected": sum("rejected" in n for n in notes.values()),
                  "bytes_down": self.bytes_down, "bytes_up": sum(
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
        arrays, metrics = aggregate(self, server_round, usable)
        if arrays is not None and self.sent is not None:  # Flower averages int buffers into float64: restore dtypes
            like = self.sent.to_torch_state_dict()
            arrays = ArrayRecord({k: v.to(like[k].dtype) if k in like else v
                                  for k, v in arrays.to_torch_state_dict().items()})
        if arrays is not None:
            self.recorder.checkpoint(server_round, arrays.to_torch_state_dict())
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = self._per_site(server_round + self.offset, "eval", replies)
        return super().aggregate_evaluate(server_round, replies)

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Round 0 at every site: the random-init student's scores and the teacher's probes."""
        messages = self.configure_evaluate(-self.offset, arrays, ConfigRecord(), grid)
        self.aggregate_evaluate(-self.offset, grid.send_and_receive(messages, timeout=timeout))
