"""Local training and evaluation on the tiny CLIP and real pacs-mini images."""

from __future__ import annotations

import math

import pytest
import torch

from client.runtime import ClientRuntime
from client.train import (
    SplitInputs,
    evaluate_logits,
    fednova_normaliser,
    lr_factor,
    steps_per_round,
)
from common import config
from common.calibration import CalibrationStats

METHODS = ["lora", "adapter", "coop", "kgcoop", "maple", "layernorm", "bitfit", "linear", "full"]
LOSSES = ["ce", "focal", "flsd53", "flyp", "carot"]


def runtime(pacs_dir, tmp_path, **overrides):
    base = dict(
        model__name="fedcal-tiny", model__pretrained="", data__path=str(pacs_dir), data__partitioner="iid",
        data__max_per_client=48, data__cache_dir=str(tmp_path / "cache"), optim__name="adam", optim__lr=1e-2,
        optim__local_steps=2, optim__batch_size=16, method__prompt__n_ctx=4, method__maple__depth=2,
    )
    base.update(overrides)
    cfg = config.load(None, **base)
    node = config.parse_node_config({"partition-id": 0, "num-partitions": 8})
    return ClientRuntime.create(cfg, node)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_every_loss(pacs_dir, tmp_path, name, loss):
    rt = runtime(pacs_dir, tmp_path, method__name=name, loss__name=loss, loss__label_smoothing=0.1 if loss in ("ce", "flyp", "carot") else 0.0,
                 loss__carot__teacher_every=1, optim__lr=1e-4 if name == "full" else 1e-2)
    start = rt.method.trainable_state()
    out = rt.train(start, server_round=1, fl_config={})
    assert out.metrics["local-steps"] == 2 and math.isfinite(out.metrics["train-loss"])
    assert any(not torch.equal(out.state[k], start[k]) for k in start)
    if loss == "carot":
        assert out.teacher is not None and out.carot_step == 2
        again = rt.train(out.state, server_round=2, fl_config={}, teacher=out.teacher, carot_step=out.carot_step)
        assert again.metrics["train-self-distillation"] > 0  # the teacher now differs from the student


@pytest.mark.parametrize("penalty", ["mbls", "dca", "mdca", "mmce"])
def test_calibration_penalties_compose(pacs_dir, tmp_path, penalty):
    rt = runtime(pacs_dir, tmp_path, method__name="lora", loss__penalty=penalty, loss__name="flyp" if penalty == "mmce" else "ce")
    out = rt.train(rt.method.trainable_state(), server_round=1, fl_config={"proximal-mu": 0.1})
    assert math.isfinite(out.metrics["train-loss"])
    assert out.metrics["train-loss"] == pytest.approx(
        out.metrics["train-base-loss"] + out.metrics["train-penalty"] + out.metrics["train-client-term"], rel=1e-5)


def test_objective_sums_its_weighted_terms_carot_official(pacs_dir, tmp_path):
    """CaRot as its official script runs it: full FT, lambda_SD 1.5, lambda_OC 0.2, 0.05 ||W_v W_t^T||_F."""
    from client.losses import cross_projection_loss, orthogonality_loss
    from client.objective import CarriedState, Objective

    rt = runtime(pacs_dir, tmp_path, method__name="full", loss__name="carot", loss__carot__sd_weight=1.5, loss__carot__cross_weight=0.05,
                 loss__carot__teacher_every=1, optim__lr=1e-4)
    params = dict(rt.method.trainable_named_parameters())
    teacher = {k: v + 0.01 for k, v in rt.method.trainable_state().items()}
    objective = Objective(rt.method, rt.cfg, rt.device, params, total_steps=4, global_state=None, fl_config={},
                          carried=CarriedState(teacher, 3, None))
    inputs = rt.inputs("train")
    x, y = next(inputs.batches(8))
    rt.method.train()
    out = objective(inputs, x, y)
    t = out.terms
    visual, text = rt.method.clip.visual.proj, rt.method.clip.text_projection
    assert t["orthogonality"].item() == pytest.approx(orthogonality_loss(visual.detach()).item(), rel=1e-6)
    assert t["cross"].item() == pytest.approx(cross_projection_loss(visual.detach(), text.detach()).item(), rel=1e-6) and t["cross"].item() > 0
    assert t["self-distillation"].item() > 0
    expected = t["base-loss"] + t["penalty"] + t["regularizer"] + 1.5 * t["self-distillation"] + 0.2 * t["orthogonality"] + 0.05 * t["cross"] + t["client-term"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # LoRA keeps visual.proj frozen: the projection terms are off, whatever their weights
    lora = runtime(pacs_dir, tmp_path, method__name="lora", loss__name="carot", loss__carot__cross_weight=0.05)
    off = Objective(lora.method, lora.cfg, lora.device, dict(lora.method.trainable_named_parameters()), total_steps=4,
                    global_state=None, fl_config={}, carried=CarriedState())
    assert off.weights["orthogonality"] == 0 and off.weights["cross"] == 0


def full_batch_loss(rt, inputs) -> float:
    """Cross-entropy over the whole training split (plus KgCoOp's term), in eval mode."""
    logits, labels = [], []
    with torch.no_grad():
        for x, y in inputs.batches(64):
            logits.append(rt.method.logits_from_embeddings(inputs.embed(x)))
            labels.append(y)
        loss = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(labels)).item()
        return loss + (rt.method.regularizer().item() if rt.method.name == "kgcoop" else 0.0)


def test_loss_goes_down_for_each_method(pacs_dir, tmp_path):
    """A short centralised run: full-batch training loss before vs after three rounds."""
    for name in METHODS:
        rt = runtime(pacs_dir, tmp_path, method__name=name, data__max_per_client=64, optim__local_steps=8,
                     optim__lr=3e-4 if name == "full" else 2e-2, data__augment="none")
        inputs = rt.inputs("train")
        state = rt.method.trainable_state()
        before = full_batch_loss(rt, inputs)
        for r in (1, 2, 3):
            state = rt.train(state, server_round=r, fl_config={}).state
        rt.method.load_trainable_state(state)
        after = full_batch_loss(rt, inputs)
        assert after < before - 1e-3, f"{name}: loss {before:.4f} -> {after:.4f}"


def test_feature_cache_gives_identical_logits(pacs_dir, tmp_path):
    rt = runtime(pacs_dir, tmp_path, method__name="adapter")
    cached = rt.inputs("test")
    assert cached.precomputed and not cached.cache_hit
    again = rt.inputs("test")
    assert again.cache_hit
    uncached = SplitInputs(rt.method, rt.cfg, rt.data, "test", rt.clip.preprocess_eval, rt.device, cacheable=False)
    assert not uncached.precomputed
    torch.manual_seed(0)
    rt.method.load_trainable_state({k: torch.randn_like(v) for k, v in rt.method.trainable_state().items()})
    with torch.no_grad():
        a = torch.cat([rt.method.logits_from_embeddings(again.embed(x)) for x, _ in again.batches(16)])
        b = torch.cat([rt.method.logits_from_embeddings(uncached.embed(x)) for x, _ in uncached.batches(16)])
    assert torch.equal(a, b)
    # a damaged cache file is recomputed, not trusted
    for f in (tmp_path / "cache" / "features").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    assert not rt.inputs("test").cache_hit


def test_augmenting_methods_do_not_use_the_cache_for_training(pacs_dir, tmp_path):
    lora = runtime(pacs_dir, tmp_path, method__name="lora")
    assert lora.augment() and not lora.inputs("train", train=True).precomputed
    coop = runtime(pacs_dir, tmp_path, method__name="coop")
    assert coop.augment() and not coop.inputs("train", train=True).precomputed and coop.inputs("test").precomputed
    adapter = runtime(pacs_dir, tmp_path, method__name="adapter")
    assert not adapter.augment() and adapter.inputs("train", train=True).precomputed


def test_training_is_seeded(pacs_dir, tmp_path):
    a = runtime(pacs_dir, tmp_path, method__name="lora")
    b = runtime(pacs_dir, tmp_path, method__name="lora")
    s0 = a.method.trainable_state()
    out_a = a.train(s0, server_round=3, fl_config={})
    out_b = b.train(s0, server_round=3, fl_config={})
    assert all(torch.equal(out_a.state[k], out_b.state[k]) for k in s0)
    out_c = b.train(s0, server_round=4, fl_config={})
    assert any(not torch.equal(out_a.state[k], out_c.state[k]) for k in s0)


def test_feddyn_state_update(pacs_dir, tmp_path):
    rt = runtime(pacs_dir, tmp_path, method__name="adapter")
    g0 = rt.method.trainable_state()
    out = rt.train(g0, server_round=1, fl_config={"feddyn-alpha": 0.5})
    assert out.feddyn_grad is not None
    for k in g0:  # g <- 0 - alpha (w - w_global)
        assert torch.allclose(out.feddyn_grad[k], -0.5 * (out.state[k] - g0[k]), atol=1e-6)


def test_schedule_and_fednova_normaliser():
    cfg = config.load(None, optim__schedule="cosine", optim__warmup_steps=2)
    assert [round(lr_factor(s, 10, cfg), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(5, 10, config.load(None)) == 1.0
    assert steps_per_round(100, config.load(None, optim__local_epochs=2, optim__batch_size=32)) == 8
    plain = config.load(None, optim__momentum=0.0)
    assert fednova_normaliser(7, plain) == 7.0
    rho = 0.9
    assert fednova_normaliser(7, config.load(None)) == pytest.approx((7 - rho * (1 - rho**7) / (1 - rho)) / (1 - rho))


def test_evaluation_returns_exact_stats(pacs_dir, tmp_path):
    rt = runtime(pacs_dir, tmp_path, method__name="linear")
    logits, labels = rt.logits("test")
    assert logits.shape == (rt.data.size("test"), 7)
    ev = rt.evaluate_split("test", temperature=2.0)
    assert ev.stats == CalibrationStats.from_logits(logits, labels, n_bins=15, temperature=2.0)
    assert ev.stats10.n_bins == 10 and ev.temperature == 2.0
    metrics = ev.metrics("test-")
    assert CalibrationStats.from_metrics(metrics, "test-") == ev.stats
    assert evaluate_logits("x", logits[:0], labels[:0], 15).stats.total == 0


def test_flyp_captions_pair_each_image_with_a_seeded_template_caption(pacs_dir, tmp_path):
    """FLYP/CaRot on ImageNet: each image's text is one of the 80 OpenAI templates with its class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from client.losses import clip_contrastive_loss
    from client.objective import CarriedState, Objective

    rt = runtime(pacs_dir, tmp_path, method__name="lora", loss__name="flyp", loss__captions="openai-imagenet")
    params = dict(rt.method.trainable_named_parameters())
    objective = Objective(rt.method, rt.cfg, rt.device, params, total_steps=2, global_state=None, fl_config={}, carried=CarriedState(), seed=11)
    inputs = rt.inputs("train")
    x, y = next(inputs.batches(6))
    rt.method.eval()  # no LoRA dropout: the reference below recomputes the same forward
    with torch.no_grad():
        out = objective(inputs, x, y)
        ids = torch.randint(80, (len(y),), generator=torch.Generator().manual_seed(11))
        texts = [OPENAI_IMAGENET_TEMPLATES[int(t)](rt.method.class_names[int(k)].replace("_", " ").lower()) for k, t in zip(y, ids, strict=True)]
        txt = rt.method.clip.encode_text(rt.method.tokenizer(texts))
        txt = txt / txt.norm(dim=-1, keepdim=True)
        img = rt.method.image_features(inputs.embed(x))
        expected = clip_contrastive_loss(img, txt, rt.method.logit_scale())
    assert out.terms["base-loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(config.ConfigError, match="learned prompts"):
        config.load(None, method__name="coop", loss__name="flyp", loss__captions="openai-imagenet")
    with pytest.raises(config.ConfigError, match="contrastive"):
        config.load(None, loss__captions="openai-imagenet")


@pytest.mark.parametrize("name, extra", [("adapter", {"loss__name": "carot", "loss__carot__teacher_every": 1}), ("linear", {"method__wise_alpha": 0.5}),
                                         ("zeroshot", {"method__templates": "simple-imagenet"})])
def test_frozen_tower_methods_run_without_clip_once_cached(pacs_dir, tmp_path, monkeypatch, name, extra):
    """adapter, linear and zero-shot clients whose splits are all in the feature cache build their
    method on the stored text features and logit scale (a HeadlessClip): CLIP is not loaded, and
    logits, local training and the CaRot teacher give bit-identical results to the run with CLIP."""
    import client.runtime as runtime_mod
    from common.model import HeadlessClip, TowersNotLoaded

    with_clip = runtime(pacs_dir, tmp_path, method__name=name, **extra)
    assert not isinstance(with_clip.method.clip, HeadlessClip)
    assert len(list((tmp_path / "cache" / "features").glob("text-*.safetensors"))) == 1
    splits = [s for s in ("train", "val", "test") if with_clip.data.size(s)]
    reference = {s: with_clip.logits(s) for s in splits}  # fills the image-embedding cache of every split
    trained = name != "zeroshot"
    if trained:
        start = with_clip.method.trainable_state()
        ref_out = with_clip.train(start, server_round=2, fl_config={})
        ref_again = with_clip.train(ref_out.state, server_round=3, fl_config={}, teacher=ref_out.teacher, carot_step=ref_out.carot_step)

    def no_clip(*_a, **_k):
        raise AssertionError("CLIP loaded although the features are cached")

    monkeypatch.setattr(runtime_mod, "load_clip", no_clip)
    headless = runtime(pacs_dir, tmp_path, method__name=name, **extra)
    assert isinstance(headless.method.clip, HeadlessClip)
    if trained:
        headless.method.load_trainable_state(start)
        assert headless.method.sizes() == with_clip.method.sizes()  # the frozen CLIP's parameter count is stored too
    for s in splits:
        logits, labels = headless.logits(s)
        assert torch.equal(logits, reference[s][0]) and torch.equal(labels, reference[s][1])
    if trained:
        out = headless.train(start, server_round=2, fl_config={})
        again = headless.train(out.state, server_round=3, fl_config={}, teacher=out.teacher, carot_step=out.carot_step)
        for a, b in ((out, ref_out), (again, ref_again)):
            assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
            assert {k: v for k, v in a.metrics.items() if k != "train-seconds"} == {k: v for k, v in b.metrics.items() if k != "train-seconds"}
    with pytest.raises(TowersNotLoaded, match="image tower is not loaded"):
        headless.method.image_embeddings(torch.zeros(1, 3, 32, 32))

    # a damaged text file: CLIP is loaded again and the file rewritten
    monkeypatch.undo()
    features = tmp_path / "cache" / "features"
    text_file = next(features.glob("text-*.safetensors"))
    text_file.write_bytes(b"garbage")
    assert not isinstance(runtime(pacs_dir, tmp_path, method__name=name, **extra).method.clip, HeadlessClip)
    assert isinstance(runtime(pacs_dir, tmp_path, method__name=name, **extra).method.clip, HeadlessClip)
    # a split missing from the cache: CLIP is loaded when that split is read, with the state the
    # method holds then, and the figures stay the same
    from client.features import cache_key, embeddings_path

    embeddings_path(tmp_path / "cache", cache_key(with_clip.cfg.model.name, with_clip.cfg.model.pretrained, with_clip.cfg.model.precision, with_clip.device,
                                        with_clip.data, "val", with_clip.clip.preprocess_eval)).unlink()
    lazy = runtime(pacs_dir, tmp_path, method__name=name, **extra)
    assert lazy.headless and "val" not in lazy.preloaded
    if trained:
        lazy.method.load_trainable_state(start)
    assert torch.equal(lazy.logits("test")[0], reference["test"][0]) and lazy.headless
    assert torch.equal(lazy.logits("val")[0], reference["val"][0]) and not lazy.headless


def test_methods_that_need_a_tower_always_load_clip(pacs_dir, tmp_path):
    """Augmented training, caption losses, trainable towers and a disabled feature cache keep CLIP."""
    from common.model import HeadlessClip

    cases = [dict(method__name="adapter", data__augment="rrc-flip"), dict(method__name="adapter", loss__name="flyp", loss__captions="openai-imagenet"),
             dict(method__name="coop"), dict(method__name="linear", data__feature_cache=False)]
    for case in cases:
        first = runtime(pacs_dir, tmp_path, **case)
        for s in ("train", "val", "test"):
            first.logits(s)
        assert not isinstance(runtime(pacs_dir, tmp_path, **case).method.clip, HeadlessClip), case
    assert not list((tmp_path / "cache" / "features").glob("text-*"))


def test_headless_preloads_only_the_splits_the_client_reads(pacs_dir, tmp_path):
    """With eval.splits = test and no temperature scaling a seen client reads train and test only:
    val is never loaded; with temperature scaling it reads eval.ts_split (val) too."""
    extra = dict(method__name="adapter", eval__splits="test", eval__temperature_scaling="none")
    first = runtime(pacs_dir, tmp_path, **extra)
    for split in ("train", "val", "test"):
        first.logits(split)
    assert sorted(runtime(pacs_dir, tmp_path, **extra).preloaded) == ["test", "train"]
    assert sorted(runtime(pacs_dir, tmp_path, **{**extra, "eval__temperature_scaling": "global"}).preloaded) == ["test", "train", "val"]


COLD_CLIENT = """
import pickle, sys
from client.handlers import PROCESS_RUNTIMES, handle
for req in pickle.load(open(sys.argv[1], "rb")):
    resp = handle(req)
    assert resp.error is None, resp.error
heavy = [m for m in ("open_clip", "peft", "torchvision", "timm", "transformers", "datasets", "flwr_datasets") if m in sys.modules]
print(heavy, [type(rt.method.clip).__name__ for rt in PROCESS_RUNTIMES.items.values()])
"""


def test_a_cold_client_on_cached_features_imports_no_clip_library(pacs_dir, tmp_path):
    """A fresh process answering an adapter evaluate + train message from warm caches (partition,
    image embeddings, text features) builds no CLIP and imports neither open_clip (with
    torchvision) nor peft nor the datasets libraries: only torch."""
    import pickle
    import subprocess
    import sys

    from client.handlers import manifest_of
    from client.relay import Request
    from common.tensors import pack_arrays

    rt = runtime(pacs_dir, tmp_path, method__name="adapter", eval__temperature_scaling="none")
    for split in ("train", "test"):
        rt.logits(split)  # fills the caches, as a first round with CLIP does
    node = {"partition-id": 0, "num-partitions": 8}
    arrays = pack_arrays(rt.method.trainable_state(), manifest_of(rt))
    flat = rt.cfg.flat()
    reqs = [Request("evaluate", flat, node, {"server-round": 1, "ts-mode": "none"}, arrays), Request("train", flat, node, {"server-round": 2}, arrays)]
    path = tmp_path / "reqs.pkl"
    path.write_bytes(pickle.dumps(reqs))
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", COLD_CLIENT, str(path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[] ['HeadlessClip']", res.stdout
