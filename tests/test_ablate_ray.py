"""The Ray executor on a real local Ray cluster (2 CPUs): a study killed halfway, then completed.

The study runs as ``memforge ablate`` in its own session; killing that session (SIGKILL) takes
the driver, the local cluster it started and the Ray workers down together, as a lost machine or
an impatient user would. Running the study again must do only the runs that had no outcome.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray executor needs the 'ray' extra: pip install -e '.[ray]'")

TINY = Path(__file__).parent / "studies" / "tiny.toml"


def _session_processes(session: int) -> list[int]:
    """Processes whose session id is ``session`` (the study's driver, Ray's daemons and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == session:
            found.append(int(entry.name))
    return found


def _kill_session(session: int) -> None:
    for _ in range(50):
        pids = _session_processes(session)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _study(tmp_path: Path) -> Path:
    # More steps than the tiny study, so that a run outlasts the polling below.
    path = tmp_path / "study.toml"
    path.write_text(TINY.read_text().replace("steps = 6", "steps = 20"))
    return path


def _command(study: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "memforge", "ablate", str(study), "--executor", "ray",
            "--workers", "2", "--out", str(out), "--no-report"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find Ray processes")
def test_ray_study_killed_halfway_then_rerun_does_only_the_missing_runs(tmp_path):
    study, out = _study(tmp_path), tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command(study, out), start_new_session=True, stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "results").glob("*.json")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no run finished within 120 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        _kill_session(first.pid)
        first.wait()
        log.close()
    assert _session_processes(first.pid) == []  # no Ray daemon or worker outlived the study
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert 1 <= len(before) < 4, (tmp_path / "first.log").read_text()

    second = subprocess.Popen(_command(study, out), start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = second.communicate(timeout=180)
        deadline = time.monotonic() + 15
        while _session_processes(second.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _session_processes(second.pid)
    finally:
        _kill_session(second.pid)
    assert left == []  # ray.shutdown() stopped the local cluster it started
    assert second.returncode == 0, output
    assert f"{4 - len(before)} runs to do" in output
    assert "4 runs finished, 0 failed" in output
    after = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert len(after) == 4
    assert {name: after[name] for name in before} == before  # finished runs were not redone


def test_a_lost_worker_or_an_interrupted_run_is_stopped_not_failed():
    from types import SimpleNamespace

    from ray import exceptions

    from memforge.ablate.executors import ray_stopped
    from memforge.training.stopping import TrainingInterrupted

    interrupted = TrainingInterrupted(signal.SIGTERM, SimpleNamespace(step=3, steps=6, run_dir="r"),
                                      None)
    for error in (exceptions.WorkerCrashedError(), exceptions.NodeDiedError("node lost"),
                  exceptions.TaskCancelledError(), exceptions.RayActorError(),
                  exceptions.RayTaskError("run_job", "traceback", interrupted),
                  exceptions.RayTaskError("run_job", "traceback", KeyboardInterrupt()),
                  exceptions.RayTaskError("run_job", "traceback", interrupted).as_instanceof_cause()):
        assert ray_stopped(error), error
    for error in (exceptions.RayTaskError("run_job", "traceback", ValueError("bad spec")),
                  exceptions.OutOfMemoryError("killed"), RuntimeError("boom")):
        assert not ray_stopped(error), error
