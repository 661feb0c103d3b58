"""Hugging Face hub access that fails fast and clearly when the machine is offline.

huggingface_hub retries unreachable hosts with back-off (about 50 s per file) and then raises a
long traceback. fedcal first checks the local cache, then probes the hub endpoint once (a few
seconds at most) and, when it cannot be reached, raises :class:`HubUnavailable` whose message is
one line telling the user what to do instead.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import urlparse


class HubUnavailable(RuntimeError):
    """A hub download is needed but impossible; ``str(err)`` is one actionable line."""


def offline_requested(config_offline: bool = False) -> bool:
    env = (os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")).lower()
    return config_offline or env in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@lru_cache(maxsize=4)
def _probe(url: str, timeout: float) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def reachable(timeout: float = 5.0) -> bool:
    """True if the hub endpoint accepts a TCP connection (cached per process)."""
    return _probe(endpoint(), timeout)


@contextmanager
def offline_mode(on: bool = True):
    """Make huggingface_hub use its cache only (no HTTP at all) inside the block."""
    import huggingface_hub.constants as hf_constants

    previous = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = bool(on or previous)
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = previous
