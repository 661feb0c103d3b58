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
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.calibration import CalibrationStats
from common.config import ConfigError, RunConfig, expand_path

_PREFIX = re.compile(r"^(train|val|test)(-ts)?-bin-count$")


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


def parse_eval_reply(node_id: int, identity: dict, metrics: dict, ts_mode: str) -> list[ClientEval]:
    """Split one evaluate reply's MetricRecord into per-split (and per-TS) evaluations."""
    out = []
    for key in sorted(metrics):
        m = _PREFIX.match(key)
        if not m:
            continue
        split, ts = m.group(1), bool(m.group(2))
        prefix = f"{split}{'-ts' if ts else ''}-"
        stats = CalibrationStats.from_metrics(metrics, prefix)
        stats10 = CalibrationStats.from_metrics(metrics, prefix + "b10-")
        ace = metrics.get(prefix + "adaptive-ece")
        out.append(ClientEval(
            node_id, int(identity["partition-id"]), str(identity["domain"]), str(identity["role"]), split,
            ts_mode if ts else "none", float(metrics.get(prefix + "temperature", 1.0)), stats, stats10,
            None if ace is None or ace != ace else float(ace),
        ))
    return out


def pool(evals: list[ClientEval], server_round: int) -> list[dict[str, Any]]:
    """Pooled, per-group (seen/unseen) and per-domain rows from summed statistics (exact)."""
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
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method.name}-{cfg.fl.aggregator}-{stamp}"


@dataclass
class RunDirectory:
    path: Path
    name: str
    resumed: bool = False
    _fh: Any = field(default=None, repr=False)

    @classmethod
    def create(cls, cfg: RunConfig) -> RunDirectory:
        if cfg.output.resume:
            path = expand_path(cfg.output.resume, "output.resume")
            if path.name in ("checkpoints",) or path.parent.name == "checkpoints":
                path = path.parent if path.name == "checkpoints" else path.parent.parent
            if not (path / "config.json").is_file():
                raise ConfigError(f"output.resume={cfg.output.resume!r} is not a fedcal run folder (no config.json); pass the folder a run wrote")
            _check_compatible(cfg, json.loads((path / "config.json").read_text()))
            run = cls(path, path.name, resumed=True)
        else:
            root = expand_path(cfg.output.dir, "output.dir")
            name = cfg.output.run_name or default_run_name(cfg)
            path = root / name
            if (path / "metrics.jsonl").exists():
                raise ConfigError(f"run folder {path} already holds a run: choose another output.run_name, or resume it with output.resume={str(path)!r}")
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text(json.dumps(cfg.flat(), indent=2, sort_keys=True))
            run = cls(path, name)
        run._fh = open(run.path / "metrics.jsonl", "a", encoding="utf-8")
        return run

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._fh.write(json.dumps({"time": round(time.time(), 3), **row}, default=_jsonable) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


# keys that may differ between the interrupted run and its resumption
_RESUME_FREE = ("fl.rounds", "output.", "monitoring.", "fl.round_timeout", "fl.node_wait_timeout", "fault.", "model.device", "model.cache_dir", "data.cache_dir", "data.num_workers", "optim.num_threads", "eval.diagrams")


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
