"""Monitoring for real: a local deployment (real SuperLink and SuperNodes) with one misbehaving
client and one misconfigured node, scraped by a real Prometheus server.

Checks: Prometheus's HTTP API returns the per-client ECE series with their labels; the rejected
NaN updates are counted; every PromQL expression of the Grafana dashboard returns data; the global
state stays finite and equals the aggregate of the honest clients; the node without a partition id
is refused in one line and recorded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from common import config
from deploy.cluster import start_cluster
from deploy.commands import supernode_args
from server.records import read_records
from tests.processes import ROOT, base_env, free_port, preset, processes, wait_healthy

pytestmark = pytest.mark.slow
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedcal.json"


def dashboard_queries(run: str, split: str = "test") -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace("$run", run).replace("$split", split)) for p in dash["panels"] for t in p["targets"]]


def query(prom: str, expr: str, at: float) -> list[dict]:
    """An instant query at time ``at`` (after the run the exporter is gone and the series are stale)."""
    res = httpx.get(f"{prom}/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}, timeout=10).json()
    assert res["status"] == "success", (expr, res)
    return res["data"]["result"]


@pytest.fixture()
def prometheus_bin():
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).exists():
        pytest.fail("the prometheus server is not installed (Debian package `prometheus`; .ci/run installs it)")
    return path


def test_prometheus_scrapes_calibration_and_faults(tmp_path, pacs_dir, prometheus_bin):
    exporter, prom_port = free_port(), free_port()
    env = base_env(tmp_path, HOME=str(tmp_path))
    data = tmp_path / "data"
    data.mkdir()
    (data / "photo").symlink_to(pacs_dir / "photo", target_is_directory=True)
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ROOT / 'deploy' / 'prometheus' / 'alerts.yml'}\n"
        "scrape_configs:\n  - job_name: fedcal\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{exporter}']\n")
    with processes() as start:
        prom = start([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                      f"--web.listen-address=127.0.0.1:{prom_port}"], env, tmp_path / "prometheus.log")
        wait_healthy(f"http://127.0.0.1:{prom_port}/-/ready", prom)
        cluster = start_cluster(tmp_path / "cluster", 3, str(data), port=free_port(), node_port=free_port(), env=env)
        try:
            bad = cluster.start("no-partition", supernode_args(superlink=cluster.address, node_config="num-partitions=3", port=free_port()))
            cfg_path = preset(ROOT / "configs" / "offline-smoke.toml", tmp_path / "run.toml", **{
                "data.path": str(data), "data.partitioner": "iid", "data.heldout_domains": "", "fl.rounds": 2,
                "fl.min_train_nodes": 2, "fl.min_available_nodes": 4, "fault.mode": "nan", "fault.partitions": "1",
                "output.dir": str(tmp_path / "runs"), "output.run_name": "monitored", "output.keep_round_checkpoints": True,
                "monitoring.port": exporter, "monitoring.linger": 4.0})
            res = cluster.flwr("run", str(ROOT), cluster.connection, "--stream", "--run-config", str(cfg_path))
            run_dir = tmp_path / "runs" / "monitored"
            assert (run_dir / "summary.json").exists(), (res.stdout + res.stderr)[-5000:]
            prom_url = f"http://127.0.0.1:{prom_port}"
            records = read_records(run_dir)
            at = max(r["time"] for r in records if r["kind"] == "round") + 2.5  # inside monitoring.linger: scraped with the final values

            # per-client ECE through Prometheus's HTTP API
            series = query(prom_url, 'fedcal_client_ece{run="monitored", split="test", ts="none"}', at)
            assert {s["metric"]["client"] for s in series} == {"0", "1", "2"}
            assert all({"run", "client", "domain", "role", "split", "ts"} <= set(s["metric"]) for s in series)
            last = {r["partition"]: r["ece"] for r in records if r["kind"] == "client" and r["round"] == 2 and r["split"] == "test" and r["ts"] == "none"}
            for s in series:
                assert float(s["value"][1]) == pytest.approx(last[int(s["metric"]["client"])], rel=1e-9)
            rejected = query(prom_url, 'fedcal_rejected_updates_total{run="monitored", reason="non-finite"}', at)
            assert float(rejected[0]["value"][1]) == 2.0  # partition 1's NaN update, both rounds
            # every dashboard expression returns data
            empty = [title for title, expr in dashboard_queries("monitored") if not query(prom_url, expr, at)]
            assert not empty, f"dashboard panels without data: {empty}"
            # the alert rules fire: rejected NaN updates; the tiny random model's ECE is far above 10%
            firing = {(a["metric"]["alertname"], a["metric"].get("reason")) for a in query(prom_url, 'ALERTS{alertstate="firing"}', at)}
            assert ("FedcalRejectedUpdates", "non-finite") in firing and ("FedcalPooledECEHigh", None) in firing, firing
            # the exporter is gone after the run: FedcalExporterDown becomes pending (it fires after 1 minute)
            deadline = time.monotonic() + 30
            while not query(prom_url, 'ALERTS{alertname="FedcalExporterDown"}', time.time()) and time.monotonic() < deadline:
                time.sleep(1)
            assert query(prom_url, 'ALERTS{alertname="FedcalExporterDown"}', time.time())

            # the node without a partition id was refused in one line and recorded
            joins = [r for r in records if r["kind"] == "failed" and r["phase"] == "join"]
            assert len(joins) == 1 and "partition-id" in joins[0]["reason"] and "\n" not in joins[0]["reason"]
            assert bad.poll() is None  # the node itself keeps running; it just never takes part

            # the global state of round 2 is finite and is the FedAvg of the honest clients' updates
            g1 = {k: torch.from_numpy(v) for k, v in load_file(str(run_dir / "checkpoints" / "round-00001" / "global.safetensors")).items()}
            g2 = load_file(str(run_dir / "checkpoints" / "round-00002" / "global.safetensors"))
            assert all(np.isfinite(v).all() for v in g2.values())
            from client.runtime import ClientRuntime

            cfg = config.load(str(cfg_path))
            honest = []
            for pid in (0, 2):
                node = config.parse_node_config({"partition-id": pid, "num-partitions": 3, "data-dir": str(data)})
                rt = ClientRuntime.create(cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": str(tmp_path / "fc")})}), node)
                out = rt.train(g1, server_round=2, fl_config={})
                honest.append((out.metrics["num-examples"], out.state))
            total = sum(n for n, _ in honest)
            for k, v in g2.items():
                expected = sum(s[k].numpy() * (n / total) for n, s in honest)
                assert np.allclose(v, expected, atol=1e-6), k
            assert [r["partition"] for r in records if r["kind"] == "rejected"] == [1, 1]
        finally:
            cluster.stop()


def test_environment_overrides_the_exporter_address(monkeypatch):
    from server.monitoring import Monitor

    cfg = config.load(None, monitoring__enabled=False, monitoring__host="127.0.0.1", monitoring__port=9464)
    monkeypatch.setenv("FEDCAL_MONITORING_HOST", "0.0.0.0")
    monkeypatch.setenv("FEDCAL_MONITORING_PORT", "9470")
    mon = Monitor(cfg, "r")
    assert (mon.cfg.host, mon.cfg.port) == ("0.0.0.0", 9470)
    assert cfg.monitoring.port == 9464  # the run configuration itself is untouched
    for bad in ("nine", "70000", "-1"):
        monkeypatch.setenv("FEDCAL_MONITORING_PORT", bad)
        with pytest.raises(config.ConfigError, match="FEDCAL_MONITORING_PORT must be a port number"):
            Monitor(cfg, "r")


def test_alert_rules_are_valid_and_fire_when_they_should():
    """promtool checks the rules and runs their unit tests (deploy/prometheus/alerts_test.yml)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian package prometheus) is needed; .ci/run installs it")
    folder = ROOT / "deploy" / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"], ["check", "config", "prometheus.yml"]):
        res = subprocess.run([promtool, *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
