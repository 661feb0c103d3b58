"""The README's multi-machine path, command by command, on loopback addresses: `fedcal certs --san
<ip>` (no loopback name given), `fedcal superlink --certs --supernode-auth` (SuperLink with
subprocess isolation behind the proxy), `fedcal operator-tunnel`, `flwr supernode register`,
`fedcal node`, `fedcal run --connection`: a ServerApp starts and the run completes."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from deploy.cluster import add_connection
from tests.processes import BIN, ROOT, base_env, free_port, processes

pytestmark = pytest.mark.slow
PUBLIC = "127.0.0.3"  # stands for the SuperLink machine's public IP


def fedcal(*args: str) -> list[str]:
    return [str(BIN / "fedcal"), *args]


def test_readme_multi_machine_path_completes_a_run(tmp_path, pacs_dir):
    env = base_env(tmp_path, HOME=str(tmp_path))
    port, upstream, tunnel = free_port(), free_port(), free_port()
    certs = tmp_path / "certs"
    res = subprocess.run(fedcal("certs", "--out", str(certs), "--san", PUBLIC, "--supernodes", "2", "--operators", "1"),
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    data = tmp_path / "data"
    data.mkdir()
    for dom in ("photo", "sketch"):
        (data / dom).symlink_to(pacs_dir / dom, target_is_directory=True)
    with processes() as start:
        link = start(fedcal("superlink", "--certs", str(certs), "--supernode-auth", "--host", PUBLIC, "--port", str(port),
                            "--upstream-port", str(upstream), "--database", str(tmp_path / "state" / "state.db")), env, tmp_path / "superlink.log")
        start(fedcal("operator-tunnel", "--proxy", f"{PUBLIC}:{port}", "--cert", str(certs / "operator-0.pem"), "--key", str(certs / "operator-0.key"),
                     "--ca", str(certs / "ca.crt"), "--listen", f"127.0.0.1:{tunnel}"), env, tmp_path / "tunnel.log")
        add_connection(tmp_path / "flwr", "prod", f"127.0.0.1:{tunnel}", make_default=True)

        def flwr(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)

        deadline = time.monotonic() + 90
        while flwr("ls", "prod").returncode != 0:
            assert link.alive() and time.monotonic() < deadline, link.output()[-3000:]
            time.sleep(1)
        for i in range(2):
            res = flwr("supernode", "register", str(certs / f"supernode-{i}.pub"), "prod")
            assert res.returncode == 0, res.stdout + res.stderr
            start(fedcal("node", "--superlink", f"{PUBLIC}:{port}", "--root-certificates", str(certs / "ca.crt"), "--auth-key", str(certs / f"supernode-{i}"),
                         "--partition-id", str(i), "--num-partitions", "2", "--data-dir", str(data), "--port", str(free_port())), env, tmp_path / f"node{i}.log")

        def online() -> int:
            try:
                return sum(n["status"] == "online" for n in json.loads(flwr("supernode", "list", "prod", "--format", "json").stdout)["nodes"])
            except (ValueError, KeyError):
                return 0

        deadline = time.monotonic() + 90
        while online() < 2:
            assert time.monotonic() < deadline, "SuperNodes did not come online"
            time.sleep(1)
        res = subprocess.run(fedcal("run", "offline-smoke", "--connection", "prod", f'data.path="{data}"', 'data.heldout_domains=""', "fl.rounds=1",
                                    "fl.min_train_nodes=2", "fl.min_available_nodes=2", f'output.dir="{tmp_path / "runs"}"', 'output.run_name="readme"',
                                    "monitoring.enabled=false"), env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
        summary = json.loads((tmp_path / "runs" / "readme" / "summary.json").read_text())
        assert summary["final_round"] == 1 and {c["domain"] for c in summary["clients"]} == {"photo", "sketch"}
