"""The evaluation side of fedcal's strategy: who evaluates a round's state, when, and how the
replies become records.

:class:`EvaluationMixin` sits behind :class:`~server.strategy.FedCalMixin` (which supplies the
sampling, screening and bookkeeping helpers it calls) and in front of the Flower strategy. Two
schedules (``fl.schedule``):

- ``two-phase``: Flower's own evaluate phase after each evaluated round (``configure_evaluate`` /
  ``aggregate_evaluate``);
- ``one-phase`` (default): round t's evaluation rides in round t+1's train messages
  (:meth:`_fold_evaluation`; the figures come back in the record ``eval-metrics`` and are recorded
  by :meth:`_record_folded_evaluation`), and only the last round keeps an evaluate phase.

Either way the clients are the same seeded sample of seen clients plus every held-out client
(:meth:`_evaluation_targets`), federated temperature scaling runs first where configured
(:meth:`_fit_temperature`), and every evaluation reply is validated and pooled by
:meth:`_record_evaluation`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.replies import EVALUATE_FIRST_KEYS, TRAIN_EVALUATION_RECORD
from common.tensors import record_nbytes

from .nodes import GridView, reply_source
from .records import ClientEval, pool
from .temperature import fit_global_temperature
from .validation import Rejection, check_evaluate

log = logging.getLogger("flwr.fedcal")


class EvaluationMixin:
    """Evaluation scheduling and recording; see the module docstring. Needs FedCalMixin's state."""

    def _fold_evaluation(self, rnd: int, arrays: ArrayRecord, grid, train_messages: list[Message]) -> list[Message]:
        """One phase: round ``rnd``'s evaluation (of the state the next round's train messages carry)
        rides in those messages; the clients it evaluates that do not train get an evaluate message."""
        targets, eval_config = self._evaluation_targets(rnd, arrays, grid)
        asked = {EVALUATE_FIRST_KEYS[k]: v for k, v in eval_config.items() if k in EVALUATE_FIRST_KEYS}
        out = []
        for m in train_messages:
            if m.metadata.dst_node_id in targets:
                content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({**dict(m.content[self.configrecord_key]), **asked})})
                m = Message(content=content, dst_node_id=m.metadata.dst_node_id, message_type=MessageType.TRAIN)
            out.append(m)
        trained = {m.metadata.dst_node_id for m in train_messages}
        out += self._evaluate_messages(rnd, targets, [n for n in targets if n not in trained], arrays, eval_config)
        self.sent["evaluate"] = out
        return out

    def _evaluate_messages(self, rnd: int, targets: list[int], nodes: list[int], arrays: ArrayRecord, eval_config: ConfigRecord) -> list[Message]:
        """Evaluate messages to ``nodes``, with round ``rnd``'s evaluation of ``targets`` now pending."""
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: eval_config})
        self.round_bytes[0] += record_nbytes(arrays) * len(nodes)
        self.eval_round = rnd
        self.sampled["evaluate"] = set(targets)
        return [Message(content=record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]

    def _record_folded_evaluation(self, replies: list[Message]) -> list[Message]:
        """Record the evaluation carried by a one-phase train phase; return the replies left for
        training (every reply but those of evaluate-only nodes)."""
        trained = self.sampled["train"]
        evaluate_only = self.sampled["evaluate"] - trained
        nodes = [reply_source(m, self.sent["train"]) for m in replies]
        carried = [(m, "metrics" if n in evaluate_only else TRAIN_EVALUATION_RECORD) for m, n in zip(replies, nodes, strict=True)
                   if n in self.sampled["evaluate"]]
        self._record_evaluation(self.eval_round, carried)
        # an evaluate-only node's replies are settled here (a second one was recorded as a duplicate)
        return [m for m, n in zip(replies, nodes, strict=True) if n not in evaluate_only]

    def evaluates(self, rnd: int) -> bool:
        return rnd == self.cfg.fl.rounds or rnd % self.cfg.fl.evaluate_every == 0

    def _fit_temperature(self, rnd: int, arrays: ArrayRecord, grid, seen: list[int], config: ConfigRecord) -> None:
        """Federated temperature scaling of round ``rnd``'s state (its own query phase), into ``config``."""
        mode = self.cfg.eval.temperature_scaling
        config["ts-mode"] = "none"
        if mode == "none" or not seen or not (rnd == self.cfg.fl.rounds or self.cfg.eval.ts_every_round):
            return
        gt = fit_global_temperature(grid, seen, arrays, self.cfg.fl.round_timeout, self.cfg.eval.ts_grid_size,
                                    registry=self.registry, ledger=self.ledger, rnd=rnd, ts_split=self.cfg.eval.ts_split)
        self.round_bytes[0] += record_nbytes(arrays) * len(seen)
        config["ts-mode"], config["temperature"] = mode, gt.temperature
        self.temperature.update(value=gt.temperature, round=rnd, nll_before=gt.nll_at_one, nll_after=gt.nll_at_t, examples=gt.examples, clients=gt.clients)
        self._safely("monitoring", self.monitor.global_temperature, gt.temperature)
        self.ledger.flush([{"kind": "temperature", "round": rnd, "mode": mode, "temperature": gt.temperature, "nll_at_1": gt.nll_at_one,
                            "nll_at_t": gt.nll_at_t, "examples": gt.examples, "clients": gt.clients, "at_grid_edge": gt.at_edge, "errors": gt.errors}])
        log.info("round %d: federated temperature %.4f (pooled %s NLL %.4f -> %.4f over %d examples of %d clients)", rnd, gt.temperature,
                 self.cfg.eval.ts_split, gt.nll_at_one or float("nan"), gt.nll_at_t or float("nan"), gt.examples, gt.clients)

    def _evaluation_targets(self, rnd: int, arrays: ArrayRecord, grid) -> tuple[list[int], ConfigRecord]:
        """Who evaluates round ``rnd``'s state, and the evaluate config: a seeded sample of the seen
        clients (``fl.fraction_evaluate``) and every held-out client, whichever schedule runs."""
        connected = list(grid.get_node_ids())
        seen, unseen = self.registry.seen(connected), self.registry.unseen(connected)
        config = ConfigRecord({"run-name": self.run.name})
        self._fit_temperature(rnd, arrays, grid, seen, config)
        config["server-round"] = rnd
        self.eval_ts_mode = str(config["ts-mode"])
        chosen: list[int] = []
        if seen and self.fraction_evaluate > 0:
            view = GridView(grid, seen, minimum=min(self.min_evaluate_nodes, len(seen)), timeout=self.cfg.fl.node_wait_timeout)
            picked = self._sample(lambda: super(EvaluationMixin, self).configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), view), rnd + 7919)
            chosen = [m.metadata.dst_node_id for m in picked]
        return chosen + [n for n in unseen if n not in chosen], config

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        rnd = self.true_round(server_round)
        self.sampled["evaluate"] = set()
        self.eval_round = None
        one_phase_later = self.cfg.fl.schedule == "one-phase" and rnd != self.cfg.fl.rounds  # rides in the next round's phase
        if not self.evaluates(rnd) or one_phase_later:
            return []
        self.registry.discover(grid, self.ledger, rnd)
        self.ledger.flush()
        targets, eval_config = self._evaluation_targets(rnd, arrays, grid)
        messages = self._evaluate_messages(rnd, targets, targets, arrays, eval_config)
        self.sent["evaluate"] = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if self.eval_round is None or (not replies and not self.sampled["evaluate"]):
            return None
        pooled = self._record_evaluation(self.eval_round, [(m, "metrics") for m in replies])
        return MetricRecord({f"{r['split']}-{r['ts']}-{k}": float(r[k]) for r in pooled if r["kind"] == "pooled" for k in ("accuracy", "ece", "nll") if r.get(k) is not None})

    def _record_evaluation(self, rnd: int, replies: list[tuple[Message, str]]) -> list[dict]:
        """Validate, record and pool round ``rnd``'s evaluations: (reply, the record holding them)."""
        evals: list[ClientEval] = []
        answered: set[int] = set()
        n_classes = len(self.registry.class_names())
        for msg, record in replies:
            node = self._screen(msg, "evaluate", rnd, answered)
            if node is None:
                continue
            try:
                mine = check_evaluate(msg, node, self._info(node), rnd, self.cfg, n_classes, self.eval_ts_mode, record)
            except Rejection as rej:
                self.ledger.note("rejected", rnd, "evaluate", self._ident(node), rej.reason, rej.detail)
                continue
            self.ledger.note("evaluated", rnd, "evaluate", self._ident(node), fields={"splits": sorted({e.split for e in mine})})
            evals += mine
        self._note_missing("evaluate", rnd, answered)
        pooled = self._safely("pooling", pool, evals, rnd) or []
        self.ledger.flush([e.row(rnd) for e in evals] + pooled)
        self._safely("monitoring", self.monitor.client_eval, evals)
        self._safely("monitoring", self.monitor.pooled_rows, pooled)
        self.last_eval, self.last_pooled = evals, pooled
        self.round_notes.update(eval_round=rnd, eval_clients=len({e.node_id for e in evals}), eval_sampled=len(self.sampled["evaluate"]))
        self._update_best(rnd, pooled)
        return pooled

    def _update_best(self, rnd: int, pooled: list[dict]) -> None:
        """The best round is chosen on the validation split only (never on test)."""
        val = next((r for r in pooled if r["kind"] == "pooled" and r["split"] == "val" and r["ts"] == "none"), None)
        if val is not None and val.get("accuracy") is not None:
            if self.best["value"] is None or val["accuracy"] > self.best["value"]:
                self.best = {"round": rnd, "metric": "pooled val accuracy", "value": val["accuracy"]}

    def _headline(self, pooled: list[dict], group: str = "all", ts: str = "none") -> dict | None:
        for split in ("test", "val", "train"):
            for r in pooled:
                if r["group"] == group and r["split"] == split and r["ts"] == ts and r["kind"] in ("pooled", "group"):
                    return r
        return None
