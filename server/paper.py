"""The papers' reporting conventions, beside fedcal's exact pooled figures, from the records alone.

fedcal's headline figures are pooled from summed client statistics (exact). The papers report
otherwise, and a user who wants to put fedcal's numbers next to theirs needs the same arithmetic:

* **FL²oRA** (official ``federated_main.py``): every figure per client on its own test split,
  then averaged **without weights** across clients (mean ± std, population std as ``np.std``),
  per dataset and per domain; the printed number is the mean ± std over the **last 5 rounds** of
  that per-round client mean. ECE x100 with 10 equal-width bins; MCE weighted by the bin's share
  of samples (``max_b |acc_b - conf_b| n_b / N``).
* **FedCLIP** (official ``fed_at_clip.py``): per-domain test accuracy at the round with the best
  mean validation accuracy over the participating clients; the held-out (target) domain scored
  with the global model.
* **CaRot** (official ``eval.py``): accuracy and 10-bin ECE of the final model on the
  in-distribution set and on each distribution-shift set, and their OOD average.

:func:`conventions` computes the numbers (stored in ``summary.json`` under ``"paper"``);
:func:`table` lays them out like each paper's tables (``fedcal report --paper``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.calibration import CalibrationStats

PAPERS = ("fl2ora", "fedclip", "carot")
DEFAULT_LAST_K = 5


def _mean_std(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals))}


def _client_figures(row: dict) -> dict[str, float | None]:
    """One client row's figures in the papers' units (x100)."""
    s10 = CalibrationStats.from_metrics(row["stats10"])
    stats = CalibrationStats.from_metrics(row["stats"])
    pct = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else 100.0 * v  # noqa: E731
    return {
        "accuracy_x100": pct(row.get("accuracy")),
        "ece10_x100": pct(s10.ece()),
        f"ece{stats.n_bins}_x100": pct(stats.ece()),
        "mce10_weighted_x100": pct(s10.mce_count_weighted()),
    }


def _in_scope(rows: list[dict], scope: str) -> list[dict]:
    """``scope`` is "all" (every client) or "domain:<name>" (the clients of one domain)."""
    return rows if scope == "all" else [r for r in rows if r["domain"] == scope.split(":", 1)[1]]


def _per_round(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Unweighted mean ± std across the clients in ``rows`` of every figure."""
    figures = [_client_figures(r) for r in rows]
    keys = list(figures[0]) if figures else []
    return {k: _mean_std([f[k] for f in figures]) for k in keys}


def conventions(records: list[dict], last_k: int = DEFAULT_LAST_K) -> list[dict[str, Any]]:
    """Per (split, ts, scope): the final round's unweighted client mean ± std, and the mean ±
    std over the last ``last_k`` evaluated rounds of that per-round mean (FL²oRA's printout)."""
    clients = [r for r in records if r["kind"] == "client" and "stats10" in r]
    out = []
    for split, ts in sorted({(r["split"], r["ts"]) for r in clients}):
        chosen = [r for r in clients if r["split"] == split and r["ts"] == ts]
        rounds = sorted({r["round"] for r in chosen})
        window = rounds[-last_k:]
        by_round = {rnd: [r for r in chosen if r["round"] == rnd] for rnd in window}
        final_rows = [r for r in chosen if r["round"] == rounds[-1]]
        for scope in ["all"] + [f"domain:{d}" for d in sorted({r["domain"] for r in final_rows})]:
            per_round = {rnd: _per_round(_in_scope(by_round[rnd], scope)) for rnd in window if _in_scope(by_round[rnd], scope)}
            final = per_round.get(rounds[-1], {})
            last = {k: _mean_std([per_round[rnd][k]["mean"] for rnd in per_round]) for k in final}
            out.append({"split": split, "ts": ts, "scope": scope, "final_round": rounds[-1], "clients": len(_in_scope(final_rows, scope)),
                        "final": final, "last_k": last_k, "last_k_rounds": sorted(per_round), "over_last_k": last})
    return out


# ------------------------------------------------------------------------------------ tables
def _pm(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:.2f} ± {d['std']:.2f}"


def _fl2ora(records: list[dict], last_k: int, run_dir=None) -> list[str]:
    rows = [c for c in conventions(records, last_k) if c["split"] == "test"]
    lines = ["FL²oRA convention: per-client test figures averaged without weights (mean ± std across clients at the final",
             f"round, and mean ± std over the last {last_k} rounds of that mean); ECE x100, 10 bins; MCE weighted by bin mass.", "",
             "| scope | ts | clients | acc (final) | ECE (final) | MCE-w (final) | rounds | acc (last k) | ECE (last k) | MCE-w (last k) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        f, k = c["final"], c["over_last_k"]
        span = f"{c['last_k_rounds'][0]}-{c['last_k_rounds'][-1]}" if c["last_k_rounds"] else "-"
        lines.append(f"| {c['scope']} | {c['ts']} | {c['clients']} | {_pm(f.get('accuracy_x100'))} | {_pm(f.get('ece10_x100'))} | "
                     f"{_pm(f.get('mce10_weighted_x100'))} | {span} | {_pm(k.get('accuracy_x100'))} | {_pm(k.get('ece10_x100'))} | {_pm(k.get('mce10_weighted_x100'))} |")
    return lines + _global_rows(run_dir)


def _global_rows(run_dir) -> list[str]:
    """FL²oRA's global figures (base / novel) written by `fedcal evaluate`, one row each."""
    import json
    from pathlib import Path

    lines = []
    for path in sorted(Path(run_dir).glob("global-*.json")) if run_dir else []:
        for r in json.loads(path.read_text()):
            lines.append(f"| global {r['name']} | {r['ts']} | 1 | {_pct(r['accuracy'])} | {_pct(r['ece10'])} | {_pct(r['mce10_weighted'])} | {r['round']} | - | - | - |")
    return lines


def _best_val_round(records: list[dict]) -> tuple[int | None, str]:
    val = [r for r in records if r["kind"] == "client" and r["split"] == "val" and r["ts"] == "none" and r.get("role") == "seen"]
    if not val:
        last = max((r["round"] for r in records if r["kind"] == "client" and r["ts"] == "none"), default=None)
        return last, "last round (no validation split recorded)"
    means = {rnd: float(np.mean([r["accuracy"] for r in val if r["round"] == rnd])) for rnd in sorted({r["round"] for r in val})}
    best = max(means, key=lambda rnd: (means[rnd], -rnd))  # earliest round among ties
    return best, f"round {best}, best mean validation accuracy of the participating clients ({100 * means[best]:.2f})"


def _fedclip(records: list[dict], last_k: int, run_dir=None) -> list[str]:
    rnd, why = _best_val_round(records)
    lines = [f"FedCLIP convention: test accuracy per domain at {why}; the held-out (target) domain is scored with the global model.", "",
             "| domain | role | clients | acc % | ECE % (10 bins) |", "|---|---|---|---|---|"]
    domains = [r for r in records if r["kind"] == "domain" and r["round"] == rnd and r["split"] == "test" and r["ts"] == "none"]
    roles = {r["domain"]: r["role"] for r in records if r["kind"] == "client" and r["round"] == rnd}
    accs = {"seen": [], "unseen": []}
    for d in sorted(domains, key=lambda r: (roles.get(r["group"], ""), r["group"])):
        role = roles.get(d["group"], "?")
        accs.setdefault(role, []).append(d["accuracy"])
        lines.append(f"| {d['group']} | {role} | {d['clients']} | {100 * d['accuracy']:.2f} | {_pct(d.get('ece10'))} |")
    for role, label in (("unseen", "avg target (held-out) domains"), ("seen", "avg participating domains")):
        if accs.get(role):
            lines.append(f"| {label} | {role} | - | {100 * float(np.mean(accs[role])):.2f} | - |")
    return lines


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _id_domains(run_dir) -> set[str]:
    import json
    from pathlib import Path

    path = Path(run_dir) / "config.json" if run_dir else None
    saved = json.loads(path.read_text()) if path and path.is_file() else {}
    return {d.strip() for d in str(saved.get("data.id_eval_domains", "")).split(",") if d.strip()}


def _carot(records: list[dict], last_k: int, run_dir=None) -> list[str]:
    last = max((r["round"] for r in records if r["kind"] == "pooled" and r["split"] == "test"), default=None)
    rows = [r for r in records if r["round"] == last and r.get("split") == "test" and r.get("ts") == "none"]
    seen = next((r for r in rows if r["kind"] == "group" and r["group"] == "seen"), None)
    roles = {r["domain"]: r["role"] for r in records if r["kind"] == "client" and r["round"] == last}
    held = sorted((r for r in rows if r["kind"] == "domain" and roles.get(r["group"]) == "unseen"), key=lambda r: r["group"])
    id_names = _id_domains(run_dir)
    in_dist = [r for r in held if r["group"] in id_names]
    ood = [r for r in held if r["group"] not in id_names]
    cols = ([("ID (seen clients' test)", seen)] if seen else []) + [(f"ID: {r['group']}", r) for r in in_dist] + [(r["group"], r) for r in ood]
    lines = [f"CaRot convention: accuracy % / ECE x100 (10 bins) of the final model (round {last}), in-distribution and per shifted set.", "",
             "| " + " | ".join(name for name, _ in cols) + (" | OOD avg |" if ood else " |"),
             "|" + "---|" * (len(cols) + (1 if ood else 0))]
    cells = [f"{_pct(r['accuracy'])} / {_pct(r.get('ece10'))}" for _, r in cols]
    if ood:
        cells.append(f"{100 * float(np.mean([r['accuracy'] for r in ood])):.2f} / {100 * float(np.mean([r['ece10'] for r in ood])):.2f}")
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(records: list[dict], paper: str, last_k: int = DEFAULT_LAST_K, run_dir=None) -> str:
    """A markdown table laid out like ``paper``'s (one of :data:`PAPERS`); ``run_dir`` adds the
    global evaluations `fedcal evaluate` wrote there."""
    if paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; choose one of {', '.join(PAPERS)}")
    if not any(r["kind"] == "client" for r in records):
        return "No evaluated round yet."
    return "\n".join({"fl2ora": _fl2ora, "fedclip": _fedclip, "carot": _carot}[paper](records, last_k, run_dir))
