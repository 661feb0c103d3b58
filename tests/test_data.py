"""Federated data: loading a local image folder, flwr-datasets partitions, splits, errors."""

from __future__ import annotations

import numpy as np
import pytest

from common import config
from common.config import ConfigError
from common.data import DataError, load_client_data, load_source, partition_rows, select_classes
from tests.conftest import CLASSES, real_photos


def node(pid, n, **extra):
    return config.NodeConfig.model_validate({"partition-id": pid, "num-partitions": n, **extra})


def test_folder_layout_domains_and_classes(pacs_dir, tiny_cfg):
    src = load_source(tiny_cfg().data)
    assert len(src) == 1400 and src.class_names == CLASSES
    assert src.domain_names() == ["art_painting", "cartoon", "photo", "sketch"]
    flat = load_source(tiny_cfg(data__path=str(pacs_dir / "photo")).data)
    assert len(flat) == 350 and flat.domain_names() == ["all"] and flat.class_names == CLASSES


@pytest.mark.parametrize(
    "partitioner, n, extra",
    [("domain", 4, {}), ("domain-dirichlet", 8, {}), ("dirichlet", 6, {}), ("iid", 5, {}), ("pathological", 7, {"data__classes_per_client": 2})],
)
def test_partitions_cover_the_dataset_once_and_are_reproducible(tiny_cfg, partitioner, n, extra):
    cfg = tiny_cfg(data__partitioner=partitioner, **extra).data
    src = load_source(cfg)
    parts = partition_rows(src, cfg, n)
    assert len(parts) == n and all(len(p) > 0 for p in parts)
    everything = np.concatenate(parts)
    assert len(everything) == len(src) == len(set(everything.tolist()))
    again = partition_rows(load_source(cfg), cfg, n)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if partitioner == "domain-dirichlet":
        for p, rows in enumerate(parts):  # partition p holds domain p // 2 only
            assert set(src.domains[rows]) == {src.domain_names()[p // 2]}
    if partitioner == "pathological":
        assert all(len(set(src.labels[p])) <= 2 for p in parts)
    if partitioner in ("dirichlet", "domain-dirichlet"):  # label skew: partitions differ in class mix
        hists = np.stack([np.bincount(src.labels[p], minlength=7) / len(p) for p in parts])
        assert hists.std(axis=0).max() > 0.05


def test_domain_partitioner_requires_matching_num_partitions(tiny_cfg):
    cfg = tiny_cfg(data__partitioner="domain-dirichlet").data
    with pytest.raises(ConfigError, match="needs 8 partitions, but num-partitions is 4"):
        partition_rows(load_source(cfg), cfg, 4)


def test_heldout_domain_clients_are_unseen_and_evaluate_everything(tiny_cfg):
    cfg = tiny_cfg(data__heldout_domains="sketch").data
    roles = {}
    for pid in range(4):
        d = load_client_data(cfg, node(pid, 4))
        roles[d.domain] = d.role
        if d.role == "unseen":
            assert d.size("train") == 0 and d.size("test") == 350
        else:
            assert (d.size("train"), d.size("val"), d.size("test")) == (210, 70, 70)
            assert not set(d.splits["train"]) & set(d.splits["test"])
    assert roles == {"art_painting": "seen", "cartoon": "seen", "photo": "seen", "sketch": "unseen"}
    with pytest.raises(ConfigError, match="not a domain"):
        load_client_data(tiny_cfg(data__heldout_domains="skech").data, node(0, 4))


def test_splits_are_seeded(tiny_cfg):
    cfg = tiny_cfg().data
    a, b = load_client_data(cfg, node(1, 4)), load_client_data(cfg, node(1, 4))
    assert all(np.array_equal(a.splits[s], b.splits[s]) for s in ("train", "val", "test"))
    c = load_client_data(cfg.model_copy(update={"seed": 7}), node(1, 4))
    assert not np.array_equal(a.splits["train"], c.splits["train"])


def test_base_and_novel_classes(tiny_cfg):
    src = load_source(tiny_cfg().data)
    base, novel = select_classes(src, "base"), select_classes(src, "novel")
    assert base.class_names == CLASSES[:4] and novel.class_names == CLASSES[4:]
    assert len(base) + len(novel) == len(src)
    assert set(novel.labels.tolist()) == {0, 1, 2}


def test_unreadable_image_names_the_file(tmp_path, pacs_dir):
    import shutil

    for cls in ("dog", "house"):
        (tmp_path / cls).mkdir()
        for f in sorted((pacs_dir / "photo" / cls).iterdir())[:6]:
            shutil.copy(f, tmp_path / cls / f.name)
    bad = tmp_path / "dog" / "zz_broken.jpg"
    bad.write_bytes(b"not a jpeg")
    cfg = config.load(None, data__path=str(tmp_path), data__partitioner="iid")
    data = load_client_data(cfg.data, node(0, 1))
    ds = data.dataset("train", lambda im: im)
    ds_all = [data.source.images[r] for r in data.splits["train"]] + [data.source.images[r] for r in data.splits["test"]] + [data.source.images[r] for r in data.splits["val"]]
    assert str(bad) in ds_all
    rows = np.concatenate([data.splits[s] for s in ("train", "val", "test")])
    from common.data import ImageDataset

    with pytest.raises(DataError, match="zz_broken.jpg"):
        for i in range(len(rows)):
            ImageDataset(data.source, rows, lambda im: im)[i]
    assert len(ds) > 0


def test_empty_partition_is_a_clear_error(tiny_cfg, tmp_path, pacs_dir):
    import shutil

    (tmp_path / "dog").mkdir()
    for f in sorted((pacs_dir / "photo" / "dog").iterdir())[:3]:
        shutil.copy(f, tmp_path / "dog" / f.name)
    cfg = config.load(None, data__path=str(tmp_path), data__partitioner="iid")
    with pytest.raises(DataError, match="partition 4 of 5 is empty"):
        load_client_data(cfg.data, node(4, 5))


def test_missing_folder_and_unset_variable(monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_source(config.load(None, data__path="/no/such/folder").data)
    monkeypatch.delenv("FEDCAL_DATA_X", raising=False)
    with pytest.raises(ConfigError, match="FEDCAL_DATA_X"):
        load_source(config.load(None, data__path="${FEDCAL_DATA_X}/pacs").data)


@real_photos
def test_pacs_mini_is_the_documented_subset(pacs_dir):
    """The real-photo tier: the folder is exactly the pacs-mini its PROVENANCE.md describes."""
    import hashlib

    files = sorted((p for p in pacs_dir.rglob("*") if p.is_file() and p.name != "PROVENANCE.md"),
                   key=lambda p: str(p.relative_to(pacs_dir.parent)).encode())
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(pacs_dir.parent)}\n" for p in files)
    assert hashlib.sha256(lines.encode()).hexdigest() == "6c946b71668bf0e1fc325492b9f195aac2608df8c72dc6375752060421cdc98d"


def test_partition_cache_returns_the_computed_rows_and_survives_bad_files(tiny_cfg, tmp_path, monkeypatch):
    """A cold client start reads its partitions from data.cache_dir/partitions: the same rows as
    partitioning (flwr_datasets' tables) gives, without running it; a change of any partition
    setting is another file; a truncated or foreign file is recomputed, not trusted."""
    import common.data as data_mod

    cfg = tiny_cfg(data__partitioner="dirichlet", data__cache_dir=str(tmp_path / "cache")).data
    fresh = load_client_data(cfg.model_copy(update={"partition_cache": False}), node(2, 5))
    first = load_client_data(cfg, node(2, 5))
    files = sorted((tmp_path / "cache" / "partitions").glob("*.npz"))
    assert len(files) == 1

    def no_partitioning(*_a, **_k):
        raise AssertionError("partitioned although the cache holds the rows")

    monkeypatch.setattr(data_mod, "_partition_rows", no_partitioning)
    hits = {pid: load_client_data(cfg, node(pid, 5)) for pid in (0, 2, 4)}  # every client of the federation reads the one file
    assert all(np.array_equal(hits[2].splits[s], fresh.splits[s]) for s in ("train", "val", "test"))
    assert all(np.array_equal(first.splits[s], fresh.splits[s]) for s in ("train", "val", "test"))
    for changed in ({"seed": 7}, {"alpha": 0.3}):  # another partition config: not the cached rows
        with pytest.raises(AssertionError, match="partitioned although"):
            load_client_data(cfg.model_copy(update=changed), node(2, 5))
    with pytest.raises(AssertionError, match="partitioned although"):
        load_client_data(cfg, node(2, 6))
    monkeypatch.undo()

    src = load_source(cfg)
    n = len(src)
    for bad in (b"not an npz", None):
        if bad is None:  # a well-formed file whose rows run past the data
            np.savez(files[0], **{f"p{i}": np.array([0, n + 5], dtype=np.int64) for i in range(5)})
        else:
            files[0].write_bytes(bad)
        again = load_client_data(cfg, node(2, 5))
        assert all(np.array_equal(again.splits[s], fresh.splits[s]) for s in ("train", "val", "test"))
    with np.load(files[0]) as stored:  # rewritten with the right rows
        assert np.array_equal(stored["p2"], data_mod.partition_rows(src, cfg, 5)[2])
