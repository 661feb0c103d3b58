"""Local training and evaluation of one client.

One round of local training minimises

    base loss (ce | focal | flsd53 | flyp | carot)
  + calibration penalty (none | mbls | dca | mdca | mmce)
  + method regulariser (KgCoOp)
  + CaRot terms (EMA-teacher self-distillation; orthogonality of visual.proj when trainable)
  + aggregator client term (FedProx proximal term | FedDyn linear + quadratic terms)

over the trainable tensors only, with the configured optimizer (re-created every round: each
message may run in a fresh process) and a learning-rate schedule laid over all local steps of all
rounds. Randomness (batch order, augmentation, dropout) is seeded by (optim.seed, round, client).

Evaluation gives, per split, exact mergeable :class:`~common.calibration.CalibrationStats` (the
configured bins and 10 bins), adaptive ECE, and the logits (kept in memory for temperature
scaling). Inputs come from the frozen-feature cache where the method allows it, else from images.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.calibration import CalibrationStats, adaptive_ece
from common.config import RunConfig, expand_path
from common.data import ClientData
from common.model import autocast

from . import losses
from .features import cache_key, cached_embeddings


# --------------------------------------------------------------------------------------------
# Inputs of one split: cached embeddings or images
# --------------------------------------------------------------------------------------------
class SplitInputs:
    """The examples of one split, as precomputed embeddings or as transformed images."""

    def __init__(self, method, cfg: RunConfig, data: ClientData, split: str, transform, device: torch.device, *, cacheable: bool):
        self.method, self.cfg, self.data, self.split, self.transform, self.device = method, cfg, data, split, transform, device
        self.embeddings: torch.Tensor | None = None
        self.labels = torch.as_tensor(data.labels(split)).long()
        self.cache_hit = False
        if cacheable and cfg.data.feature_cache and method.image_tower_frozen and len(self.labels):
            cache_dir = expand_path(cfg.data.cache_dir, "data.cache_dir")
            key = cache_key(cfg.model.name, cfg.model.pretrained, cfg.model.precision, device, data, split, transform)
            self.embeddings, _, self.cache_hit = cached_embeddings(
                method, data, split, transform, device, lambda: autocast(cfg.model.precision, device),
                cache_dir=Path(cache_dir), key=key, batch_size=cfg.optim.eval_batch_size, num_workers=cfg.data.loader_workers(device.type),
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def precomputed(self) -> bool:
        return self.embeddings is not None

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs on device, labels on device); inputs are embeddings when precomputed."""
        if self.embeddings is not None:
            order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
            for start in range(0, len(self), batch_size):
                idx = order[start : start + batch_size]
                yield self.embeddings[idx].to(self.device), self.labels[idx].to(self.device)
            return
        loader = torch.utils.data.DataLoader(
            self.data.dataset(self.split, self.transform), batch_size=batch_size, shuffle=shuffle,
            generator=generator, num_workers=self.cfg.data.loader_workers(self.device.type),
        )
        for images, labels in loader:
            yield images.to(self.device), labels.long().to(self.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.precomputed else self.method.image_embeddings(x)


def seeded(*parts: int) -> int:
    """A 63-bit seed derived from several integers (seed, round, partition, ...)."""
    seq = torch.Generator().manual_seed(0)
    value = 0
    for p in parts:
        seq.manual_seed((value * 1_000_003 + int(p) + 0x9E3779B9) % (2**63))
        value = int(torch.randint(0, 2**62, (1,), generator=seq))
    return value


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------
def build_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


def lr_factor(step: int, total: int, cfg: RunConfig) -> float:
    """Multiplier of optim.lr at global local step ``step`` (0-based) of ``total``."""
    o = cfg.optim
    if o.schedule == "constant":
        return 1.0
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    span = max(1, total - o.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - o.warmup_steps) / span)))


def steps_per_round(n_train: int, cfg: RunConfig) -> int:
    if cfg.optim.local_steps > 0:
        return cfg.optim.local_steps
    return cfg.optim.local_epochs * max(1, math.ceil(n_train / cfg.optim.batch_size))


def fednova_normaliser(steps: int, cfg: RunConfig) -> float:
    """FedNova's ||a_i||_1: tau for plain SGD, the momentum-corrected sum for SGD with momentum rho,
    a_i = [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho) (Wang et al. 2020); tau otherwise."""
    rho = cfg.optim.momentum if cfg.optim.name == "sgd" else 0.0
    if rho == 0.0:
        return float(steps)
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


@contextmanager
def swapped_parameters(method, state: dict[str, torch.Tensor]):
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


# --------------------------------------------------------------------------------------------
# Local training
# --------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    teacher: dict[str, torch.Tensor] | None = None
    carot_step: int = 0
    feddyn_grad: dict[str, torch.Tensor] | None = None


def _progress(total: int, description: str):
    quiet = not sys.stderr.isatty() or os.environ.get("CI") or os.environ.get("FEDCAL_QUIET")
    if quiet:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), transient=True)
    progress.add_task(description, total=total, loss=float("nan"))
    return progress


def local_train(
    method,
    cfg: RunConfig,
    inputs: SplitInputs,
    *,
    server_round: int,
    partition_id: int,
    device: torch.device,
    global_state: dict[str, torch.Tensor] | None = None,
    fl_config: dict[str, Any] | None = None,
    teacher: dict[str, torch.Tensor] | None = None,
    carot_step: int = 0,
    feddyn_grad: dict[str, torch.Tensor] | None = None,
) -> TrainOutcome:
    """Train ``method`` for one round on ``inputs``; returns the new trainable state and metrics."""
    fl_config = fl_config or {}
    lc = cfg.loss
    n = len(inputs)
    steps = steps_per_round(n, cfg)
    total_steps = steps * cfg.fl.rounds
    seed = seeded(cfg.optim.seed, server_round, partition_id)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    params = dict(method.trainable_named_parameters())
    if not params:
        raise ValueError(f"method {method.name!r} has no trainable tensors; it cannot be trained (use it for evaluation only)")
    optimizer = build_optimizer(list(params.values()), cfg)
    global_on_device = {k: v.to(device) for k, v in (global_state or {}).items()}
    mu = float(fl_config.get("proximal-mu", 0.0))
    dyn_alpha = float(fl_config.get("feddyn-alpha", 0.0))
    if dyn_alpha > 0 and feddyn_grad is None:
        feddyn_grad = {k: torch.zeros_like(v, device="cpu", dtype=torch.float32) for k, v in params.items()}
    dyn_grad_dev = {k: v.to(device) for k, v in feddyn_grad.items()} if dyn_alpha > 0 else None

    is_carot = lc.name == "carot"
    if is_carot and teacher is None:
        teacher = {k: v.detach().clone() for k, v in method.trainable_state().items()}
    teacher_dev = {k: v.to(device) for k, v in teacher.items()} if is_carot else None
    oc_param = getattr(method.clip.visual, "proj", None) if is_carot else None
    oc_active = is_carot and lc.carot.oc_weight > 0 and isinstance(oc_param, torch.nn.Parameter) and oc_param.requires_grad

    sums = {k: 0.0 for k in ("loss", "base", "penalty", "reg", "sd", "oc", "fl")}
    correct = seen = 0
    method.train()
    progress = _progress(steps, f"round {server_round} client {partition_id}")
    t0 = time.time()
    step = 0
    try:
        if progress:
            progress.start()
        while step < steps:
            for x, y in inputs.batches(cfg.optim.batch_size, shuffle=True, generator=generator):
                if len(y) < 2 and lc.name in ("flyp", "carot"):
                    continue  # contrastive losses need at least two pairs (FedCLIP skips such batches too)
                gstep = (server_round - 1) * steps + step
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optim.lr * lr_factor(gstep, total_steps, cfg)
                with autocast(cfg.model.precision, device):
                    emb = inputs.embed(x)
                    text = method.text_features()
                    logits = method.logits_from_embeddings(emb, text).float()
                    if lc.name in ("ce", "focal", "flsd53"):
                        base = losses.classification_loss(lc.name, logits, y, label_smoothing=lc.label_smoothing, focal_gamma=lc.focal_gamma)
                    else:
                        img_f, txt_f, scale = method.pair_features(emb, y, text)
                        base = losses.clip_contrastive_loss(img_f.float(), txt_f.float(), scale.float(), label_smoothing=lc.label_smoothing)
                    sd = oc = torch.zeros((), device=device)
                    if is_carot:
                        if carot_step > 0:
                            with torch.no_grad(), swapped_parameters(method, teacher_dev):
                                t_img, t_txt, t_scale = method.pair_features(inputs.embed(x), y, method.compute_text_features())
                                t_i2t, t_t2i = losses.clip_logits(t_img.float(), t_txt.float(), t_scale.float())
                            s_i2t, s_t2i = losses.clip_logits(img_f.float(), txt_f.float(), scale.float())
                            sd = losses.self_distillation_loss(s_i2t, s_t2i, t_i2t, t_t2i)
                        if oc_active:
                            oc = losses.orthogonality_loss(oc_param.float())
                    penalty = losses.calibration_penalty(
                        lc.penalty, logits, y,
                        weight={"mbls": lc.mbls_weight, "dca": lc.dca_weight, "mdca": lc.mdca_weight, "mmce": lc.mmce_weight}.get(lc.penalty),
                        margin=lc.mbls_margin,
                    )
                    reg = method.regularizer()
                    fl_term = torch.zeros((), device=device)
                    if mu > 0:
                        fl_term = fl_term + losses.proximal_term(params, global_on_device, mu)
                    if dyn_alpha > 0:
                        fl_term = fl_term + losses.feddyn_terms(params, global_on_device, dyn_grad_dev, dyn_alpha)
                    loss = base + penalty + reg + lc.carot.sd_weight * sd + lc.carot.oc_weight * oc + fl_term
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"local loss became {loss.item()} at round {server_round}, step {step}; lower optim.lr or enable optim.grad_clip")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.optim.grad_clip)
                optimizer.step()
                if is_carot:
                    if carot_step % lc.carot.teacher_every == 0:
                        m = losses.carot_momentum(carot_step, total_steps, start=lc.carot.momentum_start, end=lc.carot.momentum_end, ramp_fraction=lc.carot.ramp_fraction)
                        losses.ema_update_(teacher_dev, {k: p.detach() for k, p in params.items()}, m)
                    carot_step += 1
                for key, value in (("loss", loss), ("base", base), ("penalty", penalty), ("reg", reg), ("sd", sd), ("oc", oc), ("fl", fl_term)):
                    sums[key] += float(value.detach())
                correct += int((logits.detach().argmax(dim=1) == y).sum())
                seen += len(y)
                step += 1
                if progress:
                    progress.update(progress.task_ids[0], advance=1, loss=float(loss.detach()))
                if step >= steps:
                    break
            else:
                if seen == 0:
                    raise ValueError(f"client {partition_id} produced no usable training batch ({n} examples, batch size {cfg.optim.batch_size})")
    finally:
        if progress:
            progress.stop()
    method.eval()
    state = method.trainable_state()
    metrics: dict[str, float | int] = {
        "num-examples": int(n),
        "local-steps": int(step),
        "train-seconds": float(time.time() - t0),
        "train-loss": sums["loss"] / max(step, 1),
        "train-base-loss": sums["base"] / max(step, 1),
        "train-penalty": sums["penalty"] / max(step, 1),
        "train-regularizer": sums["reg"] / max(step, 1),
        "train-self-distillation": sums["sd"] / max(step, 1),
        "train-orthogonality": sums["oc"] / max(step, 1),
        "train-client-term": sums["fl"] / max(step, 1),
        "train-accuracy": correct / max(seen, 1),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "fednova-a": fednova_normaliser(step, cfg),
    }
    outcome = TrainOutcome(state, metrics, carot_step=carot_step)
    if is_carot:
        outcome.teacher = {k: v.detach().to("cpu", torch.float32) for k, v in teacher_dev.items()}
    if dyn_alpha > 0:
        outcome.feddyn_grad = losses.feddyn_update_grad_state(
            feddyn_grad, {k: v.cpu() for k, v in state.items()}, {k: v.cpu() for k, v in global_state.items()}, dyn_alpha
        )
    return outcome


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(method, cfg: RunConfig, inputs: SplitInputs, device: torch.device, wise_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) in float32 on the CPU and labels (N,) for a split."""
    method.eval()
    outs, ys = [], []
    with method.wise(wise_alpha):
        for x, y in inputs.batches(cfg.optim.eval_batch_size):
            with autocast(cfg.model.precision, device):
                outs.append(method.logits_from_embeddings(inputs.embed(x)).float().cpu())
            ys.append(y.cpu())
    if not outs:
        return torch.zeros(0, len(method.class_names)), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


@dataclass
class SplitEvaluation:
    split: str
    stats: CalibrationStats
    stats10: CalibrationStats
    adaptive_ece: float
    temperature: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str) -> dict[str, Any]:
        """MetricRecord entries: exact sums (for pooling) plus this client's scalars."""
        out: dict[str, Any] = {}
        out.update(self.stats.to_metrics(prefix))
        out.update(self.stats10.to_metrics(prefix + "b10-"))
        out[prefix + "adaptive-ece"] = float(self.adaptive_ece)
        out[prefix + "temperature"] = float(self.temperature)
        return out


def evaluate_logits(split: str, logits: torch.Tensor, labels: torch.Tensor, n_bins: int, temperature: float = 1.0) -> SplitEvaluation:
    stats = CalibrationStats.from_logits(logits, labels, n_bins=n_bins, temperature=temperature)
    stats10 = CalibrationStats.from_logits(logits, labels, n_bins=10, temperature=temperature)
    probs = torch.softmax(logits.double() / temperature, dim=1) if len(labels) else logits
    ace = adaptive_ece(probs, labels, n_bins=n_bins) if len(labels) else float("nan")
    return SplitEvaluation(split, stats, stats10, ace, temperature)
