"""The report's tables: the results and differences as CSV frames (every metric, full precision)
and as Markdown (the primary metric's kind, rounded, with sections by length and depth), and the
tidy table. ``memforge/ablate/report.py`` describes the files."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from memforge.ablate.results import STATUSES, MetricKey, Plan, Row, StudyResults, num_plain
from memforge.ablate.rows import Difference, at_length, distinct_lrs, variant_cells
from memforge.ablate.stats import CONFIDENCE, RESAMPLES, SEED, Interval, bootstrap_mean, paired_difference


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
        out[axis] = num_plain(value) if isinstance(value, float) else str(value)
    out["lr"] = num_plain(row.lr) if not math.isnan(row.lr) else "–"
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
    shown = set(of_primary_kind(plan, [k.name for k in keys]))
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
    shown = set(of_primary_kind(plan, [k.name for d in diffs for k in d.stats]))
    csv, md = [], []
    for d in diffs:
        numbers: dict[str, Any] = {"variant": d.row.variant, **dict(zip(plan.axes, d.row.cell, strict=True)),
                                   "lr": d.row.lr, "baseline_lr": d.baseline.lr, "pairs": d.pairs}
        text = {**_label_columns(plan, d.row),
                "baseline lr": num_plain(d.baseline.lr) if not math.isnan(d.baseline.lr) else "–",
                "pairs": str(d.pairs)}
        for key, iv in d.stats.items():
            numbers.update(_number_columns(key, iv))
            if key.plain and key.name in shown:
                text[key.name] = _cell(iv, d.pairs, signed=True)
        csv.append(numbers)
        md.append(text)
    return pd.DataFrame(csv), pd.DataFrame(md)


def of_primary_kind(plan: Plan, names: Iterable[str]) -> list[str]:
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
    for name in of_primary_kind(plan, [k.name for k in keys if not k.plain]):
        own = [k for k in keys if k.name == name]
        lengths = sorted({k.length for k in own if k.length is not None})
        if lengths:
            columns = [(f"length {num_plain(v)}", ("length", v)) for v in lengths]
            over = " (mean over depths)" if any(k.depth is not None for k in own) else ""
            heading = f"### {name} by length{over}\n"
        else:
            depths = sorted({k.depth for k in own if k.depth is not None})
            columns = [(f"depth {num_plain(v)}", ("depth", v)) for v in depths]
            heading = f"### {name} by depth\n"
        table = [{**labels, **{title: cell(item, own, where) for title, where in columns}}
                 for labels, item in items]
        parts += [heading, _markdown(pd.DataFrame(table))]
    return parts


def _result_profile_cell(row: Row, keys: Sequence[MetricKey], where: tuple[str, float]) -> str:
    if where[0] == "length":
        values, diverged = at_length(row, keys, where[1])
        return _cell(bootstrap_mean(values.values()), row.finished, diverged)
    key = MetricKey(keys[0].name, None, where[1])
    return _cell(row.stats[key], row.finished, len(row.diverged[key]))


def _difference_profile_cell(d: Difference, keys: Sequence[MetricKey], where: tuple[str, float]) -> str:
    if where[0] == "length":
        mine, theirs = at_length(d.row, keys, where[1])[0], at_length(d.baseline, keys, where[1])[0]
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
    sweep = any(len(distinct_lrs(frame)) > 1 for frame in variant_cells(results).values())
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
        "lr": [num_plain(x) if not math.isnan(x) else "–" for x in runs["lr"]],
        "status": runs["status"],
        "message": [("no results file yet" if s == "missing" else (e or "(no message)")).replace("|", "\\|")
                    for s, e in zip(runs["status"], runs["error"], strict=True)],
    })


def _selection_markdown(selection: pd.DataFrame, metric: str) -> pd.DataFrame:
    out = selection.copy()
    out["lr"] = [num_plain(x) if not math.isnan(x) else "–" for x in out["lr"]]
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


def _integral(column: pd.Series) -> bool:
    values = column.dropna()
    return bool((values == np.round(values)).all())


def tidy_frame(results: StudyResults, rows: Sequence[Row]) -> pd.DataFrame:
    """``tidy.csv``: the tidy metrics with whether each run is one the tables report (``selected``)."""
    selected = {run for row in rows for run in row.runs}
    t = results.tidy.copy()
    t.insert(t.columns.get_loc("status") + 1, "selected", t["run"].isin(selected))
    if _integral(t["length"]):  # lengths are token counts: 256, not 256.0
        t["length"] = t["length"].astype("Int64")
    return t


def results_markdown(results: StudyResults, rows: Sequence[Row], selection: pd.DataFrame | None,
                      table: pd.DataFrame) -> str:
    """The text of ``results.md``: the study, the results table, its sections by length and depth,
    the learning-rate selection and the runs that did not finish."""
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


def differences_markdown(plan: Plan, rows: Sequence[Row], diffs: Sequence[Difference],
                          table: pd.DataFrame) -> str:
    """The text of ``differences.md``: each variant minus the baseline, paired by seed."""
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
