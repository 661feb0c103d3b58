"""The local objective of one client round: named loss terms, their weights, and their state.

    loss = base-loss                                   (ce | focal | flsd53 | flyp | carot)
         + penalty                                     (none | mbls | dca | mdca | mmce, weighted)
         + regularizer                                 (the method's own term: KgCoOp's)
         + lambda_SD   * self-distillation             (CaRot: KL to the EMA teacher)
         + lambda_OC   * orthogonality                 (CaRot: ||W_v^T W_v - I||_F)
         + lambda_X    * cross                         (CaRot's official ||W_v W_t^T||_F)
         + client-term                                 (FedProx proximal | FedDyn linear + quadratic)

Each term is a pure function of ``client/losses.py``; this module only decides which terms a
configuration switches on, with which weight, and owns what persists between steps and rounds:
the CaRot EMA teacher (and its step count) and FedDyn's gradient state. They come in from and go
back to Flower's ``context.state`` through :class:`CarriedState`, so the objective's result does
not depend on which process computes it. Term names are declared once
(:data:`common.names.OBJECTIVE_TERMS`); each is reported as the train metric ``train-<name>``,
unweighted except ``penalty`` and ``regularizer`` (which carry their weight, as their functions
define it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from common.config import RunConfig
from common.model import templates_for
from common.names import CONTRASTIVE_LOSSES, OBJECTIVE_TERMS

from . import losses


@dataclass
class CarriedState:
    """Per-client state that persists across rounds (kept in Flower's context.state)."""

    teacher: dict[str, torch.Tensor] | None = None
    carot_step: int = 0
    feddyn_grad: dict[str, torch.Tensor] | None = None


@dataclass
class Pairs:
    """A contrastive batch: image features, the paired text features, the scale, caption choices."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    caption_ids: torch.Tensor | None = None


@dataclass
class StepLoss:
    """One step's objective: the total, every named term (unweighted, see module doc), the logits."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor


@contextmanager
def swapped_parameters(method, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Evaluate ``method`` with its trainable tensors temporarily replaced by ``state`` (the teacher)."""
    params = dict(method.trainable_named_parameters())
    saved = {k: p.data for k, p in params.items()}
    for k, p in params.items():
        p.data = state[k]
    method._text_cache = None
    try:
        yield
    finally:
        for k, p in params.items():
            p.data = saved[k]
        method._text_cache = None


def _trainable_parameter(module: Any, name: str) -> torch.nn.Parameter | None:
    p = getattr(module, name, None)
    return p if isinstance(p, torch.nn.Parameter) and p.requires_grad else None


class EmaTeacher:
    """CaRot's self-distillation teacher: an EMA of the trainable tensors, refreshed every
    ``teacher_every`` steps with a momentum ramped over all local steps of all rounds."""

    def __init__(self, method, cfg: RunConfig, device: torch.device, *, total_steps: int, state: dict[str, torch.Tensor] | None, step: int):
        self.method, self.carot, self.total_steps, self.step = method, cfg.loss.carot, total_steps, step
        state = state if state is not None else {k: v.detach().clone() for k, v in method.trainable_state().items()}
        self.state = {k: v.to(device) for k, v in state.items()}

    def distillation(self, inputs, x: torch.Tensor, y: torch.Tensor, student: Pairs, captions: list[str] | None) -> torch.Tensor | None:
        """KL of the student's in-batch logits to the teacher's (same pairs); None before the first refresh."""
        if self.step == 0:
            return None
        method = self.method
        with torch.no_grad(), swapped_parameters(method, self.state):
            t_img, t_txt, t_scale = method.pair_features(inputs.embed(x), y, method.compute_text_features())
            if student.caption_ids is not None:
                t_txt = method.caption_features(y, captions, student.caption_ids).to(t_img.dtype)
            t_i2t, t_t2i = losses.clip_logits(t_img.float(), t_txt.float(), t_scale.float())
        img_f, txt_f, scale = student.image, student.text, student.scale
        s_i2t, s_t2i = losses.clip_logits(img_f.float(), txt_f.float(), scale.float())
        return losses.self_distillation_loss(s_i2t, s_t2i, t_i2t, t_t2i)

    def after_step(self, params: dict[str, torch.nn.Parameter]) -> None:
        c = self.carot
        if self.step % c.teacher_every == 0:
            m = losses.carot_momentum(self.step, self.total_steps, start=c.momentum_start, end=c.momentum_end, ramp_fraction=c.ramp_fraction)
            losses.ema_update_(self.state, {k: p.detach() for k, p in params.items()}, m)
        self.step += 1

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.state.items()}


class ClientTerm:
    """The aggregator's client-side term: FedProx's proximal term and/or FedDyn's terms."""

    def __init__(self, params: dict[str, torch.nn.Parameter], global_state: dict[str, torch.Tensor] | None, fl_config: dict[str, Any],
                 feddyn_grad: dict[str, torch.Tensor] | None, device: torch.device):
        self.params = params
        self.global_cpu = global_state or {}
        self.global_dev = {k: v.to(device) for k, v in self.global_cpu.items()}
        self.mu = float(fl_config.get("proximal-mu", 0.0))
        self.alpha = float(fl_config.get("feddyn-alpha", 0.0))
        if self.alpha > 0 and feddyn_grad is None:
            feddyn_grad = {k: torch.zeros_like(v, device="cpu", dtype=torch.float32) for k, v in params.items()}
        self.feddyn_grad = feddyn_grad if self.alpha > 0 else None
        self.grad_dev = {k: v.to(device) for k, v in feddyn_grad.items()} if self.alpha > 0 else None
        self.device = device

    def __call__(self) -> torch.Tensor:
        term = torch.zeros((), device=self.device)
        if self.mu > 0:
            term = term + losses.proximal_term(self.params, self.global_dev, self.mu)
        if self.alpha > 0:
            term = term + losses.feddyn_terms(self.params, self.global_dev, self.grad_dev, self.alpha)
        return term

    def next_feddyn_grad(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.alpha <= 0:
            return None
        return losses.feddyn_update_grad_state(self.feddyn_grad, {k: v.cpu() for k, v in state.items()},
                                               {k: v.cpu() for k, v in self.global_cpu.items()}, self.alpha)


class Objective:
    """The whole local objective of one client round (see the module docstring)."""

    def __init__(self, method, cfg: RunConfig, device: torch.device, params: dict[str, torch.nn.Parameter], *,
                 total_steps: int, global_state: dict[str, torch.Tensor] | None, fl_config: dict[str, Any], carried: CarriedState, seed: int = 0):
        lc = cfg.loss
        self.method, self.cfg, self.device = method, cfg, device
        self.params = params
        self.contrastive = lc.name in CONTRASTIVE_LOSSES
        carot = lc.name == "carot"
        self.teacher = EmaTeacher(method, cfg, device, total_steps=total_steps, state=carried.teacher, step=carried.carot_step) if carot else None
        visual_proj = _trainable_parameter(method.clip.visual, "proj") if carot else None
        text_proj = getattr(method.clip, "text_projection", None)
        self.visual_proj = visual_proj
        self.text_proj = text_proj if isinstance(text_proj, torch.Tensor) else None
        self.client_term = ClientTerm(params, global_state, fl_config, carried.feddyn_grad, device)
        self.carot_step = carried.carot_step
        self.weights = {
            "base-loss": 1.0, "penalty": 1.0, "regularizer": 1.0, "client-term": 1.0,
            "self-distillation": lc.carot.sd_weight if carot else 0.0,
            "orthogonality": lc.carot.oc_weight if visual_proj is not None else 0.0,
            "cross": lc.carot.cross_weight if visual_proj is not None and self.text_proj is not None else 0.0,
        }
        self.captions = templates_for(lc.captions, "{}") if lc.captions != "class" else None
        self.caption_rng = torch.Generator().manual_seed(seed)
        self.penalty_weight = {"mbls": lc.mbls_weight, "dca": lc.dca_weight, "mdca": lc.mdca_weight, "mmce": lc.mmce_weight}.get(lc.penalty)

    @property
    def min_batch(self) -> int:
        """Contrastive losses need at least two pairs (FedCLIP skips such batches too)."""
        return 2 if self.contrastive else 1

    def _base(self, emb, text, logits, y):
        lc = self.cfg.loss
        if not self.contrastive:
            return losses.classification_loss(lc.name, logits, y, label_smoothing=lc.label_smoothing, focal_gamma=lc.focal_gamma), None
        img_f, txt_f, scale = self.method.pair_features(emb, y, text)
        ids = None
        if self.captions is not None:
            ids = torch.randint(len(self.captions), (len(y),), generator=self.caption_rng)
            txt_f = self.method.caption_features(y, self.captions, ids).to(img_f.dtype)
        loss = losses.clip_contrastive_loss(img_f.float(), txt_f.float(), scale.float(), label_smoothing=lc.label_smoothing)
        return loss, Pairs(img_f, txt_f, scale, ids)

    def __call__(self, inputs, x: torch.Tensor, y: torch.Tensor) -> StepLoss:
        """The loss of one batch (call inside the autocast context)."""
        lc, method = self.cfg.loss, self.method
        emb = inputs.embed(x)
        text = method.text_features()
        logits = method.logits_from_embeddings(emb, text).float()
        zero = torch.zeros((), device=self.device)
        terms = dict.fromkeys(OBJECTIVE_TERMS, zero)
        terms["base-loss"], pairs = self._base(emb, text, logits, y)
        if self.teacher is not None and pairs is not None:
            sd = self.teacher.distillation(inputs, x, y, pairs, self.captions)
            terms["self-distillation"] = zero if sd is None else sd
        if self.weights["orthogonality"] > 0:
            terms["orthogonality"] = losses.orthogonality_loss(self.visual_proj.float())
        if self.weights["cross"] > 0:
            terms["cross"] = losses.cross_projection_loss(self.visual_proj.float(), self.text_proj.float())
        terms["penalty"] = losses.calibration_penalty(lc.penalty, logits, y, weight=self.penalty_weight, margin=lc.mbls_margin, mmce_form=lc.mmce_form)
        terms["regularizer"] = method.regularizer()
        terms["client-term"] = self.client_term()
        loss = terms["base-loss"]
        for name in OBJECTIVE_TERMS[1:]:
            loss = loss + (terms[name] if self.weights[name] == 1.0 else self.weights[name] * terms[name])
        return StepLoss(loss, terms, logits)

    def after_step(self) -> None:
        if self.teacher is not None:
            self.teacher.after_step(self.params)

    def carried(self, state: dict[str, torch.Tensor]) -> CarriedState:
        """What persists into the next round, given this round's final trainable ``state``."""
        teacher = self.teacher.export() if self.teacher is not None else None
        step = self.teacher.step if self.teacher is not None else self.carot_step
        return CarriedState(teacher, step, self.client_term.next_feddyn_grad(state))
