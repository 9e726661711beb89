"""Cross-site matrix: every model the run produced, scored on every site's held-out split.

Rows are models (the federated student, each site's local student, the central
student), columns are sites. A local student's own column against the others
says how far one hospital's data carries; the federated row should be good
everywhere. Cells are the cheap frozen-feature metrics, so the matrix costs
(models x sites) feature passes and no decoder fits:
- cos: token cosine to the teacher on the site's held-out images (every site);
- knn_acc: kNN accuracy of pooled features (sites with class labels);
- cls_balanced_acc: linear head on all train labels, one seed (sites with class labels).
"""

from __future__ import annotations

import numpy as np
import torch

from fedus.evaluation.knn import knn_accuracy
from fedus.evaluation.protocol import Features, extract, linear_head, stage_fn
from fedus.evaluation.site_eval import teacher_agreements

__all__ = ["MATRIX_METRICS", "site_cells", "matrix_rows"]

MATRIX_METRICS = ("cos", "knn_acc", "cls_balanced_acc")


def site_cells(site, models: dict[str, dict[str, torch.Tensor]], knn_k: int, batch_size: int, seed: int,
               precision: str = "auto", known: dict[str, dict[str, Features]] | None = None) -> list[dict]:
    """[{model, site, metric, value}] for each named student state on one `fedus.site.Site`.
    `known`: pooled {"train", "test"} features the protocol already extracted, by model name."""
    cells = []
    students = {name: site.student(state) for name, state in models.items()}
    agreement = teacher_agreements(students, site.teacher, site.data, batch_size, site.device, precision)
    for name, student in students.items():
        scores = {"cos": agreement[name]["cos"]}
        if name in (known or {}):
            train, test = known[name]["train"], known[name]["test"]
        else:
            fn = stage_fn(student, 1)
            train = extract(fn, site.data.train, batch_size, site.device)
            test = extract(fn, site.data.test, batch_size, site.device)
        tr, te = np.flatnonzero(train.labels >= 0), np.flatnonzero(test.labels >= 0)
        if len(tr) and len(te):
            knn = knn_accuracy(train.pooled[tr], train.labels[tr], test.pooled[te], test.labels[te], knn_k)
            if knn is not None:
                scores["knn_acc"] = knn
            head = linear_head(train.pooled[tr], train.labels[tr], test.pooled[te], test.labels[te], seed)
            if "balanced_acc" in head:
                scores["cls_balanced_acc"] = head["balanced_acc"]
        cells += [{"model": name, "site": site.name, "metric": k, "value": float(v)} for k, v in scores.items()]
    return cells


def matrix_rows(cells: list[dict], metric: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(models, sites, values[model][site]) for one metric, None where a site cannot score it."""
    models = list(dict.fromkeys(c["model"] for c in cells))
    sites = list(dict.fromkeys(c["site"] for c in cells))
    at = {(c["model"], c["site"]): c["value"] for c in cells if c["metric"] == metric}
    return models, sites, [[at.get((m, s)) for s in sites] for m in models]
