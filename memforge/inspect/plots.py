"""The PNG plots of ``memforge inspect``: series over the sequence, and a layer x head summary.

Both read the JSON trace (:func:`memforge.inspect.trace_json`), so a trace written earlier can be
plotted again without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The scalar series plotted over the sequence, in panel order, with their axis labels.
PANELS: tuple[tuple[str, str], ...] = (
    ("surprise", "surprise ||u_t||"),
    ("step_size", "step size θ"),
    ("momentum", "momentum η"),
    ("decay", "decay α"),
    ("state_norm", "memory norm ||M_t||"),
    ("read_contribution", "read / block output"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _mark_positions(ax: Any, marks: dict[str, Any]) -> None:
    """Shade evidence (pairs, needle) and draw a line at each query."""
    for start, end in marks.get("evidence_spans", []):
        ax.axvspan(start - 0.5, end - 0.5, color="tab:green", alpha=0.12, lw=0)
    for position in marks.get("queries", []):
        ax.axvline(position, color="tab:red", alpha=0.35, lw=0.8)


def plot_series(trace: dict[str, Any], path: Path, *, layer_indices: list[int] | None = None,
                dpi: int = 100) -> Path:
    """Gates, surprise, memory norm and read contribution over the sequence; one column per
    memory layer, one line per head; queries as red lines, evidence shaded green. Queries whose
    read retrieved (docs/inspect.md) get a green dot on the read panel, the others a red cross."""
    plt = _pyplot()
    layers = [layer for i, layer in enumerate(trace["layers"])
              if layer_indices is None or i in layer_indices]
    panels = [(name, label) for name, label in PANELS
              if any(name in layer["series"] for layer in layers)]
    fig, axes = plt.subplots(len(panels), len(layers), figsize=(4.2 * len(layers), 1.35 * len(panels) + 0.8),
                             sharex=True, squeeze=False)
    positions = range(trace["length"])
    for column, layer in enumerate(layers):
        axes[0, column].set_title(f"{layer['module']} ({layer['component']})", fontsize=9)
        for row, (name, label) in enumerate(panels):
            ax = axes[row, column]
            _mark_positions(ax, trace["marks"])
            for head, values in enumerate(layer["series"].get(name, [])):
                ax.plot(positions, values, lw=0.9, label=f"head {head}")
            if column == 0:
                ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
        checks = layer.get("retrieval", {}).get("queries", [])
        if checks and panels[-1][0] == "read_contribution":
            ax = axes[-1, column]
            top = ax.get_ylim()[1]
            for row in checks:
                ax.plot(row["position"], top * 0.92, "o" if row["retrieved"] else "x",
                        color="tab:green" if row["retrieved"] else "tab:red", ms=4)
        axes[-1, column].set_xlabel("token", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_summary(trace: dict[str, Any], path: Path, dpi: int = 100) -> Path:
    """Layer x head heatmaps: each series' mean over the sequence, and (with queries) the share of
    queries whose read retrieved per head."""
    import numpy as np

    plt = _pyplot()
    layers = trace["layers"]
    names = [name for name, _ in PANELS if any(name in layer["series"] for layer in layers)]
    summaries = []
    for name in names:
        grid = [[float(np.mean(h)) if h else np.nan for h in layer["series"].get(name, [])]
                for layer in layers]
        summaries.append((f"mean {name}", grid))
    if any(layer.get("retrieval", {}).get("queries") for layer in layers):
        grid = []
        for layer in layers:
            rows = layer["retrieval"]["queries"]
            grid.append(np.mean([r["head_retrieved"] for r in rows], axis=0).tolist() if rows else [])
        summaries.append(("retrieved by head", grid))
    width = max(len(row) for _, grid in summaries for row in grid)
    fig, axes = plt.subplots(1, len(summaries), figsize=(2.3 * len(summaries), 0.6 * len(layers) + 1.6),
                             squeeze=False)
    for ax, (title, grid) in zip(axes[0], summaries, strict=True):
        values = np.full((len(layers), width), np.nan)
        for i, row in enumerate(grid):
            values[i, : len(row)] = row
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        for (i, j), value in np.ndenumerate(values):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6, color="white")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_yticks(range(len(layers)), [f"layer {layer['block']}" for layer in layers], fontsize=7)
        ax.set_xticks(range(width))
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
