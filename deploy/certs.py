"""TLS certificates and SuperNode keys for a Flower 1.42 deployment (``fedcal certs``).

Writes into one folder:
- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384), the file every
  SuperNode and the ``flwr`` CLI are given as ``--root-certificates`` / ``root-certificates``;
- ``server.pem`` / ``server.key``: the SuperLink certificate signed by that CA, with a subject
  alternative name for every name or IP address clients dial (``--san``);
- ``supernode-<i>`` / ``supernode-<i>.pub``: one ECDSA (SECP384R1) key pair per SuperNode, in
  OpenSSH format as Flower's SuperNode authentication expects; register the ``.pub`` files with
  ``flwr supernode register`` and start each SuperNode with ``--auth-supernode-private-key``.
Private keys are written with mode 0600.
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


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


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


def generate(out: Path, sans: list[str], supernodes: int = 0, days: int = 365) -> dict[str, Path]:
    """Create the CA, the SuperLink certificate for ``sans`` and ``supernodes`` key pairs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not sans:
        raise ValueError("give at least one --san: the host name or IP address SuperNodes and the flwr CLI dial")
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
        .add_extension(_san(sans), critical=False)
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
    return paths


def supernode_keys(out: Path, name: str) -> dict[str, Path]:
    """One SuperNode key pair (ECDSA SECP384R1, OpenSSH format): ``<name>`` and ``<name>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(Path(out) / name, private, private=True)
    _write(Path(out) / f"{name}.pub", public + f" {name}\n".encode())
    return {name: Path(out) / name, f"{name}.pub": Path(out) / f"{name}.pub"}
