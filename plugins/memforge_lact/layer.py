"""The LaCT memory layer (docs/zoo.md, "LaCT"): projections around the large-chunk fast path.

Per token ``x_t`` ``[D]`` and head (the LaCT code's layer, without its in-layer attention, which
memforge's ``lact.block`` puts beside the layer, and without rotary positions on the fast
queries and keys, which the code's author reports also work)::

    q, k, v = silu(x W_qkv)                      # per head, width d
    q, k    = q / (|q| + 1e-5), k / (|k| + 1e-5)
    eta     = softplus(x W_lr + b_lr + softplus^-1(base_lr))     # [H, 3]: steps of W0, W1, W2
    mu      = sigmoid(x W_mu + b_mu)             # momentum gate (optional)
    o       = f_W(q)                              # the chunk-start fast weights (memforge_lact.ops)
    y       = W_out concat_h(RMSNorm(o) * silu(x W_s + b_s))   # the scale is optional

The fast weights start from learned ``[H, ...]`` parameters, the same for every sequence.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge import Linear, checks_values
from memforge.errors import InputError, NonFiniteError
from memforge.interfaces import RuleDescription
from memforge.nn import RMSNorm
from memforge_lact.ops import (
    MUON_COEFFICIENTS,
    ChunkConfig,
    FastWeights,
    Pending,
    apply,
    apply_pending,
    chunk_update,
    lact_scan,
    normalize_rows,
)

#: Added to |q| and |k| before dividing (the public code's value).
QK_EPS = 1e-5
#: Standard deviation of the projections' normal initialisation (small reads at the start).
INIT_STD = 0.02


class LaCTState(NamedTuple):
    """State of a :class:`LaCTLayer` between calls on the same sequences.

    Attributes:
        weights: the fast weights ``(w02 [B, H, d, 2h], w1 [B, H, h, d])`` at the start of the
            chunk the pending tokens belong to.
        momentum: the momentum of both, same shapes, or ``None`` without momentum.
        keys: ``[B, H, p, d]`` the pending tokens' keys (``0 <= p <= chunk_size``).
        values: ``[B, H, p, d]``.
        lr: ``[B, H, p, 3]`` their steps.
        gate: ``[B, H, p]`` their momentum gates, or ``None`` without momentum.
    """

    weights: tuple[Tensor, Tensor]
    momentum: tuple[Tensor, Tensor] | None
    keys: Tensor
    values: Tensor
    lr: Tensor
    gate: Tensor | None


class LaCTDecodeBuffers(NamedTuple):
    """Fixed-shape buffers of a decode (changed in place): weights and momentum as in
    :class:`LaCTState`, the current chunk's rows at full chunk size, and ``filled`` (0-d long),
    the rows written so far."""

    weights: tuple[Tensor, Tensor]
    momentum: tuple[Tensor, Tensor] | None
    keys: Tensor
    values: Tensor
    lr: Tensor
    gate: Tensor | None
    filled: Tensor


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class LaCTLayer(nn.Module):
    """Large-chunk test-time training with SwiGLU fast weights: ``forward(x, state)``.

    A :class:`memforge.interfaces.MemoryLayer` with ``ReadsMemory``, ``DecodesMemoryStatically``
    and ``DescribesRule``.

    Args:
        dim: model width ``D``.
        heads: heads ``H``, each with its own fast weights on ``d = D // H`` channels.
        chunk_size: tokens per update ``c``.
        expansion: the fast weights' hidden width ``h = round(d * expansion)``.
        base_lr: the initial step ``eta``.
        momentum: momentum with a learned gate, averaged over each chunk.
        muon: the Newton-Schulz coefficients (a key of ``MUON_COEFFICIENTS``), or ``None``.
        renormalize: rescale each output row to its norm at the sequence start after an update.
        output_scale: the per-head SiLU scale of the read.
        norm_eps: epsilon of the per-head output RMSNorm.
    """

    def __init__(self, dim: int, heads: int, *, chunk_size: int = 2048, expansion: float = 1.0,
                 base_lr: float = 1e-3, momentum: bool = True, muon: str | None = None,
                 renormalize: bool = True, output_scale: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        head = dim // heads
        hidden = round(head * expansion)
        if chunk_size < 1 or hidden < 1:
            raise ValueError(f"chunk_size={chunk_size} and the hidden width {hidden} must be >= 1")
        if muon is not None and muon not in MUON_COEFFICIENTS:
            raise ValueError(f"muon={muon!r} must be one of {sorted(MUON_COEFFICIENTS)} or None")
        self.dim, self.heads, self.head_dim, self.hidden = dim, heads, head, hidden
        self.chunk_size, self.use_momentum, self.muon = chunk_size, momentum, muon
        self.renormalize = renormalize
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.lr_proj = Linear(dim, 3 * heads)
        self.lr_offset = _inv_softplus(base_lr)
        self.momentum_proj = Linear(dim, heads) if momentum else None
        self.scale_proj = Linear(dim, heads) if output_scale else None
        self.out_norm = RMSNorm(head, eps=norm_eps)
        self.out_proj = Linear(dim, dim, bias=False)
        for module in self.modules():
            if isinstance(module, Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The code's initialisation: W0, W2 ~ N(0, 1/d), W1 ~ N(0, 1/h), stored input-major.
        self.w02 = nn.Parameter(torch.randn(heads, head, 2 * hidden) / math.sqrt(head))
        self.w1 = nn.Parameter(torch.randn(heads, hidden, head) / math.sqrt(hidden))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, hidden={self.hidden}, chunk_size={self.chunk_size}, "
                f"momentum={self.use_momentum}, muon={self.muon}, renormalize={self.renormalize}")

    def describe_rule(self) -> RuleDescription:
        """The rule in words (:class:`memforge.interfaces.DescribesRule`). Tier ``rule-specific``:
        every gradient is taken at the chunk-start weights and momentum, Muon and renormalisation
        act once per chunk; at chunk size 1 that is the exact token recurrence."""
        optimizer = "gradient summed over the chunk"
        if self.use_momentum:
            optimizer += " + momentum (chunk-mean gate)"
        if self.muon is not None:
            optimizer += f" + Muon ({self.muon} coefficients)"
        one = self.chunk_size == 1
        return RuleDescription(
            objective="negative dot product -eta_t <f_W(k_t), v_t> (SwiGLU f_W)",
            retention="rows renormalised to their initial norms" if self.renormalize else "none",
            optimizer=optimizer,
            schedule="token by token" if one else f"chunks of {self.chunk_size}, apply then update",
            tier="token-exact" if one else "rule-specific",
            executor="lact.large_chunk")

    # -- input checks --------------------------------------------------------------------------
    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"lact.layer expects hidden states [batch, time, {self.dim}], got {shape}")
        if not x.dtype.is_floating_point:
            raise InputError(f"lact.layer expects floating-point hidden states, got {x.dtype}")
        if checks_values(x) and not bool(torch.isfinite(x).all()):
            raise NonFiniteError("lact.layer got non-finite hidden states (NaN or inf): the inputs "
                                 "hold them or the activations overflowed before this layer; check "
                                 "the inputs and the learning rate")

    def _check_state(self, state: Any, batch: int) -> LaCTState:
        if not isinstance(state, LaCTState):
            raise InputError(f"lact.layer state must be the LaCTState it returned, got "
                             f"{type(state).__name__}")
        b, h, d, hid = batch, self.heads, self.head_dim, self.hidden
        p = state.keys.shape[2] if state.keys.ndim == 4 else -1
        expected = {"weights[0]": (state.weights[0], (b, h, d, 2 * hid)),
                    "weights[1]": (state.weights[1], (b, h, hid, d)),
                    "keys": (state.keys, (b, h, p, d)), "values": (state.values, (b, h, p, d)),
                    "lr": (state.lr, (b, h, p, 3))}
        if self.use_momentum:
            if state.momentum is None or state.gate is None:
                raise InputError("lact.layer state has no momentum, but this layer uses momentum; "
                                 "pass the state this layer returned for these sequences")
            expected |= {"momentum[0]": (state.momentum[0], (b, h, d, 2 * hid)),
                         "momentum[1]": (state.momentum[1], (b, h, hid, d)),
                         "gate": (state.gate, (b, h, p))}
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape or not 0 <= p <= self.chunk_size:
                raise InputError(f"lact.layer state does not fit this layer and batch {batch}: "
                                 f"{name} is {list(tensor.shape)}, expected {list(shape)} with at "
                                 f"most {self.chunk_size} pending tokens; pass the state returned "
                                 f"for these same sequences by this layer")
        return state

    # -- parts -----------------------------------------------------------------------------------
    def _config(self, batch: int) -> ChunkConfig:
        norms = None
        if self.renormalize:
            norms = FastWeights(torch.linalg.vector_norm(self.w02, dim=-2, keepdim=True).repeat(batch, 1, 1),
                                torch.linalg.vector_norm(self.w1, dim=-2, keepdim=True).repeat(batch, 1, 1))
        return ChunkConfig(self.chunk_size, norms,
                           None if self.muon is None else MUON_COEFFICIENTS[self.muon])

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``q, k, v`` ``[B, H, T, d]``, ``lr`` ``[B, H, T, 3]``, ``gate`` ``[B, H, T]`` (or ``None``)."""
        q, k, v = F.silu(self.qkv(x)).unflatten(-1, (3, self.heads, self.head_dim)).permute(
            2, 0, 3, 1, 4).unbind(0)
        q, k = normalize_rows(q, QK_EPS), normalize_rows(k, QK_EPS)
        lr = F.softplus(self.lr_proj(x) + self.lr_offset).unflatten(-1, (self.heads, 3)).transpose(1, 2)
        gate = (None if self.momentum_proj is None
                else torch.sigmoid(self.momentum_proj(x)).transpose(1, 2))
        return q, k, v, lr, gate

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head reads ``o`` ``[B, H, T, d]`` normalised, scaled, merged and projected."""
        y = self.out_norm(o)
        if self.scale_proj is not None:
            y = y * F.silu(self.scale_proj(x)).transpose(1, 2)[..., None]
        return self.out_proj(y.transpose(1, 2).flatten(2))

    def initial_state(self, batch: int, like: Tensor) -> LaCTState:
        """The state of ``batch`` new sequences: the learned weights, zero momentum, nothing pending."""
        h, d = self.heads, self.head_dim
        weights = (self.w02.to(like.dtype).expand(batch, -1, -1, -1),
                   self.w1.to(like.dtype).expand(batch, -1, -1, -1))
        momentum = tuple(torch.zeros_like(w) for w in weights) if self.use_momentum else None
        empty = like.new_zeros(batch, h, 0, d)
        return LaCTState(weights, momentum, empty, empty, like.new_zeros(batch, h, 0, 3),
                         like.new_zeros(batch, h, 0) if self.use_momentum else None)

    # -- the layer -------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: LaCTState | None = None) -> tuple[Tensor, LaCTState]:
        """Read and write ``x`` ``[B, T, D]``; returns ``(y [B, T, D], state)``."""
        self._check_input(x)
        batch, steps, _ = x.shape
        state = self.initial_state(batch, x) if state is None else self._check_state(state, batch)
        if steps == 0:
            return x.new_zeros(x.shape), state
        q, k, v, lr, gate = self._tokens(x)
        n = batch * self.heads

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(n, *t.shape[2:])

        weights = FastWeights(*(flat(w.to(x.dtype)) for w in state.weights))
        momentum = None if state.momentum is None else FastWeights(*(flat(m) for m in state.momentum))
        pending = Pending(flat(state.keys), flat(state.values), flat(state.lr), flat(state.gate))
        o, weights, momentum, pending = lact_scan(weights, momentum, pending, flat(q), flat(k),
                                                  flat(v), flat(lr), flat(gate), self._config(batch))

        def unflat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(batch, self.heads, *t.shape[1:])

        y = self._output(unflat(o), x)
        return y, LaCTState(tuple(unflat(w) for w in weights),
                            None if momentum is None else tuple(unflat(m) for m in momentum),
                            *(unflat(t) for t in pending))

    def reference_forward(self, x: Tensor, state: LaCTState | None = None) -> tuple[Tensor, LaCTState]:
        """This layer token by token in float64 (:mod:`memforge_lact.reference`): the conformance
        kit's reference for outputs and gradients."""
        from memforge_lact.reference import layer_token_loop  # it imports this module

        return layer_token_loop(self, x, state)

    # -- read-only access (ReadsMemory: titans.mac retrieves without writing) ---------------------
    def _flush(self, state: LaCTState, batch: int) -> tuple[FastWeights, FastWeights | None]:
        """The weights and momentum (``[N, ...]``) after the pending tokens' update; pure."""
        n = batch * self.heads

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(n, *t.shape[2:])

        momentum = None if state.momentum is None else FastWeights(*map(flat, state.momentum))
        pending = Pending(*map(flat, (state.keys, state.values, state.lr, state.gate)))
        return apply_pending(FastWeights(*map(flat, state.weights)), momentum, pending,
                             self._config(batch))

    def read_state(self, state: LaCTState | None, batch: int) -> tuple[Tensor, Tensor]:
        """The fast weights ``(w02 [B, H, d, 2h], w1 [B, H, h, d])`` after every token ``state``
        has read, the pending ones' update applied; pure."""
        if state is None:
            return (self.w02.expand(batch, -1, -1, -1), self.w1.expand(batch, -1, -1, -1))
        weights, _ = self._flush(self._check_state(state, batch), batch)
        return tuple(w.reshape(batch, self.heads, *w.shape[1:]) for w in weights)

    def read(self, queries: Tensor, snapshot: tuple[Tensor, Tensor]) -> Tensor:
        """``f_W(q)`` for queries ``[B, H, T, d]`` with the snapshot's weights: ``[B, H, T, d]``."""
        w02, w1 = (w.to(queries.dtype) for w in snapshot)
        return apply(FastWeights(w02, w1), queries)

    # -- fixed-shape decoding (compiled generation) ----------------------------------------------
    def static_decode_buffers(self, state: LaCTState, batch: int) -> LaCTDecodeBuffers:
        """Copies of ``state`` with the chunk's rows at full size (a full pending chunk applied
        first, so the decode starts at phase 0 of a new chunk)."""
        state = self._check_state(state, batch)
        if state.keys.shape[2] == self.chunk_size:
            weights, momentum = self._flush(state, batch)

            def unflat(t: Tensor) -> Tensor:
                return t.reshape(batch, self.heads, *t.shape[1:])

            state = self.initial_state(batch, state.keys)._replace(
                weights=tuple(map(unflat, weights)),
                momentum=None if momentum is None else tuple(map(unflat, momentum)))
        filled = state.keys.shape[2]

        def rows(t: Tensor) -> Tensor:
            full = t.new_zeros(*t.shape[:2], self.chunk_size, *t.shape[3:])
            full[:, :, :filled] = t
            return full

        return LaCTDecodeBuffers(
            tuple(w.clone() for w in state.weights),
            None if state.momentum is None else tuple(m.clone() for m in state.momentum),
            rows(state.keys), rows(state.values), rows(state.lr),
            None if state.gate is None else rows(state.gate),
            torch.tensor(filled, device=state.keys.device))

    def static_decode_phase(self, state: LaCTState) -> int:
        """Tokens of the current chunk ``state`` has read (a full chunk counts as 0)."""
        return state.keys.shape[2] % self.chunk_size

    def static_decode_step(self, x: Tensor, buffers: LaCTDecodeBuffers, completes_chunk: bool
                           ) -> Tensor:
        """One token ``x`` ``[B, 1, D]``: read with the chunk-start weights, write the token's
        row, and apply the chunk's update when ``completes_chunk``; equals :meth:`forward`."""
        batch = x.shape[0]
        q, k, v, lr, gate = self._tokens(x)
        w02, w1 = buffers.weights
        o = apply(FastWeights(w02.to(x.dtype), w1.to(x.dtype)), q)           # [B, H, 1, d]
        index = buffers.filled.reshape(1)
        for buffer, row in ((buffers.keys, k), (buffers.values, v), (buffers.lr, lr),
                            (buffers.gate, gate)):
            if buffer is not None:
                buffer.index_copy_(2, index, row.to(buffer.dtype))
        buffers.filled.add_(1)
        if completes_chunk:
            n = batch * self.heads

            def flat(t: Tensor | None) -> Tensor | None:
                return None if t is None else t.reshape(n, *t.shape[2:])

            momentum = (None if buffers.momentum is None
                        else FastWeights(*(flat(m) for m in buffers.momentum)))
            weights, momentum = chunk_update(
                FastWeights(flat(w02), flat(w1)), momentum, flat(buffers.keys), flat(buffers.values),
                flat(buffers.lr), flat(buffers.gate), self._config(batch))
            for old, new in zip(buffers.weights, weights, strict=True):
                old.copy_(new.reshape(old.shape))
            if momentum is not None:
                for old, new in zip(buffers.momentum, momentum, strict=True):
                    old.copy_(new.reshape(old.shape))
            buffers.filled.zero_()
        return self._output(o, x)
