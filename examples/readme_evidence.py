"""The README's evidence table: small Titans models against a sliding-window Transformer, trained
and evaluated by memforge itself on this machine's CPU.

Two tasks, both built so that a sliding window cannot reach the answer:

* MQAR (vocabulary 64, 64 tokens, 4 key-value pairs, the ``memforge train`` default), tested on
  all queries and on rows whose every key-query distance is >= 34, while the sliding-window
  baseline sees 8 tokens per layer (4 layers: a receptive field of 32);
* S-NIAH (random haystack, 2-token key, 2-digit value) trained at 64 tokens and tested at 64, 256
  and 512 (4x and 8x the training length), averaged over needle depths 0, 0.25, 0.5, 0.75 and 1.

Models: ``titans.lmm`` (memory only), ``titans.mac`` with 16-token segments (every MQAR key sits
in an earlier segment than its query), ``baseline.swa`` with an 8-token window, and
``baseline.transformer`` (full attention: the upper bound a window gives up). Every run uses the
``memforge train`` defaults apart from the steps.

Usage: ``python examples/readme_evidence.py [--steps 600] [--out runs/evidence] [--threads 2]``.
Prints a Markdown table and one JSON line, and keeps every run directory under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memforge.training import EvalConfig, TrainConfig, evaluate, train

MODELS: dict[str, tuple[str, ...]] = {
    "titans.lmm": (),
    "titans.mac": ("integration.segment_len=16",),
    "baseline.swa": ("attention.window=8",),
    "baseline.transformer": (),
}
TASKS: dict[str, dict] = {
    "mqar": {"vocab_size": 64, "seq_len": 64, "num_pairs": 4},
    "s-niah": {"vocab_size": 64, "seq_len": 64, "value_len": 2},
}
NIAH_LENGTHS = (64, 256, 512)
#: MQAR test rows whose keys all lie beyond the sliding window's reach.
FAR_QUERIES = {"min_query_distance": 34}


#: Test batches per cell: 8 x 16 rows.
EVAL = {"batches": 8, "batch_size": 16, "device": "cpu"}


def run_one(model: str, overrides: tuple[str, ...], task: str, steps: int, out: Path) -> dict:
    """Train one (model, task) pair and evaluate it; returns the row's numbers."""
    run_dir = out / f"{model}-{task}"
    started = time.perf_counter()
    result = train(TrainConfig(model=model, overrides=overrides, task=task, task_options=TASKS[task],
                               steps=steps, device="cpu", out=run_dir, progress=False,
                               resume=(run_dir / "checkpoints").exists()))
    train_s = time.perf_counter() - started
    scores = {}
    if task == "s-niah":
        report = evaluate(EvalConfig(source=run_dir, lengths=NIAH_LENGTHS, **EVAL))
        for n in NIAH_LENGTHS:
            values = [report.value(n, d) for d in report.depths]  # None where the model diverged
            scores[f"@{n}"] = None if None in values else sum(values) / len(values)
    else:
        scores["all"] = evaluate(EvalConfig(source=run_dir, **EVAL)).value(64)
        scores["far"] = evaluate(EvalConfig(source=run_dir, task_options=FAR_QUERIES, **EVAL)).value(64)
    return {"model": model, "overrides": list(overrides), "task": task, "steps": result.step,
            "train_s": train_s, "tokens_per_s": result.tokens_per_s, "accuracy": scores}


def markdown(rows: list[dict]) -> str:
    """The table for the README."""
    lines = ["| model | MQAR, all | MQAR, gaps >= 34 | S-NIAH @64 (train) | @256 (4x) | @512 (8x) "
             "| train time (both tasks) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model, overrides in MODELS.items():
        mqar = next(r for r in rows if r["model"] == model and r["task"] == "mqar")
        niah = next(r for r in rows if r["model"] == model and r["task"] == "s-niah")
        name = model + (f" ({', '.join(overrides)})" if overrides else "")
        scores = [mqar["accuracy"]["all"], mqar["accuracy"]["far"]]
        scores += [niah["accuracy"][f"@{n}"] for n in NIAH_LENGTHS]
        cells = ["diverged" if score is None else f"{score:.1%}" for score in scores]
        minutes = (mqar["train_s"] + niah["train_s"]) / 60
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {minutes:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for task in TASKS:
        for model, overrides in MODELS.items():
            rows.append(run_one(model, overrides, task, args.steps, args.out))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    print(json.dumps({"evidence": rows, "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
