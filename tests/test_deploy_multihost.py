"""A real deployment across hosts: SuperLink and SuperNodes each in their own network namespace,
TLS and SuperNode authentication on, the SuperLink on loopback behind the nginx proxy
(deploy/proxy.py), ``--isolation process`` with separate ``flower-superexec`` processes for the
ServerApp (on loopback) and each node's ClientApps (deploy/commands.py). The certificate names only
the public IP (``--san <ip>``). An operator registers keys, lists and runs through the tunnel with the
operator certificate; an attacker host holding ca.crt and a SuperNode key but no operator
certificate is refused registration, listing and runs, and the Runtime API has no public route; a
SuperNode with an unregistered key and one without the CA are refused; `fedcal node` names a wrong
CA in one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from deploy.certs import generate, supernode_keys
from deploy.cluster import add_connection
from deploy.commands import (
    PROXY_UPSTREAM_PORT,
    TLSFiles,
    node_config_string,
    proxy_args,
    superexec_args,
    superlink_args,
    supernode_args,
    tunnel_args,
)
from deploy.proxy import write_conf
from tests import netns
from tests.processes import BIN, ROOT, base_env, preset, processes

pytestmark = [pytest.mark.slow, pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]


def two_domains(tmp: Path, pacs: Path) -> Path:
    data = tmp / "data"
    data.mkdir()
    for dom in ("art_painting", "photo"):
        (data / dom).symlink_to(pacs / dom, target_is_directory=True)
    return data


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_tls_authenticated_run_across_namespaces(tmp_path, pacs_dir):
    data = two_domains(tmp_path, pacs_dir)
    with netns.network(["link", "n0", "n1", "rogue", "noca", "operator", "attacker"]) as hosts, processes() as start:
        link_ns, link_ip = hosts["link"]
        certs = tmp_path / "certs"
        generate(certs, [link_ip], supernodes=2, operators=1)  # --san <ip> only: loopback is added for the SuperLink's own executors
        supernode_keys(certs, "rogue")  # never registered
        supernode_keys(certs, "attacker")
        tls = TLSFiles.in_folder(certs)
        env = {h: base_env(tmp_path / h, HOME=str(tmp_path / h)) for h in hosts}
        # the SuperLink on loopback of its host (TLS + SuperNode auth), the proxy on the public address
        link = start(netns.run_in(link_ns, superlink_args(host="127.0.0.1", port=PROXY_UPSTREAM_PORT, database=str(tmp_path / "state.db"), tls=tls,
                                                          supernode_auth=True, isolation="process")),
                     env["link"], tmp_path / "superlink.log")
        conf = write_conf(tmp_path / "proxy", listen=link_ip, port=8000, upstream_port=PROXY_UPSTREAM_PORT, tls=tls)
        nginx = start(netns.run_in(link_ns, proxy_args(conf, tmp_path / "proxy" / "proxy-error.log")), env["link"], tmp_path / "nginx.log")
        address = f"{link_ip}:8000"

        def healthy():
            import subprocess

            res = subprocess.run(netns.run_in(link_ns, [str(BIN / "python"), "-c",
                                 f"import httpx,sys; sys.exit(httpx.get('https://{address}/health', verify='{tls.ca}', timeout=2).status_code != 200)"]),
                                 capture_output=True, timeout=30)
            return res.returncode == 0 and link.alive() and nginx.alive()

        wait_for(healthy, 60, "the SuperLink over TLS through the proxy")
        # the ServerApp executor dials the SuperLink on loopback: no public route to the Runtime API
        start(netns.run_in(link_ns, superexec_args(runtime_api_address=f"127.0.0.1:{PROXY_UPSTREAM_PORT}", root_certificates=tls.ca)),
              env["link"], tmp_path / "serverapp.log")
        # the operator reaches the Control API through their tunnel, with the operator certificate
        op_ns = hosts["operator"][0]
        start(netns.run_in(op_ns, [str(BIN / "fedcal"), *tunnel_args(proxy=address, cert=certs / "operator-0.pem", key=certs / "operator-0.key",
                                                                    ca=tls.ca)[1:]]), env["operator"], tmp_path / "tunnel.log")
        add_connection(tmp_path / "operator" / "flwr", "tls", "127.0.0.1:8001")
        # the attacker holds ca.crt and even a SuperNode key, but no operator certificate
        add_connection(tmp_path / "attacker" / "flwr", "attack", address, tls.ca)
        import subprocess

        def flwr(*args, timeout=300, host="operator"):
            return subprocess.run(netns.run_in(hosts[host][0], [str(BIN / "flwr"), *args]), env=env[host], capture_output=True, text=True,
                                  timeout=timeout, cwd=ROOT)

        wait_for(lambda: flwr("ls", "tls", timeout=60).returncode == 0, 60, "the operator's tunnel")
        for i in range(2):
            res = flwr("supernode", "register", str(certs / f"supernode-{i}.pub"), "tls")
            assert res.returncode == 0, res.stdout + res.stderr
        for args in (("supernode", "register", str(certs / "attacker.pub"), "attack"), ("ls", "attack"), ("supernode", "list", "attack")):
            res = flwr(*args, host="attacker", timeout=60)
            assert res.returncode != 0, (args, res.stdout + res.stderr)
        # the Runtime API and anything else has no public route at all
        res = subprocess.run(netns.run_in(hosts["attacker"][0], [str(BIN / "python"), "-c",
                             f"import httpx; print(httpx.post('https://{address}/v1/serverappio/pull-messages', verify='{tls.ca}', timeout=5).status_code)"]),
                             capture_output=True, text=True, timeout=30)
        assert res.stdout.strip() == "404", res.stdout + res.stderr
        attacker_ip = hosts["attacker"][1]
        refused = [line.split('"')[1] + line.split('"')[2][:4] for line in (tmp_path / "proxy" / "proxy-access.log").read_text().splitlines()
                   if line.startswith(attacker_ip + " ")]
        assert refused and all(r.endswith(" 403") or r.endswith(" 404") for r in refused), refused
        nodes = {}
        for i in range(2):
            ns = hosts[f"n{i}"][0]
            args = supernode_args(superlink=address, node_config=node_config_string(i, 2, str(data)), root_certificates=tls.ca,
                                  auth_key=certs / f"supernode-{i}", isolation="process")
            nodes[i] = start(netns.run_in(ns, args), env[f"n{i}"], tmp_path / f"n{i}.log")
            start(netns.run_in(ns, superexec_args(runtime_api_address="127.0.0.1:9094")), env[f"n{i}"], tmp_path / f"clientapp{i}.log")
        rogue = start(netns.run_in(hosts["rogue"][0], supernode_args(superlink=address, node_config=node_config_string(1, 2, str(data)),
                                                                     root_certificates=tls.ca, auth_key=certs / "rogue")), env["rogue"], tmp_path / "rogue.log")
        noca = start(netns.run_in(hosts["noca"][0], ["flower-supernode", "--superlink", address, "--node-config", node_config_string(0, 2, str(data))]),
                     env["noca"], tmp_path / "noca.log")

        def online():
            res = flwr("supernode", "list", "tls", "--format", "json", timeout=60)
            try:
                return sum(n["status"] == "online" for n in json.loads(res.stdout)["nodes"]) == 2
            except (ValueError, KeyError):
                return False

        wait_for(online, 90, "two registered SuperNodes online")
        wait_for(lambda: not rogue.alive(), 60, "the unregistered SuperNode to be refused")
        wait_for(lambda: not noca.alive(), 60, "the SuperNode without the CA to be refused")
        assert "Failed to activate SuperNode" in rogue.output(), rogue.output()[-2000:]
        assert "CERTIFICATE_VERIFY_FAILED" in noca.output(), noca.output()[-2000:]

        # fedcal's preflight names a wrong CA in one line, before Flower even starts
        other = tmp_path / "other"
        generate(other, ["10.201.0.250"])
        res = subprocess.run(netns.run_in(hosts["noca"][0], [str(BIN / "fedcal"), "node", "--superlink", address, "--partition-id", "0",
                                                           "--num-partitions", "2", "--root-certificates", str(other / "ca.crt"), "--dry-run"]),
                             capture_output=True, text=True, timeout=60, env=env["noca"])
        assert res.returncode == 2 and "does not verify" in res.stderr and len(res.stderr.strip().splitlines()) == 2, res.stderr

        cfg = preset(ROOT / "configs" / "offline-smoke.toml", tmp_path / "run.toml", **{
            "data.path": str(data), "data.heldout_domains": "", "fl.rounds": 1, "fl.min_train_nodes": 2, "fl.min_available_nodes": 2,
            "output.dir": str(tmp_path / "runs"), "output.run_name": "tls", "monitoring.enabled": False})
        res = flwr("run", ".", "attack", "--stream", "--run-config", str(cfg), timeout=120, host="attacker")
        assert res.returncode != 0 and not (tmp_path / "runs" / "tls").exists(), res.stdout + res.stderr
        res = flwr("run", ".", "tls", "--stream", "--run-config", str(cfg), timeout=600)
        summary = tmp_path / "runs" / "tls" / "summary.json"
        assert summary.exists(), (res.stdout + res.stderr)[-4000:]
        s = json.loads(summary.read_text())
        assert s["final_round"] == 1 and {c["domain"] for c in s["clients"]} == {"art_painting", "photo"}
        assert all(p.alive() for p in nodes.values()) and link.alive()
