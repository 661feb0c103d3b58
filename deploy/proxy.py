"""The reverse proxy in front of the SuperLink: only the Fleet API is public, the Control API needs an
operator certificate, nothing else is routed.

Open-source Flower 1.42 serves the Fleet, Control and Runtime APIs on one port and authenticates
none of the Control API: whoever reaches the port can register SuperNode keys and submit runs.
fedcal therefore binds the SuperLink to loopback (with TLS, so SuperNode authentication stays on)
and puts Debian's nginx in front of it on the public address:

- ``/v1/fleet/`` and ``/health``: TLS (server.pem); SuperNodes still sign every request with their
  registered key, which the SuperLink checks;
- ``/v1/control/``: TLS *and* a client certificate issued by the deployment's CA
  (``operator-<i>.pem`` from ``fedcal certs``), else 403;
- everything else (the Runtime API the ServerApp executors use, ...): 404. The SuperLink's own
  executors dial it on loopback directly.

nginx was chosen because it is in Debian (security updates through the distribution), does client-
certificate verification per location, streams request and response bodies (Flower messages can be
large) and is one small configuration file; the exact file is :func:`nginx_conf` and the command
line :func:`deploy.commands.proxy_args`.

The ``flwr`` CLI cannot present a client certificate, so an operator runs :mod:`deploy.tunnel`
(``fedcal operator-tunnel``) on their own machine: it listens on loopback and forwards each
connection over TLS with the operator certificate; the ``flwr`` connection points at it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .commands import TLSFiles

PUBLIC_PREFIX = "/v1/fleet/"
OPERATOR_PREFIX = "/v1/control/"


def nginx_conf(*, listen: str, port: int, upstream_port: int, tls: TLSFiles, work_dir: Path, upstream_host: str = "127.0.0.1",
               upstream_name: str = "localhost") -> str:
    """The complete nginx.conf (foreground, files under ``work_dir``). The proxy verifies the SuperLink
    at ``upstream_host`` under ``upstream_name`` (a name its certificate covers)."""
    w = Path(work_dir).resolve()
    upstream = f"https://{upstream_host}:{upstream_port}"
    proxied = f"""proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {Path(tls.ca).resolve()};
            proxy_ssl_verify on;
            proxy_ssl_name {upstream_name};
            proxy_request_buffering off;
            proxy_buffering off;"""
    return f"""# written by fedcal (deploy/proxy.py); see that module for what each location allows
daemon off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/proxy-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {w}/proxy-access.log;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    client_max_body_size 0;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
    server_tokens off;
    server {{
        listen {listen}:{port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {Path(tls.server_cert).resolve()};
        ssl_certificate_key {Path(tls.server_key).resolve()};
        ssl_client_certificate {Path(tls.ca).resolve()};
        ssl_verify_client optional;
        location {PUBLIC_PREFIX} {{
            {proxied}
        }}
        location = /health {{
            {proxied}
        }}
        location {OPERATOR_PREFIX} {{
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
            {proxied}
        }}
        location / {{ return 404; }}
    }}
}}
"""


def write_conf(work_dir: Path, **kwargs) -> Path:
    """Write nginx.conf and the folders it names into ``work_dir``; returns the file."""
    work_dir = Path(work_dir)
    (work_dir / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(work_dir / "tmp", 0o1777)  # nginx's workers (nobody when started as root) buffer here
    path = work_dir / "nginx.conf"
    path.write_text(nginx_conf(work_dir=work_dir, **kwargs))
    return path


COMPOSE = {"listen": "0.0.0.0", "port": 8000, "upstream_port": 8100, "upstream_host": "superlink", "upstream_name": "superlink",
           "tls": TLSFiles(Path("/certificates/ca.crt"), Path("/certificates/server.pem"), Path("/certificates/server.key")),
           "work_dir": Path("/tmp/fedcal-proxy")}


def compose_conf() -> str:
    """docker/nginx.tls.conf, the proxy service's configuration in docker/compose.tls.yml (a test keeps them equal)."""
    return nginx_conf(**COMPOSE)
