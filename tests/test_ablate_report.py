"""The study report from hand-made study directories: the tables' values, the learning-rate
selection, the paired differences, the tidy file, the plots, and that a report is reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console

from memforge.ablate.report import write_report
from memforge.ablate.results import ReportError, load_results
from memforge.ablate.rows import build_differences, build_rows
from memforge.ablate.stats import bootstrap_mean
from memforge.errors import MemforgeError

# Validation accuracy per variant, lr and seed (None: the run failed). Test accuracy is 0.02 lower.
VALIDATION = {
    "lmm": {0.001: [0.50, 0.52, 0.54], 0.003: [0.60, 0.61, 0.65]},  # 0.003 wins: mean 0.62
    "linear": {0.001: [0.40, 0.42, 0.47], 0.003: [0.30, 0.35, 0.31]},  # 0.001 wins: mean 0.43
    "mac": {0.001: [0.70, None, 0.72], 0.003: [0.60, 0.65, 0.70]},  # 0.001 wins on its 2 finished seeds
}
MISSING = "linear-lr0.003-s2"  # planned, never ran
PARAMS = {"lmm": 566_000, "linear": 400_000, "mac": 700_000}


def _metrics(val: float, seed: int) -> list[dict]:
    return [
        {"name": "validation/accuracy", "value": val},
        {"name": "test/accuracy", "value": val - 0.02},
        {"name": "test/accuracy", "value": val - 0.1, "length": 128},
        {"name": "test/accuracy", "value": val - 0.2, "length": 256},
        *({"name": "s-niah/accuracy", "value": 1.0 - 0.1 * d - 0.0001 * length + 0.01 * seed,
           "length": length, "depth": d} for length in (256, 512) for d in (0.0, 0.5)),
    ]


def write_study(root: Path, runs: list[dict], *, selection=None, axes=(), baseline="lmm",
                primary="test/accuracy", **extra) -> Path:
    """A study directory as the runner writes it; a run's "result" None means no results file."""
    (root / "results").mkdir(parents=True)
    plan_runs = []
    for run in runs:
        result = run.pop("result")
        plan_runs.append({**run, "dir": f"runs/{run['id']}"})
        if result is not None:
            (root / "results" / f"{run['id']}.json").write_text(json.dumps({
                **run, "tokens_per_s": 1000.0 + run["seed"], "elapsed_s": 5.0, "steps": 100, **result}))
    (root / "plan.json").write_text(json.dumps({
        "schema": 1, "name": "toy", "baseline": baseline, "primary_metric": primary,
        "selection": selection, "axes": list(axes), "runs": plan_runs, **extra}))
    return root


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    runs = []
    for variant, by_lr in VALIDATION.items():
        for lr, values in by_lr.items():
            for seed, val in enumerate(values):
                rid = f"{variant}-lr{lr:g}-s{seed}"
                if rid == MISSING:
                    result = None
                elif val is None:
                    result = {"status": "failed", "error": "loss is NaN at step 40", "metrics": []}
                else:
                    result = {"status": "finished", "error": None, "metrics": _metrics(val, seed)}
                runs.append({"id": rid, "variant": variant, "seed": seed, "lr": lr, "axes": {},
                             "params": PARAMS[variant], "result": result})
    variants = [{"name": "lmm", "description": "the full memory"}, {"name": "linear", "description": ""}]
    return write_study(tmp_path / "study", runs, selection={"metric": "validation/accuracy", "mode": "max"},
                       description="A toy study.", variants=variants)


def _report_bytes(study: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((study / "report").iterdir())}


def test_results_table_reports_the_selected_lr_over_seeds(study: Path):
    written = write_report(study)
    assert [p.name for p in written[:6]] == ["results.md", "results.csv", "differences.md", "differences.csv",
                                            "selection.csv", "tidy.csv"]
    table = pd.read_csv(study / "report" / "results.csv").set_index("variant")
    assert table["lr"].to_dict() == {"lmm": 0.003, "linear": 0.001, "mac": 0.001}
    assert table["seeds"].to_dict() == {"lmm": 3, "linear": 3, "mac": 2}
    assert table.loc["mac", "failed"] == 1
    assert table.loc["linear", "missing"] == 0  # the missing run is at the lr not chosen
    assert table["params"].to_dict() == PARAMS
    assert table.loc["lmm", "tokens_per_s"] == pytest.approx(1001.0)

    lmm_test = [0.58, 0.59, 0.63]
    expected = bootstrap_mean(lmm_test)
    assert table.loc["lmm", "test/accuracy mean"] == pytest.approx(0.60)
    assert table.loc["lmm", "test/accuracy low"] == pytest.approx(expected.low)
    assert table.loc["lmm", "test/accuracy high"] == pytest.approx(expected.high)
    assert expected.low < 0.60 < expected.high
    # mac: the two finished seeds of lr 0.001; with two values the interval is exactly their range.
    assert table.loc["mac", "test/accuracy mean"] == pytest.approx(0.69)
    assert table.loc["mac", "test/accuracy low"] == pytest.approx(0.68)
    assert table.loc["mac", "test/accuracy high"] == pytest.approx(0.70)
    assert table.loc["mac", "test/accuracy n"] == 2
    # By length: one column per length (and depth).
    assert table.loc["lmm", "test/accuracy[length=256] mean"] == pytest.approx(0.42)
    assert table.loc["lmm", "s-niah/accuracy[length=512,depth=0.5] mean"] == pytest.approx(
        1.0 - 0.05 - 0.0512 + 0.01)

    markdown = (study / "report" / "results.md").read_text()
    assert "| mac       | 0.001 | 2 (1 failed) |" in markdown
    assert "0.600 [" in markdown  # lmm's test accuracy with its interval
    assert "highest mean `validation/accuracy`" in markdown
    assert "loss is NaN at step 40" in markdown and MISSING in markdown and "no results file yet" in markdown
    assert "## By length and depth" in markdown and "## Learning-rate selection" in markdown
    by_length = markdown.split("### test/accuracy by length\n")[1].split("###")[0]
    lmm_128 = bootstrap_mean([0.50, 0.51, 0.55])
    assert f"| lmm       | 0.003 | 0.520 [{lmm_128.low:#.3g}, {lmm_128.high:#.3g}] |" in by_length
    assert "### s-niah/accuracy by length (mean over depths)" in markdown
    assert "A toy study.\n" in markdown and "- `lmm`: the full memory\n" in markdown
    assert "`linear`" not in markdown  # no description, no line
    assert "18 runs: 16 finished, 1 failed, 1 missing. **Provisional**" in markdown


def test_selection_table_shows_every_lr_and_the_choice(study: Path):
    write_report(study)
    sel = pd.read_csv(study / "report" / "selection.csv")
    assert len(sel) == 6
    assert sel.loc[sel["chosen"], ["variant", "lr"]].values.tolist() == [["lmm", 0.003], ["linear", 0.001],
                                                                         ["mac", 0.001]]
    mac = sel[(sel["variant"] == "mac") & (sel["lr"] == 0.001)].iloc[0]
    assert mac["seeds"] == 2 and mac["validation/accuracy mean"] == pytest.approx(0.71)
    linear = sel[(sel["variant"] == "linear") & (sel["lr"] == 0.003)].iloc[0]
    assert linear["seeds"] == 2 and linear["validation/accuracy mean"] == pytest.approx(0.325)


def test_differences_are_paired_by_seed(study: Path):
    write_report(study)
    diff = pd.read_csv(study / "report" / "differences.csv").set_index("variant")
    assert list(diff.index) == ["linear", "mac"]
    # mac (lr 0.001) minus lmm (lr 0.003): only seeds 0 and 2 finished on both sides.
    assert diff.loc["mac", "pairs"] == 2 and diff.loc["mac", "baseline_lr"] == 0.003
    assert diff.loc["mac", "test/accuracy mean"] == pytest.approx(((0.68 - 0.58) + (0.70 - 0.63)) / 2)
    assert diff.loc["mac", "test/accuracy low"] == pytest.approx(0.07)
    assert diff.loc["mac", "test/accuracy high"] == pytest.approx(0.10)
    # linear minus lmm, all three seeds: -0.20, -0.19, -0.18.
    expected = bootstrap_mean([0.38 - 0.58, 0.40 - 0.59, 0.45 - 0.63])
    assert diff.loc["linear", "test/accuracy mean"] == pytest.approx(-0.19)
    assert diff.loc["linear", "test/accuracy low"] == pytest.approx(expected.low)
    assert diff.loc["linear", "test/accuracy high"] == pytest.approx(expected.high)
    # Identical s-niah offsets per seed on both sides: a zero difference with a zero-width interval.
    col = "s-niah/accuracy[length=256,depth=0] "
    assert diff.loc["linear", [col + "mean", col + "low", col + "high"]].tolist() == pytest.approx([0, 0, 0])
    assert "+0.0850 [+0.0700, +0.100]" in (study / "report" / "differences.md").read_text()


def test_tidy_file_has_one_row_per_run_and_metric(study: Path):
    write_report(study)
    tidy = pd.read_csv(study / "report" / "tidy.csv")
    assert list(tidy.columns) == ["run", "variant", "seed", "lr", "params", "status", "selected", "metric",
                                  "length", "depth", "value", "diverged"]
    assert not tidy["diverged"].any()
    # 16 finished runs with 8 metrics each, plus one row each for the failed and the missing run.
    assert len(tidy) == 16 * 8 + 2
    assert tidy["status"].value_counts().to_dict() == {"finished": 128, "failed": 1, "missing": 1}
    assert tidy.loc[tidy["run"] == MISSING, "metric"].isna().all()
    assert str(tidy["length"].dtype) == "float64" and tidy["length"].dropna().isin([128, 256, 512]).all()
    assert "128," in (study / "report" / "tidy.csv").read_text()  # written as an integer
    selected = tidy[tidy["selected"]]
    assert set(selected["run"]) == {"lmm-lr0.003-s0", "lmm-lr0.003-s1", "lmm-lr0.003-s2", "linear-lr0.001-s0",
                                    "linear-lr0.001-s1", "linear-lr0.001-s2", "mac-lr0.001-s0",
                                    "mac-lr0.001-s1", "mac-lr0.001-s2"}
    plain = tidy["length"].isna()
    row = tidy[(tidy["run"] == "mac-lr0.003-s1") & (tidy["metric"] == "test/accuracy") & plain]
    assert row["value"].item() == pytest.approx(0.63)


def test_plots_are_valid_pngs(study: Path):
    written = write_report(study)
    pngs = [p.name for p in written if p.suffix == ".png"]
    assert pngs == ["variants_test_accuracy.png", "variants_validation_accuracy.png",
                    "length_test_accuracy.png", "length_s_niah_accuracy.png"]
    for name in pngs:
        with Image.open(study / "report" / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300


def test_the_same_results_give_byte_identical_reports(study: Path):
    write_report(study)
    first = _report_bytes(study)
    write_report(study)
    assert _report_bytes(study) == first


def test_a_new_report_replaces_the_old_one_and_nothing_else(study: Path):
    (study / "report").mkdir()
    for name in ("variants_dropped_metric.png", "selection.csv", "my_notes.txt"):
        (study / "report" / name).write_text("old")
    plan = json.loads((study / "plan.json").read_text())
    (study / "plan.json").write_text(json.dumps({**plan, "selection": None}))
    write_report(study)
    names = set(_report_bytes(study))
    assert "variants_dropped_metric.png" not in names and "selection.csv" not in names
    assert "my_notes.txt" in names and "results.md" in names


def test_console_gets_the_tables(study: Path):
    console = Console(record=True, width=200)
    write_report(study, console=console)
    text = console.export_text()
    assert "toy: mean [95% CI] over seeds" in text and "minus lmm, paired by seed" in text
    assert "2 (1 failed)" in text and "0.690 [0.680, 0.700]" in text


def test_diverged_evaluations_are_counted_not_averaged_away(tmp_path: Path):
    """S-NIAH at two lengths and two depths with the runner's mean-over-depths entries; one run's
    memory diverges at length 512, depth 0.5: that cell has no value, and the report says so."""
    runs = []
    for variant, offset in (("lmm", 0.0), ("mac", 0.1)):
        for seed in (0, 1):
            metrics = [{"name": "validation/loss", "value": 2.0},
                       {"name": "test/accuracy", "value": 0.5 + offset + 0.01 * seed},
                       {"name": "test/loss", "value": 2.1}]
            for length in (256, 512):
                cells = {}
                for depth in (0.0, 0.5):
                    broken = variant == "mac" and seed == 1 and length == 512 and depth == 0.5
                    value = 0.9 - length / 5120 + offset - 0.1 * depth + 0.01 * seed
                    cells[depth] = None if broken else value
                    metrics.append({"name": "s-niah/accuracy", "value": cells[depth], "length": length,
                                    "depth": depth, **({"diverged": "logits hold NaN"} if broken else {})})
                mean = None if None in cells.values() else sum(cells.values()) / 2
                metrics.append({"name": "s-niah/accuracy", "value": mean, "length": length})
            runs.append({"id": f"{variant}-{seed}", "variant": variant, "seed": seed, "lr": 0.001, "axes": {},
                         "params": 10, "result": {"status": "finished", "error": None, "metrics": metrics}})
    study = write_study(tmp_path / "div", runs)
    written = write_report(study)
    table = pd.read_csv(study / "report" / "results.csv").set_index("variant")
    means = [c[: -len(" mean")] for c in table.columns if c.endswith(" mean")]
    # The primary metric, the rest of its evaluation, other evaluations; then by length and depth.
    assert means[:6] == ["test/accuracy", "test/loss", "validation/loss",
                         "s-niah/accuracy[length=256,depth=0]",
                         "s-niah/accuracy[length=256,depth=0.5]", "s-niah/accuracy[length=256]"]
    broken, mean = "s-niah/accuracy[length=512,depth=0.5] ", "s-niah/accuracy[length=512] "
    assert table.loc["mac", broken + "n"] == 1 and table.loc["mac", broken + "diverged"] == 1
    assert table.loc["mac", mean + "n"] == 1 and table.loc["mac", mean + "diverged"] == 1
    assert table.loc["lmm", broken + "diverged"] == 0
    assert table.loc["mac", broken + "mean"] == pytest.approx(0.9 - 0.1 + 0.1 - 0.05)  # seed 0 only
    assert "s-niah/accuracy[length=256] diverged" not in table.columns  # only where something diverged
    md = (study / "report" / "results.md").read_text()
    assert "### s-niah/accuracy by length (mean over depths)" in md
    # The Markdown shows the primary metric's kind; the losses are in the CSV only.
    assert "Shown: the `accuracy` metrics; every metric is in results.csv." in md
    assert "test/loss" not in md and "test/loss mean" in table.columns
    assert "| mac       | 0.001 | 0.930 [0.925, 0.935] | 0.875 (n=1; 1 diverged) |" in md
    differences = (study / "report" / "differences.md").read_text()
    assert "| mac       | 0.001 | +0.100 [+0.100, +0.100] | +0.100 (n=1) |" in differences
    diff = pd.read_csv(study / "report" / "differences.csv").set_index("variant")
    assert diff.loc["mac", broken + "n"] == 1 and diff.loc["mac", broken + "mean"] == pytest.approx(0.1)
    tidy = pd.read_csv(study / "report" / "tidy.csv")
    assert tidy["diverged"].sum() == 2 and tidy.loc[tidy["diverged"], "value"].isna().all()
    # Plots of the primary metric's kind only: no loss plots.
    assert [p.name for p in written if p.suffix == ".png"] == ["variants_test_accuracy.png",
                                                               "length_s_niah_accuracy.png"]


def _grid_study(root: Path) -> Path:
    runs = []
    for variant, offset in (("a", 0.0), ("b", 0.1)):
        for width in (32, 64, 128):
            for lr in (0.001, 0.01):
                for seed in (0, 1):
                    val = 0.3 + offset + width / 1000 + 0.01 * seed + (0.05 if lr == 0.01 else 0)
                    rid = f"{variant}-w{width}-lr{lr:g}-s{seed}"
                    result = {"status": "finished", "error": None,
                              "metrics": [{"name": "test/accuracy", "value": val}]}
                    runs.append({"id": rid, "variant": variant, "seed": seed, "lr": lr,
                                 "axes": {"width": width}, "params": width * 100, "result": result})
    return write_study(root, runs, baseline="a", axes=["width"])


def test_grid_axes_without_selection_give_a_row_per_cell_and_lr(tmp_path: Path):
    study = _grid_study(tmp_path / "grid")
    written = write_report(study)
    table = pd.read_csv(study / "report" / "results.csv")
    assert len(table) == 2 * 3 * 2
    assert table[["variant", "width", "lr"]].values.tolist()[:3] == [["a", 32, 0.001], ["a", 32, 0.01],
                                                                    ["a", 64, 0.001]]
    b = table[(table["variant"] == "b") & (table["width"] == 128) & (table["lr"] == 0.01)].iloc[0]
    assert b["test/accuracy mean"] == pytest.approx(0.3 + 0.1 + 0.128 + 0.005 + 0.05)
    assert b["params"] == 12_800
    diff = pd.read_csv(study / "report" / "differences.csv")
    assert len(diff) == 3 * 2 and (diff["lr"] == diff["baseline_lr"]).all()
    assert diff["test/accuracy mean"].to_numpy() == pytest.approx([0.1] * 6)
    assert "axis_width_test_accuracy.png" in [p.name for p in written]
    tidy = pd.read_csv(study / "report" / "tidy.csv")
    assert list(tidy.columns[:5]) == ["run", "variant", "seed", "lr", "width"] and len(tidy) == 24
    md = (study / "report" / "results.md").read_text()
    assert "each lr of a variant is its own row" in md and "selection.csv" not in [p.name for p in written]


def test_unreadable_studies_fail_with_one_line_before_writing(tmp_path: Path, study: Path):
    with pytest.raises(ReportError, match="has no plan.json"):
        write_report(tmp_path / "nowhere")
    (study / "results" / "lmm-lr0.001-s0.json").write_text("{not json")
    with pytest.raises(MemforgeError, match="lmm-lr0.001-s0.json"):
        write_report(study)
    assert not (study / "report").exists()
    plan = json.loads((study / "plan.json").read_text())
    (study / "plan.json").write_text(json.dumps({**plan, "baseline": "lnm"}))
    with pytest.raises(ReportError, match="baseline 'lnm' is not a variant"):
        write_report(study)
    (study / "plan.json").write_text(json.dumps([plan]))
    with pytest.raises(ReportError, match="plan.json: the plan is not a JSON object"):
        write_report(study)
    assert not (study / "report").exists()


@pytest.mark.parametrize("field, value", [("value", "high"), ("value", True), ("length", "64"),
                                          ("depth", [1])])
def test_a_results_file_with_a_metric_that_is_no_number_is_named(study: Path, field, value):
    path = study / "results" / "lmm-lr0.001-s1.json"
    result = json.loads(path.read_text())
    result["metrics"][0][field] = value
    path.write_text(json.dumps(result))
    with pytest.raises(ReportError, match=r"lmm-lr0\.001-s1\.json: .* must be a number or null, "
                                          r"got .*; delete the file to re-run that run"):
        write_report(study)
    assert not (study / "report").exists()


@given(
    values=st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=12, max_size=12),
    mode=st.sampled_from(["max", "min"]),
)
def test_selection_picks_the_best_mean_over_finished_seeds(tmp_path_factory, values, mode):
    """Two variants x two lrs x three seeds with random scores and failures (None): the chosen lr is
    the best mean over finished seeds, computed here independently with pandas."""
    root = tmp_path_factory.mktemp("prop")
    runs, i = [], 0
    for variant in ("lmm", "mac"):
        for lr in (0.001, 0.01):
            for seed in range(3):
                v = values[i]
                i += 1
                result = ({"status": "failed", "error": "x", "metrics": []} if v is None else
                          {"status": "finished", "error": None,
                           "metrics": [{"name": "validation/accuracy", "value": v},
                                       {"name": "test/accuracy", "value": 1 - v}]})
                runs.append({"id": f"{variant}-{lr}-{seed}", "variant": variant, "seed": seed, "lr": lr,
                             "axes": {}, "params": 1, "result": result})
    frame = pd.DataFrame([{"variant": r["variant"], "lr": r["lr"], "seed": r["seed"], "v": values[k]}
                          for k, r in enumerate(runs)])
    study = write_study(root / "s", runs, selection={"metric": "validation/accuracy", "mode": mode})
    results = load_results(study)
    rows, _ = build_rows(results)
    for row in rows:
        means = frame[frame["variant"] == row.variant].dropna().groupby("lr")["v"].mean()
        if means.empty:
            assert math.isnan(row.lr) and row.runs == [] and row.finished == 0
            continue
        best = means.max() if mode == "max" else means.min()
        assert means[row.lr] == best and row.lr == min(means.index[means == best])
        mine = frame[(frame["variant"] == row.variant) & (frame["lr"] == row.lr)]
        assert row.finished == mine["v"].notna().sum()
    for d in build_differences(rows, "lmm"):
        for interval in d.stats.values():
            assert interval.n <= min(d.row.finished, d.baseline.finished)
