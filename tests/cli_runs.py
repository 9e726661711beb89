"""Running the `fedus` CLI as a user does, in a subprocess with a private cache and corpus setting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fedus.processes import flower_home_pids

FEDUS = [sys.executable, "-m", "fedus"]


def cli_env(tmp_path: Path, corpus: str | None) -> dict[str, str]:
    # no OMP_NUM_THREADS: the CLI's own work (teacher fit, offline evaluation) uses the cores as a user's
    # would, and Ray gives each ClientApp actor one thread (its CPU share) by itself
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"FEDUS_CACHE": str(tmp_path / "cache")}
    env["FEDUS_CORPUS"] = corpus or str(tmp_path / "no-corpus-here")
    return env


def alive_for(run_dir: Path) -> list[int]:
    return flower_home_pids(run_dir / "flwr-home")


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(FEDUS + args, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start

