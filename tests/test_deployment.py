"""A real deployment on loopback: `fedus server` + `fedus client start` processes, TLS and site keys.

Every test uses free ports and private state folders, and checks that nothing it
started is left running.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedus.processes import flower_home_pids, free_port
from tests.conftest import TINY

pytestmark = pytest.mark.flower
FEDUS = [sys.executable, "-m", "fedus"]
SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def fedus(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDUS, *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([*FEDUS, *map(str, args)], env=env or _env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(*procs: subprocess.Popen) -> None:
    """SIGTERM all at once (each unwinds its own Flower processes), then SIGKILL what is left after 20 s."""
    import signal

    running = [p for p in procs if p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _site_manifests(synthetic_manifest: Path, out: Path) -> dict[str, Path]:
    """Split the synthetic corpus into per-site manifests (each site sees only its own rows)."""
    with open(synthetic_manifest) as f:
        rows = list(csv.DictReader(f))
    centres = sorted({r["center"] for r in rows})
    paths = {}
    for i, site in enumerate(SITES):
        path = synthetic_manifest.parent / f"{site}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for r in rows if r["center"] == centres[i % len(centres)])
        paths[site] = path
    return paths


@pytest.fixture
def pki(tmp_path, fedus_cli):
    """What `fedus certs init` and `fedus site keygen` make (run in-process: no Flower involved)."""
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    assert fedus_cli("certs", "init", "--out", certs)[0] == 0
    for site in SITES:
        assert fedus_cli("site", "keygen", site, "--out", keys / site)[0] == 0
    return certs, keys


def _server_args(state: Path, port: int, certs: Path | None, register: Path | None, rounds: int, timeout: float) -> list[str]:
    args = ["server", "--state", state, "--host", "127.0.0.1", "--port", port, "--rounds", rounds,
            "--min-sites", len(SITES), "--set", f"federation.round-timeout={timeout}"]
    args += ["--certs", certs] if certs else ["--insecure"]
    if register:
        args += ["--register", register]
    for item in TINY:
        args += ["--set", item]
    return args


def _site_args(site: str, data: Path, port: int, state: Path, certs: Path | None, key: Path | None,
               task_processes: str = "warm") -> list[str]:
    args = ["client", "start", "--site", site, "--data", data, "--server", f"localhost:{port}", "--state", state,
            "--task-processes", task_processes]
    return args + (["--root-cert", certs / "ca.crt", "--key", key] if certs else ["--insecure"])


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return -999


def _no_leftovers(*homes: Path) -> None:
    deadline = time.monotonic() + 15
    while any(flower_home_pids(h) for h in homes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for h in homes for pid in flower_home_pids(h)]


def _round_entry(summary_file: Path, server_round: int) -> dict:
    """The run record's entry for a round ({} while absent or while the file is being replaced)."""
    try:
        rounds = json.loads(summary_file.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return {}
    return next((r for r in rounds if r["round"] == server_round), {})


def _crash(state: Path, pid_file: str, proc: subprocess.Popen) -> None:
    """A machine dies: the `fedus` process and the Flower process it started (its pid in `pid_file`,
    own process group), all at once (SIGKILL), then whatever ran under their FLWR_HOME."""
    import signal

    from fedus.processes import kill_flower_home

    for pid in (int((state / pid_file).read_text()), proc.pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    kill_flower_home((state / "flwr-home").resolve())


def _kill_site(state: Path, proc: subprocess.Popen) -> None:
    """A site crashes: its `fedus client start` and its SuperNode die at once."""
    _crash(state, "supernode.pid", proc)


ROUNDS = 8


def test_tls_deployment_with_site_auth_survives_a_site_killed_in_round_2(tmp_path, pki, synthetic_manifest):
    """Three sites over TLS with site keys; one crashes in round 2 (the round closes at quorum) and is
    started again once round 2 closed: it rejoins at a later round with the current global student.
    Not at once: Flower frees the crashed node's connection only after two missed 30 s heartbeats (the
    rounds meanwhile wait out the straggler time for it, ~17 s each, then ~5 s), and the restarted site
    retries every 3 s through that minute; 8 rounds leave it two or more rounds to rejoin and stay."""
    certs, keys = pki
    registered = tmp_path / "registered"
    registered.mkdir()
    for site in SITES:  # the server gets only public keys
        (registered / f"{site}.pub").write_bytes((keys / site / f"{site}.pub").read_bytes())
    manifests = _site_manifests(synthetic_manifest, tmp_path)
    port, state = free_port(), tmp_path / "server"
    args = _server_args(state, port, certs, registered, rounds=ROUNDS, timeout=60) + [
        "--set", "federation.quorum=2", "--set", "federation.straggler-wait=10"]
    server = _spawn(args, tmp_path / "server.log")
    sites = {s: _spawn(_site_args(s, manifests[s], port, tmp_path / s, certs, keys / s / s), tmp_path / f"{s}.log")
             for s in SITES}
    try:
        run_log = state / "run" / "flwr-run.log"
        deadline = time.monotonic() + 400
        while not (run_log.is_file() and f"[ROUND 2/{ROUNDS}]" in run_log.read_text(errors="replace")):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        _kill_site(tmp_path / "hospital-c", sites["hospital-c"])  # in the middle of round 2
        while "train" not in _round_entry(state / "run" / "summary.json", 2):  # round 2 closed without it...
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        c = "hospital-c"  # ...and then the hospital restarts it
        sites[c] = _spawn(_site_args(c, manifests[c], port, tmp_path / c, certs, keys / c / c), tmp_path / f"{c}-again.log")
        code = _wait(server, 400)
        assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        _stop(server, *sites.values())
    summary = json.loads((state / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert sorted(summary["sites"]) == SITES
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert sorted(rounds) == list(range(ROUNDS + 1))
    assert sorted(rounds[1]["train"]) == SITES
    assert sorted(rounds[2]["train"]) == ["hospital-a", "hospital-b"]  # aggregated at quorum
    assert rounds[2]["aggregate"]["train_sites_failed"] == 1 and "checkpoint" in rounds[2]
    back = [r for r in range(3, ROUNDS + 1) if "hospital-c" in rounds[r]["train"]]
    assert back and back[0] < ROUNDS, back
    assert all(sorted(rounds[r]["train"]) == SITES for r in range(back[0], ROUNDS + 1)), back  # rejoined, stayed
    assert not any(rounds[r]["aggregate"].get("train_sites_rejected") for r in range(3, ROUNDS + 1))  # current global
    # the log says why: Flower's missed-heartbeat error reply, or the round closed at quorum + straggler wait
    log = run_log.read_text(errors="replace")
    assert "Node Unavailable" in log or "1 of 3 sites had not answered after" in log
    report = (state / "run" / "report" / "rounds.csv").read_text()
    assert "train_sites_failed" in report
    assert "random init" in summary["provenance"]["teacher"]["source"]
    _no_leftovers(state / "flwr-home", *[tmp_path / s / "flwr-home" for s in SITES])


def test_unregistered_key_and_plaintext_site_are_refused(tmp_path, pki, synthetic_manifest):
    certs, keys = pki
    registered = tmp_path / "registered"
    registered.mkdir()
    (registered / "hospital-a.pub").write_bytes((keys / "hospital-a" / "hospital-a.pub").read_bytes())
    manifests = _site_manifests(synthetic_manifest, tmp_path)
    port, state = free_port(), tmp_path / "server"
    server = _spawn(_server_args(state, port, certs, registered, rounds=1, timeout=60), tmp_path / "server.log")
    try:
        time.sleep(3)
        stranger = fedus(*_site_args("hospital-b", manifests["hospital-b"], port, tmp_path / "b", certs,
                                     keys / "hospital-b" / "hospital-b"), "--max-wait", 12, timeout=180)
        assert stranger.returncode == 2, stranger.stderr
        assert "not registered" in stranger.stderr and "Traceback" not in stranger.stderr
        plain = fedus(*_site_args("hospital-a", manifests["hospital-a"], port, tmp_path / "a", None, None),
                      "--max-wait", 8, timeout=180)
        assert plain.returncode == 2, plain.stderr
        assert "TLS" in plain.stderr and "Traceback" not in plain.stderr
    finally:
        _stop(server)
    _no_leftovers(state / "flwr-home", tmp_path / "a" / "flwr-home", tmp_path / "b" / "flwr-home")


def test_server_without_certs_or_insecure_refuses_to_start(tmp_path, fedus_cli):
    code, _, stderr = fedus_cli("server", "--state", tmp_path / "s", "--port", free_port())
    assert code == 2
    assert "fedus certs init" in stderr and "Traceback" not in stderr
    code, _, stderr = fedus_cli("server", "--state", tmp_path / "s", "--port", free_port(), "--certs", tmp_path / "nothing")
    assert code == 2 and "certificates missing" in stderr
    assert not (tmp_path / "s" / "superlink.pid").exists()  # refused before starting anything


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_adding_a_fourth_site_touches_no_other_file(tmp_path, pki):
    certs, keys = pki
    before = {**_digest(certs), **{f"keys/{k}": v for k, v in _digest(keys).items()}}
    assert fedus("site", "keygen", "hospital-d", "--out", keys / "hospital-d").returncode == 0
    after = {**_digest(certs), **{f"keys/{k}": v for k, v in _digest(keys).items()}}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"keys/hospital-d/hospital-d", "keys/hospital-d/hospital-d.pub"}
    assert oct((keys / "hospital-d" / "hospital-d").stat().st_mode & 0o777) == "0o600"
    again = fedus("certs", "init", "--out", certs)
    assert again.returncode == 2 and "never overwrites" in again.stderr
    assert _digest(certs) == {k: v for k, v in before.items() if not k.startswith("keys/")}


def _centre_manifests(synthetic_manifest: Path) -> dict[str, Path]:
    """One manifest per centre, beside the shared one (same near-duplicate file), named as the centre:
    the deployed sites are then exactly the simulation's sites."""
    with open(synthetic_manifest) as f:
        rows = list(csv.DictReader(f))
    paths = {}
    for centre in sorted({r["center"] for r in rows}):
        path = synthetic_manifest.parent / f"{centre}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for r in rows if r["center"] == centre)
        paths[centre] = path
    return paths


def _kill_server(state: Path, proc: subprocess.Popen) -> None:
    """The server machine dies: `fedus server`, its SuperLink and the ServerApp."""
    _crash(state, "superlink.pid", proc)


def test_a_server_killed_after_round_2_of_4_resumes_and_ends_bit_identical(tmp_path, synthetic_manifest):
    """`fedus server --resume` after a crash: rounds 3-4 run once each, and the final student equals
    an uninterrupted run's bit for bit. The uninterrupted run is the same config in Flower's
    simulation runtime: the same sites, seeds and code, so the same replies. One site forks its
    ClientApp processes warm (the default), the other starts Flower's fresh `flwr-clientapp` per
    message: both kinds must give the same replies."""
    import torch

    from fedus.config import RunConfig
    from fedus.models import create_teacher, load_state, save_state

    teacher = create_teacher(RunConfig().with_overrides(TINY).teacher, 32)
    weights = save_state(teacher.backbone.state_dict(), tmp_path / "teacher.safetensors")
    common = [item for s in [*TINY, "seed=3", f'teacher.weights="{weights}"'] for item in ("--set", s)]
    env = dict(_env(), FEDUS_CACHE=str(tmp_path / "cache"), FEDUS_CORPUS=str(tmp_path / "no-corpus"))
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(f'[run]\nseed = 3\n[run.data]\nsource = "manifest"\nmanifest = "{synthetic_manifest}"\n')
    # runs beside the deployment: that one mostly waits on Flower's message passing
    whole = _spawn(["simulate", "--scenario", scenario, "--rounds", 4, "--run-dir", tmp_path / "whole", *common],
                   tmp_path / "whole.log", env)

    port, state = free_port(), tmp_path / "server"
    server_args = ["server", "--state", state, "--insecure", "--host", "127.0.0.1", "--port", port]
    server = _spawn([*server_args, "--rounds", 4, "--min-sites", 2, *common], tmp_path / "server.log")
    manifests = _centre_manifests(synthetic_manifest)
    kinds = dict(zip(manifests, ["warm", "fresh"]))
    sites = {c: _spawn(_site_args(c, m, port, tmp_path / c, None, None, kinds[c]), tmp_path / f"{c}.log")
             for c, m in manifests.items()}
    summary_file = state / "run" / "summary.json"
    try:
        deadline = time.monotonic() + 500
        # kill once round 2 is complete (aggregated, checkpointed); its evaluation, carried by round 3's train
        # messages (federation.evaluate-with-train), is not in yet: the resumed run must still make it
        while "checkpoint" not in _round_entry(summary_file, 2):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        _kill_server(state, server)
        assert json.loads(summary_file.read_text())["status"] == "running"  # really cut short
        first_log = (state / "run" / "flwr-run.log").read_text(errors="replace")
        # the same command line with --resume; the sites kept running and reconnect on their own
        again = _spawn([*server_args, "--resume"], tmp_path / "server-resumed.log")
        assert _wait(again, 500) == 0, (tmp_path / "server-resumed.log").read_text()[-3000:]
        assert _wait(whole, 300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    finally:
        _stop(server, whole, *sites.values(), *([again] if "again" in locals() else []))
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3, 4]  # none lost
    assert all(len(r["eval"]) == 2 for r in summary["rounds"])  # round 2's evaluation too, by the resumed run
    assert [r["from_round"] for r in summary["resumed"]] == [2]
    resumed_log = (state / "run" / "flwr-run.log").read_text(errors="replace")
    assert "[ROUND 2/2]" in resumed_log and "[ROUND 3/" not in resumed_log  # rounds 3-4, each once
    assert (state / "run" / "flwr-run.interrupted-1.log").read_text(errors="replace") == first_log  # kept
    a, b = load_state(tmp_path / "whole" / "global-round-004.safetensors"), load_state(state / "run" / "global-round-004.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the warm site ran its own SuperExec (with the secret it shares with its SuperNode), the fresh one Flower's
    assert {c: (tmp_path / c / "superexec.secret").is_file() for c in sites} == {c: k == "warm" for c, k in kinds.items()}
    _no_leftovers(state / "flwr-home", tmp_path / "whole" / "flwr-home", *[tmp_path / c / "flwr-home" for c in sites])


def test_secure_aggregation_runs_on_the_deployment_runtime(tmp_path, synthetic_manifest):
    """SecAgg+ through `fedus server` and three `fedus client start` processes: its stages are separate
    messages, each a fresh ClientApp process whose protocol state lives in the SuperNode's context; the
    protocol's numbers are checked in tests/test_secure_aggregation.py."""
    manifests = _site_manifests(synthetic_manifest, tmp_path)
    port, state = free_port(), tmp_path / "server"
    args = _server_args(state, port, None, None, rounds=2, timeout=120) + [
        "--set", "secure-aggregation.enabled=true", "--set", "federation.transfer-dtype=fp32", "--set", "train.lr=1e-3"]
    server = _spawn(args, tmp_path / "server.log")
    sites = {s: _spawn(_site_args(s, manifests[s], port, tmp_path / s, None, None), tmp_path / f"{s}.log")
             for s in SITES}
    try:
        code = _wait(server, 500)
        assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        _stop(server, *sites.values())
    summary = json.loads((state / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    trained = [r for r in summary["rounds"] if r["round"] > 0]
    assert [r["aggregate"].get("secure_aggregation") for r in trained] == [1, 1]
    assert all(r.get("checkpoint") and sorted(r["train"]) == SITES for r in trained)
    assert not any("update_norm" in m for r in trained for m in r["train"].values())  # no single update was seen
    cos = [sum(m["cos"] for m in r["eval"].values()) / len(SITES) for r in (summary["rounds"][0], trained[-1])]
    assert cos[1] > cos[0] + 0.05, cos  # the securely aggregated student moved toward the teacher
    _no_leftovers(state / "flwr-home", *[tmp_path / s / "flwr-home" for s in SITES])


def test_a_site_with_an_unknown_task_process_kind_is_a_one_line_error(tmp_path, fedus_cli):
    code, _, stderr = fedus_cli("client", "start", "--site", "a", "--data", tmp_path, "--server", "localhost:1",
                                "--insecure", "--state", tmp_path / "s", "--task-processes", "lukewarm")
    assert code == 2 and "--task-processes must be one of warm, fresh" in stderr and "Traceback" not in stderr


def test_a_warm_task_process_loads_the_clientapp_from_the_runs_fab_not_the_installed_one(tmp_path):
    """client/warm_superexec.py forks tasks from a process that imported the installed `client` package;
    each task must still run the ClientApp of the run's FAB (installed under FLWR_HOME), as `flwr-clientapp` does."""
    fab = tmp_path / "fab"
    (fab / "client").mkdir(parents=True)
    (fab / "client" / "__init__.py").write_text("")
    (fab / "client" / "app.py").write_text("ORIGIN = 'fab'\n")
    code = ("import sys, importlib, client.warm_superexec as w; w.forget_app_modules(); "
            f"sys.path.insert(0, {str(fab)!r}); print(importlib.import_module('client.app').ORIGIN)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "fab"
