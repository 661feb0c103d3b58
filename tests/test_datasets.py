"""The papers' datasets through fedcal's real loaders, offline, on fixtures with the hubs' exact schemas."""

from __future__ import annotations

import numpy as np
import pytest

from common import config
from common.data import REGISTRY, load_client_data, load_source, partition_rows, training_pool
from tests.hub_fixtures import SCHEMAS, hub_repo, image_folder


def cfg_for(repo, dataset, **overrides):
    base = {"data__dataset": dataset, "data__hub_id": str(repo)}
    base.update(overrides)
    return config.load(None, **base)


def node(pid, n):
    return config.parse_node_config({"partition-id": pid, "num-partitions": n})


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return lambda name: hub_repo(root, name)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_hub_dataset_loads_with_its_schema(hub, name):
    spec = REGISTRY[name]
    columns, splits, n_classes = SCHEMAS[name]
    source = load_source(cfg_for(hub(name), name).data)
    assert len(source.class_names) == n_classes == spec.num_classes
    assert source.image_column == spec.image and spec.label in columns
    train_rows = splits[spec.split]
    if spec.test_split:
        assert source.is_test is not None and int(source.is_test.sum()) == splits[spec.test_split] and len(source) == train_rows + splits[spec.test_split]
    else:
        assert source.is_test is None and len(source) == train_rows
    if spec.domain:
        assert len(source.domain_names()) == spec.num_domains
    # carving instead of the official split reads the training split only
    carved = load_source(cfg_for(hub(name), name, data__test_split="carve").data)
    assert carved.is_test is None and len(carved) == train_rows


def test_official_test_split_follows_each_clients_class_proportions(hub):
    repo = hub("cifar10")
    cfg = cfg_for(repo, "cifar10", data__partitioner="dirichlet", data__alpha=0.5)
    source = load_source(cfg.data)
    parts = partition_rows(source, cfg.data, 4)
    test_rows = set(np.nonzero(source.is_test)[0].tolist())
    assert all(not (set(p.tolist()) & test_rows) for p in parts)  # partitions hold training rows only
    clients = [load_client_data(cfg.data, node(i, 4)) for i in range(4)]
    tests = [set(c.splits["test"].tolist()) for c in clients]
    assert all(t <= test_rows for t in tests)
    assert sum(len(t) for t in tests) == len(set().union(*tests))  # disjoint
    for k in range(10):
        held = [int((source.labels[p] == k).sum()) for p in parts]
        test_k = [sum(1 for r in t if source.labels[r] == k) for t in tests]
        n_k = sum(1 for r in test_rows if source.labels[r] == k)
        if sum(held):
            assert sum(test_k) == n_k
            for h, t in zip(held, test_k, strict=True):
                assert abs(t - n_k * h / sum(held)) <= 1.0
    for c, p in zip(clients, parts, strict=True):  # train + val are the client's whole partition
        assert sorted(c.splits["train"].tolist() + c.splits["val"].tolist()) == sorted(p.tolist())


def test_few_shot_base_classes_are_disjoint_across_clients(hub):
    repo = hub("food101")
    cfg = cfg_for(repo, "food101", data__partitioner="class-disjoint", data__classes="base", data__shots=1, data__train_fraction=0.5,
                  data__val_fraction=0.25, data__test_fraction=0.25)
    clients = [load_client_data(cfg.data, node(i, 5)) for i in range(5)]
    assert len(clients[0].class_names) == 51  # the first half of 101 sorted names
    pools = [set(np.concatenate([c.splits["train"], c.splits["val"]]).tolist()) for c in clients]
    classes = [set(clients[0].source.labels[list(p)].tolist()) for p in pools]
    assert all(not (classes[i] & classes[j]) for i in range(5) for j in range(i + 1, 5))
    pool = training_pool(clients[0].source, cfg.data)
    assert np.bincount(clients[0].source.labels[pool]).max() == 1  # one shot per class
    for c, cls in zip(clients, classes, strict=True):  # each client tests on the official test rows of its classes
        assert set(c.source.labels[c.splits["test"]].tolist()) <= cls and c.source.is_test[c.splits["test"]].all()


def test_vlcs_is_a_documented_folder(tmp_path):
    with pytest.raises(config.ConfigError, match="Caltech101,LabelMe,SUN09,VOC2007"):
        load_source(config.load(None, data__dataset="vlcs").data)
    root = image_folder(tmp_path / "VLCS", {d: {c: 2 for c in ("bird", "car", "chair", "dog", "person")} for d in ("Caltech101", "LabelMe", "SUN09", "VOC2007")})
    source = load_source(config.load(None, data__dataset="vlcs", data__path=str(root)).data)
    assert source.domain_names() == ["Caltech101", "LabelMe", "SUN09", "VOC2007"] and len(source.class_names) == 5


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(len(IMAGENET_CLASSNAMES))]  # sorted like real wnids
    layout = {"imagenet": {w: 1 for w in wnids}, "imagenet-r": {wnids[3]: 2, wnids[10]: 2, wnids[999]: 2}, "imagenet-sketch": {w: 1 for w in wnids[:6]}}
    return image_folder(tmp_path_factory.mktemp("in") / "imagenet", layout), wnids


def test_imagenet_folder_gets_clip_names_and_projects_subset_sets(imagenet_folder):
    import torch
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from client.runtime import PROJECTED_OUT, project

    root, _ = imagenet_folder
    cfg = config.load(None, data__dataset="imagenet", data__path=str(root), data__partitioner="domain",
                      data__heldout_domains="imagenet-r,imagenet-sketch", data__project_heldout=True)
    r_client = load_client_data(cfg.data, node(1, 3))
    assert r_client.class_names == list(IMAGENET_CLASSNAMES) and r_client.domain == "imagenet-r" and r_client.role == "unseen"
    assert r_client.eval_classes.tolist() == [3, 10, 999]
    logits = torch.randn(4, 1000)
    projected = project(logits, r_client.eval_classes)
    assert torch.equal(projected[:, [3, 10, 999]], logits[:, [3, 10, 999]]) and (projected[:, :3] == PROJECTED_OUT).all()
    assert torch.equal(torch.softmax(projected.double(), 1)[:, [3, 10, 999]], torch.softmax(logits[:, [3, 10, 999]].double(), 1))
    broken = image_folder(root.parent / "bad", {"imagenet-v2": {str(i): 1 for i in range(3)}})
    with pytest.raises(Exception, match="wnid"):
        load_source(config.load(None, data__dataset="imagenet", data__path=str(broken)).data)


def test_fedcal_evaluate_gives_global_base_and_novel_figures(hub, tmp_path):
    import json
    import subprocess

    import datasets
    import torch

    from common.methods import build_method
    from common.model import load_clip
    from server import checkpoint
    from server.records import RunDirectory
    from tests.processes import BIN

    repo = hub("dtd")
    cfg = cfg_for(repo, "dtd", model__name="fedcal-tiny", model__pretrained="", method__name="lora", data__classes="base",
                  data__partitioner="class-disjoint", data__shots=2, output__dir=str(tmp_path), output__run_name="b2n",
                  data__cache_dir=str(tmp_path / "cache"))
    run = RunDirectory.create(cfg)
    run.close()
    state = build_method(cfg, load_clip("fedcal-tiny", None), [f"c{i}" for i in range(24)]).trainable_state()
    checkpoint.save_final(run.path, 3, state, {"temperature": 1.5})
    test = datasets.load_dataset(str(repo), split="test")
    names = test.features["label"].names
    novel = set(sorted(range(47), key=lambda i: names[i])[24:])
    expected_n = sum(1 for y in test["label"] if y in novel)
    res = subprocess.run([str(BIN / "fedcal"), "evaluate", str(run.path), 'data.classes="novel"'], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads((run.path / "global-novel.json").read_text())
    assert [r["ts"] for r in rows] == ["none", "global"] and rows[0]["n"] == expected_n and rows[1]["temperature"] == 1.5
    assert f"global novel (dtd, {expected_n} examples" in res.stdout
    assert torch.isfinite(torch.tensor([rows[0]["accuracy"], rows[0]["ece10"], rows[1]["ece10"]])).all()
    from server.paper import _global_rows

    assert [line.split(" | ")[:2] for line in _global_rows(run.path)] == [["| global novel", "none"], ["| global novel", "global"]]


# ----------------------------------------------------------------------------- every preset's data path
PRESETS = sorted(p.name for p in (__import__("pathlib").Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folder fixtures for the presets whose data has no hub copy: VLCS and ImageNet with its shifts."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    root = tmp_path_factory.mktemp("folders")
    vlcs = image_folder(root / "VLCS", {d: {c: 3 for c in ("bird", "car", "chair", "dog", "person")} for d in ("Caltech101", "LabelMe", "SUN09", "VOC2007")})
    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(len(IMAGENET_CLASSNAMES))]
    layout = {"imagenet": {w: 2 for w in wnids}, "imagenet-val": {w: 2 for w in wnids[:20]}, "imagenet-v2": {w: 2 for w in wnids[:20]},
              "imagenet-r": {w: 2 for w in wnids[:200:20]}, "imagenet-a": {w: 2 for w in wnids[5:200:20]}, "imagenet-sketch": {w: 2 for w in wnids[:20]}}
    return {"vlcs": vlcs, "imagenet": image_folder(root / "imagenet", layout)}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_its_data_path_on_a_fixture(preset, hub, folders, pacs_dir):
    """`fedcal config` accepts the preset and its data path works offline: every client of a domain
    preset (or the first clients of the others) loads its partition and splits from a fixture with
    the hub's schema (or the documented folder layout)."""
    from common.data import expected_partitions

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
    cfg = config.load(str(root / preset))
    ds = cfg.data.dataset
    if ds in folders:
        cfg = config.load(str(root / preset), data__path=str(folders[ds]))
    elif ds in SCHEMAS:
        cfg = config.load(str(root / preset), data__hub_id=str(hub(ds)))
    elif ds == "imagefolder":
        cfg = config.load(str(root / preset), data__path=str(pacs_dir))
    source_domains = load_source(cfg.data).domain_names()
    fixed = expected_partitions(cfg.data, source_domains)
    n = fixed or (10 if cfg.data.partitioner == "class-disjoint" else 2)  # the fixtures are small: 2 clients share the others
    for pid in range(n if fixed else 2):
        data = load_client_data(cfg.data, node(pid, n))
        assert data.role == "unseen" or data.size("train") > 0
        assert data.size("train") + data.size("val") + data.size("test") > 0
        if cfg.data.project_heldout and data.role == "unseen":
            assert data.eval_classes is not None and len(data.eval_classes) <= len(data.class_names)
