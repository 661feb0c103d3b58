"""The run directory and its records: one JSON line per client per round, exact pooled lines.

``<output.dir>/<run-name>/``
    config.json      the resolved configuration (flat keys)
    metrics.jsonl    one JSON object per line, ``kind`` says what it is:
                     client  - one client's evaluation of one split (before or after TS), with its
                               calibration sums under "stats" so anything can be recomputed
                     pooled / group / domain - the same metrics from the summed statistics of all
                               clients / of seen or unseen clients / of one domain (exact)
                     train   - one client's training metrics; rejected / missing / failed - replies
                               that were dropped, never came, or came back as errors
                     temperature - federated temperature scaling; round - round totals
    checkpoints/     see server/checkpoint.py;  summary.json, summary.md, diagrams/ at the end

Every line is flushed and fsync'ed before the next round starts.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import runlock
from common.calibration import CalibrationStats
from common.config import ConfigError, RunConfig, expand_path


def summarize(stats: CalibrationStats, stats10: CalibrationStats | None = None, adaptive: float | None = None) -> dict[str, Any]:
    """The scalar figures the papers report, from exact sums."""
    out = {
        "n": int(stats.total),
        "accuracy": stats.accuracy(),
        "ece": stats.ece(),
        "ece10": stats10.ece() if stats10 is not None else None,
        "adaptive_ece": adaptive,
        "mce": stats.mce(),
        "classwise_ece": stats.classwise_ece(),
        "nll": stats.nll(),
        "brier": stats.brier(),
        "mean_confidence": stats.mean_confidence(),
    }
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}


@dataclass
class ClientEval:
    """One client's evaluation of one split, before (ts='none') or after temperature scaling."""

    node_id: int
    partition: int
    domain: str
    role: str
    split: str
    ts: str
    temperature: float
    stats: CalibrationStats
    stats10: CalibrationStats
    adaptive_ece: float | None

    def row(self, server_round: int) -> dict[str, Any]:
        return {
            "kind": "client", "round": server_round, "node_id": self.node_id, "partition": self.partition,
            "domain": self.domain, "role": self.role, "split": self.split, "ts": self.ts, "temperature": self.temperature,
            **summarize(self.stats, self.stats10, self.adaptive_ece),
            "stats": self.stats.to_metrics(), "stats10": self.stats10.to_metrics(),
        }


EVALUATION_KINDS = ("client", "pooled", "group", "domain", "temperature")


def is_evaluation_row(row: dict[str, Any]) -> bool:
    """A row written by a round's evaluation (figures, temperature, the outcome of an evaluate or nll-grid reply)."""
    return row.get("kind") in EVALUATION_KINDS or row.get("phase") in ("evaluate", "nll-grid")


def pool(evals: list[ClientEval], server_round: int) -> list[dict[str, Any]]:
    """Pooled, per-group (seen/unseen) and per-domain rows from summed statistics (exact).

    The sums run in partition order, so the figures do not depend on the order replies arrived in
    (floating-point addition is not associative: a resumed run must record the same bits)."""
    evals = sorted(evals, key=lambda e: (e.partition, e.split, e.ts))
    rows = []
    keys = sorted({(e.split, e.ts) for e in evals})
    for split, ts in keys:
        chosen = [e for e in evals if e.split == split and e.ts == ts]
        groups: list[tuple[str, str, list[ClientEval]]] = [("pooled", "all", chosen)]
        groups += [("group", role, [e for e in chosen if e.role == role]) for role in ("seen", "unseen")]
        groups += [("domain", dom, [e for e in chosen if e.domain == dom]) for dom in sorted({e.domain for e in chosen})]
        for kind, name, members in groups:
            if not members:
                continue
            stats, stats10 = sum(e.stats for e in members), sum(e.stats10 for e in members)
            rows.append({
                "kind": kind, "round": server_round, "group": name, "split": split, "ts": ts, "clients": len(members),
                **summarize(stats, stats10), "stats": stats.to_metrics(),
            })
    return rows


def default_run_name(cfg: RunConfig) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method.name}-{cfg.fl.aggregator}-{stamp}"


class RunFolderBusy(ConfigError):
    """Another ServerApp holds the run folder's lock."""


@dataclass
class RunDirectory:
    """One run folder with exactly one writer: the ServerApp holds ``.lock`` (an ``flock``, released
    by the kernel even on ``kill -9``) from before its first write until it ends."""

    path: Path
    name: str
    resumed: bool = False
    _fh: Any = field(default=None, repr=False)
    _lock: Any = field(default=None, repr=False)
    _unwritten: list = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, cfg: RunConfig, owner: str = "") -> RunDirectory:
        if cfg.output.resume:
            path = expand_path(cfg.output.resume, "output.resume")
            if path.name in ("checkpoints",) or path.parent.name == "checkpoints":
                path = path.parent if path.name == "checkpoints" else path.parent.parent
            if not (path / "config.json").is_file():
                raise ConfigError(f"output.resume={cfg.output.resume!r} is not a fedcal run folder (no config.json); pass the folder a run wrote")
            run = cls(path, path.name, resumed=True)
            run._acquire(owner)
            _check_compatible(cfg, _read_config(path))
        else:
            root = expand_path(cfg.output.dir, "output.dir")
            name = cfg.output.run_name or default_run_name(cfg)
            path = root / name
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"output.dir: cannot create the run folder {path} ({err.strerror}); set output.dir to a writable folder") from None
            run = cls(path, name)
            run._acquire(owner)
            if (path / "metrics.jsonl").exists():
                run.close()
                raise ConfigError(f"run folder {path} already holds a run: choose another output.run_name, or resume it with output.resume={str(path)!r}")
            atomic_text(path / "config.json", json.dumps(cfg.flat(), indent=2, sort_keys=True))
        run._fh = open(run.path / "metrics.jsonl", "a", encoding="utf-8")
        return run

    def _acquire(self, owner: str) -> None:
        try:
            self._lock = runlock.acquire(self.path, owner)
        except OSError as err:
            raise ConfigError(f"output.dir: cannot write in {self.path} ({err.strerror}); choose a writable folder") from None
        if self._lock is None:
            raise RunFolderBusy(f"run folder {self.path} is in use by {runlock.holder(self.path) or 'another process'}: "
                                "stop that run first (`flwr stop <run-id>`) or wait for it to end")

    def keep_rounds_up_to(self, last_round: int, redo_evaluation: bool = False) -> list[dict[str, Any]]:
        """Resume: cut a torn last line, drop rows of rounds after the checkpoint and every join row
        (all nodes join again), so that the records continue exactly as an uninterrupted run's.
        ``redo_evaluation``: the checkpointed round's evaluation is done again (one-phase rounds
        carry it in the next round's phase), so its rows are dropped too."""
        path = self.path / "metrics.jsonl"
        kept, lines = [], []
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # empty, or torn by a crash
                if isinstance(row, dict) and row.get("round", 0) <= last_round and row.get("phase") != "join" \
                        and not (redo_evaluation and row.get("round") == last_round and is_evaluation_row(row)):
                    kept.append(row)
                    lines.append(line)
        if self._fh:
            self._fh.close()
        atomic_text(path, "".join(line + "\n" for line in lines))
        self._fh = open(path, "a", encoding="utf-8")
        return kept

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (strict JSON: non-finite numbers become null), flushed and fsync'ed. A failed
        write (disk full) is logged and retried with the next write; it never ends the run."""
        self._unwritten += [json.dumps(_finite({"time": round(time.time(), 3), **row}), default=_jsonable, allow_nan=False) + "\n" for row in rows]
        if not self._unwritten or self._fh is None:
            return
        try:
            self._fh.write("".join(self._unwritten))
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._unwritten = []
        except OSError as err:
            import logging

            logging.getLogger("flwr.fedcal").error("cannot write %s (%s); %d rows are kept and retried with the next write",
                                                   self.path / "metrics.jsonl", err.strerror, len(self._unwritten))

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._lock:
            self._lock.close()  # releases the flock
            self._lock = None


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads((path / "config.json").read_text())
        if not isinstance(saved, dict):
            raise ValueError("not an object")
        return saved
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path / 'config.json'} is unreadable ({err}); it cannot be resumed: start a new run") from None


def _finite(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# keys that may differ between the interrupted run and its resumption
_RESUME_FREE = ("fl.rounds", "output.", "monitoring.", "fl.round_timeout", "fl.node_wait_timeout", "fl.poll_interval", "fault.", "model.device", "model.cache_dir", "data.cache_dir", "data.num_workers", "optim.num_threads", "eval.diagrams")


def _check_compatible(cfg: RunConfig, saved: dict[str, Any]) -> None:
    for key, value in cfg.flat().items():
        if key.startswith(_RESUME_FREE) or key not in saved:
            continue
        if saved[key] != value:
            raise ConfigError(f"output.resume: {key}={value!r} differs from the interrupted run's {saved[key]!r}; resume with the same configuration")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
