"""Flower's processes, started and stopped by fedus: one place for ports, environments and kills.

fedus never schedules work itself; it starts Flower's own executables
(`flower-superlink`, `flower-supernode`, `flwr`) with a private FLWR_HOME and
runtime dependency installation disabled, and kills everything it started by
PID when it is done, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fedus.progress import progress_bar

APP_ROOT = Path(__file__).resolve().parent.parent


def flower_app() -> Path:
    """The folder `flwr run` builds the fedus FAB from: the source tree, whose pyproject.toml names the apps.

    A wheel install (`pip install .`) puts fedus in site-packages without it; an editable install keeps it."""
    if not (APP_ROOT / "pyproject.toml").is_file() or not (APP_ROOT / "server" / "app.py").is_file():
        from fedus.config import ConfigError

        raise ConfigError(f"fedus starts its Flower apps from its source tree, and {APP_ROOT} is not one (no "
                          "pyproject.toml and server/app.py): install fedus from a checkout with `pip install -e "
                          "<checkout>`, as deploy/Dockerfile does")
    return APP_ROOT


class FlowerProcessError(RuntimeError):
    """A Flower process failed or never became ready; the message names the log to read."""


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
    # Flower's executors look for a new ServerApp / ClientApp task once a second by default: every
    # message waits half of that on average before its process even starts (overridable)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    return env


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0.0 elsewhere). In a deployed site Flower starts a
    fresh ClientApp process per message, so at the handler's entry this is that message's start-up cost."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def flower_bin(name: str) -> str:
    """Flower's executables next to this interpreter (a venv need not be activated)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_home_pids(flwr_home: Path) -> list[int]:
    """Processes started for this FLWR_HOME (found by their environment), wherever Flower detached them."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if int(pid_dir.name) != os.getpid() and marker in (pid_dir / "environ").read_bytes().split(b"\0"):
                pids.append(int(pid_dir.name))
        except (OSError, PermissionError):
            continue
    return pids


def kill_flower_home(flwr_home: Path) -> list[int]:
    """Kill processes Flower detached into their own sessions (SuperExec, ServerApp) for this run;
    nothing belonging to another run or user is touched."""
    killed = []
    for pid in flower_home_pids(flwr_home):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            continue
    return killed


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the whole process group (Flower process + its SuperExec, apps, Ray), then SIGKILL."""
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


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A Flower process in its own session (so its children can be killed as a group), logging to a file."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def wait_healthy(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 60.0, ca_file: Path | None = None) -> None:
    """Poll the SuperLink's /health endpoint (HTTPS when it serves TLS) until it answers 200."""
    scheme = "https" if ca_file else "http"
    host = "localhost" if ca_file else "127.0.0.1"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise FlowerProcessError(f"SuperLink exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FlowerProcessError(f"SuperLink not ready after {timeout:.0f}s; see {log_path}")
        time.sleep(0.5)


ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def stream_run(cmd: list[str], env: dict[str, str], log_path: Path, rounds: int, timeout: float,
               run_dir: Path | None = None) -> None:
    """Run `flwr run --stream`, logging everything and advancing a progress bar per `[ROUND n/N]`;
    with `run_dir`, one line per finished round from the run record (sites, loss, epsilon)."""
    began = time.monotonic()
    told = set()

    def tell(bar) -> None:
        if run_dir is None:
            return
        from fedus.runs import round_line  # torch-heavy: only when a run record is read

        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return
        for entry in summary.get("rounds", []):
            finished = "eval" in entry or "round_wall_s" in entry.get("aggregate", {})  # (evaluate-every > 1)
            if entry["round"] not in told and finished and (line := round_line(summary, entry["round"])):
                told.add(entry["round"])
                bar.note(line)

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
                    tell(bar)
                if time.monotonic() - began > timeout:
                    raise FlowerProcessError(f"run exceeded {timeout:.0f}s")
            proc.wait()
            bar.advance(rounds - done)
            tell(bar)
        finally:
            kill_group(proc)
    if proc.returncode != 0:
        raise FlowerProcessError(f"flwr run exited with {proc.returncode}; see {log_path}")


def check_completed(run_dir: Path) -> None:
    """`flwr run --stream` exits 0 even when the ServerApp raised: the run record says how it ended."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise FlowerProcessError(f"the run wrote no summary; see {run_dir / 'flwr-run.log'}")
    record = json.loads(summary.read_text())
    if record.get("status") != "completed":
        why = f": {record['error']}" if record.get("error") else ""
        raise FlowerProcessError(f"the run ended '{record.get('status')}'{why}; see {run_dir / 'flwr-run.log'}")
