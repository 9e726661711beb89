"""A site: its data, its frozen teacher, and the two things it does per round.

This is the Flower-free core of a ClientApp: `train` (site step) and `evaluate`
(held-out agreement + probes). Everything it returns is a weight tensor or a
scalar; no pixels, paths or per-image values.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import torch

from fedus.config import RunConfig
from fedus.data.sites import SiteData, load_site
from fedus.distill.site_step import site_step
from fedus.evaluation.site_eval import probe_scores, teacher_agreement
from fedus.models import Student, Teacher, create_student, create_teacher


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def derived_seed(*parts: object) -> int:
    """Stable seed from (run seed, round, site...): reproducible and different per site and round."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def teacher_spec(cfg: RunConfig) -> tuple[int, tuple[int, int]]:
    """Token width and grid of the teacher, which shape the student's head."""
    t = create_teacher(cfg.teacher.model_copy(update={"weights": ""}), cfg.data.image_size)
    return t.dim, t.grid


def initial_student(cfg: RunConfig, teacher: Teacher | None = None) -> Student:
    dim, grid = (teacher.dim, teacher.grid) if teacher is not None else teacher_spec(cfg)
    return create_student(cfg.student, dim, grid, cfg.data.image_size, cfg.seed)


class Site:
    def __init__(self, cfg: RunConfig, site: str | int, manifest: Path | None = None, own_manifest: bool = False):
        """`site`: partition index or name in a shared manifest, or with `own_manifest` the
        name of a site whose manifest holds only its own images (deployment)."""
        self.cfg = cfg
        self.key = site
        self.manifest = manifest
        self.own_manifest = own_manifest
        self.device = pick_device()

    @cached_property
    def data(self) -> SiteData:
        return load_site(self.cfg.data, self.cfg.seed, self.key, self.manifest, self.own_manifest)

    @property
    def teacher(self) -> Teacher:
        return shared_teacher(self.cfg)

    @property
    def name(self) -> str:
        return self.data.name

    def student(self, state: dict[str, torch.Tensor] | None = None) -> Student:
        student = initial_student(self.cfg, self.teacher)
        if state is not None:
            student.load_state_dict(state)
        return student

    def describe(self) -> dict:
        """Aggregate facts about the site's data (counts only)."""
        d = self.data
        return {"n_train": len(d.train), "n_test": len(d.test), "classes": d.classes,
                "has_masks": d.has_masks, "skipped": (d.train.report.skipped or {})}

    def train(self, state: dict[str, torch.Tensor], server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        ref_n = min(len(self.data.train), self.cfg.train.batch_size)
        reference = self.data.train.images[:ref_n].float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
        result = site_step(
            self.student(state), self.teacher, self.data.train_augmented() if self.cfg.train.augment else self.data.train,
            reference, self.cfg.train, derived_seed(self.cfg.seed, server_round, self.name), self.device,
        )
        return result.state, result.metrics

    def evaluate(self, state: dict[str, torch.Tensor], server_round: int) -> dict[str, float]:
        """Agreement every round; probes at the configured rounds (teacher's at round 0 only)."""
        ecfg = self.cfg.eval
        student = self.student(state).to(self.device).eval()
        metrics = teacher_agreement(student, self.teacher, self.data, ecfg.batch_size, self.device, self.cfg.train.precision)
        metrics["num-examples"] = len(self.data.test)
        if self.cfg.probe_at(server_round):
            seed = derived_seed(self.cfg.seed, "probe", self.name)
            metrics.update(probe_scores(student.encode, self.data, ecfg.batch_size, ecfg.seg_probe_steps, seed, self.device))
            if server_round == 0:
                teacher = self.teacher.to(self.device)
                t = probe_scores(teacher.feature_map, self.data, ecfg.batch_size, ecfg.seg_probe_steps, seed, self.device)
                metrics.update({f"teacher_{k}": v for k, v in t.items()})
        return metrics


# A simulation worker process serves several sites in turn: keep their decoded
# images (small) and one copy of the frozen teacher (large, shared by all sites).
_SITES: OrderedDict[str, Site] = OrderedDict()
_TEACHERS: OrderedDict[str, Teacher] = OrderedDict()
MAX_CACHED_SITES = 8


def _key(*parts: object) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def shared_teacher(cfg: RunConfig) -> Teacher:
    key = _key(cfg.teacher.model_dump(), cfg.data.image_size)
    if key not in _TEACHERS:
        _TEACHERS.clear()
        _TEACHERS[key] = create_teacher(cfg.teacher, cfg.data.image_size)
    return _TEACHERS[key]


def get_site(cfg: RunConfig, site: str | int, manifest: Path | None = None, own_manifest: bool = False) -> Site:
    """One Site per (config, site) per process, so nothing is decoded or built twice."""
    key = _key(cfg.to_dict(), site, manifest, own_manifest)
    if key not in _SITES:
        _SITES[key] = Site(cfg, site, manifest, own_manifest)
        while len(_SITES) > MAX_CACHED_SITES:
            _SITES.popitem(last=False)
    _SITES.move_to_end(key)
    return _SITES[key]
