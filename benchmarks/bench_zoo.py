"""Benchmark: the memory zoo, every family side by side in one run (docs/zoo.md).

For each family's memory-only preset (and the attention references beside them):

* its learning rule's exactness tier and executor, as its memory layers describe them
  (``describe_rule()``; attention has none);
* parameters;
* training throughput: forward+backward tokens/s at the MQAR training shape of
  ``memforge train`` (64 sequences of 64 tokens), median of ``--repeats`` after a warm-up, one
  family at a time with ``--threads`` threads, so the families are timed alike;
* MQAR accuracy after ``memforge train`` with its defaults (600 steps, vocabulary 64, 64 tokens,
  4 key-value pairs, so guessing one of the values in context scores 25%), scored by
  ``memforge eval`` on the test split (``--eval-batches`` batches of 32 sequences).

The trainings run in ``--jobs`` worker processes of ``--threads // --jobs`` threads each, after
the timing phase; each writes its run under ``--out``. ``--steps`` shortens them all (a smoke
run). ``--max-train-minutes`` bounds each training instead: a family whose measured step time
would take longer trains for the steps that fit (its whole cosine schedule over those steps), and
its ``steps`` cell says so. Prints a table, one JSON line, and with ``--markdown`` the README
table.

Usage: ``python benchmarks/bench_zoo.py [--families titans deltanet ...] [--jobs 2]
[--threads 2] [--steps 600] [--markdown]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name

#: (family, preset) rows of the table, memory-only presets first, attention references last.
FAMILIES: dict[str, str] = {
    "Titans (LMM)": "titans.lmm",
    "DeltaNet": "delta.deltanet_lmm",
    "Gated DeltaNet": "delta.gdn_lmm",
    "TTT-Linear": "ttt.linear_lmm",
    "TTT-MLP": "ttt.mlp_lmm",
    "Moneta": "miras.moneta_lmm",
    "Yaad": "miras.yaad_lmm",
    "Memora": "miras.memora_lmm",
    "OmegaNet": "atlas.omeganet_lmm",
    "DeepTransformer": "atlas.deep_transformer_lmm",
    "Atlas": "atlas.atlas_lmm",
    "LaCT": "lact.lact",
    "Transformer++": "baseline.transformer",
    "Sliding window": "baseline.swa",
}
BATCH, SEQ_LEN, GUESS, DEFAULT_STEPS = 64, 64, 0.25, 600


def describe(model: torch.nn.Module) -> tuple[str, str]:
    """The tiers and executors the model's memory layers describe (``"-"`` without any)."""
    tiers, executors = [], []
    for module in model.modules():
        if callable(getattr(module, "describe_rule", None)):
            rule = module.describe_rule()
            tiers.append(rule.tier)
            executors.append(rule.executor)
    return (", ".join(dict.fromkeys(tiers)) or "-", ", ".join(dict.fromkeys(executors)) or "-")


def throughput(preset: str, repeats: int) -> dict[str, Any]:
    """Parameters, rule description and forward+backward tokens/s of ``preset`` at the MQAR shape."""
    import memforge

    spec = memforge.preset(preset)
    model = memforge.build_model(spec)
    tier, executor = describe(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (BATCH, SEQ_LEN), generator=gen)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(tokens, labels=tokens).loss.backward()
        return time.perf_counter() - start

    step()
    seconds = statistics.median(step() for _ in range(repeats))
    return {"tier": tier, "executor": executor,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": BATCH * SEQ_LEN / seconds, "step_s": seconds}


def planned_steps(row: dict[str, Any], args: argparse.Namespace) -> int | None:
    """The training steps of ``row``'s family: ``--steps``, else the default unless
    ``--max-train-minutes`` at its measured step time (one job's share of the threads is assumed
    to take ``--threads / share`` times as long, plus a fifth for the validations) cannot fit it."""
    if args.steps is not None or args.max_train_minutes is None or "error" in row:
        return args.steps
    share = max(1, args.threads // args.jobs)
    step_s = row["step_s"] * args.threads / share * 1.2
    fits = int(args.max_train_minutes * 60 / step_s)
    return None if fits >= DEFAULT_STEPS else max(fits, 10)


def train_and_score(preset: str, out: Path, steps: int | None, eval_batches: int) -> dict[str, Any]:
    """Train ``preset`` with the ``memforge train`` defaults (``steps`` if given) and score it."""
    from memforge.training import EvalConfig, TrainConfig, evaluate, train

    settings = {} if steps is None else {"steps": steps}
    start = time.perf_counter()
    result = train(TrainConfig(model=preset, out=out, seed=0, progress=False, **settings))
    report = evaluate(EvalConfig(source=result.run_dir, batches=eval_batches, batch_size=32))
    return {"accuracy": report.value(report.lengths[0]), "train_loss": result.train_loss,
            "steps": result.step, "train_s": time.perf_counter() - start}


def _worker(preset: str, out: str, steps: int | None, eval_batches: int) -> None:
    """One training, in its own process: prints its result as one JSON line."""
    print(json.dumps(train_and_score(preset, Path(out), steps, eval_batches)))


def _in_process(command: list[str], threads: int, memory_bytes: int) -> dict[str, Any]:
    """Run this script with ``command`` in a subprocess of ``threads`` threads whose address space
    is capped at ``memory_bytes`` (a family that needs more fails alone, with its error, instead
    of the machine's OOM killer taking the whole benchmark); its last stdout line is JSON."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, __file__, *command, "--threads", str(threads)],
                          capture_output=True, text=True, env=env, preexec_fn=cap)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit status {done.returncode}"
        return {"error": "out of memory" if "allocate memory" in error else error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_share(jobs: int) -> int:
    """Four fifths of the machine's memory, split among ``jobs`` processes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.8 / jobs)


def _train_in_process(preset: str, out: Path, steps: int | None, args: argparse.Namespace
                      ) -> dict[str, Any]:
    """Run :func:`_worker` for ``preset`` in a subprocess with its share of threads and memory."""
    command = ["--worker", preset, str(out), "--eval-batches", str(args.eval_batches)]
    if steps is not None:
        command += ["--steps", str(steps)]
    return _in_process(command, max(1, args.threads // args.jobs), _memory_share(args.jobs))


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "accuracy":
        return row["error"][:60] if "error" in row else f"{100 * value:.1f}%"
    if value is None:
        return "-"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key == "parameters":
        return f"{value / 1e3:.0f}K"
    if key == "steps":
        return f"{value}" if value >= DEFAULT_STEPS else f"{value} of {DEFAULT_STEPS}"
    return str(value)


COLUMNS = [("family", "family"), ("preset", "preset"), ("tier", "tier"), ("executor", "executor"),
           ("parameters", "params"), ("tokens_per_s", "train tokens/s"), ("steps", "steps"),
           ("accuracy", "MQAR acc")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), metavar="FAMILY",
                        help=f"rows to run (default: all): {', '.join(FAMILIES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="training steps (default: memforge train's)")
    parser.add_argument("--max-train-minutes", type=float,
                        help="bound each training; families that cannot fit the default steps "
                             "train for fewer (the table says so)")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--out", type=Path, help="run directories (default: a temporary one)")
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument("--worker", nargs=2, metavar=("PRESET", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", metavar="PRESET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.steps, args.eval_batches)
        return
    if args.measure:
        print(json.dumps(throughput(args.measure, args.repeats)))
        return
    families = args.families or list(FAMILIES)
    rows = [{"family": f, "preset": FAMILIES[f],
             **_in_process(["--measure", FAMILIES[f], "--repeats", str(args.repeats)],
                           args.threads, _memory_share(1))}
            for f in families]
    out = args.out or Path(tempfile.mkdtemp(prefix="memforge-zoo-"))
    plans = [planned_steps(row, args) for row in rows]
    # Longest first, so the last job to finish is a short one; a family that could not even be
    # measured is not trained.
    trained = [i for i, row in enumerate(rows) if "error" not in row]
    order = sorted(trained, key=lambda i: -rows[i]["step_s"] * (plans[i] or DEFAULT_STEPS))
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {i: pool.submit(_train_in_process, rows[i]["preset"], out / rows[i]["preset"],
                                  plans[i], args) for i in order}
    for i in trained:
        rows[i].update(futures[i].result())

    from rich.console import Console
    from rich.table import Table

    steps = args.steps or f"the default {DEFAULT_STEPS}"
    table = Table(title=f"memory zoo on MQAR ({steps} steps; guessing {GUESS:.0%}); "
                        f"CPU: {cpu_name()}, {args.threads} threads")
    for _, title in COLUMNS:
        table.add_column(title)
    for row in rows:
        table.add_row(*(_cell(row, key) for key, _ in COLUMNS))
    Console(width=160).print(table)
    if args.markdown:
        print("| " + " | ".join(title for _, title in COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row in rows:
            cells = [f"`{row['preset']}`" if key == "preset" else _cell(row, key) for key, _ in COLUMNS]
            print("| " + " | ".join(cells) + " |")
    print(json.dumps({"bench": "zoo", "cpu": cpu_name(), "threads": args.threads,
                      "torch": torch.__version__, "steps": args.steps, "guess": GUESS,
                      "rows": rows}))


if __name__ == "__main__":
    main()
