"""Exact, mergeable calibration statistics for federated evaluation.

Every client turns its predictions into a :class:`CalibrationStats` of plain
sums (bin counts, confidence sums, correct counts, NLL and Brier sums).  The
server adds them (``a + b`` or ``sum(stats_list)``), and every metric is then
computed from the pooled sums, so the pooled ECE/MCE/classwise ECE/NLL/Brier
equal those of the concatenated data *exactly* (up to float summation order).

Bin convention: ``n`` equal-width bins; bin ``b`` holds values in
``(b/n, (b+1)/n]``, a value of exactly 0 goes to the first bin and exactly 1.0
to the last.  Indices come from ``np.searchsorted`` against the inner edges
``linspace(0, 1, n + 1)[1:-1]`` (``side="left"``), clamped to ``[0, n - 1]``.

Relation to torchmetrics: ``MulticlassCalibrationError`` bins are ``[a, b)``
with a confidence of exactly 1.0 in a hidden extra bin.  Both conventions give
identical ECE/MCE whenever no confidence lies exactly on a bin edge.

All metrics return ``float('nan')`` when the statistics hold no samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

_CW_FIELDS = ("cw_count", "cw_prob_sum", "cw_label_sum")
_ARRAY_FIELDS = ("bin_count", "bin_conf_sum", "bin_correct_sum", *_CW_FIELDS)
_SUM_FIELDS = (*_ARRAY_FIELDS, "nll_sum", "brier_sum", "correct", "total")
_INT_ARRAYS = {"bin_count", "bin_correct_sum", "cw_count", "cw_label_sum"}
_CHUNK_ELEMENTS = 1 << 22  # bound on temporary array size in nll_at_temperatures


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")


def _check_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(N, K)`` scores and ``(N,)`` labels; return float64 / int64 arrays."""
    s, raw = _to_numpy(scores).astype(np.float64), _to_numpy(labels)
    if s.ndim != 2:
        raise ValueError(f"scores must have shape (N, K), got ndim={s.ndim}")
    if raw.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got ndim={raw.ndim}")
    if s.shape[1] < 1:
        raise ValueError("scores must have at least one class column")
    if raw.shape[0] != s.shape[0]:
        raise ValueError(f"length mismatch: {s.shape[0]} score rows vs {raw.shape[0]} labels")
    y = raw.astype(np.int64)
    if raw.size and not np.array_equal(y, raw):
        raise ValueError("labels must be integers")
    if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"labels must lie in [0, {s.shape[1]}), got range [{y.min()}, {y.max()}]")
    return s, y


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value: ``(b/n, (b+1)/n] -> b``, 0 -> 0, 1 -> n - 1."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.clip(np.searchsorted(edges, values, side="left"), 0, n_bins - 1)


def _binned_sums(values: np.ndarray, targets: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per-column binned (count, value sum, target sum), each of shape ``(G, n_bins)``.

    ``values`` and ``targets`` have shape ``(N, G)``; column ``g`` is binned independently.
    """
    n_groups = values.shape[1]
    flat = (_bin_index(values, n_bins) + n_bins * np.arange(n_groups)).ravel()
    size = n_groups * n_bins

    def acc(weights: np.ndarray | None) -> np.ndarray:
        return (
            np.bincount(flat, weights=weights, minlength=size)
            .astype(np.float64)
            .reshape(n_groups, n_bins)
        )

    return acc(None), acc(values.ravel()), acc(targets.astype(np.float64).ravel())


@dataclass(eq=False)
class CalibrationStats:
    """Additive sufficient statistics for top-label and classwise calibration metrics."""

    n_bins: int
    n_classes: int
    bin_count: np.ndarray
    bin_conf_sum: np.ndarray
    bin_correct_sum: np.ndarray
    cw_count: np.ndarray
    cw_prob_sum: np.ndarray
    cw_label_sum: np.ndarray
    nll_sum: float
    brier_sum: float
    correct: int
    total: int

    # ----------------------------------------------------------------- constructors
    @classmethod
    def empty(cls, n_bins: int, n_classes: int) -> CalibrationStats:
        """Statistics of zero samples (the neutral element of ``+``)."""
        return cls.from_probs(np.zeros((0, n_classes)), np.zeros(0, dtype=np.int64), n_bins)

    @classmethod
    def from_probs(cls, probs: Any, labels: Any, n_bins: int = 15) -> CalibrationStats:
        """Statistics from ``(N, K)`` probabilities; NLL uses ``log(clamp(p, 1e-12))``."""
        _check_n_bins(n_bins)
        p, y = _check_inputs(probs, labels)
        logp = np.log(np.clip(p, 1e-12, None))
        return cls._build(p, logp, y, n_bins)

    @classmethod
    def from_logits(
        cls, logits: Any, labels: Any, n_bins: int = 15, temperature: float = 1.0
    ) -> CalibrationStats:
        """Statistics from ``(N, K)`` logits after dividing them by ``temperature``."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        _check_n_bins(n_bins)
        z, y = _check_inputs(logits, labels)
        logp = _log_softmax(z / temperature)
        return cls._build(np.exp(logp), logp, y, n_bins)

    @classmethod
    def _build(
        cls, p: np.ndarray, logp: np.ndarray, y: np.ndarray, n_bins: int
    ) -> CalibrationStats:
        n, k = p.shape
        onehot = np.zeros((n, k))
        onehot[np.arange(n), y] = 1.0
        hit, conf = p.argmax(axis=1) == y, p.max(axis=1)
        count, conf_sum, correct_sum = _binned_sums(conf[:, None], hit[:, None], n_bins)
        cw_count, cw_prob, cw_label = _binned_sums(p, onehot, n_bins)
        return cls(
            n_bins=int(n_bins),
            n_classes=int(k),
            bin_count=count[0],
            bin_conf_sum=conf_sum[0],
            bin_correct_sum=correct_sum[0],
            cw_count=cw_count,
            cw_prob_sum=cw_prob,
            cw_label_sum=cw_label,
            nll_sum=float(-logp[np.arange(n), y].sum()),
            brier_sum=float(((p - onehot) ** 2).sum()),
            correct=int(hit.sum()),
            total=int(n),
        )

    # ----------------------------------------------------------------- merging
    def __add__(self, other: object) -> CalibrationStats:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        if not isinstance(other, CalibrationStats):
            return NotImplemented
        if (self.n_bins, self.n_classes) != (other.n_bins, other.n_classes):
            raise ValueError(
                "cannot add CalibrationStats with different shapes: (n_bins, n_classes) = "
                f"({self.n_bins}, {self.n_classes}) vs ({other.n_bins}, {other.n_classes})"
            )
        sums = {name: getattr(self, name) + getattr(other, name) for name in _SUM_FIELDS}
        return CalibrationStats(n_bins=self.n_bins, n_classes=self.n_classes, **sums)

    def __radd__(self, other: object) -> CalibrationStats:
        return self.__add__(other)

    def __eq__(self, other: object) -> bool:
        """Exact equality of every field."""
        if not isinstance(other, CalibrationStats):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
        )

    __hash__ = None  # type: ignore[assignment]

    # ----------------------------------------------------------------- invariants
    def inconsistency(self, tol: float = 1e-6) -> str | None:
        """Why these sums cannot come from real predictions, or None if they can.

        Checks what every honest :meth:`from_logits` satisfies: finite sums, integral
        non-negative counts, bins summing to the total, per bin ``count * lo <= confidence sum
        <= count * hi`` for the bin's edges ``(lo, hi]`` and ``0 <= correct <= count``; every
        class column binned once per sample, one label per sample; NLL >= 0, 0 <= Brier <= 2N.
        """
        for check in (self._array_problem, self._bin_problem, self._classwise_problem, self._scalar_problem):
            problem = check(tol)
            if problem:
                return problem
        return None

    def _array_problem(self, tol: float) -> str | None:
        for name in _ARRAY_FIELDS:
            arr = getattr(self, name)
            if not np.isfinite(arr).all():
                return f"{name} is not finite"
            if (arr < 0).any():
                return f"{name} has a negative entry"
            if name in _INT_ARRAYS and not np.array_equal(arr, np.round(arr)):
                return f"{name} has a non-integral count"
        return None

    def _edges(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(self.n_bins) / self.n_bins, np.arange(1, self.n_bins + 1) / self.n_bins

    def _bin_problem(self, tol: float) -> str | None:
        n = self.total
        if not (0 <= self.correct <= n):
            return f"correct={self.correct} outside [0, total={n}]"
        if self.bin_count.sum() != n or self.bin_correct_sum.sum() != self.correct:
            return f"bin counts sum to {self.bin_count.sum():g} (correct {self.bin_correct_sum.sum():g}), totals say {n} ({self.correct})"
        lo, hi = self._edges()
        slack = tol * (1.0 + self.bin_count)
        if (self.bin_correct_sum > self.bin_count).any():
            return "a bin has more correct predictions than predictions"
        if (self.bin_conf_sum < self.bin_count * lo - slack).any() or (self.bin_conf_sum > self.bin_count * hi + slack).any():
            return "a bin's confidence sum lies outside its bin's edges"
        return None

    def _classwise_problem(self, tol: float) -> str | None:
        n = self.total
        if (self.cw_count.sum(axis=1) != n).any() or self.cw_label_sum.sum() != n:
            return "classwise counts do not bin every sample once per class with one label each"
        if (self.cw_label_sum > self.cw_count).any():
            return "a classwise bin has more labels than samples"
        lo, hi = self._edges()
        cw_slack = tol * (1.0 + self.cw_count)
        if (self.cw_prob_sum < self.cw_count * lo - cw_slack).any() or (self.cw_prob_sum > self.cw_count * hi + cw_slack).any():
            return "a classwise probability sum lies outside its bin's edges"
        return None

    def _scalar_problem(self, tol: float) -> str | None:
        if not (math.isfinite(self.nll_sum) and self.nll_sum >= -tol):
            return f"nll_sum={self.nll_sum!r} is not a finite non-negative sum"
        if not (math.isfinite(self.brier_sum) and -tol <= self.brier_sum <= 2 * self.total + tol):
            return f"brier_sum={self.brier_sum!r} outside [0, 2 * total]"
        return None

    # ----------------------------------------------------------------- metrics
    def _gaps(self) -> np.ndarray:
        """``acc_b - conf_b`` per bin (nan for empty bins)."""
        return self.bin_accuracy() - self.bin_confidence()

    def bin_accuracy(self) -> np.ndarray:
        """Per-bin accuracy; nan for empty bins."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.bin_count > 0, self.bin_correct_sum / self.bin_count, np.nan)

    def bin_confidence(self) -> np.ndarray:
        """Per-bin mean confidence; nan for empty bins."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.bin_count > 0, self.bin_conf_sum / self.bin_count, np.nan)

    def ece(self, norm: str = "l1") -> float:
        """Expected calibration error, ``norm`` in {"l1", "l2"}; nan when empty."""
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
        if self.total == 0:
            return math.nan
        mask = self.bin_count > 0
        weights, gaps = self.bin_count[mask] / self.total, self._gaps()[mask]
        if norm == "l1":
            return float(np.sum(weights * np.abs(gaps)))
        return float(np.sqrt(np.sum(weights * gaps**2)))

    def mce(self) -> float:
        """Maximum ``|acc_b - conf_b|`` over non-empty bins; nan when empty."""
        if self.total == 0:
            return math.nan
        return float(np.max(np.abs(self._gaps()[self.bin_count > 0])))

    def mce_count_weighted(self) -> float:
        """FL²oRA's MCE: ``max_b |acc_b - conf_b| * n_b / N`` (each bin's gap weighted by its
        share of the samples, unlike :meth:`mce`); nan when empty."""
        if self.total == 0:
            return math.nan
        mask = self.bin_count > 0
        return float(np.max(np.abs(self._gaps()[mask]) * self.bin_count[mask] / self.total))

    def classwise_ece(self) -> float:
        """Mean over classes of the per-class ECE of ``p_ik`` vs ``1[y_i = k]``; nan when empty."""
        if self.total == 0:
            return math.nan
        mask = self.cw_count > 0
        c = self.cw_count[mask]
        gaps = np.abs(self.cw_label_sum[mask] / c - self.cw_prob_sum[mask] / c)
        return float(np.sum(c / self.total * gaps) / self.n_classes)

    def _per_sample(self, value: float) -> float:
        return float(value / self.total) if self.total else math.nan

    def nll(self) -> float:
        """Mean negative log-likelihood; nan when empty."""
        return self._per_sample(self.nll_sum)

    def brier(self) -> float:
        """Mean multiclass Brier score (sum over classes); nan when empty."""
        return self._per_sample(self.brier_sum)

    def accuracy(self) -> float:
        """Top-1 accuracy; nan when empty."""
        return self._per_sample(self.correct)

    def mean_confidence(self) -> float:
        """Mean top-label confidence; nan when empty."""
        return self._per_sample(float(self.bin_conf_sum.sum()))

    def summary(self) -> dict[str, float]:
        """All scalar metrics as python floats (``n`` is the sample count)."""
        return {
            "accuracy": self.accuracy(),
            "ece": self.ece(),
            "ece_l2": self.ece("l2"),
            "mce": self.mce(),
            "classwise_ece": self.classwise_ece(),
            "nll": self.nll(),
            "brier": self.brier(),
            "mean_confidence": self.mean_confidence(),
            "n": float(self.total),
        }

    # ----------------------------------------------------------------- transport
    def to_metrics(self, prefix: str = "") -> dict[str, int | float | list[int] | list[float]]:
        """Flatten into python ``int``/``float``/lists (Flower ``MetricRecord`` compatible)."""
        out: dict[str, int | float | list[int] | list[float]] = {}
        for name in _ARRAY_FIELDS:
            flat = getattr(self, name).ravel()
            cast = int if name in _INT_ARRAYS else float
            out[prefix + name.replace("_", "-")] = [cast(v) for v in flat]
        out[f"{prefix}nll-sum"] = float(self.nll_sum)
        out[f"{prefix}brier-sum"] = float(self.brier_sum)
        out[f"{prefix}correct"] = int(self.correct)
        out[f"{prefix}total"] = int(self.total)
        out[f"{prefix}n-bins"] = int(self.n_bins)
        out[f"{prefix}n-classes"] = int(self.n_classes)
        return out

    @classmethod
    def from_metrics(cls, d: dict[str, Any], prefix: str = "") -> CalibrationStats:
        """Inverse of :meth:`to_metrics`; a missing key raises ``ValueError``."""

        def get(key: str) -> Any:
            if prefix + key not in d:
                raise ValueError(f"missing calibration metric key {prefix + key!r}")
            return d[prefix + key]

        n_bins, n_classes = int(get("n-bins")), int(get("n-classes"))
        arrays: dict[str, np.ndarray] = {}
        for name in _ARRAY_FIELDS:
            shape = (n_classes, n_bins) if name in _CW_FIELDS else (n_bins,)
            key = name.replace("_", "-")
            arr = np.asarray(get(key), dtype=np.float64)
            if arr.size != math.prod(shape):
                raise ValueError(f"metric {prefix + key!r} has {arr.size} values, expected {shape}")
            arrays[name] = arr.reshape(shape)
        return cls(
            n_bins=n_bins,
            n_classes=n_classes,
            nll_sum=float(get("nll-sum")),
            brier_sum=float(get("brier-sum")),
            correct=int(get("correct")),
            total=int(get("total")),
            **arrays,
        )


# --------------------------------------------------------------------- free functions
def adaptive_ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Equal-mass ECE: sorted top-label confidences split into ``n_bins`` groups.

    Not mergeable across clients.  Returns nan for N = 0; empty groups are skipped.
    """
    _check_n_bins(n_bins)
    p, y = _check_inputs(probs, labels)
    if p.shape[0] == 0:
        return math.nan
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    total = sum(
        len(g) * abs(hit[g].mean() - conf[g].mean())
        for g in np.array_split(order, n_bins)
        if len(g)
    )
    return float(total / p.shape[0])


def fit_temperature(logits: Any, labels: Any, t_min: float = 0.05, t_max: float = 20.0) -> float:
    """Temperature in ``[t_min, t_max]`` minimising the mean NLL of ``softmax(logits / T)``.

    The NLL is convex in ``beta = 1/T``; its derivative ``mean(E_p[z] - z_y)`` is
    bisected on ``[1/t_max, 1/t_min]``.  A boundary optimum returns that boundary;
    a flat objective (N = 0, K = 1, constant logits) returns 1.0 clamped to the range.
    """
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")
    z, y = _check_inputs(logits, labels)
    if z.shape[0] == 0 or z.shape[1] == 1:
        return float(min(max(1.0, t_min), t_max))
    z_y = z[np.arange(z.shape[0]), y]

    def slope(beta: float) -> float:
        p = np.exp(_log_softmax(beta * z))
        return float(np.mean((p * z).sum(axis=1) - z_y))

    lo, hi = 1.0 / t_max, 1.0 / t_min
    d_lo, d_hi = slope(lo), slope(hi)
    if d_lo >= 0 and d_hi <= 0:
        return float(min(max(1.0, t_min), t_max))
    if d_lo >= 0:
        return float(t_max)
    if d_hi <= 0:
        return float(t_min)
    for _ in range(60):  # interval shrinks below 1e-16
        mid = 0.5 * (lo + hi)
        if slope(mid) < 0:
            lo = mid
        else:
            hi = mid
    return float(min(max(2.0 / (lo + hi), t_min), t_max))


def nll_at_temperatures(logits: Any, labels: Any, temperatures: Any) -> list[float]:
    """Summed NLL of ``softmax(logits / T)`` for each ``T`` (additive across clients)."""
    z, y = _check_inputs(logits, labels)
    temps = np.asarray(temperatures, dtype=np.float64).ravel()
    if np.any(~(temps > 0)):
        raise ValueError("temperatures must all be positive")
    n, k = z.shape
    totals = np.zeros(temps.size)
    rows = max(1, _CHUNK_ELEMENTS // max(1, k * temps.size))
    for start in range(0, n, rows):
        zc, yc = z[start : start + rows], y[start : start + rows]
        scaled = zc[None, :, :] / temps[:, None, None]  # (T, rows, K)
        logp = _log_softmax(scaled)
        totals -= logp[:, np.arange(zc.shape[0]), yc].sum(axis=1)
    return [float(v) for v in totals]


def default_temperature_grid(n: int = 61, t_min: float = 0.25, t_max: float = 4.0) -> list[float]:
    """``n`` log-spaced temperatures in ``[t_min, t_max]``.

    When 1.0 is inside the range, the grid point nearest to it (in log space) is set to
    exactly 1.0 (for the defaults that point is 1.0 up to rounding anyway).
    """
    if n < 2 or not 0 < t_min < t_max:
        raise ValueError(
            f"need n >= 2 and 0 < t_min < t_max, got n={n}, t_min={t_min}, t_max={t_max}"
        )
    grid = np.geomspace(t_min, t_max, n)
    if t_min <= 1.0 <= t_max:
        grid[np.argmin(np.abs(np.log(grid)))] = 1.0
    return [float(v) for v in grid]
