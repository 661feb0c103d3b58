"""Reply validation: every client reply passes here before anything else on the server reads it.

The server trusts nothing it can check. A reply is accepted only if

- it answers a message this phase sent to that node, once (``unsampled`` / ``duplicate``), and
  says the current round (``round``);
- its identity is the node's registered one: partition, domain and role always come from the
  registry filled at join (server/nodes.py), never from the reply;
- training: exactly the ``arrays`` and ``metrics`` records; the arrays have the global state's keys,
  and each array's payload size is bounded before it is decoded (``size``), then decoded once and
  checked for shape, dtype, finiteness and the optional norm bound; the metrics are exactly
  :data:`common.replies.TRAIN_METRIC_KEYS` with finite values; ``num-examples`` is a positive
  integer no larger than the train split the node declared at join (``weight``: a larger claim is
  *rejected*, not clipped, because a node that lies about its size has no claim to any weight);
- evaluation: exactly the keys of the run's splits, bins and classes; every split's calibration sums
  satisfy :meth:`CalibrationStats.inconsistency` at ``eval.n_bins`` and 10 bins with the same total,
  no larger than the node's declared split; adaptive ECE in [0, 1], temperature finite and positive;
- NLL grid: the grid's length, finite non-negative sums, ``num-examples`` equal to the declared size
  of ``eval.ts_split``;
- identity (join): a well-formed record (see :func:`check_identity`).

A reply that fails raises :class:`Rejection` with a short reason label and a one-line detail;
the caller records it through the ledger and the round goes on with the other replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message

from common.calibration import CalibrationStats
from common.config import RunConfig
from common.replies import (
    EVALUATE_RECORDS,
    OPTIONAL_RECORDS,
    TRAIN_ERROR_RECORD,
    TRAIN_EVALUATION_RECORD,
    TRAIN_INT_KEYS,
    TRAIN_METRIC_KEYS,
    TRAIN_RECORDS,
    evaluate_metric_keys,
    split_prefix,
)
from common.tensors import update_norm

from .records import ClientEval

if TYPE_CHECKING:  # nodes.py imports this module
    from .nodes import NodeInfo

NPY_HEADER_MAX = 4096  # bytes an .npy header may add to the raw array bytes


class Rejection(Exception):
    """A reply that must not be used: ``reason`` is a short label, ``detail`` one line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class TrainReply:
    node: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float | int]
    nbytes: int  # bytes on the wire (the arrays' serialised payloads)

    @property
    def update_bytes(self) -> int:
        """The raw trainable bytes, as `fedcal describe` reports them."""
        return int(sum(a.nbytes for a in self.arrays.values()))


# ------------------------------------------------------------------ shared pieces
def screen(msg: Message, node: int, expected: set[int], answered: set[int]) -> tuple[str, str, str | None] | None:
    """Why a reply must not even be validated, as (outcome, reason, detail): from a node that was not
    asked or already answered this phase (rejected), or an error reply (failed). None: validate it.
    Marks ``node`` as answered."""
    if node not in expected or node in answered:
        reason = "duplicate" if node in answered else "unsampled"
        return "rejected", reason, "a reply from a node that was not asked (or already answered)"
    answered.add(node)
    if msg.has_error():
        return "failed", msg.error.reason, None
    return None


def check_records(msg: Message, required: set[str]) -> None:
    content = msg.content
    names = set(content.keys())
    missing, extra = required - names, names - required - OPTIONAL_RECORDS
    if missing or extra:
        raise Rejection("format", f"records {sorted(names)}; expected {sorted(required)}")
    kinds = {"arrays": content.array_records, "metrics": content.metric_records, TRAIN_EVALUATION_RECORD: content.metric_records}
    for name in required:
        if name not in kinds[name]:
            raise Rejection("format", f"record {name!r} has the wrong type")


def finite_number(key: str, value: Any, integral: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejection("metrics", f"{key!r} is {type(value).__name__}, expected a number")
    if not math.isfinite(value):
        raise Rejection("metrics", f"{key!r} is not finite ({value!r})")
    if integral:
        if value != int(value):
            raise Rejection("metrics", f"{key!r}={value!r} is not an integer")
        return int(value)
    return value


def check_round(metrics: dict[str, Any], rnd: int) -> None:
    if metrics.get("server-round") != rnd:
        raise Rejection("round", f"reply is for round {metrics.get('server-round')!r}, this is round {rnd} (late or replayed)")


def exact_keys(got: set[str], expected: set[str] | frozenset[str]) -> None:
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise Rejection("metrics", f"{what} ({len(missing)} missing, {len(extra)} unexpected keys)")


# ------------------------------------------------------------------ training
def decode_arrays(record, reference: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Each array bounded by size before it is decoded, decoded once, checked against the reference."""
    keys = list(record.keys())
    if set(keys) != set(reference):
        missing = [k for k in reference if k not in record]
        extra = [k for k in keys if k not in reference]
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise Rejection("keys", f"{what} ({len(missing)} missing, {len(extra)} extra keys)")
    out: dict[str, np.ndarray] = {}
    nbytes = 0
    for k, ref in reference.items():
        payload = record[k].data
        if len(payload) > ref.nbytes + NPY_HEADER_MAX:
            raise Rejection("size", f"{k!r} carries {len(payload):,} bytes for a {ref.shape} {ref.dtype} array")
        try:
            arr = record[k].numpy()
        except Exception as err:  # undecodable payload
            raise Rejection("format", f"{k!r}: {type(err).__name__}: {str(err)[:120]}") from None
        if arr.shape != ref.shape:
            raise Rejection("shape", f"{k!r} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise Rejection("dtype", f"{k!r} has dtype {arr.dtype}, expected {ref.dtype}")
        if not np.isfinite(arr).all():
            raise Rejection("non-finite", f"{k!r} has {int((~np.isfinite(arr)).sum())} non-finite values")
        out[k] = arr
        nbytes += len(payload)
    return out, nbytes


def train_error_reason(msg: Message) -> str:
    """The one-line reason of a one-phase train reply whose training failed after its evaluation."""
    reason = msg.content[TRAIN_ERROR_RECORD].get("reason") if TRAIN_ERROR_RECORD in msg.content.config_records else None
    return str(reason).splitlines()[0][:500] if reason else "the training failed (no reason given)"


def check_train(msg: Message, node: int, info: NodeInfo, rnd: int, reference: dict[str, np.ndarray], cfg: RunConfig,
                evaluated: bool = False) -> TrainReply:
    """A training reply; ``evaluated``: it was asked to evaluate first, so it must also carry
    TRAIN_EVALUATION_RECORD (validated on its own by :func:`check_evaluate`)."""
    check_records(msg, TRAIN_RECORDS | ({TRAIN_EVALUATION_RECORD} if evaluated else set()))
    # the arrays first: a NaN update is rejected as non-finite, not for its NaN update-norm metric
    arrays, nbytes = decode_arrays(msg.content["arrays"], reference)
    metrics = dict(msg.content["metrics"])
    exact_keys(set(metrics), TRAIN_METRIC_KEYS)
    metrics = {k: finite_number(k, v, k in TRAIN_INT_KEYS) for k, v in metrics.items()}
    check_round(metrics, rnd)
    n = metrics["num-examples"]
    if not 1 <= n <= info.sizes.get("train", 0):
        raise Rejection("weight", f"num-examples={n} outside [1, {info.sizes.get('train', 0)}] (the train split it declared at join)")
    if metrics["uniform-weight"] != 1:
        raise Rejection("weight", f"uniform-weight={metrics['uniform-weight']} (must be 1)")
    steps = metrics["local-steps"]
    rho = cfg.optim.momentum if cfg.optim.name == "sgd" else 0.0
    if steps < 0 or not 0 <= metrics["fednova-a"] <= max(steps, 1) / (1 - rho) + 1e-6:
        raise Rejection("metrics", f"local-steps={steps}, fednova-a={metrics['fednova-a']:g} are inconsistent")
    if cfg.fl.max_update_norm > 0:
        norm = update_norm(arrays, reference)
        if not math.isfinite(norm) or norm > cfg.fl.max_update_norm:
            raise Rejection("norm", f"update norm {norm:.4g} exceeds fl.max_update_norm={cfg.fl.max_update_norm:g}")
    return TrainReply(node, arrays, metrics, nbytes)


# ------------------------------------------------------------------ evaluation
def expected_splits(info: NodeInfo, cfg: RunConfig) -> list[str]:
    return ["test"] if info.role == "unseen" else cfg.eval.split_list()


def _split_stats(metrics: dict[str, Any], prefix: str, n_bins: int, n_classes: int, bound: int) -> tuple[CalibrationStats, CalibrationStats]:
    for key in ("n-bins", "b10-n-bins"):
        want = n_bins if key == "n-bins" else 10
        if metrics[prefix + key] != want:
            raise Rejection("bins", f"{prefix + key}={metrics[prefix + key]!r}, the run uses {want}")
    for key in ("n-classes", "b10-n-classes"):
        if metrics[prefix + key] != n_classes:
            raise Rejection("classes", f"{prefix + key}={metrics[prefix + key]!r}, the run has {n_classes} classes")
    try:
        stats = CalibrationStats.from_metrics(metrics, prefix)
        stats10 = CalibrationStats.from_metrics(metrics, prefix + "b10-")
    except (ValueError, TypeError, OverflowError) as err:
        raise Rejection("calibration", f"{prefix}: {err}") from None
    for s, label in ((stats, prefix), (stats10, prefix + "b10-")):
        why = s.inconsistency()
        if why:
            raise Rejection("calibration", f"{label}: {why}")
    if stats.total != stats10.total or stats.correct != stats10.correct:
        raise Rejection("calibration", f"{prefix}: the {n_bins}-bin and 10-bin sums disagree on total/correct")
    if stats.total > bound:
        raise Rejection("calibration", f"{prefix}total={stats.total} exceeds the {bound} examples the node declared")
    return stats, stats10


def check_evaluate(msg: Message, node: int, info: NodeInfo, rnd: int, cfg: RunConfig, n_classes: int, ts_mode: str,
                   record: str = "metrics") -> list[ClientEval]:
    """The reply's per-split (and per-TS) evaluations, with the registry's identity; ``record``:
    where they are (an evaluate reply's "metrics", or a one-phase train reply's TRAIN_EVALUATION_RECORD)."""
    if record == "metrics":
        check_records(msg, EVALUATE_RECORDS)
    elif record not in msg.content.metric_records:
        raise Rejection("format", f"the reply lacks the evaluation it was asked for (record {record!r})")
    metrics = dict(msg.content[record])
    splits, ts = expected_splits(info, cfg), ts_mode != "none"
    exact_keys(set(metrics), evaluate_metric_keys(splits, ts, cfg.eval.n_bins, n_classes))
    check_round(metrics, rnd)
    out, raw_total = [], 0
    for split in splits:
        for with_ts in ([False, True] if ts else [False]):
            prefix = split_prefix(split, with_ts)
            stats, stats10 = _split_stats(metrics, prefix, cfg.eval.n_bins, n_classes, info.sizes.get(split, 0))
            ace, temp = metrics[prefix + "adaptive-ece"], metrics[prefix + "temperature"]
            if isinstance(ace, bool) or not isinstance(ace, (int, float)) or not (math.isnan(ace) or 0 <= ace <= 1):
                raise Rejection("calibration", f"{prefix}adaptive-ece={ace!r} outside [0, 1]")
            if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp > 0):
                raise Rejection("calibration", f"{prefix}temperature={temp!r} is not a positive number")
            if not with_ts:
                raw_total += stats.total
            out.append(ClientEval(node, info.partition_id, info.domain, info.role, split, ts_mode if with_ts else "none",
                                  float(temp) if with_ts else 1.0, stats, stats10, None if math.isnan(ace) else float(ace)))
    if metrics["num-examples"] != raw_total:
        raise Rejection("weight", f"num-examples={metrics['num-examples']!r} but the splits hold {raw_total}")
    return out


# ------------------------------------------------------------------ federated temperature scaling
def check_nll_grid(msg: Message, info: NodeInfo, grid_size: int, ts_split: str) -> tuple[np.ndarray, int]:
    check_records(msg, EVALUATE_RECORDS)
    metrics = dict(msg.content["metrics"])
    exact_keys(set(metrics), {"nll-sums", "num-examples"})
    sums = np.asarray(metrics["nll-sums"], dtype=np.float64) if isinstance(metrics["nll-sums"], list) else np.zeros(0)
    if sums.shape != (grid_size,):
        raise Rejection("nll-grid", f"{sums.size} NLL sums for a grid of {grid_size}")
    if not np.isfinite(sums).all() or (sums < 0).any():
        raise Rejection("nll-grid", "NLL sums must be finite and non-negative")
    n = finite_number("num-examples", metrics["num-examples"], integral=True)
    declared = info.sizes.get(ts_split, 0) if info.role == "seen" else 0
    if n != declared:
        raise Rejection("weight", f"num-examples={n}, but the node declared {declared} {ts_split} examples")
    return sums, n


# ------------------------------------------------------------------ identity at join
def check_identity(msg: Message) -> dict[str, Any]:
    """The fields of a well-formed identity record (NodeInfo's, less the node id); conflicts with
    other nodes are the registry's to judge."""
    if "client" not in msg.content.config_records:
        raise Rejection("identity", "the info reply has no 'client' record")
    c = dict(msg.content["client"])
    try:
        pid, num = c["partition-id"], c["num-partitions"]
        names, role, domain = c["class-names"], c["role"], c["domain"]
        sizes = {s: c[f"{s}-size"] for s in ("train", "val", "test")}
    except KeyError as err:
        raise Rejection("identity", f"the info reply lacks {err.args[0]!r}") from None
    ints = [pid, num, *sizes.values()]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints) or not 0 <= pid < num:
        raise Rejection("identity", f"partition-id={pid!r}, num-partitions={num!r}, sizes {sizes} are not valid counts")
    if role not in ("seen", "unseen") or not isinstance(domain, str) or not domain:
        raise Rejection("identity", f"role={role!r}, domain={domain!r}")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise Rejection("identity", "class-names must be a list of distinct strings")
    return {"partition_id": pid, "num_partitions": num, "domain": domain, "role": role, "class_names": list(names), "sizes": sizes}
