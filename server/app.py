"""The ServerApp (Flower 1.42 Message API): one federated run from start to report.

1. Validate the run configuration; open (or resume) the run folder; start the Prometheus exporter.
2. Wait (bounded) for ``fl.min_available_nodes`` SuperNodes and ask each for its identity.
3. Build the method once (CPU) to get the initial trainable state — or load the last checkpoint.
4. Run Flower's ``Strategy.start`` with fedcal's strategy for the remaining rounds.
5. Save the final state with the federated temperature, write summary.json / summary.md /
   reliability diagrams, push/linger the final metrics.
"""

from __future__ import annotations

import gc
import logging
import time

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, RunConfig, from_flower
from common.hub import HubUnavailable
from common.tensors import Manifest, pack, unpack

from . import checkpoint, report
from .ledger import Ledger, totals_from_rows
from .monitoring import Monitor
from .nodes import FederationError, NodeRegistry
from .polling import QuickPolling
from .records import RunDirectory, atomic_text
from .strategy import SimulatedCrash, build_strategy

log = logging.getLogger("flwr.fedcal")
app = ServerApp()


class RunFailed(RuntimeError):
    """A run stopped for a reason the operator can fix; the message is one line."""


def initial_trainable_state(cfg: RunConfig, class_names: list[str]) -> tuple[dict, dict]:
    """Build CLIP and the method once on the CPU; return its initial trainable state and sizes."""
    from common.methods import build_method
    from common.model import load_clip

    clip = load_clip(cfg.model.name, cfg.model.pretrained, device="cpu", precision=cfg.model.precision,
                     cache_dir=cfg.model.cache_dir or None, offline=cfg.model.offline)
    method = build_method(cfg, clip, class_names, seed=cfg.optim.seed)
    state, info = method.trainable_state(), method.sizes()
    del method, clip
    gc.collect()
    return state, info


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_federation(grid, context)
    except (ConfigError, FederationError, HubUnavailable) as err:
        log.error("fedcal run failed: %s", err)
        raise RunFailed(str(err)) from None


def run_federation(grid: Grid, context: Context) -> dict:
    cfg = from_flower(dict(context.run_config))
    grid = QuickPolling(grid, cfg.fl.poll_interval)  # type: ignore[assignment] - a Grid in everything but its class
    run = RunDirectory.create(cfg, owner=f"Flower run {context.run_id}")
    try:
        return _run_in(run, cfg, grid)
    except SimulatedCrash:
        raise  # test only: behave as a crash would, leave the status as it is
    except BaseException as err:
        write_status(run.path, "failed", f"{type(err).__name__}: {err}")
        raise
    finally:
        run.close()


def _quiet_flower(verbose: bool) -> None:
    """Flower's per-round INFO lines (sampling, metric dumps) off unless asked for; fedcal's stay."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        log.setLevel(logging.INFO)


def _run_in(run: RunDirectory, cfg: RunConfig, grid: Grid) -> dict:
    write_status(run.path, "running")
    _quiet_flower(cfg.output.verbose)
    monitor = Monitor(cfg, run.name)
    log.info("fedcal run %s (%s, %s on %s, %d rounds) -> %s", run.name, "resumed" if run.resumed else "new",
             cfg.method.name, cfg.model.name, cfg.fl.rounds, run.path)
    try:
        ledger = Ledger(run, monitor)
        start_round, ckpt = 0, None
        if run.resumed:
            folder = checkpoint.latest(run.path)
            if folder is None:
                raise ConfigError(f"output.resume: {run.path} has no checkpoint yet; start a new run instead")
            ckpt = checkpoint.load(folder)
            start_round = ckpt.round
            # one-phase rounds evaluate round k's state in round k+1's phase: after checkpoint k it is still to do
            redo = cfg.fl.schedule == "one-phase" and start_round < cfg.fl.rounds
            ledger.restore(totals_from_rows(run.keep_rounds_up_to(start_round, redo_evaluation=redo)))
            log.info("resuming %s after round %d", run.name, start_round)
        registry = NodeRegistry(info_timeout=cfg.fl.round_timeout)
        log.info("waiting for %d SuperNodes (fl.min_available_nodes, at most fl.node_wait_timeout=%gs)", cfg.fl.min_available_nodes, cfg.fl.node_wait_timeout)
        registry.wait_for_nodes(grid, cfg.fl.min_available_nodes, cfg.fl.node_wait_timeout)
        log.info("asking the SuperNodes for their partition (each loads its data once)")
        registry.discover(grid, ledger, 0)  # round 0: the start (a resumed run re-admits every node)
        ledger.flush()
        if registry.num_seen() < cfg.fl.min_train_nodes:
            raise FederationError(f"fl.min_train_nodes={cfg.fl.min_train_nodes} but only {registry.num_seen()} connected clients may train "
                                  f"({len(registry.info) - registry.num_seen()} are held out): lower fl.min_train_nodes or add SuperNodes")
        if ckpt is not None:
            state, sizes = ckpt.global_state, ckpt.meta.get("sizes", {})
        else:
            log.info("building the initial trainable state (%s, %s, weights %s)", cfg.model.name, cfg.method.name, cfg.model.pretrained or "random init")
            state, sizes = initial_trainable_state(cfg, registry.class_names())
            log.info("%s: %s trainable parameters of %s (%s bytes per update)", cfg.method.name,
                     f"{sizes['trainable_params']:,}", f"{sizes['total_params']:,}", f"{sizes['update_bytes']:,}")
        trainable = bool(state)
        strategy = build_strategy(cfg, run, registry, monitor, round_offset=start_round, trainable=trainable, ledger=ledger)
        strategy.extra_meta = {"sizes": sizes}
        if ckpt is not None:
            strategy.restore(ckpt)
        remaining = cfg.fl.rounds - start_round
        manifest = Manifest.of(state.items())
        strategy.manifest = manifest
        final_arrays = pack(state, manifest)
        t0 = time.monotonic()
        if remaining > 0:
            result = strategy.start(
                grid=grid, initial_arrays=final_arrays, num_rounds=remaining, timeout=cfg.fl.round_timeout,
                train_config=ConfigRecord({"run-name": run.name}), evaluate_config=ConfigRecord({"run-name": run.name}),
                evaluate_fn=strategy.end_of_round,
            )
            if len(result.arrays):
                final_arrays = result.arrays
        else:
            log.info("run %s already completed %d rounds", run.name, start_round)
        if strategy.tb is not None:
            strategy.tb.close()
        final_state = unpack(final_arrays, manifest)
        checkpoint.save_final(run.path, cfg.fl.rounds, final_state, {"temperature": strategy.temperature, "best": strategy.best, "sizes": sizes})
        summary = report.build(run.path, extra={"sizes": sizes, "best": strategy.best, "wall_seconds": time.monotonic() - t0},
                               diagrams=cfg.eval.diagrams)
        _log_final(summary)
        write_status(run.path, "completed")
        return summary
    finally:
        monitor.finish()


def write_status(run_dir, status: str, reason: str = "") -> None:
    """``status.json``: running, completed or failed (with the one-line reason); `fedcal run` reads it."""
    import json

    text = json.dumps({"status": status, "reason": reason.splitlines()[0] if reason else "", "time": time.time()})
    try:
        atomic_text(run_dir / "status.json", text)
    except OSError as err:
        log.error("cannot write %s: %s", run_dir / "status.json", err)


def _log_final(summary: dict) -> None:
    for row in summary.get("pooled", []):
        log.info("final %s %s: accuracy %.4f ECE %.4f NLL %.4f (%d clients)", row["split"],
                 "raw" if row["ts"] == "none" else f"after TS ({row['ts']})", row["accuracy"] or 0, row["ece"] or 0, row["nll"] or 0, row["clients"])
    log.info("records, summary and diagrams: %s", summary["run_dir"])
