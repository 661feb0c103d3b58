"""fedcal's strategy: a Flower strategy (chosen by ``fl.aggregator``) plus what calibrated FL needs.

:class:`FedCalMixin` is placed in front of the chosen Flower class (``FedAvg``, ``FedProx``,
``FedAdam``, ... or this repo's ``FedDyn``/``FedNova``), so aggregation itself stays Flower's.
The mixin adds:

- sampling: only *seen* clients are offered to Flower's sampler (held-out clients never train),
  ordered by partition id and drawn with a seed per round, so a run and its resumption sample the
  same partitions; every held-out client is evaluated every evaluated round;
- validation: each training reply is checked against the global state (keys, shapes, dtypes,
  finite values, optional norm bound) before Flower sees it; bad replies are dropped, recorded and
  counted, and a round with fewer than ``fl.min_train_nodes`` valid replies keeps the global state;
- records: per-client and exactly pooled calibration figures every evaluated round
  (server/records.py), Prometheus gauges (server/monitoring.py), a console line per round;
- federated temperature scaling before the last evaluation (or every one);
- checkpoints after every round and resumption from one (server/checkpoint.py).

Flower's ``Strategy.start`` loop is used unchanged: a resumed run passes the remaining number of
rounds and the mixin adds ``round_offset`` to the round numbers Flower hands it, so that every
Flower base class (e.g. FedAdam's bias correction) sees the true round.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from common.config import RunConfig
from common.tensors import from_record, record_nbytes, validate_update

from . import checkpoint
from .aggregators import FedDyn, FedNova
from .monitoring import Monitor
from .nodes import GridView, NodeRegistry, reply_source
from .records import ClientEval, RunDirectory, parse_eval_reply, pool
from .temperature import fit_global_temperature

log = logging.getLogger("flwr.fedcal")

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
    "feddyn": FedDyn, "fednova": FedNova,
}
_STATE_DICTS = ("m_t", "v_t", "h")  # FedAdam/FedYogi/FedAdagrad moments, FedDyn's h


class SimulatedCrash(RuntimeError):
    """TEST ONLY: raised after a checkpoint to interrupt a run as a crash would (fault.stop_after_round)."""


def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p) + 0x9E3779B9) % (2**61 - 1)
    return value


class FedCalMixin:
    """Mixed in front of a Flower strategy; see the module docstring."""

    def setup(self, cfg: RunConfig, run: RunDirectory, registry: NodeRegistry, monitor: Monitor, round_offset: int = 0) -> None:
        self.cfg, self.run, self.registry, self.monitor = cfg, run, registry, monitor
        self.round_offset = round_offset
        self.reference: dict[str, np.ndarray] = {}
        self.sampled: dict[str, set[int]] = {"train": set(), "evaluate": set()}
        self.sent: dict[str, list[Message]] = {"train": [], "evaluate": []}
        self.round_bytes = [0, 0]  # sent, received
        self.round_started = time.monotonic()
        self.round_notes: dict[str, Any] = {}
        self.totals: dict[str, Any] = {"bytes_sent": 0, "bytes_received": 0, "rejected": {}, "missing": 0, "failed": 0}
        self.best: dict[str, Any] = {"round": None, "metric": None, "value": None}
        self.last_eval: list[ClientEval] = []
        self.last_pooled: list[dict] = []
        self.temperature: dict[str, Any] = {"mode": cfg.eval.temperature_scaling, "value": None, "round": None}
        self.t_start = time.monotonic()
        self.extra_meta: dict[str, Any] = {}
        self.join_failures_recorded: set[int] = set()

    # ------------------------------------------------------------------ helpers
    def true_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _info(self, node: int):
        return self.registry.info.get(node)

    def _ident(self, node: int) -> dict[str, Any]:
        info = self._info(node)
        return {"node_id": node, "partition": info.partition_id if info else None, "domain": info.domain if info else None, "role": info.role if info else None}

    def record_join_failures(self, rnd: int) -> None:
        """Nodes whose identity query failed (e.g. a node config without partition-id): record once."""
        new = {n: r for n, r in self.registry.failed.items() if n not in self.join_failures_recorded}
        for node, reason in new.items():
            self.run.write([{"kind": "failed", "round": rnd, "phase": "join", "node_id": node, "partition": None, "domain": None, "role": None, "reason": reason}])
            self.monitor.count("failed", "join")
            self.totals["failed"] += 1
            self.join_failures_recorded.add(node)

    def _sample(self, call, rnd: int):
        """Run Flower's (random.sample based) node sampling under a per-round seed."""
        saved = random.getstate()
        random.seed(_seed(self.cfg.fl.seed, rnd))
        try:
            return list(call())
        finally:
            random.setstate(saved)

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        rnd = self.true_round(server_round)
        self.round_started = time.monotonic()
        self.round_bytes = [0, 0]
        self.round_notes = {}
        self.registry.discover(grid)
        self.record_join_failures(rnd)
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        config["run-name"] = self.run.name
        seen = self.registry.seen(grid.get_node_ids())
        view = GridView(grid, seen, minimum=self.min_train_nodes, timeout=self.cfg.fl.node_wait_timeout)
        messages = self._sample(lambda: super(FedCalMixin, self).configure_train(rnd, arrays, config, view), rnd)
        self.sampled["train"] = {m.metadata.dst_node_id for m in messages}
        self.sent["train"] = messages
        self.round_bytes[0] += record_nbytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.true_round(server_round)
        replies = list(replies)
        rows, valid = [], []
        for msg in replies:
            node = reply_source(msg, self.sent["train"])
            ident = self._ident(node)
            if msg.has_error():
                rows.append({"kind": "failed", "round": rnd, "phase": "train", **ident, "reason": msg.error.reason})
                self.monitor.count("failed", "train")
                self.totals["failed"] += 1
                log.warning("round %d: node %d (partition %s) failed: %s", rnd, node, ident["partition"], msg.error.reason)
                continue
            content = msg.content
            if "arrays" not in content.array_records or "metrics" not in content.metric_records or len(content.array_records) != 1:
                rejection = ("format", "reply lacks exactly one 'arrays' ArrayRecord and a 'metrics' MetricRecord")
            else:
                rej = validate_update(content["arrays"], self.reference, self.cfg.fl.max_update_norm)
                rejection = (rej.reason, rej.detail) if rej else None
            if rejection:
                reason, detail = rejection
                rows.append({"kind": "rejected", "round": rnd, **ident, "reason": reason, "detail": detail})
                self.monitor.count("rejected", reason)
                self.totals["rejected"][reason] = self.totals["rejected"].get(reason, 0) + 1
                log.warning("round %d: rejected the update of node %d (partition %s): %s: %s", rnd, node, ident["partition"], reason, detail)
                continue
            nbytes = record_nbytes(content["arrays"])
            self.round_bytes[1] += nbytes
            metrics = dict(content["metrics"])
            rows.append({"kind": "train", "round": rnd, **ident, "update_bytes": nbytes, **metrics})
            if self._info(node):
                self.monitor.client_train(rnd, self._info(node), metrics, nbytes)
            valid.append(msg)
        replied = {reply_source(m, self.sent["train"]) for m in replies}
        for node in sorted(self.sampled["train"] - replied):
            rows.append({"kind": "missing", "round": rnd, "phase": "train", **self._ident(node)})
            self.monitor.count("missing", "train")
            self.totals["missing"] += 1
            log.warning("round %d: node %d (partition %s) sent no training reply within fl.round_timeout", rnd, node, self._ident(node)["partition"])
        self.round_notes.update(train_sampled=len(self.sampled["train"]), train_valid=len(valid))
        aggregated, metrics = None, None
        if self.sampled["train"] and len(valid) < self.min_train_nodes:
            log.warning("round %d: %d valid updates < fl.min_train_nodes=%d; the global state stays as it was", rnd, len(valid), self.min_train_nodes)
        elif valid:
            # a fixed order (by partition) makes the floating-point sums, hence resumed runs, reproducible
            valid.sort(key=lambda m: (self._ident(m.metadata.src_node_id)["partition"] or 0, m.metadata.src_node_id))
            aggregated, metrics = super().aggregate_train(rnd, valid)
            if aggregated is not None and not all(np.isfinite(a.numpy()).all() for a in aggregated.values()):
                log.error("round %d: the aggregate is not finite; it is discarded and the global state stays as it was", rnd)
                self.monitor.count("rejected", "aggregate")
                aggregated = None
        self.round_notes["aggregated"] = aggregated is not None
        self.run.write(rows)
        return aggregated, metrics

    # ------------------------------------------------------------------ evaluation
    def evaluates(self, rnd: int) -> bool:
        return rnd == self.cfg.fl.rounds or rnd % self.cfg.fl.evaluate_every == 0

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        rnd = self.true_round(server_round)
        self.sampled["evaluate"] = set()
        if not self.evaluates(rnd):
            return []
        self.registry.discover(grid)
        self.record_join_failures(rnd)
        connected = list(grid.get_node_ids())
        seen, unseen = self.registry.seen(connected), self.registry.unseen(connected)
        mode = self.cfg.eval.temperature_scaling
        config["ts-mode"] = "none"
        if mode != "none" and (rnd == self.cfg.fl.rounds or self.cfg.eval.ts_every_round) and seen:
            gt = fit_global_temperature(grid, seen, arrays, self.cfg.fl.round_timeout, self.cfg.eval.ts_grid_size)
            self.round_bytes[0] += record_nbytes(arrays) * len(seen)
            config["ts-mode"], config["temperature"] = mode, gt.temperature
            self.temperature.update(value=gt.temperature, round=rnd, nll_before=gt.nll_at_one, nll_after=gt.nll_at_t, examples=gt.examples, clients=gt.clients)
            self.monitor.global_temperature(gt.temperature)
            self.run.write([{"kind": "temperature", "round": rnd, "mode": mode, "temperature": gt.temperature, "nll_at_1": gt.nll_at_one,
                             "nll_at_t": gt.nll_at_t, "examples": gt.examples, "clients": gt.clients, "at_grid_edge": gt.at_edge, "errors": gt.errors}])
            log.info("round %d: federated temperature %.4f (pooled %s NLL %.4f -> %.4f over %d examples of %d clients)", rnd, gt.temperature,
                     self.cfg.eval.ts_split, gt.nll_at_one or float("nan"), gt.nll_at_t or float("nan"), gt.examples, gt.clients)
        config["server-round"] = rnd
        messages: list[Message] = []
        if seen and self.fraction_evaluate > 0:
            view = GridView(grid, seen, minimum=min(self.min_evaluate_nodes, len(seen)), timeout=self.cfg.fl.node_wait_timeout)
            messages = self._sample(lambda: super(FedCalMixin, self).configure_evaluate(rnd, arrays, config, view), rnd + 7919)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages += [Message(content=record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in unseen]
        self.sampled["evaluate"] = {m.metadata.dst_node_id for m in messages}
        self.sent["evaluate"] = messages
        self.round_bytes[0] += record_nbytes(arrays) * len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = self.true_round(server_round)
        replies = list(replies)
        if not replies and not self.sampled["evaluate"]:
            return None
        rows: list[dict] = []
        evals: list[ClientEval] = []
        mode = self.cfg.eval.temperature_scaling
        for msg in replies:
            node = reply_source(msg, self.sent["evaluate"])
            if msg.has_error():
                rows.append({"kind": "failed", "round": rnd, "phase": "evaluate", **self._ident(node), "reason": msg.error.reason})
                self.monitor.count("failed", "evaluate")
                self.totals["failed"] += 1
                log.warning("round %d: evaluation on node %d failed: %s", rnd, node, msg.error.reason)
                continue
            try:
                evals += parse_eval_reply(node, dict(msg.content["client"]), dict(msg.content["metrics"]), mode)
            except (KeyError, ValueError) as err:
                rows.append({"kind": "rejected", "round": rnd, **self._ident(node), "reason": "format", "detail": f"evaluation reply: {err}"})
                self.monitor.count("rejected", "format")
        replied = {reply_source(m, self.sent["evaluate"]) for m in replies}
        for node in sorted(self.sampled["evaluate"] - replied):
            rows.append({"kind": "missing", "round": rnd, "phase": "evaluate", **self._ident(node)})
            self.monitor.count("missing", "evaluate")
            self.totals["missing"] += 1
        pooled = pool(evals, rnd)
        rows += [e.row(rnd) for e in evals] + pooled
        self.run.write(rows)
        self.monitor.client_eval(evals)
        self.monitor.pooled_rows(pooled)
        self.last_eval, self.last_pooled = evals, pooled
        self.round_notes.update(eval_clients=len({e.node_id for e in evals}), eval_sampled=len(self.sampled["evaluate"]))
        head = self._headline(pooled)
        if head and head.get("accuracy") is not None:
            metric = f"pooled {head['split']} accuracy"
            if self.best["value"] is None or head["accuracy"] > self.best["value"]:
                self.best = {"round": rnd, "metric": metric, "value": head["accuracy"]}
        return MetricRecord({f"{r['split']}-{r['ts']}-{k}": float(r[k]) for r in pooled if r["kind"] == "pooled" for k in ("accuracy", "ece", "nll") if r.get(k) is not None})

    def _headline(self, pooled: list[dict], group: str = "all", ts: str = "none") -> dict | None:
        for split in ("test", "val", "train"):
            for r in pooled:
                if r["group"] == group and r["split"] == split and r["ts"] == ts and r["kind"] in ("pooled", "group"):
                    return r
        return None

    # ------------------------------------------------------------------ end of a round (Flower's evaluate_fn hook)
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        rnd = self.true_round(server_round)
        seconds = time.monotonic() - self.round_started
        sent, received = self.round_bytes
        self.totals["bytes_sent"] += sent
        self.totals["bytes_received"] += received
        self.run.write([{"kind": "round", "round": rnd, "seconds": seconds, "bytes_sent": sent, "bytes_received": received, **self.round_notes}])
        checkpoint.save(self.run.path, rnd, from_record(arrays), self.strategy_arrays(), self.meta(rnd), keep_rounds=self.cfg.output.keep_round_checkpoints)
        self.monitor.round_done(rnd, seconds, sent, received)
        log.info(self._console_line(rnd, seconds))
        if self.cfg.fault.stop_after_round and rnd >= self.cfg.fault.stop_after_round and rnd < self.cfg.fl.rounds:
            raise SimulatedCrash(f"fault.stop_after_round={self.cfg.fault.stop_after_round}: stopping after round {rnd} (test only)")
        return None

    def _console_line(self, rnd: int, seconds: float) -> str:
        total = self.cfg.fl.rounds
        width = 20
        done = int(width * rnd / total)
        bar = "#" * done + "." * (width - done)
        n = self.round_notes
        parts = [f"[{bar}] round {rnd}/{total}"]
        if "train_sampled" in n:
            parts.append(f"train {n['train_valid']}/{n['train_sampled']} valid" + ("" if n.get("aggregated", True) else " (not aggregated)"))
        if n.get("eval_sampled"):
            head = self._headline(self.last_pooled)
            text = f"eval {n['eval_clients']}/{n['eval_sampled']} clients"
            if head:
                text += f" | pooled {head['split']} acc {head['accuracy']:.4f} ECE {head['ece']:.4f}"
                for g in ("seen", "unseen"):
                    r = self._headline(self.last_pooled, g)
                    if r and r["clients"] < head["clients"]:
                        text += f" | {g} acc {r['accuracy']:.3f} ECE {r['ece']:.3f}"
            parts.append(text)
        parts.append(f"{seconds:.1f}s")
        return " | ".join(parts)

    # ------------------------------------------------------------------ strategy state for checkpoints
    def strategy_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in _STATE_DICTS:
            d = getattr(self, name, None)
            if d:
                out.update({f"{name}/{k}": np.asarray(v) for k, v in d.items()})
        mv = getattr(self, "momentum_vector", None)
        if mv is not None:
            out.update({f"momentum_vector/{i:05d}": np.asarray(v) for i, v in enumerate(mv)})
        return out

    def load_strategy_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name in _STATE_DICTS:
            d = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")}
            if d:
                setattr(self, name, d)
        mv = sorted((k, v) for k, v in arrays.items() if k.startswith("momentum_vector/"))
        if mv:
            self.momentum_vector = [v for _, v in mv]

    def meta(self, rnd: int) -> dict[str, Any]:
        return {"run": self.run.name, "aggregator": self.cfg.fl.aggregator, "best": self.best, "totals": self.totals,
                "temperature": self.temperature, "elapsed_seconds": time.monotonic() - self.t_start, **self.extra_meta}

    def restore(self, ckpt: checkpoint.Checkpoint) -> None:
        self.load_strategy_arrays(ckpt.strategy_arrays)
        self.best = ckpt.meta.get("best", self.best)
        totals = ckpt.meta.get("totals")
        if totals:
            self.totals.update(totals)


def strategy_class(aggregator: str) -> type:
    base = BASES[aggregator]
    return type(f"FedCal{base.__name__}", (FedCalMixin, base), {})


def build_strategy(cfg: RunConfig, run: RunDirectory, registry: NodeRegistry, monitor: Monitor, *, round_offset: int = 0, trainable: bool = True) -> FedCalMixin:
    f = cfg.fl
    kwargs: dict[str, Any] = dict(
        fraction_train=f.fraction_train if trainable else 0.0,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=f.min_train_nodes,
        min_evaluate_nodes=f.min_evaluate_nodes,
        min_available_nodes=1,  # fedcal waits for fl.min_available_nodes itself, with a bound
        weighted_by_key="num-examples" if f.weighting == "examples" else "uniform-weight",
    )
    extra = {
        "fedprox": {"proximal_mu": f.proximal_mu},
        "fedavgm": {"server_learning_rate": f.server_lr, "server_momentum": f.server_momentum},
        "fedadam": {"eta": f.eta, "eta_l": f.eta_l, "beta_1": f.beta_1, "beta_2": f.beta_2, "tau": f.tau},
        "fedyogi": {"eta": f.eta, "eta_l": f.eta_l, "beta_1": f.beta_1, "beta_2": f.beta_2, "tau": f.tau},
        "fedadagrad": {"eta": f.eta, "eta_l": f.eta_l, "tau": f.tau},
        "fedtrimmedavg": {"beta": f.trim_beta},
        "krum": {"num_malicious_nodes": f.num_malicious},
        "feddyn": {"alpha": f.feddyn_alpha, "num_clients": max(registry.num_seen(), 1)},
        "fednova": {"server_learning_rate": f.server_lr},
    }.get(f.aggregator, {})
    strategy = strategy_class(f.aggregator)(**kwargs, **extra)
    strategy.setup(cfg, run, registry, monitor, round_offset)
    return strategy


