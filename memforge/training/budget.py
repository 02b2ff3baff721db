"""What an evaluation will cost in memory and time, estimated before it runs.

``memforge eval --lengths 100m`` once allocated 10 GB and printed nothing for minutes. Here the
cost of every context length is estimated first and a length that cannot fit is refused, with
the figures and the fix. Both estimates come from one probe: the model reads consecutive pieces
of a probe batch (at least :data:`PROBE_MIN_PIECES` after an untimed first one, more while the
probe is under :data:`PROBE_SECONDS`, at most :data:`PROBE_MAX_PIECES`), and the size of its
carried state and the time of every piece are recorded.

* **Memory**, a lower bound: the test batches of a length (generated whole, int64 inputs and
  targets: 16 bytes a token), the model's carried state at that length and the logits of one
  piece. How a model's state grows is measured, not assumed: the growth of its state over the
  probe is extrapolated linearly (full-attention caches grow with the length; a memory's fast
  weights and sliding-window rings do not).
* **Time**: a token's time depends on the state it reads (a full-attention token attends to the
  whole cache). The model is ``t(x) = a + b * S(x)`` seconds a token at context depth ``x``,
  where ``S(x) = S0 + g * x`` is the measured state size. ``a`` and ``b`` are a Theil-Sen fit
  (the median of the slopes between every two pieces, so a piece slowed down by another process
  does not move it) of the probe's per-token times against the state each piece read, with
  ``b >= 0``. A sequence of ``L`` tokens then takes ``(a + b * S0) * L + b * g * L**2 / 2``
  seconds: quadratic in ``L`` for a growing state, linear for a bounded one. A plan beyond
  :data:`MAX_EVAL_SECONDS` is refused.

Limits of the time model: the probe reads a few thousand tokens, so a state that outgrows the
processor's caches at long lengths (a large key-value cache read from main memory) is slower per
byte than measured, and the estimate is then a lower bound; the probe's pieces are at most
:data:`PROBE_TOKENS` long and its batch at most :data:`PROBE_BATCH`, so the per-token time of
other piece and batch sizes is assumed the same; and a cost that grows with the context without
the state growing (none of memforge's models) is not seen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from scipy.stats import theilslopes
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
#: Timed probe pieces: at least this many (two context depths and a third to outvote noise)...
PROBE_MIN_PIECES = 3
#: ...more while the timed pieces have taken under this many seconds...
PROBE_SECONDS = 1.0
#: ...and at most this many.
PROBE_MAX_PIECES = 12
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
class TimeModel:
    """Seconds a token of one sequence takes at context depth ``x``: ``base + slope * x``.

    Attributes:
        base: seconds a token with the state that does not grow (``a + b * S0``).
        slope: seconds a token gains per token of context (``b * g``; 0 for a bounded state).
    """

    base: float
    slope: float

    def seconds(self, start: int, end: int) -> float:
        """Seconds to read tokens ``start..end - 1`` of one sequence (the integral of the rate)."""
        return self.base * (end - start) + self.slope * (end * end - start * start) / 2


@attrs.frozen
class Probe:
    """What reading the probe pieces measured.

    Attributes:
        batch: sequences in the probe batch (states are of the whole batch).
        piece: tokens per probe piece.
        first_bytes: the state's size after the first piece.
        growth_per_token: bytes the state grows per token of context.
        time: the fitted per-token time of one sequence (see the module docstring).
    """

    batch: int
    piece: int
    first_bytes: int
    growth_per_token: float
    time: TimeModel


def _synchronize(device: torch.device) -> None:
    # A CUDA call returns before its kernels finish; time the work, not the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_time(states: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """``(a, b)`` of ``seconds ~ a + b * states``: Theil-Sen, ``b >= 0``, ``a >= 0``.

    With a single distinct state there is no slope: ``b`` is 0 and ``a`` the median time.
    """
    if len(set(states)) < 2:
        return float(np.median(seconds)), 0.0
    slope, intercept, _, _ = theilslopes(seconds, states)
    if slope <= 0:
        return float(np.median(seconds)), 0.0
    return max(0.0, float(intercept)), float(slope)


@torch.no_grad()
def probe_model(model: nn.Module, vocab_size: int, batch: int, piece: int,
                device: torch.device) -> Probe:
    """Read consecutive pieces of a probe batch, timing each (see the module docstring)."""
    tokens = torch.arange(batch * piece, device=device).reshape(batch, piece) % vocab_size
    was_training = model.training
    model.eval()
    states: list[int] = []
    seconds: list[float] = []
    try:
        state = model(tokens)[1]  # untimed: the first call pays for lazy set-up
        first = state_bytes(state)
        began = time.perf_counter()
        while len(seconds) < PROBE_MAX_PIECES and (
                len(seconds) < PROBE_MIN_PIECES or time.perf_counter() - began < PROBE_SECONDS):
            states.append(state_bytes(state))
            _synchronize(device)
            started = time.perf_counter()
            state = model(tokens, state)[1]
            _synchronize(device)
            seconds.append((time.perf_counter() - started) / (batch * piece))
    finally:
        model.train(was_training)
    growth = max(0, state_bytes(state) - first) / (piece * len(seconds))
    a, b = fit_time(states, seconds)
    # The state at depth x is first + growth * (x - piece); its part that does not grow is S0.
    fixed = max(0.0, first - growth * piece)
    return Probe(batch=batch, piece=piece, first_bytes=first, growth_per_token=growth,
                 time=TimeModel(base=a + b * fixed, slope=b * growth))


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
    probe = probe_model(model, vocab_size, min(batch_size, PROBE_BATCH),
                        min(piece_size, PROBE_TOKENS), device)
    return costs_of(probe, lengths=lengths, cells_per_length=cells_per_length,
                    batch_size=batch_size, batches=batches, piece_size=piece_size,
                    vocab_size=vocab_size)


def costs_of(
    probe: Probe,
    *,
    lengths: Sequence[int],
    cells_per_length: int,
    batch_size: int,
    batches: int,
    piece_size: int,
    vocab_size: int,
) -> list[EvalCost]:
    """The cost of every length from a :func:`probe_model` measurement."""
    piece = probe.piece
    scale = batch_size / probe.batch
    costs = []
    for length in lengths:
        state = (probe.first_bytes + probe.growth_per_token * max(0, length - piece)) * scale
        sequences = cells_per_length * batches * batch_size
        costs.append(EvalCost(
            length=length,
            batch_bytes=batches * batch_size * length * BATCH_BYTES_PER_TOKEN,
            state_bytes=math.ceil(state),
            piece_bytes=batch_size * min(piece_size, length) * vocab_size * 4,
            seconds=sequences * probe.time.seconds(0, length),
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
                            f"shorter --lengths, fewer --batches or a smaller --batch-size")
