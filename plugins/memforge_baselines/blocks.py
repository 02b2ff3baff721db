"""The plain pre-norm transformer block, assembled from the modules it is given."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from memforge.interfaces import StaticDecodeStart
from memforge.nn import RMSNorm, static_attention_buffers

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``h = x + attn(norm1(x)); y = h + ffn(norm2(h))``.

    Takes its token mixer and feed-forward layer as modules (torchtune style), so any ``Attention``
    (``forward(x, cache) -> (y, cache)``) and any ``FeedForward`` (``forward(x) -> y``) can be
    slotted in. The norms are :class:`~memforge.nn.RMSNorm`. Satisfies the ``Block``
    protocol; the block's state is the attention's cache.

    Args:
        attention: the token mixer, e.g. a ``CausalSelfAttention``.
        feedforward: the position-wise MLP, e.g. a ``SwiGLU``.
        dim: model width ``D``.
        norm_eps: epsilon of both RMSNorms.
    """

    def __init__(
        self, attention: nn.Module, feedforward: nn.Module, dim: int, *, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim, norm_eps)
        self.attention = attention
        self.norm2 = RMSNorm(dim, norm_eps)
        self.feedforward = feedforward

    def forward(self, hidden: Tensor, state: Any | None = None) -> tuple[Tensor, Any]:
        """Map ``hidden`` ``[B, T, D]`` to ``[B, T, D]``, continuing from ``state``.

        Args:
            hidden: the block input.
            state: the state this block returned for the previous piece of the same sequences, or
                ``None`` at the start of a sequence.

        Returns:
            ``(output, state)``: feeding a sequence in pieces with the state carried equals
            feeding it whole.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.dim:
            raise ValueError(f"expected hidden of shape [B, T, {self.dim}], got {tuple(hidden.shape)}")
        mixed, state = self.attention(self.norm1(hidden), state)
        h = hidden + mixed
        return h + self.feedforward(self.norm2(h)), state

    def static_decode_start(self, state: Any, batch: int, capacity: int) -> StaticDecodeStart:
        """Buffers for decoding on from ``state`` (the attention's cache) by up to ``capacity``
        tokens: the attention component's own (it must be ``DecodesAttentionStatically``). No cycles."""
        return StaticDecodeStart(static_attention_buffers(self.attention, state, batch, capacity),
                                 (), ())

    def static_decode_step(self, hidden: Tensor, buffers: Any, completes: tuple[bool, ...]) -> Tensor:
        """One token ``hidden`` ``[B, 1, D]`` on ``buffers`` (updated in place); equals :meth:`forward`."""
        h = hidden + self.attention.static_decode_step(self.norm1(hidden), buffers)
        return h + self.feedforward(self.norm2(h))
