"""The ClientApp (Flower 1.42 Message API).

Messages and replies (record names in quotes):

- ``train``: "arrays" (global trainable state) + "config" (server-round, proximal-mu, feddyn-alpha)
  -> "arrays" (new trainable state), "metrics" (num-examples, uniform-weight, train loss terms,
  local-steps, train-seconds, fednova-a, update-norm), "client" (identity).
- ``evaluate``: "arrays" + "config" (server-round, temperature, ts-mode)
  -> "metrics" (exact calibration sums per split, before and after temperature scaling, adaptive
  ECE, num-examples), "client" (identity).
- ``query`` with config action ``info`` -> "client" (partition, domain, role, split sizes, class
  names); action ``nll-grid`` + "arrays" + config temperatures -> "metrics" (NLL sums at each
  candidate temperature on eval.ts_split, for federated temperature scaling).

State that must outlive a process lives in ``context.state``: the CaRot EMA teacher and step
counter, the FedDyn gradient state, and the personal temperature. Errors a user can fix come back
to the server as one-line error replies.
"""

from __future__ import annotations

import functools
import logging
import os
import traceback

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.calibration import fit_temperature, nll_at_temperatures
from common.config import ConfigError, RunConfig, from_flower, parse_node_config
from common.data import DataError, load_client_data
from common.hub import HubUnavailable
from common.methods import StateError
from common.tensors import Manifest, from_record, pack, to_record, unpack

from . import faults
from .runtime import ClientRuntime

log = logging.getLogger("fedcal.client")
app = ClientApp()

USER_ERRORS = (ConfigError, DataError, HubUnavailable, StateError, FloatingPointError)
ERROR_CODE_USER = 100  # Flower reserves small codes; ours say "fix the configuration or data"
ERROR_CODE_INTERNAL = 101


def one_line_errors(handler):
    """Reply with a one-line Error instead of a traceback; log the full traceback locally."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except USER_ERRORS as err:
            reason = f"partition {context.node_config.get('partition-id', '?')}: {err}"
            log.error(reason)
            return Message(Error(code=ERROR_CODE_USER, reason=reason), reply_to=msg)
        except Exception as err:
            log.error("client failed:\n%s", traceback.format_exc())
            first = str(err).splitlines()[0] if str(err) else ""
            reason = f"partition {context.node_config.get('partition-id', '?')}: {type(err).__name__}: {first}"
            return Message(Error(code=ERROR_CODE_INTERNAL, reason=reason), reply_to=msg)

    return wrapper


def _setup(context: Context) -> tuple[RunConfig, object]:
    return from_flower(dict(context.run_config)), parse_node_config(dict(context.node_config))


def identity(rt_or_data, node, cfg: RunConfig | None = None) -> ConfigRecord:
    """The node's identity; the server takes it from here only at join (an echo elsewhere)."""
    data = getattr(rt_or_data, "data", rt_or_data)
    record = {"partition-id": int(node.partition_id), "num-partitions": int(node.num_partitions), "domain": data.domain, "role": data.role}
    return ConfigRecord(faults.corrupt_identity(cfg, node.partition_id, record) if cfg else record)


def _manifest(rt) -> Manifest:
    """This node's manifest of the trainable state; the server's packed arrays must carry its digest."""
    return Manifest.of(rt.method.trainable_named_parameters())


# ------------------------------------------------------------------ persisted client state
def _load_arrays(context: Context, key: str) -> dict[str, torch.Tensor] | None:
    return from_record(context.state[key]) if key in context.state.array_records else None


def _save_arrays(context: Context, key: str, state: dict[str, torch.Tensor] | None) -> None:
    if state is not None:
        context.state[key] = to_record(state)


def _scalars(context: Context) -> ConfigRecord:
    if "fedcal" not in context.state.config_records:
        context.state["fedcal"] = ConfigRecord({"carot-step": 0, "temperature": 1.0})
    return context.state["fedcal"]


# ------------------------------------------------------------------ handlers
@app.train()
@one_line_errors
def train(msg: Message, context: Context) -> Message:
    cfg, node = _setup(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    rt = ClientRuntime.create(cfg, node)
    if rt.data.role == "unseen":
        raise ConfigError(f"partition {node.partition_id} is a held-out (unseen) client and must not be sampled for training")
    manifest = _manifest(rt)
    global_state = unpack(msg.content["arrays"], manifest)
    scalars = _scalars(context)
    out = rt.train(
        global_state, server_round=server_round, fl_config=dict(config),
        teacher=_load_arrays(context, "carot-teacher"), carot_step=int(scalars["carot-step"]),
        feddyn_grad=_load_arrays(context, "feddyn-grad") if float(config.get("feddyn-alpha", 0.0)) > 0 else None,
    )
    _save_arrays(context, "carot-teacher", out.teacher)
    _save_arrays(context, "feddyn-grad", out.feddyn_grad)
    scalars["carot-step"] = int(out.carot_step)
    state = faults.corrupt_state(cfg, node.partition_id, out.state, global_state)
    norm = float(np.sqrt(sum(float(((state[k] - global_state[k]) ** 2).sum()) for k in global_state if k in state and state[k].shape == global_state[k].shape)))
    metrics = {k: (int(v) if isinstance(v, (bool, np.integer)) else v) for k, v in out.metrics.items()}
    metrics.update({"uniform-weight": 1, "update-norm": norm, "server-round": server_round})
    metrics = faults.corrupt_train_metrics(cfg, node.partition_id, metrics)
    log.info("round %d partition %d: %d steps, loss %.4f, %.1fs", server_round, node.partition_id, metrics["local-steps"], out.metrics["train-loss"], metrics["train-seconds"])
    arrays = faults.corrupt_record(cfg, node.partition_id, pack(state, manifest))
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "client": identity(rt, node, cfg)}), reply_to=msg)


@app.evaluate()
@one_line_errors
def evaluate(msg: Message, context: Context) -> Message:
    cfg, node = _setup(context)
    config = msg.content["config"]
    rt = ClientRuntime.create(cfg, node)
    rt.method.load_trainable_state(unpack(msg.content["arrays"], _manifest(rt)))
    splits = ["test"] if rt.data.role == "unseen" else cfg.eval.split_list()
    ts_mode = str(config.get("ts-mode", "none"))
    global_t = float(config.get("temperature", 1.0))
    scalars = _scalars(context)
    metrics: dict = {"num-examples": 0}
    logits_cache = {split: rt.logits(split) for split in set(splits)}
    temperature = None
    if ts_mode == "per-client" and rt.data.role == "seen":
        logits, labels = logits_cache.get(cfg.eval.ts_split) or rt.logits(cfg.eval.ts_split)
        temperature = fit_temperature(logits, labels) if len(labels) else global_t
        scalars["temperature"] = float(temperature)
    elif ts_mode != "none":
        temperature = global_t
    from .train import evaluate_logits

    for split in splits:
        logits, labels = logits_cache[split]
        metrics.update(evaluate_logits(split, logits, labels, cfg.eval.n_bins).metrics(f"{split}-"))
        if temperature is not None:
            metrics.update(evaluate_logits(split, logits, labels, cfg.eval.n_bins, temperature).metrics(f"{split}-ts-"))
        metrics["num-examples"] += int(len(labels))
    metrics["server-round"] = int(config.get("server-round", 0))
    metrics = faults.corrupt_eval_metrics(cfg, node.partition_id, metrics)
    return Message(RecordDict({"metrics": MetricRecord(metrics), "client": identity(rt, node, cfg)}), reply_to=msg)


@app.query()
@one_line_errors
def query(msg: Message, context: Context) -> Message:
    cfg, node = _setup(context)
    config = msg.content["config"]
    action = str(config.get("action", "info"))
    if action == "info":
        data = load_client_data(cfg.data, node)
        record = identity(data, node)
        record.update({
            "class-names": list(data.class_names),
            "train-size": data.size("train"), "val-size": data.size("val"), "test-size": data.size("test"),
            "pid": os.getpid(),
        })
        return Message(RecordDict({"client": record}), reply_to=msg)
    if action == "nll-grid":
        rt = ClientRuntime.create(cfg, node)
        rt.method.load_trainable_state(unpack(msg.content["arrays"], _manifest(rt)))
        temps = [float(t) for t in config["temperatures"]]
        logits, labels = rt.logits(cfg.eval.ts_split) if rt.data.role == "seen" else (torch.zeros(0, len(rt.data.class_names)), torch.zeros(0, dtype=torch.long))
        sums = nll_at_temperatures(logits, labels, temps) if len(labels) else [0.0] * len(temps)
        sums, n = faults.corrupt_nll(cfg, node.partition_id, [float(s) for s in sums], int(len(labels)))
        return Message(RecordDict({"metrics": MetricRecord({"nll-sums": sums, "num-examples": n}), "client": identity(rt, node, cfg)}), reply_to=msg)
    raise ConfigError(f"unknown query action {action!r} (info, nll-grid)")
