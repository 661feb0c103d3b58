"""A local Flower deployment in one command (``fedcal cluster``): SuperLink + N SuperNodes.

Real processes on loopback, exactly as on separate machines (deploy/commands.py): one
``flower-superlink`` (state in ``<work-dir>/state.db``) and N ``flower-supernode`` processes, node
i holding partition i of N with ``data-dir`` pointing at the local image folder. With ``tls`` the
command also creates a CA, the SuperLink certificate and one key per SuperNode (deploy/certs.py),
starts the SuperLink with TLS and ``--enable-supernode-auth`` and registers every key with
``flwr supernode register`` before its SuperNode starts. A ``flwr`` connection named
``fedcal-local`` (``fedcal-local-tls``) is added to the Flower configuration, so that

    flwr run . fedcal-local --stream --run-config configs/offline-smoke.toml

submits a run. With ``warm`` every SuperNode gets a warm worker (``worker-<i>``, its socket in a
per-user 0700 folder under /tmp) that its ClientApps relay to (deploy/warm.py). Logs are in ``<work-dir>/logs/``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from . import certs, preflight
from .commands import TLSFiles, flower_env, node_config_string, superlink_args, supernode_args
from .warm import cluster_socket, executor_args, wait_socket, worker_args


def flwr_home(env: dict[str, str] | None = None) -> Path:
    env = env if env is not None else dict(os.environ)
    return Path(env.get("FLWR_HOME", Path(env.get("HOME", "~")).expanduser() / ".flwr"))


def add_connection(home: Path, name: str, address: str, root_certificates: Path | None = None, make_default: bool = False) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in Flower's config.toml, keeping everything else."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    import tomli_w

    path = Path(home) / "config.toml"
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


@dataclass
class Cluster:
    work_dir: Path
    address: str
    connection: str
    tls: TLSFiles | None
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ports: list[int] = field(default_factory=list)

    def logs(self, name: str) -> str:
        return (self.work_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fh = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(args, env=self.env if env is None else env, cwd=self.work_dir, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        fh.close()
        self.processes[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.kill(name, signal.SIGTERM)

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def online_nodes(self) -> int:
        import json

        res = self.flwr("supernode", "list", self.connection, "--format", "json", timeout=60)
        try:
            return sum(1 for n in json.loads(res.stdout)["nodes"] if n.get("status") == "online")
        except (ValueError, KeyError):
            return 0

    def wait_online(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.online_nodes()} of {count} SuperNodes came online within {timeout:.0f}s; see {self.work_dir / 'logs'}")
            time.sleep(1.0)


def wait_http(url: str, ca: Path | None = None, timeout: float = 60.0, proc: subprocess.Popen | None = None, what: str = "") -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or url} exited with status {proc.returncode} during start-up")
        try:
            if httpx.get(url, timeout=2.0, verify=str(ca) if ca else True).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what or url} did not become healthy within {timeout:.0f}s")


def start_cluster(
    work_dir: Path,
    supernodes: int,
    data_dir: str,
    *,
    port: int = 8000,
    node_port: int = 9094,
    tls: bool = False,
    env: dict[str, str] | None = None,
    connection: str | None = None,
    node_extra: dict[int, dict[str, str]] | None = None,
    warm: bool = False,
    executor: bool | Collection[int] = False,
) -> Cluster:
    """Start a SuperLink and ``supernodes`` SuperNodes on 127.0.0.1; returns when all are up.
    ``executor``: the nodes (True: all) whose warm worker is their ClientApp executor (client/executor.py)."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    preflight.check_node(0, supernodes, data_dir)
    preflight.port_free("127.0.0.1", port, "--port")
    for i in range(supernodes):
        preflight.port_free("127.0.0.1", node_port + i, "--node-port")
    env = dict(env if env is not None else os.environ)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    tls_files = None
    if tls:
        certs.generate(work_dir / "certs", ["localhost", "127.0.0.1"], supernodes=supernodes, force=True)  # the cluster owns its work dir
        tls_files = TLSFiles.in_folder(work_dir / "certs")
    address = f"127.0.0.1:{port}"
    connection = connection or ("fedcal-local-tls" if tls else "fedcal-local")
    cluster = Cluster(work_dir, address, connection, tls_files, env)
    try:
        link = cluster.start("superlink", superlink_args(host="127.0.0.1", port=port, database=str(work_dir / "state.db"),
                                                         tls=tls_files, supernode_auth=tls))
        wait_http(f"{'https' if tls else 'http'}://127.0.0.1:{port}/health", tls_files.ca if tls_files else None, proc=link, what="flower-superlink")
        add_connection(flwr_home(env), connection, address, tls_files.ca if tls_files else None)
        for i in range(supernodes):
            key = None
            if tls_files:
                key = work_dir / "certs" / f"supernode-{i}"
                res = cluster.flwr("supernode", "register", str(key) + ".pub", connection, timeout=120)
                if res.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed for supernode-{i}: {(res.stdout + res.stderr).strip()[-500:]}")
            extra = dict((node_extra or {}).get(i, {}))
            executes = executor is True or (not isinstance(executor, bool) and i in executor)
            if warm and not executes:  # the node's warm worker first: its ClientApps relay to it
                sock = cluster_socket(work_dir, i)
                wait_socket(sock, cluster.start(f"worker-{i}", worker_args(sock)))
                extra["worker_socket"] = str(sock)
            args = supernode_args(superlink=address, node_config=node_config_string(i, supernodes, data_dir, **extra),
                                  port=node_port + i, root_certificates=tls_files.ca if tls_files else None, auth_key=key,
                                  isolation="process" if executes else "subprocess")
            proc = cluster.start(f"supernode-{i}", args, env=flower_env(env))
            cluster.node_ports.append(node_port + i)
            wait_http(f"http://127.0.0.1:{node_port + i}/health", proc=proc, what=f"supernode-{i}")
            if executes:  # the warm worker runs the node's ClientApps itself (client/executor.py)
                cluster.start(f"worker-{i}", executor_args(f"127.0.0.1:{node_port + i}"))
        cluster.wait_online(supernodes)
    except BaseException:
        cluster.stop()
        raise
    return cluster
