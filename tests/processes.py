"""Real Flower processes for tests: start, wait until healthy, stop (always, even on failure)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "FEDCAL_QUIET": "1",
        "RAY_DISABLE_USAGE_STATS": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    env.update(extra)
    return env


class Proc:
    """A process in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT):
        self.args, self.log = args, log
        self.fh = open(log, "wb")
        self.p = subprocess.Popen(args, env=env, cwd=cwd, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=10)
        self.fh.close()


def wait_healthy(url: str, proc: Proc | None = None, timeout: float = 60.0, **client_kwargs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.args[0]} exited early:\n{proc.output()[-3000:]}")
        try:
            if httpx.get(url, timeout=2.0, **client_kwargs).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout}s" + (f":\n{proc.output()[-3000:]}" if proc else ""))


def write_connection(home: Path, name: str, address: str, *, insecure: bool = True, root_certificates: str | None = None) -> None:
    cfg = home / "flwr" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    lines = [] if not cfg.exists() else cfg.read_text().splitlines()
    if not any(line.strip() == "[superlink]" for line in lines):
        lines = ["[superlink]", f'default = "{name}"', ""] + lines
    lines += [f"[superlink.{name}]", f'address = "{address}"']
    lines += ["insecure = true"] if insecure else [f'root-certificates = "{root_certificates}"']
    cfg.write_text("\n".join(lines) + "\n")


@contextmanager
def processes():
    """Collect processes and stop all of them when the block ends."""
    started: list[Proc] = []

    def start(args, env, log, cwd=ROOT) -> Proc:
        proc = Proc(args, env, log, cwd)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.kill(signal.SIGTERM)


def flwr(args: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def preset(path: Path, out: Path, **overrides) -> Path:
    """A copy of a TOML preset with dotted-key overrides (flwr run takes one TOML or key=values)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    import tomli_w

    data = tomllib.loads(Path(path).read_text())
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    out.write_text(tomli_w.dumps(data))
    return out
