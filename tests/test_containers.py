"""The container files: valid Compose (docker-compose validates against the Compose schema), built
on Flower's official images, and running exactly the commands deploy/commands.py builds — the
same builders the process-level tests start real processes with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.commands import (
    SUPEREXEC_ENV,
    TLSFiles,
    node_config_string,
    superexec_args,
    superlink_args,
    supernode_args,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
CERTS = TLSFiles(Path("certificates/ca.crt"), Path("certificates/server.pem"), Path("certificates/server.key"))
ENV = {"FEDCAL_DATA": "/srv/pacs", "FEDCAL_WEIGHTS": "/srv/hf", "SUPERLINK": "link.example.org:8000", "PARTITION_ID": "2",
       "NUM_PARTITIONS": "4", "FEDCAL_KEY": "supernode-2", "FEDCAL_CERTS": "/srv/certs"}


def compose_config(*files: str) -> dict:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose (Debian package) is needed to validate the Compose files; .ci/run installs it")
    args = [tool]
    for f in files:
        args += ["-f", str(DOCKER / f)]
    res = subprocess.run(args + ["config"], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)["services"]


WORKER_SOCKET = "/app/run/worker.sock"


def test_local_cluster_commands():
    services = compose_config("compose.yml")
    assert services["superlink"]["image"] == "flwr/superlink:1.42.0"
    assert services["superlink"]["command"] == superlink_args(host="0.0.0.0", port=8000, database="state/state.db", isolation="process")[1:]
    assert services["serverapp"]["command"] == superexec_args(runtime_api_address="superlink:8000")[1:]
    assert services["serverapp"]["environment"]["FEDCAL_MONITORING_HOST"] == "0.0.0.0"
    for i in range(4):  # a node's executor launches ClientApps as often as under `fedcal node`; the environment is the app's plus that
        assert services[f"clientapp-{i}"]["environment"] == {**services["serverapp"]["environment"], **SUPEREXEC_ENV}
    for i in range(4):
        node = services[f"supernode-{i}"]
        assert node["image"] == "flwr/supernode:1.42.0"
        assert node["command"] == supernode_args(superlink="superlink:8000", node_config=node_config_string(i, 4, "/data", worker_socket=WORKER_SOCKET), host="0.0.0.0",
                                                 port=9094, isolation="process")[1:]
        app = services[f"clientapp-{i}"]
        assert app["command"] == superexec_args(runtime_api_address=f"supernode-{i}:9094")[1:]
        assert app["depends_on"] == {f"supernode-{i}": {"condition": "service_healthy"}, f"worker-{i}": {"condition": "service_started"}}
        assert any(v.endswith(":/data:ro") for v in app["volumes"])
        worker = services[f"worker-{i}"]  # the warm worker sidecar shares only the socket volume with the ClientApps
        assert worker["entrypoint"] == ["fedcal", "worker", "--socket", WORKER_SOCKET] and not worker.get("ports")
        assert f"worker-{i}:/app/run:rw" in app["volumes"] and f"worker-{i}:/app/run:rw" in worker["volumes"]
    assert {"prometheus", "grafana"} <= set(services)
    assert any("deploy/grafana/dashboards" in v for v in services["grafana"]["volumes"])


def test_tls_variant_commands():
    from deploy.commands import proxy_args
    from deploy.proxy import COMPOSE, compose_conf

    services = compose_config("compose.tls.yml")
    assert services["superlink"]["command"] == superlink_args(host="0.0.0.0", port=COMPOSE["upstream_port"], database="state/state.db", tls=CERTS,
                                                              supernode_auth=True, isolation="process")[1:]
    assert "ports" not in services["superlink"]  # only the proxy is published
    assert (DOCKER / "nginx.tls.conf").read_text() == compose_conf()
    work = COMPOSE["work_dir"]
    assert services["proxy"]["command"] == [f"mkdir -p {work}/tmp && exec " + " ".join(proxy_args("/etc/fedcal/nginx.conf", work / "proxy-error.log"))]
    assert any(v.endswith(":/etc/fedcal/nginx.conf:ro") and "nginx.tls.conf" in v for v in services["proxy"]["volumes"])
    assert services["serverapp"]["command"] == superexec_args(runtime_api_address="superlink:8100", root_certificates="certificates/ca.crt")[1:]
    assert all(services[f"clientapp-{i}"]["environment"] == {**services["serverapp"]["environment"], **SUPEREXEC_ENV} for i in range(4))
    for i in range(4):
        assert services[f"supernode-{i}"]["command"] == supernode_args(
            superlink="proxy:8000", node_config=node_config_string(i, 4, "/data", worker_socket=WORKER_SOCKET), host="0.0.0.0", port=9094, isolation="process",
            root_certificates="certificates/ca.crt", auth_key=f"certificates/supernode-{i}")[1:]
        assert services[f"supernode-{i}"]["depends_on"]["register"]["condition"] == "service_completed_successfully"
    assert "flwr supernode register" in services["register"]["command"][0]


def test_gpu_variants_reserve_a_gpu_for_the_clientapps():
    services = compose_config("compose.yml", "compose.gpu.yml")
    for i in range(4):
        devices = services[f"clientapp-{i}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["serverapp"]
    one = compose_config("compose.supernode.yml", "compose.supernode-gpu.yml")
    assert one["clientapp"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_multi_machine_supernode_commands():
    services = compose_config("compose.supernode.yml")
    assert services["supernode"]["command"] == supernode_args(
        superlink="link.example.org:8000", node_config=node_config_string(2, 4, "/data", worker_socket=WORKER_SOCKET), host="0.0.0.0", port=9094, isolation="process",
        root_certificates="certificates/ca.crt", auth_key="certificates/supernode-2")[1:]
    assert services["clientapp"]["command"] == superexec_args(runtime_api_address="supernode:9094")[1:]
    assert "/srv/pacs:/data:ro" in services["clientapp"]["volumes"]


def test_app_image_is_built_on_flowers_superexec():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M)
    assert re.search(r"^ARG FLWR_VERSION=1\.42\.0$", text, re.M)
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    assert "HF_HUB_OFFLINE=1" in text and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    for folder in ("common", "client", "server", "deploy"):
        assert f"COPY --chown=app:app {folder} ./{folder}" in text


@pytest.mark.parametrize("file", ["compose.yml", "compose.tls.yml"])
def test_ports_are_published_on_loopback_unless_the_operator_opts_in(file):
    services = compose_config(file)
    def parse(port) -> tuple[str, str]:  # "127.0.0.1:3000:3000/tcp", "8000:8000/tcp" or the long form
        if isinstance(port, dict):
            return str(port.get("host_ip", "0.0.0.0")), str(port["published"])
        parts = str(port).split("/")[0].split(":")
        return (parts[0], parts[1]) if len(parts) == 3 else ("0.0.0.0", parts[0])

    published = {(name, *parse(p)) for name, svc in services.items() for p in svc.get("ports", [])}
    public = {(name, port) for name, ip, port in published if ip != "127.0.0.1"}
    # only the TLS proxy faces the network (SuperNodes on other machines dial it; operators need a certificate)
    assert public == ({("proxy", "8000")} if file == "compose.tls.yml" else set()), published
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
