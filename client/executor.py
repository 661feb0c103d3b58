"""The warm worker as its SuperNode's ClientApp executor: no process per message.

Flower runs a node's messages through an executor (``flower-superexec``) that asks the SuperNode's
runtime API for a task, then starts a fresh ``flwr-clientapp`` process per message: Python and
Flower's imports (~1.1 s on a CPU), the FAB unpacked, the ClientApp loaded, and only then
fedcal's relay to the warm worker. With ``fedcal node --executor warm`` (and ``fedcal cluster
--executor warm``) the SuperNode runs with ``--isolation process`` and the warm worker itself is
its executor: it asks for tasks (``AcquireTask``), and runs each in this process with the same
Flower calls a ``flwr-clientapp`` makes (pull the task input, run fedcal's ClientApp, push the
reply and the task output, heartbeat meanwhile). fedcal's ClientApp then computes in-process on
the worker's warm runtimes. The FAB's code is not loaded: the worker runs the fedcal it was
started from, like the relay path. Built on Flower 1.42's runtime API (``flwr.supercore``,
``flwr.supernode.runtime``).

One task at a time, as the SuperNode hands them out. A task whose work raises becomes Flower's
error reply (as in ``flwr-clientapp``); one that runs past ``runtime.worker_timeout`` makes the
worker exit after replying with an error (its thread cannot be stopped), and ``fedcal node``
restarts it. A worker killed mid-task leaves the task without heartbeat: the SuperNode answers
"ClientApp stopped responding" and hands the next task to the restarted worker (tests/test_faults.py).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

log = logging.getLogger(__name__)

#: How often the executor asks its SuperNode for a task (Flower's own executor: 1 s).
POLL_SECONDS = 0.1


def _client(address: str, component: str, token: str | None = None):
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str) -> bool:
    """Run one ClientApp task in this process, as ``flwr-clientapp --token`` would; returns False
    when the work outlived the run's ``runtime.worker_timeout`` (the worker must then exit)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from .app import app as client_app

    client = _client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, finished = SubStatus.FAILED, "ClientApp task failed", True
    try:
        message, context, _run, _fab = pull_task_input(client)
        timeout = float(context.run_config.get("runtime.worker_timeout", 3600.0))
        log.info("running %s message (run %s)", message.metadata.message_type, context.run_id)
        out: dict[str, Any] = {}

        def work() -> None:
            try:
                out["reply"] = client_app(message=message, context=context)
            except BaseException as err:  # noqa: BLE001 - becomes the error reply
                out["error"] = err

        worker = threading.Thread(target=work, name="fedcal-task", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            finished = False
            raise TimeoutError(f"the task outlived runtime.worker_timeout ({timeout:.0f}s); the worker restarts")
        if "error" in out:
            raise out["error"]
        reply, status, details = out["reply"], SubStatus.COMPLETED, ""
    except Exception as err:  # noqa: BLE001 - Flower's error reply, as flwr-clientapp sends it
        log.error("task failed:\n%s", traceback.format_exc())
        details = f"{type(err)}:<'{err}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()
    return finished


def serve_tasks(address: str, *, stop: threading.Event | None = None, poll: float = POLL_SECONDS) -> None:
    """Ask the SuperNode at ``address`` (its runtime API, e.g. 127.0.0.1:9094) for ClientApp tasks
    and run them here until ``stop`` is set, or a task times out (then return: the caller exits)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    stop = stop or threading.Event()
    client = _client(address, "SuperExec")
    log.info("executor for the SuperNode at %s: asking for tasks every %.2fs", address, poll)
    try:
        while not stop.is_set():
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[]))
            if res.HasField("task") and res.token:
                if res.task.type != TaskType.CLIENT_APP.value:
                    log.error("the SuperNode handed out a %r task; this executor runs ClientApps only", res.task.type)
                    continue
                t = time.monotonic()
                if not run_task(address, res.token):
                    return
                log.info("task %s done in %.2fs", res.task.task_id, time.monotonic() - t)
                continue
            stop.wait(poll)
    finally:
        client.close()
