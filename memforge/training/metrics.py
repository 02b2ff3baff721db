"""Scoring a model on task batches with torchmetrics, reading long sequences piece by piece.

Only labelled positions (``targets != -100``) count. A sequence longer than ``piece_size`` is read
in pieces, each continuing from the state the previous one returned, so activations stay bounded
however long the sequence (what a model's state itself holds is up to the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from memforge.errors import NonFiniteError
from memforge.tasks import IGNORE_INDEX, TaskBatch
from memforge.training.budget import check_batches_fit
from memforge.training.config import task_error

#: Default tokens per model call when evaluating long sequences.
DEFAULT_PIECE_SIZE = 1024


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; nothing on the CPU (where it is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class TaskMetrics:
    """Accuracy, perplexity and exact match over the labelled positions of many batches.

    ``accuracy`` is top-1 over labelled tokens; ``exact_match`` the share of sequences whose
    labelled tokens are all right (e.g. a whole needle value); ``loss`` is the mean cross
    entropy in nats, ``perplexity`` its exponential, and with ``byte_level`` (tokens are bytes)
    ``bits_per_byte`` is reported too.
    """

    def __init__(self, vocab_size: int, device: torch.device, *, byte_level: bool = False) -> None:
        # One process evaluates alone (rank 0 under torchrun): never wait for the others.
        local = {"sync_on_compute": False}
        self.accuracy = MulticlassAccuracy(num_classes=vocab_size, average="micro",
                                           ignore_index=IGNORE_INDEX, **local).to(device)
        self.perplexity = Perplexity(ignore_index=IGNORE_INDEX, **local).to(device)
        self.exact_match = MeanMetric(**local).to(device)
        self.byte_level = byte_level
        self.tokens = 0

    def update(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Score one piece (``[B, T, V]`` logits); returns which rows got every label right."""
        mask = targets != IGNORE_INDEX
        if not mask.any():
            return torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
        logits = logits.float()
        # Scoring only the labelled positions keeps a long piece with few labels cheap.
        picked, labels = logits[mask], targets[mask]
        self.accuracy.update(picked, labels)
        self.perplexity.update(picked[None], labels[None])
        self.tokens += int(labels.numel())
        return ((logits.argmax(-1) == targets) | ~mask).all(dim=1)

    def update_rows(self, all_right: Tensor, labelled: Tensor) -> None:
        """Record which sequences (among those with a label) were entirely right."""
        if labelled.any():
            self.exact_match.update(all_right[labelled].float())

    def compute(self) -> dict[str, float]:
        """The metrics so far (NaN-free: an empty evaluation reports zero tokens and no scores)."""
        if self.tokens == 0:
            return {"tokens": 0}
        perplexity = float(self.perplexity.compute())
        result = {
            "loss": math.log(perplexity),
            "accuracy": float(self.accuracy.compute()),
            "exact_match": float(self.exact_match.compute()),
            "perplexity": perplexity,
            "tokens": self.tokens,
        }
        if self.byte_level:
            result["bits_per_byte"] = math.log2(perplexity)
        return result


@torch.no_grad()
def score_batches(
    model: nn.Module,
    batches: Iterable[TaskBatch],
    *,
    vocab_size: int,
    device: torch.device,
    piece_size: int = DEFAULT_PIECE_SIZE,
    byte_level: bool = False,
    on_piece: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` over ``batches``, each sequence read in pieces of ``piece_size``.

    ``on_piece(start, end)``, when given, is called after each piece (tokens ``start..end-1``).
    """
    metrics = TaskMetrics(vocab_size, device, byte_level=byte_level)
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            all_right = torch.ones(inputs.shape[0], dtype=torch.bool, device=device)
            state = None
            for start in range(0, inputs.shape[1], piece_size):
                end = start + piece_size
                with autocast(device):
                    logits, state, _ = model(inputs[:, start:end], state)
                if not bool(torch.isfinite(logits).all()):
                    raise NonFiniteError(f"the model's logits became non-finite within tokens "
                                         f"{start}..{start + logits.shape[1] - 1}")
                all_right &= metrics.update(logits, targets[:, start:end])
                if on_piece is not None:
                    on_piece(start, start + logits.shape[1])
            metrics.update_rows(all_right, (targets != IGNORE_INDEX).any(dim=1))
    finally:
        model.train(was_training)
    return metrics.compute()


def task_batches(task: Any, batch_size: int, count: int, *, split: str) -> list[TaskBatch]:
    """``count`` fixed evaluation batches of ``task`` from ``split``, seeds ``0..count-1``.

    A text corpus gives consecutive windows of its validation files instead (it has no test
    split, and sequential windows score every byte once).
    """
    check_batches_fit(count, batch_size, task.seq_len)
    try:
        if hasattr(task, "iter_eval_batches"):
            return list(task.iter_eval_batches(batch_size, count, split="validation"))
        return [task.batch(batch_size, seed=seed, split=split) for seed in range(count)]
    except (ValueError, TypeError) as exc:
        raise task_error(exc) from None
