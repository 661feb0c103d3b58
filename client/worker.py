"""The warm node runtime: one long-lived process per SuperNode (``fedcal worker``).

It keeps what a cold ClientApp process rebuilds for every message: the imports, the frozen CLIP on
its device, the method, the node's partition, the feature cache and the text features, keyed by
the configuration that shapes them (client/handlers.py ``WarmRuntimes``; ``runtime.cache_size``).
The SuperNode's ClientApp relays each message to it over a Unix socket (client/relay.py) and
imports nothing heavy; per-client state that must persist (CaRot teacher, FedDyn state, personal
temperature) stays in Flower's ``context.state`` and travels with each message, so a run's records
and final state are the same with and without the worker.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("fedcal.worker")


def _handle(handlers, req):
    log.info("handling %s message (round %s) for partition %s", req.kind, req.config.get("server-round", "-"), req.node_config.get("partition-id", "?"))
    return handlers.handle(req, handlers.PROCESS_RUNTIMES)


def run_worker(socket_path: str | Path, *, ready_file: str | Path | None = None) -> None:
    """Serve until SIGTERM / SIGINT; imports and caches stay warm between messages."""
    from . import handlers, relay

    stop = {"now": False}

    def on_signal(signum, frame) -> None:  # noqa: ARG001
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sock = relay.listen(socket_path)
    log.info("warm worker listening on %s (pid %d)", socket_path, os.getpid())
    if ready_file:
        Path(ready_file).write_text(str(socket_path))
    try:
        relay.serve(sock, lambda req: _handle(handlers, req), lambda: stop["now"])
    finally:
        sock.close()
        Path(socket_path).unlink(missing_ok=True)
        log.info("warm worker stopped (%d runtime builds, %d reuses)", handlers.PROCESS_RUNTIMES.builds, handlers.PROCESS_RUNTIMES.hits)


def run_executor(supernode: str) -> None:
    """The worker as its SuperNode's ClientApp executor (client/executor.py) until SIGTERM / SIGINT."""
    import threading

    from . import handlers
    from .executor import serve_tasks

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("warm worker executing the ClientApps of the SuperNode at %s (pid %d)", supernode, os.getpid())
    try:
        serve_tasks(supernode, stop=stop)
    finally:
        log.info("warm worker stopped (%d runtime builds, %d reuses)", handlers.PROCESS_RUNTIMES.builds, handlers.PROCESS_RUNTIMES.hits)
