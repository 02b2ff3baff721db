"""Benchmark: the sequential executor beside the closed-form chunk kernel, and its cost per token.

Configuration (issues #13 and #14): dim 256 in 4 heads of 64, the 2-layer MLP memory (expansion
4, residual + layer norm), chunk 64, batch 2, float32. The rule both executors run: the squared
error, a gated step with momentum, adaptive decay, reads at the chunk start (gates drawn as
``sigmoid`` of random numbers). Each case is one forward + backward through the executor's
``scan`` (the gradient of fixed random cotangents of the outputs and final weights w.r.t. q, k,
v, the gates and the initial weights), at 1024 and 4096 tokens:

* ``closed_form``: :class:`memforge.engine.executors.ClosedFormExecutor`;
* ``sequential``: :class:`memforge.engine.sequential.SequentialExecutor` on the same rule;
* ``sequential+token`` (with ``--transform``): the same rule with a per-token update transform
  (``u / sqrt(1 + ||u||^2)``), which only the sequential executor runs: its token loop.

The cases take turns inside each repeat (a busy machine slows them alike); each reports the
median of ``--repeats`` timings and the spread ``(max - min) / median``. The per-token cost ratio
is ``(time at 4096 / 4096) / (time at 1024 / 1024)`` (target: within 15% of 1).

Usage: ``OMP_NUM_THREADS=2 python benchmarks/bench_sequential.py [--repeats 3] [--threads 2]
[--transform]``. Prints a table and one JSON line; report the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from _common import cpu_name, timed
from torch import Tensor

from memforge.engine import rules
from memforge.engine.executors import ClosedFormExecutor, Executor, LearningRule, RuleInputs
from memforge.engine.networks import MLPMemory
from memforge.engine.sequential import SequentialExecutor

DIM, HEADS, CHUNK, BATCH = 256, 4, 64, 2
LENGTHS = (1024, 4096)
TARGET_FLATNESS = 0.15


class NormalisedStep:
    """A per-token update transform, ``u / sqrt(1 + ||u||_F^2)`` (for ``--transform``)."""

    applies_at = "token"

    def transform(self, update: Tensor) -> Tensor:
        return update * torch.rsqrt(1.0 + update.square().sum((-2, -1), keepdim=True))


def make_rule(transform: bool) -> LearningRule:
    """The benchmark's rule (see the module docstring)."""
    torch.manual_seed(0)
    network = MLPMemory(HEADS, DIM // HEADS, 2, expansion=4.0, residual=True, norm=True)
    optimizer = NormalisedStep() if transform else rules.GatedStep(DIM, HEADS, max_lr=0.1,
                                                                   lr_init=0.01, momentum=True)
    retention = rules.AdaptiveDecay(DIM, HEADS, init=0.01, max_decay=1.0)
    return LearningRule(network, rules.L2Objective(), optimizer, retention,
                        rules.ReadAtChunkStart(), CHUNK)


def make_inputs(tokens: int, seed: int = 0) -> RuleInputs:
    """Float32 leaves in kernel layout ``[N = B * H, T, ...]``."""
    gen = torch.Generator().manual_seed(seed)
    n, head = BATCH * HEADS, DIM // HEADS

    def leaf(x: Tensor) -> Tensor:
        return x.requires_grad_()

    unit = [torch.nn.functional.normalize(torch.randn(n, tokens, head, generator=gen), dim=-1)
            for _ in range(2)]
    return RuleInputs(
        queries=leaf(unit[0]), keys=leaf(unit[1]),
        values=leaf(torch.randn(n, tokens, head, generator=gen)),
        lr=leaf(0.1 * torch.sigmoid(torch.randn(n, tokens, generator=gen))),
        momentum=leaf(torch.sigmoid(torch.randn(n, tokens, generator=gen) + 2.0)),
        log_keep=leaf(torch.nn.functional.logsigmoid(torch.randn(n, tokens, generator=gen) + 5.0)),
        side=None, window=None)


def train_step(executor: Executor, rule: LearningRule, tokens: int) -> Callable[[], None]:
    """One forward + backward of ``executor`` on ``tokens`` tokens, fixed random cotangents."""
    inputs = make_inputs(tokens)
    leaves = [x for x in inputs if x is not None] + list(rule.network.parameters())
    gen = torch.Generator().manual_seed(1)
    out_cot = torch.randn(BATCH * HEADS, tokens, DIM // HEADS, generator=gen)
    weight_cots = [torch.randn(BATCH * HEADS, *w.shape[1:], generator=gen)
                   for w in rule.network.initial_weights()]

    def step() -> None:
        state = executor.initial_state(rule, BATCH, inputs)
        out, state = executor.scan(rule, state, inputs)
        weights = executor.current_weights(rule, state)
        loss = (out * out_cot).sum() + sum((w * c).sum() for w, c in zip(weights, weight_cots, strict=True))
        torch.autograd.grad(loss, leaves)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--transform", action="store_true",
                        help="also time a rule with a per-token update transform (sequential only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    linear = make_rule(transform=False)
    executors: list[tuple[str, Executor, LearningRule]] = [
        ("closed_form", ClosedFormExecutor(), linear), ("sequential", SequentialExecutor(), linear)]
    if args.transform:
        executors.append(("sequential+token", SequentialExecutor(), make_rule(transform=True)))
    cases = {(name, tokens): train_step(executor, rule, tokens)
             for name, executor, rule in executors for tokens in LENGTHS}
    times = timed(cases, args.repeats)
    median = {key: statistics.median(ts) for key, ts in times.items()}
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"forward+backward through the executor's scan: dim {DIM}, {HEADS} heads, 2-layer MLP "
          f"memory, chunk {CHUNK}, batch {BATCH}, float32; median of {args.repeats}")
    print(f"{'executor':<18}{'tokens':>7}{'ms':>10}{'tokens/s':>11}{'spread':>8}{'vs closed form':>16}")
    results = {}
    for (name, tokens), seconds in median.items():
        spread = (max(times[name, tokens]) - min(times[name, tokens])) / seconds
        relative = median["closed_form", tokens] / seconds
        print(f"{name:<18}{tokens:>7}{seconds * 1e3:>10.1f}{BATCH * tokens / seconds:>11.0f}"
              f"{spread:>8.0%}{relative:>15.2f}x")
        results[f"{name}@{tokens}"] = {"ms": seconds * 1e3, "tokens_per_s": BATCH * tokens / seconds,
                                       "spread": spread, "vs_closed_form": relative}
    flatness = {}
    for name, _, _ in executors:
        ratio = (median[name, LENGTHS[1]] / LENGTHS[1]) / (median[name, LENGTHS[0]] / LENGTHS[0])
        flatness[name] = ratio
        verdict = "met" if abs(ratio - 1.0) <= TARGET_FLATNESS else "MISSED"
        print(f"{name}: cost per token at {LENGTHS[1]} / at {LENGTHS[0]} = {ratio:.2f} "
              f"(target within {TARGET_FLATNESS:.0%}: {verdict})")
    print(json.dumps({"benchmark": "sequential", "cpu": cpu_name(), "threads": args.threads,
                      "torch": torch.__version__, "results": results,
                      "per_token_cost_4096_over_1024": flatness}))


if __name__ == "__main__":
    main()
