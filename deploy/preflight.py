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


def _load_cert(path: Path, what: str):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, OSError) as err:
        raise PreflightError(f"{what} {str(path)!r} is not a PEM certificate ({str(err).splitlines()[0]}): recreate it with `fedcal certs`") from None


def check_pair(cert: Path, key: Path, ca: Path, what: str) -> object:
    """``cert`` and ``key`` parse and belong together, and ``ca`` issued ``cert``; returns the certificate."""
    for path in (cert, key, ca):
        check_file(path, what, "run `fedcal certs --out DIR --san <host>` first")
    ca_cert, parsed = _load_cert(ca, f"{what} CA"), _load_cert(cert, what)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as err:
        why = "does not match the certificate" if "MISMATCH" in str(err).upper() else f"is not a usable PEM key ({err.reason})"
        raise PreflightError(f"{what}: the key {str(key)!r} {why}: use the pair `fedcal certs` wrote together") from None
    try:
        parsed.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - cryptography raises several types for a wrong issuer
        raise PreflightError(f"{what}: {str(cert)!r} was not issued by {str(ca)!r}: use the ca.crt of the same `fedcal certs` folder") from None
    return parsed


def check_server_tls(tls, hosts: list[str]) -> None:
    """The SuperLink's certificate: a matching pair issued by the CA, whose SANs cover every name
    in ``hosts`` (the address it serves and loopback, which its own executors dial)."""
    import ipaddress

    from cryptography import x509

    cert = check_pair(Path(tls.server_cert), Path(tls.server_key), Path(tls.ca), "--certs (server.pem/server.key)")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    names = set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for host in hosts:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            pass
        if host not in ("0.0.0.0", "::") and host not in names:
            raise PreflightError(f"--certs: server.pem covers {sorted(names)}, not {host!r}: recreate it with `fedcal certs --san {host} --force`")


def check_operator(cert: Path, key: Path, ca: Path) -> None:
    """An operator's client certificate: a matching pair issued by the CA, allowed for clientAuth."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    parsed = check_pair(cert, key, ca, "--operator-cert")
    try:
        usage = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise PreflightError(f"--operator-cert {str(cert)!r} is not a client certificate: use an operator-<i>.pem from `fedcal certs --operators N`")
