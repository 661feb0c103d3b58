"""Starting and supervising a node's warm worker (client/worker.py) beside its SuperNode.

``fedcal node`` runs flower-supernode and ``fedcal worker`` side by side: the SuperNode's node config
names the worker's socket (``worker-socket``), a worker that dies is restarted (its ClientApps
compute in-process meanwhile), and stopping the node stops both. ``fedcal cluster`` starts one
worker per SuperNode the same way (deploy/cluster.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_socket(node_port: int) -> Path:
    """A per-user 0700 folder (``$XDG_RUNTIME_DIR/fedcal`` or ``/tmp/fedcal-<uid>``), one socket per node port."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    folder = base / ("fedcal" if os.environ.get("XDG_RUNTIME_DIR") else f"fedcal-{os.getuid()}")
    return folder / f"worker-{node_port}.sock"


def cluster_socket(work_dir: str | Path, index: int) -> Path:
    """A short socket path for node ``index`` of a cluster (a Unix socket path must stay under 108 bytes)."""
    import hashlib

    tag = hashlib.sha1(str(Path(work_dir).resolve()).encode()).hexdigest()[:10]
    return default_socket(0).parent / f"{tag}-{index}.sock"


def worker_args(socket_path: str | Path) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", "worker", "--socket", str(socket_path)]


def executor_args(supernode: str) -> list[str]:
    """The warm worker as the ClientApp executor of the SuperNode whose runtime API is ``supernode``."""
    return [sys.executable, "-m", "deploy.cli", "worker", "--supernode", supernode]


def wait_socket(path: str | Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).is_socket():
        if proc.poll() is not None:
            raise RuntimeError(f"the warm worker exited with status {proc.returncode} before listening on {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the warm worker did not listen on {path} within {timeout:.0f}s")
        time.sleep(0.1)


#: A worker that dies within this many seconds of its start doubles the wait before the next start
#: (from 1 s, at most 60 s); one that ran longer is restarted after 1 s.
STABLE_SECONDS = 60.0
MAX_RESTART_DELAY = 60.0


def restart_delay(previous: float, uptime: float) -> float:
    """Seconds to wait before restarting a worker that ran ``uptime`` s, after waiting ``previous`` s last time."""
    return 1.0 if uptime >= STABLE_SECONDS or previous <= 0 else min(previous * 2, MAX_RESTART_DELAY)


def supervise(supernode: list[str], socket_path: str = "", poll: float = 1.0, executor_for: str = "") -> int:
    """Run the SuperNode and the worker until the SuperNode exits or a signal arrives; restart the
    worker if it dies, backing off while it keeps dying at start (relaying ClientApps compute
    in-process meanwhile; with ``executor_for`` = the node's runtime API address the worker is the
    node's executor, started once the node is up, and the node's messages wait for it)."""
    from .commands import flower_env

    cwd = Path(__file__).resolve().parents[1]
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    args = executor_args(executor_for) if executor_for else worker_args(socket_path)
    if executor_for:
        node = subprocess.Popen(supernode, env=flower_env())
        worker = subprocess.Popen(args, cwd=cwd)
    else:
        worker = subprocess.Popen(args, cwd=cwd)
        wait_socket(socket_path, worker)
        node = subprocess.Popen(supernode, env=flower_env())
    started, delay, restart_at = time.monotonic(), 0.0, None
    try:
        while not stop["now"] and node.poll() is None:
            now = time.monotonic()
            if restart_at is None and worker.poll() is not None:
                delay = restart_delay(delay, now - started)
                restart_at = now + delay
                print(f"fedcal node: the warm worker exited ({worker.returncode}); restarting it in {delay:.0f}s", file=sys.stderr)
            if restart_at is not None and now >= restart_at:
                worker, started, restart_at = subprocess.Popen(args, cwd=cwd), now, None
            time.sleep(poll)
    finally:
        for proc in (node, worker):
            if proc.poll() is None:
                proc.terminate()
        for proc in (node, worker):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return node.returncode or 0
