"""The plan's time estimate: time a few training steps of each distinct model, then schedule.

Each distinct (spec, task) among the runs still to do trains for a few steps in this process with
one worker's share of threads; a run's time is then its remaining steps at that rate, plus its
validation and evaluation forward passes at the measured forward rate and a fixed start-up cost.
The study's wall time is the longest worker's load when runs go, longest first, to the least
loaded worker. Other work on the machine, and workers sharing memory bandwidth, make real runs
slower than the estimate, so it is a lower bound more than a forecast.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: Seconds a run spends outside training and evaluation (process start, imports, files).
STARTUP_S = 4.0
#: Timed training steps per distinct model (after one untimed warm-up step).
TIMED_STEPS = 2
#: Needle depths the evaluator scores unless told (memforge.training.evaluate.DEFAULT_DEPTHS).
_DEFAULT_DEPTH_COUNT = 5


def _measure(spec_dict: Mapping[str, Any], task_name: str, task_options: Mapping[str, Any],
             train: Mapping[str, Any]) -> tuple[float, float, int]:
    """Seconds per training step and per forward token, and the training length, of one model."""
    import torch
    import torch.nn.functional as F

    from memforge.builder import build_model
    from memforge.spec import from_dict
    from memforge.tasks import IGNORE_INDEX
    from memforge.training import TrainConfig
    from memforge.training.config import resolve_task
    from memforge.training.optim import make_optimizer

    spec = from_dict(spec_dict)
    config = TrainConfig(model=spec, task=task_name, task_options=task_options, **train)
    task = resolve_task(task_name, task_options, spec)
    model = build_model(spec)
    optimizer = make_optimizer(model, config)
    inputs, targets = task.batch(config.batch_size, seed=0)

    def step() -> None:
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    tick = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    step_s = (time.perf_counter() - tick) / TIMED_STEPS
    with torch.no_grad():
        tick = time.perf_counter()
        model(inputs)
        forward_s = time.perf_counter() - tick
    return step_s, forward_s / inputs.numel(), task.seq_len


def estimate(jobs: Sequence[Mapping[str, Any]], *, workers: int, threads: int,
             done_steps: Mapping[str, int]) -> tuple[float, float]:
    """Estimated (total run seconds, wall seconds with ``workers``) for ``jobs``.

    ``done_steps`` gives the steps a resumed run has already taken.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    rates: dict[str, tuple[float, float, int]] = {}
    durations = []
    try:
        for job in jobs:
            key = json.dumps([job["spec_id"], job["task_options"]], sort_keys=True)
            if key not in rates:
                rates[key] = _measure(job["spec"], job["task"], job["task_options"], job["train"])
            durations.append(_run_seconds(job, *rates[key], done=done_steps.get(job["id"], 0)))
    finally:
        torch.set_num_threads(saved)
    loads = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + duration)
    return sum(durations), max(loads)


def _run_seconds(job: Mapping[str, Any], step_s: float, token_s: float, seq_len: int,
                 *, done: int) -> float:
    from memforge.training import TrainConfig

    defaults = TrainConfig()
    train = job["train"]
    steps = train.get("steps", defaults.steps)
    batch = train.get("batch_size", defaults.batch_size)
    remaining = max(0, steps - done)
    validations = remaining / train.get("eval_every", defaults.eval_every) + 1
    seconds = STARTUP_S + remaining * step_s
    seconds += validations * train.get("eval_batches", defaults.eval_batches) * batch * seq_len * token_s
    for evaluation in job["evaluations"]:
        depths = evaluation["depths"]
        cells = len(depths) if depths else (_DEFAULT_DEPTH_COUNT if _has_depth(job, evaluation) else 1)
        tokens = sum(evaluation["lengths"] or [seq_len]) * evaluation["batches"] * evaluation["batch_size"]
        seconds += cells * tokens * token_s
    return seconds


def _has_depth(job: Mapping[str, Any], evaluation: Mapping[str, Any]) -> bool:
    from memforge import tasks

    return "depth" in tasks.task_options(evaluation["task"] or job["task"])
