"""Consortium PKI with `cryptography`: one CA, one server certificate, one key pair per site.

Each site generates its own SuperNode key pair and sends only the public key;
the server registers it with Flower's SuperNode authentication. Nothing is
ever re-issued when a site joins, so adding a hospital never touches another
hospital's files. Existing files are never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedus.config import ConfigError

CURVE = ec.SECP384R1()  # Flower's SuperNode auth accepts NIST-curve EC keys
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# RFC 1123 labels, plus '_' (container networks name services with it) and a leading wildcard label
DNS_NAME = re.compile(r"^(?=.{1,253}$)(\*\.)?[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _write_new(path: Path, data: bytes, private: bool = False) -> Path:
    """Create `path` exclusively (refusing to overwrite); private files are 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; fedus never overwrites keys or certificates") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedus consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def init_certs(out: Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """CA + server certificate for `hosts` (DNS names or IPs). localhost/127.0.0.1/::1 are always
    included: Flower's SuperLink talks to its own executor over TLS on 127.0.0.1."""
    out = Path(out)
    bad = [h for h in hosts if not _is_ip(h) and not DNS_NAME.match(h)]
    if bad:  # a site would fail the TLS handshake against a certificate made for a name it cannot dial
        raise ConfigError(f"--host '{bad[0]}' is neither an IP address nor a DNS name (letters, digits, '-', '_', dots)")
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        if (out / name).exists():
            raise ConfigError(f"{out / name} already exists; fedus never overwrites keys or certificates")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(CURVE)
    ca = (x509.CertificateBuilder().subject_name(_name("fedus consortium CA")).issuer_name(_name("fedus consortium CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1", "::1"]):
        names.append(x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host))
    server_key = ec.generate_private_key(CURVE)
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost")).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))
    return {
        "ca_key": _write_new(out / "ca.key", _pem_key(ca_key), private=True),
        "ca_cert": _write_new(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        "server_key": _write_new(out / "server.key", _pem_key(server_key), private=True),
        "server_cert": _write_new(out / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
    }


def site_keygen(name: str, out: Path) -> dict[str, Path]:
    """A site's SuperNode key pair (OpenSSH EC P-384). Run at the site: the private key never leaves it."""
    if not SITE_NAME.match(name):
        raise ConfigError(f"site name '{name}' must be 1-63 letters, digits, '.', '_' or '-'")
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {
        "private_key": _write_new(Path(out) / name, private, private=True),
        "public_key": _write_new(Path(out) / f"{name}.pub", public + f" fedus-site-{name}\n".encode()),
    }


def check_server_certs(certs: Path) -> dict[str, Path]:
    """The three files a TLS SuperLink needs, or a one-line error saying how to make them."""
    files = {"ca_cert": certs / "ca.crt", "server_cert": certs / "server.pem", "server_key": certs / "server.key"}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"TLS certificates missing in {certs} ({', '.join(missing)}): run `fedus certs init --out {certs}` "
                          "or pass --insecure (plaintext; testing only)")
    return files


def check_public_key(path: Path) -> None:
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"public key not found: {path}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not an OpenSSH public key (make one with `fedus site keygen NAME`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path}: SuperNode keys must be EC (NIST curve); make one with `fedus site keygen NAME`")


def check_root_cert(path: Path) -> None:
    """The consortium's CA certificate a site trusts; Flower only says the handshake failed."""
    try:
        x509.load_pem_x509_certificates(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"root certificate not found: {path} (the consortium's ca.crt)") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate (the consortium's ca.crt from `fedus certs init`)") from None


def load_site_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's SuperNode private key as Flower loads it (OpenSSH, EC), or a one-line error; Flower's own
    is an exit code and a log line."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"site private key not found: {path} (make it with `fedus site keygen NAME`)") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: a passphrase-protected key
        raise ConfigError(f"{path} is not an unencrypted OpenSSH private key (the file `fedus site keygen NAME` "
                          "wrote without .pub)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: SuperNode keys must be EC (NIST curve); make one with `fedus site keygen NAME`")
    return key
