"""The report of an ablation study: ``memforge ablate report STUDY_DIR`` (and the end of every
``memforge ablate`` run) reads the study's ``plan.json`` and ``results/*.json`` and writes
``STUDY_DIR/report/``:

``results.md``, ``results.csv``
    One row per variant (per grid cell when the study has axes): for every final metric the mean
    over seeds and its 95% bootstrap confidence interval, the number of seeds that finished (and
    how many failed or have no result yet), the parameter count and the mean tokens/s. The CSV has
    every metric; the Markdown, to stay readable, those of the primary metric's kind (``*/accuracy``
    for ``test/accuracy``). Metrics evaluated by length or depth have their own columns in the CSV
    (``name[length=L,depth=D] mean/low/high/n``; ``name[length=L]`` is the mean over depths) and in
    the Markdown one table per metric, a column per length (each run's mean over depths) or per
    depth. An evaluation whose model
    diverged has no value: it is left out of the mean and counted (``(1 diverged)``; a
    ``... diverged`` column in the CSV). The Markdown also states the learning-rate selection and
    lists every failed or missing run with its message.
``differences.md``, ``differences.csv``
    Each variant minus the baseline variant in the same grid cell, **paired by seed**: only seeds
    for which both finished count, and the interval is that of the mean paired difference (laid
    out like the results).
``selection.csv``
    With a learning-rate sweep: every (variant, cell, lr) with its mean selection metric, seeds,
    and which lr was chosen.
``tidy.csv``
    Every run's final metrics, one row per (run, metric, length, depth), with the columns
    ``run, variant, seed, lr, <axes...>, params, status, selected, metric, length, depth, value,
    diverged`` (``selected``: whether the run's lr is the one the table reports; ``diverged``: the
    evaluation has no value because the model overflowed). A run without metrics (failed early, or
    not run yet) has one row with an empty metric. ``pandas.read_csv`` and DuckDB
    (``SELECT * FROM 'tidy.csv'``) read it as it is.
``variants_<metric>.png``, ``length_<metric>.png``, ``axis_<axis>_<metric>.png``
    For the metrics of the primary metric's kind (``test/accuracy``, ``validation/accuracy``, ...):
    each plain one per variant (mean, interval, and the seeds' values); each one evaluated by
    length against the length (each run's mean over depths first), one line and band per variant,
    with the number of runs that diverged marked. The primary metric against each numeric grid
    axis.

Writing a report replaces the previous one: report files it does not write this time (a plot of a
metric since dropped) are deleted; other files in ``report/`` are left alone.

Statistics: a percentile bootstrap of the mean over seeds, 10,000 resamples from a fixed seed, so
reporting the same results twice writes byte-identical files (``memforge/ablate/stats.py`` says
why percentile and not BCa). One seed gives a mean without an interval; seeds that all agree give
a zero-width interval. With 3 to 5 seeds the interval says how much seeds disagree; it is not a
guarantee, and overlapping intervals of two variants say less than the paired difference does.

Learning-rate selection (when the plan has ``selection``): within each variant and grid cell, the
lr whose selection metric (say ``validation/accuracy``, mode max) has the best mean over its
finished seeds is chosen (ties go to the smaller lr; an lr whose runs all failed is never chosen),
and the tables report that lr's runs. The selection metric's own column is then optimistic;
report the test metric. Without a selection rule, each lr of a cell is its own row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from memforge.ablate.plots import write_plots
from memforge.ablate.results import Plan, load_results
from memforge.ablate.rows import build_differences, build_rows
from memforge.ablate.tables import (
    difference_tables,
    differences_markdown,
    results_markdown,
    results_tables,
    tidy_frame,
)

REPORT_DIR = "report"
_FIXED_FILES = ("results.md", "results.csv", "differences.md", "differences.csv", "selection.csv", "tidy.csv")
_PLOT_PREFIXES = ("variants_", "length_", "axis_")


def _remove_stale(out: Path, written: Sequence[Path]) -> None:
    """Delete the report files of an earlier report that this one did not write (a metric or a
    selection rule since dropped), so the directory shows these results only. Only names the report
    itself uses are touched; anything else in the directory is left alone."""
    keep = {p.name for p in written}
    for path in sorted(out.iterdir()):
        ours = path.name in _FIXED_FILES or (path.suffix == ".png" and path.name.startswith(_PLOT_PREFIXES))
        if ours and path.name not in keep and path.is_file():
            path.unlink()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_report(study_dir: str | Path, *, console: Any = None) -> list[Path]:
    """Write ``study_dir/report/`` (see the module docstring) and return the files written, in a
    fixed order. With a ``rich.console.Console``, also print the results and differences tables.

    Raises ReportError (before writing anything) when the plan or a results file cannot be read.
    """
    study_dir = Path(study_dir)
    results = load_results(study_dir)
    plan = results.plan
    rows, selection = build_rows(results)
    diffs = build_differences(rows, plan.baseline)
    out = study_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    res_csv, res_md = results_tables(plan, rows)
    written.append(_write(out / "results.md", results_markdown(results, rows, selection, res_md)))
    res_csv.to_csv(out / "results.csv", index=False)
    written.append(out / "results.csv")
    if plan.baseline is not None:
        diff_csv, diff_md = difference_tables(plan, diffs)
        written.append(_write(out / "differences.md", differences_markdown(plan, rows, diffs, diff_md)))
        diff_csv.to_csv(out / "differences.csv", index=False)
        written.append(out / "differences.csv")
    if selection is not None:
        selection.to_csv(out / "selection.csv", index=False)
        written.append(out / "selection.csv")
    tidy_frame(results, rows).to_csv(out / "tidy.csv", index=False)
    written.append(out / "tidy.csv")
    written += write_plots(results, rows, out)
    _remove_stale(out, written)

    if console is not None:
        _print(console, plan, res_md, difference_tables(plan, diffs)[1], out)
    return written


def _print(console: Any, plan: Plan, results_md: pd.DataFrame, diff_md: pd.DataFrame, out: Path) -> None:
    """The results and differences tables on the console, cut to the primary (and selection) metric
    so they fit a terminal; the files hold every metric."""
    from rich.table import Table

    shown = [m for m in (plan.primary_metric, plan.selection and plan.selection.metric) if m]

    def table(title: str, frame: pd.DataFrame, metrics_from: int) -> Table:
        columns = [c for i, c in enumerate(frame.columns) if i < metrics_from or c in shown]
        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(str(c), justify="left" if c in ("variant", *plan.axes) else "right")
        for values in frame[columns].itertuples(index=False):
            t.add_row(*map(str, values))
        return t

    labels = 2 + len(plan.axes)  # variant, axes, lr
    console.print(table(f"{plan.name}: mean [95% CI] over seeds", results_md, labels + 3))
    if len(diff_md):
        console.print(table(f"minus {plan.baseline}, paired by seed", diff_md, labels + 2))
    console.print(f"report (every metric, by length, plots): {out}")
