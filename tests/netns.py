"""Test hosts in Linux network namespaces: one bridge, one namespace per host, torn down after.

Every address lives inside namespaces this module creates (10.201.0.0/24 behind a bridge in its
own namespace), so no traffic leaves the test's own hosts and loopback.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from contextlib import contextmanager

SUBNET = "10.201.0"


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def network(hosts: list[str]):
    """Yield {host: (namespace, address)}; the first host gets SUBNET.1."""
    tag = secrets.token_hex(2)
    hub = f"fchub{tag}"
    made: list[str] = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        out = {}
        for i, host in enumerate(hosts):
            ns = f"fc{host}{tag}"
            _ip("netns", "add", ns)
            made.append(ns)
            inner, outer = f"v{i}{tag}", f"h{i}{tag}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", hub)
            _ip("-n", hub, "link", "set", outer, "master", "br0", "up")
            address = f"{SUBNET}.{i + 1}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out[host] = (ns, address)
        yield out
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def run_in(ns: str, args: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]
