"""`fedus doctor`: a site's pre-flight checks, each a pass/fail row with a reason.

Run at the hospital before joining: it reaches the server, verifies the TLS
chain against the consortium CA, checks the site key and asks the SuperLink
whether that key is registered, reads the data, and runs one real batch of the
site step, so problems show up before round 1.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedus.config import ConfigError, RunConfig


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"server address must be host:port, got '{address}'")
    return host, int(port)


def check_server(address: str, timeout: float = 5.0) -> Check:
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Check("server reachable", True, f"TCP connect to {address}")
    except OSError as err:
        return Check("server reachable", False, f"{address}: {err.strerror or err}")


def check_tls(address: str, root_cert: Path | None, timeout: float = 5.0) -> Check:
    if root_cert is None:
        return Check("TLS chain", False, "no --root-cert given (a site without TLS cannot join a secure server)")
    host, port = _split(address)
    try:
        context = ssl.create_default_context(cafile=str(root_cert))
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                subject = dict(x[0] for x in tls.getpeercert()["subject"])
                return Check("TLS chain", True, f"{tls.version()}, server '{subject.get('commonName', '?')}' signed by the consortium CA")
    except FileNotFoundError:
        return Check("TLS chain", False, f"root certificate not found: {root_cert}")
    except ssl.SSLCertVerificationError as err:
        return Check("TLS chain", False, f"certificate not trusted: {err.verify_message}")
    except (ssl.SSLError, OSError) as err:
        return Check("TLS chain", False, f"no TLS handshake with {address}: {err}")


def check_key(private_key: Path | None) -> Check:
    from fedus.deployment.certs import load_site_key

    if private_key is None:
        return Check("site key", False, "no --key given")
    try:
        key = load_site_key(private_key)
    except ConfigError as err:
        return Check("site key", False, str(err))
    mode = Path(private_key).stat().st_mode & 0o077
    if mode:
        return Check("site key", False, f"{private_key} is readable by others (chmod 600)")
    return Check("site key", True, f"EC {key.curve.name}, readable only by its owner")


PROBE_HEARTBEAT = 0.0  # outside Flower's [10, 1800] s: the SuperLink refuses activation after the key lookup


def check_registered(address: str, root_cert: Path | None, private_key: Path | None, timeout: float = 10.0) -> Check:
    """Ask the SuperLink whether this site's key is registered, without joining the federation.

    A signed Fleet `ActivateNode` with an out-of-range heartbeat interval: Flower 1.41's
    handler first looks the key up (unknown -> FLEET_NODE_ACTIVATION_FAILED), then checks
    the interval (-> FLEET_INVALID_HEARTBEAT_INTERVAL) before it changes any state. So the
    node never goes online, cannot be sampled, and this site's running SuperNode is not
    disturbed; a trial `flower-supernode` would go online (or, beside a running one, fail
    to activate and look unregistered) and deactivate the key's node on exit.
    """
    name = "key registered"
    if root_cert is None:
        return Check(name, False, "not checked: needs --root-cert (Flower authenticates sites only over TLS)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), password=None) if private_key else None
    except (OSError, ValueError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Check(name, False, "not checked: no usable site key (see 'site key')")

    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    try:
        verify = ssl.create_default_context(cafile=str(root_cert))
    except (OSError, ssl.SSLError) as err:
        return Check(name, False, f"not checked: root certificate unusable: {err}")
    request = ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=PROBE_HEARTBEAT)
    with FleetHttpClient(f"https://{address}", interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],
                         verify=verify, timeout=timeout) as client:
        try:
            reply = client.ActivateNode(request)
        except httpx.HTTPStatusError as err:
            status = err.response.status_code
            error = FlowerError.from_json(err.response.text)
            code = getattr(error, "code", None)
            if code == ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL:  # the key was found first
                return Check(name, True, "the server knows this key (signed probe; the site was not brought online)")
            if code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:  # no node with this key
                return Check(name, False, "the server has no site with this key: send NAME.pub to the consortium "
                                          "(`fedus site register NAME.pub --name NAME`)")
            if status == 401:
                return Check(name, False, "the server rejected the key's signature (is this machine's clock right?)")
            why = getattr(error, "message", "") or err.response.text[:200]
            return Check(name, False, f"unexpected answer HTTP {status}: {why}")
        except httpx.HTTPError as err:
            return Check(name, False, f"no answer from the Fleet API at {address}: {err}")
        # A Flower that accepted the probe activated the node: it was not online, so going offline disturbs nobody.
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=reply.node_id))
        except httpx.HTTPError:
            pass
        return Check(name, True, "the server knows this key (probe activated the site; deactivated at once)")


def check_data_and_step(cfg: RunConfig, name: str, data: Path) -> list[Check]:
    from fedus.site import Site

    manifest = data / "manifest.csv" if data.is_dir() else data
    try:
        site = Site(cfg, name, manifest, own_manifest=True)
        d = site.data
        skipped = sum((d.train.report.skipped or {}).values()) + sum((d.test.report.skipped or {}).values())
        rows = [Check("site data", len(d.train) > 0 and len(d.test) > 0,
                      f"{len(d.train)} train / {len(d.test)} held-out images, {skipped} unreadable skipped, "
                      f"classes {d.classes or 'none'}, masks {'yes' if d.has_masks else 'no'}")]
    except ConfigError as err:
        return [Check("site data", False, str(err)), Check("one-batch site step", False, "no data")]
    try:
        one = site.cfg.model_copy(update={"train": site.cfg.train.model_copy(update={"local_steps": 1})})
        site.cfg = one
        _, metrics = site.train(site.student().state_dict(), 1, 1)
        rows.append(Check("one-batch site step", True, f"{metrics.get('images_per_s', 0):.1f} img/s on {site.device}"))
    except Exception as err:  # doctor reports every failure as a row
        rows.append(Check("one-batch site step", False, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"))
    return rows


def run_checks(cfg: RunConfig, name: str, data: Path, server: str, root_cert: Path | None, private_key: Path | None) -> list[Check]:
    return [check_server(server), check_tls(server, root_cert), check_key(private_key),
            check_registered(server, root_cert, private_key), *check_data_and_step(cfg, name, data)]
