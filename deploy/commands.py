"""The exact Flower 1.42 command lines fedcal runs, in one place.

``fedcal cluster``, ``fedcal superlink``, ``fedcal node``, the process-level tests and
``docker/compose.yml`` all use these (a test checks that the compose services run exactly these
commands). Flower 1.42: the SuperLink serves the Fleet, Control and Runtime APIs on one HTTP(S)
port (default 8000, ``GET /health``); a SuperNode dials it with ``--superlink host:port`` and
serves its own runtime API on ``--host``/``--port`` (default 9094); with ``--isolation process``
a separate ``flower-superexec --runtime-api-address <superlink|supernode>:port`` runs the
ServerApp or ClientApp processes (that is where fedcal and its GPU must be).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094

#: Flower's SuperExec asks for an app to launch once a second by default
#: (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, flwr/supercore/superexec/run_superexec.py), so every
#: message waits up to 1 s before its ClientApp process starts. A node's executor started by fedcal
#: (``fedcal node``, ``fedcal cluster``, the compose clientapp services) asks every 0.25 s, for
#: ~1.7% of a core per idle node (0.1 s costs ~4%). Measured with the shorter ServerApp reply poll:
#: 0.2 +- 0.2 s less per round, since the SuperNode's fixed 3 s pull pause hides most of it
#: (bench/RESULTS.md, "Flower's floor alone"). An operator's own value wins. The SuperLink's
#: executor keeps Flower's default: it launches one ServerApp per run.
SUPEREXEC_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}


def flower_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with :data:`SUPEREXEC_ENV` where unset."""
    out = dict(os.environ if env is None else env)
    for key, value in SUPEREXEC_ENV.items():
        out.setdefault(key, value)
    return out


@dataclass(frozen=True)
class TLSFiles:
    """The files ``fedcal certs`` writes (deploy/certs.py)."""

    ca: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TLSFiles:
        folder = Path(folder)
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")


def node_config_string(partition_id: int, num_partitions: int, data_dir: str = "", **extra: str) -> str:
    """A ``--node-config`` value: TOML values, strings quoted."""
    items = [f"partition-id={int(partition_id)}", f"num-partitions={int(num_partitions)}"]
    if data_dir:
        items.append(f'data-dir="{data_dir}"')
    items += [f'{k.replace("_", "-")}="{v}"' for k, v in extra.items() if v]
    return " ".join(items)


def superlink_args(*, host: str = "0.0.0.0", port: int = SUPERLINK_PORT, database: str = "state/state.db",
                   tls: TLSFiles | None = None, supernode_auth: bool = False, isolation: str = "subprocess") -> list[str]:
    args = ["flower-superlink"]
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key)]
        if supernode_auth:
            args.append("--enable-supernode-auth")
    return args + ["--isolation", isolation, "--host", host, "--port", str(port), "--database", database,
                   "--disable-runtime-dependency-installation"]


def supernode_args(*, superlink: str, node_config: str, host: str = "127.0.0.1", port: int = SUPERNODE_PORT,
                   root_certificates: Path | str | None = None, auth_key: Path | str | None = None, isolation: str = "subprocess") -> list[str]:
    args = ["flower-supernode"]
    args += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(auth_key)]
    return args + ["--superlink", superlink, "--isolation", isolation, "--host", host, "--port", str(port), "--node-config", node_config]


def superexec_args(*, runtime_api_address: str, root_certificates: Path | str | None = None) -> list[str]:
    args = ["flower-superexec"]
    args += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    return args + ["--runtime-api-address", runtime_api_address]


PROXY_UPSTREAM_PORT = 8100  # the SuperLink's own port on loopback, behind the proxy


def proxy_args(conf: Path | str, error_log: Path | str) -> list[str]:
    """nginx in the foreground with fedcal's configuration (deploy/proxy.py)."""
    return ["nginx", "-e", str(Path(error_log).resolve()), "-c", str(Path(conf).resolve())]


def tunnel_args(*, proxy: str, cert: Path | str, key: Path | str, ca: Path | str, listen: str = "127.0.0.1:8001") -> list[str]:
    """An operator's local end of the Control API (deploy/tunnel.py)."""
    return ["fedcal", "operator-tunnel", "--proxy", proxy, "--cert", str(cert), "--key", str(key), "--ca", str(ca), "--listen", listen]
