"""Causal self-attention with an optional sliding window, persistent tokens and an incremental cache.

This is the short-term half of the Titans models (docs/memory.md, "How the memory joins
attention"): MAG and MAL use sliding-window attention whose persistent prefix ``P`` is always
visible ("SW attention with prefix", Fig. 3b);
plain attention is the ``window=None, persistent_tokens=0`` case.

The module satisfies the attention capabilities of :mod:`memforge.interfaces`:
``ComposesAttention`` (MAC attends over ``[persistent | retrieved | segment]`` with its own mask
through :meth:`CausalSelfAttention.project_qkv`, :meth:`CausalSelfAttention.persistent_kv` and
:meth:`CausalSelfAttention.output`) and ``DecodesAttentionStatically``. The masks and helpers it
uses are the core's (:mod:`memforge.nn`).

Conventions: ``B`` batch, ``T`` time, ``D`` model width, ``H`` heads, ``d = D // H``. A boolean
attention mask is ``True`` where a query may attend to a key.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from memforge.errors import InputError
from memforge.linear import Linear
from memforge.nn import RotaryEmbedding, attend_visible, batch_persistent_kv
from memforge_baselines.attention_paths import blockwise_window_attention, dense_attention

__all__ = ["AttentionCache", "AttentionDecodeBuffers", "CausalSelfAttention"]


class AttentionCache(NamedTuple):
    """What :class:`CausalSelfAttention` carries between calls on the same sequences.

    Attributes:
        keys: ``[B, H, t, d]`` keys of the most recent ``t`` tokens, already rotated (RoPE at their
            absolute positions). Only keys a later token can still see are kept: everything for
            full attention, the last ``min(position, window - 1)`` tokens for a window (so ``t`` is
            0 for ``window=1``). Persistent keys are never cached; they are recomputed from the
            parameters each call.
        values: ``[B, H, t, d]`` values matching ``keys``.
        position: 0-dim ``int64`` tensor on the keys' device, the number of tokens seen so far
            (the absolute position of the next token). A tensor rather than a Python int so the
            cache is a pytree of tensors (the ``Block`` state contract) and ``torch.compile`` does
            not specialise, and recompile, on every decoding step.

    Cached tensors are not detached: carrying a cache across calls back-propagates through it, so
    feeding a sequence in pieces equals feeding it whole, gradients included. Detach explicitly
    (truncated back-propagation) if that is not wanted.
    """

    keys: Tensor
    values: Tensor
    position: Tensor


class AttentionDecodeBuffers(NamedTuple):
    """What a fixed-shape decode of :class:`CausalSelfAttention` keeps (changed in place).

    Attributes:
        keys: ``[B, H, C, d]`` rotated keys. With a window, a ring of ``C = window - 1`` slots: the
            token at position ``p`` lives in slot ``p % C``. Without, ``C`` covers every position
            the decode can reach and position ``p`` lives in slot ``p``. Slots not yet written are
            masked.
        values: matching ``keys``.
        position: 0-d long tensor, the absolute position of the next token.
        persistent: the persistent tokens' keys and values ``[B, H, P, d]``, or ``None``.
    """

    keys: Tensor
    values: Tensor
    position: Tensor
    persistent: tuple[Tensor, Tensor] | None


#: A full-attention decode buffer is rounded up to a multiple of this many positions, so that
#: generations of nearby lengths share their compiled graphs (the buffer length is a shape).
FULL_ATTENTION_BUFFER_QUANTUM = 256


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: full or sliding-window, with optional persistent tokens.

    Queries and keys get rotary embeddings at their absolute positions. With ``window=w`` the query
    at position ``i`` sees the keys at positions ``i - w + 1 .. i``; with ``window=None`` it sees
    ``0 .. i``. The ``persistent_tokens`` learnable vectors ``[P, D]`` (Titans' persistent memory)
    go through the same key/value projections and are visible to every query whatever the window.
    They get **no** rotary embedding: they are input-independent, position-free memory, so a query
    scores them by content alone (its own rotation still applies). With ``P = 0`` there is no
    parameter and no prefix: the module is exactly plain attention.

    Satisfies the ``Attention`` protocol.

    Cost: with a window, a call of ``T`` tokens costs ``O(T * (window + P))`` time and memory,
    whatever ``T``: queries are split into blocks of ``window`` tokens, and each block attends to
    its own block and the previous one (plus the persistent keys), all blocks in one batched
    attention call. Full attention costs ``O(T * (t + T))`` with ``t`` cached tokens.

    Args:
        dim: model width ``D``.
        heads: number of heads ``H``; must divide ``dim``, and ``dim // heads`` must be even (RoPE).
        window: sliding-window size ``w >= 1`` (``1`` = each token sees only itself and ``P``), or
            ``None`` for full causal attention.
        persistent_tokens: number ``P >= 0`` of persistent tokens, initialised from
            ``N(0, 0.02**2)``.
        rope_base: rotary frequency base.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        window: int | None = None,
        persistent_tokens: int = 0,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if heads < 1 or dim < 1 or dim % heads:
            raise ValueError(
                f"heads must divide dim, got dim={dim}, heads={heads}; "
                "choose heads among the divisors of dim (or change dim)"
            )
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (or None for full attention), got window={window}")
        if persistent_tokens < 0:
            raise ValueError(f"persistent_tokens must be >= 0, got {persistent_tokens}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.window = window
        self.persistent_tokens = persistent_tokens
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)
        self.q_proj = Linear(dim, dim, bias=False)
        self.k_proj = Linear(dim, dim, bias=False)
        self.v_proj = Linear(dim, dim, bias=False)
        self.o_proj = Linear(dim, dim, bias=False)
        self.persistent = (
            nn.Parameter(torch.randn(persistent_tokens, dim) * 0.02) if persistent_tokens else None
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, window={self.window}, "
            f"persistent_tokens={self.persistent_tokens}"
        )

    def _split_heads(self, x: Tensor) -> Tensor:
        # [..., T, D] -> [..., H, T, d]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def project_qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project ``x`` ``[B, T, D]`` to per-head ``q, k, v`` ``[B, H, T, d]``.

        ``q`` and ``k`` are rotated at the absolute ``positions`` ``[T]``; ``v`` is not.
        """
        q, k = self.rotary.rotate_pair(self._split_heads(self.q_proj(x)),
                                       self._split_heads(self.k_proj(x)), positions)
        return q, k, self._split_heads(self.v_proj(x))

    def persistent_kv(self) -> tuple[Tensor, Tensor] | None:
        """Keys and values of the persistent tokens, each ``[1, H, P, d]`` (no rotary), or ``None``.

        The leading axis is 1 so callers can ``expand`` it over the batch.
        """
        if self.persistent is None:
            return None
        k = self._split_heads(self.k_proj(self.persistent))
        v = self._split_heads(self.v_proj(self.persistent))
        return k[None], v[None]

    def output(self, o: Tensor) -> Tensor:
        """Merge heads of ``o`` ``[B, H, T, d]`` and apply the output projection: ``[B, T, D]``."""
        return self.o_proj(o.transpose(-3, -2).flatten(-2))

    def forward(self, x: Tensor, cache: AttentionCache | None = None) -> tuple[Tensor, AttentionCache]:
        """Attend causally over ``x`` ``[B, T, D]``, continuing from ``cache``.

        Args:
            x: the next ``T >= 1`` tokens of each sequence.
            cache: returned by the previous call on the same sequences, or ``None`` when ``x``
                starts at position 0.

        Returns:
            ``(y [B, T, D], cache)``; the new cache covers every token up to the end of ``x``, so
            calling on a sequence in pieces equals calling on it whole.
        """
        # InputError is a ValueError: a user mistake, reported without a traceback by the CLI.
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise InputError(f"expected x of shape [B, T, {self.dim}] with T >= 1, got {tuple(x.shape)}")
        T = x.shape[1]
        steps = torch.arange(T, device=x.device)
        if cache is None:
            cache_k = cache_v = None
            position = torch.zeros((), dtype=torch.long, device=x.device)
            positions = steps
        else:
            if not isinstance(cache, AttentionCache) or cache.keys.shape[0] != x.shape[0]:
                raise InputError(
                    f"attention cache must be the AttentionCache this module returned for these "
                    f"{x.shape[0]} sequences, got {type(cache).__name__}"
                )
            cache_k, cache_v, position = cache
            if self.window is not None and cache_k.shape[2] >= self.window:
                raise InputError(
                    f"a window-{self.window} cache holds at most {self.window - 1} tokens, got "
                    f"keys of shape {tuple(cache_k.shape)}; pass the cache this module returned"
                )
            positions = position + steps
        q, k, v = self.project_qkv(x, positions)
        prefix = self.persistent_kv()
        if self.window is not None and T > self.window:
            o = blockwise_window_attention(q, k, v, cache_k, cache_v, prefix, self.window)
        else:
            o = dense_attention(q, k, v, cache_k, cache_v, prefix, self.window)
        new_cache = AttentionCache(
            self._visible_tail(cache_k, k), self._visible_tail(cache_v, v), position + T
        )
        return self.output(o), new_cache

    # -- fixed-shape decoding (memforge.decoding.StaticDecoder) -----------------------------------
    def static_decode_buffers(self, cache: AttentionCache, batch: int, capacity: int
                              ) -> AttentionDecodeBuffers:
        """Fixed-shape buffers holding ``cache`` for up to ``capacity`` more tokens (copies).

        A window needs ``window - 1`` slots whatever the length; full attention needs one per
        position the decode can reach (rounded up to :data:`FULL_ATTENTION_BUFFER_QUANTUM`).
        """
        if not isinstance(cache, AttentionCache) or cache.keys.shape[0] != batch:
            raise InputError(f"attention cache must be the AttentionCache this module returned for "
                             f"these {batch} sequences, got {type(cache).__name__}")
        keys, values, position = cache
        seen, kept = int(position), keys.shape[2]
        if self.window is None:
            reach = seen + capacity
            slots = -(-reach // FULL_ATTENTION_BUFFER_QUANTUM) * FULL_ATTENTION_BUFFER_QUANTUM
            where = torch.arange(kept, device=keys.device)
        else:
            slots = self.window - 1
            where = torch.arange(seen - kept, seen, device=keys.device) % max(slots, 1)

        def buffer(rows: Tensor) -> Tensor:
            out = rows.new_zeros(batch, self.heads, slots, self.head_dim)
            out[:, :, where] = rows
            return out

        return AttentionDecodeBuffers(buffer(keys), buffer(values), position.clone(),
                                      batch_persistent_kv(self, batch, keys.dtype))

    def static_decode_step(self, x: Tensor, buffers: AttentionDecodeBuffers) -> Tensor:
        """Attend one token ``x`` ``[B, 1, D]`` on ``buffers`` (updated in place); equals
        :meth:`forward` on it with the cache the buffers hold."""
        position = buffers.position.view(1)
        q, k, v = self.project_qkv(x, position)
        slots = buffers.keys.shape[2]
        index = torch.arange(slots, device=x.device)
        if self.window is None:  # write first: the token sees itself in its slot
            buffers.keys.index_copy_(2, position, k)
            buffers.values.index_copy_(2, position, v)
            o = attend_visible(q, buffers.persistent, [buffers.keys], [buffers.values],
                               [index <= position])
        else:  # read the ring, then overwrite the oldest slot, the one leaving the window
            o = attend_visible(q, buffers.persistent, [buffers.keys, k], [buffers.values, v],
                               [index < position, index.new_ones(1, dtype=torch.bool)])
        if self.window is not None and slots:
            slot = position % slots
            buffers.keys.index_copy_(2, slot, k)
            buffers.values.index_copy_(2, slot, v)
        buffers.position.add_(1)
        return self.output(o)

    def _visible_tail(self, old: Tensor | None, new: Tensor) -> Tensor:
        """The cached and new entries that later tokens can still see (see :class:`AttentionCache`)."""
        if self.window is None:
            return new if old is None else torch.cat([old, new], dim=2)
        keep = self.window - 1
        if old is not None and new.shape[2] < keep:
            new = torch.cat([old, new], dim=2)
        # Explicit start index: a negative slice start of -0 would keep everything.
        return new[:, :, max(new.shape[2] - keep, 0) :]
