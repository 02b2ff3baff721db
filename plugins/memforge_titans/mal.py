"""``titans.mal``: Memory as a Layer (Titans §4.3; docs/memory.md, "MAL").

The memory layer and the (sliding-window) attention are stacked inside one block, H3-style, each
as a pre-norm residual sub-layer, followed by the feed-forward layer::

    h1 = x  + LMM(norm_1(x))
    h2 = h1 + SWA(norm_2(h1))
    out = h2 + FFN(norm_3(h2))

Persistent tokens are the attention component's: always visible to the attention, and written into
the memory at the start of every sequence (``x̃ = P || x``, Eq. 29; see
:func:`memforge_titans.mag.start_memory`). Zero persistent tokens is exactly the variant without.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
from torch import Tensor, nn

from memforge.interfaces import MemoryLayer, StaticDecodeStart
from memforge_titans.mag import (
    MemoryAttentionBuffers,
    check_hidden,
    check_state,
    memory_attention_decode_start,
    start_memory,
)


@attrs.frozen(kw_only=True)
class MALIntegrationConfig:
    """Memory layer followed by sliding-window attention (``titans.mal``); its memory layer is
    the spec's ``memory_layer``."""


class MALState(NamedTuple):
    """State of a :class:`MALBlock` between calls on the same sequences.

    Attributes:
        memory: the memory layer's state.
        attention: the attention's cache (bounded by the window for sliding-window attention).
    """

    memory: Any
    attention: Any


class MALBlock(nn.Module):
    """Memory-as-a-Layer block: ``forward(hidden [B, T, D], state) -> (hidden, MALState)``.

    Args:
        dim: model width ``D``.
        memory: any memory layer (first sub-layer; :class:`memforge.interfaces.MemoryLayer`).
        attention: the attention (second sub-layer), ``forward(x, cache) -> (y, cache)``.
        feedforward: the position-wise MLP.
    """

    def __init__(self, dim: int, memory: MemoryLayer, attention: nn.Module,
                 feedforward: nn.Module) -> None:
        super().__init__()
        self.dim = dim
        self.memory = memory
        self.attention = attention
        self.feedforward = feedforward
        self.memory_norm = nn.RMSNorm(dim)
        self.attention_norm = nn.RMSNorm(dim)
        self.ffn_norm = nn.RMSNorm(dim)

    def forward(self, hidden: Tensor, state: MALState | None = None) -> tuple[Tensor, MALState]:
        """``[B, T, D] -> [B, T, D]`` continuing from ``state`` (``None``: new sequences)."""
        check_hidden(hidden, self.dim, "titans.mal")
        if state is None:
            memory_state, cache = start_memory(self.memory, self.attention, hidden), None
        else:
            state = check_state(state, MALState, "titans.mal")
            memory_state, cache = state.memory, state.attention

        def memory(x: Tensor) -> Tensor:
            nonlocal memory_state
            mixed, memory_state = self.memory(x, memory_state)
            return mixed

        def attention(x: Tensor) -> Tensor:
            nonlocal cache
            attended, cache = self.attention(x, cache)
            return attended

        return self._block(hidden, memory, attention), MALState(memory_state, cache)

    def static_decode_start(self, state: MALState, batch: int, capacity: int) -> StaticDecodeStart:
        """Buffers for decoding on from ``state``: the memory layer's and the attention's. One
        cycle: the memory chunk."""
        state = check_state(state, MALState, "titans.mal")
        return memory_attention_decode_start(self.memory, self.attention, state, batch, capacity)

    def static_decode_step(self, hidden: Tensor, buffers: MemoryAttentionBuffers,
                           completes: tuple[bool, ...]) -> Tensor:
        """One token ``hidden`` ``[B, 1, D]`` on ``buffers`` (updated in place); equals :meth:`forward`."""
        return self._block(
            hidden, lambda x: self.memory.static_decode_step(x, buffers.memory, completes[0]),
            lambda x: self.attention.static_decode_step(x, buffers.attention))

    def _block(self, hidden: Tensor, memory: Callable[[Tensor], Tensor],
               attention: Callable[[Tensor], Tensor]) -> Tensor:
        """The block, written once for :meth:`forward` and :meth:`static_decode_step`: ``memory``
        and ``attention`` run the two sub-layers on their normalised inputs, with their states
        (forward) or on their fixed-shape buffers (a decode step)."""
        hidden = hidden + memory(self.memory_norm(hidden))
        hidden = hidden + attention(self.attention_norm(hidden))
        return hidden + self.feedforward(self.ffn_norm(hidden))
