"""The ClientApp (Flower 1.42 Message API): a thin relay to the node's warm worker, or in-process.

Messages and replies (record names in quotes):

- ``train``: "arrays" (the global trainable state, packed: common/tensors.py) + "config"
  (server-round, proximal-mu, feddyn-alpha, manifest) -> "arrays" (the new trainable state,
  packed), "metrics" (num-examples, uniform-weight, train loss terms, local-steps, train-seconds,
  fednova-a, update-norm), "client" (identity). In one-phase rounds (``fl.schedule``) the config
  may also carry evaluate-round / evaluate-ts-mode / evaluate-temperature: the node then first
  evaluates the state it received (the previous round's figures) and adds them as "eval-metrics",
  exactly what an ``evaluate`` message would have returned. If the training then fails, the reply
  keeps the evaluation and carries the failure as "train-error" (code, reason) instead of "arrays"
  and "metrics".
- ``evaluate``: "arrays" + "config" (server-round, temperature, ts-mode)
  -> "metrics" (exact calibration sums per split, before and after temperature scaling, adaptive
  ECE, num-examples), "client" (identity).
- ``query`` with config action ``info`` -> "client" (partition, domain, role, split sizes, class
  names); action ``nll-grid`` + "arrays" + config temperatures -> "metrics" (NLL sums at each
  candidate temperature on eval.ts_split, for federated temperature scaling).

What is computed lives in client/handlers.py and works on plain data. When the node runs a warm
worker (``fedcal worker``; node-config ``worker-socket``), this process only converts the message
to a request, relays it over the worker's Unix socket and converts the response back: it imports
neither torch nor CLIP. Without a worker (simulation, or none started) it computes in-process,
keeping built runtimes in the process (``runtime.cache_size``: a simulation's Ray actors serve
many messages). A worker that is not running is logged and the message computed in-process; one
that dies or hangs mid-message is a one-line error reply after at most ``runtime.worker_timeout``.

State that must outlive a process lives in ``context.state`` and travels with every request: the
CaRot EMA teacher and step counter, the FedDyn gradient state, the personal temperature. Errors a
user can fix come back to the server as one-line error replies.
"""

from __future__ import annotations

import logging
import traceback

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from common.replies import TRAIN_ERROR_RECORD, TRAIN_EVALUATION_RECORD

from . import relay
from .relay import ERROR_CODE_INTERNAL, Request, Response

log = logging.getLogger("fedcal.client")
app = ClientApp()

STATE_ARRAYS = ("carot-teacher", "feddyn-grad")  # per-client tensors kept in context.state
STATE_SCALARS = "fedcal"  # carot-step, temperature


# ------------------------------------------------------------------ message <-> plain data
def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _state_in(context: Context) -> dict:
    state: dict = {}
    for key in STATE_ARRAYS:
        if key in context.state.array_records:
            state[key] = {k: a.numpy() for k, a in context.state[key].items()}
    if STATE_SCALARS in context.state.config_records:
        state["scalars"] = dict(context.state[STATE_SCALARS])
    return state


def _state_out(context: Context, state: dict) -> None:
    for key in STATE_ARRAYS:
        if state.get(key) is not None:
            context.state[key] = _record(state[key])
    if "scalars" in state:
        context.state[STATE_SCALARS] = ConfigRecord(dict(state["scalars"]))


def request_of(kind: str, msg: Message, context: Context) -> Request:
    content = msg.content
    config = dict(content["config"]) if "config" in content.config_records else {}
    arrays = {k: a.numpy() for k, a in content["arrays"].items()} if "arrays" in content.array_records else None
    return Request(kind, dict(context.run_config), dict(context.node_config), config, arrays, _state_in(context))


def reply_of(resp: Response, msg: Message, context: Context) -> Message:
    if resp.error is not None:
        return Message(Error(code=resp.error[0], reason=resp.error[1]), reply_to=msg)
    _state_out(context, resp.state)
    records: dict = {}
    if resp.arrays is not None:
        records["arrays"] = _record(resp.arrays)
    if resp.metrics is not None:
        records["metrics"] = MetricRecord(resp.metrics)
    if resp.evaluation is not None:
        records[TRAIN_EVALUATION_RECORD] = MetricRecord(resp.evaluation)
    if resp.train_error is not None:
        records[TRAIN_ERROR_RECORD] = ConfigRecord({"code": resp.train_error[0], "reason": resp.train_error[1]})
    if resp.client is not None:
        records["client"] = ConfigRecord(resp.client)
    return Message(RecordDict(records), reply_to=msg)


# ------------------------------------------------------------------ relay or compute
def _worker_timeout(req: Request) -> float:
    return float(req.run_config.get("runtime.worker_timeout", 3600.0))


def compute(req: Request) -> Response:
    """The response to ``req``: from the node's warm worker when one is configured and running,
    else computed in this process (client/handlers.py)."""
    path = req.node_config.get("worker-socket")
    if path:
        try:
            return relay.call(str(path), req, _worker_timeout(req))
        except relay.WorkerUnavailable as err:
            log.warning("%s: computing in this process (start `fedcal worker --socket %s` to keep the node warm)", err, path)
        except relay.WorkerFailed as err:
            return Response(state=req.state, error=(ERROR_CODE_INTERNAL, relay.failure_reason(req.node_config, err, with_type=False)))
    from .handlers import handle  # torch, CLIP and the data stack: only where computed

    return handle(req)


def serve(kind: str, msg: Message, context: Context) -> Message:
    try:
        return reply_of(compute(request_of(kind, msg, context)), msg, context)
    except Exception as err:  # noqa: BLE001 - a malformed message is an error reply, never a crash
        log.error("client failed:\n%s", traceback.format_exc())
        return Message(Error(code=ERROR_CODE_INTERNAL, reason=relay.failure_reason(context.node_config, err)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return serve("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return serve("evaluate", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    action = str(msg.content["config"].get("action", "info")) if "config" in msg.content.config_records else "info"
    return serve(action, msg, context)
