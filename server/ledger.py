"""The ledger of reply outcomes: one place that turns "what happened to this reply" into the
record row, the Prometheus counter, the running totals and the log line, so the four never drift.

Outcomes: ``joined`` (a node's identity was accepted), ``trained`` / ``evaluated`` (a reply was
valid and used), ``rejected`` (invalid: labelled by reason), ``missing`` (no reply in time),
``failed`` (the node replied with an error). Totals are ``{outcome: {label: count}}`` with the
rejection reason as label for ``rejected`` and the phase otherwise; they are saved in every
checkpoint, restored on resume (Prometheus counters included) and :func:`totals_from_rows`
recomputes exactly the same figures from ``metrics.jsonl``, which is what summary.json reports.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("flwr.fedcal")

OUTCOMES = ("joined", "trained", "evaluated", "rejected", "missing", "failed")
# the record kind each outcome writes (a valid training reply is the "train" row with its metrics)
ROW_KIND = {"joined": "joined", "trained": "train", "evaluated": "evaluated", "rejected": "rejected", "missing": "missing", "failed": "failed"}
_OUTCOME_OF_KIND = {v: k for k, v in ROW_KIND.items()}
_WARN = {"rejected", "missing", "failed"}


def label(outcome: str, phase: str, reason: str | None) -> str:
    return str(reason) if outcome == "rejected" else phase


def empty_totals() -> dict[str, dict[str, int]]:
    return {o: {} for o in OUTCOMES}


def totals_from_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The ledger's totals, recomputed from the records alone."""
    totals = empty_totals()
    for r in rows:
        outcome = _OUTCOME_OF_KIND.get(r.get("kind"))
        if outcome:
            key = label(outcome, r.get("phase", ""), r.get("reason"))
            totals[outcome][key] = totals[outcome].get(key, 0) + 1
    return totals


class Ledger:
    def __init__(self, run, monitor):
        self.run, self.monitor = run, monitor
        self.totals = empty_totals()
        self.pending: list[dict[str, Any]] = []

    def note(self, outcome: str, rnd: int, phase: str, ident: dict[str, Any], reason: str | None = None,
             detail: str | None = None, fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record one reply outcome everywhere; the row is written at the next :meth:`flush`."""
        key = label(outcome, phase, reason)
        # the client's own fields first: the server's round, phase and identity always win
        row = {**(fields or {}), "kind": ROW_KIND[outcome], "round": rnd, "phase": phase, **ident}
        if reason is not None:
            row.update(reason=reason, detail=detail)
        self.pending.append(row)
        self.totals[outcome][key] = self.totals[outcome].get(key, 0) + 1
        self.monitor.count(outcome, phase, key)
        if outcome in _WARN:
            why = f" ({reason}): {detail}" if reason and detail else (f": {reason}" if reason else "")
            log.warning("round %d %s: node %s (partition %s) %s%s", rnd, phase, ident.get("node_id"), ident.get("partition"), outcome, why)
        elif outcome == "joined":
            log.debug("node %s joined as partition %s", ident.get("node_id"), ident.get("partition"))
        return row

    def flush(self, extra_rows: list[dict[str, Any]] = ()) -> None:
        rows, self.pending = self.pending + list(extra_rows), []
        self.run.write(rows)

    def restore(self, totals: dict[str, dict[str, int]] | None) -> None:
        """Continue the totals of a checkpoint (and bring the fresh Prometheus counters level)."""
        for outcome, counts in (totals or {}).items():
            if outcome not in self.totals or not isinstance(counts, dict):
                continue
            for key, n in counts.items():
                self.totals[outcome][key] = int(n)
                self.monitor.count(outcome, "", key, int(n))
