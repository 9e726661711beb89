"""Shared fixtures: a tiny run config, a synthetic corpus, the public corpus (or a clear skip)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedus.config import RunConfig
from fedus.scenarios import corpus_root

# at most 2 intra-op threads, shared out among pytest-xdist's workers (oversubscribed threads cost, not help)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

# the longest files, first and (under pytest-xdist's loadfile) on different workers: see addopts in pyproject.toml
LONGEST_FIRST = ("test_simulation.py", "test_deployment.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


TINY = [
    "teacher.arch=vit_tiny_patch16_224", "student.arch=resnet10t", "student.head-hidden=128",
    "data.image-size=32", "train.batch-size=16", "train.local-steps=4", "eval.seg-probe-steps=20",
]


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core box: a second intra-op thread costs far more than it gives (~7x here).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> Path:
    from fedus.data.synthetic import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path_factory.mktemp("synth"), n_centres=2, images_per_centre=40, size=32, seed=0)


@pytest.fixture
def tiny_cfg(synthetic_manifest) -> RunConfig:
    return RunConfig().with_overrides(TINY + [f"data.manifest={str(synthetic_manifest)!r}".replace("'", '"')])


@pytest.fixture(scope="session")
def corpus() -> Path:
    root = corpus_root()
    if not (root / "all_manifest.csv").is_file():
        pytest.skip(f"public ultrasound corpus not found at {root} (set FEDUS_CORPUS to the folder holding all_manifest.csv)")
    return root


@pytest.fixture
def task_identity():
    """Flower Messages need a task identity outside a runtime (see shared/notes/flower.md)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    yield


@pytest.fixture
def fedus_cli(monkeypatch, capsys):
    """`fedus ARGS...` in this process, through the CLI's own entry point (errors -> exit 2, one line):
    returns (exit code, stdout, stderr). For user-mistake checks that would otherwise pay a process start
    (imports) each; commands that start Flower still run as real subprocesses in their tests."""
    import signal
    import sys

    from fedus.cli import main

    def run(*args, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["fedus", *map(str, args)])
        handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            signal.signal(signal.SIGTERM, handler)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
