"""The study report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state):
a metric per variant with its confidence intervals and the seeds' own values, and a metric
against a numeric quantity (sequence length, a grid axis) with one line and interval band per
series. Inputs are plain numbers; the same inputs give byte-identical PNGs. :func:`write_plots`
draws a report's figures from its rows (``memforge/ablate/report.py`` lists them)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from memforge.ablate.results import MetricKey, Plan, Row, StudyResults, num_plain
from memforge.ablate.rows import at_length, metric_keys
from memforge.ablate.stats import Interval, bootstrap_mean
from memforge.ablate.tables import of_primary_kind

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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _series_labels(plan: Plan, rows: Sequence[Row], skip_axis: str | None = None,
                   skip_lr: bool = False) -> list[str]:
    """Short labels for rows: only the parts (variant, axes, lr) that differ between them."""
    parts = []
    for row in rows:
        p = [("", row.variant)]
        p += [(a, v) for a, v in zip(plan.axes, row.cell, strict=True) if a != skip_axis]
        if not skip_lr:
            p.append(("lr", row.lr))
        parts.append(p)
    varying = [i for i in range(len(parts[0])) if len({repr(p[i][1]) for p in parts}) > 1] if parts else []
    labels = []
    for p in parts:
        shown = [p[i] for i in varying] or [p[0]]
        labels.append(", ".join(v if not name else f"{name}={num_plain(v) if isinstance(v, float) else v}"
                                for name, v in shown))
    return labels


def _numeric_axis(results: StudyResults, axis: str) -> bool:
    values = [v for v in results.runs[axis] if v is not None]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return numeric and len(set(values)) > 1


def _length_point(row: Row, keys: Sequence[MetricKey], length: float) -> tuple[float, Interval, int]:
    values, diverged = at_length(row, keys, length)
    return length, bootstrap_mean(values.values()), diverged


def write_plots(results: StudyResults, rows: Sequence[Row], out: Path) -> list[Path]:
    """The report's PNGs (see the module docstring), in a fixed order."""
    plan = results.plan
    keys = metric_keys(results)
    written = []
    labels = _series_labels(plan, rows, skip_lr=plan.selection is not None)
    shown = set(of_primary_kind(plan, [k.name for k in keys]))
    for key in [k for k in keys if k.plain and k.name in shown]:
        written.append(variant_plot(
            out / f"variants_{_slug(key.name)}.png", title=f"{plan.name}: {key.name} per variant",
            metric=key.name, labels=labels, intervals=[r.stats[key] for r in rows],
            seed_values=[list(r.seed_values[key].values()) for r in rows]))
    for name in of_primary_kind(plan, [k.name for k in keys if k.length is not None]):
        own = [k for k in keys if k.name == name and k.length is not None]
        has_depth = any(k.depth is not None for k in own)
        series = {label: [_length_point(row, own, length) for length in sorted({k.length for k in own})]
                  for label, row in zip(labels, rows, strict=True)}
        written.append(curve_plot(
            out / f"length_{_slug(name)}.png", metric=name, xlabel="length",
            title=f"{plan.name}: {name} by length" + (" (mean over depths)" if has_depth else ""),
            series=series))
    primary = next((k for k in keys if k.name == plan.primary_metric and k.plain), None)
    for axis in plan.axes:
        if primary is None or not _numeric_axis(results, axis):
            continue
        index = plan.axes.index(axis)
        axis_labels = _series_labels(plan, rows, skip_axis=axis, skip_lr=plan.selection is not None)
        series: dict[str, list[tuple[float, Interval, int]]] = {}
        for label, row in zip(axis_labels, rows, strict=True):
            if row.cell[index] is not None:
                point = (float(row.cell[index]), row.stats[primary], len(row.diverged[primary]))
                series.setdefault(label, []).append(point)
        written.append(curve_plot(
            out / f"axis_{_slug(axis)}_{_slug(primary.name)}.png", metric=primary.name, xlabel=axis,
            title=f"{plan.name}: {primary.name} by {axis}", series=series))
    return written
