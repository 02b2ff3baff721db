"""``memforge generate RUN --prompt TEXT``: continue a prompt with a byte-level text run.

A run trained with ``--task text`` reads and writes bytes (token ``b`` is the byte ``b``; see
:mod:`memforge.tasks.text`), so a prompt is its UTF-8 bytes and the continuation decodes back to
text. Generation stops at the byte 0, which marks a file's end in the corpus, or after
``--max-new-tokens`` bytes. Runs of other tasks are refused: their tokens are not text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console

from memforge.cli import command
from memforge.training.config import DEVICES, TrainingError, resolve_device

#: The byte that ends each file of a text corpus, and so a generation.
END_OF_FILE = 0


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory trained with --task text (its latest checkpoint), or "
                        "one of its checkpoint directories")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="the most bytes to add (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest bytes")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sample within the smallest set of bytes whose probabilities reach P")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampling (default: random)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a compiled fixed-shape step (faster per byte; the first "
                        "run compiles for tens of seconds)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA when available (default: %(default)s)")


def _check_text_run(checkpoint: Path) -> None:
    """Refuse anything but a run trained on the byte-level ``text`` task, saying why."""
    from memforge.training import rundir
    from memforge.training.checkpoint import run_dir_of

    task_file = run_dir_of(checkpoint) / rundir.TASK_FILE
    if not task_file.is_file():
        raise TrainingError(f"{checkpoint} is not part of a training run (no {rundir.TASK_FILE}), "
                            f"so its tokens are not known to be bytes of text; memforge generate "
                            f"takes runs trained with --task text (in Python, use "
                            f"memforge.load_model(...).generate)")
    task = rundir.read_json(task_file)
    name = task.get("task") if isinstance(task, dict) else None
    if name != "text":
        raise TrainingError(f"memforge generate continues text, but this run was trained on task "
                            f"{name!r}, whose tokens are not bytes of text; pass a run trained "
                            f"with --task text")


@command("generate", "continue a text prompt with a run trained on --task text", _configure)
def _generate(args: argparse.Namespace, console: Console) -> int:
    from memforge.saving import load_model
    from memforge.training.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(args.source)
    _check_text_run(checkpoint)
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise TrainingError("--prompt is empty; give at least one character to continue")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise TrainingError(f"--seed must lie in [0, 2**63), got {args.seed}")
    device = resolve_device(args.device)
    model = load_model(checkpoint, device=device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device).manual_seed(args.seed)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out = model.generate(tokens, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, stop_token=END_OF_FILE,
                         generator=generator, compile=args.compile)
    continuation = bytes(out[0, len(prompt):].tolist()).split(bytes([END_OF_FILE]))[0]
    # Written as is: rich would expand tabs and read "[...]" or ":name:" as markup or emoji.
    console.file.write(continuation.decode("utf-8", errors="replace") + "\n")
    console.file.flush()
    return 0
