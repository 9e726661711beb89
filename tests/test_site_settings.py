"""What `fedus client start` hands Flower's SuperNode as --node-config reaches the ClientApp unchanged."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from fedus.config import ConfigError
from fedus.deployment.site import SiteSettings, explain_exit, node_config


@pytest.mark.parametrize("folder", ["St Mary's Hospital", r"C:\sites\breast", "a, b = c", "Hôpital Necker", "plain"])
def test_node_config_survives_flowers_parser(tmp_path, folder):
    """A folder name with an apostrophe once reached the site cut short at it (`/data/St Mary`)."""
    data = tmp_path / folder / "manifest.csv"
    s = SiteSettings(name="st-marys", data=data, server="localhost:9092", state=tmp_path / "state",
                     epsilon_budget=8.0, extra_node_config={"device": "cpu", "workers": 2})
    parsed = parse_config_args([node_config(s)])
    assert parsed == {"site-name": "st-marys", "data-path": str(data.resolve()),
                      "privacy-ledger": str((tmp_path / "state" / "privacy-ledger.json").resolve()),
                      "epsilon-budget": 8.0, "device": "cpu", "workers": 2}


def test_a_value_flower_cannot_carry_is_a_clear_error(tmp_path):
    s = SiteSettings(name="x", data=tmp_path / "it's \"odd\"" / "m.csv", server="localhost:9092", state=tmp_path)
    with pytest.raises(ConfigError, match="cannot be passed to Flower's --node-config"):
        node_config(s)


@pytest.mark.parametrize("args", [("certs", "init", "--out", "{blocker}/certs"),
                                  ("site", "keygen", "a", "--out", "{blocker}/keys")])
def test_a_folder_that_cannot_be_made_is_a_one_line_error_naming_it(tmp_path, fedus_cli, args):
    """A mistyped or unwritable output folder is a user mistake: one line with the path, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, stderr = fedus_cli(*(a.format(blocker=blocker) for a in args))
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [f"error: Not a directory: {blocker}/{args[-1].split('/')[-1]}"], stderr


@pytest.mark.parametrize("mistake, message", [
    ("junk-ca", "is not a PEM certificate"),
    ("public-key-as-key", "is not an unencrypted OpenSSH private key"),
    ("ca-key-as-key", "is not an unencrypted OpenSSH private key"),
])
def test_a_site_given_the_wrong_certificate_or_key_file_says_which_before_starting(tmp_path, fedus_cli, mistake,
                                                                                   message):
    """Flower would only exit with a code and a log line (or fail the TLS handshake later); fedus names the file."""
    from fedus.deployment.certs import init_certs, site_keygen

    certs, keys = init_certs(tmp_path / "certs", []), site_keygen("a", tmp_path / "keys")
    root, key = certs["ca_cert"], keys["private_key"]
    if mistake == "junk-ca":
        root = tmp_path / "ca.crt"
        root.write_text("not a certificate\n")
    else:
        key = keys["public_key"] if mistake == "public-key-as-key" else certs["ca_key"]
    (tmp_path / "m.csv").write_text("image_path\n")
    code, _, err = fedus_cli("client", "start", "--site", "a", "--data", tmp_path / "m.csv", "--server", "localhost:1",
                             "--root-cert", root, "--key", key, "--state", tmp_path / "s")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s" / "supernode.log").exists()  # refused before any process started


@pytest.mark.parametrize("host", ["bad host!", "-server", "a..b", "https://server:9092"])
def test_certs_init_refuses_a_host_no_site_could_dial_and_writes_nothing(tmp_path, fedus_cli, host):
    code, _, err = fedus_cli("certs", "init", "--out", tmp_path / "certs", "--host", "server.example.org", "--host", host)
    assert code == 2 and f"--host '{host}' is neither an IP address nor a DNS name" in err and "Traceback" not in err
    assert not (tmp_path / "certs").exists()


def test_certs_init_takes_dns_names_and_ips_into_the_server_certificate(tmp_path):
    from cryptography import x509

    from fedus.deployment.certs import init_certs

    paths = init_certs(tmp_path / "certs", ["fedus_server", "*.hospital.example", "10.1.2.3", "fd00::7"])
    sans = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fedus_server", "*.hospital.example", "localhost"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "fd00::7", "127.0.0.1", "::1"}


@pytest.mark.parametrize("line, says", [
    ("Failed to activate SuperNode", "not registered"),
    ("ssl routines: WRONG_VERSION_NUMBER", "TLS mismatch"),
    ("Server disconnected without sending a response.", "TLS mismatch or wrong port"),
    # seen with a plaintext site against a TLS server on a loaded machine (Flower 1.42, exit code 305)
    ("Failed to initialize the connection to the SuperLink.\n[Errno 104] Connection reset by peer",
     "TLS mismatch or wrong port"),
    ("[Errno 104] Connection reset by peer", "SuperNode exited with 1; see"),  # mid-run: the server went away
    ("CERTIFICATE_VERIFY_FAILED", "wrong ca.crt"),
    ("something else", "SuperNode exited with 1; see"),
])
def test_a_supernode_that_gives_up_is_explained_in_the_operators_terms(tmp_path, line, says):
    assert says in explain_exit(1, f"INFO: starting\n{line}\n", tmp_path / "supernode.log")
