"""Pure, composable training losses for calibrated federated fine-tuning of CLIP.

Every function takes plain tensors (and explicit keyword arguments carrying the
published defaults); nothing here reads a configuration object.  Conventions:

* ``logits`` have shape ``(B, K)`` and ``labels`` shape ``(B,)`` (int64);
* unless a docstring says otherwise a per-sample quantity is reduced by the
  batch mean;
* probabilities are always obtained through ``log_softmax``/``softmax`` so that
  extreme logits (e.g. ``1e4``) give finite values and gradients;
* functions are dtype- (float32/float64) and device-agnostic: new tensors are
  created with the dtype/device of the inputs.

Contents
--------
Classification losses
    :func:`cross_entropy`, :func:`focal_loss`, :func:`flsd53_gamma`,
    :func:`classification_loss` (dispatch by name).
Train-time calibration penalties (added to the classification loss)
    :func:`mbls_penalty`, :func:`dca_penalty`, :func:`mdca_penalty`,
    :func:`mmce_penalty`, :func:`calibration_penalty` (dispatch by name, applies
    the default weights).
CLIP fine-tuning (FLYP / CaRot)
    :func:`clip_logits`, :func:`clip_contrastive_loss`,
    :func:`self_distillation_loss`, :func:`orthogonality_loss`,
    :func:`carot_momentum`, :func:`ema_update_`, :class:`CaRotSchedule`,
    :data:`CAROT_SD_WEIGHT`, :data:`CAROT_OC_WEIGHT`.
Federated client regularisers
    :func:`proximal_term` (FedProx), :func:`feddyn_terms` and
    :func:`feddyn_update_grad_state` (FedDyn).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from common import names

if TYPE_CHECKING:  # pragma: no cover
    from open_clip.loss import ClipLoss

__all__ = [
    "CALIBRATION_PENALTIES",
    "CLASSIFICATION_LOSSES",
    "CAROT_OC_WEIGHT",
    "CAROT_SD_WEIGHT",
    "DEFAULT_PENALTY_WEIGHTS",
    "MMCE_EPS",
    "CaRotSchedule",
    "calibration_penalty",
    "carot_momentum",
    "classification_loss",
    "clip_contrastive_loss",
    "clip_logits",
    "cross_projection_loss",
    "cross_entropy",
    "dca_penalty",
    "ema_update_",
    "feddyn_terms",
    "feddyn_update_grad_state",
    "flsd53_gamma",
    "focal_loss",
    "mbls_penalty",
    "mdca_penalty",
    "mmce_penalty",
    "orthogonality_loss",
    "proximal_term",
    "self_distillation_loss",
]

#: CaRot (Oh et al., NeurIPS 2024) default weight of the self-distillation term.
CAROT_SD_WEIGHT = 0.75
#: CaRot default weight of the orthogonality constraint on the visual projection.
CAROT_OC_WEIGHT = 0.2

#: Names accepted by :func:`classification_loss` (declared once, in common/names.py).
CLASSIFICATION_LOSSES = names.CLASSIFICATION_LOSSES
#: Names accepted by :func:`calibration_penalty` (declared once, in common/names.py).
CALIBRATION_PENALTIES = names.PENALTIES
#: Default weights (lambda) of the calibration penalties, from their papers.
DEFAULT_PENALTY_WEIGHTS: dict[str, float] = {"mbls": 0.1, "dca": 1.0, "mdca": 1.0, "mmce": 2.0}
#: Epsilon added under the square root of MMCE^2 (as in Kumar et al.'s code).
MMCE_EPS = 1e-10


# --------------------------------------------------------------------------- helpers


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, K), got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def _check_logits(logits: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, K), got {tuple(logits.shape)}")


def _confidence_and_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Max-softmax confidence (differentiable) and 0/1 correctness (no gradient)."""
    probs = torch.softmax(logits, dim=-1)
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).to(logits.dtype)
    return conf, correct


def _zero_like_graph(ref: Tensor) -> Tensor:
    """An exact scalar 0 that is connected to ``ref``'s graph with zero gradient.

    The sum over an empty slice is exactly 0 (also when ``ref`` holds inf/nan),
    it lives on ``ref``'s device/dtype, and ``backward()`` through it yields a
    zero gradient instead of an error.
    """
    return ref.reshape(-1)[:0].sum()


# --------------------------------------------------------------------------- classification


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    r"""Cross-entropy with optional label smoothing (PyTorch convention).

    .. math::
        \mathcal{L} = \frac1B\sum_i \Big[(1-\varepsilon)\,(-\log p_{i,y_i})
            + \varepsilon\,\frac1K\sum_{k=1}^K(-\log p_{ik})\Big],
        \qquad p_i = \mathrm{softmax}(l_i).

    This is the convention of ``torch.nn.functional.cross_entropy(...,
    label_smoothing=eps)`` (Szegedy et al., CVPR 2016, "Rethinking the
    Inception architecture"): the smoothed target puts ``1 - eps + eps/K`` on the
    true class and ``eps/K`` on every other class, i.e. the mass ``eps`` is
    spread uniformly over *all* ``K`` classes, **including** the true one (not
    ``eps/(K-1)`` over the wrong classes only).  ``label_smoothing=0`` is plain CE.
    """
    _check_logits_labels(logits, labels)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        return nll.mean()
    smooth = -logp.mean(dim=-1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()


def flsd53_gamma(p_y: Tensor) -> Tensor:
    r"""Sample-dependent focal gamma of FLSD-53 (Mukhoti et al., NeurIPS 2020).

    .. math:: \gamma_i = 5 \text{ if } p_{i,y_i} < 0.2 \text{ else } 3.

    ``p_y`` is detached (gamma is a schedule, not a function to differentiate).
    This matches the official ``FocalLossAdaptive(gamma=3)`` of
    "Calibrating Deep Neural Networks using Focal Loss" (gamma_dic
    ``{0.2: 5, 0.5: 3}`` and gamma 3 for ``p >= 0.5``).  Returns a tensor of
    ``p_y``'s shape, dtype and device.
    """
    p = p_y.detach()
    five = torch.full_like(p, 5.0)
    three = torch.full_like(p, 3.0)
    return torch.where(p < 0.2, five, three)


def focal_loss(logits: Tensor, labels: Tensor, gamma: float | str = 3.0) -> Tensor:
    r"""Focal loss (Lin et al., ICCV 2017), batch mean.

    .. math::
        \mathcal{L} = \frac1B\sum_i -(1-p_{i,y_i})^{\gamma_i}\,\log p_{i,y_i}.

    ``gamma`` is a float >= 0 (Mukhoti et al., NeurIPS 2020 recommend 3 for
    calibration; ``gamma=0`` is plain CE) or the string ``"flsd53"`` for the
    sample-dependent schedule of :func:`flsd53_gamma` (gamma 5 where
    ``p_y < 0.2``, else 3, with ``p_y`` detached).  ``1 - p_y`` is evaluated as
    ``-expm1(log p_y)`` for accuracy when ``p_y`` is close to 1.
    """
    _check_logits_labels(logits, labels)
    logp_y = F.log_softmax(logits, dim=-1).gather(1, labels.long().unsqueeze(1)).squeeze(1)
    one_minus_p = -torch.expm1(logp_y)
    if isinstance(gamma, str):
        if gamma != "flsd53":
            raise ValueError(f"gamma must be a float or 'flsd53', got {gamma!r}")
        g = flsd53_gamma(logp_y.exp())
        weight = one_minus_p.pow(g)
    else:
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if gamma == 0:
            return (-logp_y).mean()
        weight = one_minus_p.pow(float(gamma))
    return (-weight * logp_y).mean()


def classification_loss(
    name: str,
    logits: Tensor,
    labels: Tensor,
    *,
    label_smoothing: float = 0.0,
    focal_gamma: float = 3.0,
) -> Tensor:
    """Dispatch the classification loss by name.

    * ``"ce"``: :func:`cross_entropy` with ``label_smoothing``;
    * ``"focal"``: :func:`focal_loss` with ``gamma=focal_gamma`` (default 3);
    * ``"flsd53"``: :func:`focal_loss` with ``gamma="flsd53"``.

    ``label_smoothing`` applies to ``"ce"`` only; a value > 0 together with a
    focal loss raises ``ValueError`` (choose one of the two).
    """
    if name not in CLASSIFICATION_LOSSES:
        raise ValueError(
            f"unknown classification loss {name!r}; valid names: {', '.join(CLASSIFICATION_LOSSES)}"
        )
    if name == "ce":
        return cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if label_smoothing > 0:
        raise ValueError(
            f"label_smoothing={label_smoothing} is only supported with the 'ce' loss, not {name!r}; "
            "choose either label smoothing or a focal loss"
        )
    if name == "focal":
        return focal_loss(logits, labels, gamma=focal_gamma)
    return focal_loss(logits, labels, gamma="flsd53")


# --------------------------------------------------------------------------- calibration penalties


def mbls_penalty(logits: Tensor, margin: float = 10.0) -> Tensor:
    r"""Margin penalty of Margin-based Label Smoothing (Liu et al., CVPR 2022).

    With :math:`d_{ij} = \max_k l_{ik} - l_{ij}` (all ``d >= 0``):

    .. math::
        \mathcal{P} = \frac{1}{BK}\sum_{i=1}^B\sum_{j=1}^K \mathrm{ReLU}(d_{ij} - m),
        \qquad m = 10.

    The mean is over **all** ``B*K`` elements, exactly as the official code
    (``by-liu/MbLS``, ``LogitMarginL1``: ``F.relu(diff - margin).mean()``) does;
    the paper writes a per-sample sum over classes, which differs by the
    constant factor ``K``.  The full MbLS loss is ``CE + lambda * P`` with
    ``lambda = 0.1`` (applied by :func:`calibration_penalty` / the caller).
    """
    _check_logits(logits)
    diff = logits.max(dim=-1, keepdim=True).values - logits
    return F.relu(diff - margin).mean()


def dca_penalty(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Difference between Confidence and Accuracy (Liang et al., 2020).

    .. math::
        \mathrm{DCA} = \Big|\frac1B\sum_i \max_k p_{ik}
            - \frac1B\sum_i \mathbb 1[\arg\max_k p_{ik} = y_i]\Big|.

    "Improved Trainable Calibration Method for Neural Networks on Medical
    Imaging Classification" (BMVC 2020).  The accuracy term is a constant
    (no gradient); the gradient flows through the mean confidence.  Default
    weight 1 (see :func:`calibration_penalty`).
    """
    _check_logits_labels(logits, labels)
    conf, correct = _confidence_and_correct(logits, labels)
    return (conf.mean() - correct.mean()).abs()


def mdca_penalty(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Multi-class Difference in Confidence and Accuracy (Hebbalaguppe et al., CVPR 2022).

    .. math::
        \mathrm{MDCA} = \frac1K\sum_{k=1}^K\Big|\frac1B\sum_i p_{ik}
            - \frac1B\sum_i \mathbb 1[y_i = k]\Big|.

    "A Stitch in Time Saves Nine: A Train-Time Regularizing Loss for Improved
    Neural Network Calibration".  Default weight 1 (see
    :func:`calibration_penalty`).
    """
    _check_logits_labels(logits, labels)
    num_classes = logits.shape[1]
    probs = torch.softmax(logits, dim=-1)
    freq = F.one_hot(labels.long(), num_classes).to(logits.dtype).mean(dim=0)
    return (probs.mean(dim=0) - freq).abs().mean()


def mmce_penalty(logits: Tensor, labels: Tensor, width: float = 0.4, form: str = "paper") -> Tensor:
    r"""Maximum Mean Calibration Error, unweighted (Kumar et al., ICML 2018).

    With confidences :math:`c_i = \max_k p_{ik}`, correctness
    :math:`r_i = \mathbb 1[\arg\max_k p_{ik} = y_i]` and the Laplacian kernel
    :math:`k(c, c') = \exp(-|c - c'|/w)`, :math:`w = 0.4`:

    .. math::
        \mathrm{MMCE}^2 = \frac{1}{B^2}\sum_{i,j}(r_i - c_i)(r_j - c_j)\,k(c_i, c_j),
        \qquad \mathcal P = \sqrt{\mathrm{MMCE}^2 + 10^{-10}}.

    "Trainable Calibration Measures for Neural Networks from Kernel Mean
    Embeddings".  The ``1e-10`` (:data:`MMCE_EPS`) keeps the square root
    differentiable at 0; ``MMCE^2`` (a PSD quadratic form) is clamped at 0
    first so that round-off cannot produce a nan.  ``r`` carries no gradient.
    Default weight 2 (see :func:`calibration_penalty`).

    ``form="reference"`` returns :math:`\mathrm{MMCE}^2` itself, as the widely used reference
    implementation (e.g. the focal-calibration code of Mukhoti et al.) does; a weight tuned
    for one form does not carry over to the other.
    """
    _check_logits_labels(logits, labels)
    if form not in names.MMCE_FORMS:
        raise ValueError(f"unknown MMCE form {form!r}; valid: {', '.join(names.MMCE_FORMS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    conf, correct = _confidence_and_correct(logits, labels)
    resid = correct - conf
    kernel = torch.exp(-(conf.unsqueeze(1) - conf.unsqueeze(0)).abs() / width)
    batch = logits.shape[0]
    mmce2 = (resid.unsqueeze(1) * resid.unsqueeze(0) * kernel).sum() / (batch * batch)
    if form == "reference":
        return mmce2
    return torch.sqrt(mmce2.clamp_min(0.0) + MMCE_EPS)


def calibration_penalty(
    name: str,
    logits: Tensor,
    labels: Tensor,
    *,
    weight: float | None = None,
    margin: float = 10.0,
    mmce_width: float = 0.4,
    mmce_form: str = "paper",
) -> Tensor:
    """Weighted train-time calibration penalty, ``weight * penalty``.

    ``name`` is one of ``"none"``, ``"mbls"`` (:func:`mbls_penalty`, ``margin``),
    ``"dca"`` (:func:`dca_penalty`), ``"mdca"`` (:func:`mdca_penalty`) or
    ``"mmce"`` (:func:`mmce_penalty`, ``mmce_width``).  With ``weight=None`` the
    paper defaults of :data:`DEFAULT_PENALTY_WEIGHTS` are used (MbLS 0.1,
    DCA 1, MDCA 1, MMCE 2).  ``"none"`` returns an exact scalar zero on the
    logits' device/dtype that is attached to the logits' graph with zero
    gradient (so adding it to a loss, or calling ``backward`` on it, is
    harmless).  Unknown names raise ``ValueError`` listing the valid names.
    """
    if name not in CALIBRATION_PENALTIES:
        raise ValueError(
            f"unknown calibration penalty {name!r}; valid names: {', '.join(CALIBRATION_PENALTIES)}"
        )
    if name == "none":
        _check_logits(logits)
        return _zero_like_graph(logits)
    w = DEFAULT_PENALTY_WEIGHTS[name] if weight is None else float(weight)
    if name == "mbls":
        penalty = mbls_penalty(logits, margin=margin)
    elif name == "dca":
        penalty = dca_penalty(logits, labels)
    elif name == "mdca":
        penalty = mdca_penalty(logits, labels)
    else:
        penalty = mmce_penalty(logits, labels, width=mmce_width, form=mmce_form)
    return w * penalty


# --------------------------------------------------------------------------- CLIP (FLYP / CaRot)


@functools.lru_cache(maxsize=1)
def _clip_loss() -> ClipLoss:
    # Imported lazily: open_clip is heavy and only the CLIP losses need it.
    from open_clip.loss import ClipLoss

    return ClipLoss()


def clip_logits(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float
) -> tuple[Tensor, Tensor]:
    """In-batch CLIP logits ``(logits_per_image, logits_per_text)``.

    ``logits_per_image = s * I @ T.T`` and ``logits_per_text = s * T @ I.T``
    for L2-normalised ``(B, d)`` features and the (already exponentiated)
    ``logit_scale`` ``s``, as returned by open_clip models' ``forward``.  Built
    by open_clip's own ``ClipLoss().get_logits`` (single process).
    """
    if image_features.ndim != 2 or text_features.shape != image_features.shape:
        raise ValueError(
            "image_features and text_features must both have shape (B, d), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    return _clip_loss().get_logits(image_features, text_features, logit_scale)


def clip_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Symmetric CLIP contrastive loss over (image, class-prompt) pairs (FLYP).

    .. math::
        \mathcal L = \tfrac12\big[\mathrm{CE}_\varepsilon(s\,I T^\top, \mathrm{arange}(B))
            + \mathrm{CE}_\varepsilon(s\,T I^\top, \mathrm{arange}(B))\big].

    "Finetune like you pretrain" (Goyal et al., CVPR 2023) fine-tunes with the
    CLIP pre-training loss (Radford et al., 2021) on pairs of images and their
    class prompts.  ``label_smoothing`` (:func:`cross_entropy` convention) is
    passed to both terms, the option used by CaRot (Oh et al., NeurIPS 2024).
    With ``label_smoothing=0`` this equals ``open_clip.loss.ClipLoss()``.
    """
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (
        cross_entropy(logits_per_image, targets, label_smoothing=label_smoothing)
        + cross_entropy(logits_per_text, targets, label_smoothing=label_smoothing)
    ) / 2


def self_distillation_loss(
    student_i2t: Tensor, student_t2i: Tensor, teacher_i2t: Tensor, teacher_t2i: Tensor
) -> Tensor:
    r"""CaRot self-distillation loss (Oh et al., NeurIPS 2024).

    With row-wise in-batch softmaxes :math:`q = \mathrm{softmax}(\cdot)`:

    .. math::
        \mathcal L_{SD} = \mathrm{KL}(q^{T}_{i2t}\,\|\,q^{S}_{i2t})
            + \mathrm{KL}(q^{T}_{t2i}\,\|\,q^{S}_{t2i}),\qquad
        \mathrm{KL}(q\|p) = \frac1B\sum_i\sum_j q_{ij}(\log q_{ij} - \log p_{ij}).

    "Towards Calibrated Robust Fine-Tuning of Vision-Language Models" (CaRot).
    Each KL is averaged over rows ("batchmean"); the two directions are
    **summed** (no 1/2).  Teacher logits are detached, so gradients reach the
    student only.  The caller multiplies by lambda_SD (:data:`CAROT_SD_WEIGHT`,
    0.75).  The official code uses the soft cross-entropy
    :math:`-\frac1B\sum_{ij} q^T_{ij}\log q^S_{ij}`, which differs from the KL by
    the teacher's entropy, a constant with respect to the student: the
    gradients are identical, only the reported value differs.
    """
    pairs = ((student_i2t, teacher_i2t), (student_t2i, teacher_t2i))
    total = None
    for student, teacher in pairs:
        if student.shape != teacher.shape or student.ndim != 2:
            raise ValueError(
                f"student/teacher logits must be matching 2-D tensors, got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        kl = F.kl_div(
            F.log_softmax(student, dim=-1),
            F.log_softmax(teacher.detach(), dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        total = kl if total is None else total + kl
    return total


def orthogonality_loss(W: Tensor) -> Tensor:
    r"""CaRot orthogonality constraint :math:`\|W^\top W - I\|_F` (NOT squared).

    ``W`` has shape ``(width, embed_dim)`` like open_clip's ``visual.proj``;
    ``I`` is the ``embed_dim x embed_dim`` identity, so the loss is zero iff the
    columns of ``W`` are orthonormal (Oh et al., NeurIPS 2024).  The caller
    multiplies by lambda_OC (:data:`CAROT_OC_WEIGHT`, 0.2).  The gradient at an
    exactly orthonormal ``W`` is 0 (PyTorch's norm backward), not nan.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (width, embed_dim), got {tuple(W.shape)}")
    eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    return torch.linalg.matrix_norm(W.T @ W - eye, ord="fro")


def cross_projection_loss(visual_proj: Tensor, text_proj: Tensor) -> Tensor:
    r"""CaRot's official extra term :math:`\|W_v W_t^\top\|_F` (``--cross_fnorm``, weight 0.05).

    ``visual_proj`` is open_clip's ``visual.proj`` (width_v, embed) and ``text_proj`` its
    ``text_projection`` (width_t, embed); the product is (width_v, width_t). The official code
    calls it a "d-rank SVD approximation"; the paper does not list it, so fedcal applies it only
    where a preset asks (``loss.carot.cross_weight``).
    """
    if visual_proj.ndim != 2 or text_proj.ndim != 2 or visual_proj.shape[1] != text_proj.shape[1]:
        raise ValueError(f"projections must be 2-D with the same embedding size, got {tuple(visual_proj.shape)} and {tuple(text_proj.shape)}")
    return torch.linalg.matrix_norm(visual_proj @ text_proj.T, ord="fro")


def carot_momentum(
    step: int,
    total_steps: int,
    start: float = 0.05,
    end: float = 0.9,
    ramp_fraction: float = 0.2,
) -> float:
    r"""EMA-teacher momentum schedule of CaRot.

    With ramp length :math:`R = \text{ramp\_fraction}\cdot\text{total\_steps}`
    (a float, not rounded) and ``step`` counted from 0:

    .. math::
        m(t) = \text{start} + (\text{end} - \text{start})\,\min(\max(t, 0)/R,\ 1),

    i.e. ``start`` at step 0, linear up to ``end`` at step ``R``, then constant
    ``end``.  If ``total_steps <= 0`` or ``R <= 0`` the result is ``end``.
    Used with :func:`ema_update_` (``teacher <- m*teacher + (1-m)*student``).
    """
    ramp = float(ramp_fraction) * float(total_steps)
    if total_steps <= 0 or ramp <= 0:
        return float(end)
    progress = min(max(float(step), 0.0) / ramp, 1.0)
    return float(start) + (float(end) - float(start)) * progress


@torch.no_grad()
def ema_update_(
    teacher: Mapping[str, Tensor], student: Mapping[str, Tensor], momentum: float
) -> None:
    r"""In-place EMA update of the teacher: :math:`t \leftarrow m\,t + (1-m)\,s`.

    Runs under ``torch.no_grad``.  ``teacher`` and ``student`` (e.g. state
    dicts) must have exactly the same keys (``KeyError`` naming the first
    offending key otherwise) and matching shapes (``ValueError``).  Student
    values are cast to the teacher tensor's dtype/device; non-floating tensors
    (e.g. integer buffers) are copied from the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    for key in teacher:
        if key not in student:
            raise KeyError(f"key {key!r} is in the teacher but not in the student")
    for key in student:
        if key not in teacher:
            raise KeyError(f"key {key!r} is in the student but not in the teacher")
    for key, t in teacher.items():
        s = student[key]
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch for {key!r}: {tuple(t.shape)} vs {tuple(s.shape)}")
        s = s.detach().to(device=t.device, dtype=t.dtype)
        if t.is_floating_point() or t.is_complex():
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)
        else:
            t.copy_(s)


@dataclass(frozen=True)
class CaRotSchedule:
    """CaRot hyper-parameters bundled: EMA momentum ramp and loss weights.

    ``momentum(step, total_steps)`` is :func:`carot_momentum` with this
    object's ``start``/``end``/``ramp_fraction``; ``sd_weight`` and
    ``oc_weight`` default to :data:`CAROT_SD_WEIGHT` and :data:`CAROT_OC_WEIGHT`.
    """

    start: float = 0.05
    end: float = 0.9
    ramp_fraction: float = 0.2
    sd_weight: float = CAROT_SD_WEIGHT
    oc_weight: float = CAROT_OC_WEIGHT

    def momentum(self, step: int, total_steps: int) -> float:
        return carot_momentum(
            step, total_steps, start=self.start, end=self.end, ramp_fraction=self.ramp_fraction
        )


# --------------------------------------------------------------------------- federated regularisers


def _check_keys(params: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str) -> None:
    for key, w in params.items():
        if key not in other:
            raise KeyError(f"key {key!r} of params is missing from {what}")
        if other[key].shape != w.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: params {tuple(w.shape)} vs {what} {tuple(other[key].shape)}"
            )


def _scalar_zero(params: Mapping[str, Tensor]) -> Tensor:
    for w in params.values():
        return w.new_zeros(())
    return torch.zeros(())


def proximal_term(
    params: Mapping[str, Tensor], global_params: Mapping[str, Tensor], mu: float
) -> Tensor:
    r"""FedProx proximal term (Li et al., MLSys 2020).

    .. math:: \frac{\mu}{2}\sum_{\text{tensors}} \|w - w^{\text{global}}\|_2^2

    "Federated Optimization in Heterogeneous Networks".  The global parameters
    are detached (constants).  Every key of ``params`` must be in
    ``global_params`` (extra global keys are ignored).  ``mu == 0`` returns an
    exact scalar zero (params' device/dtype) without computing anything.
    """
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if mu == 0:
        return _scalar_zero(params)
    _check_keys(params, global_params, "global_params")
    total = _scalar_zero(params)
    for key, w in params.items():
        g = global_params[key].detach().to(device=w.device, dtype=w.dtype)
        total = total + (w - g).pow(2).sum()
    return (mu / 2.0) * total


def feddyn_terms(
    params: Mapping[str, Tensor],
    global_params: Mapping[str, Tensor],
    grad_state: Mapping[str, Tensor],
    alpha: float,
) -> Tensor:
    r"""FedDyn client regulariser (Acar et al., ICLR 2021).

    .. math::
        -\langle g_k, w\rangle + \frac{\alpha}{2}\|w - w^{t-1}\|^2
        \quad(\text{summed over tensors}).

    "Federated Learning Based on Dynamic Regularization".  The full local
    objective of client ``k`` is
    :math:`L_k(w) - \langle g_k, w\rangle + \frac{\alpha}{2}\|w - w^{t-1}\|^2`
    where ``g_k`` (``grad_state``: the client's persisted dict, same keys and
    shapes as ``params``, zeros initially) estimates :math:`\nabla L_k` at the
    client's previous local optimum, and ``w^{t-1}`` (``global_params``) is the
    current server model.  ``grad_state`` and ``global_params`` are detached.
    After local training update the state with
    :func:`feddyn_update_grad_state`.
    """
    _check_keys(params, global_params, "global_params")
    _check_keys(params, grad_state, "grad_state")
    linear = _scalar_zero(params)
    quad = _scalar_zero(params)
    for key, w in params.items():
        g = grad_state[key].detach().to(device=w.device, dtype=w.dtype)
        wg = global_params[key].detach().to(device=w.device, dtype=w.dtype)
        linear = linear + (g * w).sum()
        quad = quad + (w - wg).pow(2).sum()
    return -linear + (alpha / 2.0) * quad


def feddyn_update_grad_state(
    grad_state: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    global_params: Mapping[str, Tensor],
    alpha: float,
) -> dict[str, Tensor]:
    r"""FedDyn client state update (Acar et al., ICLR 2021).

    .. math:: g_k \leftarrow g_k - \alpha\,(w_k^t - w^{t-1})

    This follows from the first-order condition of the local objective of
    :func:`feddyn_terms` at the local optimum :math:`w_k^t`:
    :math:`\nabla L_k(w_k^t) - g_k + \alpha(w_k^t - w^{t-1}) = 0`, so the new
    estimate of :math:`\nabla L_k(w_k^t)` is the right-hand side above.
    Returns a new dict of detached tensors (the inputs are not modified).
    """
    _check_keys(params, global_params, "global_params")
    _check_keys(params, grad_state, "grad_state")
    new_state: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, w in params.items():
            g = grad_state[key].detach()
            wg = global_params[key].detach().to(device=g.device, dtype=g.dtype)
            new_state[key] = g - alpha * (w.detach().to(device=g.device, dtype=g.dtype) - wg)
    return new_state
