"""A site: its data, its frozen teacher, and the two things it does per round.

This is the Flower-free core of a ClientApp: `train` (site step) and `evaluate`
(held-out agreement + probes). Everything it returns is a weight tensor or a
scalar; no pixels, paths or per-image values.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset

from fedus.config import CoresetConfig, RunConfig
from fedus.coreset import SiteScores, score_site
from fedus.data.sites import SiteData, load_site
from fedus.distill.clock import RoundClock
from fedus.distill.losses import attach_distill_modules, required_views
from fedus.distill.site_step import site_step
from fedus.distill.fast_path import eager, loader_workers
from fedus.distill.target_cache import CachedViews, TargetCache, site_target_cache
from fedus.evaluation.site_eval import probe_scores, teacher_agreement
from fedus.models import Student, Teacher, create_student, create_teacher
from fedus.privacy import BUDGET_EXHAUSTED, NO_BUDGET, DPPlan, PrivacyLedger, noise_for_round
from fedus.privacy.ledger import simulation_ledger_path


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
    """The round-0 student, with the chosen losses' trainable modules (`student.distill`) attached."""
    teacher = teacher if teacher is not None else create_teacher(cfg.teacher.model_copy(update={"weights": ""}), cfg.data.image_size)
    student = create_student(cfg.student, teacher.dim, teacher.grid, cfg.data.image_size, cfg.seed, dp_compatible=cfg.privacy.enabled)
    return attach_distill_modules(student, teacher, cfg.distill, cfg.data.image_size, cfg.seed)


class Site:
    def __init__(self, cfg: RunConfig, site: str | int, manifest: Path | None = None, own_manifest: bool = False):
        """`site`: partition index or name in a shared manifest, or with `own_manifest` the
        name of a site whose manifest holds only its own images (deployment)."""
        self.cfg = cfg
        self.key = site
        self.manifest = manifest
        self.own_manifest = own_manifest
        self.device = pick_device()

    @classmethod
    def of(cls, cfg: RunConfig, data: SiteData, manifest: Path | None = None) -> "Site":
        """A site over rows already split (a pooled "central" site, or a site reused under another config)."""
        site = cls(cfg, data.name, manifest)
        site.__dict__["data"] = data  # fills the cached property
        return site

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

    @cached_property
    def targets(self) -> tuple[TargetCache, CachedViews]:
        """The site's teacher-target cache and its K seeded views per image (`train.target-views` > 0)."""
        return site_target_cache(self.cfg, self.name, self.data.train.images, self.teacher,
                                 loader_workers(self.cfg.train, self.device))

    def describe(self) -> dict:
        """Aggregate facts about the site's data (counts only)."""
        from fedus.intake.card import card_of_rows

        d = self.data
        return {"n_train": len(d.train), "n_test": len(d.test), "classes": d.classes,
                "has_masks": d.has_masks, "skipped": (d.train.report.skipped or {}),
                "data_card": card_of_rows(pd.concat([d.train_rows, d.test_rows]))}

    def coreset_scores(self, state: dict[str, torch.Tensor], server_round: int,
                       coreset: CoresetConfig | None = None) -> SiteScores:
        """Coreset scores of the training images with the global student of `server_round` (fedus.coreset),
        by the run's own loss mix at the round's start on the global clock. `coreset`: other coreset
        settings than the run's (a benchmark comparing two rankings of the same images)."""
        t = self.cfg.train
        with eager():  # a teacher compiled by an earlier site step here would recompile per batch size
            return score_site(self.student(state), self.teacher, self.data.train.images,
                              coreset or self.cfg.coreset, t.lr, t.weight_decay, t.batch_size,
                              derived_seed(self.cfg.seed, "coreset", server_round, self.name),
                              self.device, t.precision, self.cfg.distill,
                              RoundClock(server_round, self.cfg.rounds).progress(0, 1))

    def train(self, state: dict[str, torch.Tensor], server_round: int, rounds: int | None = None,
              ledger: PrivacyLedger | None = None, epsilon_budget: float | None = None,
              subset: np.ndarray | None = None) -> tuple[dict[str, torch.Tensor] | None, dict[str, float]]:
        """`rounds`: the run's total as the server sent it (default: this config's), for the global clock.
        `subset`: indices of the training images to train on (a coreset selection); default all.

        With `privacy.enabled`: DP-SGD, charged to the site's ledger (default: the simulation
        ledger under the run dir) against `epsilon_budget` (default: the run config's). A round
        that would exceed the budget is refused: no training, state None, `refused` = 1.

        `train_seconds`: all of this call (data decode, teacher/student build, losses, steps), so the
        server can tell the site's own work from Flower's share of the round (bench/round_overhead.py)."""
        began = time.perf_counter()
        plan = None
        if self.cfg.privacy.enabled:
            ledger = ledger or PrivacyLedger(simulation_ledger_path(self.cfg, self.name), self.cfg.privacy.accountant)
            budget = self.cfg.privacy.epsilon_budget if epsilon_budget is None and not self.own_manifest else epsilon_budget
            plan, refusal = self.privacy_plan(ledger, budget)
            if refusal:
                return None, refusal
        ref_n = min(len(self.data.train), self.cfg.train.batch_size)
        reference = self.data.train.images[:ref_n].float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
        views = required_views(self.cfg.distill)
        train_set = (self.data.train_augmented(self.cfg.data.augment_policy, views) if self.cfg.train.augment
                     else self.data.train)
        cache = None
        if self.cfg.train.target_views:
            cache, train_set = self.targets
        if subset is not None:
            train_set = Subset(train_set, [int(i) for i in subset])
        result = site_step(
            self.student(state), self.teacher, train_set,
            reference, self.cfg.train, derived_seed(self.cfg.seed, server_round, self.name), self.device,
            distill=self.cfg.distill, clock=RoundClock(server_round, rounds or self.cfg.rounds), privacy=plan,
            targets=cache,
        )
        if plan is not None:
            metrics = self.charge(ledger, plan, result.metrics, server_round, budget)
        else:
            metrics = result.metrics
        return result.state, metrics | {"train_seconds": time.perf_counter() - began}

    @property
    def delta(self) -> float:
        return self.cfg.privacy.delta or 1.0 / (10 * max(len(self.data.train), 1))

    def privacy_plan(self, ledger: PrivacyLedger, budget: float | None) -> tuple[DPPlan, dict[str, float] | None]:
        """This round's DP-SGD plan, and the refusal metrics if the site's budget does not allow it."""
        p, steps = self.cfg.privacy, self.cfg.train.local_steps
        plan = DPPlan.for_site(len(self.data.train), self.cfg.train.batch_size, p.noise_multiplier, p.max_grad_norm,
                               p.clipping)
        if p.noise_multiplier == 0:
            plan = plan.with_noise(noise_for_round(p.target_epsilon, self.delta, plan.sample_rate, steps, p.accountant))
        spent = ledger.epsilon(self.delta)
        projected = ledger.epsilon(self.delta, [(plan.noise_multiplier, plan.sample_rate, steps)])
        code = NO_BUDGET if budget is None else BUDGET_EXHAUSTED if projected > budget else 0
        if not code:
            return plan, None
        return plan, {"refused": 1, "refusal_code": code, "num-examples": 0, "epsilon_total": spent,
                      "epsilon_projected": projected, "epsilon_budget": float(budget or 0.0), "delta": self.delta}

    def charge(self, ledger: PrivacyLedger, plan: DPPlan, metrics: dict[str, float], server_round: int,
               budget: float) -> dict[str, float]:
        """Record the round in the ledger (atomically) and keep only metrics DP covers."""
        before = ledger.epsilon(self.delta)
        total = ledger.record((plan.noise_multiplier, plan.sample_rate, int(metrics["dp_steps"])), self.delta,
                              round=server_round)
        # Losses on training images are exact statistics of private data, outside the DP guarantee: kept home.
        private = {k for k in metrics if k.startswith("train_") or k in ("loss_before", "loss_after")}
        return {k: v for k, v in metrics.items() if k not in private} | {
            "refused": 0, "epsilon_round": total - before, "epsilon_total": total, "epsilon_budget": budget,
            "delta": self.delta}

    def evaluate(self, state: dict[str, torch.Tensor], server_round: int) -> dict[str, float]:
        """Agreement every round; probes at the configured rounds (teacher's at round 0 only); with
        eval.protocol-at = last, the full protocol (teacher / student / random init) in the last round."""
        with eager():  # a teacher compiled by an earlier site step in this process: no recompiles per batch size
            ecfg = self.cfg.eval
            began = time.perf_counter()
            student = self.student(state).to(self.device).eval()
            metrics = teacher_agreement(student, self.teacher, self.data, ecfg.batch_size, self.device,
                                        self.cfg.train.precision)
            metrics["num-examples"] = len(self.data.test)
            if self.cfg.probe_at(server_round):
                seed = derived_seed(self.cfg.seed, "probe", self.name)
                metrics.update(probe_scores(student, self.data, ecfg, seed, self.device))
                if server_round == 0:
                    t = probe_scores(self.teacher, self.data, ecfg, seed, self.device)
                    metrics.update({f"teacher_{k}": v for k, v in t.items()})
            if ecfg.protocol_at == "last" and server_round == self.cfg.rounds:  # slow: fractions x seeds x 3 models
                from fedus.evaluation.protocol import evaluate_models, to_metrics

                metrics.update(to_metrics(evaluate_models(self.cfg, self, state)["summary"]))
            metrics["eval_seconds"] = time.perf_counter() - began  # the site's own work (cf. train_seconds)
            return metrics


# A simulation worker process serves several sites in turn: keep their decoded
# images (small) and one copy of the frozen teacher (large, shared by all sites).
_SITES: OrderedDict[str, Site] = OrderedDict()
_TEACHERS: OrderedDict[str, Teacher] = OrderedDict()
MAX_CACHED_SITES = 8


def _key(*parts: object) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def shared_teacher(cfg: RunConfig) -> Teacher:
    key = _key(cfg.teacher.model_dump(), cfg.data.image_size, cfg.seed)
    if key not in _TEACHERS:
        _TEACHERS.clear()
        _TEACHERS[key] = create_teacher(cfg.teacher, cfg.data.image_size, seed=derived_seed(cfg.seed, "teacher"))
        print(f"fedus: teacher built ({cfg.teacher.arch}, process {os.getpid()})", flush=True)
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
