"""Tests for common.calibration against independent reference implementations."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torchmetrics.classification import MulticlassCalibrationError

import common.calibration as cal
from common.calibration import (
    CalibrationStats,
    adaptive_ece,
    default_temperature_grid,
    fit_temperature,
    nll_at_temperatures,
)

ARRAY_FIELDS = (
    "bin_count",
    "bin_conf_sum",
    "bin_correct_sum",
    "cw_count",
    "cw_prob_sum",
    "cw_label_sum",
)
METRICS = ("ece", "mce", "classwise_ece", "nll", "brier", "accuracy", "mean_confidence")


# ----------------------------------------------------------------------------- helpers
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def edge_distance(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Distance of each value to the nearest bin edge k / n_bins."""
    return np.abs(x * n_bins - np.round(x * n_bins)) / n_bins


def make_data(
    seed: int, n: int, k: int, scale: float = 2.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random (logits, probs, labels), resampling rows whose confidence is within 1e-6 of an edge."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * scale
    while True:
        conf = softmax(logits).max(axis=1)
        bad = np.zeros(n, dtype=bool)
        for n_bins in (10, 15):
            bad |= edge_distance(conf, n_bins) < 1e-6
        if not bad.any():
            break
        logits[bad] = rng.normal(size=(int(bad.sum()), k)) * scale
    probs = softmax(logits)
    # labels from a softer distribution -> the model is over-confident but not useless
    soft = softmax(logits * 0.6)
    labels = np.array([rng.choice(k, p=row) for row in soft])
    return logits, probs, labels


def assert_stats_close(
    a: CalibrationStats, b: CalibrationStats, atol: float = 1e-9, mtol: float = 1e-12
) -> None:
    assert (a.n_bins, a.n_classes, a.total, a.correct) == (
        b.n_bins,
        b.n_classes,
        b.total,
        b.correct,
    )
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        assert np.allclose(x, y, rtol=0, atol=atol), name
    assert math.isclose(a.nll_sum, b.nll_sum, rel_tol=1e-12, abs_tol=atol)
    assert math.isclose(a.brier_sum, b.brier_sum, rel_tol=1e-12, abs_tol=atol)
    for m in METRICS:
        x, y = getattr(a, m)(), getattr(b, m)()
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= mtol, (m, x, y)


def ref_bin(p: float, n_bins: int) -> int:
    """Independent bin rule: (b/n, (b+1)/n] -> b, with 0 -> 0."""
    return min(max(math.ceil(p * n_bins) - 1, 0), n_bins - 1)


# ----------------------------------------------------------------------------- 1/2: torchmetrics
@pytest.mark.parametrize("n_bins", [15, 10])
@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_mce_match_torchmetrics(seed: int, k: int, n_bins: int) -> None:
    n = 500 + 500 * seed
    _, probs, labels = make_data(seed, n, k)
    stats = CalibrationStats.from_probs(probs, labels, n_bins=n_bins)
    p_t, y_t = torch.from_numpy(probs), torch.from_numpy(labels)
    ece_ref = MulticlassCalibrationError(num_classes=k, n_bins=n_bins, norm="l1")(p_t, y_t).item()
    mce_ref = MulticlassCalibrationError(num_classes=k, n_bins=n_bins, norm="max")(p_t, y_t).item()
    assert stats.ece() == pytest.approx(ece_ref, abs=1e-6)
    assert stats.mce() == pytest.approx(mce_ref, abs=1e-6)
    assert stats.ece() > 0.01  # non-trivial data


def test_ece_l2_matches_torchmetrics() -> None:
    _, probs, labels = make_data(5, 1000, 4)
    stats = CalibrationStats.from_probs(probs, labels)
    ref = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l2")(
        torch.from_numpy(probs), torch.from_numpy(labels)
    ).item()
    assert stats.ece("l2") == pytest.approx(ref, abs=1e-6)
    assert stats.ece("l2") >= stats.ece()


# ----------------------------------------------------------------------------- 3: pooled == concatenated
def test_pooled_equals_concatenated() -> None:
    logits, probs, labels = make_data(7, 1500, 6)
    cuts = [0, 100, 100, 800, 1370, 1500]  # 5 uneven shards, one empty
    for build, data in (
        (CalibrationStats.from_probs, probs),
        (CalibrationStats.from_logits, logits),
    ):
        shards = [build(data[a:b], labels[a:b]) for a, b in pairwise(cuts)]
        assert shards[1].total == 0
        pooled = sum(shards)
        assert isinstance(pooled, CalibrationStats)
        assert_stats_close(pooled, build(data, labels))


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_pooled_equals_concatenated_property(data: st.DataObject) -> None:
    k = data.draw(st.integers(1, 5), label="k")
    n = data.draw(st.integers(0, 25), label="n")
    n_bins = data.draw(st.integers(1, 8), label="n_bins")
    logits = data.draw(hnp.arrays(np.float64, (n, k), elements=st.floats(-8, 8)), label="logits")
    labels = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, k - 1)), label="labels")
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=4), label="cuts"))
    bounds = [0, *cuts, n]
    shards = [
        CalibrationStats.from_logits(logits[a:b], labels[a:b], n_bins=n_bins)
        for a, b in pairwise(bounds)
    ]
    assert_stats_close(sum(shards), CalibrationStats.from_logits(logits, labels, n_bins=n_bins))


# ----------------------------------------------------------------------------- 4: direct references
def test_nll_and_brier_match_direct_computation() -> None:
    logits, probs, labels = make_data(3, 800, 5)
    z_t, y_t = torch.from_numpy(logits), torch.from_numpy(labels)
    from_logits = CalibrationStats.from_logits(z_t, y_t)
    assert from_logits.nll() == pytest.approx(F.cross_entropy(z_t, y_t).item(), rel=1e-12)
    p_t = torch.from_numpy(probs)
    brier_ref = ((p_t - F.one_hot(y_t, 5).double()) ** 2).sum(dim=1).mean().item()
    assert from_logits.brier() == pytest.approx(brier_ref, rel=1e-10)
    from_probs = CalibrationStats.from_probs(probs, labels)
    assert from_probs.nll() == pytest.approx(
        -np.log(probs[np.arange(800), labels]).mean(), rel=1e-12
    )
    assert from_probs.brier() == pytest.approx(brier_ref, rel=1e-10)
    assert from_probs.accuracy() == pytest.approx((probs.argmax(1) == labels).mean())
    assert from_probs.mean_confidence() == pytest.approx(probs.max(1).mean(), rel=1e-12)


def test_classwise_ece_matches_loop() -> None:
    _, probs, labels = make_data(11, 600, 4)
    n_bins = 15
    n, k = probs.shape
    total = 0.0
    for c in range(k):
        bins: dict[int, list[int]] = {}
        for i in range(n):
            bins.setdefault(ref_bin(probs[i, c], n_bins), []).append(i)
        for idx in bins.values():
            frac = np.mean([labels[i] == c for i in idx])
            mean_p = np.mean([probs[i, c] for i in idx])
            total += len(idx) / n * abs(frac - mean_p)
    stats = CalibrationStats.from_probs(probs, labels, n_bins=n_bins)
    assert stats.classwise_ece() == pytest.approx(total / k, abs=1e-12)
    assert stats.cw_count.shape == (k, n_bins)
    assert np.all(stats.cw_count.sum(axis=1) == n)


def test_logits_probs_and_tensor_inputs_agree() -> None:
    logits, probs, labels = make_data(4, 300, 3)
    a = CalibrationStats.from_logits(torch.from_numpy(logits).float(), torch.from_numpy(labels))
    b = CalibrationStats.from_probs(softmax(logits.astype(np.float32).astype(np.float64)), labels)
    assert_stats_close(a, b, atol=1e-9, mtol=1e-9)
    scaled = CalibrationStats.from_logits(logits, labels, temperature=2.5)
    assert_stats_close(scaled, CalibrationStats.from_logits(logits / 2.5, labels))


# ----------------------------------------------------------------------------- 5: metrics round trip
def test_metrics_round_trip_and_types() -> None:
    logits, _, labels = make_data(8, 400, 5)
    stats = CalibrationStats.from_logits(logits, labels, n_bins=12)
    d = stats.to_metrics(prefix="val-")
    assert all(key.startswith("val-") for key in d)
    for key in (
        "bin-count",
        "bin-conf-sum",
        "bin-correct-sum",
        "cw-count",
        "cw-prob-sum",
        "cw-label-sum",
        "nll-sum",
        "brier-sum",
        "correct",
        "total",
        "n-bins",
        "n-classes",
    ):
        assert "val-" + key in d
    for key, value in d.items():
        if isinstance(value, list):
            assert value and all(type(v) in (int, float) for v in value), key
            assert len({type(v) for v in value}) == 1, key
        else:
            assert type(value) in (int, float), key
    assert type(d["val-total"]) is int and type(d["val-bin-count"][0]) is int
    assert len(d["val-cw-count"]) == 5 * 12
    back = CalibrationStats.from_metrics(d, "val-")
    assert back == stats
    assert back.summary() == stats.summary()
    empty = CalibrationStats.empty(15, 3)
    assert CalibrationStats.from_metrics(empty.to_metrics()) == empty


def test_from_metrics_missing_key() -> None:
    d = CalibrationStats.empty(5, 2).to_metrics(prefix="p-")
    del d["p-brier-sum"]
    with pytest.raises(ValueError, match="p-brier-sum"):
        CalibrationStats.from_metrics(d, "p-")


# ----------------------------------------------------------------------------- 6: edge cases
def test_single_class_client() -> None:
    logits, _, _ = make_data(9, 200, 7)
    labels = np.full(200, 3)
    stats = CalibrationStats.from_logits(logits, labels)
    assert stats.cw_label_sum.sum(axis=1).tolist() == [0, 0, 0, 200, 0, 0, 0]
    for value in stats.summary().values():
        assert math.isfinite(value)


def test_one_hot_confidences_land_in_last_bin() -> None:
    n, k, n_bins = 50, 4, 15
    labels = np.arange(n) % k
    preds = (labels + (np.arange(n) % 5 == 0)) % k  # 10 wrong predictions
    probs = np.eye(k)[preds]
    stats = CalibrationStats.from_probs(probs, labels, n_bins=n_bins)
    assert stats.bin_count[-1] == n and stats.bin_count[:-1].sum() == 0
    assert stats.ece() == pytest.approx(1 - 40 / 50)
    assert stats.mce() == pytest.approx(0.2)
    # classwise probabilities of exactly 0 go to the first bin, 1.0 to the last
    assert stats.cw_count[:, 0].sum() == n * (k - 1)
    assert stats.cw_count[:, -1].sum() == n
    assert math.isfinite(stats.classwise_ece()) and math.isfinite(stats.nll())


def test_values_on_inner_edges_go_to_lower_bin() -> None:
    stats = CalibrationStats.from_probs(np.array([[0.25, 0.75]]), np.array([1]), n_bins=4)
    assert stats.bin_count.tolist() == [0, 0, 1, 0]  # 0.75 in (0.5, 0.75]
    assert stats.cw_count.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]  # 0.25 in (0, 0.25]


def test_empty_stats() -> None:
    stats = CalibrationStats.from_probs(np.zeros((0, 5)), np.zeros(0, dtype=np.int64))
    assert stats.total == 0 and stats.bin_count.shape == (15,) and stats.cw_count.shape == (5, 15)
    assert stats == CalibrationStats.empty(15, 5)
    summary = stats.summary()
    assert summary["n"] == 0
    assert all(math.isnan(v) for key, v in summary.items() if key != "n")
    assert np.isnan(stats.bin_accuracy()).all() and np.isnan(stats.bin_confidence()).all()
    assert math.isnan(adaptive_ece(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)))
    logits, _, labels = make_data(1, 30, 5)
    full = CalibrationStats.from_logits(logits, labels)
    assert_stats_close(stats + full, full)


def test_add_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        CalibrationStats.empty(10, 3) + CalibrationStats.empty(15, 3)
    with pytest.raises(ValueError, match="n_classes"):
        CalibrationStats.empty(10, 3) + CalibrationStats.empty(10, 4)
    with pytest.raises(TypeError):
        CalibrationStats.empty(10, 3) + 1.5  # noqa: B018


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: CalibrationStats.from_probs(np.ones(3), np.zeros(3, dtype=int)), "ndim"),
        (lambda: CalibrationStats.from_probs(np.ones((3, 2)), np.zeros((3, 1), dtype=int)), "ndim"),
        (lambda: CalibrationStats.from_probs(np.ones((3, 2)), np.zeros(4, dtype=int)), "mismatch"),
        (lambda: CalibrationStats.from_probs(np.ones((3, 2)), np.array([0, 1, 2])), r"\[0, 2\)"),
        (lambda: CalibrationStats.from_probs(np.ones((3, 2)), np.array([0, -1, 1])), r"\[0, 2\)"),
        (
            lambda: CalibrationStats.from_logits(
                np.ones((3, 2)), np.zeros(3, dtype=int), temperature=0.0
            ),
            "temperature",
        ),
        (
            lambda: CalibrationStats.from_probs(np.ones((3, 2)), np.zeros(3, dtype=int), n_bins=0),
            "n_bins",
        ),
        (lambda: CalibrationStats.empty(5, 2).ece("max"), "norm"),
    ],
)
def test_input_validation(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- 7: temperature scaling
def overconfident(
    seed: int, n: int = 2000, k: int = 10, factor: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, k)) * 1.5
    cdf = softmax(true_logits).cumsum(axis=1)
    labels = np.minimum(
        (rng.random((n, 1)) > cdf).sum(axis=1), k - 1
    )  # sample from the calibrated model
    return true_logits * factor, labels


def test_fit_temperature_fixes_overconfidence() -> None:
    logits, labels = overconfident(0)
    t = fit_temperature(logits, labels)
    assert isinstance(t, float) and t > 1
    assert 3.5 < t < 7  # the generator is over-confident by a factor of 5
    before = CalibrationStats.from_logits(logits, labels)
    after = CalibrationStats.from_logits(logits, labels, temperature=t)
    assert after.nll() < before.nll()
    assert after.ece() < before.ece()
    # the fitted T is the minimiser: nudging it in either direction is worse
    for other in (t * 0.97, t * 1.03):
        assert CalibrationStats.from_logits(logits, labels, temperature=other).nll() > after.nll()


def test_nll_at_temperatures_matches_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, labels = overconfident(1, n=500, k=6)
    temps = [0.3, 1.0, 2.0, 5.0, 11.0]
    z_t, y_t = torch.from_numpy(logits), torch.from_numpy(labels)
    ref = [F.cross_entropy(z_t / t, y_t, reduction="sum").item() for t in temps]
    got = nll_at_temperatures(logits, labels, temps)
    assert all(type(v) is float for v in got)
    assert got == pytest.approx(ref, rel=1e-6)
    monkeypatch.setattr(cal, "_CHUNK_ELEMENTS", 64)  # force many small chunks
    assert nll_at_temperatures(logits, labels, temps) == pytest.approx(ref, rel=1e-10)
    # additivity: the sums of two shards add up to the sum of the whole
    parts = [
        nll_at_temperatures(logits[a:b], labels[a:b], temps) for a, b in ((0, 123), (123, 500))
    ]
    assert np.add(*parts) == pytest.approx(got, rel=1e-12)


def test_grid_argmin_agrees_with_fit_temperature() -> None:
    logits, labels = overconfident(2, n=1000, k=8, factor=3.0)
    grid = np.geomspace(0.5, 20.0, 401)
    best = grid[int(np.argmin(nll_at_temperatures(logits, labels, grid)))]
    step = math.log(grid[1] / grid[0])
    assert abs(math.log(best) - math.log(fit_temperature(logits, labels))) <= step + 1e-12


def test_fit_temperature_degenerate_cases() -> None:
    logits, _ = overconfident(3, n=100, k=5)
    single = fit_temperature(logits, np.zeros(100, dtype=np.int64))
    assert math.isfinite(single) and 0.05 <= single <= 20.0
    # all correct and confident: optimum at the smallest temperature
    confident = np.eye(4)[np.arange(40) % 4] * 10.0
    assert fit_temperature(confident, np.arange(40) % 4) == pytest.approx(0.05)
    # all wrong and confident: optimum at the largest temperature
    assert fit_temperature(confident, (np.arange(40) + 1) % 4) == pytest.approx(20.0)
    assert fit_temperature(np.zeros((0, 5)), np.zeros(0, dtype=np.int64)) == 1.0
    assert (
        fit_temperature(np.random.default_rng(0).normal(size=(10, 1)), np.zeros(10, dtype=np.int64))
        == 1.0
    )
    assert nll_at_temperatures(np.zeros((0, 5)), np.zeros(0, dtype=np.int64), [0.5, 1.0]) == [
        0.0,
        0.0,
    ]
    sums = nll_at_temperatures(logits, np.zeros(100, dtype=np.int64), [0.5, 1.0, 2.0])
    assert all(math.isfinite(v) for v in sums)


def test_default_temperature_grid() -> None:
    grid = default_temperature_grid()
    assert len(grid) == 61 and 1.0 in grid
    assert grid[0] == pytest.approx(0.25) and grid[-1] == pytest.approx(4.0)
    ratios = np.diff(np.log(grid))
    assert np.allclose(ratios, ratios[0])
    assert all(type(v) is float for v in grid)
    assert 1.0 in default_temperature_grid(n=10, t_min=0.3, t_max=7.0)


# ----------------------------------------------------------------------------- 8: adaptive ECE
def ref_adaptive_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    n = len(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    order = sorted(range(n), key=lambda i: conf[i])
    base, extra = divmod(n, n_bins)
    total, start = 0.0, 0
    for b in range(n_bins):
        size = base + (1 if b < extra else 0)
        idx = order[start : start + size]
        start += size
        if idx:
            total += (
                size
                / n
                * abs(sum(correct[i] for i in idx) / size - sum(conf[i] for i in idx) / size)
            )
    return total


@pytest.mark.parametrize(("n", "n_bins"), [(1000, 15), (37, 10), (7, 15)])
def test_adaptive_ece_matches_reference(n: int, n_bins: int) -> None:
    _, probs, labels = make_data(n, n, 5)
    assert adaptive_ece(probs, labels, n_bins) == pytest.approx(
        ref_adaptive_ece(probs, labels, n_bins), abs=1e-12
    )


def test_adaptive_ece_differs_on_skewed_data() -> None:
    # all confidences inside the top equal-width bin; wrong below 0.97, right above
    conf = np.linspace(0.94, 0.999, 1500)
    probs = np.stack([1 - conf, conf], axis=1)
    labels = (conf > 0.97).astype(np.int64)
    stats = CalibrationStats.from_probs(probs, labels)
    assert stats.bin_count[-1] == 1500
    # one equal-width bin lets over- and under-confidence cancel; equal-mass bins do not
    assert adaptive_ece(probs, labels) > stats.ece() + 0.01


# ----------------------------------------------------------------------------- 9: plotting
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_reliability_diagrams_write_png_and_pdf_side_by_side(tmp_path) -> None:
    from server.figures import SPARSE, reliability

    logits, _, labels = make_data(13, 500, 4)
    before = CalibrationStats.from_logits(logits, labels)
    after = CalibrationStats.from_logits(logits, labels, temperature=1.5)
    paths = reliability([(before, "before", None), (after, "after", {"T": "1.50"})], tmp_path / "nested" / "rel")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC) and paths[1].read_bytes().startswith(b"%PDF")
    assert (before.bin_count[before.bin_count > 0] < SPARSE).any()  # the data has sparse bins to mark
    empty = reliability([(CalibrationStats.empty(15, 4), "empty", None)], tmp_path / "empty")
    assert empty[0].read_bytes().startswith(PNG_MAGIC)
