"""The evaluation budget: the measured state growth matches what the models hold, the time
follows how a token's cost grows with the context, and plans that cannot fit are refused with
their figures."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memforge
from memforge.cli import main
from memforge.training.budget import (
    MAX_EVAL_SECONDS,
    EvalCost,
    TimeModel,
    check_costs,
    costs_of,
    estimate_costs,
    fit_time,
    probe_model,
    state_bytes,
)
from memforge.training.config import TrainingError

CPU = torch.device("cpu")


def _costs(preset: str, lengths: list[int], batch_size: int = 2) -> list[EvalCost]:
    spec = memforge.preset(preset)
    torch.manual_seed(0)
    model = memforge.build_model(spec)
    return estimate_costs(model, vocab_size=spec.vocab_size, lengths=lengths, cells_per_length=1,
                          batch_size=batch_size, batches=1, piece_size=64, device=CPU)


def test_full_attention_state_grows_by_its_key_value_cache():
    """Every token adds a key and a value row of width dim in every layer: 2 * 2 * 32 * 4 bytes."""
    short, long = _costs("baseline.transformer_tiny", [1024, 2048])
    per_token = (long.state_bytes - short.state_bytes) / 1024 / 2  # per sequence
    assert per_token == pytest.approx(2 * 2 * 32 * 4)


@pytest.mark.parametrize("preset", ["titans.lmm_tiny", "baseline.swa_tiny"])
def test_bounded_states_do_not_grow(preset: str):
    """A memory's fast weights and a sliding window's ring have the same size at any length."""
    short, long = _costs(preset, [1024, 1 << 20])
    assert short.state_bytes == long.state_bytes > 0
    assert long.batch_bytes == (1 << 20) * 2 * 16


def test_state_bytes_walks_nested_states():
    state = (torch.zeros(2, 3), [torch.zeros(4, dtype=torch.float64)], {"x": torch.zeros(1)}, None, 5)
    assert state_bytes(state) == 2 * 3 * 4 + 4 * 8 + 4


def test_a_plan_beyond_the_memory_is_refused_with_its_figure():
    cost = EvalCost(length=1 << 30, batch_bytes=1 << 60, state_bytes=0, piece_bytes=0, seconds=1.0)
    with pytest.raises(TrainingError, match=r"length 1073741824 needs at least 1 EB of memory for its "
                                            r"test batches, more than the .* available; use shorter "
                                            r"--lengths"):
        check_costs([cost], CPU)


def test_a_plan_beyond_a_day_is_refused_with_its_figure():
    costs = [EvalCost(length=n, batch_bytes=0, state_bytes=0, piece_bytes=0,
                      seconds=MAX_EVAL_SECONDS * 0.75) for n in (1024, 2048)]
    with pytest.raises(TrainingError, match=r"would take about 36 hours \(18 at length 1024\), more "
                                            r"than the 24 hours"):
        check_costs(costs, CPU)
    check_costs(costs[:1], CPU)  # 18 hours fits


def test_a_bounded_state_costs_twice_the_time_at_twice_the_length():
    """A memory's fast weights do not grow: its measured state growth is 0, so the fitted time has
    no slope and twice the length is exactly twice the time, however the timings came out."""
    short, long = _costs("titans.lmm_tiny", [1 << 20, 2 << 20])
    assert long.seconds / short.seconds == pytest.approx(2.0)


def test_a_growing_cache_costs_about_four_times_at_twice_the_length():
    """Full attention reads a cache that grows with the context: with a per-token time that grows
    with it, twice the length takes about four times the time. The probe's state growth is
    measured; its timings are set, since the machine's load moves real ones (the fit from real
    timings, one of them slowed, is the next test's)."""
    short, long = _costs("baseline.transformer_tiny", [1 << 20, 2 << 20])
    assert long.state_bytes > 1.9 * short.state_bytes
    model = memforge.build_model(memforge.preset("baseline.transformer_tiny"))
    probe = attrs.evolve(probe_model(model, 64, 2, 64, CPU), time=TimeModel(base=1e-5, slope=1e-9))
    short, long = costs_of(probe, lengths=[1 << 20, 2 << 20], cells_per_length=1, batch_size=2,
                           batches=1, piece_size=64, vocab_size=64)
    assert 3.9 < long.seconds / short.seconds < 4.0


@settings(deadline=None)
@given(a=st.floats(0, 1e-3), b=st.floats(0, 1e-9),
       states=st.lists(st.integers(0, 1 << 30), min_size=2, max_size=12, unique=True),
       noise=st.integers(0, 11))
def test_fit_recovers_a_line_despite_one_slow_piece(a: float, b: float, states: list[int], noise: int):
    """Theil-Sen: among five pieces or more, one slowed down by another process does not move
    the slope, and the fitted rates are never negative."""
    seconds = [a + b * s for s in states]
    if len(states) >= 5:
        seconds[noise % len(states)] *= 10
    fitted_a, fitted_b = fit_time(states, seconds)
    assert fitted_a >= 0 and fitted_b >= 0
    if len(states) >= 5:
        assert fitted_b == pytest.approx(b, rel=1e-6, abs=1e-18)


def test_a_falling_time_gives_no_negative_rate():
    assert fit_time([1, 2, 3], [3.0, 2.0, 1.0]) == (2.0, 0.0)
    assert fit_time([5, 5], [1.0, 3.0]) == (2.0, 0.0)


def test_time_model_integrates_the_rate():
    rate = TimeModel(base=2.0, slope=0.5)
    assert rate.seconds(0, 10) == 2.0 * 10 + 0.5 * 100 / 2
    assert rate.seconds(0, 4) + rate.seconds(4, 10) == rate.seconds(0, 10)


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("budget") / "run"
    assert main(["train", "--preset", "baseline.transformer_tiny", "--steps", "2", "--batch-size", "4",
                 "--eval-every", "2", "--eval-batches", "1", "--task-option", "seq_len=32",
                 "--task-option", "num_pairs=4", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_a_million_tokens_of_full_attention_is_refused_with_the_hours(
        transformer_run: Path, capsys: pytest.CaptureFixture[str]):
    """The plan that once ran for minutes in silence: the cache a token reads grows to a million
    rows, so the time is quadratic (hundreds of hours on a CPU at 128 sequences; the estimate is
    a lower bound, the probe's cache being small). Refused before scoring, nothing written."""
    capsys.readouterr()
    code = main(["eval", str(transformer_run), "--lengths", "64,1m", "--batch-size", "2",
                 "--batches", "64", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    assert re.fullmatch(r"memforge: error: this evaluation would take about [\d,]+ hours \([\d,]+ "
                        r"at length 1048576\), more than the 24 hours memforge runs one for; use "
                        r"shorter --lengths, fewer --batches or a smaller --batch-size\n",
                        captured.err)
    assert "plan:" not in captured.out
    assert not list(transformer_run.glob("eval-*"))


def test_eval_prints_its_plan_and_progress_lines_off_a_terminal(
        transformer_run: Path, capsys: pytest.CaptureFixture[str]):
    capsys.readouterr()
    assert main(["eval", str(transformer_run), "--lengths", "32,64", "--batches", "1",
                 "--batch-size", "2", "--device", "cpu", "--progress-every", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"plan: mqar on .*step-00000002 \(step 2\), lengths 32, 64 = 2 cells of 1 "
                        r"batch of 2 sequences, cpu; estimated [\d.]+ s, at least .* of memory",
                        lines[0])
    # After the first piece, then (the interval being long) at the last one.
    assert re.fullmatch(r"cell 1/2 \(length 32\) \| \d+% \| elapsed 0:00:\d\d \| left \d:\d\d:\d\d",
                        lines[1])
    assert re.fullmatch(r"cell 2/2 \(length 64\) \| 100% \| elapsed 0:00:\d\d \| left 0:00:00",
                        lines[2])
    assert main(["eval", str(transformer_run), "--lengths", "32", "--batches", "1",
                 "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    assert "plan:" not in capsys.readouterr().out
