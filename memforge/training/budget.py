"""What an evaluation will cost in memory and time, estimated before it runs.

``memforge eval --lengths 100m`` once allocated 10 GB and printed nothing for minutes. Here the
cost of every context length is estimated first and a length that cannot fit is refused, with
the figures and the fix:

* **Memory**, a lower bound: the test batches of a length (generated whole, int64 inputs and
  targets: 16 bytes a token), the model's carried state at that length and the logits of one
  piece. How a model's state grows is measured, not assumed: the model reads two pieces of a
  probe batch and the growth of its state between them is extrapolated linearly (full-attention
  caches grow with the length; a memory's fast weights and sliding-window rings do not).
* **Time**: the probe's throughput, extrapolated to every token of the evaluation. A plan beyond
  :data:`MAX_EVAL_SECONDS` is refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from memforge.resources import available_memory, format_bytes
from memforge.training.config import TrainingError

#: Bytes a token of a generated batch takes: int64 inputs and int64 targets.
BATCH_BYTES_PER_TOKEN = 16
#: Tokens per probe piece: longer than the usual sliding windows, segments and chunks, so a state
#: that stops growing (a window's ring, a chunk buffer) has stopped by the second piece.
PROBE_TOKENS = 256
#: The most sequences the probe reads at once; the measured state and time are scaled up.
PROBE_BATCH = 8
#: The longest evaluation accepted: one day.
MAX_EVAL_SECONDS = 24 * 3600


@attrs.frozen
class EvalCost:
    """The estimated cost of scoring one context length.

    Attributes:
        length: the context length.
        batch_bytes: memory of its generated test batches.
        state_bytes: memory of the model's carried state at its end, for a whole batch.
        piece_bytes: memory of one piece's logits.
        seconds: time to score every cell of this length.
    """

    length: int
    batch_bytes: int
    state_bytes: int
    piece_bytes: int
    seconds: float

    @property
    def bytes(self) -> int:
        """The memory lower bound: batches, state and one piece's logits together."""
        return self.batch_bytes + self.state_bytes + self.piece_bytes


def state_bytes(state: Any) -> int:
    """Bytes of every tensor in a (nested) model state: tuples, lists, dicts and attrs classes."""
    if isinstance(state, Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(v) for v in state)
    if attrs.has(type(state)):
        return sum(state_bytes(getattr(state, f.name)) for f in attrs.fields(type(state)))
    return 0


@attrs.frozen
class _Probe:
    """What reading two probe pieces measured."""

    batch: int
    first_bytes: int
    growth_per_token: float
    seconds_per_token: float


@torch.no_grad()
def _probe(model: nn.Module, vocab_size: int, batch: int, piece: int, device: torch.device) -> _Probe:
    tokens = torch.arange(batch * piece, device=device).reshape(batch, piece) % vocab_size
    was_training = model.training
    model.eval()
    try:
        first = model(tokens)[1]
        started = time.perf_counter()
        second = model(tokens, first)[1]
        seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
    before, after = state_bytes(first), state_bytes(second)
    return _Probe(batch=batch, first_bytes=before, growth_per_token=max(0, after - before) / piece,
                  seconds_per_token=seconds / (batch * piece))


def check_batch_memory(lengths: Sequence[int], batch_size: int, batches: int) -> None:
    """Refuse lengths whose test batches alone outgrow the memory (arithmetic only, no probe)."""
    available = available_memory("cpu")
    for length in lengths:
        needed = batches * batch_size * length * BATCH_BYTES_PER_TOKEN
        if available is not None and needed > available:
            raise TrainingError(_refusal(length, needed, available, "its test batches alone"))


def check_batches_fit(count: int, batch_size: int, seq_len: int) -> None:
    """Refuse generating ``count`` batches of ``batch_size`` sequences of ``seq_len`` tokens when
    their tokens alone outgrow the memory (the validation set of a training run, say)."""
    available = available_memory("cpu")
    needed = count * batch_size * seq_len * BATCH_BYTES_PER_TOKEN
    if available is not None and needed > available:
        raise TrainingError(f"{count} batch{'es' if count != 1 else ''} of {batch_size} "
                            f"sequences of {seq_len} tokens need "
                            f"{format_bytes(needed)} of memory, more than the "
                            f"{format_bytes(available)} available; use a smaller batch size, "
                            f"fewer batches or a shorter seq_len")


def estimate_costs(
    model: nn.Module,
    *,
    vocab_size: int,
    lengths: Sequence[int],
    cells_per_length: int,
    batch_size: int,
    batches: int,
    piece_size: int,
    device: torch.device,
) -> list[EvalCost]:
    """The cost of every length (see the module docstring), from one probe of ``model``."""
    piece = min(piece_size, PROBE_TOKENS)
    probe = _probe(model, vocab_size, min(batch_size, PROBE_BATCH), piece, device)
    scale = batch_size / probe.batch
    costs = []
    for length in lengths:
        state = (probe.first_bytes + probe.growth_per_token * max(0, length - piece)) * scale
        tokens = cells_per_length * batches * batch_size * length
        costs.append(EvalCost(
            length=length,
            batch_bytes=batches * batch_size * length * BATCH_BYTES_PER_TOKEN,
            state_bytes=math.ceil(state),
            piece_bytes=batch_size * min(piece_size, length) * vocab_size * 4,
            seconds=tokens * probe.seconds_per_token,
        ))
    return costs


def _refusal(length: int, needed: float, available: int, what: str) -> str:
    return (f"length {length} needs at least {format_bytes(needed)} of memory for {what}, more "
            f"than the {format_bytes(available)} available; use shorter --lengths or a smaller "
            f"--batch-size/--batches")


def check_costs(costs: Sequence[EvalCost], device: torch.device) -> None:
    """Refuse a plan that cannot fit in memory or would run past :data:`MAX_EVAL_SECONDS`.

    Memory is checked against the device the model runs on, and the batches (generated on the
    CPU) against the CPU too.
    """
    cpu = available_memory("cpu")
    target = available_memory(device) if device.type != "cpu" else cpu
    for cost in costs:
        if cpu is not None and cost.batch_bytes > cpu:
            raise TrainingError(_refusal(cost.length, cost.batch_bytes, cpu, "its test batches"))
        on_device = cost.state_bytes + cost.piece_bytes + (cost.batch_bytes if device.type == "cpu"
                                                           else 0)
        if target is not None and on_device > target:
            detail = (f"the model's state ({format_bytes(cost.state_bytes)}), the test batches and "
                      f"a piece's logits")
            raise TrainingError(_refusal(cost.length, on_device, target, detail))
    total = sum(cost.seconds for cost in costs)
    if total > MAX_EVAL_SECONDS:
        slowest = max(costs, key=lambda c: c.seconds)
        raise TrainingError(f"this evaluation would take about {total / 3600:,.0f} hours "
                            f"({slowest.seconds / 3600:,.0f} at length {slowest.length}), more "
                            f"than the {MAX_EVAL_SECONDS // 3600} hours memforge runs one for; use "
                            f"shorter --lengths or fewer --batches")
