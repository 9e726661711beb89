"""Run a scenario on Flower's simulation runtime (`flwr run`), owning every process it starts.

fedus starts its own SuperLink in simulation mode on a free loopback port, with
a private FLWR_HOME and runtime dependency installation disabled, submits the
app with `flwr run`, streams progress, and kills the SuperLink's process group
by PID at the end, whatever happened. Ray (Flower's only simulation backend)
schedules the sites; fedus never schedules anything itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import tomli_w

from fedus.config import RunConfig
from fedus.processes import (FlowerProcessError, check_completed, flower_app, flower_bin, flower_env, free_port,
                             kill_flower_home, kill_group, start, stream_run, wait_healthy)


class SimulationError(FlowerProcessError):
    """The Flower simulation failed; the message names the log to read."""


@contextmanager
def local_superlink(run_dir: Path, env: dict[str, str], startup_timeout: float = 60.0):
    """A simulation-mode SuperLink owned by this process; yields its address."""
    port = free_port()
    log_path = run_dir / "superlink.log"
    proc = start([flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                  "--host", "127.0.0.1", "--port", str(port), "--database", str(run_dir / "superlink.db")],
                 env, log_path)
    (run_dir / "superlink.pid").write_text(str(proc.pid))
    try:
        try:
            wait_healthy(proc, port, log_path, startup_timeout)
        except FlowerProcessError as err:
            raise SimulationError(str(err)) from None
        yield f"127.0.0.1:{port}"
    finally:
        kill_group(proc)
        kill_flower_home(Path(env["FLWR_HOME"]))


def simulate(cfg: RunConfig, num_sites: int, run_dir: Path, timeout: float = 3600.0, cpus_per_site: float = 1.0) -> None:
    """Run `cfg` with one virtual SuperNode per site; the run record lands in `run_dir`.

    `cpus_per_site`: Flower's client resources. Ray runs as many ClientApp actors as the
    machine has CPUs for, each serving many sites in turn (1 = one site per core at a time)."""
    app = flower_app()  # before any process starts
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    flwr_home = run_dir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    env = flower_env(flwr_home)
    (run_dir / "run-config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    with local_superlink(run_dir, env) as address:
        (flwr_home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": "fedus-sim", "fedus-sim": {"address": address, "insecure": True}}}))
        federation = f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site:g}"
        cmd = [flower_bin("flwr"), "run", str(app), "fedus-sim", "--stream",
               "--federation-config", federation, "--run-config", str(run_dir / "run-config.toml")]
        stream_run(cmd, env, run_dir / "flwr-run.log", cfg.rounds, timeout, run_dir)
    check_completed(run_dir)
