"""``titans.mac``: Memory as Context (Titans §4.1; docs/memory.md, "MAC").

The sequence is cut into segments of ``segment_len`` tokens ``S`` (counted from the sequence
start). For each segment, in order::

    h = N(M_prev(q(S)))                   # retrieve: read the memory as the previous segments left
                                          #   it, with queries from a learned projection; no write
    y = Attn([P | h | S])                 # full attention inside the window only (rows of S)
    m = LMM(norm(y))                      # write y into the memory (chunked update) and read it
                                          #   back causally, per token (the layer's own read order)
    o = W_o (RMSNorm_a(y) * sigmoid(RMSNorm_b(m)))      # the gate y ⊗ M*(y) (Eq. 25)
    h' = x + o;   out = h' + FFN(norm(h'))

``q`` is ``l2norm(silu(x W_Q))`` per head, like the memory layer's own queries; the raw read goes
through a per-head RMS norm ``N`` and becomes ``segment_len`` context tokens (Eq. 21 forces
``N_l = C``: one retrieved row per segment token). No extra linear map follows the read: the
attention's key/value projections come right after it, and a linear map before a linear map adds
parameters but no expressiveness. ``P`` are the attention component's persistent tokens
(:meth:`CausalSelfAttention.persistent_kv`, no rotary; zero tokens is exactly the variant
without). Only the segment rows are attention queries, so only they are written. Segments never
attend to each other: information crosses segment boundaries only through the memory. The gate
has the same form as ``titans.mag``'s (the paper leaves ``⊗`` open).

**The causality hazard and the choice made here.** The retrieved row ``h_j`` is computed from
segment token ``j``'s own query, so under a plain causal mask over ``[P | h | S]`` every token of a
segment would see the retrieval of *later* tokens of its segment: a leak of the future during
training. This block uses the **diagonal-aligned mask** (option (a) in docs/memory.md, "MAC"):
segment token ``i`` sees every persistent token, the retrieved rows ``j <= i`` and the segment
tokens ``j <= i``. It keeps ``N_l = C`` and the paper's retrieval by the segment's own queries, and
makes the block exactly causal (tested by perturbing later tokens inside a segment). Rotary
positions are counted inside the segment and retrieved row ``j`` shares token ``j``'s position, so
query ``i`` sees both of its partners at the same relative distance ``i - j``.

**State.** A sequence may be split anywhere, mid-segment included. :class:`MACState` carries the
memory layer's state, the fast weights at the current segment's start (the remaining tokens of the
segment still retrieve with them), and the attention keys/values of the segment's tokens and of
their retrieved rows so far. The position inside the segment is the cache length
(:attr:`MACState.filled`). When a segment completes, the caches are emptied: generation holds at
most ``segment_len - 1`` cached tokens per layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge import option
from memforge.capabilities import require
from memforge.engine.static_chunk import clone_tree, copy_into
from memforge.errors import InputError
from memforge.interfaces import (
    ComposesAttention,
    DecodesMemoryStatically,
    MemoryLayer,
    ReadsMemory,
    ReadsMemoryStatically,
    StaticDecodeStart,
)
from memforge.linear import Linear
from memforge.nn import attend, attend_visible, batch_persistent_kv, causal_mask
from memforge_titans.mag import check_hidden, check_state


@attrs.frozen(kw_only=True)
class MACIntegrationConfig:
    """Memory as context (``titans.mac``): segment-local attention over retrieved memory."""

    # Segment attention is quadratic in segment_len; the chunk bound is the other integrations'.
    segment_len: int = option(64, ge=1, le=65536, typical=(1, 128),
                              help="tokens per segment (attention span, retrieval unit); a "
                                   "multiple of the memory layer's chunk_size")


class MACState(NamedTuple):
    """State of a :class:`MACBlock` between calls on the same sequences.

    Attributes:
        memory: the memory layer's state (``None`` before the first token).
        segment_weights: the memory layer's snapshot (:meth:`ReadsMemory.read_state`; for the
            Titans layer its fast weights) at the start of the current segment, what its
            remaining tokens retrieve with; ``None`` at a segment boundary.
        keys: ``[B, H, r, d]`` attention keys of the ``r`` tokens of the current segment so far.
        values: ``[B, H, r, d]``, matching ``keys``.
        retrieved_keys: ``[B, H, r, d]`` keys of those tokens' retrieved rows.
        retrieved_values: ``[B, H, r, d]``, matching ``retrieved_keys``.
    """

    memory: Any | None
    segment_weights: Any | None
    keys: Tensor
    values: Tensor
    retrieved_keys: Tensor
    retrieved_values: Tensor

    @property
    def filled(self) -> int:
        """Tokens of the current segment already read (the position inside the segment)."""
        return self.keys.shape[2]


class MACDecodeBuffers(NamedTuple):
    """What a fixed-shape decode of a :class:`MACBlock` keeps (changed in place).

    Attributes:
        memory: the memory layer's decode buffers.
        segment_weights: the memory snapshot at the start of the current segment (what it
            retrieves with).
        keys: ``[B, H, segment_len, d]`` attention keys of the segment's tokens; rows at and past
            ``filled`` are stale and masked.
        values: matching ``keys``.
        retrieved_keys: keys of the tokens' retrieved rows, same layout.
        retrieved_values: matching ``retrieved_keys``.
        persistent: the persistent tokens' keys and values ``[B, H, P, d]``, or ``None``.
        filled: tokens of the current segment so far (0-d long tensor).
    """

    memory: Any
    segment_weights: Any
    keys: Tensor
    values: Tensor
    retrieved_keys: Tensor
    retrieved_values: Tensor
    persistent: tuple[Tensor, Tensor] | None
    filled: Tensor


def mac_mask(queries: int, filled: int, persistent: int, device: torch.device | None = None) -> Tensor:
    """The diagonal-aligned MAC mask ``[queries, persistent + 2 * (filled + queries)]``.

    Columns are ``[persistent | retrieved rows | segment tokens]`` of the segment so far; query
    ``i`` (segment position ``filled + i``) sees every persistent column and the retrieved rows and
    tokens at positions ``<= filled + i``. ``True`` = may attend.
    """
    within = causal_mask(queries, filled + queries, device=device)
    return torch.cat([within.new_ones(queries, persistent), within, within], dim=1)


def check_parts(attention: nn.Module, memory: nn.Module, where: str) -> None:
    """Raise :class:`~memforge.errors.SpecError` unless ``attention`` composes
    (:class:`~memforge.interfaces.ComposesAttention`) and ``memory`` reads without writing
    (:class:`~memforge.interfaces.ReadsMemory`), naming ``where`` (``"titans.mac (layer 1)"``)."""
    require(attention, ComposesAttention, needed_by=where,
            fix="choose a full attention that has them (e.g. baseline.causal)")
    require(memory, ReadsMemory, needed_by=where,
            fix="choose a memory_layer that reads without writing (e.g. titans.neural_memory) or "
                "another integration (titans.mag, titans.mal, titans.lmm)")


class MACBlock(nn.Module):
    """Memory-as-Context block: ``forward(hidden [B, T, D], state) -> (hidden, MACState)``.

    The ``titans.mac`` factory checks the capabilities below (:func:`check_parts`) before it
    builds the block.

    Args:
        dim: model width ``D``.
        heads: heads ``H`` of the retrieval queries (the memory layer's read takes ``[B, H, T, d]``).
        attention: a full-attention component with the ``ComposesAttention`` capability
            (``project_qkv``, ``persistent_kv``, ``output``); MAC applies its own segment mask.
        memory: any memory layer with the ``ReadsMemory`` capability (MAC retrieves through
            ``read_state`` and ``read`` only).
        feedforward: the position-wise MLP.
        segment_len: tokens per segment ``C``; the memory's chunk size must divide it.
    """

    def __init__(self, dim: int, heads: int, attention: nn.Module, memory: MemoryLayer,
                 feedforward: nn.Module, *, segment_len: int) -> None:
        super().__init__()
        if getattr(attention, "window", None) is not None:
            raise ValueError("titans.mac attends inside each segment (segment_len bounds the span); "
                             "use full attention (baseline.causal), not a sliding window")
        if segment_len < 1 or segment_len % memory.chunk_size:
            raise ValueError(f"segment_len={segment_len} must be a positive multiple of the memory "
                             f"chunk_size={memory.chunk_size}")
        self.dim, self.segment_len = dim, segment_len
        self.heads, self.head_dim = heads, dim // heads
        self.attention = attention
        self.memory = memory
        self.feedforward = feedforward
        self.mixer_norm = nn.RMSNorm(dim)
        self.query_proj = Linear(dim, dim, bias=False)
        self.retrieved_norm = nn.RMSNorm(self.head_dim)
        self.write_norm = nn.RMSNorm(dim)
        self.attention_out_norm = nn.RMSNorm(dim)
        self.memory_out_norm = nn.RMSNorm(dim)
        self.out_proj = Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, segment_len={self.segment_len}"

    def forward(self, hidden: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        """``[B, T, D] -> [B, T, D]`` continuing from ``state`` (``None``: new sequences)."""
        check_hidden(hidden, self.dim, "titans.mac")
        batch, steps, _ = hidden.shape
        state = self._empty_state(hidden) if state is None else self._check_state(state, batch)
        x = self.mixer_norm(hidden)
        queries = self._queries(x)
        prefix = self.attention.persistent_kv()
        sizes = _piece_sizes(state.filled, steps, self.segment_len)
        attended, read = [], []
        # split (not slicing in the loop): one concatenating backward instead of one per piece.
        for piece in zip(x.split(sizes, dim=1), queries.split(sizes, dim=2), strict=True):
            y, m, state = self._segment_piece(*piece, prefix, state)
            attended.append(y)
            read.append(m)
        return self._output(hidden, _join(attended), _join(read)), state

    def _segment_piece(self, x: Tensor, queries: Tensor, prefix: tuple[Tensor, Tensor] | None,
                       state: MACState) -> tuple[Tensor, Tensor, MACState]:
        """Read ``x`` ``[B, n, D]`` lying inside one segment; returns ``(y, M*(y), state)``, ``[B, n, D]``."""
        (batch, n, _), filled = x.shape, state.filled
        weights = state.segment_weights if filled else self.memory.read_state(state.memory, batch)
        retrieved = self._retrieve(queries, weights)
        # Token j and its retrieved row share position j: one projection call for both.
        q, k, v = self.attention.project_qkv(torch.cat((x, retrieved)),
                                             torch.arange(filled, filled + n, device=x.device))
        q = q[:batch]
        (k, retrieved_k), (v, retrieved_v) = k.split(batch), v.split(batch)
        keys, values = _append(state.keys, k), _append(state.values, v)
        retrieved_keys = _append(state.retrieved_keys, retrieved_k)
        retrieved_values = _append(state.retrieved_values, retrieved_v)
        all_k, all_v, persistent = [retrieved_keys, keys], [retrieved_values, values], 0
        if prefix is not None:
            persistent = prefix[0].shape[2]
            all_k.insert(0, prefix[0].expand(batch, -1, -1, -1))
            all_v.insert(0, prefix[1].expand(batch, -1, -1, -1))
        # A lone query is the newest token: it sees everything, so it needs no mask (decoding).
        mask = None if n == 1 else mac_mask(n, filled, persistent, device=x.device)
        o = attend(q, torch.cat(all_k, 2), torch.cat(all_v, 2), mask)
        y = self.attention.output(o)
        m, memory = self.memory(self.write_norm(y), state.memory)
        if filled + n == self.segment_len:  # segment done: later tokens see none of it
            empty = keys.new_zeros(batch, self.heads, 0, self.head_dim)
            return y, m, MACState(memory, None, empty, empty, empty, empty)
        return y, m, MACState(memory, weights, keys, values, retrieved_keys, retrieved_values)

    # -- fixed-shape decoding (memforge.decoding.StaticDecoder) -----------------------------------
    def static_decode_start(self, state: MACState, batch: int, capacity: int) -> StaticDecodeStart:
        """Buffers for decoding on from ``state``: the segment caches at full ``segment_len`` (the
        part not yet filled is masked), the memory's own buffers, the persistent keys and values
        (fixed while decoding) and the segment position. Cycles: the memory chunk, the segment.
        Nothing grows with the length, so ``capacity`` does not matter."""
        state = None if state is None else self._check_state(state, batch)
        if state is None or state.memory is None:
            raise InputError("titans.mac decodes on from a state; read at least one token first")
        require(self.memory, DecodesMemoryStatically, needed_by="fixed-shape decoding of titans.mac",
                fix="use generate(..., compile=False)", error=InputError)
        require(self.memory, ReadsMemoryStatically, needed_by="fixed-shape decoding of titans.mac",
                fix="use generate(..., compile=False)", error=InputError)
        filled = state.filled

        def cache(rows: Tensor) -> Tensor:
            buffer = rows.new_zeros(batch, self.heads, self.segment_len, self.head_dim)
            buffer[:, :, :filled] = rows
            return buffer

        weights = state.segment_weights if filled else self.memory.read_state(state.memory, batch)
        buffers = MACDecodeBuffers(
            memory=self.memory.static_decode_buffers(state.memory, batch),
            segment_weights=clone_tree(weights),
            keys=cache(state.keys), values=cache(state.values),
            retrieved_keys=cache(state.retrieved_keys), retrieved_values=cache(state.retrieved_values),
            persistent=batch_persistent_kv(self.attention, batch, state.keys.dtype),
            filled=torch.tensor(filled, device=state.keys.device),
        )
        phases = (self.memory.static_decode_phase(state.memory), filled)
        return StaticDecodeStart(buffers, phases, (self.memory.chunk_size, self.segment_len))

    def static_decode_step(self, hidden: Tensor, buffers: MACDecodeBuffers,
                           completes: tuple[bool, ...]) -> Tensor:
        """One token ``hidden`` ``[B, 1, D]`` on ``buffers`` (updated in place); equals
        :meth:`forward` on it. ``completes``: (the memory chunk, the segment) end with this token."""
        completes_chunk, completes_segment = completes
        batch = hidden.shape[0]
        x = self.mixer_norm(hidden)
        retrieved = self._retrieve(self._queries(x), buffers.segment_weights)
        position = buffers.filled.view(1)
        q, k, v = self.attention.project_qkv(torch.cat((x, retrieved)), position)
        for cache, rows in ((buffers.keys, k[:batch]), (buffers.values, v[:batch]),
                            (buffers.retrieved_keys, k[batch:]), (buffers.retrieved_values, v[batch:])):
            cache.index_copy_(2, position, rows)
        # The newest token sees the persistent tokens and every filled row; the rest is stale.
        filled_rows = torch.arange(self.segment_len, device=hidden.device) <= buffers.filled
        o = attend_visible(q[:batch], buffers.persistent,
                           [buffers.retrieved_keys, buffers.keys],
                           [buffers.retrieved_values, buffers.values], [filled_rows, filled_rows])
        y = self.attention.output(o)
        m = self.memory.static_decode_step(self.write_norm(y), buffers.memory, completes_chunk)
        if completes_segment:
            # A segment ends with a chunk (chunk_size divides segment_len): the memory as it
            # stands is the next segment's snapshot, and its rows start again at 0.
            copy_into(buffers.segment_weights, self.memory.static_read_state(buffers.memory))
            buffers.filled.zero_()
        else:
            buffers.filled.add_(1)
        return self._output(hidden, y, m)

    # -- the parts forward and the decode step share ---------------------------------------------
    # Only the attention over [persistent | retrieved | segment] differs between the two: forward
    # concatenates the segment's rows as they come, a decode step writes one row into buffers of
    # the segment's full length and masks the rest.
    def _queries(self, x: Tensor) -> Tensor:
        """Retrieval queries ``[B, H, T, d]`` of the normalised input ``x`` ``[B, T, D]``."""
        return F.normalize(F.silu(self._split_heads(self.query_proj(x))), dim=-1)

    def _output(self, hidden: Tensor, y: Tensor, m: Tensor) -> Tensor:
        """The block's output from the attention ``y`` and the memory's read of it ``m``: the
        gate, the residual and the feed-forward."""
        gated = self.attention_out_norm(y) * torch.sigmoid(self.memory_out_norm(m))
        hidden = hidden + self.out_proj(gated)
        return hidden + self.feedforward(self.ffn_norm(hidden))

    def _retrieve(self, queries: Tensor, weights: Any) -> Tensor:
        """Context tokens ``[B, n, D]`` read from the memory snapshot ``weights`` with ``queries``
        ``[B, H, n, d]``."""
        read = self.retrieved_norm(self.memory.read(queries, weights))
        return read.transpose(1, 2).flatten(2)

    def _split_heads(self, x: Tensor) -> Tensor:
        # [B, T, D] -> [B, H, T, d]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _empty_state(self, hidden: Tensor) -> MACState:
        empty = hidden.new_zeros(hidden.shape[0], self.heads, 0, self.head_dim)
        return MACState(None, None, empty, empty, empty, empty)

    def _check_state(self, state: MACState, batch: int) -> MACState:
        state = check_state(state, MACState, "titans.mac")
        expected = (batch, self.heads, state.filled, self.head_dim)
        for name in ("keys", "values", "retrieved_keys", "retrieved_values"):
            cache = getattr(state, name)
            if not isinstance(cache, Tensor) or tuple(cache.shape) != expected:
                got = list(cache.shape) if isinstance(cache, Tensor) else type(cache).__name__
                raise InputError(f"titans.mac state {name} {got} does not fit this block and batch "
                                 f"{batch} (expected {list(expected)}); pass the state returned "
                                 f"for these same sequences")
        if state.filled >= self.segment_len \
                or (state.segment_weights is not None) != bool(state.filled) \
                or (state.filled and state.memory is None):
            raise InputError(f"titans.mac state is inconsistent (position {state.filled} in a "
                             f"segment of {self.segment_len}); pass the state this block returned")
        return state


def _piece_sizes(filled: int, steps: int, segment_len: int) -> list[int]:
    """Split ``steps`` tokens that start ``filled`` tokens into a segment at segment boundaries."""
    sizes, room = [], segment_len - filled
    while steps:
        sizes.append(min(room, steps))
        steps -= sizes[-1]
        room = segment_len
    return sizes


def _append(cache: Tensor, new: Tensor) -> Tensor:
    """``cache`` ``[B, H, r, d]`` followed by ``new`` along time."""
    return torch.cat((cache, new), 2) if cache.shape[2] else new


def _join(pieces: list[Tensor]) -> Tensor:
    """The pieces joined along time; a lone piece as it is (decoding: no copy per token)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
