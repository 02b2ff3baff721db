"""A study directory read for its report: the plan (``plan.json``) and every run's outcome
(``results/<id>.json``), checked, as a table of runs and a tidy table of final metrics
(:func:`load_results`); and the report's data model (:class:`Plan`, :class:`MetricKey`,
:class:`Row`). ``memforge/ablate/report.py`` describes the report."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memforge.ablate.stats import Interval
from memforge.errors import MemforgeError

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
            parts.append(f"length={num_plain(self.length)}")
        if self.depth is not None:
            parts.append(f"depth={num_plain(self.depth)}")
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


def num_plain(x: float) -> str:
    """An lr, length, depth or axis value as written in a study file: 0.0003, 1048576, 0.5."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if abs(x) < 1e-4 or float(f"{x:g}") == x else repr(float(x))
