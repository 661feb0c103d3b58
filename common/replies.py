"""What a client reply may contain: the record and metric names both sides agree on.

The ClientApp builds its replies from these names and the server's validation layer
(server/validation.py) accepts exactly these and nothing else, so an extra, missing or misspelt
key is a rejected reply, never a crash or a silently overwritten record field.
"""

from __future__ import annotations

from common.calibration import CalibrationStats
from common.names import OBJECTIVE_TERMS

# a training reply's MetricRecord "metrics": exactly these keys, every value a finite number
TRAIN_METRIC_KEYS = frozenset({
    "num-examples", "local-steps", "train-seconds", "train-loss", "train-accuracy", "lr", "fednova-a",
    "uniform-weight", "update-norm", "server-round",
} | {f"train-{term}" for term in OBJECTIVE_TERMS})
# the integral ones among them
TRAIN_INT_KEYS = frozenset({"num-examples", "local-steps", "uniform-weight", "server-round"})

# record names per reply kind ("client" is an optional identity echo the server ignores)
TRAIN_RECORDS = {"arrays", "metrics"}
EVALUATE_RECORDS = {"metrics"}
OPTIONAL_RECORDS = {"client"}
# a one-phase train reply also carries the evaluation of the state it received, under this name
# (exactly an evaluate reply's "metrics"); its config asks for it with these keys
TRAIN_EVALUATION_RECORD = "eval-metrics"
# ... and, when the training after it failed, the failure (code, reason) instead of arrays and metrics
TRAIN_ERROR_RECORD = "train-error"
EVALUATE_FIRST_KEYS = {"server-round": "evaluate-round", "ts-mode": "evaluate-ts-mode", "temperature": "evaluate-temperature"}

# per evaluated split (and per split after temperature scaling): exact sums at n_bins and 10 bins
SPLIT_SCALARS = ("adaptive-ece", "temperature")
EVALUATE_EXTRA_KEYS = ("num-examples", "server-round")


def split_prefix(split: str, ts: bool) -> str:
    return f"{split}-ts-" if ts else f"{split}-"


def evaluate_metric_keys(splits: list[str], ts: bool, n_bins: int, n_classes: int) -> set[str]:
    """Every key an evaluate reply for these splits carries (with or without TS sums)."""
    stats_keys = set(CalibrationStats.empty(n_bins, n_classes).to_metrics())
    stats10_keys = {"b10-" + k for k in CalibrationStats.empty(10, n_classes).to_metrics()}
    keys = set(EVALUATE_EXTRA_KEYS)
    for split in splits:
        for prefix in [split_prefix(split, False)] + ([split_prefix(split, True)] if ts else []):
            keys |= {prefix + k for k in stats_keys | stats10_keys | set(SPLIT_SCALARS)}
    return keys
