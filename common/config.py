"""The run configuration: one pydantic model for everything a run needs.

Flower hands every app a *flattened* ``run_config`` (``{"method.lora.rank": 2, ...}``: nested
TOML tables joined with dots, values only bool/int/float/str) and a per-node ``node_config``
(``partition-id``, ``num-partitions``, ``data-dir``, ``role``, ...). :func:`from_flower` turns
both into a validated :class:`RunConfig`; every error a user can make (unknown key, wrong type,
value out of range) becomes one :class:`ConfigError` line naming the key and, for a typo, the
closest valid key.

The defaults are the real setup (ViT-B-16 with OpenAI weights, PACS from the hub, the FL²oRA
protocol). ``pyproject.toml``'s ``[tool.flwr.app.config]`` lists exactly these defaults
(``fedcal config --toml`` prints them; a test keeps the two equal) and README.md's
configuration reference is generated from the field descriptions (``fedcal config --markdown``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .names import (
    AGGREGATORS,
    BASE_LOSSES,
    CAPTIONS,
    CONTRASTIVE_LOSSES,
    METHODS,
    MMCE_FORMS,
    PENALTIES,
    PROMPT_METHODS,
)


class ConfigError(ValueError):
    """A user-caused configuration problem; ``str(err)`` is one line that says what to fix."""


class _Section(BaseModel):
    # allow_inf_nan=False: an inf/nan learning rate, weight or timeout is a typo, never a setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        """pydantic's lax mode reads ``true`` as 1 for an int or float field; fedcal refuses it."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and field.annotation in (int, float):
                    raise ValueError(f"{name}: expected a number, got the boolean {str(value).lower()}")
        return data


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
class ModelConfig(_Section):
    name: str = Field("ViT-B-16", description="open_clip architecture name (e.g. ViT-B-16, ViT-B-32, or the test config fedcal-tiny).")
    pretrained: str = Field("openai", description="Weights: an open_clip pretrained tag (hub download, cached), a local checkpoint file path, or empty for random initialisation.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Autocast precision for the frozen backbone and training: auto = bf16 autocast on CUDA, fp32 on CPU.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (a node's node_config 'device' overrides it).")
    cache_dir: str = Field("", description="Directory for downloaded CLIP weights (empty: the Hugging Face default cache).")
    offline: bool = Field(False, description="Never touch the network: load hub weights only from the cache (HF_HUB_OFFLINE=1 has the same effect).")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v


class LoraConfig(_Section):
    encoder: Literal["vision", "text", "both"] = Field("both", description="Which CLIP encoder(s) get LoRA.")
    targets: str = Field("q,k,v", description="Comma list of projections among q,k,v,out,mlp.")
    layers: str = Field("all", description="Transformer blocks: all, a range a-b (inclusive, 0-based) or a comma list.")
    rank: int = Field(2, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(1.0, gt=0, description="LoRA alpha.")
    dropout: float = Field(0.25, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    rslora: bool = Field(True, description="rsLoRA scaling alpha/sqrt(r) (else alpha/r).")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: str) -> str:
        items = [t.strip() for t in v.split(",") if t.strip()]
        bad = [t for t in items if t not in ("q", "k", "v", "out", "mlp")]
        if not items or bad:
            raise ValueError(f"must be a comma list of q,k,v,out,mlp (got {v!r})")
        return ",".join(items)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        v = v.replace(" ", "")
        if not re.fullmatch(r"all|\d+-\d+|\d+(,\d+)*", v):
            raise ValueError(f"must be 'all', a range like '0-5' or a list like '0,3,11' (got {v!r})")
        if "-" in v and int(v.split("-")[0]) > int(v.split("-")[1]):
            raise ValueError("the range is empty: write it low-high, e.g. '2-5'")
        return v


class PromptConfig(_Section):
    n_ctx: int = Field(16, ge=1, le=64, description="Number of learnable context vectors (CoOp/KgCoOp).")
    ctx_init: str = Field("", description="Initialise the context from this phrase's token embeddings (e.g. 'a photo of a'; n_ctx becomes its token count); empty: random N(0, 0.02).")
    kg_weight: float = Field(8.0, ge=0, description="KgCoOp lambda on ||t_learned - t_handcrafted||^2.")


class MapleConfig(_Section):
    n_ctx: int = Field(2, ge=1, le=16, description="MaPLe context length (learnable tokens per prompt), official default 2.")
    ctx_init: str = Field("a photo of a", description="MaPLe: the prompt phrase; its first n_ctx token embeddings initialise the first-layer context (official default); empty: N(0, 0.02).")
    depth: int = Field(9, ge=1, le=48, description="MaPLe prompt depth J: prompts enter the first J transformer blocks of both encoders (official default 9).")


class PeftConfig(_Section):
    encoder: Literal["vision", "text", "both"] = Field("both", description="Which CLIP encoder(s) the layernorm and bitfit methods tune.")


class MethodConfig(_Section):
    name: Literal[METHODS] = Field("lora", description="What each client trains (see README 'Methods').")  # type: ignore[valid-type]
    template: str = Field("a photo of a {}.", description="Prompt template; {} is replaced by the class name.")
    templates: Literal["single", "openai-imagenet", "simple-imagenet"] = Field("single", description="single = method.template; or open_clip's ImageNet template ensembles (zero-shot heads only).")
    logit_scale: float = Field(0.0, ge=0, description="Fixed logit scale; 0 = CLIP's own learned scale exp(logit_scale).")
    wise_alpha: float = Field(1.0, ge=0, le=1, description="WiSE-FT evaluation interpolation between zero-shot (0) and fine-tuned (1).")
    adapter_init: Literal["zero", "pytorch"] = Field("zero", description="FedCLIP adapter init: zero = last layer zero, so round 0 is exactly zero-shot; pytorch = FedCLIP's default init.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    maple: MapleConfig = Field(default_factory=MapleConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)


class CarotConfig(_Section):
    sd_weight: float = Field(0.75, ge=0, description="lambda of the EMA-teacher self-distillation term.")
    oc_weight: float = Field(0.2, ge=0, description="lambda_OC of the orthogonality constraint on visual.proj (only when it is trainable).")
    momentum_start: float = Field(0.05, ge=0, le=1, description="Teacher EMA momentum at the first step.")
    momentum_end: float = Field(0.9, ge=0, le=1, description="Teacher EMA momentum after the ramp.")
    ramp_fraction: float = Field(0.2, ge=0, le=1, description="Fraction of all local steps (over all rounds) over which the momentum ramps linearly.")
    teacher_every: int = Field(500, ge=1, description="Refresh the teacher every N local steps of a client (counted across rounds).")
    cross_weight: float = Field(0.0, ge=0, description="Weight of ||visual.proj text_projection^T||_F (CaRot's official --cross_fnorm 0.05; not in the paper); only when visual.proj is trainable.")


class LossConfig(_Section):
    name: Literal[BASE_LOSSES] = Field("ce", description="Base loss: cross-entropy, focal, focal with FLSD-53 gamma, FLYP contrastive, or CaRot.")  # type: ignore[valid-type]
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing epsilon (ce, flyp, carot).")
    focal_gamma: float = Field(3.0, ge=0, description="Focal loss gamma.")
    penalty: Literal[PENALTIES] = Field("none", description="Auxiliary calibration penalty added to the base loss.")  # type: ignore[valid-type]
    mbls_margin: float = Field(10.0, ge=0, description="MbLS margin m.")
    mbls_weight: float = Field(0.1, ge=0, description="MbLS lambda.")
    dca_weight: float = Field(1.0, ge=0, description="DCA beta.")
    mdca_weight: float = Field(1.0, ge=0, description="MDCA beta.")
    mmce_weight: float = Field(2.0, ge=0, description="MMCE lambda.")
    mmce_form: Literal[MMCE_FORMS] = Field("paper", description="MMCE as the paper writes it, sqrt(MMCE^2 + 1e-10), or as the widely used reference code returns it, MMCE^2 (published weights of one do not carry over to the other).")  # type: ignore[valid-type]
    captions: Literal[CAPTIONS] = Field("class", description="Contrastive losses: pair each image with its class prompt (class), or, as FLYP / CaRot do on ImageNet, with a caption from one of the 80 OpenAI ImageNet templates drawn per example (openai-imagenet).")  # type: ignore[valid-type]
    carot: CarotConfig = Field(default_factory=CarotConfig)


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Local optimizer (re-created every round).")
    lr: float = Field(1e-3, gt=0, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (coupled L2 for sgd/adam, decoupled for adamw).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam/AdamW beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam/AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam/AdamW epsilon.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="Learning-rate schedule over all local steps of all rounds.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (with the cosine schedule).")
    local_epochs: int = Field(1, ge=1, description="Local epochs per round (ignored when local_steps > 0).")
    local_steps: int = Field(0, ge=0, description="Local optimizer steps per round; 0 = use local_epochs.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(128, ge=1, description="Evaluation batch size.")
    grad_clip: float = Field(0.0, ge=0, description="Gradient-norm clipping; 0 = off.")
    seed: int = Field(0, ge=0, description="Training seed (combined with round and partition id).")
    num_threads: int = Field(0, ge=0, description="torch CPU threads per client process; 0 = torch default.")


class DataConfig(_Section):
    dataset: str = Field("pacs", description="pacs, office-home, vlcs (data.path), cifar10, cifar100, food101, dtd, caltech101, flowers102, oxford-pets, imagenet (hub, or data.path with wnid folders and OOD domains), imagefolder (data.path), or demo-digits (offline demo: handwritten vs typeset digits from installed packages). See README 'Data'.")
    path: str = Field("", description="Local image folder laid out <domain>/<class>/<img> or <class>/<img>; ~ and $VARS are expanded; empty = the hub dataset. A node's node_config 'data-dir' overrides it.")
    hub_id: str = Field("", description="Hub dataset id overriding the registry's (e.g. flwrlabs/pacs).")
    partitioner: Literal["domain", "domain-dirichlet", "dirichlet", "iid", "pathological", "class-disjoint"] = Field("domain-dirichlet", description="How examples are split across clients (see README 'Data').")
    clients_per_domain: int = Field(2, ge=1, description="Clients per domain for domain-dirichlet.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for label skew.")
    classes_per_client: int = Field(2, ge=1, description="Classes per client for the pathological partitioner.")
    classes: Literal["all", "base", "novel"] = Field("all", description="Class subset: base = first half of the sorted class names, novel = second half.")
    test_split: Literal["auto", "carve"] = Field("auto", description="auto = each seen client tests on its slice of the hub's official test split where the dataset has one (following its class proportions); carve = carve train/val/test from the training split.")
    shots: int = Field(0, ge=0, description="Few-shot: keep k seeded examples per class of the training pool before partitioning (FL²oRA base-to-new: 2 in the official script); 0 = all.")
    project_heldout: bool = Field(False, description="Held-out clients predict only among the classes their domain contains (CaRot's class-subset projection for ImageNet-R / -A).")
    id_eval_domains: str = Field("", description="Comma list of held-out domains that are in-distribution evaluation sets (e.g. imagenet-val); the others count as distribution shifts in the CaRot table.")
    heldout_domains: str = Field("", description="Comma list of domains whose clients never train and are evaluated every round (unseen).")
    train_fraction: float = Field(0.6, gt=0, le=1, description="Per-client train fraction of its partition.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Per-client validation fraction.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Per-client test fraction.")
    max_per_client: int = Field(0, ge=0, description="Cap on a client's examples (after partitioning, seeded); 0 = no cap.")
    seed: int = Field(2023, ge=0, description="Partition and split seed: the same seed gives the same partitions on every machine.")
    augment: Literal["auto", "rrc-flip", "none"] = Field("auto", description="Train augmentation: auto = none for adapter/linear/zeroshot (FedCLIP), random-resized-crop + flip otherwise.")
    cache_dir: str = Field("~/.cache/fedcal", description="Per-node cache for frozen image features and large client state.")
    feature_cache: bool = Field(True, description="Cache frozen image embeddings for methods whose image tower is frozen.")
    partition_cache: bool = Field(True, description="Cache each node's partition rows under data.cache_dir/partitions (keyed by the data fingerprint, the partition settings and flwr_datasets' version), so a cold client start skips repartitioning.")
    num_workers: int = Field(-1, ge=-1, description="DataLoader workers decoding images; -1 = auto: 0 on a CPU device, min(8, CPUs/2) when training on a GPU (there the input pipeline, not the step, bounds LoRA training).")

    def loader_workers(self, device_type: str) -> int:
        if self.num_workers >= 0:
            return self.num_workers
        return 0 if device_type == "cpu" else max(0, min(8, (os.cpu_count() or 2) // 2))

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"data.train_fraction + data.val_fraction + data.test_fraction must be 1 (got {total:g})"
            )
        return self

    def heldout(self) -> list[str]:
        return [d.strip() for d in self.heldout_domains.split(",") if d.strip()]




class FLConfig(_Section):
    rounds: int = Field(50, ge=1, description="Server rounds.")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Fraction of seen clients sampled for training each round.")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="Fraction of seen clients evaluated each round (held-out clients are always evaluated).")
    min_train_nodes: int = Field(2, ge=1, description="Minimum valid training replies for a round to aggregate.")
    min_evaluate_nodes: int = Field(1, ge=0, description="Minimum clients evaluated each round.")
    min_available_nodes: int = Field(2, ge=1, description="Nodes that must be connected before round 1 starts.")
    aggregator: Literal[AGGREGATORS] = Field("fedavg", description="Server aggregation (see README 'Aggregators').")  # type: ignore[valid-type]
    weighting: Literal["examples", "uniform"] = Field("examples", description="Client weights: by number of training examples or uniform (FedCLIP).")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx mu (client term (mu/2)||w - w_global||^2).")
    feddyn_alpha: float = Field(0.01, gt=0, description="FedDyn alpha.")
    server_lr: float = Field(1.0, gt=0, description="Server learning rate (fedavgm, fednova).")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="Server momentum (fedavgm).")
    eta: float = Field(0.01, gt=0, description="Server learning rate of fedadam/fedyogi/fedadagrad.")
    eta_l: float = Field(0.0316, gt=0, description="Client learning rate as Flower's FedOpt records it (informational).")
    beta_1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi beta_1.")
    beta_2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi beta_2.")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity tau.")
    trim_beta: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg fraction cut at each end.")
    num_malicious: int = Field(0, ge=0, description="Krum: assumed number of malicious clients.")
    max_update_norm: float = Field(0.0, ge=0, description="Reject a reply whose update norm ||w_client - w_global|| exceeds this; 0 = no bound.")
    round_timeout: float = Field(3600.0, gt=0, description="Seconds to wait for the replies of one round.")
    node_wait_timeout: float = Field(600.0, gt=0, description="Seconds to wait for min_available_nodes before the run fails.")
    seed: int = Field(0, ge=0, description="Client sampling seed (combined with the round number).")
    evaluate_every: int = Field(1, ge=1, description="Federated evaluation every N rounds (the last round always).")
    poll_interval: float = Field(0.25, gt=0, le=60, description="Longest pause (s) between the ServerApp's polls for replies: it starts at 0.1 s and "
                                 "backs off to this (Flower's own send_and_receive pauses 3 s); a reply waits half of it on average.")
    schedule: Literal["one-phase", "two-phase"] = Field(
        "one-phase", description="one-phase: a training client evaluates the state it receives before it trains, so round t's evaluation travels in "
        "round t+1's single phase (plus one final evaluation phase); two-phase: a train phase and an evaluate phase per round. Same records.")


class EvalConfig(_Section):
    splits: str = Field("test", description="Comma list of client splits evaluated each round: val, test (held-out clients use all their data).")
    n_bins: int = Field(15, ge=2, le=100, description="ECE bins (a 10-bin ECE is recorded too).")
    temperature_scaling: Literal["none", "global", "per-client"] = Field("global", description="Federated temperature scaling after the last round.")
    ts_every_round: bool = Field(False, description="Also fit and report temperature scaling after every evaluated round.")
    ts_split: Literal["val", "train", "test"] = Field("val", description="Client split on which temperatures are fitted.")
    ts_grid_size: int = Field(61, ge=3, le=1001, description="Candidate temperatures (log-spaced 0.25..4) for global TS.")
    diagrams: bool = Field(True, description="Write reliability diagrams (PNG) after the last round.")

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: str) -> str:
        items = [s.strip() for s in v.split(",") if s.strip()]
        if not items or any(s not in ("val", "test", "train") for s in items):
            raise ValueError(f"must be a comma list of val, test, train (got {v!r})")
        return ",".join(items)

    def split_list(self) -> list[str]:
        return self.splits.split(",")


class OutputConfig(_Section):
    dir: str = Field("~/fedcal-runs", description="Directory holding one folder per run (~ and $VARS expanded).")
    run_name: str = Field("", description="Run folder name; empty = <method>-<aggregator>-<UTC timestamp>.")
    resume: str = Field("", description="Resume from a run folder or its checkpoint folder (the run continues in that folder).")
    keep_round_checkpoints: bool = Field(False, description="Keep one checkpoint per round besides 'latest'.")
    paper_last_k: int = Field(5, ge=1, description="Rounds averaged for the papers' last-rounds convention in summary.json / summary.md (FL²oRA prints the mean over the last 5).")
    verbose: bool = Field(False, description="Keep Flower's own per-round log lines (sampling, metric dumps) beside fedcal's one line per round (`fedcal run --verbose`).")


class RuntimeConfig(_Section):
    cache_size: int = Field(2, ge=0, description="Built client runtimes (CLIP, method, partition, feature cache) a process keeps across messages, keyed by the configuration: a simulation's Ray actors and the warm worker (`fedcal worker`) reuse them; 0 = rebuild for every message.")
    worker_timeout: float = Field(3600.0, gt=0, description="Seconds a ClientApp waits for its node's warm worker before the message fails (a hung or dead worker never hangs the ClientApp).")


class MonitoringConfig(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics from the ServerApp.")
    host: str = Field("127.0.0.1", description="Exporter bind address; the environment variable FEDCAL_MONITORING_HOST overrides it (the containers set 0.0.0.0).")
    port: int = Field(9464, ge=0, le=65535, description="Exporter port (0 = pick a free port and log it); FEDCAL_MONITORING_PORT overrides it.")
    linger: float = Field(0.0, ge=0, description="Seconds the exporter keeps serving the final values after the run ends.")
    pushgateway: str = Field("", description="Optional Pushgateway URL; the final values are pushed there when the run ends.")


FAULT_MODES = ("none", "nan", "shape", "extra-key", "huge", "crash", "weight", "negative-weight", "extra-metric", "missing-metric",
               "stale-round", "nan-metric", "forged-calibration", "other-bins", "negative-counts", "relabel", "negative-nll")


class FaultConfig(_Section):
    mode: Literal[FAULT_MODES] = Field("none", description="TEST ONLY: make some clients misbehave (client/faults.py lists what each mode forges).")
    partitions: str = Field("", description="TEST ONLY: comma list of partition ids that misbehave.")
    plan: str = Field("", description="TEST ONLY: per-partition modes 'pid:mode,pid:mode' (overrides fault.mode and fault.partitions).")
    huge_scale: float = Field(1e6, gt=0, description="TEST ONLY: factor of the 'huge' update.")
    stop_after_round: int = Field(0, ge=0, description="TEST ONLY: the ServerApp stops (as if killed) after checkpointing this round; 0 = never.")

    @field_validator("partitions")
    @classmethod
    def _partitions(cls, v: str) -> str:
        v = v.replace(" ", "")
        if v and not re.fullmatch(r"\d+(,\d+)*", v):
            raise ValueError("must be a comma list of partition ids like '0,2'")
        return v

    @field_validator("plan")
    @classmethod
    def _plan(cls, v: str) -> str:
        v = v.replace(" ", "")
        for item in filter(None, v.split(",")):
            pid, _, mode = item.partition(":")
            if not pid.isdigit() or mode not in FAULT_MODES:
                raise ValueError(f"must be 'pid:mode,...' with modes among {', '.join(FAULT_MODES[1:])}")
        return v

    def partition_ids(self) -> set[int]:
        return {int(p) for p in self.partitions.split(",") if p}

    def mode_for(self, partition_id: int) -> str:
        """This partition's fault mode ('none' for an honest client)."""
        if self.plan:
            plan = dict(item.split(":") for item in self.plan.split(",") if item)
            return plan.get(str(partition_id), "none")
        return self.mode if partition_id in self.partition_ids() else "none"


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    fl: FLConfig = Field(default_factory=FLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="after")
    def _captions(self) -> RunConfig:
        if self.loss.captions != "class":
            if self.loss.name not in CONTRASTIVE_LOSSES:
                raise ValueError(f"loss.captions={self.loss.captions!r} needs a contrastive loss (loss.name = flyp or carot)")
            if self.method.name in PROMPT_METHODS:
                raise ValueError(f"loss.captions={self.loss.captions!r} does not apply to method.name={self.method.name!r}, whose text comes from learned prompts")
        return self

    def flat(self) -> dict[str, Any]:
        """The flattened form Flower uses (``{"method.lora.rank": 2, ...}``)."""
        return flatten(self.model_dump())


# --------------------------------------------------------------------------------------------
# Node configuration
# --------------------------------------------------------------------------------------------
class NodeConfig(BaseModel):
    """What one SuperNode contributes: which partition it holds and where its data lives."""

    model_config = ConfigDict(extra="forbid")
    partition_id: int = Field(..., ge=0, alias="partition-id")
    num_partitions: int = Field(..., ge=1, alias="num-partitions")
    data_dir: str = Field("", alias="data-dir")
    role: Literal["auto", "seen", "unseen"] = "auto"
    device: str = ""
    cache_dir: str = Field("", alias="cache-dir")
    worker_socket: str = Field("", alias="worker-socket")

    @model_validator(mode="after")
    def _range(self) -> NodeConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"partition-id {self.partition_id} must be smaller than num-partitions {self.num_partitions}"
            )
        return self


NODE_KEYS = ("partition-id", "num-partitions", "data-dir", "role", "device", "cache-dir", "worker-socket")


def parse_node_config(node_config: dict[str, Any]) -> NodeConfig:
    """Validate a SuperNode's ``node_config``; errors are one line naming the key."""
    node_config = dict(node_config)
    for key in node_config:
        if key not in NODE_KEYS:
            raise ConfigError(f"unknown node-config key {key!r}{_did_you_mean(key, NODE_KEYS)}; valid keys: {', '.join(NODE_KEYS)}")
    for key in ("partition-id", "num-partitions"):
        if key not in node_config:
            raise ConfigError(
                f"node config has no {key!r}: start the SuperNode with "
                "--node-config 'partition-id=<i> num-partitions=<n>' (simulation sets both)"
            )
    try:
        return NodeConfig.model_validate(node_config)
    except ValidationError as err:
        raise ConfigError("node config: " + _first_error(err, node=True)) from None


# --------------------------------------------------------------------------------------------
# Flattening and parsing
# --------------------------------------------------------------------------------------------
def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {key!r} conflicts with {'.'.join(parts[: i + 1])!r}, which is a value, not a section")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.{next(iter(node[parts[-1]]))}")
        node[parts[-1]] = value
    return nested


def valid_keys() -> list[str]:
    return list(RunConfig().flat().keys())


def _did_you_mean(key: str, options: Any) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _first_error(err: ValidationError, node: bool = False) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"]
    msg = msg.removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        options = NODE_KEYS if node else valid_keys()
        return f"unknown config key {loc!r}{_did_you_mean(loc, options)}"
    if not loc:
        return msg
    got = e.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    if e["type"] == "literal_error" and isinstance(got, str):
        choices = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
        shown += _did_you_mean(got, choices)
    if msg.startswith(loc):
        return f"{msg}{shown}"
    field_msg = re.match(r"^([a-z_0-9]+): (.*)$", msg)
    if field_msg and isinstance(got, dict):  # a section-level check that names its field
        return f"{loc}.{field_msg.group(1)}: {field_msg.group(2)}"
    return f"{loc}: {msg}{shown}"


def from_flat(flat: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from flattened keys layered over the defaults."""
    known = set(valid_keys())
    for key in flat:
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, known)}; `fedcal config` lists all keys")
    try:
        return RunConfig.model_validate(unflatten(dict(flat)))
    except ValidationError as err:
        raise ConfigError("config error: " + _first_error(err)) from None


def from_flower(run_config: dict[str, Any]) -> RunConfig:
    """Parse Flower's ``context.run_config`` (already fused with pyproject defaults)."""
    return from_flat(dict(run_config))


def parse_overrides(spec: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Parse what ``flwr run --run-config`` takes: a TOML file path or 'k=v k2="s"' pairs.

    Uses Flower's own parser so that fedcal's CLI and ``flwr run`` agree exactly.
    """
    if spec is None or str(spec).strip() == "":
        return {}
    from flwr.common.config import parse_config_args

    spec = str(spec)
    if spec.endswith(".toml"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {spec!r} not found; pass an existing .toml preset (see configs/)")
        try:
            return parse_config_args([str(path)])
        except Exception as err:  # tomli errors carry line numbers
            raise ConfigError(f"config file {spec!r} is not valid TOML: {err}") from None
    try:
        return parse_config_args([spec])
    except Exception as err:
        raise ConfigError(f"cannot parse --run-config {spec!r}: {getattr(err, 'message', err)}") from None


def load(spec: str | os.PathLike[str] | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then a ``--run-config`` spec, then keyword overrides (``data__path=...``)."""
    flat = parse_overrides(spec)
    flat.update({k.replace("__", "."): v for k, v in overrides.items()})
    return from_flat(flat)


def expand_path(value: str, key: str) -> Path:
    """Expand ``~`` and ``$VARS`` in a configured path; an unset variable is a one-line error."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", expanded)
    if unset:
        raise ConfigError(f"{key} {value!r} uses the unset environment variable {unset[0]}; export it or set {key} to a path")
    return Path(expanded)


# --------------------------------------------------------------------------------------------
# Documentation helpers
# --------------------------------------------------------------------------------------------
def _iter_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _iter_fields(ann, full)
        else:
            yield full, field


def reference_markdown() -> str:
    """The configuration reference table (README.md embeds it verbatim)."""
    defaults = RunConfig().flat()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, field in _iter_fields(RunConfig):
        default = defaults[key]
        ann = field.annotation
        choices = getattr(ann, "__args__", None)
        meaning = field.description or ""
        if choices and all(isinstance(c, str) for c in choices):
            meaning += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
        rows.append(f"| `{key}` | `{_toml_value(default)}` | {meaning} |")
    return "\n".join(rows)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def to_toml(flat: dict[str, Any]) -> str:
    """Flattened keys as a TOML document with quoted dotted keys (what ``flwr run`` reads back)."""
    return "\n".join(f'"{k}" = {_toml_value(v)}' for k, v in flat.items()) + "\n"


def defaults_toml(root: str = "tool.flwr.app.config") -> str:
    """Every key with its default as TOML tables under ``root`` (pyproject.toml embeds it)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], name: str) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict))
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append("")
                emit(v, f"{name}.{k}")

    emit(RunConfig().model_dump(), root)
    return "\n".join(lines)
