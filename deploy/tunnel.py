"""An operator's tunnel to the Control API (``fedcal operator-tunnel``).

The ``flwr`` CLI (1.42) cannot present a client certificate, and the proxy (deploy/proxy.py) lets
only holders of an operator certificate reach ``/v1/control/``. This tunnel listens on loopback of
the operator's machine and forwards every connection to the proxy over TLS, verifying the proxy
with the deployment's CA and presenting the operator certificate. The ``flwr`` connection then
points at the tunnel (``address = "127.0.0.1:8001"``, ``insecure = true``: the hop is loopback;
what leaves the machine is TLS with the operator's certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from .preflight import parse_address


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: str, proxy: str, ctx: ssl.SSLContext, ready=None) -> None:
    lhost, lport = parse_address(listen, "--listen")
    phost, pport = parse_address(proxy, "--proxy")

    async def handle(local_r, local_w):
        try:
            remote_r, remote_w = await asyncio.open_connection(phost, pport, ssl=ctx, server_hostname=phost)
        except (OSError, ssl.SSLError):
            local_w.close()
            return
        await asyncio.gather(_pipe(local_r, remote_w), _pipe(remote_r, local_w))

    server = await asyncio.start_server(handle, lhost, lport)
    if ready is not None:
        ready()
    async with server:
        await server.serve_forever()


def run(listen: str, proxy: str, cert: str, key: str, ca: str) -> None:
    asyncio.run(serve(listen, proxy, client_context(cert, key, ca)))
