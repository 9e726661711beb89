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


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([*FEDUS, *map(str, args)], env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
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
def pki(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    assert fedus("certs", "init", "--out", certs).returncode == 0
    for site in SITES:
        assert fedus("site", "keygen", site, "--out", keys / site).returncode == 0
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


def _site_args(site: str, data: Path, port: int, state: Path, certs: Path | None, key: Path | None) -> list[str]:
    args = ["client", "start", "--site", site, "--data", data, "--server", f"localhost:{port}", "--state", state]
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


def _kill_site(state: Path, proc: subprocess.Popen) -> None:
    """A site crashes: its `fedus client start` and its SuperNode (own process group) die at once."""
    import signal

    for pid in (int((state / "supernode.pid").read_text()), proc.pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    from fedus.processes import kill_flower_home

    kill_flower_home((state / "flwr-home").resolve())


def test_tls_deployment_with_site_auth_survives_a_site_killed_in_round_2(tmp_path, pki, synthetic_manifest):
    certs, keys = pki
    registered = tmp_path / "registered"
    registered.mkdir()
    for site in SITES:  # the server gets only public keys
        (registered / f"{site}.pub").write_bytes((keys / site / f"{site}.pub").read_bytes())
    manifests = _site_manifests(synthetic_manifest, tmp_path)
    port, state = free_port(), tmp_path / "server"
    args = _server_args(state, port, certs, registered, rounds=2, timeout=60) + ["--set", "federation.quorum=2"]
    server = _spawn(args, tmp_path / "server.log")
    sites = {s: _spawn(_site_args(s, manifests[s], port, tmp_path / s, certs, keys / s / s), tmp_path / f"{s}.log")
             for s in SITES}
    try:
        run_log = state / "run" / "flwr-run.log"
        deadline = time.monotonic() + 400
        while not (run_log.is_file() and "[ROUND 2/2]" in run_log.read_text(errors="replace")):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        _kill_site(tmp_path / "hospital-c", sites["hospital-c"])  # in the middle of round 2
        code = _wait(server, 400)
        assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in [server, *sites.values()]:
            _stop(p)
    summary = json.loads((state / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert sorted(summary["sites"]) == SITES
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert sorted(rounds[1]["train"]) == SITES
    assert sorted(rounds[2]["train"]) == ["hospital-a", "hospital-b"]  # aggregated at quorum
    assert rounds[2]["aggregate"]["train_sites_failed"] == 1 and "checkpoint" in rounds[2]
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
                                     keys / "hospital-b" / "hospital-b"), "--max-wait", 30, timeout=180)
        assert stranger.returncode == 2, stranger.stderr
        assert "not registered" in stranger.stderr and "Traceback" not in stranger.stderr
        plain = fedus(*_site_args("hospital-a", manifests["hospital-a"], port, tmp_path / "a", None, None),
                      "--max-wait", 8, timeout=180)
        assert plain.returncode == 2, plain.stderr
        assert "TLS" in plain.stderr and "Traceback" not in plain.stderr
    finally:
        _stop(server)
    _no_leftovers(state / "flwr-home", tmp_path / "a" / "flwr-home", tmp_path / "b" / "flwr-home")


def test_server_without_certs_or_insecure_refuses_to_start(tmp_path):
    proc = fedus("server", "--state", tmp_path / "s", "--port", free_port())
    assert proc.returncode == 2
    assert "fedus certs init" in proc.stderr and "Traceback" not in proc.stderr
    proc = fedus("server", "--state", tmp_path / "s", "--port", free_port(), "--certs", tmp_path / "nothing")
    assert proc.returncode == 2 and "certificates missing" in proc.stderr


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
