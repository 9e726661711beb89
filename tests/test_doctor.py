"""`fedus doctor`: every check can fail for the right reason and passes when things are right."""

from __future__ import annotations

import csv
import socket
import ssl
import threading

import pytest

from fedus.deployment.certs import init_certs, site_keygen
from fedus.deployment.cli import server_config
from fedus.deployment.doctor import check_key, check_registered, check_server, check_tls, run_checks
from fedus.processes import flower_home_pids, free_port
from tests.conftest import TINY


@pytest.fixture
def tls_server(tmp_path):
    """A TLS endpoint with the consortium's server certificate (stands in for the SuperLink's port)."""
    files = init_certs(tmp_path / "certs", [])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files["server_cert"], files["server_key"])
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    stop = threading.Event()

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"localhost:{port}", files["ca_cert"]
    stop.set()
    thread.join()
    sock.close()


def test_tls_chain_passes_with_the_consortium_ca_and_fails_with_another(tls_server, tmp_path):
    address, ca = tls_server
    assert check_server(address).ok
    good = check_tls(address, ca)
    assert good.ok, good.detail
    other = init_certs(tmp_path / "other", [])["ca_cert"]
    bad = check_tls(address, other)
    assert not bad.ok and "not trusted" in bad.detail
    assert not check_tls(address, None).ok


def test_unreachable_server_and_bad_keys_fail(tmp_path):
    assert not check_server(f"127.0.0.1:{free_port()}").ok
    keys = site_keygen("hospital-a", tmp_path / "keys")
    assert check_key(keys["private_key"]).ok
    assert not check_key(keys["public_key"]).ok  # a public key is not the site's key
    keys["private_key"].chmod(0o644)
    assert "chmod 600" in check_key(keys["private_key"]).detail


def test_data_and_a_real_one_batch_step(tls_server, tmp_path, synthetic_manifest):
    address, ca = tls_server
    with open(synthetic_manifest) as f:
        rows = list(csv.DictReader(f))
    own = synthetic_manifest.parent / "doctor-site.csv"
    with open(own, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["center"] == rows[0]["center"])
    key = site_keygen("hospital-a", tmp_path / "keys")["private_key"]
    cfg = server_config(None, TINY, None, None)
    checks = {c.name: c for c in run_checks(cfg, "hospital-a", own, address, ca, key)}
    not_ok = {n: c.detail for n, c in checks.items() if not c.ok}
    assert list(not_ok) == ["key registered"], not_ok  # a bare TLS endpoint is no SuperLink (real one: below)
    assert "img/s" in checks["one-batch site step"].detail

    broken = tmp_path / "broken.csv"
    broken.write_text("image_path,mask_path,label,patient_id,center,device,organ,task\nmissing.png,,,p1,a,,,\n")
    checks = {c.name: c for c in run_checks(cfg, "hospital-a", broken, address, ca, key)}
    assert not checks["site data"].ok and not checks["one-batch site step"].ok


def test_cli_prints_a_table_and_exits_nonzero_on_failure(tmp_path, synthetic_manifest, fedus_cli):
    code, out, err = fedus_cli("doctor", "--site", "a", "--data", synthetic_manifest, "--server", f"127.0.0.1:{free_port()}")
    assert code == 1
    assert "server reachable" in out and "FAIL" in out and "Traceback" not in err


@pytest.mark.flower
def test_key_registration_is_asked_of_a_real_superlink_without_bringing_the_site_online(tmp_path):
    """TLS + auth SuperLink, one registered and one unregistered key; the probe leaves the node 'registered'."""
    import sqlite3

    from fedus.deployment.server import ServerSettings, register_site, superlink

    certs = tmp_path / "certs"
    init_certs(certs, [])
    known = site_keygen("hospital-a", tmp_path / "keys")
    stranger = site_keygen("hospital-b", tmp_path / "keys")
    settings = ServerSettings(state=tmp_path / "server", certs=certs, port=free_port())
    address, ca = f"localhost:{settings.port}", certs / "ca.crt"
    with superlink(settings) as env:
        register_site(known["public_key"], "hospital-a", env)
        yes = check_registered(address, ca, known["private_key"])
        no = check_registered(address, ca, stranger["private_key"])
        with sqlite3.connect(f"file:{settings.state / 'superlink.db'}?mode=ro", uri=True) as db:
            statuses = [row[0] for row in db.execute("SELECT status FROM node")]
    assert yes.ok, yes.detail
    assert not no.ok and "fedus site register" in no.detail
    assert statuses == ["registered"]  # never online: cannot be sampled
    assert not check_registered(address, None, known["private_key"]).ok  # needs TLS
    assert not flower_home_pids((settings.state / "flwr-home").resolve())
