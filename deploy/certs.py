"""TLS certificates and SuperNode keys for a Flower 1.42 deployment (``fedcal certs``).

Writes into one folder:
- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384), the file every
  SuperNode and the ``flwr`` CLI are given as ``--root-certificates`` / ``root-certificates``;
- ``server.pem`` / ``server.key``: the SuperLink certificate signed by that CA, with a subject
  alternative name for every name or IP address clients dial (``--san``);
- ``supernode-<i>`` / ``supernode-<i>.pub``: one ECDSA (SECP384R1) key pair per SuperNode, in
  OpenSSH format as Flower's SuperNode authentication expects; register the ``.pub`` files with
  ``flwr supernode register`` and start each SuperNode with ``--auth-supernode-private-key``;
- ``operator-<i>.pem`` / ``operator-<i>.key``: client certificates (extended key usage clientAuth)
  for the operators who may use the Control API through the proxy.

The server certificate always covers the loopback names too (``localhost``, ``127.0.0.1``, ``::1``):
the SuperLink's own executors dial it there, whatever public name ``--san`` gives.

Files are created, never overwritten (an existing file is an error unless ``force``): each is written
to a new temporary file opened with ``O_EXCL | O_NOFOLLOW`` and its final mode (keys 0600,
certificates and public keys 0644) before any byte is written, then renamed into place; the folder
is 0700. A symlink in place of the folder or of a file is refused, never followed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1", "::1")


class CertsError(ValueError):
    """A one-line reason the certificates cannot be written as asked."""


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Create ``path`` with its final mode from the first byte on; rename it into place."""
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen nor narrow it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # replaces a name, never follows a link at the destination


def _folder(out: Path) -> Path:
    if out.is_symlink():
        raise CertsError(f"{out} is a symbolic link: give the real folder (links are never followed)")
    if out.exists() and not out.is_dir():
        raise CertsError(f"{out} exists and is not a folder")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    return out


def _claim(paths: list[Path], force: bool) -> None:
    """Refuse to replace existing files (or links) unless ``force``; with it, remove them first."""
    taken = [p for p in paths if p.exists() or p.is_symlink()]
    if taken and not force:
        raise CertsError(f"{taken[0]} already exists ({len(taken)} files would be replaced): pass --force to replace them "
                         "(every certificate and key issued from the old CA stops working)")
    for p in taken:
        p.unlink()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcal"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def generate(out: Path, sans: list[str], supernodes: int = 0, days: int = 365, operators: int = 0, force: bool = False) -> dict[str, Path]:
    """Create the CA, the SuperLink certificate for ``sans`` (plus loopback), ``supernodes`` key pairs
    and ``operators`` client certificates; returns every file written."""
    if not sans:
        raise CertsError("give at least one --san: the host name or IP address SuperNodes and the flwr CLI dial")
    out = _folder(Path(out))
    names = list(dict.fromkeys([*sans, *LOOPBACK]))
    files = [out / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")]
    files += [out / f"supernode-{i}{ext}" for i in range(supernodes) for ext in ("", ".pub")]
    files += [out / f"operator-{i}{ext}" for i in range(operators) for ext in (".pem", ".key")]
    _claim(files, force)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedcal CA")).issuer_name(_name("fedcal CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(sans[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=serialization.NoEncryption())
    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key", "server_cert": out / "server.pem", "server_key": out / "server.key"}
    _write(paths["ca"], ca_cert.public_bytes(pem))
    _write(paths["ca_key"], ca_key.private_bytes(**pkcs8), private=True)
    _write(paths["server_cert"], server_cert.public_bytes(pem))
    _write(paths["server_key"], server_key.private_bytes(**pkcs8), private=True)
    for i in range(supernodes):
        paths.update(supernode_keys(out, f"supernode-{i}"))
    for i in range(operators):
        paths.update(operator_certificate(out, f"operator-{i}", ca_cert, ca_key, days))
    return paths


def operator_certificate(out: Path, name: str, ca_cert, ca_key, days: int = 365) -> dict[str, Path]:
    """A client certificate (clientAuth) for one operator of the Control API: ``<name>.pem`` / ``.key``."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write(Path(out) / f"{name}.pem", cert.public_bytes(pem))
    _write(Path(out) / f"{name}.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True)
    return {f"{name}.pem": Path(out) / f"{name}.pem", f"{name}.key": Path(out) / f"{name}.key"}


def supernode_keys(out: Path, name: str) -> dict[str, Path]:
    """One SuperNode key pair (ECDSA SECP384R1, OpenSSH format): ``<name>`` and ``<name>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(Path(out) / name, private, private=True)
    _write(Path(out) / f"{name}.pub", public + f" {name}\n".encode())
    return {name: Path(out) / name, f"{name}.pub": Path(out) / f"{name}.pub"}
