"""Loading CLIP through open_clip, and the zero-shot text classifier.

``load_clip`` returns the model, its train and eval preprocessing and its tokenizer. ``pretrained``
is an open_clip tag (downloaded from the hub once, then read from the cache), a local checkpoint
file, or empty for random initialisation (tests, smoke runs). Offline, a tag that is not cached
fails at once with one line saying what to do (see :mod:`common.hub`).

Two tiny architectures are registered for tests and the offline smoke preset:
``fedcal-tiny`` (ViT 2x64 on 32 px, text 2x64) and ``fedcal-small`` (ViT 4x128 on 64 px,
text 4x128); their JSON lives in ``common/model_configs``.
"""

from __future__ import annotations

import difflib
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import ConfigError
from .hub import HubUnavailable, endpoint, offline_mode, offline_requested, reachable

_CONFIG_DIR = Path(__file__).parent / "model_configs"

log = logging.getLogger(__name__)


def open_clip_lib():
    """open_clip, imported on first use (with torchvision it costs ~3 s: a client that runs on
    cached features never pays it) and with fedcal's tiny architectures registered."""
    import open_clip

    if str(_CONFIG_DIR) not in [str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(_CONFIG_DIR)
    return open_clip


class LoadedClip(NamedTuple):
    model: torch.nn.Module
    preprocess_train: Any
    preprocess_eval: Any
    tokenizer: Any


def resolve_device(spec: str = "auto") -> torch.device:
    if spec in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {spec!r} but no CUDA GPU is visible; use model.device=\"cpu\" or \"auto\"")
    return device


def autocast(precision: str, device: torch.device):
    """Autocast context for the configured precision (bf16 on CUDA under 'auto'; fp32 on CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def _no_root_basicconfig():
    """open_clip logs through the root logger (``logging.warning``), which installs a root handler
    when there is none and then duplicates every record of the host process (Flower's logs)."""
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard:
            root.removeHandler(guard)


@contextmanager
def skip_random_init():
    """Build without drawing a random initialisation: ``torch.nn.init``'s in-place initialisers
    leave their tensor as it is. Only for a model whose every parameter is then loaded from a
    checkpoint (open_clip loads full checkpoints with ``strict=True``); buffers are computed as
    usual. Saves most of the build time (ViT-B-16 on a CPU: ~2.4 s -> ~0.2 s)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def weights_identity(pretrained: str | None) -> str:
    """A string that changes whenever the weights ``pretrained`` refers to change (cache keys)."""
    if not pretrained:
        return "random-init"
    path = Path(os.path.expanduser(os.path.expandvars(pretrained)))
    if path.is_file():
        st = path.stat()
        return f"file:{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"tag:{pretrained}"


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _weights_cached(cfg: dict, cache_dir: str | None) -> bool:
    """Whether open_clip's download of this pretrained config would be served from the cache."""
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[: -len(".bin")] + ".safetensors")
        candidates.append("open_clip_model.safetensors")
        for name in candidates:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(hit, str) and Path(hit).is_file():
                return True
        return False
    url = cfg.get("url", "")
    if url:
        root = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        return (root / os.path.basename(url)).is_file()
    return False


def check_weights(name: str, pretrained: str | None, cache_dir: str | None = None, offline: bool = False) -> None:
    """Raise ConfigError / HubUnavailable (one line) now if the weights could not be loaded."""
    _resolve_pretrained(name, pretrained, cache_dir, offline)


def _resolve_pretrained(name: str, pretrained: str | None, cache_dir: str | None, offline: bool) -> tuple[str | None, bool]:
    """Return (what to pass to open_clip, whether to force cache-only hub access)."""
    if not pretrained:
        return None, False
    expanded = os.path.expanduser(os.path.expandvars(pretrained))
    if Path(expanded).is_file():
        return expanded, False
    if _looks_like_path(pretrained):
        raise ConfigError(f"model.pretrained checkpoint file {pretrained!r} does not exist; pass an existing file, an open_clip tag, or empty for random init")
    tags = open_clip_lib().list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        hint = f"valid tags for {name}: {', '.join(tags)}" if tags else f"{name} has no pretrained tags; use a checkpoint file or empty"
        raise ConfigError(f"model.pretrained {pretrained!r} is not a known tag for {name} ({hint})")
    cfg = open_clip_lib().get_pretrained_cfg(name, pretrained)
    if _weights_cached(cfg, cache_dir):
        return pretrained, True
    where = cfg.get("hf_hub") or cfg.get("url") or "the hub"
    fix = (
        f"pass model.pretrained=/path/to/checkpoint, or pre-fill the cache on a machine with network "
        f"(`fedcal fetch-weights --model {name} --pretrained {pretrained}`) and copy it here"
        + (f" (model.cache_dir={cache_dir})" if cache_dir else " (~/.cache/huggingface)")
    )
    if offline_requested(offline):
        raise HubUnavailable(f"CLIP weights {name}/{pretrained} ({where}) are not in the local cache and offline mode is on: {fix}")
    if not reachable():
        raise HubUnavailable(f"cannot download CLIP weights {name}/{pretrained} ({where}): {endpoint()} is unreachable; {fix}")
    return pretrained, False


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
    offline: bool = False,
    init_seed: int = 0,
) -> LoadedClip:
    """Create an open_clip CLIP with its train/eval transforms and tokenizer.

    The weights stay in fp32; ``precision`` is recorded on the model (``model.fedcal_precision``)
    and applied as autocast by the training and evaluation code (see :func:`autocast`). Without
    pretrained weights the random initialisation is drawn under ``torch.manual_seed(init_seed)``,
    so every process (server and clients) builds the same frozen CLIP; with them, none is drawn
    (:func:`skip_random_init`): the checkpoint overwrites every parameter anyway.
    """
    if name not in open_clip_lib().list_models():
        raise ConfigError(f"model.name {name!r} is not an open_clip architecture" + (
            f" (did you mean {difflib.get_close_matches(name, open_clip_lib().list_models(), n=1)[0]!r}?)"
            if difflib.get_close_matches(name, open_clip_lib().list_models(), n=1) else "; see open_clip.list_models()"))
    cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
    source, cache_only = _resolve_pretrained(name, pretrained, cache_dir, offline)
    device = resolve_device(str(device)) if isinstance(device, str) else device
    if source is None:
        log.info("building %s with random weights (model.pretrained is empty)", name)
    try:
        with offline_mode() if cache_only else nullcontext(), _no_root_basicconfig(), torch.random.fork_rng(devices=[]), \
                skip_random_init() if source is not None else nullcontext():
            torch.manual_seed(init_seed)
            model, preprocess_train, preprocess_eval = open_clip_lib().create_model_and_transforms(
                name, pretrained=source, precision="fp32", device=device, cache_dir=cache_dir
            )
    except (RuntimeError, FileNotFoundError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HubUnavailable(f"loading CLIP {name} with pretrained={pretrained!r} failed: {first}") from None
    model.eval()
    model.fedcal_precision = precision  # type: ignore[attr-defined]
    with _no_root_basicconfig():
        tokenizer = open_clip_lib().get_tokenizer(name)
    return LoadedClip(model, preprocess_train, preprocess_eval, tokenizer)


def templates_for(kind: str, single: str) -> list[str]:
    """Prompt templates: the single configured one, or an open_clip ImageNet ensemble."""
    if kind == "single":
        if "{}" not in single:
            raise ConfigError(f"method.template {single!r} has no '{{}}' placeholder for the class name")
        return [single]
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if kind == "openai-imagenet":
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if kind == "simple-imagenet":
        return [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    raise ConfigError(f"method.templates {kind!r} is not one of single, openai-imagenet, simple-imagenet")


def prompt_name(class_name: str) -> str:
    """A folder/label name as it reads in a prompt: 'Alarm_Clock' -> 'alarm clock'."""
    return class_name.replace("_", " ").replace("-", " ").strip().lower()


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, tokenizer: Any, class_names: list[str], templates: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised text features (K, D): each class averaged over the templates, via open_clip."""
    weights = open_clip_lib().build_zero_shot_classifier(
        model, tokenizer, [prompt_name(c) for c in class_names], templates, num_classes_per_batch=10, device=device, use_tqdm=False
    )
    return weights.T.contiguous()


def encode_text_features(model: torch.nn.Module, tokenizer: Any, class_names: list[str], templates: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The same features as :func:`zero_shot_classifier`, but differentiable (for trainable text towers)."""
    if isinstance(model, HeadlessClip):
        return model.class_text_features(class_names, templates)
    names = [prompt_name(c) for c in class_names]
    texts = tokenizer([t.format(c) for c in names for t in templates]).to(device)
    return class_features(model.encode_text(texts), len(names), len(templates))


def class_features(prompt_features: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """Per-class features from (K*T, D) prompt features, the way open_clip's classifier builds them:
    normalise each prompt, average over the templates of a class, normalise again."""
    feats = torch.nn.functional.normalize(prompt_features, dim=-1)
    feats = feats.reshape(n_classes, n_templates, -1).mean(dim=1)
    return feats / feats.norm(dim=-1, keepdim=True)


class TowersNotLoaded(RuntimeError):
    """A :class:`HeadlessClip` was asked for something only the real CLIP towers can compute."""


class HeadlessClip(torch.nn.Module):
    """What a method with frozen towers needs of CLIP once its image embeddings are cached: the
    class text features (stored per autocast state, as the real text tower produced them), the
    logit scale and the embedding width. Built from a frozen-text file (client/features.py), it
    lets adapter, linear and zero-shot clients train and evaluate without loading CLIP's weights;
    its towers raise :class:`TowersNotLoaded`."""

    def __init__(self, *, logit_scale: torch.Tensor, text: dict[str, torch.Tensor], class_names: list[str], templates: list[str],
                 output_dim: int, total_params: int, precision: str, device: torch.device):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(logit_scale.to(device, torch.float32).clone(), requires_grad=False)
        self.visual = torch.nn.Module()
        self.visual.output_dim = int(output_dim)
        self.text = {k: v.to(device) for k, v in text.items()}
        self.identity = (list(class_names), list(templates))
        self.frozen_total_params = int(total_params)
        self.fedcal_precision = precision

    def class_text_features(self, class_names: list[str], templates: list[str]) -> torch.Tensor:
        if (list(class_names), list(templates)) != self.identity:
            raise TowersNotLoaded("the stored text features are for other class names or templates; the text tower is not loaded")
        device_type = self.logit_scale.device.type
        if "autocast" in self.text and torch.is_autocast_enabled(device_type):
            return self.text["autocast"]
        return self.text["plain"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise TowersNotLoaded("the image tower is not loaded: this client's image embeddings were expected in the feature cache")

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise TowersNotLoaded("the text tower is not loaded: only the stored class text features are available")


class TransformRef:
    """Stands in for CLIP's eval transform where only its identity (its repr, part of the feature
    cache key) is needed; applying it raises :class:`TowersNotLoaded`."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __call__(self, image: Any) -> torch.Tensor:
        raise TowersNotLoaded("CLIP's preprocessing is not loaded: this client's image embeddings were expected in the feature cache")


def no_tokenizer(texts: Any) -> torch.Tensor:
    raise TowersNotLoaded("CLIP's tokenizer is not loaded: only the stored class text features are available")
