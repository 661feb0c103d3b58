"""End-of-run report: summary.json, summary.md and reliability diagrams, from metrics.jsonl alone.

Everything is recomputed from the calibration sums stored in the records, so ``fedcal report
<run-dir>`` regenerates the same files for any finished or interrupted run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.calibration import CalibrationStats

from . import figures, paper
from .ledger import totals_from_rows
from .records import read_records

ROUND_COLUMNS = ["round", "split", "ts", "kind", "group", "partition", "domain", "role", "clients", "n", "accuracy", "ece", "ece10",
                 "adaptive_ece", "mce", "classwise_ece", "nll", "brier", "temperature", "bytes_sent", "bytes_received",
                 "accuracy_std", "ece_std", "ece10_std"]
# kind "client-mean": the papers' convention, each figure averaged over the clients without weights (std beside)
MEAN_COLUMNS = ("accuracy", "ece", "ece10", "adaptive_ece", "mce", "classwise_ece", "nll", "brier")


def client_mean_rows(records: list[dict]) -> list[dict]:
    """Per round, split and TS setting: the unweighted mean (and population std) over clients."""
    clients = [r for r in records if r["kind"] == "client"]
    out = []
    for rnd, split, ts in sorted({(r["round"], r["split"], r["ts"]) for r in clients}):
        members = [r for r in clients if (r["round"], r["split"], r["ts"]) == (rnd, split, ts)]
        row: dict[str, Any] = {k: None for k in ROUND_COLUMNS}
        row.update(round=rnd, split=split, ts=ts, kind="client-mean", group="client-mean", clients=len(members), n=sum(r["n"] for r in members))
        for key in MEAN_COLUMNS:
            vals = [r[key] for r in members if r.get(key) is not None]
            row[key] = float(np.mean(vals)) if vals else None
            if key in ("accuracy", "ece", "ece10"):
                row[f"{key}_std"] = float(np.std(vals)) if vals else None
        out.append(row)
    return out


def rounds_table(records: list[dict]) -> list[dict]:
    """One row per round, split, TS setting and group (pooled, seen/unseen, domain) or client."""
    temps = {r["round"]: r["temperature"] for r in records if r["kind"] == "temperature"}
    traffic = {r["round"]: r for r in records if r["kind"] == "round"}
    table = []
    for r in records:
        if r["kind"] not in ("pooled", "group", "domain", "client"):
            continue
        row = {k: r.get(k) for k in ROUND_COLUMNS}
        if r["kind"] == "client":
            row.update(group=f"client-{r['partition']}", clients=1)
        else:
            row["temperature"] = temps.get(r["round"]) if r["ts"] == "global" else (None if r["ts"] != "none" else 1.0)
        t = traffic.get(r["round"], {})
        row.update(bytes_sent=t.get("bytes_sent"), bytes_received=t.get("bytes_received"))
        table.append(row)
    table += client_mean_rows(records)
    order = {"pooled": 0, "group": 1, "domain": 2, "client-mean": 3, "client": 4}
    return sorted(table, key=lambda x: (x["round"], x["split"], x["ts"], order[x["kind"]], str(x["group"])))


def headline_split(table: list[dict]) -> str:
    splits = {r["split"] for r in table}
    return "test" if "test" in splits or not splits else sorted(splits)[0]


def write_round_outputs(run_dir: Path, records: list[dict] | None = None) -> list[dict]:
    """rounds.csv and the curves (PNG + PDF), rebuilt from the records after every round."""
    run_dir = Path(run_dir)
    table = rounds_table(read_records(run_dir) if records is None else records)
    tmp = run_dir / "rounds.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROUND_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(run_dir / "rounds.csv")
    if table:
        figures.curves(table, run_dir / "curves", headline_split(table))
    return table


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.4f}"
    return str(v)


def _table(rows: list[dict], columns: list[tuple[str, str, bool]]) -> list[str]:
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(key), pct) for key, _, pct in columns) + " |")
    return lines


METRIC_COLUMNS = [("accuracy", "acc %", True), ("ece", "ECE %", True), ("ece10", "ECE10 %", True), ("adaptive_ece", "AdaECE %", True),
                  ("mce", "MCE %", True), ("classwise_ece", "cw-ECE %", True), ("nll", "NLL", False), ("brier", "Brier", False), ("n", "n", False)]


def build(run_dir: Path, extra: dict[str, Any] | None = None, diagrams: bool = True, last_k: int | None = None) -> dict[str, Any]:
    """Write summary.json, summary.md and diagrams/ for the last evaluated round; return the summary.

    ``last_k`` (default: the run's ``output.paper_last_k``) is the window of the papers'
    last-rounds mean (server/paper.py)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    evaluated = [r["round"] for r in records if r["kind"] in ("client", "pooled")]
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    last_k = last_k or int(config.get("output.paper_last_k", paper.DEFAULT_LAST_K))
    summary: dict[str, Any] = {"run": run_dir.name, "run_dir": str(run_dir), "rounds": config.get("fl.rounds"),
                               "method": config.get("method.name"), "aggregator": config.get("fl.aggregator"), "model": config.get("model.name")}
    summary.update(extra or {})
    summary["paper_last_k"] = last_k
    rounds_done = [r["round"] for r in records if r["kind"] == "round"]
    summary["completed_rounds"] = max(rounds_done) if rounds_done else 0
    summary["replies"] = totals_from_rows(records)  # the ledger's totals, from the records
    summary["rejected_updates"] = sum(summary["replies"]["rejected"].values())
    summary["missing_replies"] = [{"round": r["round"], "phase": r["phase"], "partition": r.get("partition")} for r in records if r["kind"] == "missing"]
    summary["failed_replies"] = sum(summary["replies"]["failed"].values())
    summary["bytes_sent"] = sum(r.get("bytes_sent", 0) for r in records if r["kind"] == "round")
    summary["bytes_received"] = sum(r.get("bytes_received", 0) for r in records if r["kind"] == "round")
    temps = [r for r in records if r["kind"] == "temperature"]
    summary["temperature"] = temps[-1] if temps else None
    if not evaluated:
        summary["final_round"] = None
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (run_dir / "summary.md").write_text(f"# {run_dir.name}\n\nNo evaluated round yet.\n")
        return summary
    last = max(evaluated)
    final = [r for r in records if r["round"] == last and r["kind"] in ("client", "pooled", "group", "domain")]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("stats", "stats10", "time")}  # noqa: E731
    summary["final_round"] = last
    summary["pooled"] = [strip(r) for r in final if r["kind"] == "pooled"]
    summary["groups"] = [strip(r) for r in final if r["kind"] == "group"]
    summary["domains"] = [strip(r) for r in final if r["kind"] == "domain"]
    summary["clients"] = [strip(r) for r in final if r["kind"] == "client"]
    summary["paper_last_k"] = last_k
    summary["paper"] = paper.conventions(records, last_k)  # unweighted client means, last-k means, ECE x100
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    md = [f"# fedcal run `{run_dir.name}`", "",
          f"{summary['method']} on {summary['model']}, aggregator {summary['aggregator']}; figures after round {last} of {summary['rounds']}.",
          "Percentages are x100; `ts` = temperature scaling applied (`none` = raw model).", ""]
    if summary["temperature"]:
        t = summary["temperature"]
        md += [f"Federated temperature ({t['mode']}): **T = {t['temperature']:.4f}** (pooled NLL {_fmt(t.get('nll_at_1'))} -> {_fmt(t.get('nll_at_t'))}).", ""]
    md += ["## Pooled (from summed client statistics) and groups", ""]
    pooled_rows = sorted(summary["pooled"] + summary["groups"] + summary["domains"], key=lambda r: (r["split"], r["ts"], r["kind"] != "pooled", r["kind"], r["group"]))
    md += _table(pooled_rows, [("split", "split", False), ("ts", "ts", False), ("kind", "kind", False), ("group", "group", False), ("clients", "clients", False)] + METRIC_COLUMNS)
    md += ["", "## Per client", ""]
    client_rows = sorted(summary["clients"], key=lambda r: (r["split"], r["ts"], r["partition"]))
    md += _table(client_rows, [("partition", "client", False), ("domain", "domain", False), ("role", "role", False), ("split", "split", False),
                               ("ts", "ts", False), ("temperature", "T", False)] + METRIC_COLUMNS)
    md += ["", "## Paper conventions (beside the exact figures above)", "", paper.table(records, "fl2ora", last_k, run_dir)]
    md += ["", f"Traffic: {summary['bytes_sent']:,} bytes sent, {summary['bytes_received']:,} received (trainable state only). "
           f"Rejected updates: {summary['rejected_updates']}. Missing replies: {len(summary['missing_replies'])}.", ""]
    (run_dir / "summary.md").write_text("\n".join(md))

    write_round_outputs(run_dir, records)
    if diagrams:
        write_diagrams(run_dir / "diagrams", final, last)
    return summary


def write_diagrams(out: Path, final: list[dict], last: int) -> None:
    """Per split, pooled and per client: the raw model and, beside it, after temperature scaling."""
    for r in final:
        if r["ts"] != "none" or r["kind"] not in ("pooled", "client"):
            continue
        same = [x for x in final if x["kind"] == r["kind"] and x["split"] == r["split"] and x.get("partition") == r.get("partition")]
        after = next((x for x in same if x["ts"] != "none"), None)
        who = "pooled" if r["kind"] == "pooled" else f"client {r['partition']} ({r['domain']}, {r['role']})"
        panels = [(CalibrationStats.from_metrics(r["stats"]), f"{who} {r['split']}, round {last}", None)]
        if after is not None:
            t = after.get("temperature")
            extra = {"T": f"{t:.3f}"} if isinstance(t, float) else None
            panels.append((CalibrationStats.from_metrics(after["stats"]), f"after TS ({after['ts']})", extra))
        name = "pooled" if r["kind"] == "pooled" else f"client-{r['partition']:03d}"
        figures.reliability(panels, out / f"{name}-{r['split']}")


COMPARE_COLUMNS = [("run", "run"), ("method", "method"), ("aggregator", "aggregator"), ("rounds", "rounds"), ("accuracy", "acc %"),
                   ("ece", "ECE %"), ("ece_ts", "ECE after TS %"), ("nll", "NLL"), ("bytes_per_round", "bytes/round"), ("wall_seconds", "wall s")]


def compare(run_dirs: list[Path], out: Path | None = None) -> list[dict[str, Any]]:
    """One row per run (final pooled figures on the headline split) and, with ``out``, an overlay plot."""
    rows, tables = [], []
    for run_dir in map(Path, run_dirs):
        records = read_records(run_dir)
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
        table = rounds_table(records)
        split = headline_split(table)
        pooled = [r for r in table if r["kind"] == "pooled" and r["split"] == split]
        last = max((r["round"] for r in pooled), default=None)
        raw = next((r for r in pooled if r["round"] == last and r["ts"] == "none"), {})
        ts = next((r for r in pooled if r["round"] == last and r["ts"] != "none"), {})
        rounds = [r for r in records if r["kind"] == "round"]
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        rows.append({"run": run_dir.name, "method": config.get("method.name"), "aggregator": config.get("fl.aggregator"), "rounds": len(rounds),
                     "split": split, "accuracy": raw.get("accuracy"), "ece": raw.get("ece"), "ece_ts": ts.get("ece"), "nll": raw.get("nll"),
                     "bytes_per_round": (sum(r.get("bytes_sent", 0) + r.get("bytes_received", 0) for r in rounds) // len(rounds)) if rounds else None,
                     "wall_seconds": summary.get("wall_seconds", sum(r.get("seconds", 0) for r in rounds))})
        tables.append((run_dir.name, table))
    if out is not None and tables:
        figures.overlay(tables, Path(out), headline_split(tables[0][1]))
    return rows


def compare_markdown(rows: list[dict[str, Any]]) -> str:
    pct = {"accuracy", "ece", "ece_ts"}
    lines = ["| " + " | ".join(title for _, title in COMPARE_COLUMNS) + " |", "|" + "---|" * len(COMPARE_COLUMNS)]
    for r in rows:
        cells = [_fmt(r.get(k), k in pct) if not isinstance(r.get(k), int) or k in pct else f"{r[k]:,}" for k, _ in COMPARE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
