"""``lact.block``: the LaCT block, sliding-window attention beside the large-chunk memory
(docs/zoo.md, "LaCT").

The LaCT paper's language-model layer runs window attention and the test-time-training branch on
the same input and sums them (its code adds the normalised fast-weight read to the attention
output before one output projection). Here each branch is the spec's component with its own
output projection, so the sum is the same form::

    x̃ = norm(x);   h = x + SWA(x̃) + LaCT(x̃);   out = h + FFN(norm(h))

The window attends inside the current chunk, whose tokens the memory has not absorbed yet (a
chunk's queries read the weights from before its update), so the window should be at least the
memory's chunk size, as in the paper (2048 and 2048) and the ``lact.lact`` presets. Any attention
component is accepted (full attention beside the memory is an ablation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from memforge.capabilities import require
from memforge.errors import InputError
from memforge.interfaces import DecodesMemoryStatically, MemoryLayer, StaticDecodeStart
from memforge.nn import static_attention_buffers


class LaCTBlockState(NamedTuple):
    """State of a :class:`LaCTBlock`: the memory layer's state and the attention's cache."""

    memory: Any
    attention: Any


class LaCTBlockBuffers(NamedTuple):
    """Fixed-shape decode buffers: the memory layer's and the attention's (changed in place)."""

    memory: Any
    attention: Any


class LaCTBlock(nn.Module):
    """``forward(hidden [B, T, D], state) -> (hidden, LaCTBlockState)``.

    Args:
        dim: model width ``D``.
        attention: the short-term branch (kind ``attention``, a sliding window).
        memory: the long-term branch, any memory layer (``lact.layer`` in the presets).
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
        self.ffn_norm = nn.RMSNorm(dim)

    def _check_hidden(self, hidden: Any) -> None:
        if (not isinstance(hidden, Tensor) or hidden.ndim != 3 or hidden.shape[-1] != self.dim
                or hidden.shape[1] < 1 or not hidden.dtype.is_floating_point):
            got = (f"{list(hidden.shape)} {hidden.dtype}" if isinstance(hidden, Tensor)
                   else type(hidden).__name__)
            raise InputError(f"lact.block expects floating hidden states [batch, time >= 1, "
                             f"{self.dim}], got {got}")

    @staticmethod
    def _check_state(state: Any) -> LaCTBlockState:
        if not isinstance(state, LaCTBlockState):
            raise InputError(f"lact.block state must be the LaCTBlockState it returned, got "
                             f"{type(state).__name__}; was the state made by another model?")
        return state

    def forward(self, hidden: Tensor, state: LaCTBlockState | None = None
                ) -> tuple[Tensor, LaCTBlockState]:
        """``[B, T, D] -> [B, T, D]`` continuing from ``state`` (``None``: new sequences)."""
        self._check_hidden(hidden)
        memory_state, cache = (None, None) if state is None else self._check_state(state)
        x = self.mixer_norm(hidden)
        # The memory first: its state check names a mismatched state before the attention runs.
        m, memory_state = self.memory(x, memory_state)
        y, cache = self.attention(x, cache)
        hidden = hidden + y + m
        return hidden + self.feedforward(self.ffn_norm(hidden)), LaCTBlockState(memory_state, cache)

    def static_decode_start(self, state: LaCTBlockState, batch: int, capacity: int
                            ) -> StaticDecodeStart:
        """Buffers for decoding on from ``state``: the memory layer's and the attention's. One
        cycle: the memory chunk."""
        if state is None:
            raise InputError("lact.block decodes on from a state; read at least one token first")
        state = self._check_state(state)
        require(self.memory, DecodesMemoryStatically, needed_by="fixed-shape decoding of lact.block",
                fix="use generate(..., compile=False)", error=InputError)
        buffers = LaCTBlockBuffers(self.memory.static_decode_buffers(state.memory, batch),
                                   static_attention_buffers(self.attention, state.attention, batch,
                                                            capacity))
        return StaticDecodeStart(buffers, (self.memory.static_decode_phase(state.memory),),
                                 (self.memory.chunk_size,))

    def static_decode_step(self, hidden: Tensor, buffers: LaCTBlockBuffers,
                           completes: tuple[bool, ...]) -> Tensor:
        """One token ``hidden`` ``[B, 1, D]`` on ``buffers`` (updated in place); equals :meth:`forward`."""
        x = self.mixer_norm(hidden)
        m = self.memory.static_decode_step(x, buffers.memory, completes[0])
        y = self.attention.static_decode_step(x, buffers.attention)
        hidden = hidden + y + m
        return hidden + self.feedforward(self.ffn_norm(hidden))
