"""Figures a researcher opens: reliability diagrams (before / after temperature scaling side by side),
accuracy / ECE / NLL against the round, and the overlay of several runs. Each is written as PNG and
PDF (vector) beside each other.

Reliability diagrams: bars are the accuracy of each confidence bin; the gap to the bin's mean
confidence is drawn red where the model is over-confident (confidence > accuracy) and green where
it is under-confident; bins holding fewer than ``SPARSE`` samples (or under 1% of N) are drawn
pale and hatched and carry their count, so that a bin of one or two samples cannot dominate the
picture; the bottom panel is the confidence histogram.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.calibration import CalibrationStats

SPARSE = 10  # a bin with fewer samples (or < 1% of N) is marked sparse
FORMATS = ("png", "pdf")


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def save(fig, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.pdf."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    out = []
    for fmt in FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, format=fmt, dpi=110)
        out.append(path)
    return out


def reliability_panel(top, bottom, stats: CalibrationStats, title: str, extra: dict[str, str] | None = None) -> None:
    width = 1.0 / stats.n_bins
    centers = (np.arange(stats.n_bins) + 0.5) * width
    acc, conf, count = stats.bin_accuracy(), stats.bin_confidence(), stats.bin_count
    filled = count > 0
    sparse = filled & ((count < SPARSE) | (count < 0.01 * max(stats.total, 1)))
    dense = filled & ~sparse
    top.plot([0, 1], [0, 1], "k--", lw=1)
    for mask, style in ((dense, {"color": "tab:blue", "edgecolor": "black"}),
                        (sparse, {"color": "tab:blue", "alpha": 0.25, "edgecolor": "gray", "hatch": ".."})):
        top.bar(centers[mask], acc[mask], width=width, **style)
    over = filled & (conf > acc)
    under = filled & (conf <= acc)
    for mask, color in ((over, "tab:red"), (under, "tab:green")):
        if mask.any():
            alpha = np.where(sparse[mask], 0.15, 0.45)
            for x, a, c, al in zip(centers[mask], acc[mask], conf[mask], alpha, strict=True):
                top.bar(x, c - a, bottom=a, width=width, color=color, alpha=float(al), edgecolor=color)
    for x, a, c, n in zip(centers[sparse], acc[sparse], conf[sparse], count[sparse], strict=True):
        top.text(x, min(max(a, c) + 0.02, 0.95), f"n={int(n)}", ha="center", fontsize=6, color="dimgray")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([0], [0], color="black", ls="--", lw=1, label="perfect calibration"),
               Patch(facecolor="tab:blue", edgecolor="black", label="accuracy"),
               Patch(facecolor="tab:red", alpha=0.45, label="over-confident gap"),
               Patch(facecolor="tab:green", alpha=0.45, label="under-confident gap"),
               Patch(facecolor="tab:blue", alpha=0.25, hatch="..", edgecolor="gray", label=f"sparse bin (< {SPARSE} samples)")]
    lines = [f"N = {stats.total}"]
    if stats.total:
        lines += [f"ECE = {100 * stats.ece():.2f}%", f"MCE = {100 * stats.mce():.2f}%", f"Acc = {100 * stats.accuracy():.2f}%"]
    else:
        top.text(0.5, 0.5, "no samples", ha="center", va="center", transform=top.transAxes)
    lines += [f"{key} = {value}" for key, value in (extra or {}).items()]
    top.text(0.03, 0.97, "\n".join(lines), transform=top.transAxes, va="top", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(handles=handles, loc="lower right", fontsize=7)
    bottom.bar(centers, count, width=width, edgecolor="black", color="tab:gray")
    bottom.set(xlabel="confidence", ylabel="count")
    bottom.set_ylim(bottom=0)


def reliability(panels: list[tuple[CalibrationStats, str, dict[str, str] | None]], stem: Path) -> list[Path]:
    """One reliability diagram per panel, side by side (e.g. before and after temperature scaling)."""
    fig = _figure((5.2 * len(panels), 6.5))
    axes = fig.subplots(2, len(panels), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for i, (stats, title, extra) in enumerate(panels):
        reliability_panel(axes[0][i], axes[1][i], stats, title, extra)
    return save(fig, stem)


def _rounds_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


CURVE_METRICS = (("accuracy", "accuracy"), ("ece", "ECE (15 bins)"), ("nll", "NLL"))


def curves(table: list[dict], stem: Path, split: str) -> list[Path]:
    """Accuracy, ECE and NLL against the round: pooled, seen / unseen, each domain (no TS)."""
    rows = [r for r in table if r["split"] == split and r["ts"] == "none" and r["kind"] in ("pooled", "group", "domain")]
    fig = _figure((15, 4.2))
    axes = fig.subplots(1, len(CURVE_METRICS))
    groups = sorted({(r["kind"], r["group"]) for r in rows}, key=lambda g: (("pooled", "group", "domain").index(g[0]), g[1]))
    for ax, (metric, label) in zip(axes, CURVE_METRICS, strict=True):
        for kind, group in groups:
            pts = sorted((r["round"], r[metric]) for r in rows if (r["kind"], r["group"]) == (kind, group) and r[metric] is not None)
            if not pts:
                continue
            style = {"pooled": {"lw": 2.5, "color": "black"}, "group": {"lw": 1.8, "ls": "--"}, "domain": {"lw": 1, "alpha": 0.8}}[kind]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=group if kind != "pooled" else "pooled", **style)
        ax.set(xlabel="round", ylabel=label, title=f"{label} ({split})")
        _rounds_axis(ax)
    axes[0].legend(fontsize=7)
    return save(fig, stem)


def overlay(runs: list[tuple[str, list[dict]]], stem: Path, split: str) -> list[Path]:
    """The pooled curves of several runs on the same axes (`fedcal compare`)."""
    fig = _figure((15, 4.2))
    axes = fig.subplots(1, len(CURVE_METRICS))
    for ax, (metric, label) in zip(axes, CURVE_METRICS, strict=True):
        for name, table in runs:
            pts = sorted((r["round"], r[metric]) for r in table
                         if r["kind"] == "pooled" and r["split"] == split and r["ts"] == "none" and r[metric] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
        ax.set(xlabel="round", ylabel=label, title=f"pooled {label} ({split})")
        _rounds_axis(ax)
    axes[0].legend(fontsize=7)
    return save(fig, stem)
