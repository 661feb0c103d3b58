"""The ``fedcal`` command line (typer, like flwr's own CLI).

Every command that takes ``--run-config`` reads it exactly as ``flwr run`` does (a TOML preset
path or ``'key=value key2="text"'`` pairs) layered over the defaults, so a configuration can be
checked here before it is submitted. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedcal: calibrated federated fine-tuning of CLIP on Flower.")

RunConfigOpt = Annotated[Optional[str], typer.Option("--run-config", "-c", help="TOML preset path or 'key=value ...' pairs, as for `flwr run`.")]


def user_errors(fn):
    """Turn the errors a user can cause into one line on stderr and exit status 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import ConfigError
        from .data import DataError
        from .hub import HubUnavailable

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, HubUnavailable, FileNotFoundError) as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("config")
@user_errors
def config_cmd(
    run_config: RunConfigOpt = None,
    toml: Annotated[bool, typer.Option("--toml", help="Print every key with its default as TOML tables (pyproject.toml).")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the configuration reference table (README.md).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the resolved configuration as flat JSON.")] = False,
) -> None:
    """Validate a configuration and print it (or the defaults / the reference)."""
    from . import config

    if toml:
        typer.echo(config.defaults_toml())
        return
    if markdown:
        typer.echo(config.reference_markdown())
        return
    cfg = config.load(run_config)
    if as_json:
        typer.echo(json.dumps(cfg.flat(), indent=2))
        return
    defaults = config.RunConfig().flat()
    for key, value in cfg.flat().items():
        mark = "*" if defaults[key] != value else " "
        typer.echo(f"{mark} {key} = {value!r}")


def describe_run(cfg, random_init: bool) -> dict:
    """Parameter counts and per-round traffic of the configured method (``fedcal describe``)."""
    from .methods import build_method
    from .model import load_clip

    pretrained = "" if random_init else cfg.model.pretrained
    clip = load_clip(cfg.model.name, pretrained, device="cpu", cache_dir=cfg.model.cache_dir or None, offline=cfg.model.offline)
    total = sum(p.numel() for p in clip.model.parameters())
    full_bytes = sum(p.numel() * 4 for p in clip.model.parameters())
    method = build_method(cfg, clip, _describe_classes(cfg) if cfg.method.name == "linear" else ["a", "b"])
    state = method.trainable_state()
    trainable = sum(v.numel() for v in state.values())
    update_bytes = sum(v.numel() * v.element_size() for v in state.values())
    return {
        "model": cfg.model.name,
        "pretrained": pretrained,
        "method": cfg.method.name,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_fraction": trainable / total,
        "tensors": len(state),
        "update_bytes": int(update_bytes),
        "full_model_bytes": int(full_bytes),
        "traffic_reduction": (full_bytes / update_bytes) if update_bytes else None,
    }


def _describe_classes(cfg) -> list[str]:
    """Placeholder class names, as many as the configured dataset has (a linear head has one row each)."""
    from .data import REGISTRY, load_source

    spec = REGISTRY.get(cfg.data.dataset)
    count = spec.num_classes if spec and spec.num_classes and not cfg.data.path else len(load_source(cfg.data).class_names)
    return [f"class{i}" for i in range(count)]


@app.command()
@user_errors
def describe(
    run_config: RunConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    random_init: Annotated[bool, typer.Option("--random-init", help="Build with pretrained empty (no download); counts do not depend on weights.")] = False,
) -> None:
    """Model, method, trainable/total parameters and the bytes each client sends per round."""
    from . import config

    info = describe_run(config.load(run_config), random_init)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"model            {info['model']} (weights: {info['pretrained'] or 'random init'})")
    typer.echo(f"method           {info['method']}")
    typer.echo(f"trainable params {info['trainable_params']:,} of {info['total_params']:,} ({100 * info['trainable_fraction']:.3f}%) in {info['tensors']} tensors")
    typer.echo(f"update per round {info['update_bytes']:,} bytes per client each way (fp32)")
    ratio = info["traffic_reduction"]
    typer.echo(f"full-model FedAvg {info['full_model_bytes']:,} bytes -> {ratio:,.1f}x less traffic" if ratio else "full-model FedAvg: nothing to send for this method")


@app.command()
@user_errors
def partitions(
    run_config: RunConfigOpt = None,
    num_partitions: Annotated[int, typer.Option("--num-partitions", "-n", help="Number of clients (SuperNodes).")] = 4,
    data_dir: Annotated[str, typer.Option("--data-dir", help="Local data folder (overrides data.path).")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show every client's partition (domain, role, split sizes, class histogram) before a run."""
    from . import config
    from .data import load_client_data

    cfg = config.load(run_config)
    rows = []
    for pid in range(num_partitions):
        node = config.parse_node_config({"partition-id": pid, "num-partitions": num_partitions, "data-dir": data_dir})
        d = load_client_data(cfg.data, node)
        import numpy as np

        hist = np.bincount(d.source.labels[np.concatenate(list(d.splits.values()))], minlength=len(d.class_names)).tolist()
        rows.append({"partition": pid, "domain": d.domain, "role": d.role, **{s: d.size(s) for s in ("train", "val", "test")}, "classes": hist})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'part':>4} {'domain':14} {'role':6} {'train':>6} {'val':>5} {'test':>5}  class histogram")
    for r in rows:
        typer.echo(f"{r['partition']:>4} {r['domain']:14} {r['role']:6} {r['train']:>6} {r['val']:>5} {r['test']:>5}  {r['classes']}")


@app.command("fetch-weights")
@user_errors
def fetch_weights(
    model: Annotated[str, typer.Option(help="open_clip architecture.")] = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag.")] = "openai",
    cache_dir: Annotated[str, typer.Option(help="Cache directory (default: Hugging Face's).")] = "",
) -> None:
    """Download CLIP weights into the cache (run where there is network; then copy the cache)."""
    from .model import load_clip

    load_clip(model, pretrained, cache_dir=cache_dir or None)
    typer.echo(f"cached {model}/{pretrained}" + (f" in {cache_dir}" if cache_dir else " in the Hugging Face cache"))


@app.command("fetch-data")
@user_errors
def fetch_data(run_config: RunConfigOpt = None) -> None:
    """Download the configured hub dataset into the datasets cache."""
    from . import config
    from .data import load_source

    cfg = config.load(run_config)
    src = load_source(cfg.data)
    typer.echo(f"cached {cfg.data.dataset}: {len(src)} examples, {len(src.class_names)} classes, domains {src.domain_names()}")


@app.command("train-local")
@user_errors
def train_local(
    run_config: RunConfigOpt = None,
    rounds: Annotated[int, typer.Option(help="Local rounds to run on partition 0.")] = 3,
    num_partitions: Annotated[int, typer.Option("--num-partitions", "-n")] = 1,
    partition_id: Annotated[int, typer.Option("--partition-id")] = 0,
    data_dir: Annotated[str, typer.Option("--data-dir")] = "",
) -> None:
    """Train one client centrally for a few rounds and print loss, accuracy and ECE (a sanity check)."""
    from . import config
    from client.runtime import ClientRuntime

    cfg = config.load(run_config)
    node = config.parse_node_config({"partition-id": partition_id, "num-partitions": num_partitions, "data-dir": data_dir})
    rt = ClientRuntime.create(cfg, node)
    state = rt.method.trainable_state()
    for r in range(1, rounds + 1):
        out = rt.train(state, server_round=r, fl_config={})
        state = out.state
        ev = rt.evaluate_split("test")
        typer.echo(f"round {r}: train loss {out.metrics['train-loss']:.4f}  test acc {ev.stats.accuracy():.4f}  ECE {ev.stats.ece():.4f}  ({out.metrics['local-steps']} steps, {out.metrics['train-seconds']:.1f}s)")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
