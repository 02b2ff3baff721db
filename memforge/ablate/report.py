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

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memforge.ablate import plots
from memforge.ablate.stats import (
    CONFIDENCE,
    RESAMPLES,
    SEED,
    Interval,
    best_index,
    bootstrap_mean,
    paired_difference,
)
from memforge.errors import MemforgeError

REPORT_DIR = "report"
_FIXED_FILES = ("results.md", "results.csv", "differences.md", "differences.csv", "selection.csv", "tidy.csv")
_PLOT_PREFIXES = ("variants_", "length_", "axis_")
STATUSES = ("finished", "failed", "missing")
# Columns of tidy.csv besides the axes; an axis may not take one of these names.
RESERVED = ("run", "variant", "seed", "lr", "params", "status", "selected", "metric", "length", "depth",
            "value", "diverged")


class ReportError(MemforgeError, ValueError):
    """A study directory whose plan or results cannot be read."""


@dataclass(frozen=True)
class Selection:
    """The learning-rate selection rule: the metric and whether larger ("max") or smaller is better."""

    metric: str
    mode: str


@dataclass(frozen=True)
class Plan:
    """The parts of ``plan.json`` the report uses."""

    name: str
    baseline: str | None
    primary_metric: str | None
    selection: Selection | None
    axes: tuple[str, ...]
    runs: tuple[dict[str, Any], ...]
    description: str = ""
    variant_descriptions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MetricKey:
    """A metric name, with the length and depth it was evaluated at (None where not evaluated by
    length or depth; a key with a length and no depth, beside keys with depths, is the evaluation's
    mean over depths). None rather than NaN: NaN is unequal to itself, and these are dictionary keys.
    """

    name: str
    length: float | None = None
    depth: float | None = None

    @property
    def plain(self) -> bool:
        """Not evaluated by length or depth: one column of the main table."""
        return self.length is None and self.depth is None

    @property
    def label(self) -> str:
        """``name`` or ``name[length=L,depth=D]``: the metric's column name in the CSVs."""
        parts = []
        if self.length is not None:
            parts.append(f"length={_num_plain(self.length)}")
        if self.depth is not None:
            parts.append(f"depth={_num_plain(self.depth)}")
        return self.name + (f"[{','.join(parts)}]" if parts else "")


@dataclass
class Row:
    """One row of the results table: a variant in a grid cell at one lr, and its runs."""

    variant: str
    cell: tuple[Any, ...]
    lr: float
    runs: list[str]
    failed: int = 0
    missing: int = 0
    finished: int = 0
    seeds: list[int] = field(default_factory=list)  # of the finished runs
    params: int | None = None
    tokens_per_s: float = math.nan
    stats: dict[MetricKey, Interval] = field(default_factory=dict)
    seed_values: dict[MetricKey, dict[int, float]] = field(default_factory=dict)
    diverged: dict[MetricKey, list[int]] = field(default_factory=dict)  # seeds without a value


@dataclass
class StudyResults:
    """A study's plan, its runs (one row each, plan order) and its tidy metrics table."""

    plan: Plan
    runs: pd.DataFrame
    tidy: pd.DataFrame


# ---------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}; restore it or delete it and run the study again") from e


def _cell_value(value: Any) -> Any:
    """Axis values as hashable scalars: lists and tables (a layer placement, say) as compact JSON."""
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def load_plan(study_dir: Path) -> Plan:
    """Read and check ``study_dir/plan.json``."""
    path = study_dir / "plan.json"
    if not path.is_file():
        raise ReportError(f"{study_dir} has no plan.json; give the directory that "
                          "`memforge ablate STUDY.toml` created")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ReportError(f"{path}: the plan is not a JSON object; the plan is damaged, re-create "
                          "it by running the study again")
    if data.get("schema") != 1:
        found = data.get("schema")
        raise ReportError(f"{path}: plan schema {found!r} is not 1; report it with the memforge that ran it")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ReportError(f"{path}: 'runs' must be a non-empty list of runs")
    for i, run in enumerate(runs):
        missing = [k for k in ("id", "variant", "seed") if not isinstance(run, dict) or k not in run]
        if missing:
            raise ReportError(f"{path}: run {i} lacks {', '.join(missing)}; the plan is damaged, "
                              "re-create it")
    axes = tuple(data.get("axes") or ())
    clash = [a for a in axes if a in RESERVED]
    if clash:
        raise ReportError(f"{path}: axis name {clash[0]!r} collides with a report column; rename the axis")
    selection = data.get("selection")
    if selection is not None:
        if not isinstance(selection, dict) or not isinstance(selection.get("metric"), str) \
                or selection.get("mode") not in ("max", "min"):
            raise ReportError(f"{path}: 'selection' must be "
                              f"{{\"metric\": NAME, \"mode\": \"max\" or \"min\"}}, got {selection!r}")
        selection = Selection(selection["metric"], selection["mode"])
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    baseline = data.get("baseline")
    if baseline is not None and baseline not in variants:
        raise ReportError(f"{path}: baseline {baseline!r} is not a variant of the plan "
                          f"({', '.join(variants)})")
    return Plan(
        name=str(data.get("name") or study_dir.name),
        baseline=baseline,
        primary_metric=data.get("primary_metric"),
        selection=selection,
        axes=axes,
        runs=tuple(runs),
        description=str(data.get("description") or ""),
        variant_descriptions=tuple((str(v["name"]), str(v["description"])) for v in data.get("variants") or ()
                                   if isinstance(v, dict) and v.get("name") and v.get("description")),
    )


def _read_result(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("status") not in ("finished", "failed"):
        raise ReportError(f"{path}: 'status' must be \"finished\" or \"failed\"; delete the file to re-run "
                          "that run")
    metrics = data.get("metrics") or []
    if not isinstance(metrics, list) or any(not isinstance(m, dict) or "name" not in m for m in metrics):
        raise ReportError(f"{path}: 'metrics' must be a list of {{\"name\", \"value\"}} entries; delete the "
                          "file to re-run that run")
    fields = [("tokens_per_s", data.get("tokens_per_s")), ("params", data.get("params"))]
    for m in metrics:
        fields += [(f"{m['name']!r} {key}", m.get(key)) for key in ("value", "length", "depth")]
    for what, value in fields:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ReportError(f"{path}: {what} must be a number or null, got {value!r}; delete the file "
                              "to re-run that run")
    return data


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def load_results(study_dir: str | Path) -> StudyResults:
    """The plan, one row per planned run (a run without a results file is "missing") and the tidy
    table of every run's final metrics."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    run_rows, tidy_rows = [], []
    for run in plan.runs:
        path = study_dir / "results" / f"{run['id']}.json"
        result = _read_result(path) if path.is_file() else None
        params = (result or {}).get("params", run.get("params"))
        base = {
            "run": str(run["id"]),
            "variant": str(run["variant"]),
            "seed": int(run["seed"]),
            "lr": _float(run.get("lr")),
            **{a: _cell_value((run.get("axes") or {}).get(a)) for a in plan.axes},
            "params": None if params is None else int(params),
            "status": "missing" if result is None else result["status"],
        }
        run_rows.append({
            **base,
            "error": None if result is None else result.get("error"),
            "tokens_per_s": _float((result or {}).get("tokens_per_s")),
        })
        metrics = (result or {}).get("metrics") or [{"name": None, "value": None}]
        for m in metrics:
            value = _float(m.get("value"))
            # An evaluation whose model overflowed has no number: the runner writes a null value
            # (and the message under "diverged"); an infinite loss is the same outcome.
            diverged = m["name"] is not None and (bool(m.get("diverged")) or not math.isfinite(value))
            tidy_rows.append({**base, "metric": m["name"], "length": _float(m.get("length")),
                              "depth": _float(m.get("depth")), "value": value, "diverged": diverged})
    runs, tidy = pd.DataFrame(run_rows), pd.DataFrame(tidy_rows)
    for frame, source in ((runs, run_rows), (tidy, tidy_rows)):
        frame["params"] = frame["params"].astype("Int64")
        for a in plan.axes:  # keep the plan's own values (ints stay ints, None stays None)
            frame[a] = pd.Series([r[a] for r in source], dtype=object)
    return StudyResults(plan, runs, tidy)


def _integral(column: pd.Series) -> bool:
    values = column.dropna()
    return bool((values == np.round(values)).all())


# ------------------------------------------------------------------------------------- statistics


def _key(name: str, length: float, depth: float) -> MetricKey:
    """The MetricKey of a tidy row (whose missing length and depth are NaN)."""
    return MetricKey(name, None if math.isnan(length) else float(length),
                     None if math.isnan(depth) else float(depth))


def _metric_keys(results: StudyResults) -> list[MetricKey]:
    """Plain metrics first, then those by length or depth; within each, the primary metric and the
    rest of its evaluation first, then the other evaluations (``test``, ``validation``, ...) in order
    of appearance, then length and depth."""
    named = results.tidy.dropna(subset=["metric"])
    order = {name: i for i, name in enumerate(dict.fromkeys(named["metric"]))}
    prefix = lambda name: str(name).split("/", 1)[0]
    prefixes = {p: i for i, p in enumerate(dict.fromkeys(map(prefix, named["metric"])))}
    primary = results.plan.primary_metric or ""
    keys = {_key(m, length, depth)
            for m, length, depth in zip(named["metric"], named["length"], named["depth"], strict=True)}

    def sort_key(k: MetricKey) -> tuple:
        none_last = lambda x: (x is None, 0.0 if x is None else x)
        return (not k.plain, k.name != primary, prefix(k.name) != prefix(primary), prefixes[prefix(k.name)],
                order[k.name], none_last(k.length), none_last(k.depth))

    return sorted(keys, key=sort_key)


def _cells(results: StudyResults) -> dict[tuple[str, tuple], pd.DataFrame]:
    """The runs of each (variant, grid cell), in plan order."""
    runs = results.runs
    keys = [(v, tuple(runs.loc[i, a] for a in results.plan.axes)) for i, v in enumerate(runs["variant"])]
    out: dict[tuple[str, tuple], list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return {key: runs.iloc[rows] for key, rows in out.items()}


def _selection_values(results: StudyResults, run_ids: Iterable[str], metric: str) -> dict[str, float]:
    """run id -> the finite plain (not by length) value of ``metric`` for finished runs."""
    t = results.tidy
    mask = (t["run"].isin(list(run_ids)) & (t["status"] == "finished") & (t["metric"] == metric)
            & t["length"].isna() & t["depth"].isna() & np.isfinite(t["value"]))
    return dict(zip(t.loc[mask, "run"], t.loc[mask, "value"], strict=True))


def _lrs(frame: pd.DataFrame) -> list[float]:
    """The distinct lrs of some runs, ascending (NaN, no lr given, last)."""
    values = frame["lr"].tolist()
    return sorted(set(v for v in values if not math.isnan(v))) + ([math.nan] if any(map(math.isnan, values))
                                                                  else [])


def _same_lr(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def build_rows(results: StudyResults) -> tuple[list[Row], pd.DataFrame | None]:
    """The results table's rows (with their statistics) and, with a selection rule, the selection
    table (one row per variant, cell and lr)."""
    plan = results.plan
    rows: list[Row] = []
    selection_rows = []
    for (variant, cell), frame in _cells(results).items():
        lrs = _lrs(frame)
        if plan.selection is None:
            chosen: list[float] = lrs
        else:
            values = _selection_values(results, frame["run"], plan.selection.metric)
            means, counts = [], []
            for lr in lrs:
                ids = frame.loc[[_same_lr(x, lr) for x in frame["lr"]], "run"]
                v = [values[i] for i in ids if i in values]
                means.append(float(np.mean(v)) if v else math.nan)
                counts.append(len(v))
            best = best_index(means, plan.selection.mode)
            chosen = [] if best is None else [lrs[best]]
            for k, lr in enumerate(lrs):
                selection_rows.append({"variant": variant, **dict(zip(plan.axes, cell, strict=True)),
                                       "lr": lr, "seeds": counts[k],
                                       f"{plan.selection.metric} mean": means[k], "chosen": k == best})
        for lr in chosen or [math.nan]:
            members = frame[[_same_lr(x, lr) for x in frame["lr"]]] if chosen else frame.iloc[0:0]
            counted = members if chosen else frame
            status = counted["status"].value_counts()
            params = frame["params"].dropna()
            row = Row(variant, cell, lr, members["run"].tolist(),
                      failed=int(status.get("failed", 0)), missing=int(status.get("missing", 0)),
                      finished=int(status.get("finished", 0)) if chosen else 0,
                      params=int(params.iloc[0]) if len(params) else None)
            done = members[members["status"] == "finished"]
            row.seeds = sorted(int(s) for s in done["seed"])
            tps = done["tokens_per_s"][np.isfinite(done["tokens_per_s"])]
            row.tokens_per_s = float(tps.mean()) if len(tps) else math.nan
            rows.append(row)
    _fill_statistics(results, rows)
    selection = pd.DataFrame(selection_rows) if plan.selection is not None else None
    return rows, selection


def _fill_statistics(results: StudyResults, rows: Sequence[Row]) -> None:
    t = results.tidy
    t = t[(t["status"] == "finished") & t["metric"].notna()]
    keys = _metric_keys(results)
    for row in rows:
        mine = t[t["run"].isin(row.runs)]
        by_key: dict[MetricKey, dict[int, float]] = {}
        diverged: dict[MetricKey, list[int]] = {}
        for m, length, depth, seed, value, bad in zip(mine["metric"], mine["length"], mine["depth"],
                                                      mine["seed"], mine["value"], mine["diverged"],
                                                      strict=True):
            key = _key(m, length, depth)
            if bad:
                diverged.setdefault(key, []).append(int(seed))
            else:
                by_key.setdefault(key, {})[int(seed)] = float(value)
        for key in keys:
            row.seed_values[key] = dict(sorted(by_key.get(key, {}).items()))
            row.stats[key] = bootstrap_mean(row.seed_values[key].values())
            row.diverged[key] = sorted(diverged.get(key, []))


def _baseline_row(rows: Sequence[Row], row: Row, baseline: str) -> Row | None:
    """The baseline's row in ``row``'s grid cell: its only one, else the one at the same lr."""
    candidates = [r for r in rows if r.variant == baseline and r.cell == row.cell]
    if len(candidates) == 1:
        return candidates[0]
    same = [r for r in candidates if _same_lr(r.lr, row.lr)]
    return same[0] if same else None


@dataclass
class Difference:
    """A row minus its baseline row, per metric, paired by seed."""

    row: Row
    baseline: Row
    stats: dict[MetricKey, Interval]
    pairs: int  # seeds both rows finished


def build_differences(rows: Sequence[Row], baseline: str | None) -> list[Difference]:
    """Every non-baseline row minus the baseline row of its grid cell, paired by seed."""
    if baseline is None:
        return []
    out = []
    for row in rows:
        base = None if row.variant == baseline else _baseline_row(rows, row, baseline)
        if base is None:
            continue
        stats = {key: paired_difference(mine, base.seed_values.get(key, {}))
                 for key, mine in row.seed_values.items()}
        out.append(Difference(row, base, stats, len(set(row.seeds) & set(base.seeds))))
    return out


# ------------------------------------------------------------------------------------- formatting


def _num_plain(x: float) -> str:
    """An lr, length, depth or axis value as written in a study file: 0.0003, 1048576, 0.5."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if abs(x) < 1e-4 or float(f"{x:g}") == x else repr(float(x))


def _num(x: float | None, signed: bool = False) -> str:
    """A number for a table cell: thousands grouped from 1,000 up, else three significant digits with
    their trailing zeros (0.9996 is "1.00", not a perfect "1"; a few seeds' interval is not worth
    more digits, and the CSVs keep full precision)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if abs(x) >= 999.5:  # what would round to 1000 at three digits
        return f"{x:+,.0f}" if signed else f"{x:,.0f}"
    return (f"{x:+#.3g}" if signed else f"{x:#.3g}").rstrip(".")


def _cell(iv: Interval, n_expected: int, diverged: int = 0, signed: bool = False) -> str:
    """``mean [low, high]``, noting ``n=k`` when fewer values than the row's seeds went into it and
    how many runs diverged at that evaluation (they have no value)."""
    text = "–" if iv.n == 0 else _num(iv.mean, signed)
    if iv.has_interval:
        text += f" [{_num(iv.low, signed)}, {_num(iv.high, signed)}]"
    notes = [f"n={iv.n}"] if 0 < iv.n < n_expected else []
    notes += [f"{diverged} diverged"] if diverged else []
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _label_columns(plan: Plan, row: Row) -> dict[str, str]:
    out = {"variant": row.variant}
    for axis, value in zip(plan.axes, row.cell, strict=True):
        out[axis] = _num_plain(value) if isinstance(value, float) else str(value)
    out["lr"] = _num_plain(row.lr) if not math.isnan(row.lr) else "–"
    return out


def _seeds_text(row: Row) -> str:
    notes = [f"{k} {what}" for k, what in ((row.failed, "failed"), (row.missing, "missing")) if k]
    return str(row.finished) + (f" ({', '.join(notes)})" if notes else "")


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True) + "\n"


def _number_columns(key: MetricKey, iv: Interval, diverged: int | None = None) -> dict[str, Any]:
    out = {f"{key.label} mean": iv.mean, f"{key.label} low": iv.low, f"{key.label} high": iv.high,
           f"{key.label} n": iv.n}
    if diverged is not None:
        out[f"{key.label} diverged"] = diverged
    return out


def results_tables(plan: Plan, rows: Sequence[Row]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results as (CSV frame with every metric, Markdown frame of the plain metrics of the
    primary metric's kind). The CSV has a ``<metric> diverged`` count column for the metrics where
    some run diverged."""
    keys = list(rows[0].stats) if rows else []
    shown = set(_of_primary_kind(plan, [k.name for k in keys]))
    diverging = {k for k in keys if any(r.diverged[k] for r in rows)}
    csv, md = [], []
    for row in rows:
        numbers: dict[str, Any] = {"variant": row.variant, **dict(zip(plan.axes, row.cell, strict=True)),
                                   "lr": row.lr, "seeds": row.finished, "failed": row.failed,
                                   "missing": row.missing, "params": row.params,
                                   "tokens_per_s": row.tokens_per_s}
        text = {**_label_columns(plan, row), "seeds": _seeds_text(row), "params": _num(row.params),
                "tokens/s": _num(row.tokens_per_s)}
        for key, iv in row.stats.items():
            diverged = len(row.diverged[key])
            numbers.update(_number_columns(key, iv, diverged if key in diverging else None))
            if key.plain and key.name in shown:
                text[key.name] = _cell(iv, row.finished, diverged)
        csv.append(numbers)
        md.append(text)
    csv_frame = pd.DataFrame(csv)
    csv_frame["params"] = csv_frame["params"].astype("Int64")
    return csv_frame, pd.DataFrame(md)


def difference_tables(plan: Plan, diffs: Sequence[Difference]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The differences as (CSV frame with every metric, Markdown frame of the plain metrics of the
    primary metric's kind). A seed counts only where both sides have a value (a diverged run has
    none)."""
    shown = set(_of_primary_kind(plan, [k.name for d in diffs for k in d.stats]))
    csv, md = [], []
    for d in diffs:
        numbers: dict[str, Any] = {"variant": d.row.variant, **dict(zip(plan.axes, d.row.cell, strict=True)),
                                   "lr": d.row.lr, "baseline_lr": d.baseline.lr, "pairs": d.pairs}
        text = {**_label_columns(plan, d.row),
                "baseline lr": _num_plain(d.baseline.lr) if not math.isnan(d.baseline.lr) else "–",
                "pairs": str(d.pairs)}
        for key, iv in d.stats.items():
            numbers.update(_number_columns(key, iv))
            if key.plain and key.name in shown:
                text[key.name] = _cell(iv, d.pairs, signed=True)
        csv.append(numbers)
        md.append(text)
    return pd.DataFrame(csv), pd.DataFrame(md)


def _at_length(row: Row, keys: Sequence[MetricKey], length: float) -> tuple[dict[int, float], int]:
    """A row's metric at one length, per seed, and how many seeds diverged there.

    Evaluated at several depths, each seed's value is its mean over the depths: the evaluation's own
    mean entry (depth None) when it wrote one, else computed here from seeds with every depth (a
    seed missing a depth diverged there, and a partial mean would flatter it)."""
    at = [k for k in keys if k.length == length]
    mean_key = next((k for k in at if k.depth is None), None)
    if mean_key is not None:
        return row.seed_values[mean_key], len(row.diverged[mean_key])
    seeds = set().union(*(row.seed_values[k].keys() | set(row.diverged[k]) for k in at))
    complete = sorted(s for s in seeds if all(s in row.seed_values[k] for k in at))
    values = {s: float(np.mean([row.seed_values[k][s] for k in at])) for s in complete}
    return values, len(seeds) - len(complete)


def _of_primary_kind(plan: Plan, names: Iterable[str]) -> list[str]:
    """The distinct ``names`` measuring what the primary metric measures (``*/accuracy`` for
    ``test/accuracy``), or all of them when none does: what the Markdown and the plots show."""
    names = list(dict.fromkeys(names))
    kind = (plan.primary_metric or "").rsplit("/", 1)[-1]
    return [n for n in names if n.rsplit("/", 1)[-1] == kind] or names


def _profile_sections(plan: Plan, keys: Sequence[MetricKey], items: Sequence[tuple[dict[str, str], Any]],
                      cell: Any) -> list[str]:
    """Markdown sections for the metrics evaluated by length or depth, of the primary metric's kind
    (``accuracy`` for ``test/accuracy``; the CSVs hold every metric at every length and depth): per
    metric one table with a row per item and a column per length (mean over depths) or, for a
    metric by depth only, per depth. ``cell(item, keys, (kind, value))`` writes one cell."""
    parts = []
    for name in _of_primary_kind(plan, [k.name for k in keys if not k.plain]):
        own = [k for k in keys if k.name == name]
        lengths = sorted({k.length for k in own if k.length is not None})
        if lengths:
            columns = [(f"length {_num_plain(v)}", ("length", v)) for v in lengths]
            over = " (mean over depths)" if any(k.depth is not None for k in own) else ""
            heading = f"### {name} by length{over}\n"
        else:
            depths = sorted({k.depth for k in own if k.depth is not None})
            columns = [(f"depth {_num_plain(v)}", ("depth", v)) for v in depths]
            heading = f"### {name} by depth\n"
        table = [{**labels, **{title: cell(item, own, where) for title, where in columns}}
                 for labels, item in items]
        parts += [heading, _markdown(pd.DataFrame(table))]
    return parts


def _result_profile_cell(row: Row, keys: Sequence[MetricKey], where: tuple[str, float]) -> str:
    if where[0] == "length":
        values, diverged = _at_length(row, keys, where[1])
        return _cell(bootstrap_mean(values.values()), row.finished, diverged)
    key = MetricKey(keys[0].name, None, where[1])
    return _cell(row.stats[key], row.finished, len(row.diverged[key]))


def _difference_profile_cell(d: Difference, keys: Sequence[MetricKey], where: tuple[str, float]) -> str:
    if where[0] == "length":
        mine, theirs = _at_length(d.row, keys, where[1])[0], _at_length(d.baseline, keys, where[1])[0]
    else:
        key = MetricKey(keys[0].name, None, where[1])
        mine, theirs = d.row.seed_values[key], d.baseline.seed_values[key]
    return _cell(paired_difference(mine, theirs), d.pairs, signed=True)


def _interval_note(plan: Plan, csv_name: str) -> str:
    kind = (plan.primary_metric or "").rsplit("/", 1)[-1]
    return (f"Mean over seeds with its {CONFIDENCE:.0%} percentile-bootstrap interval [low, high] "
            f"({RESAMPLES:,} resamples, seed {SEED}); one seed has no interval, seeds that agree a "
            "zero-width one. With few seeds the interval shows how much they disagree and is narrower "
            "than a true 95% interval. `(n=k)`: only k seeds had that metric. "
            f"Shown: the `{kind}` metrics; every metric is in {csv_name}.")


def _selection_note(results: StudyResults) -> str:
    plan = results.plan
    sweep = any(len(_lrs(frame)) > 1 for frame in _cells(results).values())
    if plan.selection is None:
        return ("Learning rate: each lr of a variant is its own row (no selection rule)." if sweep
                else "Learning rate: one per variant, from the study's training settings (no sweep).")
    best = "highest" if plan.selection.mode == "max" else "lowest"
    return (f"Learning rate: per variant and grid cell, the lr with the {best} mean "
            f"`{plan.selection.metric}` over its finished seeds (ties: the smaller lr; an lr whose runs "
            "all failed is never chosen); every column reports that lr's runs, so the selection "
            "metric's own column is optimistic. See the learning-rate selection table below and "
            "selection.csv.")


def _unfinished_table(results: StudyResults) -> pd.DataFrame:
    runs = results.runs[results.runs["status"] != "finished"]
    return pd.DataFrame({
        "run": runs["run"], "variant": runs["variant"], "seed": runs["seed"].astype(str),
        "lr": [_num_plain(x) if not math.isnan(x) else "–" for x in runs["lr"]],
        "status": runs["status"],
        "message": [("no results file yet" if s == "missing" else (e or "(no message)")).replace("|", "\\|")
                    for s, e in zip(runs["status"], runs["error"], strict=True)],
    })


def _selection_markdown(selection: pd.DataFrame, metric: str) -> pd.DataFrame:
    out = selection.copy()
    out["lr"] = [_num_plain(x) if not math.isnan(x) else "–" for x in out["lr"]]
    out["seeds"] = out["seeds"].astype(str)
    out[f"{metric} mean"] = [_num(x) for x in out[f"{metric} mean"]]
    out["chosen"] = ["yes" if c else "" for c in out["chosen"]]
    for axis in [c for c in out.columns if c not in ("variant", "lr", "seeds", f"{metric} mean", "chosen")]:
        out[axis] = out[axis].astype(str)
    return out


def _summary_line(results: StudyResults) -> str:
    counts = results.runs["status"].value_counts()
    line = f"{len(results.runs)} runs: " + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in STATUSES) + "."
    if counts.get("missing", 0):
        line += " **Provisional**: runs without results yet may change every number and the lr selection."
    return line


# ------------------------------------------------------------------------------------------ plots


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
        labels.append(", ".join(v if not name else f"{name}={_num_plain(v) if isinstance(v, float) else v}"
                                for name, v in shown))
    return labels


def _numeric_axis(results: StudyResults, axis: str) -> bool:
    values = [v for v in results.runs[axis] if v is not None]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return numeric and len(set(values)) > 1


def _length_point(row: Row, keys: Sequence[MetricKey], length: float) -> tuple[float, Interval, int]:
    values, diverged = _at_length(row, keys, length)
    return length, bootstrap_mean(values.values()), diverged


def write_plots(results: StudyResults, rows: Sequence[Row], out: Path) -> list[Path]:
    """The report's PNGs (see the module docstring), in a fixed order."""
    plan = results.plan
    keys = _metric_keys(results)
    written = []
    labels = _series_labels(plan, rows, skip_lr=plan.selection is not None)
    shown = set(_of_primary_kind(plan, [k.name for k in keys]))
    for key in [k for k in keys if k.plain and k.name in shown]:
        written.append(plots.variant_plot(
            out / f"variants_{_slug(key.name)}.png", title=f"{plan.name}: {key.name} per variant",
            metric=key.name, labels=labels, intervals=[r.stats[key] for r in rows],
            seed_values=[list(r.seed_values[key].values()) for r in rows]))
    for name in _of_primary_kind(plan, [k.name for k in keys if k.length is not None]):
        own = [k for k in keys if k.name == name and k.length is not None]
        has_depth = any(k.depth is not None for k in own)
        series = {label: [_length_point(row, own, length) for length in sorted({k.length for k in own})]
                  for label, row in zip(labels, rows, strict=True)}
        written.append(plots.curve_plot(
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
        written.append(plots.curve_plot(
            out / f"axis_{_slug(axis)}_{_slug(primary.name)}.png", metric=primary.name, xlabel=axis,
            title=f"{plan.name}: {primary.name} by {axis}", series=series))
    return written


# ----------------------------------------------------------------------------------------- report


def _tidy_frame(results: StudyResults, rows: Sequence[Row]) -> pd.DataFrame:
    selected = {run for row in rows for run in row.runs}
    t = results.tidy.copy()
    t.insert(t.columns.get_loc("status") + 1, "selected", t["run"].isin(selected))
    if _integral(t["length"]):  # lengths are token counts: 256, not 256.0
        t["length"] = t["length"].astype("Int64")
    return t


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


def _results_markdown(results: StudyResults, rows: Sequence[Row], selection: pd.DataFrame | None,
                      table: pd.DataFrame) -> str:
    plan = results.plan
    parts = [f"# {plan.name}: results\n"]
    if plan.description:
        parts.append(plan.description.strip() + "\n")
    if plan.variant_descriptions:
        parts.append("".join(f"- `{name}`: {text}\n" for name, text in plan.variant_descriptions))
    parts += [f"{_summary_line(results)} {_interval_note(plan, 'results.csv')}\n",
              _selection_note(results) + "\n", _markdown(table)]
    profiles = _profile_sections(plan, list(rows[0].stats), [(_label_columns(plan, r), r) for r in rows],
                                 _result_profile_cell)
    if profiles:
        parts += ["## By length and depth\n", *profiles]
    if selection is not None:
        parts += ["## Learning-rate selection\n",
                  _markdown(_selection_markdown(selection, plan.selection.metric))]
    unfinished = _unfinished_table(results)
    if len(unfinished):
        parts += ["## Runs that failed or have no results yet\n", _markdown(unfinished)]
    return "\n".join(parts)


def _differences_markdown(plan: Plan, rows: Sequence[Row], diffs: Sequence[Difference],
                          table: pd.DataFrame) -> str:
    kind = (plan.primary_metric or "").rsplit("/", 1)[-1]
    parts = [f"# {plan.name}: differences against {plan.baseline}\n",
             f"Each variant minus `{plan.baseline}` in the same grid cell, paired by seed: only seeds for "
             "which both finished count (`pairs`), and the interval is the percentile-bootstrap interval "
             f"of the mean paired difference ({CONFIDENCE:.0%}, {RESAMPLES:,} resamples, seed {SEED}). "
             "An interval that excludes 0 is a difference the seeds agree on. "
             f"Shown: the `{kind}` metrics; every metric is in differences.csv.\n"]
    parts += [_markdown(table)] if len(table) else ["No variant besides the baseline.\n"]
    profiles = _profile_sections(plan, list(rows[0].stats), [(_label_columns(plan, d.row), d) for d in diffs],
                                 _difference_profile_cell)
    if profiles:
        parts += ["## By length and depth\n", *profiles]
    return "\n".join(parts)


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
    written.append(_write(out / "results.md", _results_markdown(results, rows, selection, res_md)))
    res_csv.to_csv(out / "results.csv", index=False)
    written.append(out / "results.csv")
    if plan.baseline is not None:
        diff_csv, diff_md = difference_tables(plan, diffs)
        written.append(_write(out / "differences.md", _differences_markdown(plan, rows, diffs, diff_md)))
        diff_csv.to_csv(out / "differences.csv", index=False)
        written.append(out / "differences.csv")
    if selection is not None:
        selection.to_csv(out / "selection.csv", index=False)
        written.append(out / "selection.csv")
    _tidy_frame(results, rows).to_csv(out / "tidy.csv", index=False)
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
