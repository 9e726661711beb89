"""`fedus client start`: this hospital's Flower SuperNode, with its node config, CA and private key.

The SuperNode dials out to the server (no inbound port at the hospital),
retries with Flower's own exponential back-off while the server is away, and
runs the fedus ClientApp on the site's own manifest. What leaves the site is
decided in client/replies.py, not here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedus.config import ConfigError
from fedus.deployment.certs import check_root_cert, load_site_key
from fedus.processes import FlowerProcessError, flower_bin, flower_env, free_port, kill_flower_home, kill_group, start


TASK_PROCESSES = ("warm", "fresh")


@dataclass
class SiteSettings:
    name: str
    data: Path  # the site's manifest CSV, or a folder holding manifest.csv
    server: str  # host:port of the SuperLink
    state: Path  # FLWR_HOME, logs, privacy ledger
    root_cert: Path | None = None  # None = --insecure
    private_key: Path | None = None
    epsilon_budget: float | None = None
    max_wait: float | None = None  # give up reconnecting after this many seconds (None = keep trying)
    task_processes: str = "warm"  # "warm": forked from preloaded imports (client/warm_superexec.py); "fresh": Flower's own
    extra_node_config: dict[str, str | float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task_processes not in TASK_PROCESSES:
            raise ConfigError(f"--task-processes must be one of {', '.join(TASK_PROCESSES)}, not {self.task_processes!r}")


def node_config(s: SiteSettings) -> str:
    """Flower's --node-config string: what the ClientApp learns about this site (client/app.py)."""
    values: dict = {"site-name": s.name, "data-path": str(s.data.resolve()),
                    "privacy-ledger": str((s.state / "privacy-ledger.json").resolve())}
    if s.epsilon_budget is not None:
        values["epsilon-budget"] = float(s.epsilon_budget)
    values.update(s.extra_node_config)
    return " ".join(f"{k}={node_config_value(v)}" for k, v in values.items())


def node_config_value(v: str | float | int | bool) -> str:
    """One value as Flower parses it (a quoted run of characters, then TOML): a literal '...' string,
    so a Windows path's backslashes stay as typed, or a basic "..." one for a value holding an
    apostrophe (a folder named after St Mary's), which a literal string cannot."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if not isinstance(v, str):
        return repr(v)
    if any(ord(c) < 32 for c in v) or ("'" in v and '"' in v):
        raise ConfigError(f"{v!r} cannot be passed to Flower's --node-config (a control character, or both ' and \")")
    if "'" not in v:
        return f"'{v}'"
    return '"' + v.replace("\\", "\\\\") + '"'


def command(s: SiteSettings, runtime_port: int, executor_secret: Path | None = None) -> list[str]:
    """The SuperNode. With warm task processes it runs no SuperExec of its own (`--isolation process`):
    `executor_command` is started beside it, and both share a secret for the local Runtime API."""
    if not s.data.exists():
        raise ConfigError(f"site data not found: {s.data}")
    cmd = [flower_bin("flower-supernode"), "--superlink", s.server, "--port", str(runtime_port),
           "--node-config", node_config(s)]
    if s.task_processes == "warm":
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(executor_secret)]
    else:
        cmd += ["--isolation", "subprocess"]
    if s.max_wait is not None:
        cmd += ["--max-wait-time", str(s.max_wait)]
    if s.root_cert is None:
        return cmd + ["--insecure"]
    check_root_cert(s.root_cert)
    cmd += ["--root-certificates", str(Path(s.root_cert).resolve())]
    if s.private_key is not None:
        load_site_key(s.private_key)
        cmd += ["--auth-supernode-private-key", str(Path(s.private_key).resolve())]
    return cmd


def executor_command(runtime_port: int, supernode_pid: int, executor_secret: Path) -> list[str]:
    """The site's SuperExec (warm task processes), on the SuperNode's loopback Runtime API; it ends with the SuperNode."""
    return [sys.executable, "-m", "client.warm_superexec", "--insecure", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--parent-pid", str(supernode_pid),
            "--superexec-auth-secret-file", str(executor_secret)]


def new_executor_secret(state: Path) -> Path:
    """A fresh shared secret (owner-only file) so that no other local process can take this site's tasks."""
    path = state / "superexec.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path.resolve()


# Flower says only "Failed to activate SuperNode" for both cases: an unknown key, or a key whose previous
# SuperNode crashed and is still counted online until its heartbeats time out (2 x 30 s in Flower 1.41).
NOT_REGISTERED = ("the server refused to activate this site: its key is not registered (send NAME.pub to the "
                  "consortium: `fedus site register`), or, after a crash, the server still holds the site's previous "
                  "connection (freed within about a minute); `fedus doctor` tells which")


def explain_exit(code: int, log_text: str, log: Path) -> str:
    """Flower's exit codes and log lines -> what the site operator should do."""
    if "Failed to activate SuperNode" in log_text:
        return NOT_REGISTERED
    if "WRONG_VERSION_NUMBER" in log_text or "wrong version number" in log_text.lower():
        return "TLS mismatch: the server does not speak TLS (or this site was started with --insecure against a TLS server)"
    # a TLS server drops a plaintext handshake; gRPC reports either line, depending on timing. A reset only
    # counts when the first connection failed (exit 305): mid-run it is a server that went away, not TLS
    reset_at_start = "Failed to initialize the connection" in log_text and "Connection reset by peer" in log_text
    if "Server disconnected without sending a response" in log_text or reset_at_start:
        return ("TLS mismatch or wrong port: the server closed the connection without answering, "
                "as a TLS server does to a site started with --insecure")
    if "CERTIFICATE_VERIFY_FAILED" in log_text or "certificate verify failed" in log_text.lower():
        return "the server's certificate is not signed by the given root certificate (wrong ca.crt?)"
    return f"SuperNode exited with {code}; see {log}"


# A site restarted after a crash is refused until the server drops its previous connection: at most
# 2 missed 30 s heartbeats after the crash, which came before this start. Retry often through that window
# (each try starts a SuperNode, a few seconds of CPU), then back off for a key still waiting to be registered.
HELD_CONNECTION_S = 2 * 30 + 10


def retry_delay(waited: float) -> float:
    """Seconds before the next activation try, `waited` seconds after this site started."""
    return 3.0 if waited < HELD_CONNECTION_S else 15.0


def run_site(s: SiteSettings) -> int:
    """Run the SuperNode in the foreground until it ends or we are interrupted; kill all it started.

    Flower retries lost connections itself, but gives up after a few tries when the
    SuperLink does not (yet) know this site's key: a site started before its key is
    registered keeps trying here, with back-off, until `max_wait`.
    """
    s.state.mkdir(parents=True, exist_ok=True)
    home = (s.state / "flwr-home").resolve()
    home.mkdir(exist_ok=True)
    log = s.state / "supernode.log"
    began = time.monotonic()
    stopping = False
    running: list = []  # the SuperNode (and its SuperExec) now running (a signal may come before the first starts)
    timers: list[threading.Timer] = []

    def stop(signum, frame):
        """Forward Ctrl-C / SIGTERM to the SuperNode's process group and return at once: waiting for it
        here, inside the main thread's own `proc.wait()`, deadlocks on Popen's wait lock."""
        nonlocal stopping
        stopping = True
        for p in running:
            _signal_group(p.pid, signal.SIGTERM)
            timers.append(threading.Timer(10.0, _signal_group, (p.pid, signal.SIGKILL)))  # if it does not unwind
            timers[-1].daemon = True
            timers[-1].start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            offset = log.stat().st_size if log.is_file() else 0
            port = free_port()
            secret = new_executor_secret(s.state) if s.task_processes == "warm" else None
            proc = start(command(s, port, secret), flower_env(home), log)
            running[:] = [proc]
            if secret is not None:
                running.append(start(executor_command(port, proc.pid, secret), flower_env(home), log))
            (s.state / "supernode.pid").write_text(str(proc.pid))
            try:
                if stopping:
                    kill_group(proc)
                code = proc.wait()
            finally:
                for t in timers:
                    t.cancel()
                for p in reversed(running):
                    kill_group(p)
                kill_flower_home(home)
            if stopping or code == 0:
                return 0
            with open(log, "rb") as f:
                f.seek(offset)
                message = explain_exit(code, f.read().decode(errors="replace"), log)
            delay = retry_delay(time.monotonic() - began)
            out_of_time = s.max_wait is not None and time.monotonic() - began + delay > s.max_wait
            if message != NOT_REGISTERED or out_of_time:
                raise FlowerProcessError(message)
            print(f"{message}; retrying in {delay:.0f}s", file=sys.stderr, flush=True)
            time.sleep(delay)
            if stopping:
                return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
