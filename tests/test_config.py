"""The run configuration: defaults, Flower's flattened keys, one-line errors, docs in sync."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

from common import config
from common.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_real_setup():
    cfg = config.RunConfig()
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-B-16", "openai")
    assert cfg.data.dataset == "pacs" and cfg.data.partitioner == "domain-dirichlet"
    lora = cfg.method.lora
    assert (cfg.method.name, lora.encoder, lora.targets, lora.rank, lora.alpha, lora.dropout, lora.rslora) == (
        "lora", "both", "q,k,v", 2, 1.0, 0.25, True)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 1e-3, 0.9, 5e-4)
    assert cfg.fl.aggregator == "fedavg" and cfg.fl.rounds == 50


def test_pyproject_lists_exactly_the_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = pyproject["tool"]["flwr"]["app"]["config"]
    assert config.flatten(table) == config.RunConfig().flat()


def test_flattened_run_config_and_nested_agree():
    flat = {"method.lora.rank": 4, "optim.lr": 1, "fl.rounds": 3, "model.pretrained": ""}
    cfg = config.from_flower(flat)
    assert cfg.method.lora.rank == 4 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.flat()["method.lora.rank"] == 4


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("method.lora.rnak=3", "unknown config key 'method.lora.rnak' (did you mean 'method.lora.rank'?)"),
        ("method.lora.rank=0", "method.lora.rank: Input should be greater than or equal to 1 (got 0)"),
        ('optim.lr="fast"', "optim.lr:"),
        ("model.name=3", "model.name: Input should be a valid string"),
        ('method.name="lorra"', "did you mean 'lora'?"),
        ("data.train_fraction=0.9", "must be 1 (got 1.3)"),
        ('eval.splits="tset"', "eval.splits"),
        ('method.lora.targets="q,z"', "method.lora.targets"),
    ],
)
def test_errors_are_one_line_and_name_the_key(spec, expected):
    with pytest.raises(ConfigError) as info:
        config.load(spec)
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


def test_toml_preset_and_key_value_string_use_flowers_parser(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[method.lora]\nrank = 8\n[fl]\nrounds = 3\n')
    assert config.load(str(preset)).method.lora.rank == 8
    cfg = config.load('model.name="ViT-B-32" method.name="adapter"')
    assert (cfg.model.name, cfg.method.name) == ("ViT-B-32", "adapter")
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "missing.toml"))


def test_all_presets_validate():
    presets = sorted((ROOT / "configs").glob("*.toml"))
    assert any(p.name == "offline-smoke.toml" for p in presets)
    for preset in presets:
        config.load(str(preset))


def test_node_config():
    node = config.parse_node_config({"partition-id": 1, "num-partitions": 4, "data-dir": "/d"})
    assert (node.partition_id, node.num_partitions, node.data_dir, node.role) == (1, 4, "/d", "auto")
    with pytest.raises(ConfigError, match="partition-id"):
        config.parse_node_config({"num-partitions": 4})
    with pytest.raises(ConfigError, match="did you mean 'data-dir'"):
        config.parse_node_config({"partition-id": 0, "num-partitions": 4, "data_dir": "/d"})
    with pytest.raises(ConfigError, match="smaller than num-partitions"):
        config.parse_node_config({"partition-id": 4, "num-partitions": 4})


def test_expand_path_names_unset_variable(monkeypatch):
    monkeypatch.delenv("FEDCAL_NOPE", raising=False)
    with pytest.raises(ConfigError, match="FEDCAL_NOPE"):
        config.expand_path("$FEDCAL_NOPE/pacs", "data.path")
    monkeypatch.setenv("FEDCAL_NOPE", "/x")
    assert str(config.expand_path("$FEDCAL_NOPE/pacs", "data.path")) == "/x/pacs"


def test_readme_reference_is_complete():
    readme = (ROOT / "README.md").read_text()
    assert config.reference_markdown() in readme, "README config reference is stale: paste `fedcal config --markdown`"
