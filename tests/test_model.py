"""CLIP loading: tiny configs, local checkpoints, random init, clear offline errors."""

from __future__ import annotations

import time

import pytest
import torch

from common.config import ConfigError
from common.hub import HubUnavailable
from common.model import (
    encode_text_features,
    load_clip,
    open_clip_lib,
    templates_for,
    zero_shot_classifier,
)


def test_tiny_configs_are_registered():
    assert {"fedcal-tiny", "fedcal-small"} <= set(open_clip_lib().list_models())


def test_random_init_is_the_same_in_every_process():
    a = load_clip("fedcal-tiny", None).model.state_dict()
    b = load_clip("fedcal-tiny", "").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_local_checkpoint_file_loads(tmp_path):
    clip = load_clip("fedcal-tiny", None, init_seed=7)
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    again = load_clip("fedcal-tiny", str(path))
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in clip.model.state_dict().items())
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clip.model.encode_image(image), again.model.encode_image(image))


def test_a_checkpoint_build_draws_no_random_init_and_leaves_torch_as_it_was(tmp_path, monkeypatch):
    """With a checkpoint, no initialiser runs (the checkpoint overwrites every parameter); the
    file's tensors come back exactly and torch.nn.init is restored afterwards, even after a failure."""
    from common.model import skip_random_init

    clip = load_clip("fedcal-tiny", None, init_seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    originals = {n: getattr(torch.nn.init, n) for n in ("normal_", "trunc_normal_", "kaiming_uniform_", "zeros_")}
    drawn = []
    real_normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: drawn.append(t.shape) or real_normal(t, *a, **k))
    originals["normal_"] = torch.nn.init.normal_
    again = load_clip("fedcal-tiny", str(path))
    assert drawn == []  # the random-init build above draws with normal_; this one must not
    load_clip("fedcal-tiny", None)
    assert drawn  # ... and a build without a checkpoint still does
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in clip.model.state_dict().items())
    with pytest.raises(RuntimeError), skip_random_init():
        raise RuntimeError("boom")
    assert all(getattr(torch.nn.init, n) is fn for n, fn in originals.items())


def test_transforms_and_tokenizer(pacs_dir):
    from PIL import Image

    clip = load_clip("fedcal-tiny", None)
    img = Image.open(next((pacs_dir / "photo" / "dog").iterdir())).convert("RGB")
    assert clip.preprocess_eval(img).shape == (3, 32, 32)
    assert clip.preprocess_train(img).shape == (3, 32, 32)
    assert clip.tokenizer(["a photo of a dog."]).shape == (1, 77)


def test_offline_hub_tag_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnavailable) as info:
        load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message and "checkpoint" in message and "cache" in message


@pytest.mark.parametrize("pretrained, match", [("nope", "not a known tag"), ("/no/such/file.pt", "does not exist")])
def test_bad_pretrained_values(pretrained, match):
    with pytest.raises(ConfigError, match=match):
        load_clip("ViT-B-32", pretrained)


def test_unknown_architecture_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'ViT-B-16'"):
        load_clip("ViT-B-61", None)


def test_zero_shot_classifier_matches_differentiable_twin():
    clip = load_clip("fedcal-tiny", None)
    names = ["dog", "elephant", "guitar_player"]
    templates = templates_for("simple-imagenet", "")
    ref = zero_shot_classifier(clip.model, clip.tokenizer, names, templates)
    twin = encode_text_features(clip.model, clip.tokenizer, names, templates)
    assert ref.shape == (3, 64)
    assert torch.allclose(ref.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(ref, twin, atol=1e-6)
    with pytest.raises(ConfigError, match="placeholder"):
        templates_for("single", "a photo")
