"""Trainable methods: invariants at initialisation, exact state handling, parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from common import config
from common.methods import METHODS, StateError, build_method
from common.methods.attention import SplitAttention, split_attention
from common.model import load_clip, zero_shot_classifier
from tests.conftest import CLASSES


def method(tiny_clip, name, seed=0, **overrides):
    cfg = config.load(None, model__name="fedcal-tiny", model__pretrained="", method__name=name, **overrides)
    return build_method(cfg, tiny_clip(seed=seed), CLASSES)


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_split_attention_matches_open_clip(tiny_clip, images):
    ref, split = tiny_clip(seed=3), tiny_clip(seed=3)
    assert split_attention(split.model) == 4  # 2 vision + 2 text blocks
    assert isinstance(split.model.visual.transformer.resblocks[0].attn, SplitAttention)
    tokens = ref.tokenizer(["a photo of a dog.", "a sketch of a house."])
    with torch.enable_grad():  # the general (non fast-path) MHA computation
        for a, b in ((ref.model.encode_image(images), split.model.encode_image(images)), (ref.model.encode_text(tokens), split.model.encode_text(tokens))):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # PyTorch's fused inference path differs only by float rounding
        assert torch.allclose(ref.model.encode_image(images), split.model.encode_image(images), atol=1e-5)


def test_zeroshot_logits_are_clip_logits(tiny_clip, images):
    zs = method(tiny_clip, "zeroshot")
    ref = tiny_clip()
    text = zero_shot_classifier(ref.model, ref.tokenizer, CLASSES, ["a photo of a {}."])
    with torch.no_grad():
        img = ref.model.encode_image(images)
        expected = ref.model.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ text.T
        assert torch.allclose(zs(images), expected, atol=1e-5)
    assert zs.num_trainable() == 0


@pytest.mark.parametrize("name", ["lora", "adapter", "linear", "full", "layernorm", "bitfit"])
def test_initialisation_is_exactly_zero_shot(tiny_clip, images, name):
    with torch.no_grad():
        zs = method(tiny_clip, "zeroshot")(images)
        other = method(tiny_clip, name)(images)
    if name == "adapter":  # a softmax-weighted feature: same direction, predictions identical
        assert torch.equal(other.argmax(1), zs.argmax(1))
        assert torch.allclose(other, zs, atol=1e-5)
    else:
        assert torch.equal(other, zs)


def test_adapter_with_fedclip_init_is_close_to_zero_shot(tiny_clip, images):
    ad = method(tiny_clip, "adapter", method__adapter_init="pytorch")
    assert ad.num_trainable() == 2 * (64 * 64 + 64)
    with torch.no_grad():
        assert not torch.equal(ad(images), method(tiny_clip, "zeroshot")(images))


def test_coop_from_a_photo_of_a_equals_handcrafted_prompt(tiny_clip, images):
    coop = method(tiny_clip, "coop", method__prompt__ctx_init="a photo of a")
    assert coop.n_ctx == 4 and coop.num_trainable() == 4 * 64
    with torch.no_grad():
        learned = coop.compute_text_features()
        assert torch.equal(learned, coop.handcrafted)
        assert torch.equal(coop(images), method(tiny_clip, "zeroshot")(images))
    random_ctx = method(tiny_clip, "coop")
    assert random_ctx.n_ctx == 16 and random_ctx.ctx.std().item() == pytest.approx(0.02, rel=0.3)


def test_kgcoop_regulariser_is_its_formula(tiny_clip):
    kg = method(tiny_clip, "kgcoop")
    with torch.no_grad():
        t = kg.compute_text_features()
        expected = 8.0 * ((t - kg.handcrafted) ** 2).sum(-1).mean()
        assert torch.allclose(kg.regularizer(), expected)
        assert kg.regularizer() > 0
    kg0 = method(tiny_clip, "kgcoop", method__prompt__ctx_init="a photo of a")
    assert kg0.regularizer().item() == pytest.approx(0.0, abs=1e-10)


def test_lora_layers_follow_peft_formula(tiny_clip):
    lora = method(tiny_clip, "lora")
    attn = lora.clip.visual.transformer.resblocks[1].attn
    layer = attn.k_proj
    assert set(layer.lora_A) == {"default"}
    r, alpha = 2, 1.0
    assert layer.scaling["default"] == pytest.approx(alpha / r**0.5)  # rsLoRA
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    lora.eval()
    x = torch.randn(5, 64)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        expected = base(x) + (alpha / r**0.5) * x @ A.T @ B.T
        assert torch.allclose(layer(x), expected, atol=1e-6)
        with lora.wise(0.5):
            assert torch.allclose(layer(x), base(x) + 0.5 * (alpha / r**0.5) * x @ A.T @ B.T, atol=1e-6)
        with lora.wise(0.0):
            assert torch.allclose(layer(x), base(x), atol=1e-7)
        assert torch.allclose(layer(x), expected, atol=1e-6)  # restored


def test_lora_options_select_the_right_layers(tiny_clip):
    vision_q = method(tiny_clip, "lora", method__lora__encoder="vision", method__lora__targets="q,out,mlp", method__lora__layers="1-1", method__lora__rslora=False)
    names = [n for n, _ in vision_q.trainable_named_parameters()]
    assert all(n.startswith("clip.visual.transformer.resblocks.1.") for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "out_proj", "c_fc", "c_proj"}
    assert vision_q.image_tower_frozen is False and vision_q.text_tower_trainable is False
    layer = vision_q.clip.visual.transformer.resblocks[1].attn.q_proj
    assert layer.scaling["default"] == pytest.approx(1.0 / 2)  # alpha / r without rsLoRA
    with pytest.raises(config.ConfigError, match="has 2 blocks"):
        method(tiny_clip, "lora", method__lora__layers="0-5")


def test_trainable_state_is_exact_and_strict(tiny_clip):
    for name in ("lora", "adapter", "coop", "kgcoop", "linear", "full"):
        m = method(tiny_clip, name)
        state = m.trainable_state()
        assert state and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
        assert set(state) == {n for n, p in m.named_parameters() if p.requires_grad}
        assert sum(v.numel() for v in state.values()) == m.num_trainable()
        shifted = {k: v + 0.01 for k, v in state.items()}
        m.load_trainable_state(shifted)
        assert all(torch.equal(m.trainable_state()[k], shifted[k]) for k in state)
        key = next(iter(state))
        with pytest.raises(StateError, match="missing key"):
            m.load_trainable_state({k: v for k, v in state.items() if k != key})
        with pytest.raises(StateError, match="unexpected key 'bogus'"):
            m.load_trainable_state({**state, "bogus": torch.zeros(1)})
        with pytest.raises(StateError, match="has shape"):
            m.load_trainable_state({**state, key: torch.zeros(3, 3, 3)})


def test_same_seed_same_initial_state(tiny_clip):
    a = method(tiny_clip, "lora", seed=0).trainable_state()
    b = method(tiny_clip, "lora", seed=0).trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["adapter", "linear", "coop"])
def test_wise_zero_is_zero_shot(tiny_clip, images, name):
    m = method(tiny_clip, name, method__prompt__ctx_init="a photo of a")
    torch.manual_seed(5)
    m.load_trainable_state({k: v + 0.3 * torch.randn_like(v) for k, v in m.trainable_state().items()})
    with torch.no_grad():
        tuned = m(images)
        zs = method(tiny_clip, "zeroshot")(images)
        with m.wise(0.0):
            wise0 = m(images)
        with m.wise(1.0):
            assert torch.equal(m(images), tuned)
    assert not torch.allclose(tuned, zs, atol=1e-3)
    if name == "adapter":
        assert torch.allclose(wise0, zs, atol=1e-5)
    else:
        assert torch.allclose(wise0, zs, atol=1e-6)


def test_full_wise_interpolates_weights(tiny_clip, images):
    m = method(tiny_clip, "full", method__wise_alpha=0.5)
    zs = {k: v.clone() for k, v in m.trainable_state().items()}
    m.load_trainable_state({k: v * 1.01 for k, v in zs.items()})
    with m.wise(0.5):
        mid = m.trainable_state()
    assert all(torch.allclose(mid[k], zs[k] * 1.005, atol=1e-6) for k in zs)


MAPLE_B16 = 2 * 512 + 8 * 2 * 512 + 9 * (512 * 768 + 768)  # ctx + deeper text prompts + 9 couplings (official: 3.55M)
LAYERNORM_B16 = 2 * (768 * (2 * 12 + 2) + 512 * (2 * 12 + 1))  # gain + bias of ln_1/ln_2 per block, ln_pre/ln_post, ln_final
BITFIT_B16 = (12 * (7 * 768 + 4 * 768) + 2 * 768) + (12 * (7 * 512 + 4 * 512) + 512)  # per block: ln_1, q, k, v, out, ln_2, c_proj + c_fc (4x)


@pytest.mark.parametrize("arch, name, expected", [("ViT-B-16", "lora", 184_320), ("ViT-B-32", "adapter", 525_312),
                                                  ("ViT-B-16", "maple", MAPLE_B16), ("ViT-B-16", "layernorm", LAYERNORM_B16),
                                                  ("ViT-B-16", "bitfit", BITFIT_B16)])
def test_parameter_counts_of_real_architectures(arch, name, expected):
    cfg = config.load(None, model__name=arch, model__pretrained="", method__name=name)
    m = build_method(cfg, load_clip(arch, None), CLASSES)
    assert m.num_trainable() == expected
    if name == "adapter":
        assert expected == 2 * (512**2 + 512)


def test_describe_json(monkeypatch):
    from deploy.cli import app

    result = CliRunner().invoke(app, ["describe", "--random-init", "--json", "-c", 'model.name="ViT-B-32" method.name="adapter"'])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert {"model", "method", "trainable_params", "total_params", "update_bytes", "full_model_bytes"} <= set(info)
    assert info["trainable_params"] == 525_312 and info["update_bytes"] == 525_312 * 4
    assert info["full_model_bytes"] == info["total_params"] * 4
    assert 280 < info["full_model_bytes"] / info["update_bytes"] < 295  # FedCLIP's ~283x
    bad = CliRunner().invoke(app, ["describe", "--random-init", "-c", "method.lora.rnak=3"])
    assert bad.exit_code == 2 and "did you mean 'method.lora.rank'" in bad.output


def test_all_methods_are_registered():
    from common.names import METHODS as NAMES

    assert tuple(METHODS) == NAMES
    assert set(METHODS) >= {"zeroshot", "lora", "adapter", "coop", "kgcoop", "maple", "layernorm", "bitfit", "linear", "full"}


def _selected(m, encoder_prefix=None):
    names = [n.removeprefix("clip.") for n, _ in m.trainable_named_parameters()]
    return names if encoder_prefix is None else [n for n in names if n.startswith(encoder_prefix)]


def test_layernorm_and_bitfit_select_exactly_their_tensors(tiny_clip):
    clip = tiny_clip().model
    lns = [n for n, mod in clip.named_modules() if isinstance(mod, torch.nn.LayerNorm)]
    ln = method(tiny_clip, "layernorm")
    assert sorted(_selected(ln)) == sorted([f"{n}.{leaf}" for n in lns for leaf in ("weight", "bias")])
    vision_only = method(tiny_clip, "layernorm", method__peft__encoder="vision")
    assert vision_only.image_tower_frozen is False and vision_only.text_tower_trainable is False
    assert _selected(vision_only) == _selected(vision_only, "visual.") and len(_selected(vision_only)) == 2 * sum(n.startswith("visual.") for n in lns)
    bf = method(tiny_clip, "bitfit", method__peft__encoder="text")
    assert bf.image_tower_frozen is True
    # every bias of the text tower: LayerNorms, the split q/k/v/out projections, both MLP layers
    split = tiny_clip().model
    split_attention(split)
    expected = [n for n, _ in split.named_parameters() if n.endswith("bias") and not n.startswith("visual.")]
    assert sorted(_selected(bf)) == sorted(expected) and expected


@pytest.mark.parametrize("name", ["layernorm", "bitfit"])
def test_norm_and_bias_tuning_wise_interpolates(tiny_clip, images, name):
    m = method(tiny_clip, name)
    zs = m.trainable_state()
    m.load_trainable_state({k: v + 0.1 for k, v in zs.items()})
    with m.wise(0.25):
        assert all(torch.allclose(m.trainable_state()[k], zs[k] + 0.025, atol=1e-6) for k in zs)
    with torch.no_grad(), m.wise(0.0):
        assert torch.allclose(m(images), method(tiny_clip, "zeroshot")(images), atol=1e-5)


def test_maple_follows_its_definition(tiny_clip, images):
    from common.methods.maple import Maple

    m = method(tiny_clip, "maple", method__maple__depth=2)
    # tiny CLIP: text width 64, vision width 64, 2 blocks; official n_ctx 2, ctx from "a photo of a"
    assert m.num_trainable() == 2 * 64 + 1 * 2 * 64 + 2 * (64 * 64 + 64)
    ref = tiny_clip()
    with torch.no_grad():
        # the first-layer context is the token embeddings of "a photo" (official initialisation)
        phrase = ref.tokenizer(["a photo of a"])
        assert torch.equal(m.ctx, ref.model.token_embedding(phrase)[0, 1:3])
        # with no vision prompt the re-implemented image path is open_clip's encode_image
        bare = method(tiny_clip, "maple", method__maple__depth=1)
        bare.vision_prompts = lambda: [torch.zeros(0, 64)]
        plain = Maple.encode_image(bare, images)
    split = tiny_clip().model
    split_attention(split)
    with torch.no_grad():
        assert torch.allclose(plain, split.encode_image(images), atol=1e-5)
    # depth 1: the text side is exactly the hand-crafted prompt "a photo of a {}."
    shallow = method(tiny_clip, "maple", method__maple__depth=1)
    with torch.no_grad():
        assert torch.allclose(shallow.compute_text_features(), zero_shot_classifier(ref.model, ref.tokenizer, CLASSES, ["a photo of a {}."]), atol=1e-6)
    # deeper prompts act: changing one deep text prompt changes text and image features
    deep = method(tiny_clip, "maple", method__maple__depth=2)
    with torch.no_grad():
        t0, i0 = deep.compute_text_features(), deep.image_embeddings(images)
        deep.compound_text[0].add_(0.5)
        assert not torch.allclose(deep.compute_text_features(), t0) and not torch.allclose(deep.image_embeddings(images), i0)
    # it trains: gradients reach every trainable tensor
    logits = deep(images)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in deep.trainable_named_parameters())
    with pytest.raises(config.ConfigError, match="depth"):
        method(tiny_clip, "maple", method__maple__depth=3)
