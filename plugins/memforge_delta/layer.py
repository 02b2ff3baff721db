"""The DeltaNet / Gated DeltaNet memory layer (docs/delta.md, "The memory layers").

The Gated DeltaNet layer of Yang, Kautz and Hatamizadeh (2025), per token ``x_t`` ``[D]``::

    q, k, v = split(SiLU(conv(x W_qkv)))          # causal depthwise conv of conv_size taps
    q, k    = l2norm(q), l2norm(k)                # per head
    beta    = sigmoid(x W_beta)                   # per head, in (0, 1)
    g       = -exp(A_log) * softplus(x W_a + dt_bias)   # per head, log-decay <= 0 (GDN only)
    S_t     = e^g S_{t-1} + beta k (v - e^g S_{t-1}^T k)^T,   o_t = S_t^T q
    y       = (RMSNorm_head(o) * SiLU(x W_gate)) W_out

DeltaNet is the same layer with ``g = 0`` (no ``W_a``, ``A_log``, ``dt_bias``). The recurrence runs
through the WY kernel (:mod:`memforge_delta.ops`), which is token-exact at every kernel chunk
size, so the layer reports ``chunk_size = 1`` to the framework: a sequence may be cut, decoded or
segmented (MAC) at any token.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge import Linear, checks_values
from memforge.errors import InputError, NonFiniteError
from memforge.interfaces import MemoryRecorder, RuleDescription
from memforge.nn import RMSNorm, causal_depthwise_conv
from memforge_delta.ops import delta_rule, gated_delta_rule

#: The eps of the l2 normalisation of q and k (a zero vector stays zero).
L2_EPS = 1e-6
#: Standard deviation of the projections' normal initialisation, as in the paper's code (FLA's
#: ``initializer_range``): the layer starts with a small output, and trains far faster than
#: with ``nn.Linear``'s uniform initialisation (docs/delta.md, "The memory layers").
INIT_STD = 0.02


class DeltaState(NamedTuple):
    """State of a :class:`DeltaLayer` between calls on the same sequences.

    Attributes:
        memory: ``S`` ``[B, H, d_k, d_v]``, the memory after every token read so far.
        conv: ``[B, 3 D, conv_size - 1]``, the last projected inputs of the short convolution.
    """

    memory: Tensor
    conv: Tensor


class DeltaDecodeBuffers(NamedTuple):
    """Fixed-shape buffers of a decode (copies of a :class:`DeltaState`, changed in place)."""

    memory: Tensor
    conv: Tensor


class DeltaLayer(nn.Module):
    """DeltaNet (``gated=False``) or Gated DeltaNet (``gated=True``): ``forward(x, state)``.

    A :class:`memforge.interfaces.MemoryLayer` with ``ReadsMemory``, ``DecodesMemoryStatically``,
    ``ReadsMemoryStatically``, ``InspectsMemory`` and ``DescribesRule``.

    Args:
        dim: model width ``D``.
        heads: heads ``H``; each has a ``d x d`` memory, ``d = D // H``.
        gated: Gated DeltaNet's data-dependent decay (else ``g = 0``: DeltaNet).
        kernel_chunk: tokens per chunk of the WY kernel (any; the result does not depend on it).
        conv_size: taps of the causal depthwise convolution on ``q, k, v``.
        norm_eps: epsilon of the per-head output RMSNorm.
        decay_range: ``(min, max)`` of the initial decay rates ``A = exp(A_log)``.
        dt_range: ``(min, max)`` of the initial time steps ``softplus(dt_bias)``.
    """

    #: Token-exact at every kernel chunk, so the framework's cycle is one token.
    chunk_size = 1
    _memory_recorder: MemoryRecorder | None = None

    def __init__(self, dim: int, heads: int, *, gated: bool, kernel_chunk: int = 64,
                 conv_size: int = 4, norm_eps: float = 1e-6,
                 decay_range: tuple[float, float] = (1.0, 16.0),
                 dt_range: tuple[float, float] = (0.001, 0.1)) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        if kernel_chunk < 1 or conv_size < 1:
            raise ValueError(f"kernel_chunk={kernel_chunk} and conv_size={conv_size} must be >= 1")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.gated, self.kernel_chunk, self.conv_size = gated, kernel_chunk, conv_size
        # InspectsMemory (docs/inspect.md): decay is 1 - exp(g), the share of S forgotten.
        self.inspect_series = ("step_size", *(("decay",) if gated else ()), "state_norm",
                               "read_output")
        self.qkv = Linear(dim, 3 * dim, bias=False)
        # Depthwise over the concatenated q, k, v channels: the same as three separate short convs.
        # The module holds the taps; the product is causal_depthwise_conv on the rows as they lie.
        self.conv = nn.Conv1d(3 * dim, 3 * dim, conv_size, groups=3 * dim, bias=False)
        self.beta_proj = Linear(dim, heads, bias=False)
        if gated:
            self.decay_proj = Linear(dim, heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(heads).uniform_(*decay_range).log())
            # dt_bias = softplus^{-1}(dt) with dt log-uniform in dt_range (Mamba2's initialisation).
            dt = torch.empty(heads).uniform_(math.log(dt_range[0]), math.log(dt_range[1])).exp()
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.out_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.out_gate = Linear(dim, dim, bias=False)
        self.out_proj = Linear(dim, dim, bias=False)
        for module in self.modules():
            if isinstance(module, Linear):
                nn.init.normal_(module.weight, std=INIT_STD)

    # -- input checks --------------------------------------------------------------------------
    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"delta memory layer expects hidden states [batch, time, {self.dim}], "
                             f"got {shape}")
        if not x.dtype.is_floating_point:
            raise InputError(f"delta memory layer expects floating-point hidden states, got {x.dtype}")
        if checks_values(x) and not bool(torch.isfinite(x).all()):
            raise NonFiniteError("delta memory layer got non-finite hidden states (NaN or inf): the "
                                 "inputs hold them or the activations overflowed before this "
                                 "layer; check the inputs and the learning rate")

    def _check_state(self, state: Any, batch: int) -> DeltaState:
        expected = {"memory": (batch, self.heads, self.head_dim, self.head_dim),
                    "conv": (batch, 3 * self.dim, self.conv_size - 1)}
        if not isinstance(state, DeltaState):
            raise InputError(f"delta memory layer state must be the DeltaState it returned, got "
                             f"{type(state).__name__}")
        for name, shape in expected.items():
            got = tuple(getattr(state, name).shape)
            if got != shape:
                raise InputError(f"delta memory layer state does not fit this layer and batch "
                                 f"{batch}: {name} is {list(got)}, expected {list(shape)}; pass the "
                                 f"state returned for these same sequences by this layer")
        return state

    # -- the layer -----------------------------------------------------------------------------
    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``beta`` in (0, 1) and the log-decay ``g <= 0`` (``None`` for DeltaNet), ``[..., H]``."""
        beta = torch.sigmoid(self.beta_proj(x))
        if not self.gated:
            return beta, None
        return beta, -self.A_log.exp() * F.softplus(self.decay_proj(x) + self.dt_bias)

    def _qkv(self, mixed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Convolved channels ``[..., 3 D]`` -> per-head ``q, k, v`` ``[..., H, d]`` (SiLU, l2-norm)."""
        q, k, v = F.silu(mixed).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        return F.normalize(q, dim=-1, eps=L2_EPS), F.normalize(k, dim=-1, eps=L2_EPS), v

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head reads ``o`` ``[..., H, d]`` normalised, gated by ``x`` ``[..., D]``, projected."""
        y = self.out_norm(o.to(x.dtype)).flatten(-2)
        return self.out_proj(y * F.silu(self.out_gate(x)))

    def forward(self, x: Tensor, state: DeltaState | None = None) -> tuple[Tensor, DeltaState]:
        """Write ``x`` ``[B, T, D]`` into the memory and read it; returns ``(y, state)``."""
        self._check_input(x)
        batch, steps, _ = x.shape
        if state is None:
            conv_cache = x.new_zeros(batch, 3 * self.dim, self.conv_size - 1)
            memory = None
        else:
            state = self._check_state(state, batch)
            conv_cache, memory = state.conv.to(x.dtype), state.memory
        window = torch.cat([conv_cache.transpose(1, 2), self.qkv(x)], dim=1)   # [B, K-1+T, 3D]
        mixed = causal_depthwise_conv(window, self.conv.weight)
        q, k, v = (t.transpose(1, 2) for t in self._qkv(mixed))                # [B, H, T, d]
        beta, g = (None if t is None else t.transpose(1, 2) for t in self._gates(x))
        start = memory
        if g is None:
            o, memory = delta_rule(q, k, v, beta, memory, chunk_size=self.kernel_chunk)
        else:
            o, memory = gated_delta_rule(q, k, v, beta, g, memory, chunk_size=self.kernel_chunk)
        # A copy in the state's channels-first layout, holding none of the window.
        cache = window[:, window.shape[1] - (self.conv_size - 1):].transpose(1, 2).clone(
            memory_format=torch.contiguous_format)
        y = self._output(o.transpose(1, 2), x)
        if self._memory_recorder is not None:
            self._record(self._memory_recorder, x, start, k, v, beta, g, o)
        return y, DeltaState(memory, cache)

    def reference_forward(self, x: Tensor, state: DeltaState | None = None
                          ) -> tuple[Tensor, DeltaState]:
        """This layer one token at a time in float64 (:mod:`memforge_delta.layer_reference`): the
        conformance kit's reference for outputs and gradients."""
        from memforge_delta.layer_reference import layer_token_loop  # it imports this module

        return layer_token_loop(self, x, state)

    # -- inspection (InspectsMemory) -----------------------------------------------------------
    def set_memory_recorder(self, recorder: MemoryRecorder | None) -> None:
        """Record every later ``forward`` into ``recorder`` (``None``: stop); InspectsMemory."""
        self._memory_recorder = recorder

    @torch.no_grad()
    def _record(self, recorder: MemoryRecorder, x: Tensor, start: Tensor | None, k: Tensor,
                v: Tensor, beta: Tensor, g: Tensor | None, o: Tensor) -> None:
        """The inspected series from detached copies, after the output is made: ``beta``,
        ``1 - exp(g)``, ``||S_t||_F`` by the token recurrence, each head's share of the output."""
        recorder.record("step_size", beta)
        if g is not None:
            recorder.record("decay", -torch.expm1(g))
        batch, _, steps, _ = k.shape
        memory = (start if start is not None
                  else k.new_zeros(batch, self.heads, self.head_dim, self.head_dim)).to(o.dtype)
        norms = []
        for t in range(steps):
            if g is not None:
                memory = g[:, :, t, None, None].exp() * memory
            error = v[:, :, t] - (k[:, :, t, None, :] @ memory).squeeze(-2)
            memory = memory + beta[:, :, t, None, None] * k[:, :, t, :, None] * error[:, :, None, :]
            norms.append(memory.flatten(2).norm(dim=-1))
        recorder.record("state_norm", torch.stack(norms, -1))
        gate = F.silu(self.out_gate(x)).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        heads = self.out_norm(o.to(x.dtype)) * gate                              # [B, H, T, d]
        weight = self.out_proj.weight.unflatten(1, (self.heads, self.head_dim))   # [D, H, d]
        recorder.record("read_output", torch.einsum("bhtd,ehd->bhte", heads, weight))

    # -- read-only access (ReadsMemory: MAC retrieves without writing) -------------------------
    def read_state(self, state: DeltaState | None, batch: int) -> Tensor:
        """The memory ``S`` ``[B, H, d, d]`` after every token ``state`` has read (zeros for
        ``None``); pure."""
        if state is None:
            weight = self.out_proj.weight
            return weight.new_zeros(batch, self.heads, self.head_dim, self.head_dim)
        return self._check_state(state, batch).memory

    def read(self, queries: Tensor, snapshot: Tensor) -> Tensor:
        """``S^T q`` for queries ``[B, H, T, d]``: the raw read ``[B, H, T, d]``; pure."""
        return queries @ snapshot.to(queries.dtype)

    # -- fixed-shape decoding (compiled generation) --------------------------------------------
    def static_decode_buffers(self, state: DeltaState, batch: int) -> DeltaDecodeBuffers:
        """Copies of ``state``'s memory and convolution cache, changed in place by the steps."""
        state = self._check_state(state, batch)
        return DeltaDecodeBuffers(state.memory.clone(), state.conv.clone())

    def static_decode_phase(self, state: DeltaState) -> int:
        """Always 0: the layer's cycle is one token."""
        return 0

    def static_decode_step(self, x: Tensor, buffers: DeltaDecodeBuffers, completes_chunk: bool
                           ) -> Tensor:
        """One token ``x`` ``[B, 1, D]``: the one-token recurrence on ``buffers`` (in place).

        Equals :meth:`forward` on that token with the state the buffers hold. No input checks:
        the decoder feeds the model's own hidden states.
        """
        window = torch.cat([buffers.conv.to(x.dtype), self.qkv(x).transpose(1, 2)], dim=2)
        mixed = causal_depthwise_conv(window.mT, self.conv.weight)[:, 0]       # [B, 3D]
        buffers.conv.copy_(window[:, :, 1:])
        memory = buffers.memory
        q, k, v = (t.to(memory.dtype) for t in self._qkv(mixed))             # [B, H, d]
        beta, g = self._gates(x[:, 0])
        if g is not None:
            memory = g.to(memory.dtype).exp()[..., None, None] * memory
        error = v - (k.unsqueeze(-2) @ memory).squeeze(-2)
        memory = memory + beta.to(memory.dtype)[..., None, None] * k.unsqueeze(-1) * error.unsqueeze(-2)
        buffers.memory.copy_(memory)
        o = (q.unsqueeze(-2) @ memory).squeeze(-2)                            # [B, H, d]
        return self._output(o, x[:, 0]).unsqueeze(1)

    def static_read_state(self, buffers: DeltaDecodeBuffers) -> Tensor:
        """The memory the buffers hold (a view): :meth:`read_state`'s snapshot after any step."""
        return buffers.memory

    def describe_rule(self) -> RuleDescription:
        """The delta rule: one step of l2 regression per token with step ``beta`` (after GDN's
        decay ``e^g``, applied before the gradient), token-exact through the WY kernel
        (:class:`memforge.interfaces.DescribesRule`)."""
        return RuleDescription(
            objective="squared error", retention="gated decay (before the gradient)" if self.gated
            else "none", optimizer="delta step beta", schedule=f"WY chunks of {self.kernel_chunk}",
            tier="token-exact", executor="wy")

    def extra_repr(self) -> str:
        return (f"{'gated' if self.gated else 'ungated'}, heads={self.heads}, "
                f"kernel_chunk={self.kernel_chunk}, conv_size={self.conv_size}")
