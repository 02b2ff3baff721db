"""The study report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state):
a metric per variant with its confidence intervals and the seeds' own values, and a metric
against a numeric quantity (sequence length, a grid axis) with one line and interval band per
series. Inputs are plain numbers; the same inputs give byte-identical PNGs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from memforge.ablate.stats import Interval

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    # No "Software" entry: the PNG then depends on the drawing only, not the matplotlib version.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def variant_plot(
    path: Path,
    *,
    title: str,
    metric: str,
    labels: Sequence[str],
    intervals: Sequence[Interval],
    seed_values: Sequence[Sequence[float]],
) -> Path:
    """One point per row (variant, grid cell) at its mean with the interval as an error bar, and the
    seeds' values as small dots beside it, so a reader sees how few values the interval rests on."""
    if not (len(labels) == len(intervals) == len(seed_values)):
        raise ValueError("variant_plot needs one label, interval and list of seed values per row")
    longest = max((len(label) for label in labels), default=0)
    crowded = len(labels) > 4 or longest > 10
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6 + (0.06 * longest if crowded else 0)))
    ax = fig.add_subplot()
    for i, (iv, seeds) in enumerate(zip(intervals, seed_values, strict=True)):
        ax.scatter([i + 0.18] * len(seeds), seeds, s=10, color="0.55", zorder=2)
        if math.isnan(iv.mean):
            continue
        if iv.has_interval:
            err = [[iv.mean - iv.low], [iv.high - iv.mean]]
            ax.errorbar([i], [iv.mean], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
        else:
            ax.plot([i], [iv.mean], "o", color="C0", zorder=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def curve_plot(
    path: Path,
    *,
    title: str,
    metric: str,
    xlabel: str,
    series: Mapping[str, Sequence[tuple[float, Interval, int]]],
) -> Path:
    """``metric`` against ``xlabel``: per series a line through the means and a band between the
    interval bounds (where there is one). Each point is ``(x, interval, diverged)``; runs that
    diverged there (and so have no value) are marked with a count beside the point, or with an x at
    the bottom of the axes where no run has a value. The x axis is logarithmic (base 2) when the x
    values are positive and span a factor of 4 or more, as sequence lengths and widths usually do."""
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.add_subplot()
    xs_all = [p[0] for points in series.values() for p in points]
    for k, (name, points) in enumerate(series.items()):
        color = f"C{k % 10}"
        points = sorted(points, key=lambda p: p[0])
        valued = [(x, iv) for x, iv, _ in points if not math.isnan(iv.mean)]
        if valued:
            ax.plot([x for x, _ in valued], [iv.mean for _, iv in valued], "o-", color=color, label=name,
                    markersize=4)
        band = [(x, iv) for x, iv in valued if iv.has_interval]
        if band:
            # Bars show a lone point's interval; the band joins neighbouring ones.
            ax.errorbar([x for x, _ in band], [iv.mean for _, iv in band],
                        yerr=[[iv.mean - iv.low for _, iv in band], [iv.high - iv.mean for _, iv in band]],
                        fmt="none", ecolor=color, elinewidth=0.8, capsize=2)
            ax.fill_between([x for x, _ in band], [iv.low for _, iv in band], [iv.high for _, iv in band],
                            color=color, alpha=0.18, linewidth=0)
        for x, iv, diverged in points:
            if not diverged:
                continue
            if math.isnan(iv.mean):
                ax.plot([x], [0.02], "x", color=color, transform=ax.get_xaxis_transform(),
                        label=None if valued else name)
            else:
                ax.annotate(f"{diverged} diverged", (x, iv.mean), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
        ax.set_xscale("log", base=2)
    if xs_all and len(set(xs_all)) <= 12:
        # Ticks at the evaluated values themselves (32, 128, 256), not at powers of 2.
        ax.set_xticks(sorted(set(xs_all)), [f"{x:g}" for x in sorted(set(xs_all))])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)
