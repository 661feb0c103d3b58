"""One writer per run folder: an exclusive ``flock`` on ``<run>/.lock``, which the kernel releases
even when the holder is killed with ``kill -9``. The lock file names its holder (pid, host, what),
so a refused second writer can say who holds the folder. The ServerApp takes it (server/records.py);
``fedcal run`` probes it before it submits a run for a folder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import IO


def acquire(folder: Path, owner: str = "") -> IO[str] | None:
    """The open, locked lock file, or None if another process holds the folder."""
    fh = open(Path(folder) / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}{f' ({owner})' if owner else ''} since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    fh.flush()
    return fh


def holder(folder: Path) -> str | None:
    """Who holds the folder's lock now (its own words), or None if nobody does."""
    path = Path(folder) / ".lock"
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None
