"""Benchmark: every memory family's rule on the sequential executor, beside the Titans kernel.

Configuration (issue #14): the memory layer of each zoo family whose layer is the engine's
(:class:`memforge.engine.layer.FastWeightMemoryLayer`; ``bench_zoo.FAMILIES``), at its small
preset (width 128, 4 heads, chunk 16), batch 2, float32, forward+backward at 1024 and 4096
tokens. Each layer's executor is replaced by the sequential one (the executor that runs every
rule: per-token transforms, mirror maps and windows included), so the rows compare the rules on
one executor; the rule's own executor (``auto``) is named beside it. The reference row is
``titans.lmm``'s layer on its own closed-form chunk kernel at the same sizes.

Each case is one forward+backward of the layer (the loss ``<y, w>`` for a fixed random ``w``,
the gradient into the input and every parameter); the cases take turns within each repeat (a
busy machine slows them alike), the median of ``--repeats`` after a warm-up. Reported per rule:
tokens/s at both lengths, the ratio to the Titans kernel's tokens/s at the same length, and the
cost per token at 4096 over that at 1024 (target: within 15% of 1). One thread by default: on
this project's 2 cores the spreads at 2 threads reached 20-90% (OpenMP threads waiting on each
other over many small ops), which buries a 15% target. With ``--keep-freed-memory`` glibc keeps
freed memory in the process, as ``memforge train`` has it (docs/benchmarks.md, "The allocator
setting").

Usage: ``python benchmarks/bench_rules.py [--repeats 5] [--threads 1] [--keep-freed-memory]
[--families NAME ...]``.
Prints a table and one JSON line; report the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from _common import cpu_name, timed
from bench_zoo import FAMILIES

import memforge
from memforge.engine.executors import select_executor
from memforge.engine.layer import FastWeightMemoryLayer
from memforge.training.allocator import keep_freed_memory

LENGTHS = (1024, 4096)
BATCH = 2
TARGET_FLATNESS = 0.15
REFERENCE = "Titans kernel"


def memory_layer(preset: str) -> FastWeightMemoryLayer | None:
    """The first engine memory layer of ``preset``'s model (``None`` when it has none)."""
    torch.manual_seed(0)
    model = memforge.build_model(memforge.preset(preset))
    return next((m for m in model.modules() if isinstance(m, FastWeightMemoryLayer)), None)


def train_step(layer: torch.nn.Module, tokens: int) -> Callable[[], None]:
    """One forward+backward of ``layer`` on ``BATCH x tokens`` random inputs."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(BATCH, tokens, layer.dim, generator=gen).requires_grad_()
    w = torch.randn(BATCH, tokens, layer.dim, generator=gen)
    leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def step() -> None:
        y, _ = layer(x)
        torch.autograd.grad((y * w).sum(), leaves, allow_unused=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), metavar="FAMILY",
                        help="rows to run (default: every family with an engine memory layer)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory in the process, as memforge train does")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False

    layers: dict[str, torch.nn.Module] = {REFERENCE: memory_layer(FAMILIES["Titans (LMM)"])}
    own_executor: dict[str, str] = {REFERENCE: layers[REFERENCE].executor.name}
    for family in args.families or list(FAMILIES):
        layer = memory_layer(FAMILIES[family])
        if layer is None:
            continue
        own_executor[family] = layer.executor.name
        layer.executor = select_executor(layer.rule, "sequential")
        layers[family] = layer
    cases = {(name, tokens): train_step(layer, tokens)
             for name, layer in layers.items() for tokens in LENGTHS}
    times = timed(cases, args.repeats)
    median = {key: statistics.median(seconds) for key, seconds in times.items()}

    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"one memory layer's forward+backward, small presets (width 128, 4 heads, chunk 16), "
          f"batch {BATCH}, float32, the sequential executor (the reference: its own closed form); "
          f"median of {args.repeats}{', freed memory kept' if kept else ''}")
    header = (f"{'rule':<18}{'own executor':<14}" + "".join(f"{f'tok/s @{n}':>13}" for n in LENGTHS)
              + "".join(f"{f'vs kernel @{n}':>16}" for n in LENGTHS) + f"{'4096/1024':>11}")
    print(header)
    results = {}
    for name in layers:
        rate = {n: BATCH * n / median[name, n] for n in LENGTHS}
        versus = {n: rate[n] / (BATCH * n / median[REFERENCE, n]) for n in LENGTHS}
        flatness = (median[name, LENGTHS[1]] / LENGTHS[1]) / (median[name, LENGTHS[0]] / LENGTHS[0])
        spread = max((max(times[name, n]) - min(times[name, n])) / median[name, n] for n in LENGTHS)
        print(f"{name:<18}{own_executor[name]:<14}" + "".join(f"{rate[n]:>13,.0f}" for n in LENGTHS)
              + "".join(f"{versus[n]:>15.2f}x" for n in LENGTHS) + f"{flatness:>11.2f}")
        results[name] = {"own_executor": own_executor[name],
                         "tokens_per_s": {str(n): rate[n] for n in LENGTHS},
                         "vs_titans_kernel": {str(n): versus[n] for n in LENGTHS},
                         "per_token_cost_4096_over_1024": flatness, "spread": spread}
    missed = [name for name, r in results.items()
              if abs(r["per_token_cost_4096_over_1024"] - 1.0) > TARGET_FLATNESS]
    print(f"cost per token flat within {TARGET_FLATNESS:.0%}: "
          + ("met by every rule" if not missed else f"MISSED by {', '.join(missed)}"))
    print(json.dumps({"benchmark": "rules", "cpu": cpu_name(), "threads": args.threads,
                      "torch": torch.__version__, "batch": BATCH, "keep_freed_memory": kept,
                      "results": results}))


if __name__ == "__main__":
    main()
