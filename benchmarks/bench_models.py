"""memforge's Titans models on CPU: MAC against titans-pytorch, and the cost of every variant vs length.

Part 1, head to head: memforge ``titans.mac`` and titans-pytorch's ``MemoryAsContextTransformer``
at one configuration (vocabulary 256, dim 256, depth 2, 4 heads of 64, segment 128, 4 persistent
tokens, neural memory in both layers, a depth-2 MLP memory with expansion 4, batch 2, sequence
1024, float32, ``torch.set_num_threads(2)`` unless ``--threads`` says otherwise). Two pairings of
the memory's update schedule, each the same semantics on both sides:

* ``refresh16``: weights refreshed every 16 tokens, gradients at the weights of the refresh point
  (memforge ``chunk_size=16`` + ``titans.chunk_start``; titans-pytorch
  ``neural_memory_segment_len=16, neural_memory_batch_size=16``);
* ``refresh128``: gradients at weights refreshed every 128 tokens, reads see each 16-token chunk's
  accumulated update in titans-pytorch (its ``train_mac.py`` style) and every token's in memforge
  (``chunk_size=128`` + ``titans.before_write``; the step size is bounded lower, since a larger
  chunk takes a larger effective step).

titans-pytorch runs with ``num_residual_streams=1`` (memforge has no hyper-connections) and 4
long-term memory tokens per segment (its form of retrieved context). Measured, each in a fresh
process so that runs do not share allocator state, alternating the two libraries so that both see
the same machine load:

* training: forward + backward of the next-token loss, tokens per second;
* generation: cached greedy decoding after a 1024-token prompt: decode tokens per second (the
  time of ``prompt + 1`` tokens subtracted, so the prefill is reported separately) and end to end
  (prefill included), each the fastest of two timings;
* peak memory: the growth of the process's resident set (Linux ``VmHWM`` after resetting it,
  minus ``VmRSS`` before the measured call), for the first training step and for one generation.

With ``--keep-freed-memory``, glibc keeps freed memory in every process (both libraries), as
``memforge train`` and ``eval`` do. With ``--compile``, memforge's MAC also trains through
``memforge.compile_model`` (its first, compiling step is run before the peak is measured) and
generates with ``generate(..., compile=True)`` (a compiled fixed-shape decode step; the first,
compiling generation is timed apart, as ``first_generation_s``, and not counted).

Part 2, scaling: forward + backward microseconds per token of every memforge variant (lmm, mac,
mag, mal) at 1K, 2K and 4K tokens (16K with ``--long``), to show the cost is linear in length.

Prints rich tables and, last, one JSON line with everything (package versions included).
Usage: ``python benchmarks/bench_models.py [--reps N] [--long] [--threads N] [--compile]
[--keep-freed-memory]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from memforge.training.allocator import keep_freed_memory

VOCAB, DIM, DEPTH, HEADS, SEGMENT, PERSISTENT = 256, 256, 2, 4, 128, 4
BATCH, SEQ, NEW_TOKENS = 2, 1024, 128

#: Memory update schedules, each the same semantics in both libraries (see the module docstring).
PAIRINGS: dict[str, dict[str, dict[str, Any]]] = {
    "refresh16": {
        "memforge": {"integration": {"segment_len": SEGMENT}, "memory_layer": {"chunk_size": 16},
                     "retrieval": "titans.chunk_start"},
        "titans_pytorch": {"neural_memory_segment_len": 16, "neural_memory_batch_size": 16},
    },
    "refresh128": {
        "memforge": {"integration": {"segment_len": SEGMENT}, "memory_layer": {"chunk_size": 128},
                     "retrieval": "titans.before_write",
                     "optimizer": {"lr_init": 0.001, "max_lr": 0.002}},
        "titans_pytorch": {"neural_memory_segment_len": 16, "neural_memory_batch_size": 128},
    },
}
LIBRARIES = ("memforge", "titans_pytorch")
#: memforge's MAC compiled (``--compile``): trained through ``memforge.compile_model``, generating
#: with ``generate(..., compile=True)``.
COMPILED = "memforge_compiled"


# --------------------------------------------------------------------------------------------
# Models


def memforge_spec(name: str, **overrides: Any):
    """Preset ``name`` resized to the benchmark's configuration."""
    import memforge

    return memforge.preset(name, vocab_size=VOCAB, dim=DIM, heads=HEADS, num_layers=DEPTH, **overrides)


def build_memforge(pairing: str, compiled: bool = False) -> tuple[torch.nn.Module, Callable, Callable]:
    """``(model, train_step(tokens), generate(prompt, new))`` for memforge's MAC; ``compiled``:
    training goes through ``memforge.compile_model`` (compiled chunk steps and everything around)
    and generation through ``generate(..., compile=True)`` (a compiled fixed-shape decode step)."""
    import memforge

    spec = memforge_spec("titans.mac", attention={"persistent_tokens": PERSISTENT},
                         **PAIRINGS[pairing]["memforge"])
    model = memforge.build_model(spec)
    forward = memforge.compile_model(model) if compiled else model

    def train_step(tokens: torch.Tensor) -> None:
        logits = forward(tokens[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    def generate(prompt: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(prompt, new, temperature=0.0, compile=compiled)

    return model, train_step, generate


def build_titans_pytorch(pairing: str) -> tuple[torch.nn.Module, Callable, Callable]:
    """The same for titans-pytorch's ``MemoryAsContextTransformer``."""
    from titans_pytorch import MemoryAsContextTransformer, MemoryMLP

    model = MemoryAsContextTransformer(
        num_tokens=VOCAB, dim=DIM, depth=DEPTH, segment_len=SEGMENT, dim_head=DIM // HEADS,
        heads=HEADS, num_persist_mem_tokens=PERSISTENT, num_longterm_mem_tokens=4,
        neural_memory_layers=tuple(range(1, DEPTH + 1)), num_residual_streams=1,
        neural_memory_model=MemoryMLP(dim=DIM // HEADS, depth=2, expansion_factor=4.0),
        neural_memory_kwargs={"dim_head": DIM // HEADS, "heads": HEADS},
        **PAIRINGS[pairing]["titans_pytorch"],
    )

    def train_step(tokens: torch.Tensor) -> None:
        model(tokens, return_loss=True).backward()

    def generate(prompt: torch.Tensor, new: int) -> torch.Tensor:
        with torch.no_grad():
            return model.sample(prompt, prompt.shape[1] + new, temperature=0.0, use_cache=True,
                                show_progress=False)

    return model, train_step, generate


# --------------------------------------------------------------------------------------------
# One measurement, in a fresh process


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _peak_growth_mb(run: Callable[[], Any]) -> float:
    """Growth of the resident set while ``run()`` runs: VmHWM (reset first) minus VmRSS before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_mb("VmRSS")
    run()
    return _proc_status_mb("VmHWM") - before


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one ``job`` (library, pairing, task) and return its timings and peak memory."""
    torch.set_num_threads(job["threads"])
    if job["keep_freed_memory"]:
        keep_freed_memory()
    torch.manual_seed(0)
    compiled = job["library"] == COMPILED
    if job["library"] == "titans_pytorch":
        model, train_step, generate = build_titans_pytorch(job["pairing"])
    else:
        model, train_step, generate = build_memforge(job["pairing"], compiled=compiled)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    if job["task"] == "train":
        if compiled:  # compile first (the compiler's memory is not the model's); then no
            train_step(tokens)  # first-step peak comparable with the others is left to measure
            model.zero_grad(set_to_none=True)
        peak = None if compiled else _peak_growth_mb(lambda: train_step(tokens))
        seconds = []
        for _ in range(job["steps"]):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            train_step(tokens)
            seconds.append(time.perf_counter() - start)
        return {"peak_mb": peak, "tokens_per_s": BATCH * SEQ / statistics.median(seconds)}
    prompt = tokens[:, :SEQ]
    compile_s = None
    if compiled:  # the first generation compiles every graph the timed ones use
        compile_s = _seconds(lambda: generate(prompt, NEW_TOKENS + 1))
    peak = _peak_growth_mb(lambda: generate(prompt, NEW_TOKENS + 1))
    # Fastest of two timings each: noise from other processes only ever adds time.
    prefill = min(_seconds(lambda: generate(prompt, 1)) for _ in range(2))
    total = min(_seconds(lambda: generate(prompt, NEW_TOKENS + 1)) for _ in range(2))
    return {"peak_mb": peak, "prefill_s": prefill, "first_generation_s": compile_s,
            "end_to_end_tokens_per_s": BATCH * (NEW_TOKENS + 1) / total,
            # None when noise made the difference meaningless; the summary skips it.
            "tokens_per_s": BATCH * NEW_TOKENS / (total - prefill) if total > prefill else None}


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`worker` in a fresh interpreter (own allocator, own peak-RSS counter)."""
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"benchmark job {job} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The two parts


def _summary(values: list[float | None]) -> dict[str, float]:
    kept = [v for v in values if v is not None] or [float("nan")]
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept)}


def head_to_head(reps: int, steps: int, threads: int, compiled: bool = False,
                 keep_freed: bool = False) -> dict[str, Any]:
    """Interleaved repetitions of every (pairing, task, library) job; medians and spreads."""
    raw: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for rep in range(reps):
        for pairing in PAIRINGS:
            for task in ("train", "generate"):
                libraries = LIBRARIES + ((COMPILED,) if compiled else ())
                for library in libraries if rep % 2 == 0 else libraries[::-1]:
                    job = {"library": library, "pairing": pairing, "task": task, "steps": steps,
                           "threads": threads, "keep_freed_memory": keep_freed}
                    result = run_job(job)
                    raw.setdefault(pairing, {}).setdefault(task, {}).setdefault(library, []).append(result)
                    print(f"  rep {rep + 1}/{reps} {pairing:10s} {task:8s} {library:14s} "
                          f"{result['tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for pairing, tasks in raw.items():
        for task, libraries in tasks.items():
            for library, results in libraries.items():
                entry = {key: _summary([r[key] for r in results]) for key in results[0]}
                summary.setdefault(pairing, {}).setdefault(task, {})[library] = entry
    return summary


def _lm_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """One forward + backward of memforge's next-token loss (gradients dropped after)."""
    logits = model(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)


def scaling(lengths: list[int], reps: int, threads: int) -> dict[str, dict[int, dict[str, float]]]:
    """Forward + backward microseconds per token of every memforge variant at each length."""
    import memforge

    torch.set_num_threads(threads)
    variants = {
        "titans.lmm": {"memory_layer": {"chunk_size": 16}},
        "titans.mac": {"integration": {"segment_len": SEGMENT}, "memory_layer": {"chunk_size": 16},
                       "attention": {"persistent_tokens": PERSISTENT}},
        "titans.mag": {"memory_layer": {"chunk_size": 16},
                       "attention": {"window": SEGMENT, "persistent_tokens": PERSISTENT}},
        "titans.mal": {"memory_layer": {"chunk_size": 16},
                       "attention": {"window": SEGMENT, "persistent_tokens": PERSISTENT}},
    }
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        model = memforge.build_model(memforge_spec(name, **overrides))
        for length in lengths:
            tokens = torch.randint(0, VOCAB, (BATCH, length + 1))
            _lm_step(model, tokens)  # warm-up
            per_token = []
            for _ in range(reps):
                start = time.perf_counter()
                _lm_step(model, tokens)
                per_token.append((time.perf_counter() - start) / (BATCH * length) * 1e6)
            out.setdefault(name, {})[length] = _summary(per_token)
            print(f"  {name} T={length}: {statistics.median(per_token):.1f} us/token",
                  file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Report


def _spread(entry: dict[str, float], fmt: str) -> str:
    return f"{entry['median']:{fmt}} [{entry['min']:{fmt}}-{entry['max']:{fmt}}]"


def print_tables(h2h: dict[str, Any], scale: dict[str, Any], threads: int) -> None:
    """Rich tables: MAC vs titans-pytorch side by side, then cost per token against length."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=120)
    table = Table(title=f"titans.mac vs titans-pytorch MAC (CPU, {threads} threads, batch {BATCH}, "
                        f"T={SEQ})", caption=escape("median [min-max] over repetitions"))
    for column in ("pairing", "measure", "memforge", "titans-pytorch", "ratio"):
        table.add_column(column, justify="left" if column in ("pairing", "measure") else "right")
    rows = [("train", "tokens_per_s", "train tok/s", ".0f", False),
            ("train", "peak_mb", "train peak RSS growth (MB)", ".0f", True),
            ("generate", "tokens_per_s", f"decode tok/s ({NEW_TOKENS} new)", ".1f", False),
            ("generate", "end_to_end_tokens_per_s", "generate tok/s, prefill incl.", ".1f", False),
            ("generate", "prefill_s", f"prefill {SEQ} tokens (s)", ".2f", True),
            ("generate", "peak_mb", "generate peak RSS growth (MB)", ".0f", True)]
    compiled_rows = {1: ("train", "tokens_per_s", "train tok/s, memforge compiled", ".0f", False),
                     3: ("generate", "tokens_per_s", "decode tok/s, memforge compiled", ".1f", False),
                     4: ("generate", "end_to_end_tokens_per_s", "generate tok/s, compiled",
                         ".1f", False)}
    for pairing, tasks in h2h.items():
        with_compiled = list(rows)
        if COMPILED in tasks["train"]:
            for at, row in sorted(compiled_rows.items(), reverse=True):
                with_compiled.insert(at, row)
        for row in with_compiled:
            task, key, label, fmt, lower_is_better = row
            ours = tasks[task][COMPILED if row in compiled_rows.values() else "memforge"][key]
            theirs = tasks[task]["titans_pytorch"][key]
            ratio = (theirs["median"] / ours["median"] if lower_is_better
                     else ours["median"] / theirs["median"])
            table.add_row(pairing, label, _spread(ours, fmt), _spread(theirs, fmt), f"{ratio:.2f}x")
    console.print(table)
    console.print("ratio: how many times better memforge is (throughput up, time and memory down)")
    if not scale:
        return
    lengths = sorted({length for per in scale.values() for length in per})
    table = Table(title="memforge forward+backward microseconds per token (flat = linear in length)",
                  caption=escape("median [min-max] over repetitions"))
    table.add_column("variant")
    for length in lengths:
        table.add_column(f"T={length}", justify="right")
    for name, per in scale.items():
        table.add_row(name, *(_spread(per[length], ".1f") for length in lengths))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every measurement")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per process")
    parser.add_argument("--long", action="store_true", help="also scale to 16K tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the spec: 2)")
    parser.add_argument("--compile", action="store_true",
                        help="also memforge's MAC compiled: training through memforge.compile_model, "
                             "generation with generate(compile=True)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory in every process, as memforge train/eval do")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    load_before = os.getloadavg()
    h2h = head_to_head(args.reps, args.steps, args.threads, args.compile, args.keep_freed_memory)
    if args.keep_freed_memory:
        keep_freed_memory()  # for the scaling part, which runs in this process
    scale = scaling([1024, 2048, 4096] + ([16384] if args.long else []), args.reps, args.threads)
    print_tables(h2h, scale, args.threads)
    print(json.dumps({
        "memforge": importlib.metadata.version("memforge"),
        "titans_pytorch": importlib.metadata.version("titans-pytorch"),
        "torch": torch.__version__, "threads": args.threads,
        "keep_freed_memory": args.keep_freed_memory,
        "config": {"vocab": VOCAB, "dim": DIM, "depth": DEPTH, "heads": HEADS, "segment": SEGMENT,
                   "persistent": PERSISTENT, "batch": BATCH, "seq": SEQ, "new_tokens": NEW_TOKENS,
                   "pairings": PAIRINGS},
        "memory_measure": "peak RSS growth (VmHWM reset, minus VmRSS before), fresh process each",
        "head_to_head": h2h, "scaling_us_per_token": scale,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }))


if __name__ == "__main__":
    main()
