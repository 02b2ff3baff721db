"""``titans.lmm``: the neural memory alone as a block's token mixer, no attention.

See docs/memory.md, "LMM".

``h = x + LMM(norm(x)); y = h + FFN(norm(h))``. Optional persistent tokens ``P`` (learned,
input-independent; docs/memory.md, "Persistent tokens") are written into the memory at the start
of every sequence, before its first token, and their outputs are discarded: with zero tokens the
block is exactly the variant without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from memforge import option
from memforge.capabilities import require
from memforge.errors import InputError
from memforge.interfaces import DecodesMemoryStatically, MemoryLayer, StaticDecodeStart


@attrs.frozen(kw_only=True)
class LMMIntegrationConfig:
    """Memory-only block (``titans.lmm``); its memory layer is the spec's ``memory_layer``."""

    persistent_tokens: int = option(0, ge=0, le=4096, typical=(0, 8),
                                    help="learned tokens written first into every memory")


class MemoryBlock(nn.Module):
    """Pre-norm residual block with the memory layer as mixer: ``forward(x, state)``.

    Args:
        dim: model width.
        memory: any memory layer (:class:`memforge.interfaces.MemoryLayer`).
        feedforward: the position-wise MLP.
        persistent_tokens: number of learned tokens written at each sequence start.
    """

    def __init__(self, dim: int, memory: MemoryLayer, feedforward: nn.Module,
                 persistent_tokens: int = 0) -> None:
        super().__init__()
        self.memory = memory
        self.feedforward = feedforward
        self.mixer_norm = nn.RMSNorm(dim)
        self.ffn_norm = nn.RMSNorm(dim)
        self.persistent = (nn.Parameter(torch.randn(persistent_tokens, dim) * 0.02)
                           if persistent_tokens else None)

    def forward(self, hidden: Tensor, state: Any | None = None) -> tuple[Tensor, Any]:
        """``[B, T, D] -> [B, T, D]`` continuing from ``state`` (``None``: a new sequence)."""
        if state is None and self.persistent is not None:
            prefix = self.persistent.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
            _, state = self.memory(self.mixer_norm(prefix), None)

        def memory(x: Tensor) -> Tensor:
            nonlocal state
            mixed, state = self.memory(x, state)
            return mixed

        return self._block(hidden, memory), state

    def static_decode_start(self, state: Any, batch: int, capacity: int) -> StaticDecodeStart:
        """Buffers for decoding on from ``state`` (after at least one token): the memory layer's.
        One cycle: the memory chunk. Nothing grows with the length (``capacity`` is unused)."""
        if state is None:
            raise InputError("titans.lmm decodes on from a state; read at least one token first")
        require(self.memory, DecodesMemoryStatically, needed_by="fixed-shape decoding of titans.lmm",
                fix="use generate(..., compile=False)", error=InputError)
        buffers = self.memory.static_decode_buffers(state, batch)
        return StaticDecodeStart(buffers, (self.memory.static_decode_phase(state),),
                                 (self.memory.chunk_size,))

    def static_decode_step(self, hidden: Tensor, buffers: Any, completes: tuple[bool, ...]) -> Tensor:
        """One token ``hidden`` ``[B, 1, D]`` on ``buffers`` (updated in place); equals :meth:`forward`."""
        return self._block(hidden, lambda x: self.memory.static_decode_step(x, buffers, completes[0]))

    def _block(self, hidden: Tensor, memory: Callable[[Tensor], Tensor]) -> Tensor:
        """The block, written once for :meth:`forward` and :meth:`static_decode_step`: ``memory``
        runs the memory layer on the normalised input, with its state (forward) or on its
        fixed-shape buffers (a decode step)."""
        hidden = hidden + memory(self.mixer_norm(hidden))
        return hidden + self.feedforward(self.ffn_norm(hidden))
