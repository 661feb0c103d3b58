"""Checks an operator's input before a Flower process starts, each failing with one line.

Flower's own processes report a wrong address or a missing certificate after start-up, over
several lines and retries. ``fedcal node`` / ``fedcal superlink`` / ``fedcal cluster`` run these
checks first: the SuperLink address (syntax, reachable, answers ``/health``, TLS verifies with the
given CA), certificate and key files (exist, parse), and the node configuration (partition id,
number of partitions, data folder).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from common.config import ConfigError


class PreflightError(ConfigError):
    """Operator input that cannot work; ``str(err)`` is one line that says what to fix."""


def parse_address(address: str, what: str = "--superlink") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PreflightError(f"{what} {address!r} is not host:port (e.g. superlink.example.org:8000 or 127.0.0.1:8000)")
    return host.strip("[]"), int(port)


def check_file(path: str | Path | None, flag: str, fix: str) -> Path:
    if not path:
        raise PreflightError(f"{flag} is required: {fix}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise PreflightError(f"{flag} {str(path)!r} does not exist: {fix}")
    return p


def check_certificate(path: str | Path | None, flag: str = "--root-certificates") -> Path:
    p = check_file(path, flag, "copy the CA certificate (ca.crt from `fedcal certs`) from the SuperLink machine")
    try:
        ssl.create_default_context(cafile=str(p))
    except ssl.SSLError as err:
        raise PreflightError(f"{flag} {str(path)!r} is not a PEM certificate ({err.reason}): pass the ca.crt that `fedcal certs` wrote") from None
    return p


def check_private_key(path: str | Path | None, flag: str = "--auth-supernode-private-key") -> Path:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    p = check_file(path, flag, "use the supernode-<i> key `fedcal certs --supernodes N` wrote and register its .pub with `flwr supernode register`")
    try:
        load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise PreflightError(f"{flag} {str(path)!r} is not an OpenSSH private key ({err}): create one with `fedcal certs` or ssh-keygen -t ecdsa -b 384") from None
    return p


def check_superlink(address: str, root_certificates: str | Path | None = None, timeout: float = 5.0) -> None:
    """The SuperLink answers on ``address`` (TCP, then TLS with the CA when given)."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        raise PreflightError(f"cannot resolve the SuperLink host {host!r} in --superlink {address}: check the name (or use its IP address)") from None
    except OSError as err:
        raise PreflightError(
            f"cannot reach the SuperLink at {address} ({err.strerror or err}): check --superlink (host:port of flower-superlink, "
            f"port {8000} by default) and that the SuperLink runs and its port is open"
        ) from None
    with sock:
        if root_certificates is None:
            return
        context = ssl.create_default_context(cafile=str(root_certificates))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            raise PreflightError(
                f"the SuperLink at {address} presented a certificate that --root-certificates does not verify ({err.verify_message}): "
                f"use the CA that signed it and dial a name listed in its SANs"
            ) from None
        except ssl.SSLError as err:
            raise PreflightError(f"TLS with the SuperLink at {address} failed ({err.reason}): is it started with TLS (not --insecure)?") from None


def check_node(partition_id: int | None, num_partitions: int | None, data_dir: str | None = None) -> None:
    if partition_id is None:
        raise PreflightError("no partition id: pass --partition-id <i> (0 <= i < --num-partitions); every SuperNode holds one partition")
    if num_partitions is None or num_partitions < 1:
        raise PreflightError("no number of partitions: pass --num-partitions <n>, the number of SuperNodes of the federation")
    if not 0 <= partition_id < num_partitions:
        raise PreflightError(f"--partition-id {partition_id} must be in [0, {num_partitions - 1}] for --num-partitions {num_partitions}")
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise PreflightError(f"--data-dir {data_dir!r} does not exist on this machine: point it at the local image folder (<domain>/<class>/<img>)")


def port_free(host: str, port: int, flag: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise PreflightError(f"{host}:{port} is already in use: choose another {flag} or stop what listens there") from None


def check_run(cfg) -> int | None:
    """Before a run is submitted: the weights load (cache, file or hub) and the data is there; returns
    the number of clients the partitioner defines (None when it is not fixed). One line on failure."""
    from common.data import count_partitions, load_source
    from common.hub import offline_requested, reachable
    from common.model import check_weights

    check_weights(cfg.model.name, cfg.model.pretrained, cfg.model.cache_dir or None, cfg.model.offline)
    if cfg.data.path or offline_requested() or not reachable():
        load_source(cfg.data)  # a local folder is scanned; a hub dataset must be in the cache
    return count_partitions(cfg.data)
