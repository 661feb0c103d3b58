"""Local training and evaluation of one client.

One round of local training minimises the objective of ``client/objective.py`` (base loss,
calibration penalty, method regulariser, CaRot terms, the aggregator's client term)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.calibration import CalibrationStats, adaptive_ece
from common.config import RunConfig, expand_path
from common.data import ClientData
from common.model import autocast
from common.names import OBJECTIVE_TERMS

from .features import cache_key, cached_embeddings
from .objective import CarriedState, Objective, StepLoss


# --------------------------------------------------------------------------------------------
# Inputs of one split: cached embeddings or images
# --------------------------------------------------------------------------------------------
class SplitInputs:
    """The examples of one split, as precomputed embeddings or as transformed images."""

    def __init__(self, method, cfg: RunConfig, data: ClientData, split: str, transform, device: torch.device, *, cacheable: bool,
                 preloaded: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.method, self.cfg, self.data, self.split, self.transform, self.device = method, cfg, data, split, transform, device
        self.embeddings: torch.Tensor | None = None
        self.labels = torch.as_tensor(data.labels(split)).long()
        self.cache_hit = False
        if cacheable and preloaded is not None:  # read from the cache when the runtime was built without CLIP
            self.embeddings, self.cache_hit = preloaded[0], True
        elif cacheable and cfg.data.feature_cache and method.image_tower_frozen and len(self.labels):
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


class _Progress:
    """A transient progress bar on an interactive terminal; nothing otherwise (CI, logs, FEDCAL_QUIET)."""

    def __init__(self, total: int, description: str):
        self.bar = None
        if not sys.stderr.isatty() or os.environ.get("CI") or os.environ.get("FEDCAL_QUIET"):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), transient=True)
        self.bar.add_task(description, total=total, loss=float("nan"))

    def __enter__(self) -> _Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def advance(self, loss: float) -> None:
        if self.bar:
            self.bar.update(self.bar.task_ids[0], advance=1, loss=loss)


@dataclass
class _Tally:
    """Running sums of the objective's terms and the training accuracy over one round."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("loss",) + OBJECTIVE_TERMS, 0.0))
    correct: int = 0
    seen: int = 0
    steps: int = 0

    def add(self, out: StepLoss, y: torch.Tensor) -> None:
        self.sums["loss"] += float(out.loss.detach())
        for name, value in out.terms.items():
            self.sums[name] += float(value.detach())
        self.correct += int((out.logits.detach().argmax(dim=1) == y).sum())
        self.seen += len(y)
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        per_step = max(self.steps, 1)
        out = {"train-loss": self.sums["loss"] / per_step}
        out.update({f"train-{name}": self.sums[name] / per_step for name in OBJECTIVE_TERMS})
        out["train-accuracy"] = self.correct / max(self.seen, 1)
        return out


def _step_batches(inputs: SplitInputs, cfg: RunConfig, generator: torch.Generator, steps: int, min_batch: int, partition_id: int):
    """Shuffled batches, epoch after epoch, until ``steps`` usable batches (of >= min_batch examples)."""
    done = 0
    while done < steps:
        for x, y in inputs.batches(cfg.optim.batch_size, shuffle=True, generator=generator):
            if len(y) < min_batch:
                continue
            yield x, y
            done += 1
            if done >= steps:
                return
        if done == 0:
            raise ValueError(f"client {partition_id} produced no usable training batch ({len(inputs)} examples, batch size {cfg.optim.batch_size})")


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: dict[str, torch.nn.Parameter], cfg: RunConfig, where: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"local loss became {loss.item()} at {where}; lower optim.lr or enable optim.grad_clip")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.optim.grad_clip)
    optimizer.step()


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
    steps = steps_per_round(len(inputs), cfg)
    total_steps = steps * cfg.fl.rounds
    seed = seeded(cfg.optim.seed, server_round, partition_id)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = dict(method.trainable_named_parameters())
    if not params:
        raise ValueError(f"method {method.name!r} has no trainable tensors; it cannot be trained (use it for evaluation only)")
    optimizer = build_optimizer(list(params.values()), cfg)
    objective = Objective(method, cfg, device, params, total_steps=total_steps, global_state=global_state, fl_config=fl_config or {},
                          carried=CarriedState(teacher, carot_step, feddyn_grad), seed=seed)
    tally = _Tally()
    method.train()
    t0 = time.time()
    with _Progress(steps, f"round {server_round} client {partition_id}") as progress:
        for x, y in _step_batches(inputs, cfg, generator, steps, objective.min_batch, partition_id):
            gstep = (server_round - 1) * steps + tally.steps
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * lr_factor(gstep, total_steps, cfg)
            with autocast(cfg.model.precision, device):
                out = objective(inputs, x, y)
            _optimizer_step(optimizer, out.loss, params, cfg, f"round {server_round}, step {tally.steps}")
            objective.after_step()
            tally.add(out, y)
            progress.advance(float(out.loss.detach()))
    method.eval()
    state = method.trainable_state()
    metrics: dict[str, float | int] = {"num-examples": int(len(inputs)), "local-steps": int(tally.steps), "train-seconds": float(time.time() - t0)}
    metrics.update(tally.metrics())
    metrics.update({"lr": float(optimizer.param_groups[0]["lr"]), "fednova-a": fednova_normaliser(tally.steps, cfg)})
    carried = objective.carried(state)
    return TrainOutcome(state, metrics, teacher=carried.teacher, carot_step=carried.carot_step, feddyn_grad=carried.feddyn_grad)


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
