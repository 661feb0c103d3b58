"""Faults with real processes: a SuperNode killed mid-round, the SuperLink (and its ServerApp)
killed and restarted with resume, and operator mistakes answered in one line."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from deploy.cluster import start_cluster
from deploy.commands import SUPEREXEC_ENV
from deploy.warm import executor_args
from server.records import read_records
from tests.processes import BIN, ROOT, Proc, base_env, free_port, preset

pytestmark = pytest.mark.slow


def photo_only(tmp: Path, pacs: Path) -> Path:
    data = tmp / "data"
    data.mkdir()
    (data / "photo").symlink_to(pacs / "photo", target_is_directory=True)
    return data


def run_config(tmp: Path, data: Path, name: str, **extra) -> Path:
    return preset(ROOT / "configs" / "offline-smoke.toml", tmp / f"{name}.toml", **{
        "data.path": str(data), "data.partitioner": "iid", "data.heldout_domains": "", "eval.temperature_scaling": "none",
        "output.dir": str(tmp / "runs"), "output.run_name": name, "monitoring.enabled": False, **extra})


def submit(cluster, cfg: Path, log: Path) -> Proc:
    return Proc(["flwr", "run", str(ROOT), cluster.connection, "--stream", "--run-config", str(cfg)], cluster.env, log)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def test_supernode_and_warm_workers_killed_mid_round(tmp_path, pacs_dir):
    """Node 0's warm worker is its executor (`--executor warm`), node 1's is relayed to. Round 2
    loses all three replies: node 2 is killed, node 1's worker and node 0's executor are killed while
    they train. The run goes on; node 0's executor is restarted (as `fedcal node` does) and in round
    3 nodes 0 and 1 train again (node 1 computes in-process)."""
    data = photo_only(tmp_path, pacs_dir)
    env = base_env(tmp_path, HOME=str(tmp_path))
    cluster = start_cluster(tmp_path / "cluster", 3, str(data), port=free_port(), node_port=free_port(), env=env, warm=True, executor={0})
    try:
        assert "--isolation process" in " ".join(cluster.processes["supernode-0"].args)
        cfg = run_config(tmp_path, data, "killed", **{"fl.rounds": 3, "fl.min_train_nodes": 1, "fl.min_available_nodes": 3, "fl.round_timeout": 120.0,
                                                        "optim.local_steps": 200})
        run = submit(cluster, cfg, tmp_path / "run.log")
        # round 2: kill node 2 once it has its training message, and nodes 0's and 1's workers while they train
        wait_for(lambda: (cluster.logs("supernode-2").count("Receiving: train message") >= 2
                          and cluster.logs("worker-1").count("handling train message") >= 2
                          and cluster.logs("worker-0").count("running train message") >= 2) or not run.alive(), 300, "round 2 to reach nodes 0, 1 and 2")
        assert run.alive(), run.output()[-5000:]
        cluster.kill("supernode-2")
        cluster.kill("worker-1")
        cluster.kill("worker-0")
        cluster.start("worker-0", executor_args(f"127.0.0.1:{cluster.node_ports[0]}"))
        wait_for(lambda: not run.alive(), 420, "the run to finish without node 2")
        run_dir = tmp_path / "runs" / "killed"
        assert (run_dir / "summary.json").exists(), run.output()[-5000:]
        rows = read_records(run_dir)
        assert sorted(r["round"] for r in rows if r["kind"] == "round") == [1, 2, 3]
        lost = {r["partition"]: r for r in rows if r["kind"] in ("missing", "failed") and r["round"] == 2 and r["phase"] == "train"}
        assert sorted(lost) == [0, 1, 2], lost
        # node 1's worker died mid-message: a one-line failed reply; its next messages are computed in-process
        assert lost[1]["kind"] == "failed" and "warm worker" in lost[1]["reason"] and "\n" not in lost[1]["reason"], lost[1]
        assert "computing in this process" in cluster.logs("supernode-1")
        # node 0's executor died mid-task: its SuperNode answers with Flower's error once the task's heartbeat stops,
        # and its restarted executor runs the next messages
        assert lost[0]["kind"] == "failed" and "stopped responding" in lost[0]["reason"], lost[0]
        assert not [r for r in rows if r["kind"] == "train" and r["round"] == 2]
        assert sorted(r["partition"] for r in rows if r["kind"] == "train" and r["round"] == 3) == [0, 1]
        assert sorted({r["partition"] for r in rows if r["kind"] == "client" and r["round"] == 3}) == [0, 1]
        assert "round 3/3" in run.output()
        restarted = cluster.logs("worker-0").rsplit("warm worker executing the ClientApps", 1)[1]
        assert "running train message" in restarted  # round 3 ran inside the restarted executor
    finally:
        cluster.stop()


def test_superlink_restart_and_resume(tmp_path, pacs_dir):
    data = photo_only(tmp_path, pacs_dir)
    env = base_env(tmp_path, HOME=str(tmp_path))
    cluster = start_cluster(tmp_path / "cluster", 2, str(data), port=free_port(), node_port=free_port(), env=env)
    try:
        def environ(name: str) -> dict[str, str]:
            raw = Path(f"/proc/{cluster.processes[name].pid}/environ").read_bytes().split(b"\0")
            return dict(item.decode().partition("=")[::2] for item in raw if item)

        # the nodes' executors launch ClientApps every 0.25 s; the SuperLink's keeps Flower's default
        assert SUPEREXEC_ENV.items() <= environ("supernode-0").items() and "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in environ("superlink")
        cfg = run_config(tmp_path, data, "restarted", **{"fl.rounds": 3, "fl.min_train_nodes": 2, "fl.min_available_nodes": 2})
        run = submit(cluster, cfg, tmp_path / "run1.log")
        latest = tmp_path / "runs" / "restarted" / "checkpoints" / "LATEST"
        wait_for(lambda: (latest.exists() and latest.read_text() == "round-00001") or not run.alive(), 300, "the round-1 checkpoint")
        assert run.alive(), run.output()[-5000:]
        link_args = cluster.processes["superlink"].args
        cluster.kill("superlink")  # the SuperLink and the ServerApp it runs die at once
        wait_for(lambda: not run.alive(), 120, "flwr run to notice")
        run.kill()
        assert not (tmp_path / "runs" / "restarted" / "final").exists()
        cluster.start("superlink", link_args)  # same flags, same state database
        cluster.wait_online(2, timeout=180)
        resumed = run_config(tmp_path, data, "restarted-2", **{"fl.rounds": 3, "fl.min_train_nodes": 2, "fl.min_available_nodes": 2,
                                                                 "output.resume": str(tmp_path / "runs" / "restarted")})
        res = cluster.flwr("run", str(ROOT), cluster.connection, "--stream", "--run-config", str(resumed))
        out = res.stdout + res.stderr
        run_dir = tmp_path / "runs" / "restarted"
        assert (run_dir / "final" / "global.safetensors").exists(), out[-5000:]
        assert "resuming restarted after round 1" in out
        rows = read_records(run_dir)
        assert sorted(r["round"] for r in rows if r["kind"] == "round") == [1, 2, 3]
        assert not (tmp_path / "runs" / "restarted-2").exists()
    finally:
        cluster.stop()


def fedcal(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedcal"), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("args, expected", [
    (["node", "--superlink", "127.0.0.1:{closed}", "--partition-id", "0", "--num-partitions", "2"], "cannot reach the SuperLink at 127.0.0.1:"),
    (["node", "--superlink", "superlink-host", "--partition-id", "0", "--num-partitions", "2"], "is not host:port"),
    (["node", "--superlink", "127.0.0.1:8000", "--partition-id", "0", "--num-partitions", "2", "--root-certificates", "/no/ca.crt"], "'/no/ca.crt' does not exist"),
    (["node", "--superlink", "127.0.0.1:8000", "--num-partitions", "2"], "no partition id: pass --partition-id"),
    (["node", "--superlink", "127.0.0.1:8000", "--partition-id", "5", "--num-partitions", "2"], "--partition-id 5 must be in [0, 1]"),
    (["superlink", "--certs", "/no/certs", "--dry-run"], "does not exist"),
    (["superlink", "--supernode-auth", "--dry-run"], "--supernode-auth needs TLS"),
    (["config", "-c", "fl.aggregatr=\"fedprox\""], "did you mean 'fl.aggregator'"),
    (["node", "--superlink", "127.0.0.1:8000", "--partition-id", "0", "--num-partitions", "2", "--executor", "fast"], "--executor 'fast' must be flower or warm"),
    (["node", "--superlink", "127.0.0.1:8000", "--partition-id", "0", "--num-partitions", "2", "--executor", "warm", "--no-warm"], "--executor warm needs the warm worker"),
])
def test_operator_mistakes_are_one_line(args, expected):
    args = [a.replace("{closed}", str(free_port())) for a in args]
    res = fedcal(*args)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], res.stderr
