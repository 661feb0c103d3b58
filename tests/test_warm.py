"""The warm node runtime: a real `fedcal worker` process answering over its Unix socket exactly as
the in-process path does, failing in one line when killed, and a deployed run with warm workers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client import relay
from client.app import compute
from client.relay import Request
from common import config
from tests.processes import BIN, free_port

pytestmark = pytest.mark.slow
TIMING = {"train-seconds"}  # the only figure that depends on when it ran


def flat_config(pacs_dir, tmp_path, **extra) -> dict:
    cfg = config.load(None, model__name="fedcal-tiny", model__pretrained="", data__path=str(pacs_dir), data__partitioner="iid",
                      data__max_per_client=24, data__cache_dir=str(tmp_path / "cache"), optim__local_steps=2, optim__batch_size=8,
                      method__name="lora", **extra)
    return cfg.flat()


@pytest.fixture()
def worker(tmp_path):
    sock = Path(f"/tmp/fedcal-test-{os.getpid()}-{free_port()}/w.sock")
    proc = subprocess.Popen([str(BIN / "fedcal"), "worker", "--socket", str(sock)], stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not sock.is_socket():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
        time.sleep(0.1)
    yield sock, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def requests(pacs_dir, tmp_path, sock):
    from client.handlers import manifest_of
    from client.runtime import ClientRuntime
    from common.tensors import pack_arrays

    run_config = flat_config(pacs_dir, tmp_path)
    node_config = {"partition-id": 1, "num-partitions": 3, "worker-socket": str(sock)}
    rt = ClientRuntime.create(config.from_flat(run_config), config.parse_node_config(node_config))
    arrays = pack_arrays(rt.method.trainable_state(), manifest_of(rt))
    return [Request("info", run_config, node_config),
            Request("train", run_config, node_config, {"server-round": 1}, arrays),
            Request("train", run_config, node_config, {"server-round": 2}, arrays),  # the worker's runtime is warm now
            Request("evaluate", run_config, node_config, {"server-round": 2, "ts-mode": "none"}, arrays)]


def same(a, b) -> None:
    assert a.error is None and b.error is None, (a.error, b.error)
    assert (a.arrays is None) == (b.arrays is None)
    if a.arrays is not None:
        assert a.arrays.keys() == b.arrays.keys() and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    ma = {k: v for k, v in (a.metrics or {}).items() if k not in TIMING}
    mb = {k: v for k, v in (b.metrics or {}).items() if k not in TIMING}
    assert ma == mb
    assert {k: v for k, v in (a.client or {}).items() if k != "pid"} == {k: v for k, v in (b.client or {}).items() if k != "pid"}


IN_PROCESS = """
import pickle, sys
from client.handlers import WarmRuntimes, handle
reqs = pickle.load(open(sys.argv[1], "rb"))
runtimes = WarmRuntimes()
out = [handle(r, runtimes) for r in reqs]
pickle.dump((out, runtimes.builds, runtimes.hits), open(sys.argv[2], "wb"))
"""


def in_fresh_process(reqs, tmp_path):
    """What a ClientApp without a worker computes: the same handlers in a fresh process (its own
    global torch state, as on a node), keeping its runtimes across the messages."""
    import pickle

    src, dst = tmp_path / "reqs.pkl", tmp_path / "resps.pkl"
    src.write_bytes(pickle.dumps(reqs))
    res = subprocess.run([sys.executable, "-c", IN_PROCESS, str(src), str(dst)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return pickle.loads(dst.read_bytes())


def test_worker_answers_exactly_as_in_process(worker, pacs_dir, tmp_path):
    sock, proc = worker
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    reqs = requests(pacs_dir, tmp_path, sock)
    cold, builds, hits = in_fresh_process(reqs, tmp_path)
    for req, expected in zip(reqs, cold, strict=True):
        same(relay.call(sock, req, timeout=300), expected)
    assert builds == 1 and hits == 2  # in-process runtimes are reused too (runtime.cache_size)


def test_killed_worker_is_a_one_line_failure_then_the_node_computes_in_process(worker, pacs_dir, tmp_path):
    sock, proc = worker
    reqs = requests(pacs_dir, tmp_path, sock)
    slow = Request("train", {**reqs[1].run_config, "optim.local_steps": 400}, reqs[1].node_config, reqs[1].config, reqs[1].arrays)
    killer = subprocess.Popen(["sh", "-c", f"sleep 8; kill -9 {proc.pid}"])
    t = time.monotonic()
    resp = compute(slow)  # the ClientApp's path: relay, the worker dies mid-message
    assert time.monotonic() - t < 120
    assert resp.error is not None and "warm worker" in resp.error[1] and "failed while computing" in resp.error[1] and "\n" not in resp.error[1]
    killer.wait(timeout=30)
    with pytest.raises(relay.WorkerUnavailable):
        relay.call(sock, reqs[0], timeout=10)
    # the next message: no worker answers, the ClientApp computes in-process
    resp = compute(reqs[1])
    assert resp.error is None and resp.arrays is not None and resp.metrics["local-steps"] == 2


def test_hung_worker_times_out(tmp_path, pacs_dir):
    """A worker that accepts but never answers: the ClientApp gets a one-line failure after the timeout."""
    import threading

    sock_path = Path(f"/tmp/fedcal-test-{os.getpid()}-hang/w.sock")
    server = relay.listen(sock_path)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    t = time.monotonic()
    with pytest.raises(relay.WorkerFailed, match="did not answer within 2s"):
        relay.call(sock_path, Request("info", {}, {}), timeout=2)
    assert time.monotonic() - t < 10
    server.close()
    for conn, _ in held:
        conn.close()
    sock_path.unlink()


def test_worker_restarts_back_off_while_it_keeps_dying():
    """`fedcal node` restarts a dead worker after 1 s, doubling the wait (to at most 60 s) while
    it keeps dying within a minute of its start, and back to 1 s after a stable run."""
    from deploy.warm import MAX_RESTART_DELAY, STABLE_SECONDS, restart_delay

    delays, delay = [], 0.0
    for _ in range(9):  # a worker that crashes at import, again and again
        delay = restart_delay(delay, uptime=0.5)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60] and MAX_RESTART_DELAY == 60
    assert restart_delay(60.0, uptime=STABLE_SECONDS + 1) == 1.0
