"""`fedus server`: a Flower SuperLink with TLS + SuperNode auth, and the fedus run submitted to it.

The SuperLink keeps its state in a database under the server's state folder,
so registrations survive a restart. fedus starts it, registers the sites'
public keys, submits the ServerApp run with `flwr run`, streams progress, writes
the report, and stops every process it started.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedus.config import ConfigError, RunConfig
from fedus.deployment.certs import check_public_key, check_server_certs
from fedus.processes import (check_completed, flower_app, flower_bin, flower_env, kill_flower_home, kill_group, start,
                             stream_run, wait_healthy)

FEDERATION = "fedus-deploy"


@dataclass
class ServerSettings:
    state: Path  # SuperLink database, FLWR_HOME, run record
    certs: Path | None  # None = --insecure
    host: str = "127.0.0.1"
    port: int = 9092
    register: Path | None = None  # folder of site public keys (NAME.pub) registered at start


def control_config(settings: ServerSettings) -> dict:
    """FLWR_HOME/config.toml so `flwr run` / `flwr supernode register` reach this SuperLink."""
    address = f"{'localhost' if settings.host in ('127.0.0.1', '0.0.0.0') else settings.host}:{settings.port}"
    entry: dict = {"address": address}
    if settings.certs is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str((settings.certs / "ca.crt").resolve())
    return {"superlink": {"default": FEDERATION, FEDERATION: entry}}


@contextmanager
def superlink(settings: ServerSettings, startup_timeout: float = 90.0):
    """Yields the environment to talk to the running SuperLink; kills it (and its children) on exit."""
    state = settings.state.resolve()
    home = state / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(home)
    (home / "config.toml").write_text(tomli_w.dumps(control_config(settings)))
    cmd = [flower_bin("flower-superlink"), "--host", settings.host, "--port", str(settings.port),
           "--database", str(state / "superlink.db"), "--isolation", "subprocess"]
    if settings.certs is None:
        cmd.append("--insecure")
        ca = None
    else:
        files = check_server_certs(settings.certs.resolve())
        cmd += ["--ssl-ca-certfile", str(files["ca_cert"]), "--ssl-certfile", str(files["server_cert"]),
                "--ssl-keyfile", str(files["server_key"]), "--enable-supernode-auth"]
        ca = files["ca_cert"]
    log = state / "superlink.log"
    proc = start(cmd, env, log)
    (state / "superlink.pid").write_text(str(proc.pid))
    try:
        wait_healthy(proc, settings.port, log, startup_timeout, ca_file=ca)
        yield env
    finally:
        kill_group(proc)
        kill_flower_home(home)


def register_site(public_key: Path, name: str, env: dict[str, str]) -> None:
    """Flower's SuperNode registration; the SuperLink must be running (TLS + auth)."""
    check_public_key(public_key)
    proc = subprocess.run([flower_bin("flwr"), "supernode", "register", str(Path(public_key).resolve()), FEDERATION,
                           "--name", name], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"registering site '{name}' failed: {last[0][:300]}")


def register_folder(folder: Path, env: dict[str, str]) -> list[str]:
    names = []
    for pub in sorted(Path(folder).glob("*.pub")):
        register_site(pub, pub.stem, env)
        names.append(pub.stem)
    return names


def submit_run(cfg: RunConfig, env: dict[str, str], run_dir: Path, timeout: float) -> None:
    """`flwr run` of the fedus app against this SuperLink, streaming until the run ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": str(run_dir.resolve())})
    (run_dir / "run-config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    cmd = [flower_bin("flwr"), "run", str(flower_app()), FEDERATION, "--stream", "--run-config", str(run_dir / "run-config.toml")]
    log = run_dir / "flwr-run.log"
    if cfg.resume and log.is_file():  # the interrupted run's log is evidence: keep it
        log.rename(run_dir / f"flwr-run.interrupted-{len(list(run_dir.glob('flwr-run.interrupted-*.log'))) + 1}.log")
    stream_run(cmd, env, log, cfg.rounds, timeout, run_dir)
    check_completed(run_dir)


def serve(cfg: RunConfig, settings: ServerSettings, timeout: float = 24 * 3600.0) -> Path:
    if settings.certs is None:
        print("WARNING: --insecure: plaintext traffic and no site authentication; for testing only", file=sys.stderr)
    run_dir = settings.state.resolve() / "run"
    flower_app()  # before any process starts
    with superlink(settings) as env:
        if settings.register is not None:
            if settings.certs is None:
                raise ConfigError("--register needs TLS: Flower authenticates SuperNodes only over TLS")
            register_folder(settings.register, env)
        submit_run(cfg, env, run_dir, timeout)
    return run_dir
