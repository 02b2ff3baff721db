"""PNG plots of a run: the loss curve and evaluation heatmaps.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so nothing global changes
and no display is needed; files are written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from memforge.io import atomic_write_bytes


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_loss(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Train loss (raw and smoothed) and validation loss / accuracy against the step."""
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    valid = [r for r in rows if r.get("split") == "validation" and "loss" in r]
    figure = Figure(figsize=(9, 4), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2)
    if train:
        steps, losses = zip(*train, strict=True)
        loss_axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        loss_axes.plot(steps, _smooth(losses), color="tab:blue", label="train")
    if valid:
        loss_axes.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-",
                       color="tab:orange", label="validation")
        acc_axes.plot([r["step"] for r in valid], [r["accuracy"] for r in valid], "o-",
                      color="tab:green")
    loss_axes.set(xlabel="step", ylabel="loss (nats)", title="loss")
    loss_axes.legend(loc="upper right")
    acc_axes.set(xlabel="step", ylabel="accuracy", title="validation accuracy", ylim=(0, 1.02))
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    _save(figure, path)


def plot_heatmap(
    values: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    columns: Sequence[str],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> None:
    """A heatmap of ``values[row][column]`` with each cell's number written in it."""
    numbers = [[math.nan if v is None else v for v in row] for row in values]
    figure = Figure(figsize=(2.5 + 0.9 * len(columns), 1.5 + 0.5 * len(rows)), layout="constrained")
    axes = figure.subplots()
    low, high = value_range if value_range else (None, None)
    image = axes.imshow(numbers, cmap="RdYlGn", vmin=low, vmax=high, aspect="auto")
    axes.set_xticks(range(len(columns)), labels=list(columns))
    axes.set_yticks(range(len(rows)), labels=list(rows))
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    for i, row in enumerate(numbers):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes)
    _save(figure, path)
