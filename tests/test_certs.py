"""`fedcal certs` and the TLS preflight: files born with their final modes under any umask, nothing
overwritten without --force, no symlink followed, loopback always in the server certificate,
operator client certificates, and a wrong pair refused in one line."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from cryptography import x509

from deploy import preflight
from deploy.certs import LOOPBACK, CertsError, generate
from deploy.commands import TLSFiles
from tests.processes import BIN


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_files_have_their_final_modes_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = generate(tmp_path / "certs", ["10.1.2.3"], supernodes=1, operators=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700
    for name, path in paths.items():
        private = path.suffix == ".key" or name.startswith("supernode-") and not name.endswith(".pub")
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if private else 0o644), (name, oct(path.stat().st_mode))
    assert not [p for p in (tmp_path / "certs").iterdir() if ".tmp-" in p.name]


def test_nothing_is_overwritten_without_force(tmp_path):
    generate(tmp_path, ["host"], supernodes=1)
    ca = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertsError, match="already exists.*--force"):
        generate(tmp_path, ["host"])
    assert (tmp_path / "ca.crt").read_bytes() == ca
    generate(tmp_path, ["host"], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != ca


def test_symlinks_are_never_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ca.key").symlink_to(target)
    with pytest.raises(CertsError, match="already exists"):
        generate(tmp_path / "out", ["h"])
    generate(tmp_path / "out", ["h"], force=True)  # replaces the link itself
    assert target.read_text() == "precious" and not (tmp_path / "out" / "ca.key").is_symlink()
    (tmp_path / "linked").symlink_to(tmp_path / "out", target_is_directory=True)
    with pytest.raises(CertsError, match="symbolic link"):
        generate(tmp_path / "linked", ["h"], force=True)


def test_server_certificate_covers_the_sans_and_loopback_and_operators_are_clients(tmp_path):
    generate(tmp_path, ["203.0.113.7"], operators=2)
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert names == {"203.0.113.7", *LOOPBACK}
    preflight.check_server_tls(TLSFiles.in_folder(tmp_path), ["203.0.113.7", "127.0.0.1"])
    for i in range(2):
        preflight.check_operator(tmp_path / f"operator-{i}.pem", tmp_path / f"operator-{i}.key", tmp_path / "ca.crt")
    with pytest.raises(preflight.PreflightError, match="not a client certificate"):
        preflight.check_operator(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.crt")
    with pytest.raises(preflight.PreflightError, match="not '198.51.100.1'"):
        preflight.check_server_tls(TLSFiles.in_folder(tmp_path), ["198.51.100.1"])


def test_mismatched_or_garbled_pairs_are_one_line(tmp_path):
    generate(tmp_path / "a", ["h"])
    generate(tmp_path / "b", ["h"])
    mixed = TLSFiles(tmp_path / "a" / "ca.crt", tmp_path / "a" / "server.pem", tmp_path / "b" / "server.key")
    with pytest.raises(preflight.PreflightError, match="does not match the certificate") as err:
        preflight.check_server_tls(mixed, ["h"])
    assert "\n" not in str(err.value)
    foreign = TLSFiles(tmp_path / "b" / "ca.crt", tmp_path / "a" / "server.pem", tmp_path / "a" / "server.key")
    with pytest.raises(preflight.PreflightError, match="was not issued by"):
        preflight.check_server_tls(foreign, ["h"])
    (tmp_path / "a" / "server.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    res = subprocess.run([str(BIN / "fedcal"), "superlink", "--certs", str(tmp_path / "a"), "--dry-run"], capture_output=True, text=True, timeout=60)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "not a PEM certificate" in errors[0], res.stderr


def test_plain_http_stays_on_loopback():
    res = subprocess.run([str(BIN / "fedcal"), "superlink", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--host 127.0.0.1" in res.stderr
    res = subprocess.run([str(BIN / "fedcal"), "superlink", "--host", "0.0.0.0", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "without --certs" in res.stderr
