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
- federated temperature scaling before the last evaluation (or every one), and the evaluation
  schedule (server/evaluation.py);
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
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
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
from common.replies import TRAIN_ERROR_RECORD, TRAIN_EVALUATION_RECORD
from common.tensors import Manifest, from_record, record_nbytes, unpack

from . import checkpoint
from .aggregators import FedDyn, FedNova
from .evaluation import EvaluationMixin
from .ledger import Ledger
from .monitoring import Monitor
from .nodes import GridView, NodeRegistry, reply_source
from .records import ClientEval, RunDirectory
from .report import write_round_outputs
from .tracking import TensorBoardLog
from .validation import Rejection, check_train, screen, train_error_reason

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


class FedCalMixin(EvaluationMixin):
    """Mixed in front of a Flower strategy; see the module docstring."""

    def setup(self, cfg: RunConfig, run: RunDirectory, registry: NodeRegistry, monitor: Monitor, round_offset: int = 0, ledger: Ledger | None = None) -> None:
        self.cfg, self.run, self.registry, self.monitor = cfg, run, registry, monitor
        self.round_offset = round_offset
        self.reference: dict[str, np.ndarray] = {}
        self.manifest: Manifest | None = None  # the packed wire layout of the global state (set by the ServerApp)
        self.sampled: dict[str, set[int]] = {"train": set(), "evaluate": set()}
        self.eval_ts_mode = "none"
        self.eval_round: int | None = None  # the round whose evaluation the current phase carries
        self.tb: TensorBoardLog | None = None
        self.failing_rounds = 0
        self.sent: dict[str, list[Message]] = {"train": [], "evaluate": []}
        self.round_bytes = [0, 0]  # sent, received
        self.round_started = time.monotonic()
        self.round_notes: dict[str, Any] = {}
        self.ledger = ledger or Ledger(run, monitor)
        self.traffic: dict[str, int] = {"bytes_sent": 0, "bytes_received": 0}
        self.best: dict[str, Any] = {"round": None, "metric": None, "value": None}
        self.last_eval: list[ClientEval] = []
        self.last_pooled: list[dict] = []
        self.temperature: dict[str, Any] = {"mode": cfg.eval.temperature_scaling, "value": None, "round": None}
        self.t_start = time.monotonic()
        self.extra_meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def true_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _info(self, node: int):
        return self.registry.info.get(node)

    def _ident(self, node: int | None) -> dict[str, Any]:
        return self.registry.ident(node)

    def _safely(self, what: str, fn, *args) -> Any:
        """Run a step that must never end a round (monitoring, pooling, diagrams): log its failure."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - isolation is the point
            log.error("%s failed and was skipped (the round goes on): %s: %s", what, type(err).__name__, err)
            return None

    def _screen(self, msg: Message, phase: str, rnd: int, answered: set[int]) -> int | None:
        """The reply's node if it may be validated; else it is recorded (failed, unsampled, duplicate)."""
        node = reply_source(msg, self.sent[phase])
        verdict = screen(msg, node, self.sampled[phase], answered)
        if verdict:
            self.ledger.note(verdict[0], rnd, phase, self._ident(node), *verdict[1:])
            return None
        return node

    def _train_fields(self, metrics: dict) -> dict:
        """A train row's client figures, snake_case like every record field; aggregator internals
        (FedNova's a) only where they apply, and no echo of what the server already knows."""
        skip = {"uniform-weight", "server-round"} | ({"fednova-a"} if self.cfg.fl.aggregator != "fednova" else set())
        return {k.replace("-", "_"): v for k, v in metrics.items() if k not in skip}

    def _check_not_all_failing(self, rnd: int, errors: list[str], sampled: int) -> None:
        """Every sampled client answering with an error two rounds in a row is a broken setup, not bad
        luck: end the run with the first reason instead of recording empty rounds until the end."""
        all_failed = sampled > 0 and len(errors) == sampled
        self.failing_rounds = self.failing_rounds + 1 if all_failed else 0
        if self.failing_rounds >= 2:
            from .nodes import FederationError

            self.ledger.flush()  # the round's failures are recorded before the run ends
            raise FederationError(f"every sampled client failed in rounds {rnd - 1} and {rnd}, e.g. {errors[0]}")

    def _note_missing(self, phase: str, rnd: int, answered: set[int]) -> None:
        for node in sorted(self.sampled[phase] - answered):
            self.ledger.note("missing", rnd, phase, self._ident(node), "no reply within fl.round_timeout")

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
        self.eval_round = None
        self.registry.discover(grid, self.ledger, rnd)
        self.ledger.flush()
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        config["run-name"] = self.run.name
        if self.manifest is not None:  # lets a node with another layout say which tensor differs
            config["manifest"] = self.manifest.to_json()
        seen = self.registry.seen(grid.get_node_ids())
        view = GridView(grid, seen, minimum=self.min_train_nodes, timeout=self.cfg.fl.node_wait_timeout)
        messages = self._sample(lambda: super(FedCalMixin, self).configure_train(rnd, arrays, config, view), rnd)
        self.sampled["train"] = {m.metadata.dst_node_id for m in messages}
        self.sampled["evaluate"] = set()
        self.round_bytes[0] += record_nbytes(arrays) * len(messages)
        if self.cfg.fl.schedule == "one-phase" and rnd - 1 >= 1 and self.evaluates(rnd - 1):
            messages = self._fold_evaluation(rnd - 1, arrays, grid, messages)
        self.sent["train"] = messages
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.true_round(server_round)
        replies_seen = list(replies)
        if self.eval_round is not None:  # one phase: the previous round's evaluation came with these replies
            replies_seen = self._record_folded_evaluation(replies_seen)
        valid: list[Message] = []
        answered: set[int] = set()
        failures = [m.error.reason for m in replies_seen if m.has_error()]
        for msg in replies_seen:
            node = self._screen(msg, "train", rnd, answered)
            if node is None:
                continue
            if TRAIN_ERROR_RECORD in msg.content and node in self.sampled["evaluate"]:  # trained after its evaluation, and failed
                failures.append(train_error_reason(msg))
                self.ledger.note("failed", rnd, "train", self._ident(node), failures[-1])
                continue
            try:
                checked = check_train(msg, node, self._info(node), rnd, self.reference, self.cfg, evaluated=node in self.sampled["evaluate"])
            except Rejection as rej:
                self.ledger.note("rejected", rnd, "train", self._ident(node), rej.reason, rej.detail)
                continue
            self.round_bytes[1] += checked.nbytes
            self.ledger.note("trained", rnd, "train", self._ident(node), fields={**self._train_fields(checked.metrics), "update_bytes": checked.update_bytes,
                                                                                "wire_bytes": checked.nbytes})
            self._safely("monitoring", self.monitor.client_train, rnd, self._info(node), checked.metrics, checked.nbytes)
            if TRAIN_EVALUATION_RECORD in msg.content:  # recorded already; Flower aggregates one MetricRecord per reply
                del msg.content[TRAIN_EVALUATION_RECORD]
            valid.append(msg)
        self._note_missing("train", rnd, answered)
        self._check_not_all_failing(rnd, failures, len(self.sampled["train"]))
        self.round_notes.update(train_sampled=len(self.sampled["train"]), train_valid=len(valid))
        aggregated, metrics = None, None
        if self.sampled["train"] and len(valid) < self.min_train_nodes:
            log.warning("round %d: %d valid updates < fl.min_train_nodes=%d; the global state stays as it was", rnd, len(valid), self.min_train_nodes)
        elif valid:
            aggregated, metrics = self._aggregate(rnd, valid)
        self.round_notes["aggregated"] = aggregated is not None
        self.ledger.flush()
        return aggregated, metrics

    def _aggregate(self, rnd: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's aggregation of the valid replies; a failure or a non-finite result keeps the global state."""
        # a fixed order (by partition) makes the floating-point sums, hence resumed runs, reproducible
        valid.sort(key=lambda m: (self._ident(m.metadata.src_node_id)["partition"] or 0, m.metadata.src_node_id))
        none = self._ident(None)
        try:
            aggregated, metrics = super().aggregate_train(rnd, valid)
        except Exception as err:  # noqa: BLE001 - e.g. Krum with too few replies
            self.ledger.note("rejected", rnd, "aggregate", none, "aggregate", f"{type(err).__name__}: {err}")
            return None, None
        if aggregated is not None and not all(np.isfinite(a.numpy()).all() for a in aggregated.values()):
            self.ledger.note("rejected", rnd, "aggregate", none, "aggregate", "the aggregate is not finite; the global state stays as it was")
            return None, None
        return aggregated, metrics

    # ------------------------------------------------------------------ end of a round (Flower's evaluate_fn hook)
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        rnd = self.true_round(server_round)
        seconds = time.monotonic() - self.round_started
        sent, received = self.round_bytes
        self.traffic["bytes_sent"] += sent
        self.traffic["bytes_received"] += received
        round_row = {"kind": "round", "round": rnd, "seconds": seconds, "bytes_sent": sent, "bytes_received": received, **self.round_notes}
        self.ledger.flush([round_row])
        self._safely("rounds.csv and curves", write_round_outputs, self.run.path)
        self._safely("TensorBoard", self._tensorboard, rnd, round_row)
        try:
            checkpoint.save(self.run.path, rnd, self.tensors(arrays), self.strategy_arrays(), self.meta(rnd), keep_rounds=self.cfg.output.keep_round_checkpoints)
        except OSError as err:  # e.g. a full disk: the run goes on, the next round tries again
            log.error("round %d: cannot write the checkpoint in %s (%s); the previous checkpoint stays in place", rnd, self.run.path / "checkpoints", err)
        self._safely("monitoring", self.monitor.round_done, rnd, seconds, sent, received)
        log.info(self._console_line(rnd, seconds))
        if self.cfg.fault.stop_after_round and rnd >= self.cfg.fault.stop_after_round and rnd < self.cfg.fl.rounds:
            raise SimulatedCrash(f"fault.stop_after_round={self.cfg.fault.stop_after_round}: stopping after round {rnd} (test only)")
        return None

    def _tensorboard(self, rnd: int, round_row: dict) -> None:
        if self.tb is None:
            self.tb = TensorBoardLog(self.run.path)
        self.tb.round(rnd, self.last_pooled if self.round_notes.get("eval_sampled") else [], round_row)

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
            of = "" if n.get("eval_round", rnd) == rnd else f" (round {n['eval_round']})"
            text = f"eval{of} {n['eval_clients']}/{n['eval_sampled']} clients"
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
    def tensors(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global state tensor by tensor (packed on the wire: unpacked by the manifest)."""
        return unpack(arrays, self.manifest) if self.manifest is not None else from_record(arrays)

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
        return {"run": self.run.name, "aggregator": self.cfg.fl.aggregator, "best": self.best, "totals": self.ledger.totals, "traffic": self.traffic,
                "temperature": self.temperature, "elapsed_seconds": time.monotonic() - self.t_start, **self.extra_meta}

    def restore(self, ckpt: checkpoint.Checkpoint) -> None:
        self.load_strategy_arrays(ckpt.strategy_arrays)
        self.best = ckpt.meta.get("best", self.best)
        self.traffic.update(ckpt.meta.get("traffic", {}))


def strategy_class(aggregator: str) -> type:
    base = BASES[aggregator]
    return type(f"FedCal{base.__name__}", (FedCalMixin, base), {})


def build_strategy(cfg: RunConfig, run: RunDirectory, registry: NodeRegistry, monitor: Monitor, *, round_offset: int = 0, trainable: bool = True,
                   ledger: Ledger | None = None) -> FedCalMixin:
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
    strategy.setup(cfg, run, registry, monitor, round_offset, ledger)
    return strategy


