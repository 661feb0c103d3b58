"""Everything one client process needs for one message: config, data, frozen CLIP, method.

Without a warm worker each Flower message starts a fresh ClientApp process, so a runtime is built
per message: the partition comes from the per-node partition cache (or is recomputed,
deterministically), CLIP is loaded from the local cache and the method is rebuilt with the same
seed as on the server, then the global trainable state from the message is loaded into it. A
method with frozen towers (adapter, linear, zero-shot, without augmentation) whose splits are in
the feature cache skips CLIP: it is built on the stored class text features and logit scale
(:class:`~common.model.HeadlessClip`) with the cached image embeddings held in memory; a split it
reads that is not cached loads CLIP at that moment (:meth:`ClientRuntime.load_towers`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import NodeConfig, RunConfig, expand_path
from common.data import ClientData, load_client_data
from common.methods import ClipMethod, build_method
from common.model import (
    HeadlessClip,
    LoadedClip,
    TransformRef,
    autocast,
    load_clip,
    no_tokenizer,
    resolve_device,
    templates_for,
)
from common.names import NO_AUGMENT_METHODS

from .features import (
    FROZEN_TOWER_METHODS,
    cache_key,
    embeddings_path,
    load_frozen_text,
    read_embeddings,
    store_frozen_text,
    text_path,
)
from .train import SplitEvaluation, SplitInputs, TrainOutcome, evaluate_logits, local_train, predict

log = logging.getLogger(__name__)



def rrc_flip(clip: LoadedClip):
    """Random-resized-crop (scale 0.08-1, bicubic) + horizontal flip, CLIP normalisation (FL²oRA, CoOp)."""
    pp = getattr(clip.model.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", clip.model.visual.image_size)
    size = size if isinstance(size, int) else tuple(size)
    mean = pp.get("mean", (0.48145466, 0.4578275, 0.40821073))
    std = pp.get("std", (0.26862954, 0.26130258, 0.27577711))
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def augments(cfg: RunConfig) -> bool:
    """Whether training draws random augmentations (then its images cannot come from the cache)."""
    mode = cfg.data.augment
    return mode == "rrc-flip" or (mode == "auto" and cfg.method.name not in NO_AUGMENT_METHODS)


def frozen_text_file(cfg: RunConfig, device: torch.device, class_names: list[str]) -> Path | None:
    """Where this run's frozen-text file lives, or None when its clients cannot run without CLIP
    (a method that trains or needs a tower, augmentation, captions, or no feature cache)."""
    if (cfg.method.name not in FROZEN_TOWER_METHODS or not cfg.data.feature_cache or not cfg.data.cache_dir
            or augments(cfg) or cfg.loss.captions != "class"):
        return None
    templates = templates_for(cfg.method.templates, cfg.method.template)
    return text_path(expand_path(cfg.data.cache_dir, "data.cache_dir"), cfg.model.name, cfg.model.pretrained, cfg.model.precision,
                     device, list(class_names), templates)


def _with_clip(cfg: RunConfig, device: torch.device, data: ClientData) -> tuple[LoadedClip, ClipMethod]:
    clip = load_clip(cfg.model.name, cfg.model.pretrained, device=device, precision=cfg.model.precision,
                     cache_dir=cfg.model.cache_dir or None, offline=cfg.model.offline)
    return clip, build_method(cfg, clip, data.class_names, seed=cfg.optim.seed)


def splits_used(cfg: RunConfig, data: ClientData) -> list[str]:
    """The non-empty splits this client's messages read: a held-out client's test split; a seen
    client's train split, ``eval.splits`` and, with temperature scaling, ``eval.ts_split``."""
    used = {"test"} if data.role == "unseen" else {"train", *cfg.eval.split_list(), *([cfg.eval.ts_split] if cfg.eval.temperature_scaling != "none" else [])}
    return [s for s in ("train", "val", "test") if s in used and data.size(s)]


def _preload(cfg: RunConfig, device: torch.device, data: ClientData, transform: TransformRef) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The cached image embeddings of the splits this client reads (those in the cache)."""
    cache_dir = expand_path(cfg.data.cache_dir, "data.cache_dir")
    out = {}
    for split in splits_used(cfg, data):
        key = cache_key(cfg.model.name, cfg.model.pretrained, cfg.model.precision, device, data, split, transform)
        stored = read_embeddings(embeddings_path(cache_dir, key), data, split)
        if stored is not None:
            out[split] = stored
    return out


#: Logit given to the classes a projected held-out set does not contain: finite (the reply stays
#: valid), and exp(PROJECTED_OUT / T) is exactly 0 in float64 for any temperature fedcal fits.
PROJECTED_OUT = -1.0e4


def project(logits: torch.Tensor, classes) -> torch.Tensor:
    """CaRot's class-subset projection: predictions among ``classes`` only (None: all classes)."""
    if classes is None:
        return logits
    keep = torch.zeros(logits.shape[1], dtype=torch.bool)
    keep[torch.as_tensor(classes, dtype=torch.long)] = True
    return logits.masked_fill(~keep, PROJECTED_OUT)


@dataclass
class ClientRuntime:
    cfg: RunConfig
    node: NodeConfig
    data: ClientData
    clip: LoadedClip
    method: ClipMethod
    device: torch.device
    #: split -> (embeddings, labels) read when the runtime was built on a HeadlessClip: the cached
    #: splits it reads, held so that no later message needs the image tower (another split loads CLIP)
    preloaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: RunConfig, node: NodeConfig, data: ClientData | None = None) -> ClientRuntime:
        if node.cache_dir:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": node.cache_dir})})
        if cfg.optim.num_threads:
            torch.set_num_threads(cfg.optim.num_threads)
        device = resolve_device(node.device or cfg.model.device)
        data = data or load_client_data(cfg.data, node)
        text_file = frozen_text_file(cfg, device, data.class_names)
        stored_text = load_frozen_text(text_file, data.class_names, templates_for(cfg.method.templates, cfg.method.template),
                                       cfg.model.precision, device) if text_file else None
        preloaded = _preload(cfg, device, data, stored_text[1]) if stored_text else {}
        if preloaded:
            clip = LoadedClip(stored_text[0], None, stored_text[1], no_tokenizer)
            method = build_method(cfg, clip, data.class_names, seed=cfg.optim.seed)
            log.info("client %s: %s on cached image and text features (%s), CLIP not loaded", node.partition_id, cfg.method.name, ", ".join(preloaded))
            return cls(cfg, node, data, clip, method, device, preloaded)
        clip, method = _with_clip(cfg, device, data)
        if text_file and stored_text is None:  # absent, damaged or foreign: (re)written
            try:
                store_frozen_text(text_file, method, clip.preprocess_eval, lambda: autocast(cfg.model.precision, device))
            except OSError as err:  # a read-only cache costs only the next start its CLIP load
                log.warning("frozen-text file %s not written (%s)", text_file, err)
        return cls(cfg, node, data, clip, method, device)

    # ------------------------------------------------------------------ inputs
    def augment(self) -> bool:
        return augments(self.cfg)

    @property
    def headless(self) -> bool:
        return isinstance(self.clip.model, HeadlessClip)

    def load_towers(self) -> None:
        """Replace a HeadlessClip by the real CLIP (a split the cache does not hold was asked
        for): the method is rebuilt on it and takes over the current trainable state."""
        state = self.method.trainable_state()
        log.info("client %s: loading CLIP (a split it reads is not in the feature cache)", self.node.partition_id)
        self.clip, self.method = _with_clip(self.cfg, self.device, self.data)
        self.method.load_trainable_state(state)

    def inputs(self, split: str, train: bool = False) -> SplitInputs:
        """The examples of a split (call before reading ``self.method``: on a HeadlessClip a split
        that is not cached loads CLIP and rebuilds the method)."""
        if self.headless and split not in self.preloaded:
            self.load_towers()
        if train and self.augment():
            return SplitInputs(self.method, self.cfg, self.data, split, rrc_flip(self.clip), self.device, cacheable=False)
        return SplitInputs(self.method, self.cfg, self.data, split, self.clip.preprocess_eval, self.device, cacheable=True,
                           preloaded=self.preloaded.get(split))

    # ------------------------------------------------------------------ work
    def train(self, global_state: dict[str, torch.Tensor], *, server_round: int, fl_config: dict, teacher=None, carot_step: int = 0, feddyn_grad=None) -> TrainOutcome:
        inputs = self.inputs("train", train=True)
        self.method.load_trainable_state(global_state)
        return local_train(
            self.method, self.cfg, inputs, server_round=server_round, partition_id=self.node.partition_id,
            device=self.device, global_state=global_state, fl_config=fl_config, teacher=teacher, carot_step=carot_step, feddyn_grad=feddyn_grad,
        )

    def logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.inputs(split)
        logits, labels = predict(self.method, self.cfg, inputs, self.device, wise_alpha=self.cfg.method.wise_alpha)
        return project(logits, self.data.eval_classes), labels

    def evaluate_split(self, split: str, temperature: float = 1.0) -> SplitEvaluation:
        logits, labels = self.logits(split)
        return evaluate_logits(split, logits, labels, self.cfg.eval.n_bins, temperature)


def evaluate_global(cfg: RunConfig, state: dict[str, torch.Tensor], temperature: float = 1.0, data_dir: str = "") -> list[SplitEvaluation]:
    """The global model on the whole evaluation set of the configured classes (common.data.global_test_data),
    raw and, when ``temperature`` is not 1, after temperature scaling."""
    from common.data import global_test_data

    rt = ClientRuntime.create(cfg, config_node(), data=global_test_data(cfg.data, data_dir))
    rt.method.load_trainable_state(state)
    logits, labels = rt.logits("test")
    out = [evaluate_logits("test", logits, labels, cfg.eval.n_bins)]
    if temperature != 1.0:
        out.append(evaluate_logits("test", logits, labels, cfg.eval.n_bins, temperature))
    return out


def config_node() -> NodeConfig:
    from common.config import parse_node_config

    return parse_node_config({"partition-id": 0, "num-partitions": 1})
