"""Federated data: load a dataset (hub or local image folder), partition it, split each client.

Every machine computes the same partitions from the same configuration: the source is read in a
fixed order (hub order, or byte-wise sorted file paths), shuffled with ``data.seed`` and handed to
a flwr-datasets partitioner. Partitioners see a light table (label, domain, row index) so that no
image is decoded while partitioning.

Partitioners (``data.partitioner``):
- ``domain``: one client per domain (FedCLIP), flwr-datasets ``NaturalIdPartitioner``.
- ``domain-dirichlet``: ``clients_per_domain`` clients per domain with Dirichlet(alpha) label skew
  inside each domain (FL²oRA), ``DirichletPartitioner`` per domain; partition p holds domain
  p // k (domains sorted), Dirichlet part p % k.
- ``dirichlet``: Dirichlet(alpha) label skew over the whole dataset (FL²oRA CIFAR).
- ``iid``: ``IidPartitioner`` over the shuffled dataset.
- ``pathological``: ``classes_per_client`` classes per client (``PathologicalPartitioner``).
- ``class-disjoint``: the classes shuffled and cut into disjoint groups, one per client (FL²oRA's
  base-to-new setting, with ``data.classes = base`` and ``data.shots = k``).
Where the hub has an official test split (CIFAR, DTD, Flowers102, Oxford Pets, Food101's
validation, ImageNet's validation) and ``data.test_split = auto``, partitioners share out the
training split only and each seen client tests on its slice of the official test split, which
follows its class proportions; ``data.test_split = carve`` carves every split from the training
split instead.
``data.classes`` = base / novel keeps the first / second half of the sorted class names.
Clients of ``data.heldout_domains`` are *unseen*: they never train and evaluate on all their data.
Seen clients split their partition (seeded by data.seed and partition id) into train/val/test.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, DataConfig, NodeConfig, expand_path
from .hub import HubUnavailable, offline_requested, reachable

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """A data problem the user can fix; ``str(err)`` is one line naming the file or partition."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and its exact hub schema (column names), as its dataset card gives it."""

    hub_id: str
    split: str = "train"
    image: str = "image"
    label: str = "label"
    domain: str | None = None
    num_classes: int = 0  # 0 = unknown until loaded
    num_domains: int = 1
    test_split: str | None = None  # the hub's official evaluation split (data.test_split=auto uses it)
    folder_only: str = ""  # no usable hub copy: data.path must point at this layout
    wnid_classes: bool = False  # class folders named by ImageNet wnids: prompts use CLIP's ImageNet class names


REGISTRY: dict[str, DatasetSpec] = {
    "pacs": DatasetSpec("flwrlabs/pacs", domain="domain", num_classes=7, num_domains=4),
    "office-home": DatasetSpec("flwrlabs/office-home", domain="domain", num_classes=65, num_domains=4),
    "vlcs": DatasetSpec("", num_classes=5, num_domains=4, folder_only="<root>/{Caltech101,LabelMe,SUN09,VOC2007}/{bird,car,chair,dog,person}/<img> (DomainBed's download)"),
    "cifar10": DatasetSpec("uoft-cs/cifar10", image="img", label="label", num_classes=10, test_split="test"),
    "cifar100": DatasetSpec("uoft-cs/cifar100", image="img", label="fine_label", num_classes=100, test_split="test"),
    # FL²oRA's base-to-new datasets
    "food101": DatasetSpec("ethz/food101", num_classes=101, test_split="validation"),
    "dtd": DatasetSpec("tanganke/dtd", num_classes=47, test_split="test"),
    "caltech101": DatasetSpec("flwrlabs/caltech101", num_classes=101),
    "flowers102": DatasetSpec("nelorth/oxford-flowers", num_classes=102, test_split="test"),
    "oxford-pets": DatasetSpec("timm/oxford-iiit-pet", num_classes=37, test_split="test"),
    # CaRot: ImageNet-1K (gated on the hub: accept its terms, then `huggingface-cli login`)
    "imagenet": DatasetSpec("ILSVRC/imagenet-1k", num_classes=1000, test_split="validation", wnid_classes=True),
    "imagefolder": DatasetSpec(""),
    "demo-digits": DatasetSpec("", num_classes=10, num_domains=4),  # offline demo, built from installed packages (common/demo.py)
}


@dataclass
class Source:
    """A whole dataset in canonical form: image references, integer labels, domain names."""

    images: Any  # list of paths (local) or an HF dataset column accessor (hub)
    labels: np.ndarray
    domains: np.ndarray  # str per example ("all" when the dataset has no domains)
    class_names: list[str]
    fingerprint: str
    hf: Any = None  # the HF dataset for hub sources (images decoded lazily)
    image_column: str = "image"
    is_test: np.ndarray | None = None  # bool per example: from the official test split (None: there is none)

    def __len__(self) -> int:
        return len(self.labels)

    def domain_names(self) -> list[str]:
        return sorted(set(self.domains.tolist()))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _scan_folder(root: Path) -> Source:
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist; set data.path (or the node's data-dir) to a folder laid out <domain>/<class>/<img> or <class>/<img>")
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise DataError(f"data folder {str(root)!r} has no sub-folders; expected <domain>/<class>/<img> or <class>/<img>")

    def images_in(d: Path) -> list[Path]:
        return sorted((p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name.encode())

    nested = all(any(c.is_dir() for c in d.iterdir()) and not images_in(d) for d in top)
    groups: list[tuple[str, Path]] = []  # (domain, class folder)
    if nested:
        for dom in top:
            groups += [(dom.name, c) for c in sorted(dom.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    else:
        groups = [("all", c) for c in top]
    class_names = sorted({c.name for _, c in groups}, key=lambda s: s.encode())
    index = {c: i for i, c in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int] = []
    domains: list[str] = []
    for dom, cls in groups:
        for img in images_in(cls):
            paths.append(str(img))
            labels.append(index[cls.name])
            domains.append(dom)
    if not paths:
        raise DataError(f"data folder {str(root)!r} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    digest = hashlib.sha1("\n".join(os.path.relpath(p, root) for p in paths).encode()).hexdigest()[:16]
    return Source(paths, np.asarray(labels, dtype=np.int64), np.asarray(domains), class_names, f"folder:{digest}")


def _load_hub(spec: DatasetSpec, hub_id: str, cache_dir: str | None, with_test: bool) -> Source:
    import datasets

    hub_id = hub_id or spec.hub_id
    splits = [spec.split] + ([spec.test_split] if with_test and spec.test_split else [])
    parts = [_load_hub_split(hub_id, split, cache_dir) for split in splits]
    for ds in parts:
        for col in (spec.image, spec.label) + ((spec.domain,) if spec.domain else ()):
            if col not in ds.column_names:
                raise DataError(f"dataset {hub_id} has no column {col!r} (columns: {', '.join(ds.column_names)})")
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets([p.select_columns(parts[0].column_names) for p in parts])
    feature = parts[0].features[spec.label]
    class_names = list(getattr(feature, "names", None) or [str(v) for v in sorted(set(ds[spec.label]))])
    labels = np.asarray(ds[spec.label], dtype=np.int64)
    if (labels < 0).any():
        raise DataError(f"dataset {hub_id} split {splits[-1]!r} has unlabelled rows (label -1); it cannot be an evaluation split")
    domains = np.asarray(ds[spec.domain]) if spec.domain else np.full(len(labels), "all")
    is_test = np.concatenate([np.zeros(len(parts[0]), bool)] + [np.ones(len(p), bool) for p in parts[1:]]) if len(parts) > 1 else None
    fingerprint = f"hub:{hub_id}:" + "+".join(p._fingerprint for p in parts)
    ds = ds.cast_column(spec.image, datasets.Image(decode=False))
    return Source(None, labels, domains, class_names, fingerprint, hf=ds, image_column=spec.image, is_test=is_test)


def _load_hub_split(hub_id: str, split: str, cache_dir: str | None):
    import datasets

    if not reachable() or offline_requested():
        try:
            return _load_hub_cached(hub_id, split, cache_dir)
        except Exception:
            raise HubUnavailable(
                f"dataset {hub_id} (split {split}) is not in the local cache and the hub is unreachable: set data.path to a local "
                "image folder (<domain>/<class>/<img>), or load it once with network (`fedcal fetch-data`) and copy ~/.cache/huggingface"
            ) from None
    return datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir)


def _load_hub_cached(hub_id: str, split: str, cache_dir: str | None):
    import datasets

    previous = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        datasets.config.HF_DATASETS_OFFLINE = True
        return datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir)
    finally:
        if previous is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = previous


def load_source(cfg: DataConfig, data_dir: str = "") -> Source:
    """The whole dataset named by the config (``data_dir`` = a node's data-dir override)."""
    if cfg.dataset not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(cfg.dataset, list(REGISTRY), n=1)
        raise ConfigError(f"data.dataset {cfg.dataset!r} is unknown" + (f" (did you mean {close[0]!r}?)" if close else "") + f"; one of {', '.join(REGISTRY)}")
    path = data_dir or cfg.path
    if not path and cfg.dataset == "demo-digits":
        from .demo import demo_folder

        path = str(demo_folder(cfg.cache_dir))
    spec = REGISTRY[cfg.dataset]
    if path:
        source = _scan_folder(expand_path(path, "data-dir" if data_dir else "data.path"))
        return imagenet_names(source) if spec.wnid_classes else source
    if cfg.dataset == "imagefolder":
        raise ConfigError("data.dataset='imagefolder' needs data.path (or the node's data-dir) to point at the folder")
    if spec.folder_only and not cfg.hub_id:
        raise ConfigError(f"data.dataset={cfg.dataset!r} has no usable hub copy: set data.path to a folder laid out {spec.folder_only}")
    return _load_hub(spec, cfg.hub_id, None, with_test=cfg.test_split == "auto")


def imagenet_names(source: Source) -> Source:
    """Class folders named by ImageNet wnids (n01440764, ...): sorted, they are the 1000 classes in
    index order, which get CLIP's ImageNet class names (open_clip's IMAGENET_CLASSNAMES)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = source.class_names
    if len(wnids) != len(IMAGENET_CLASSNAMES) or not all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids):
        raise DataError(f"an ImageNet folder must hold the 1000 wnid class folders (n01440764 ...) across its domains; found {len(wnids)} class folders "
                        f"(e.g. {wnids[0]!r}): rename ImageNet-V2's 0..999 folders to wnids and include the imagenet train domain")
    return Source(source.images, source.labels, source.domains, list(IMAGENET_CLASSNAMES), source.fingerprint + ":wnid", source.hf, source.image_column, source.is_test)


def select_classes(source: Source, which: str) -> Source:
    """Keep all classes, or the base (first half of sorted names) / novel (second half) ones."""
    if which == "all":
        return source
    order = sorted(range(len(source.class_names)), key=lambda i: source.class_names[i])
    half = (len(order) + 1) // 2
    keep = order[:half] if which == "base" else order[half:]
    remap = {old: new for new, old in enumerate(keep)}
    mask = np.isin(source.labels, keep)
    rows = np.nonzero(mask)[0]
    return Source(
        images=None if source.images is None else [source.images[i] for i in rows],
        labels=np.asarray([remap[int(v)] for v in source.labels[rows]], dtype=np.int64),
        domains=source.domains[rows],
        class_names=[source.class_names[i] for i in keep],
        fingerprint=f"{source.fingerprint}:{which}",
        hf=None if source.hf is None else source.hf.select(rows),
        image_column=source.image_column,
        is_test=None if source.is_test is None else source.is_test[rows],
    )


# --------------------------------------------------------------------------------------------
# Partitioning (flwr-datasets partitioners)
# --------------------------------------------------------------------------------------------
def expected_partitions(cfg: DataConfig, domains: list[str]) -> int | None:
    """How many clients the partitioner defines (None: as many as num-partitions says)."""
    if cfg.partitioner == "domain":
        return len(domains)
    if cfg.partitioner == "domain-dirichlet":
        return len(domains) * cfg.clients_per_domain
    return None


@contextmanager
def _quiet():
    """Silence the progress bars datasets and flwr-datasets print while partitioning."""
    import datasets
    import flwr_datasets.partitioner.natural_id_partitioner as natural

    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    bar = natural.tqdm
    natural.tqdm = lambda iterable, *a, **k: iterable
    try:
        yield
    finally:
        natural.tqdm = bar
        if enabled:
            datasets.utils.logging.enable_progress_bar()


def count_partitions(cfg: DataConfig, data_dir: str = "") -> int | None:
    """Clients a domain partitioner defines, without loading the hub dataset (None: not fixed)."""
    if cfg.partitioner not in ("domain", "domain-dirichlet"):
        return None
    if data_dir or cfg.path:
        domains = load_source(cfg, data_dir).domain_names()
    else:
        domains = ["d"] * REGISTRY.get(cfg.dataset, DatasetSpec("")).num_domains
    return expected_partitions(cfg, domains)


def _light_table(labels: np.ndarray, domains: np.ndarray, rows: np.ndarray, seed: int):
    import datasets

    table = datasets.Dataset.from_dict({"label": labels[rows].tolist(), "domain": domains[rows].tolist(), "row": rows.tolist()})
    return table.shuffle(seed=seed).flatten_indices()


def _dirichlet(table, k: int, alpha: float, seed: int, what: str):
    from flwr_datasets.partitioner import DirichletPartitioner

    min_size = max(1, min(10, len(table) // (4 * k)))
    part = DirichletPartitioner(num_partitions=k, partition_by="label", alpha=alpha, min_partition_size=min_size, seed=seed)
    part.dataset = table
    try:
        return [np.asarray(part.load_partition(i)["row"], dtype=np.int64) for i in range(k)]
    except ValueError as err:
        raise DataError(f"Dirichlet partitioning of {what} into {k} clients failed ({str(err).splitlines()[0]}); raise data.alpha or use fewer clients") from None


def partition_rows(source: Source, cfg: DataConfig, num_partitions: int) -> list[np.ndarray]:
    """Row indices (into ``source``) of every partition, identical on every machine."""
    with _quiet():
        return _partition_rows(source, cfg, num_partitions)


#: The DataConfig fields that decide the partitions (with the source's fingerprint and the count).
PARTITION_FIELDS = ("partitioner", "seed", "alpha", "clients_per_domain", "classes_per_client", "shots")


def partition_key(source: Source, cfg: DataConfig, num_partitions: int) -> str:
    """Names the partitions of ``source`` under ``cfg``: the data fingerprint, the partition
    config and flwr_datasets' version (its partitioners draw the rows)."""
    from importlib.metadata import version

    parts = ["v1", source.fingerprint, str(len(source)), str(int(num_partitions)), version("flwr_datasets")]
    parts += [f"{name}={getattr(cfg, name)!r}" for name in PARTITION_FIELDS]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def cached_partition_rows(source: Source, cfg: DataConfig, num_partitions: int) -> list[np.ndarray]:
    """:func:`partition_rows` through a per-node file cache (``<data.cache_dir>/partitions/``,
    ``data.partition_cache``): a cold ClientApp skips flwr_datasets' tables. A file that does not
    hold ``num_partitions`` sorted in-range int64 row arrays is recomputed; files are written
    atomically."""
    if not cfg.partition_cache or not cfg.cache_dir:
        return partition_rows(source, cfg, num_partitions)
    path = expand_path(cfg.cache_dir, "data.cache_dir") / "partitions" / f"{partition_key(source, cfg, num_partitions)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                parts = [stored[f"p{i}"] for i in range(num_partitions)]
            if len(stored.files) == num_partitions and all(_valid_rows(r, len(source)) for r in parts):
                return parts
            log.warning("partition cache %s does not match the data; recomputing", path)
        except Exception as err:  # truncated or foreign: recompute
            log.warning("partition cache %s unreadable (%s); recomputing", path, err)
    parts = partition_rows(source, cfg, num_partitions)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, **{f"p{i}": np.ascontiguousarray(r, dtype=np.int64) for i, r in enumerate(parts)})
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache only costs the next start its partitioning
        log.warning("partition cache %s not written (%s)", path, err)
    return parts


def _valid_rows(rows: np.ndarray, n: int) -> bool:
    return rows.dtype == np.int64 and rows.ndim == 1 and (not len(rows) or (rows[0] >= 0 and rows[-1] < n and bool(np.all(rows[1:] >= rows[:-1]))))


def _partition_rows(source: Source, cfg: DataConfig, num_partitions: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import (
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    domains = source.domain_names()
    expected = expected_partitions(cfg, domains)
    if expected is not None and expected != num_partitions:
        detail = f"{len(domains)} domains" + (f" x {cfg.clients_per_domain} clients_per_domain" if cfg.partitioner == "domain-dirichlet" else "")
        raise ConfigError(
            f"data.partitioner={cfg.partitioner} with {detail} needs {expected} partitions, but num-partitions is {num_partitions}: "
            f"run {expected} SuperNodes (simulation: --federation-config 'num-supernodes={expected}')"
        )
    all_rows = training_pool(source, cfg)
    if cfg.partitioner == "class-disjoint":
        return class_disjoint(source, all_rows, num_partitions, cfg.seed)
    if cfg.partitioner == "domain":
        table = _light_table(source.labels, source.domains, all_rows, cfg.seed)
        part = NaturalIdPartitioner(partition_by="domain")
        part.dataset = table
        return [_rows(part, i) for i in range(num_partitions)]
    if cfg.partitioner == "domain-dirichlet":
        out = []
        for d_idx, dom in enumerate(domains):
            rows = all_rows[source.domains[all_rows] == dom]
            table = _light_table(source.labels, source.domains, rows, cfg.seed + d_idx)
            out += [np.sort(r) for r in _dirichlet(table, cfg.clients_per_domain, cfg.alpha, cfg.seed + d_idx, f"domain {dom!r}")]
        return out
    table = _light_table(source.labels, source.domains, all_rows, cfg.seed)
    if cfg.partitioner == "dirichlet":
        return [np.sort(r) for r in _dirichlet(table, num_partitions, cfg.alpha, cfg.seed, "the dataset")]
    if cfg.partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        if cfg.classes_per_client > len(source.class_names):
            raise ConfigError(f"data.classes_per_client={cfg.classes_per_client} exceeds the {len(source.class_names)} classes")
        part = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label", num_classes_per_partition=cfg.classes_per_client, seed=cfg.seed)
    part.dataset = table
    return [_rows(part, i) for i in range(num_partitions)]


def training_pool(source: Source, cfg: DataConfig) -> np.ndarray:
    """The rows partitioners share out: everything but the official test split, and with
    ``data.shots`` = k only k seeded examples per class (CoOp's few-shot protocol; drawn from the
    whole pool before partitioning, so a class-disjoint client holds k shots of each class)."""
    rows = np.arange(len(source), dtype=np.int64)
    if source.is_test is not None:
        rows = rows[~source.is_test]
    if cfg.shots <= 0:
        return rows
    rng = np.random.default_rng([cfg.seed, 1])
    picked = []
    for k in range(len(source.class_names)):
        of_class = rows[source.labels[rows] == k]
        if len(of_class):
            picked.append(rng.choice(of_class, size=min(cfg.shots, len(of_class)), replace=False))
    return np.sort(np.concatenate(picked)) if picked else rows[:0]


def class_disjoint(source: Source, rows: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """FL²oRA's base-to-new split: the classes, shuffled (seed), cut into ``num_partitions``
    disjoint groups of near-equal size; each client holds every pool row of its classes."""
    classes = np.unique(source.labels[rows])
    if len(classes) < num_partitions:
        raise ConfigError(f"data.partitioner=class-disjoint needs at least one class per client: {len(classes)} classes for {num_partitions} clients")
    groups = np.array_split(np.random.default_rng([seed, 2]).permutation(classes), num_partitions)
    return [np.sort(rows[np.isin(source.labels[rows], g)]) for g in groups]


def official_test_slice(source: Source, parts: list[np.ndarray], partition_id: int, seed: int) -> np.ndarray:
    """This client's share of the official test split, following its class proportions: per class,
    the test rows (shuffled, seed) are cut among the clients in proportion to their pool counts of
    that class (FL²oRA's per-client test sets). The slices are disjoint and cover every test row
    of a class some client holds."""
    test_rows = np.nonzero(source.is_test)[0]
    n_classes = len(source.class_names)
    counts = np.stack([np.bincount(source.labels[p], minlength=n_classes) for p in parts]).astype(np.float64)
    rng = np.random.default_rng([seed, 3])
    mine = []
    for k in range(n_classes):
        rows_k = rng.permutation(test_rows[source.labels[test_rows] == k])
        total = counts[:, k].sum()
        if not len(rows_k) or total == 0:
            continue
        edges = np.round(np.cumsum(counts[:, k] / total) * len(rows_k)).astype(np.int64)
        start = int(edges[partition_id - 1]) if partition_id else 0
        mine.append(rows_k[start : int(edges[partition_id])])
    return np.sort(np.concatenate(mine)) if mine else np.empty(0, dtype=np.int64)


def _rows(part, i: int) -> np.ndarray:
    """Sorted source rows of partition i (empty when the partitioner has nothing for it)."""
    try:
        return np.sort(np.asarray(part.load_partition(i)["row"], dtype=np.int64))
    except IndexError:  # e.g. IidPartitioner with fewer examples than partitions
        return np.empty(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# One client's data
# --------------------------------------------------------------------------------------------
@dataclass
class ClientData:
    partition_id: int
    num_partitions: int
    domain: str
    role: str  # "seen" (trains) or "unseen" (held out: evaluated only)
    class_names: list[str]
    source: Source
    splits: dict[str, np.ndarray] = field(default_factory=dict)  # split -> rows into source
    eval_classes: np.ndarray | None = None  # held-out client of a class-subset set: predictions projected onto these classes

    def size(self, split: str) -> int:
        return len(self.splits.get(split, ()))

    def fingerprint(self, split: str) -> str:
        rows = self.splits.get(split, np.empty(0, dtype=np.int64))
        return hashlib.sha1(self.source.fingerprint.encode() + np.ascontiguousarray(rows).tobytes()).hexdigest()[:16]

    def labels(self, split: str) -> np.ndarray:
        return self.source.labels[self.splits[split]]

    def dataset(self, split: str, transform: Any) -> ImageDataset:
        return ImageDataset(self.source, self.splits[split], transform)


def client_domain(source: Source, rows: np.ndarray, cfg: DataConfig) -> str:
    if cfg.partitioner in ("domain", "domain-dirichlet"):
        doms = set(source.domains[rows].tolist())
        return doms.pop() if len(doms) == 1 else "mixed"
    return "all"


def load_client_data(cfg: DataConfig, node: NodeConfig) -> ClientData:
    """Load, partition and split the data of the client ``node.partition_id``."""
    source = select_classes(load_source(cfg, node.data_dir), cfg.classes)
    domains = source.domain_names()
    unknown = [d for d in cfg.heldout() if d not in domains]
    if unknown:
        raise ConfigError(f"data.heldout_domains names {unknown[0]!r}, which is not a domain of this dataset ({', '.join(domains)})")
    if cfg.heldout() and cfg.partitioner not in ("domain", "domain-dirichlet"):
        raise ConfigError("data.heldout_domains needs a domain partitioner (data.partitioner = domain or domain-dirichlet)")
    parts = cached_partition_rows(source, cfg, node.num_partitions)
    rows = parts[node.partition_id]
    if len(rows) == 0:
        raise DataError(
            f"partition {node.partition_id} of {node.num_partitions} is empty (data.partitioner={cfg.partitioner}); "
            "use fewer clients, a larger data.alpha or another partitioner"
        )
    rng = np.random.default_rng([cfg.seed, node.partition_id])
    if cfg.max_per_client and len(rows) > cfg.max_per_client:
        rows = np.sort(rng.choice(rows, size=cfg.max_per_client, replace=False))
    domain = client_domain(source, rows, cfg)
    role = node.role if node.role != "auto" else ("unseen" if domain in cfg.heldout() else "seen")
    data = ClientData(node.partition_id, node.num_partitions, domain, role, source.class_names, source)
    if role == "unseen" and cfg.project_heldout:
        data.eval_classes = np.unique(source.labels[source.domains == domain]) if domain != "mixed" else None
    official = _capped(official_test_slice(source, parts, node.partition_id, cfg.seed), cfg, rng) if source.is_test is not None else None
    data.splits = _splits(rows, official, role, cfg, rng)
    if role == "seen" and not len(data.splits["train"]):
        raise DataError(f"partition {node.partition_id} has {len(rows)} examples and an empty train split; use fewer clients or a larger data.train_fraction")
    return data


def global_test_data(cfg: DataConfig, data_dir: str = "") -> ClientData:
    """The whole evaluation set of the configured classes, as one held-out "client": the official
    test split where the dataset has one, else every example outside the (few-shot) training pool.
    FL²oRA's global base and global novel figures are this set with data.classes = base / novel."""
    source = select_classes(load_source(cfg, data_dir), cfg.classes)
    if source.is_test is not None:
        rows = np.nonzero(source.is_test)[0]
    else:
        rows = np.setdiff1d(np.arange(len(source), dtype=np.int64), training_pool(source, cfg) if cfg.classes != "novel" else np.empty(0, dtype=np.int64))
    if not len(rows):
        raise ConfigError(f"data.dataset={cfg.dataset!r} has no official test split and data.shots=0 leaves no example outside the training pool: set data.shots")
    data = ClientData(0, 1, "global", "unseen", source.class_names, source)
    data.splits = {"train": rows[:0], "val": rows[:0], "test": rows}
    return data


def _capped(rows: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """data.max_per_client also bounds the official test slice (at its test share)."""
    cap = max(1, int(round(cfg.max_per_client * cfg.test_fraction))) if cfg.max_per_client else 0
    return np.sort(rng.choice(rows, size=cap, replace=False)) if cap and len(rows) > cap else rows


def _splits(rows: np.ndarray, official: np.ndarray | None, role: str, cfg: DataConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """train / val / test rows: a held-out client tests on everything it holds; a seen client splits
    its partition (seeded) train/val/test, or train/val when the official test split gives its test."""
    empty = np.empty(0, dtype=np.int64)
    if role == "unseen":
        return {"train": empty, "val": empty, "test": rows if official is None else np.union1d(rows, official)}
    order = rng.permutation(rows)
    if official is None:
        n_train = int(round(len(order) * cfg.train_fraction))
        n_val = int(round(len(order) * cfg.val_fraction))
        return {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train : n_train + n_val]), "test": np.sort(order[n_train + n_val :])}
    n_train = int(round(len(order) * cfg.train_fraction / (cfg.train_fraction + cfg.val_fraction)))
    return {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train:]), "test": official}


# --------------------------------------------------------------------------------------------
# Torch dataset
# --------------------------------------------------------------------------------------------
def open_image(ref: Any, what: str):
    """Decode one image to RGB; any failure names the file."""
    from PIL import Image

    try:
        if isinstance(ref, str):
            with Image.open(ref) as img:
                return img.convert("RGB")
        if isinstance(ref, dict):
            if ref.get("bytes"):
                with Image.open(io.BytesIO(ref["bytes"])) as img:
                    return img.convert("RGB")
            if ref.get("path"):
                with Image.open(ref["path"]) as img:
                    return img.convert("RGB")
        if hasattr(ref, "convert"):
            return ref.convert("RGB")
        raise TypeError(f"unsupported image reference {type(ref).__name__}")
    except Exception as err:
        raise DataError(f"cannot read image {what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; fix or remove the file") from None


class ImageDataset:
    """(image tensor, label) pairs for some rows of a :class:`Source` (a torch map-style dataset)."""

    def __init__(self, source: Source, rows: np.ndarray, transform: Any):
        self.source, self.rows, self.transform = source, np.asarray(rows, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        if self.source.hf is not None:
            ref = self.source.hf[row][self.source.image_column]
            what = (ref.get("path") if isinstance(ref, dict) else None) or f"row {row} of {self.source.fingerprint}"
        else:
            ref = self.source.images[row]
            what = ref
        image = open_image(ref, what)
        return self.transform(image), int(self.source.labels[row])
