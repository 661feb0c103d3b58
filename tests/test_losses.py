"""Tests for client.losses: every loss against its formula on tiny hand-checked examples.

Expected values are written out with ``math`` from the published formulas (never by
calling the code under test), on examples chosen so that the probabilities are simple
fractions: e.g. logits ``[log 3, 0]`` give ``p = [3/4, 1/4]``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from client import losses as L

LN = math.log
DTYPES = [torch.float32, torch.float64]


def t(x, dtype=torch.float64, grad=False):
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


def lab(x):
    return torch.tensor(x, dtype=torch.int64)


def close(actual, expected, tol=1e-6):
    assert actual.ndim == 0
    actual = actual.detach()
    assert math.isclose(float(actual), expected, rel_tol=tol, abs_tol=tol), (
        float(actual),
        expected,
    )


def grad_of(fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    fn(x).backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    return x.grad


# Shared 2-sample, 2-class example: p_0 = [3/4, 1/4] (label 0: correct, conf 0.75),
# p_1 = [1/5, 4/5] (label 0: wrong, conf 0.8).
EX_LOGITS = [[LN(3.0), 0.0], [0.0, LN(4.0)]]
EX_LABELS = [0, 0]


# --------------------------------------------------------------------------- cross-entropy


def _lse(row):
    return math.log(sum(math.exp(v) for v in row))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_hand_value(dtype):
    rows, y = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [2, 0]
    nll = [_lse(r) - r[k] for r, k in zip(rows, y, strict=True)]
    close(L.cross_entropy(t(rows, dtype), lab(y)), sum(nll) / 2, 1e-5)
    eps = 0.1
    # smoothed: (1 - eps) * NLL + eps * mean_k(-log p_k)
    smooth = [sum(_lse(r) - v for v in r) / 3 for r in rows]
    expected = sum((1 - eps) * a + eps * b for a, b in zip(nll, smooth, strict=True)) / 2
    close(L.cross_entropy(t(rows, dtype), lab(y), label_smoothing=eps), expected, 1e-5)


def test_cross_entropy_smoothing_puts_eps_over_k_on_true_class():
    # target distribution: 1 - eps + eps/K on the true class, eps/K elsewhere
    rows, y, eps = [[0.5, -1.0, 2.0]], [0], 0.3
    lp = [v - _lse(rows[0]) for v in rows[0]]
    target = [1 - eps + eps / 3, eps / 3, eps / 3]
    expected = -sum(q * v for q, v in zip(target, lp, strict=True))
    close(L.cross_entropy(t(rows), lab(y), label_smoothing=eps), expected)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_matches_torch(eps):
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    expected = F.cross_entropy(logits, y, label_smoothing=eps)
    torch.testing.assert_close(L.cross_entropy(logits, y, label_smoothing=eps), expected)
    grad_of(lambda x: L.cross_entropy(x, y, label_smoothing=eps), logits)


def test_cross_entropy_rejects_bad_inputs():
    with pytest.raises(ValueError):
        L.cross_entropy(t([[0.0, 1.0]]), lab([0]), label_smoothing=1.5)
    with pytest.raises(ValueError):
        L.cross_entropy(t([0.0, 1.0]), lab([0]))
    with pytest.raises(ValueError):
        L.cross_entropy(t([[0.0, 1.0]]), lab([0, 1]))


# --------------------------------------------------------------------------- focal / FLSD-53


@pytest.mark.parametrize("dtype", DTYPES)
def test_focal_hand_value(dtype):
    # p_y = 3/4 (sample 0), 1/5 (sample 1)
    expected = (-(0.25**3) * LN(0.75) - (0.8**3) * LN(0.2)) / 2
    close(L.focal_loss(t(EX_LOGITS, dtype), lab(EX_LABELS)), expected, 1e-5)
    expected2 = (-(0.25**2) * LN(0.75) - (0.8**2) * LN(0.2)) / 2
    close(L.focal_loss(t(EX_LOGITS, dtype), lab(EX_LABELS), gamma=2.0), expected2, 1e-5)
    grad_of(lambda x: L.focal_loss(x, lab(EX_LABELS)), t(EX_LOGITS, dtype))


def test_focal_gamma_zero_equals_ce():
    g = torch.Generator().manual_seed(1)
    logits, y = (
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.tensor([0, 1, 2, 3, 4, 0]),
    )
    torch.testing.assert_close(L.focal_loss(logits, y, gamma=0.0), F.cross_entropy(logits, y))
    grad_of(lambda x: L.focal_loss(x, y, gamma=0.0), logits)


def test_focal_rejects_bad_gamma():
    with pytest.raises(ValueError):
        L.focal_loss(t(EX_LOGITS), lab(EX_LABELS), gamma=-1.0)
    with pytest.raises(ValueError):
        L.focal_loss(t(EX_LOGITS), lab(EX_LABELS), gamma="flsd")


def test_flsd53_gamma_threshold():
    p = t([0.05, 0.1999, 0.2, 0.35, 0.6, 1.0], grad=True)
    g = L.flsd53_gamma(p)
    assert g.tolist() == [5.0, 5.0, 3.0, 3.0, 3.0, 3.0]
    assert not g.requires_grad and g.dtype == p.dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_focal_flsd53_picks_gamma_per_sample(dtype):
    # sample 0: p_y = 1/10 < 0.2 -> gamma 5; sample 1: p_y = 6/10 -> gamma 3
    logits = t([[0.0, LN(9.0)], [LN(6.0), LN(4.0)]], dtype)
    y = lab([0, 0])
    expected = (-(0.9**5) * LN(0.1) - (0.4**3) * LN(0.6)) / 2
    close(L.focal_loss(logits, y, gamma="flsd53"), expected, 1e-5)
    # it is not plain gamma=3 nor gamma=5
    assert not math.isclose(float(L.focal_loss(logits, y, gamma=3.0)), expected, rel_tol=1e-3)
    assert not math.isclose(float(L.focal_loss(logits, y, gamma=5.0)), expected, rel_tol=1e-3)
    grad_of(lambda x: L.focal_loss(x, y, gamma="flsd53"), logits)


# --------------------------------------------------------------------------- MbLS


@pytest.mark.parametrize("dtype", DTYPES)
def test_mbls_hand_value(dtype):
    # row 0: max 25, gaps [25, 13, 0] -> relu(gap - 10) = [15, 3, 0]; row 1: gaps <= 2 -> 0
    logits = t([[0.0, 12.0, 25.0], [1.0, 2.0, 3.0]], dtype)
    close(L.mbls_penalty(logits), (15 + 3) / 6)  # mean over all B*K = 6 elements
    close(L.mbls_penalty(logits, margin=5.0), (20 + 8 + 0 + 0 + 0 + 0) / 6)
    g = grad_of(L.mbls_penalty, logits)
    # d/dl of mean relu(max - l_j - m): -1/6 on each active l_j, +(#active)/6 on the max
    torch.testing.assert_close(g, t([[-1 / 6, -1 / 6, 2 / 6], [0.0, 0.0, 0.0]], dtype))


def test_mbls_zero_when_gaps_below_margin():
    logits = t([[0.0, 9.0, 5.0], [-3.0, 4.0, 6.9]], grad=True)
    p = L.mbls_penalty(logits, margin=10.0)
    assert float(p.detach()) == 0.0
    p.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------- DCA / MDCA / MMCE


@pytest.mark.parametrize("dtype", DTYPES)
def test_dca_hand_value(dtype):
    # mean confidence (0.75 + 0.8)/2 = 0.775, accuracy 1/2
    close(L.dca_penalty(t(EX_LOGITS, dtype), lab(EX_LABELS)), 0.275, 1e-6)
    grad_of(lambda x: L.dca_penalty(x, lab(EX_LABELS)), t(EX_LOGITS, dtype))


def test_dca_zero_when_confidence_equals_accuracy():
    # four samples with confidence 3/4, three of them correct -> accuracy 3/4
    logits = t([[LN(3.0), 0.0]] * 4)
    close(L.dca_penalty(logits, lab([0, 0, 0, 1])), 0.0, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mdca_hand_value(dtype):
    # mean probs: class 0 (0.75 + 0.2)/2 = 0.475, class 1 0.525; label freq [1, 0]
    close(L.mdca_penalty(t(EX_LOGITS, dtype), lab(EX_LABELS)), (0.525 + 0.525) / 2, 1e-6)
    # 3 classes: p_0 = [1/2, 1/4, 1/4], p_1 = [1/6, 1/6, 4/6], labels [0, 2]
    logits = t([[LN(2.0), 0.0, 0.0], [0.0, 0.0, LN(4.0)]], dtype)
    mean_p = [(1 / 2 + 1 / 6) / 2, (1 / 4 + 1 / 6) / 2, (1 / 4 + 4 / 6) / 2]
    freq = [0.5, 0.0, 0.5]
    expected = sum(abs(a - b) for a, b in zip(mean_p, freq, strict=True)) / 3
    close(L.mdca_penalty(logits, lab([0, 2])), expected, 1e-6)
    grad_of(lambda x: L.mdca_penalty(x, lab([0, 2])), logits)


def test_mdca_zero_on_matching_class_frequencies():
    # uniform predictions, balanced labels
    close(L.mdca_penalty(torch.zeros(4, 2, dtype=torch.float64), lab([0, 1, 1, 0])), 0.0, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mmce_two_sample_hand_value(dtype):
    # c = [0.75, 0.8], r = [1, 0]
    d0, d1 = 1 - 0.75, 0 - 0.8
    k01 = math.exp(-abs(0.75 - 0.8) / 0.4)
    mmce2 = (d0 * d0 + d1 * d1 + 2 * d0 * d1 * k01) / 4
    close(L.mmce_penalty(t(EX_LOGITS, dtype), lab(EX_LABELS)), math.sqrt(mmce2 + 1e-10), 1e-5)
    k01w = math.exp(-abs(0.75 - 0.8) / 0.1)
    mmce2w = (d0 * d0 + d1 * d1 + 2 * d0 * d1 * k01w) / 4
    close(
        L.mmce_penalty(t(EX_LOGITS, dtype), lab(EX_LABELS), width=0.1),
        math.sqrt(mmce2w + 1e-10),
        1e-5,
    )
    grad_of(lambda x: L.mmce_penalty(x, lab(EX_LABELS)), t(EX_LOGITS, dtype))
    # the reference code's form is MMCE^2 itself
    close(L.mmce_penalty(t(EX_LOGITS, dtype), lab(EX_LABELS), form="reference"), mmce2, 1e-6)
    close(L.calibration_penalty("mmce", t(EX_LOGITS, dtype), lab(EX_LABELS), weight=3.0, mmce_form="reference"), 3.0 * mmce2, 1e-6)
    with pytest.raises(ValueError, match="MMCE form"):
        L.mmce_penalty(t(EX_LOGITS, dtype), lab(EX_LABELS), form="squared")


def test_mmce_limit_all_correct_confident():
    logits = t([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]])
    # r_i - c_i = 0 for both samples -> sqrt(0 + 1e-10) = 1e-5
    close(L.mmce_penalty(logits, lab([0, 1])), 1e-5, 1e-6)
    grad_of(lambda x: L.mmce_penalty(x, lab([0, 1])), logits)


# --------------------------------------------------------------------------- dispatchers


def test_calibration_penalty_dispatch_and_default_weights():
    logits, y = t(EX_LOGITS), lab(EX_LABELS)
    torch.testing.assert_close(
        L.calibration_penalty("mbls", logits, y), 0.1 * L.mbls_penalty(logits)
    )
    torch.testing.assert_close(
        L.calibration_penalty("dca", logits, y), 1.0 * L.dca_penalty(logits, y)
    )
    torch.testing.assert_close(
        L.calibration_penalty("mdca", logits, y), 1.0 * L.mdca_penalty(logits, y)
    )
    torch.testing.assert_close(
        L.calibration_penalty("mmce", logits, y), 2.0 * L.mmce_penalty(logits, y)
    )
    torch.testing.assert_close(
        L.calibration_penalty("mdca", logits, y, weight=0.5), 0.5 * L.mdca_penalty(logits, y)
    )
    big = t([[0.0, 12.0, 25.0], [1.0, 2.0, 3.0]])
    torch.testing.assert_close(
        L.calibration_penalty("mbls", big, lab([0, 1]), margin=5.0),
        0.1 * L.mbls_penalty(big, margin=5.0),
    )
    torch.testing.assert_close(
        L.calibration_penalty("mmce", logits, y, mmce_width=0.1),
        2.0 * L.mmce_penalty(logits, y, width=0.1),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_calibration_penalty_none_is_harmless_zero(dtype):
    logits = t(EX_LOGITS, dtype, grad=True)
    z = L.calibration_penalty("none", logits, lab(EX_LABELS))
    assert (
        z.ndim == 0 and float(z.detach()) == 0.0 and z.device == logits.device and z.dtype == dtype
    )
    (L.cross_entropy(logits, lab(EX_LABELS)) + z).backward()  # adds nothing to the graph's value
    g_with = logits.grad.clone()
    logits.grad = None
    L.cross_entropy(logits, lab(EX_LABELS)).backward()
    assert torch.equal(g_with, logits.grad)
    # backward on the zero alone works and gives a zero gradient
    logits.grad = None
    L.calibration_penalty("none", logits, lab(EX_LABELS)).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_calibration_penalty_unknown_name():
    with pytest.raises(ValueError, match="none, mbls, dca, mdca, mmce"):
        L.calibration_penalty("ece", t(EX_LOGITS), lab(EX_LABELS))


def test_classification_loss_dispatch():
    logits, y = t(EX_LOGITS), lab(EX_LABELS)
    torch.testing.assert_close(L.classification_loss("ce", logits, y), L.cross_entropy(logits, y))
    torch.testing.assert_close(
        L.classification_loss("ce", logits, y, label_smoothing=0.1),
        L.cross_entropy(logits, y, label_smoothing=0.1),
    )
    torch.testing.assert_close(
        L.classification_loss("focal", logits, y), L.focal_loss(logits, y, gamma=3.0)
    )
    torch.testing.assert_close(
        L.classification_loss("focal", logits, y, focal_gamma=1.0),
        L.focal_loss(logits, y, gamma=1.0),
    )
    torch.testing.assert_close(
        L.classification_loss("flsd53", logits, y), L.focal_loss(logits, y, gamma="flsd53")
    )
    for name in ("focal", "flsd53"):
        with pytest.raises(ValueError, match="choose"):
            L.classification_loss(name, logits, y, label_smoothing=0.1)
    with pytest.raises(ValueError, match="ce, focal, flsd53"):
        L.classification_loss("nll", logits, y)


# --------------------------------------------------------------------------- extreme logits


_LOGIT_FNS = {
    "ce": lambda x, y: L.cross_entropy(x, y),
    "ce_ls": lambda x, y: L.cross_entropy(x, y, label_smoothing=0.1),
    "focal": lambda x, y: L.focal_loss(x, y),
    "flsd53": lambda x, y: L.focal_loss(x, y, gamma="flsd53"),
    "mbls": lambda x, y: L.mbls_penalty(x),
    "dca": L.dca_penalty,
    "mdca": L.mdca_penalty,
    "mmce": L.mmce_penalty,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(_LOGIT_FNS))
def test_extreme_logits_finite(name, dtype):
    logits = t([[1e4, -1e4, 0.0], [0.0, 0.0, 1e4], [-1e4, 1e4, 1e4]], dtype)
    y = lab([0, 1, 2])
    fn = _LOGIT_FNS[name]
    assert torch.isfinite(fn(logits, y))
    grad_of(lambda x: fn(x, y), logits)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=6, max_size=6),
    st.lists(st.integers(0, 2), min_size=2, max_size=2),
    st.floats(0.0, 5.0),
)
def test_property_focal_below_ce_and_penalties_bounded(vals, ys, gamma):
    logits, y = t([vals[:3], vals[3:]]), lab(ys)
    ce = float(L.cross_entropy(logits, y))
    assert float(L.focal_loss(logits, y, gamma=gamma)) <= ce + 1e-12
    assert 0.0 <= float(L.mdca_penalty(logits, y)) <= 1.0
    assert 0.0 <= float(L.dca_penalty(logits, y)) <= 1.0
    assert 0.0 <= float(L.mmce_penalty(logits, y)) <= 1.0


# --------------------------------------------------------------------------- CLIP contrastive


def _normed(n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_contrastive_matches_open_clip(dtype):
    from open_clip.loss import ClipLoss

    img, txt = _normed(6, 8, 0, dtype), _normed(6, 8, 1, dtype)
    scale = torch.tensor(1 / 0.07, dtype=dtype)
    ours = L.clip_contrastive_loss(img, txt, scale)
    ref = ClipLoss()(img, txt, scale)
    assert abs(float(ours) - float(ref)) < 1e-6
    lpi, lpt = L.clip_logits(img, txt, scale)
    torch.testing.assert_close(lpi, scale * img @ txt.T)
    torch.testing.assert_close(lpt, lpi.T)


def test_clip_contrastive_hand_value_and_smoothing():
    # I = T = identity (B = 2): both logit matrices are s * I2
    s, eps = 3.0, 0.1
    eye = torch.eye(2, dtype=torch.float64)
    lse = LN(1 + math.exp(-s))  # -log p_true
    close(L.clip_contrastive_loss(eye, eye, s), lse)
    lp_true, lp_other = -lse, -s - lse
    smoothed = (1 - eps) * (-lp_true) + eps * (-(lp_true + lp_other) / 2)
    close(L.clip_contrastive_loss(eye, eye, s, label_smoothing=eps), smoothed)


def test_clip_contrastive_gradient_reaches_features_and_scale():
    img = _normed(4, 5, 2, torch.float64).requires_grad_(True)
    txt = _normed(4, 5, 3, torch.float64).requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    L.clip_contrastive_loss(img, txt, log_scale.exp(), label_smoothing=0.1).backward()
    for x in (img, txt, log_scale):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- CaRot


def _kl(q, p):
    return sum(a * LN(a / b) for a, b in zip(q, p, strict=True))


def test_self_distillation_hand_value():
    # i2t: teacher uniform, student rows [3/4, 1/4] and uniform
    # t2i: teacher rows [4/5, 1/5], [1/5, 4/5], student uniform
    s_i2t = t([[LN(3.0), 0.0], [0.0, 0.0]])
    t_i2t = t([[0.0, 0.0], [0.0, 0.0]])
    s_t2i = t([[0.0, 0.0], [0.0, 0.0]])
    t_t2i = t([[LN(4.0), 0.0], [0.0, LN(4.0)]])
    kl_i2t = (_kl([0.5, 0.5], [0.75, 0.25]) + 0.0) / 2
    kl_t2i = (_kl([0.8, 0.2], [0.5, 0.5]) + _kl([0.2, 0.8], [0.5, 0.5])) / 2
    close(L.self_distillation_loss(s_i2t, s_t2i, t_i2t, t_t2i), kl_i2t + kl_t2i)


def test_self_distillation_zero_when_equal_positive_otherwise_student_only_grad():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    s_i2t, s_t2i = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    t_i2t, t_t2i = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    assert abs(L.self_distillation_loss(s_i2t, s_t2i, t_i2t, t_t2i).item()) < 1e-6
    loss = L.self_distillation_loss(s_i2t * 2.0, s_t2i, t_i2t, t_t2i)
    assert loss.detach() > 0
    loss.backward()
    assert s_i2t.grad is not None and s_i2t.grad.abs().sum() > 0
    assert t_i2t.grad is None and t_t2i.grad is None


def test_self_distillation_gradient_equals_soft_cross_entropy():
    g = torch.Generator().manual_seed(5)
    st_, tt = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    s1 = st_.clone().requires_grad_(True)
    L.self_distillation_loss(s1, s1.T, tt, tt.T).backward()
    s2 = st_.clone().requires_grad_(True)
    soft_ce = sum(
        -(torch.softmax(te, -1) * torch.log_softmax(sv, -1)).sum() / 4
        for sv, te in ((s2, tt), (s2.T, tt.T))
    )
    soft_ce.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_orthogonality_zero_for_orthonormal_columns():
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))
    w = q.clone().requires_grad_(True)
    loss = L.orthogonality_loss(w)
    assert loss.item() < 1e-12
    loss.backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonality_hand_value(dtype):
    # W = [[1, 1], [0, 1]]: W^T W - I = [[0, 1], [1, 1]] -> ||.||_F = sqrt(3) (not squared)
    w = t([[1.0, 1.0], [0.0, 1.0]], dtype, grad=True)
    loss = L.orthogonality_loss(w)
    close(loss, math.sqrt(3.0))
    loss.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    # non-square (width=3, embed_dim=1): W^T W - I = [9 + 16 + 0 - 1] -> 24
    close(L.orthogonality_loss(t([[3.0], [4.0], [0.0]], dtype)), 24.0)


def test_carot_momentum_schedule():
    # total 100, ramp 20% -> ramp length 20 steps
    assert L.carot_momentum(0, 100) == pytest.approx(0.05)
    assert L.carot_momentum(10, 100) == pytest.approx(0.05 + 0.85 / 2)
    assert L.carot_momentum(20, 100) == pytest.approx(0.9)
    assert L.carot_momentum(99, 100) == pytest.approx(0.9)
    assert L.carot_momentum(5, 0) == pytest.approx(0.9)
    assert L.carot_momentum(5, 100, ramp_fraction=0.0) == pytest.approx(0.9)
    assert L.carot_momentum(1, 10, start=0.0, end=1.0, ramp_fraction=0.5) == pytest.approx(0.2)
    sched = L.CaRotSchedule()
    assert sched.momentum(10, 100) == L.carot_momentum(10, 100)
    assert (
        (sched.sd_weight, sched.oc_weight) == (L.CAROT_SD_WEIGHT, L.CAROT_OC_WEIGHT) == (0.75, 0.2)
    )


def test_ema_update_values_in_place_and_no_grad():
    a, b = t([1.0, 2.0]), t([[5.0]])
    teacher = {"a": a, "b": b}
    student = {"a": t([3.0, 4.0], grad=True), "b": t([[1.0]], grad=True)}
    L.ema_update_(teacher, student, 0.25)
    assert teacher["a"] is a and teacher["b"] is b
    # 0.25 * t + 0.75 * s
    torch.testing.assert_close(a, t([2.5, 3.5]))
    torch.testing.assert_close(b, t([[2.0]]))
    assert not a.requires_grad
    L.ema_update_(teacher, student, 1.0)  # momentum 1 keeps the teacher
    torch.testing.assert_close(a, t([2.5, 3.5]))


def test_ema_update_key_mismatch():
    with pytest.raises(KeyError, match="extra"):
        L.ema_update_({"a": t([1.0])}, {"a": t([1.0]), "extra": t([1.0])}, 0.5)
    with pytest.raises(KeyError, match="only_teacher"):
        L.ema_update_({"a": t([1.0]), "only_teacher": t([1.0])}, {"a": t([1.0])}, 0.5)


# --------------------------------------------------------------------------- FedProx / FedDyn


def test_proximal_term_hand_value_and_gradient():
    w, b = t([1.0, 2.0], grad=True), t([3.0], grad=True)
    gw, gb = t([0.0, 0.0], grad=True), t([1.0], grad=True)
    loss = L.proximal_term({"w": w, "b": b}, {"w": gw, "b": gb}, mu=0.5)
    close(loss, 0.5 / 2 * (1 + 4 + 4))
    loss.backward()
    torch.testing.assert_close(w.grad, 0.5 * t([1.0, 2.0]))  # mu * (w - w_global)
    assert gw.grad is None and gb.grad is None


def test_proximal_term_zero_cases():
    p = {"w": t([1.0, 2.0])}
    assert float(L.proximal_term(p, {"w": t([1.0, 2.0])}, mu=0.3)) == 0.0
    # mu == 0: exact zero without computing (an inf would otherwise show up)
    z = L.proximal_term({"w": t([math.inf])}, {}, mu=0.0)
    assert z.ndim == 0 and float(z) == 0.0 and z.dtype == torch.float64
    with pytest.raises(KeyError, match="w"):
        L.proximal_term(p, {}, mu=0.1)


def test_feddyn_terms_hand_value_and_gradient():
    w = t([1.0, 2.0], grad=True)
    wg, g = t([0.0, 1.0]), t([0.5, -1.0])
    alpha = 0.1
    loss = L.feddyn_terms({"w": w}, {"w": wg}, {"w": g}, alpha)
    # -<g, w> = -(0.5 - 2) = 1.5 ; alpha/2 * ||w - wg||^2 = 0.05 * 2 = 0.1
    close(loss, 1.6)
    loss.backward()
    torch.testing.assert_close(w.grad, t([-0.5 + 0.1, 1.0 + 0.1]))  # -g + alpha (w - wg)


def test_feddyn_update_grad_state():
    w = t([1.0, 2.0], grad=True)
    wg, g = t([0.0, 1.0]), t([0.5, -1.0])
    new = L.feddyn_update_grad_state({"w": g}, {"w": w}, {"w": wg}, 0.1)
    torch.testing.assert_close(new["w"], t([0.5 - 0.1, -1.0 - 0.1]))
    assert not new["w"].requires_grad and new["w"] is not g
    torch.testing.assert_close(g, t([0.5, -1.0]))  # input untouched
    # zero initial state and w == w_global -> state stays zero, terms are zero
    z = {"w": torch.zeros(2, dtype=torch.float64)}
    assert float(L.feddyn_terms({"w": wg}, {"w": wg}, z, 0.1)) == 0.0


def test_cross_projection_is_the_frobenius_norm_of_the_product():
    g = torch.Generator().manual_seed(0)
    wv, wt = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    expected = math.sqrt(sum(float(wv[i] @ wt[j]) ** 2 for i in range(6) for j in range(5)))
    close(L.cross_projection_loss(wv, wt), expected, 1e-12)
    with pytest.raises(ValueError, match="embedding size"):
        L.cross_projection_loss(wv, torch.randn(5, 3, dtype=torch.float64))
