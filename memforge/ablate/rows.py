"""The report's rows: runs grouped by variant, grid cell and learning rate (the chosen lr when
the plan has a selection rule), each metric's mean and bootstrap interval over seeds, and each
row minus its baseline row, paired by seed. ``memforge/ablate/report.py`` describes the rules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from memforge.ablate.results import MetricKey, Row, StudyResults
from memforge.ablate.stats import Interval, best_index, bootstrap_mean, paired_difference


def _key(name: str, length: float, depth: float) -> MetricKey:
    """The MetricKey of a tidy row (whose missing length and depth are NaN)."""
    return MetricKey(name, None if math.isnan(length) else float(length),
                     None if math.isnan(depth) else float(depth))


def metric_keys(results: StudyResults) -> list[MetricKey]:
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


def variant_cells(results: StudyResults) -> dict[tuple[str, tuple], pd.DataFrame]:
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


def distinct_lrs(frame: pd.DataFrame) -> list[float]:
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
    for (variant, cell), frame in variant_cells(results).items():
        lrs = distinct_lrs(frame)
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
    keys = metric_keys(results)
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


def at_length(row: Row, keys: Sequence[MetricKey], length: float) -> tuple[dict[int, float], int]:
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
