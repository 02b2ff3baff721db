"""Running studies with the local executor: outcomes, skipping, resuming and failures."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from memforge.ablate.job import SESSIONS_FILE, run_job
from memforge.ablate.runner import PLAN_FILE, Resources, plan_study, run_study, write_plan
from memforge.ablate.study import StudyError
from memforge.cli import main
from memforge.spec import from_dict
from memforge.training import TrainConfig, train
from memforge.training.rundir import read_json

TINY = Path(__file__).parent / "studies" / "tiny.toml"


def _tiny(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    text = TINY.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _keep_threads():
    """run_job sets this process's torch threads; give the next test the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _results(directory: Path) -> dict[str, dict]:
    return {p.stem: read_json(p) for p in sorted((directory / "results").glob("*.json"))}


@pytest.mark.slow
def test_study_runs_in_worker_processes_and_a_rerun_does_no_work(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["ablate", str(TINY), "--out", str(out), "--workers", "2", "--no-report"]) == 0
    text = capsys.readouterr().out
    assert "4 runs finished, 0 failed" in text
    plan = read_json(out / PLAN_FILE)
    assert [r["id"] for r in plan["runs"]] == ["lmm__seed=0", "lmm__seed=1", "linear__seed=0",
                                               "linear__seed=1"]
    assert (out / "study.toml").read_bytes() == TINY.read_bytes()
    results = _results(out)
    assert set(results) == {r["id"] for r in plan["runs"]}
    for run in plan["runs"]:
        outcome = results[run["id"]]
        assert outcome["status"] == "finished" and outcome["error"] is None
        assert outcome["steps"] == 6 and outcome["params"] == run["params"] > 0
        assert outcome["tokens_per_s"] > 0 and outcome["elapsed_s"] > 0
        names = {(m["name"], m.get("length")) for m in outcome["metrics"]}
        assert {("validation/accuracy", None), ("test/accuracy", None), ("far/accuracy", None),
                ("long/accuracy", 32), ("long/accuracy", 64)} <= names
        for metric in outcome["metrics"]:
            if metric["name"].endswith("accuracy"):
                assert 0.0 <= metric["value"] <= 1.0
        # Each run is an ordinary training run directory.
        run_dir = out / run["dir"]
        assert (run_dir / "spec.toml").is_file() and (run_dir / "checkpoints" / "latest").is_file()
        assert read_json(run_dir / "run.json")["seed"] == run["seed"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}

    assert main(["ablate", str(TINY), "--out", str(out), "--workers", "2", "--no-report"]) == 0
    text = capsys.readouterr().out
    assert "nothing to do" in text and "4 runs finished" in text
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    plan = plan_study(TINY, tmp_path / "study")
    job = plan.jobs["lmm__seed=0"]
    # What a study interrupted after step 3 leaves: a run directory with a checkpoint at step 3.
    torch.set_num_threads(1)

    train(TrainConfig(model=from_dict(job["spec"]), task=job["task"], task_options=job["task_options"],
                      lr=job["lr"], seed=job["seed"], out=job["run_dir"], stop_after=3, **job["train"]))
    plan = plan_study(TINY, tmp_path / "study")
    assert plan.done_steps == {"lmm__seed=0": 3}
    outcome = run_job(plan.jobs["lmm__seed=0"], threads=1)
    assert outcome["status"] == "finished" and outcome["steps"] == 6
    sessions = read_json(Path(job["run_dir"]) / SESSIONS_FILE)
    assert [s["steps"] for s in sessions] == [3]  # only the missing steps were trained

    # The resumed run ends exactly where an uninterrupted one does.
    fresh = run_job({**plan.jobs["lmm__seed=0"], "run_dir": str(tmp_path / "fresh"),
                     "result_path": str(tmp_path / "fresh.json")}, threads=1)
    assert fresh["metrics"] == outcome["metrics"]


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path):
    path = _tiny(tmp_path, ("seeds = [0, 1]", "seeds = [0]"))
    plan = plan_study(path, tmp_path / "study")
    # A file where the run directory should be: the run fails, like any error would make it.
    blocked = Path(plan.jobs["linear__seed=0"]["run_dir"])
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")
    summary = run_study(plan, console=Console(file=io.StringIO()), executor="local",
                        resources=Resources(workers=2, threads=1))
    assert summary.failed == ["linear__seed=0"]
    failed = summary.outcomes["linear__seed=0"]
    assert failed["status"] == "failed" and failed["metrics"] == []
    assert "is a file" in failed["error"] and "\n" not in failed["error"]
    assert summary.outcomes["lmm__seed=0"]["status"] == "finished"
    # Failed runs keep their outcome on a re-run, unless retried.
    assert plan_study(path, tmp_path / "study").todo == []
    assert plan_study(path, tmp_path / "study", retry_failed=True).todo == ["linear__seed=0"]


def test_a_second_study_on_a_locked_directory_is_refused_before_any_result_changes(tmp_path):
    from memforge.ablate.executors import failed_outcome
    from memforge.ablate.job import write_result
    from memforge.training.config import TrainingError
    from memforge.training.runlock import RunLock

    out = tmp_path / "study"
    plan = plan_study(TINY, out)
    job = plan.jobs["linear__seed=0"]
    write_result(Path(job["result_path"]), failed_outcome(job, "boom"))
    retry = plan_study(TINY, out, retry_failed=True)
    assert "linear__seed=0" in retry.todo
    before = Path(job["result_path"]).read_bytes()
    with RunLock(out):  # what the first study process holds while it runs
        with pytest.raises(TrainingError, match="is in use by another process"):
            run_study(retry, console=Console(file=io.StringIO()), executor="local",
                      resources=Resources(workers=1, threads=1))
    assert Path(job["result_path"]).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "results"]


def test_a_changed_study_is_refused_in_the_same_directory(tmp_path):
    out = tmp_path / "study"
    plan = plan_study(TINY, out)
    run_job(plan.jobs["lmm__seed=0"], threads=1)
    write_plan(plan)
    changed = _tiny(tmp_path, ("steps = 6", "steps = 7"))
    with pytest.raises(StudyError, match="holds runs made with other settings under the same ids"):
        plan_study(changed, out)
    # A new seed is a new run and leaves the others alone.
    more = plan_study(_tiny(tmp_path, ("seeds = [0, 1]", "seeds = [0, 1, 2]")), out)
    assert len(more.runs) == 6 and more.todo == [r.id for r in more.runs if r.id != "lmm__seed=0"]


def test_report_of_a_directory_that_is_no_study(tmp_path, capsys):
    assert main(["ablate", "report", str(tmp_path)]) == 2
    assert "is not a study directory (no plan.json)" in capsys.readouterr().err


def test_results_files_are_json(tmp_path):
    plan = plan_study(TINY, tmp_path / "study")
    outcome = run_job(plan.jobs["linear__seed=1"], threads=1)
    stored = json.loads(Path(plan.jobs["linear__seed=1"]["result_path"]).read_text())
    assert stored == json.loads(json.dumps(outcome))
    assert stored["fingerprint"] == plan.jobs["linear__seed=1"]["fingerprint"]


@pytest.mark.slow
def test_a_worker_stopped_by_sigterm_checkpoints_and_records_no_outcome(tmp_path):
    import multiprocessing
    import signal
    import time

    from memforge.ablate.executors import _read_outcome
    from memforge.ablate.job import checkpoint_step, worker_main

    path = _tiny(tmp_path, ("steps = 6", "steps = 2000"), ("eval_every = 3", "eval_every = 5"))
    job = plan_study(path, tmp_path / "study").jobs["lmm__seed=0"]
    run_dir = Path(job["run_dir"])
    worker = multiprocessing.get_context("spawn").Process(target=worker_main, args=(job, 1))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not checkpoint_step(run_dir):
            assert worker.is_alive() and time.monotonic() < deadline
            time.sleep(0.1)
        worker.terminate()  # SIGTERM: the run finishes its step, checkpoints and exits
        worker.join(60)
    finally:
        if worker.exitcode is None:
            worker.kill()
            worker.join()
    assert worker.exitcode == 128 + signal.SIGTERM
    assert not Path(job["result_path"]).exists()
    assert _read_outcome(job, worker.exitcode) is None  # not failed: the run resumes next time
    stopped_at = checkpoint_step(run_dir)
    sessions = read_json(run_dir / SESSIONS_FILE)
    assert stopped_at > 0 and sessions[-1]["steps"] == stopped_at
    assert plan_study(path, tmp_path / "study").done_steps == {"lmm__seed=0": stopped_at}


@pytest.mark.slow
def test_the_same_study_run_twice_gives_the_same_tables(tmp_path):
    import pandas as pd

    from memforge.ablate.report import write_report

    torch.set_num_threads(1)
    for name in ("first", "second"):
        plan = plan_study(TINY, tmp_path / name)
        write_plan(plan)
        for job in plan.jobs.values():
            assert run_job(job, threads=1)["status"] == "finished"
        write_report(tmp_path / name, console=Console(file=io.StringIO()))
    first, second = tmp_path / "first" / "report", tmp_path / "second" / "report"
    for table in ("differences.csv", "tidy.csv"):
        assert (first / table).read_bytes() == (second / table).read_bytes()
    # Throughput is the one column that is measured, not computed from the seeds.
    a, b = (pd.read_csv(d / "results.csv").drop(columns="tokens_per_s") for d in (first, second))
    pd.testing.assert_frame_equal(a, b)


def test_progress_reads_the_latest_step_and_the_headline(tmp_path):
    from memforge.ablate.progress import current_step, headline

    assert current_step(tmp_path) == 0
    rows = [{"step": s, "split": "train", "loss": 1.0} for s in range(1, 400)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    assert current_step(tmp_path) == 399  # a line cut short by a crash is skipped
    outcome = {"metrics": [{"name": "test/accuracy", "value": 0.5, "length": 128},
                           {"name": "test/accuracy", "value": 0.25},
                           {"name": "far/accuracy", "value": None, "diverged": "overflow"}]}
    assert headline(outcome, "test/accuracy") == "test/accuracy 0.250"
    assert headline(outcome, "far/accuracy") == "far/accuracy diverged"
    assert headline(outcome, "validation/loss") == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_worker_whose_study_process_is_gone_stops_itself():
    import multiprocessing
    import os
    import signal

    from memforge.ablate.job import _stop_with_parent

    context = multiprocessing.get_context("spawn")
    # Re-parented to a subreaper, not only to init: any parent but the study's own means it died.
    for parent, exitcode in ((os.getpid(), 0), (1, -signal.SIGTERM), (os.getpid() + 1, -signal.SIGTERM)):
        worker = context.Process(target=_stop_with_parent, args=(parent,))
        worker.start()
        worker.join(60)
        assert worker.exitcode == exitcode, parent
