"""End-of-run report: summary.json, summary.md and reliability diagrams, from metrics.jsonl alone.

Everything is recomputed from the calibration sums stored in the records, so ``fedcal report
<run-dir>`` regenerates the same files for any finished or interrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.calibration import CalibrationStats, reliability_diagram

from .ledger import totals_from_rows
from .records import read_records


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


def build(run_dir: Path, extra: dict[str, Any] | None = None, diagrams: bool = True) -> dict[str, Any]:
    """Write summary.json, summary.md and diagrams/ for the last evaluated round; return the summary."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    evaluated = [r["round"] for r in records if r["kind"] in ("client", "pooled")]
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    summary: dict[str, Any] = {"run": run_dir.name, "run_dir": str(run_dir), "rounds": config.get("fl.rounds"),
                               "method": config.get("method.name"), "aggregator": config.get("fl.aggregator"), "model": config.get("model.name")}
    summary.update(extra or {})
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
    md += ["", f"Traffic: {summary['bytes_sent']:,} bytes sent, {summary['bytes_received']:,} received (trainable state only). "
           f"Rejected updates: {summary['rejected_updates']}. Missing replies: {len(summary['missing_replies'])}.", ""]
    (run_dir / "summary.md").write_text("\n".join(md))

    if diagrams:
        out = run_dir / "diagrams"
        for r in final:
            if r["kind"] == "pooled":
                name = f"pooled-{r['split']}" + ("" if r["ts"] == "none" else "-ts")
                title = f"pooled {r['split']}, round {last}" + ("" if r["ts"] == "none" else f", after TS ({r['ts']})")
            elif r["kind"] == "client":
                name = f"client-{r['partition']:03d}-{r['split']}" + ("" if r["ts"] == "none" else "-ts")
                title = f"client {r['partition']} ({r['domain']}, {r['role']}) {r['split']}, round {last}" + ("" if r["ts"] == "none" else f", T={r['temperature']:.3f}")
            else:
                continue
            reliability_diagram(CalibrationStats.from_metrics(r["stats"]), out / f"{name}.png", title)
    return summary
