"""Run a scenario on Flower's simulation runtime (`flwr run`), owning every process it starts.

fedus starts its own SuperLink in simulation mode on a free loopback port, with
a private FLWR_HOME and runtime dependency installation disabled, submits the
app with `flwr run`, streams progress, and kills the SuperLink's process group
by PID at the end, whatever happened. Ray (Flower's only simulation backend)
schedules the sites; fedus never schedules anything itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import tomli_w

from fedus.config import ConfigError, RunConfig
from fedus.progress import progress_bar

APP_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_DEDUP_LOGS="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(APP_ROOT), env.get("PYTHONPATH", "")])),
               # Flower spawns flower-superexec / flwr-serverapp by name: the venv must be on PATH
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


class SimulationError(RuntimeError):
    """The Flower run failed; the message names the log to read."""


def kill_flower_home(flwr_home: Path) -> list[int]:
    """Kill processes Flower detached into their own sessions (SuperExec, ServerApp) for this run.

    They are found by the private FLWR_HOME in their environment, so nothing
    belonging to another run or user is touched.
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    killed = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        pid = int(pid_dir.name)
        if pid == os.getpid():
            continue
        try:
            if marker in (pid_dir / "environ").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, PermissionError):
            continue
    return killed


def _bin(name: str) -> str:
    """Flower's executables next to this interpreter (a venv need not be activated)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the whole process group (SuperLink + its SuperExec, ServerApp, Ray), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def local_superlink(run_dir: Path, env: dict[str, str], startup_timeout: float = 60.0):
    """A simulation-mode SuperLink owned by this process; yields its address."""
    port = free_port()
    log = open(run_dir / "superlink.log", "ab")
    proc = subprocess.Popen(
        [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(run_dir / "superlink.db")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    (run_dir / "superlink.pid").write_text(str(proc.pid))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise SimulationError(f"SuperLink exited with {proc.returncode}; see {run_dir / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SimulationError(f"SuperLink not ready after {startup_timeout:.0f}s")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        kill_group(proc)
        kill_flower_home(Path(env["FLWR_HOME"]))
        log.close()


ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def simulate(cfg: RunConfig, num_sites: int, run_dir: Path, timeout: float = 3600.0) -> None:
    """Run `cfg` with one SuperNode per site (1 CPU each); the run record lands in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    flwr_home = run_dir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    env = flower_env(flwr_home)
    (run_dir / "run-config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    with local_superlink(run_dir, env) as address:
        (flwr_home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": "fedus-sim", "fedus-sim": {"address": address, "insecure": True}}}))
        federation = f"num-supernodes={num_sites} client-resources-num-cpus=1"
        cmd = [_bin("flwr"), "run", str(APP_ROOT), "fedus-sim", "--stream",
               "--federation-config", federation, "--run-config", str(run_dir / "run-config.toml")]
        _stream(cmd, env, run_dir / "flwr-run.log", cfg.rounds, timeout)
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise SimulationError(f"the simulation wrote no summary; see {run_dir / 'flwr-run.log'}")
    status = json.loads(summary.read_text()).get("status")
    if status != "completed":  # `flwr run --stream` exits 0 even when the ServerApp raised
        raise SimulationError(f"the run ended '{status}'; see {run_dir / 'flwr-run.log'}")


def _stream(cmd: list[str], env: dict[str, str], log_path: Path, rounds: int, timeout: float) -> None:
    start = time.monotonic()
    with open(log_path, "w") as log, progress_bar(f"federated rounds ({rounds})", total=rounds) as bar:
        proc = subprocess.Popen(cmd, env=env, cwd=APP_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            done = 0
            for line in proc.stdout:
                log.write(line)
                log.flush()
                m = ROUND.search(line)
                if m and int(m.group(1)) - 1 > done:
                    bar.advance(int(m.group(1)) - 1 - done)
                    done = int(m.group(1)) - 1
                if time.monotonic() - start > timeout:
                    raise SimulationError(f"simulation exceeded {timeout:.0f}s")
            proc.wait()
            bar.advance(rounds - done)
        finally:
            kill_group(proc)
    if proc.returncode != 0:
        raise SimulationError(f"flwr run exited with {proc.returncode}; see {log_path}")
