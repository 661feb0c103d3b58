"""FedDyn and FedNova, written here as Flower strategies (Flower 1.42 ships neither).

Both subclass Flower's message-based ``FedAvg`` and reuse its reply checks, weighting
(``weighted_by_key``: number of examples or a uniform weight) and metric aggregation; they only
replace how the trainable arrays are combined.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


def _weights(replies: list[Message], key: str) -> np.ndarray:
    w = np.array([float(next(iter(m.content.metric_records.values()))[key]) for m in replies], dtype=np.float64)
    return w / w.sum()


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    record = next(iter(msg.content.array_records.values()))
    return {k: v.numpy().astype(np.float64) for k, v in record.items()}


def _record(arrays: dict[str, np.ndarray], like: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=like[k].dtype)) for k, v in arrays.items()})


class _FromGlobal(FedAvg):
    """FedAvg whose aggregation needs the global arrays sent out this round (kept as numpy)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.current_arrays: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current_arrays = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.current_arrays is None:
            return None, None
        w = {k: v.astype(np.float64) for k, v in self.current_arrays.items()}
        new = self._combine(valid, _weights(valid, self.weighted_by_key), w)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return _record(new, self.current_arrays), metrics

    def _combine(self, valid: list[Message], p: np.ndarray, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global arrays from the valid replies, their weights p (summing to 1) and the
        global arrays w sent out this round (float64)."""
        raise NotImplementedError


class FedNova(_FromGlobal):
    r"""FedNova (Wang et al., NeurIPS 2020): normalised averaging of heterogeneous local work.

    Client i ran tau_i local steps and reports a_i = ||a_i||_1 ("fednova-a": tau_i for plain SGD,
    [tau_i - rho(1 - rho^tau_i)/(1 - rho)] / (1 - rho) for SGD with momentum rho). With weights
    p_i (examples or uniform, summing to 1) and the global model w:

        d_i     = (w - w_i) / a_i                 (normalised update)
        tau_eff = sum_i p_i a_i
        w'      = w - eta_g * tau_eff * sum_i p_i d_i

    With equal a_i and eta_g = 1 this is exactly FedAvg.
    """

    def __init__(self, *args, server_learning_rate: float = 1.0, normaliser_key: str = "fednova-a", **kwargs):
        super().__init__(*args, **kwargs)
        self.server_learning_rate = server_learning_rate
        self.normaliser_key = normaliser_key

    def _combine(self, valid: list[Message], p: np.ndarray, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = np.array([float(next(iter(m.content.metric_records.values()))[self.normaliser_key]) for m in valid])
        if np.any(a <= 0):
            raise ValueError("FedNova needs every client's fednova-a > 0 (a client reported no local step)")
        tau_eff = float(np.dot(p, a))
        direction = {k: np.zeros_like(v) for k, v in w.items()}
        for pi, ai, msg in zip(p, a, valid, strict=True):
            for k, wi in _arrays(msg).items():
                direction[k] += pi * (w[k] - wi) / ai
        return {k: w[k] - self.server_learning_rate * tau_eff * direction[k] for k in w}


class FedDyn(_FromGlobal):
    r"""FedDyn (Acar et al., ICLR 2021), server side.

    Clients add -<g_k, w> + (alpha/2)||w - w^{t-1}||^2 to their local loss (client/losses.py). With
    m the number of clients that can train, P_t the participants, p_k their weights (uniform in the
    paper), the server keeps a state h (zeros at the start):

        h^t  = h^{t-1} - alpha * (1/m) * sum_{k in P_t} (w_k^t - w^{t-1})
        w^t  = sum_{k in P_t} p_k w_k^t - (1/alpha) h^t
    """

    def __init__(self, *args, alpha: float = 0.01, num_clients: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.num_clients = num_clients
        self.h: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["feddyn-alpha"] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)

    def _combine(self, valid: list[Message], p: np.ndarray, w_prev: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.h is None:
            self.h = {k: np.zeros_like(v) for k, v in w_prev.items()}
        mean = {k: np.zeros_like(v) for k, v in w_prev.items()}
        delta_sum = {k: np.zeros_like(v) for k, v in w_prev.items()}
        for pk, msg in zip(p, valid, strict=True):
            for k, wk in _arrays(msg).items():
                mean[k] += pk * wk
                delta_sum[k] += wk - w_prev[k]
        self.h = {k: self.h[k] - self.alpha * delta_sum[k] / max(self.num_clients, 1) for k in w_prev}
        return {k: mean[k] - self.h[k] / self.alpha for k in w_prev}
