"""``titans.mag``: Memory as a Gate (Titans §4.2; docs/memory.md, "MAG").

One block, two branches over the same normalised input ``x̃ = norm(x)``::

    y = SWA(x̃)                                    # short-term: the spec's attention component
    m = LMM(x̃)                                    # long-term: the memory layer, written per token
    o = W_o (RMSNorm_a(y) * sigmoid(RMSNorm_b(m)))  # the gate (a documented choice, see below)
    h = x + o;   out = h + FFN(norm(h))

The paper only says that ``y`` and ``m`` are normalised with learnable vector weights and then
combined through a non-linearity; ``RMSNorm_a(y) * sigmoid(RMSNorm_b(m))`` is memforge's reading
(docs/memory.md, "MAG"): the memory decides, channel by channel, how much of the precise
short-term output passes.

Persistent tokens ``P`` are the attention component's own (``persistent_tokens`` of
``baseline.sliding_window``): the attention keeps them visible to every query whatever the window,
and since the paper feeds ``P || x`` to both branches, they are also written into the memory at the
start of every sequence (their outputs are discarded). With zero persistent tokens both effects
vanish and the block is exactly the variant without them.

The helpers at the bottom (state checks, the persistent prefix) are shared with ``titans.mal``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import torch
from torch import Tensor, nn

from memforge.capabilities import require
from memforge.errors import InputError
from memforge.interfaces import DecodesMemoryStatically, MemoryLayer, StaticDecodeStart
from memforge.linear import Linear
from memforge.nn import static_attention_buffers


@attrs.frozen(kw_only=True)
class MAGIntegrationConfig:
    """Sliding-window attention gated by the memory (``titans.mag``); its memory layer is the
    spec's ``memory_layer``."""


class MAGState(NamedTuple):
    """State of a :class:`MAGBlock` between calls on the same sequences.

    Attributes:
        memory: the memory layer's state.
        attention: the attention's cache (for a sliding window: the last ``window - 1`` keys and
            values only, so generation memory stays bounded).
    """

    memory: Any
    attention: Any


class MAGBlock(nn.Module):
    """Memory-as-a-Gate block: ``forward(hidden [B, T, D], state) -> (hidden, MAGState)``.

    Args:
        dim: model width ``D``.
        attention: the short-term branch, ``forward(x, cache) -> (y, cache)`` (kind ``attention``).
        memory: the long-term branch, any memory layer (:class:`memforge.interfaces.MemoryLayer`).
        feedforward: the position-wise MLP.
    """

    def __init__(self, dim: int, attention: nn.Module, memory: MemoryLayer,
                 feedforward: nn.Module) -> None:
        super().__init__()
        self.dim = dim
        self.attention = attention
        self.memory = memory
        self.feedforward = feedforward
        self.mixer_norm = nn.RMSNorm(dim)
        self.attention_out_norm = nn.RMSNorm(dim)
        self.memory_out_norm = nn.RMSNorm(dim)
        self.out_proj = Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)

    def forward(self, hidden: Tensor, state: MAGState | None = None) -> tuple[Tensor, MAGState]:
        """``[B, T, D] -> [B, T, D]`` continuing from ``state`` (``None``: new sequences)."""
        check_hidden(hidden, self.dim, "titans.mag")
        if state is None:
            memory_state, cache = start_memory(self.memory, self.attention, hidden), None
        else:
            state = check_state(state, MAGState, "titans.mag")
            memory_state, cache = state.memory, state.attention

        def branches(x: Tensor) -> tuple[Tensor, Tensor]:
            nonlocal memory_state, cache
            # The memory branch runs first so that its state check catches a mismatched state
            # (wrong model or batch) with an InputError before the attention sees the cache.
            m, memory_state = self.memory(x, memory_state)
            y, cache = self.attention(x, cache)
            return m, y

        return self._block(hidden, branches), MAGState(memory_state, cache)

    def static_decode_start(self, state: MAGState, batch: int, capacity: int) -> StaticDecodeStart:
        """Buffers for decoding on from ``state``: the memory layer's and the attention's. One
        cycle: the memory chunk."""
        state = check_state(state, MAGState, "titans.mag")
        return memory_attention_decode_start(self.memory, self.attention, state, batch, capacity)

    def static_decode_step(self, hidden: Tensor, buffers: MemoryAttentionBuffers,
                           completes: tuple[bool, ...]) -> Tensor:
        """One token ``hidden`` ``[B, 1, D]`` on ``buffers`` (updated in place); equals :meth:`forward`."""
        return self._block(hidden, lambda x: (
            self.memory.static_decode_step(x, buffers.memory, completes[0]),
            self.attention.static_decode_step(x, buffers.attention)))

    def _block(self, hidden: Tensor, branches: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
        """The block, written once for :meth:`forward` and :meth:`static_decode_step`:
        ``branches(x)`` runs the memory and the attention on the normalised input and returns
        ``(m, y)``, with their states (forward) or on their fixed-shape buffers (a decode step)."""
        m, y = branches(self.mixer_norm(hidden))
        gated = self.attention_out_norm(y) * torch.sigmoid(self.memory_out_norm(m))
        hidden = hidden + self.out_proj(gated)
        return hidden + self.feedforward(self.ffn_norm(hidden))


# --------------------------------------------------------------------------------------------
# Shared with titans.mal


class MemoryAttentionBuffers(NamedTuple):
    """A fixed-shape decode's buffers for a block with a memory layer and an attention (changed
    in place): the memory layer's and the attention component's."""

    memory: Any
    attention: Any


def memory_attention_decode_start(memory: MemoryLayer, attention: nn.Module,
                                  state: MAGState | Any, batch: int, capacity: int
                                  ) -> StaticDecodeStart:
    """The fixed-shape decode start of a block whose state is ``(memory, attention)`` (MAG, MAL):
    both components' buffers, one cycle (the memory chunk). A memory layer or attention
    component that cannot decode with fixed shapes is named in an :class:`InputError`."""
    require(memory, DecodesMemoryStatically, needed_by="fixed-shape decoding of titans.mag/mal",
            fix="use generate(..., compile=False)", error=InputError)
    buffers = MemoryAttentionBuffers(memory.static_decode_buffers(state.memory, batch),
                                     static_attention_buffers(attention, state.attention, batch, capacity))
    return StaticDecodeStart(buffers, (memory.static_decode_phase(state.memory),),
                             (memory.chunk_size,))


def check_hidden(hidden: Any, dim: int, block: str) -> None:
    """Raise :class:`InputError` unless ``hidden`` is a floating ``[B, T, dim]`` tensor, ``T >= 1``."""
    if (not isinstance(hidden, Tensor) or hidden.ndim != 3 or hidden.shape[-1] != dim
            or hidden.shape[1] < 1 or not hidden.dtype.is_floating_point):
        got = (f"{list(hidden.shape)} {hidden.dtype}" if isinstance(hidden, Tensor)
               else type(hidden).__name__)
        raise InputError(f"{block} expects floating hidden states [batch, time >= 1, {dim}], got {got}")


def check_state(state: Any, kind: type, block: str) -> Any:
    """Raise :class:`InputError` unless ``state`` is a ``kind`` (the state this block returns)."""
    if not isinstance(state, kind):
        raise InputError(f"{block} block state must be the {kind.__name__} it returned, got "
                         f"{type(state).__name__}; was the state made by another model?")
    return state


def start_memory(memory: MemoryLayer, attention: nn.Module, hidden: Tensor) -> Any | None:
    """The memory state at the start of new sequences: the attention's persistent tokens written.

    Titans feeds ``P || x`` to the memory (Eqs. 26, 29); the tokens are the attention component's
    ``persistent`` parameter ``[P, D]`` (absent or empty: nothing is written and the state is
    ``None``, exactly the variant without persistent tokens).
    """
    persistent = getattr(attention, "persistent", None)
    if persistent is None or persistent.shape[0] == 0:
        return None
    prefix = persistent.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
    return memory(prefix, None)[1]
