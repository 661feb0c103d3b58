"""What a node computes for one message, on plain data: the same code in the ClientApp process and in
the warm worker (client/worker.py), so results do not depend on where they are computed.

A :class:`~client.relay.Request` carries the message kind, the run and node configuration, the packed arrays
(numpy), the message config and the client's persisted state (Flower's ``context.state``: CaRot
teacher and step, FedDyn state, personal temperature). :func:`handle` returns a :class:`~client.relay.Response`:
the reply's arrays, metrics and identity, the updated persisted state, or a one-line error.
Built runtimes (CLIP, method, partition, feature cache) come from a :class:`WarmRuntimes` cache
keyed by everything that shapes them, so a process that serves several messages builds them once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import traceback
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from common.calibration import fit_temperature, nll_at_temperatures
from common.config import ConfigError, NodeConfig, RunConfig, from_flower, parse_node_config
from common.data import DataError, load_client_data
from common.hub import HubUnavailable
from common.methods import StateError
from common.replies import EVALUATE_FIRST_KEYS
from common.tensors import Manifest, ManifestError, check_flat, pack_arrays, unflatten

from . import faults
from .relay import ERROR_CODE_INTERNAL, ERROR_CODE_USER, Request, Response, failure_reason
from .runtime import ClientRuntime

log = logging.getLogger("fedcal.client")

USER_ERRORS = (ConfigError, DataError, HubUnavailable, StateError, FloatingPointError, ManifestError)
# keys of the run config that do not change what a runtime holds
_NOT_BUILT = ("output.", "monitoring.", "fault.")


# ------------------------------------------------------------------ warm runtimes
def runtime_key(cfg: RunConfig, node: NodeConfig) -> str:
    """What a built runtime depends on: the run configuration (less outputs, monitoring, faults) and the node."""
    flat = {k: v for k, v in cfg.flat().items() if not k.startswith(_NOT_BUILT)}
    text = json.dumps([flat, node.model_dump()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class WarmRuntimes:
    """Up to ``size`` built runtimes, least recently used dropped first (0: build one per message)."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, ClientRuntime] = OrderedDict()
        self.hits = self.builds = 0

    def get(self, cfg: RunConfig, node: NodeConfig) -> ClientRuntime:
        size = cfg.runtime.cache_size
        key = runtime_key(cfg, node)
        rt = self.items.pop(key, None)
        if rt is None:
            rt = ClientRuntime.create(cfg, node)
            self.builds += 1
        else:
            self.hits += 1
        if size > 0:
            self.items[key] = rt
            while len(self.items) > size:
                self.items.popitem(last=False)
        return rt


PROCESS_RUNTIMES = WarmRuntimes()  # what this process keeps (a Ray actor in simulation, the warm worker)


# ------------------------------------------------------------------ persisted client state
def _tensors(state: dict[str, Any], key: str) -> dict[str, torch.Tensor] | None:
    arrays = state.get(key)
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()} if arrays is not None else None


def _arrays(tensors: dict[str, torch.Tensor] | None) -> dict[str, np.ndarray] | None:
    return {k: np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy()) for k, v in tensors.items()} if tensors is not None else None


def _scalars(state: dict[str, Any]) -> dict[str, Any]:
    return {"carot-step": 0, "temperature": 1.0, **state.get("scalars", {})}


def identity(rt_or_data, node: NodeConfig, cfg: RunConfig | None = None) -> dict[str, Any]:
    """The node's identity; the server takes it from here only at join (an echo elsewhere)."""
    data = getattr(rt_or_data, "data", rt_or_data)
    record = {"partition-id": int(node.partition_id), "num-partitions": int(node.num_partitions), "domain": data.domain, "role": data.role}
    return faults.corrupt_identity(cfg, node.partition_id, record) if cfg else record


def manifest_of(rt: ClientRuntime) -> Manifest:
    """This node's manifest of the trainable state; the server's packed arrays must carry its digest."""
    return Manifest.of(rt.method.trainable_named_parameters())


def _global_state(req: Request, rt: ClientRuntime) -> dict[str, torch.Tensor]:
    manifest = manifest_of(rt)
    try:
        return unflatten(check_flat(req.arrays or {}, manifest), manifest)
    except ManifestError as err:
        theirs = req.config.get("manifest")
        if theirs:
            raise ManifestError(f"{err} (first difference: {manifest.describe_difference(Manifest.from_json(str(theirs)))})") from None
        raise


# ------------------------------------------------------------------ the message kinds
def _train(req: Request, cfg: RunConfig, node: NodeConfig, runtimes: WarmRuntimes) -> Response:
    """Train on the received state. In one-phase rounds (the config asks with EVALUATE_FIRST_KEYS)
    first evaluate it as an evaluate message would (the previous round's figures); training then
    continues from the client state the evaluation leaves, and a training failure keeps the evaluation."""
    rt = runtimes.get(cfg, node)
    if rt.data.role == "unseen":
        raise ConfigError(f"partition {node.partition_id} is a held-out (unseen) client and must not be sampled for training")
    global_state = _global_state(req, rt)  # decoded once for both
    if EVALUATE_FIRST_KEYS["server-round"] not in req.config:
        return _train_step(req, cfg, node, rt, global_state)
    asked = {key: req.config[wire] for key, wire in EVALUATE_FIRST_KEYS.items() if wire in req.config}
    evaluated = _evaluation(rt, cfg, node, asked, req.state, global_state)
    req = dataclasses.replace(req, state=evaluated.state)
    try:
        done = _train_step(req, cfg, node, rt, global_state)
    except Exception as err:  # noqa: BLE001 - the evaluation is done: it goes back, the training failure beside it
        failed = error_response(err, req)
        return Response(client=identity(rt, node, cfg), state=req.state, evaluation=evaluated.metrics, train_error=failed.error)
    done.evaluation = evaluated.metrics
    return done


def _train_step(req: Request, cfg: RunConfig, node: NodeConfig, rt: ClientRuntime, global_state: dict[str, torch.Tensor]) -> Response:
    server_round = int(req.config["server-round"])
    scalars = _scalars(req.state)
    out = rt.train(
        global_state, server_round=server_round, fl_config=dict(req.config),
        teacher=_tensors(req.state, "carot-teacher"), carot_step=int(scalars["carot-step"]),
        feddyn_grad=_tensors(req.state, "feddyn-grad") if float(req.config.get("feddyn-alpha", 0.0)) > 0 else None,
    )
    state = dict(req.state)
    for key, value in (("carot-teacher", out.teacher), ("feddyn-grad", out.feddyn_grad)):
        if value is not None:
            state[key] = _arrays(value)
    state["scalars"] = {**scalars, "carot-step": int(out.carot_step)}
    new = faults.corrupt_state(cfg, node.partition_id, out.state, global_state)
    norm = float(np.sqrt(sum(float(((new[k] - global_state[k]) ** 2).sum()) for k in global_state if k in new and new[k].shape == global_state[k].shape)))
    metrics = {k: (int(v) if isinstance(v, (bool, np.integer)) else v) for k, v in out.metrics.items()}
    metrics.update({"uniform-weight": 1, "update-norm": norm, "server-round": server_round})
    metrics = faults.corrupt_train_metrics(cfg, node.partition_id, metrics)
    log.info("round %d partition %d: %d steps, loss %.4f, %.1fs", server_round, node.partition_id, metrics["local-steps"], out.metrics["train-loss"], metrics["train-seconds"])
    arrays = faults.corrupt_arrays(cfg, node.partition_id, pack_arrays(new, manifest_of(rt)))
    return Response(arrays, metrics, identity(rt, node, cfg), state)


def _temperature(rt: ClientRuntime, cfg: RunConfig, config: dict, logits_cache: dict, scalars: dict) -> float | None:
    ts_mode = str(config.get("ts-mode", "none"))
    global_t = float(config.get("temperature", 1.0))
    if ts_mode == "per-client" and rt.data.role == "seen":
        logits, labels = logits_cache.get(cfg.eval.ts_split) or rt.logits(cfg.eval.ts_split)
        temperature = fit_temperature(logits, labels) if len(labels) else global_t
        scalars["temperature"] = float(temperature)
        return temperature
    return global_t if ts_mode != "none" else None


def _evaluate(req: Request, cfg: RunConfig, node: NodeConfig, runtimes: WarmRuntimes) -> Response:
    rt = runtimes.get(cfg, node)
    return _evaluation(rt, cfg, node, req.config, req.state, _global_state(req, rt))


def _evaluation(rt: ClientRuntime, cfg: RunConfig, node: NodeConfig, config: dict, state: dict, global_state: dict[str, torch.Tensor]) -> Response:
    """The evaluate reply for ``global_state`` (config: server-round, ts-mode, temperature)."""
    from .train import evaluate_logits

    rt.method.load_trainable_state(global_state)
    splits = ["test"] if rt.data.role == "unseen" else cfg.eval.split_list()
    scalars = _scalars(state)
    logits_cache = {split: rt.logits(split) for split in set(splits)}
    temperature = _temperature(rt, cfg, config, logits_cache, scalars)
    metrics: dict[str, Any] = {"num-examples": 0}
    for split in splits:
        logits, labels = logits_cache[split]
        metrics.update(evaluate_logits(split, logits, labels, cfg.eval.n_bins).metrics(f"{split}-"))
        if temperature is not None:
            metrics.update(evaluate_logits(split, logits, labels, cfg.eval.n_bins, temperature).metrics(f"{split}-ts-"))
        metrics["num-examples"] += int(len(labels))
    metrics["server-round"] = int(config.get("server-round", 0))
    metrics = faults.corrupt_eval_metrics(cfg, node.partition_id, metrics)
    return Response(None, metrics, identity(rt, node, cfg), {**state, "scalars": scalars})


def _info(req: Request, cfg: RunConfig, node: NodeConfig, runtimes: WarmRuntimes) -> Response:
    data = load_client_data(cfg.data, node)
    record = identity(data, node)
    record.update({"class-names": list(data.class_names), "train-size": data.size("train"), "val-size": data.size("val"),
                   "test-size": data.size("test"), "pid": os.getpid()})
    return Response(client=record, state=req.state)


def _nll_grid(req: Request, cfg: RunConfig, node: NodeConfig, runtimes: WarmRuntimes) -> Response:
    rt = runtimes.get(cfg, node)
    rt.method.load_trainable_state(_global_state(req, rt))
    temps = [float(t) for t in req.config["temperatures"]]
    seen = rt.data.role == "seen"
    logits, labels = rt.logits(cfg.eval.ts_split) if seen else (torch.zeros(0, len(rt.data.class_names)), torch.zeros(0, dtype=torch.long))
    sums = nll_at_temperatures(logits, labels, temps) if len(labels) else [0.0] * len(temps)
    sums, n = faults.corrupt_nll(cfg, node.partition_id, [float(s) for s in sums], int(len(labels)))
    return Response(None, {"nll-sums": sums, "num-examples": n}, identity(rt, node, cfg), req.state)


KINDS = {"train": _train, "evaluate": _evaluate, "info": _info, "nll-grid": _nll_grid}


def handle(req: Request, runtimes: WarmRuntimes = PROCESS_RUNTIMES) -> Response:
    """Compute one message; a user-fixable problem or a crash is a one-line error response."""
    try:
        cfg, node = from_flower(dict(req.run_config)), parse_node_config(dict(req.node_config))
        if req.kind not in KINDS:
            raise ConfigError(f"unknown message kind {req.kind!r} ({', '.join(KINDS)})")
        return KINDS[req.kind](req, cfg, node, runtimes)
    except Exception as err:  # noqa: BLE001 - every failure becomes an error reply
        return error_response(err, req)


def error_response(err: Exception, req: Request) -> Response:
    """A failure as a one-line error response: a user-fixable problem as itself, a crash with its type."""
    if isinstance(err, USER_ERRORS):
        reason = failure_reason(req.node_config, err, with_type=False)
        log.error(reason)
        return Response(state=req.state, error=(ERROR_CODE_USER, reason))
    log.error("client failed:\n%s", traceback.format_exc())
    return Response(state=req.state, error=(ERROR_CODE_INTERNAL, failure_reason(req.node_config, err)))
