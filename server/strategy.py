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
from flwr.serverapp.strategy import FedAvg

from fedus.config import RunConfig
from fedus.runs import RunRecorder

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


class FedusFedAvg(FedAvg):
    def __init__(self, cfg: RunConfig, recorder: RunRecorder, **kwargs):
        super().__init__(train_metrics_aggr_fn=mean_of_common_metrics,
                         evaluate_metrics_aggr_fn=mean_of_common_metrics, **kwargs)
        self.cfg = cfg
        self.recorder = recorder

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # Flower passes the same ConfigRecord every round: copy before adding to it.
        return super().configure_train(server_round, arrays, ConfigRecord(dict(config)), grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super().configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid)

    def _per_site(self, server_round: int, kind: str, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        per_site, sites = {}, {}
        for m in ok:
            info = dict(m.content[SITE_RECORD]) if SITE_RECORD in m.content else {}
            name = str(info.pop("name", f"node-{m.metadata.src_node_id}"))
            per_site[name] = dict(next(iter(m.content.metric_records.values())))
            if SCORES_RECORD in m.content:
                per_site[name].update(dict(m.content[SCORES_RECORD]))
            sites[name] = info
        for m in replies:
            if m.has_error():
                log(WARNING, "round %s %s: node %s failed: %s", server_round, kind, m.metadata.src_node_id, m.error.reason)
        self.recorder.record_sites(sites)
        self.recorder.record(server_round, kind, per_site, failed=len(replies) - len(ok))
        return replies

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = self._per_site(server_round, "train", replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.recorder.checkpoint(server_round, arrays.to_torch_state_dict())
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = self._per_site(server_round, "eval", replies)
        return super().aggregate_evaluate(server_round, replies)

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Round 0 at every site: the random-init student's scores and the teacher's probes."""
        messages = self.configure_evaluate(0, arrays, ConfigRecord(), grid)
        self.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=timeout))
