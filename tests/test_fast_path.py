"""The site step's fast path: on where it helps, off where it does not, and never the reason a round fails."""

import pytest
import torch

from fedus.config import TrainConfig
from fedus.distill import fast_path as fp
from fedus.models import create_student, create_teacher
from fedus.config import StudentConfig, TeacherConfig
from fedus.site import Site


def _student(arch: str):
    teacher = create_teacher(TeacherConfig(arch="vit_tiny_patch16_224", blocks="1"), 32)
    return create_student(StudentConfig(arch=arch, head_hidden=32), teacher.dim, teacher.grid, 32, seed=0)


def test_auto_is_the_fast_path_on_cuda_and_plain_eager_on_cpu():
    cfg, cnn, vit = TrainConfig(), _student("resnet10t"), _student("vit_tiny_patch16_224")
    cpu = fp.fast_path(cfg, torch.device("cpu"), cnn)
    assert (cpu.compile, cpu.channels_last, cpu.num_workers, cpu.pin_memory) == (False, False, 0, False)
    gpu = fp.fast_path(cfg, torch.device("cuda"), cnn)  # resolution only: nothing runs on the device
    assert gpu.compile and gpu.channels_last and gpu.pin_memory and 0 <= gpu.num_workers <= fp.MAX_AUTO_WORKERS
    assert not fp.fast_path(cfg, torch.device("cuda"), vit).channels_last  # only a patch-embedding convolution
    forced = fp.fast_path(TrainConfig(compile="on", channels_last=True, num_workers=3), torch.device("cpu"), vit)
    assert (forced.compile, forced.channels_last, forced.num_workers) == (True, True, 3)


def test_auto_loader_workers_keep_to_the_process_share_of_cpus(monkeypatch):
    """A Ray actor with num-cpus = 3 (Ray sets OMP_NUM_THREADS to it) gets 2 workers, not one per core
    of the machine; a process with one CPU loads in-process."""
    gpu, cfg = torch.device("cuda"), TrainConfig()
    monkeypatch.setattr(fp.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert fp.loader_workers(cfg, gpu) == fp.MAX_AUTO_WORKERS
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert fp.loader_workers(cfg, gpu) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert fp.loader_workers(cfg, gpu) == 0 and fp.loader_workers(cfg, torch.device("cpu")) == 0
    monkeypatch.setattr(fp.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # a share larger than the mask: the mask
    assert fp.loader_workers(cfg, gpu) == 1


def _train(tiny_cfg, *extra):
    site = Site(tiny_cfg.with_overrides(["train.local-steps=3", "train.mixup=false", *extra]), 0)
    return site.train(site.student().state_dict(), 1)


def test_a_compiled_site_step_keeps_the_weight_names_and_matches_eager(tiny_cfg, monkeypatch):
    monkeypatch.setattr(fp, "BACKEND", "aot_eager")  # dynamo + autograd tracing, no code generation (fast on CI)
    eager_state, _ = _train(tiny_cfg, 'train.compile="off"')
    compiled_state, m = _train(tiny_cfg, 'train.compile="on"')
    assert list(compiled_state) == list(eager_state)  # no `_orig_mod.` prefixes reach the federation
    for k, v in eager_state.items():
        torch.testing.assert_close(compiled_state[k], v, rtol=1e-4, atol=1e-5)
    assert m["loss_after"] < m["loss_before"]


def test_after_a_compiled_step_evaluation_and_scoring_run_eagerly(tiny_cfg, monkeypatch):
    """The live teacher stays compiled on the site (a process serves several rounds in simulation);
    evaluation and coreset scoring, at their own batch sizes, must not trace or compile anything."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fp, "BACKEND", "aot_eager")
    site = Site(tiny_cfg.with_overrides(["train.local-steps=2", "train.mixup=false", 'train.compile="on"',
                                         "eval.batch-size=5", 'eval.probe-rounds=""', "coreset.warmup-steps=1"]), 0)
    state, _ = site.train(site.student().state_dict(), 1)
    assert getattr(site.teacher, "_compiled_call_impl", None) is not None  # compiled by the step
    frames = sum(counters["frames"].values())
    site.evaluate(state, 1)
    site.coreset_scores(state, 2)
    assert sum(counters["frames"].values()) == frames


def test_a_failing_compile_falls_back_to_eager_with_a_warning(tiny_cfg, monkeypatch):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this site")

    torch._dynamo.reset()
    monkeypatch.setattr(fp, "BACKEND", broken_backend)
    eager_state, _ = _train(tiny_cfg, 'train.compile="off"')
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*continuing eagerly"):
        state, m = _train(tiny_cfg, 'train.compile="on"')
    for k, v in eager_state.items():
        torch.testing.assert_close(state[k], v)  # the failed attempt left no trace in the step
    assert m["steps"] == 3
