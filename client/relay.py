"""The local channel between a ClientApp and its node's warm worker: a Unix socket only the node's
user can open (mode 0600, in a 0700 folder), one length-prefixed pickled request and response per
connection. Light on purpose: the relaying ClientApp imports neither torch nor CLIP through here.

The payload is pickled, so the socket's permissions are the trust boundary: only the user running
the SuperNode and the worker may connect. A worker that is not running is reported as
:class:`WorkerUnavailable` (the ClientApp then computes in-process); one that dies or hangs while
computing is :class:`WorkerFailed` after at most ``timeout`` seconds: the ClientApp never hangs.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ERROR_CODE_USER = 100  # Flower reserves small codes; ours say "fix the configuration or data"
ERROR_CODE_INTERNAL = 101


@dataclass
class Request:
    """One message for a node, in plain data: kind (train | evaluate | info | nll-grid), the run and
    node configuration, the message config, the packed arrays and the persisted client state."""

    kind: str
    run_config: dict[str, Any]
    node_config: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Any] | None = None
    state: dict[str, Any] = field(default_factory=dict)  # "carot-teacher" / "feddyn-grad": {k: array}; "scalars": {...}


@dataclass
class Response:
    """The reply's records (arrays, metrics, identity), the updated persisted state, or an error."""

    arrays: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    client: dict[str, Any] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    error: tuple[int, str] | None = None
    evaluation: dict[str, Any] | None = None  # a train reply's evaluation of the state it received (one-phase rounds)
    train_error: tuple[int, str] | None = None  # ... and the training that failed after it


_HEADER = struct.Struct(">Q")
MAX_FRAME = 8 << 30  # 8 GiB: more than any trainable state fedcal sends (full ViT-L fp32 is ~1.7 GB)


def failure_reason(node_config: dict[str, Any], err: BaseException, with_type: bool = True) -> str:
    """A failure as the reason a reply carries: the partition, then the error type and the first line
    of its message, or (``with_type=False``: a user-fixable error, written as one line) its message."""
    first = str(err).splitlines()[0] if str(err) else ""
    return f"partition {node_config.get('partition-id', '?')}: " + (f"{type(err).__name__}: {first}" if with_type else str(err))


class WorkerUnavailable(ConnectionError):
    """No warm worker listens on the socket (not started, or gone)."""


class WorkerFailed(RuntimeError):
    """The warm worker accepted the message but died, hung or answered garbage."""


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(min(n - got, 1 << 22))
        if not chunk:
            raise ConnectionResetError("the peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError
    return b"".join(chunks)


def send_frame(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_frame(sock: socket.socket, deadline: float) -> Any:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return pickle.loads(_recv_exact(sock, size, deadline))


def call(path: str | Path, request: Any, timeout: float) -> Any:
    """Send ``request`` to the worker at ``path``; its response, or WorkerUnavailable / WorkerFailed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(5.0)
            sock.connect(str(path))
        except (TimeoutError, FileNotFoundError, ConnectionRefusedError, OSError) as err:
            raise WorkerUnavailable(f"no warm worker at {path} ({type(err).__name__})") from None
        deadline = time.monotonic() + timeout
        try:
            send_frame(sock, request)
            return recv_frame(sock, deadline)
        except TimeoutError:
            raise WorkerFailed(f"the warm worker at {path} did not answer within {timeout:.0f}s (runtime.worker_timeout)") from None
        except (ConnectionError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
            raise WorkerFailed(f"the warm worker at {path} failed while computing ({type(err).__name__}: {err}); "
                               "the next message computes in-process unless the worker is restarted") from None
    finally:
        sock.close()


def listen(path: str | Path) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600 in a 0700 folder (a stale socket file is replaced)."""
    path = Path(path)
    if len(str(path).encode()) > 100:
        raise ValueError(f"socket path {path} is {len(str(path).encode())} bytes; a Unix socket path must stay under 108: choose a shorter --socket")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if path.is_socket():
        path.unlink()
    elif path.exists():
        raise FileExistsError(f"{path} exists and is not a socket; choose another --socket path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(8)
    return sock


def serve(sock: socket.socket, handle: Callable[[Any], Any], should_stop: Callable[[], bool], timeout: float = 3600.0) -> None:
    """Answer one connection at a time until ``should_stop()``; a broken client never stops the loop."""
    sock.settimeout(0.5)
    while not should_stop():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        with conn:
            try:
                request = recv_frame(conn, time.monotonic() + timeout)
            except (ConnectionError, EOFError, OSError, pickle.UnpicklingError, ValueError, TimeoutError):
                continue
            response = handle(request)
            try:
                conn.settimeout(timeout)
                send_frame(conn, response)
            except OSError:
                continue
