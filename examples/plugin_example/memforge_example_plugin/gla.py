"""Gated linear attention: a matrix memory with a data-dependent decay (Yang et al. 2024).

Per head, with ``S_0 = 0``, a decay ``a_t = exp(g_t)`` in ``(0, 1)`` per token and head::

    S_t = a_t S_{t-1} + k_t v_t^T        o_t = S_t^T q_t

The chunked form computes this exactly, a chunk of tokens at a time: with ``b_i`` the sum of
``g`` over the chunk up to token ``i``,

    o_i = exp(b_i) S_0^T q_i + sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j
    S_C = exp(b_C) S_0 + sum_j exp(b_C - b_j) k_j v_j^T

Decays stay in log space (``g = logsigmoid(.) / temperature``), so no decay underflows to a
zero whose logarithm has no gradient. ``reference_forward`` is the token loop above, which the
conformance kit compares the chunked form with in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memforge
from memforge.errors import InputError
from memforge.interfaces import MemoryRecorder


class GatedLinearAttention(nn.Module):
    """A ``memforge.MemoryLayer`` with ``ReadsMemory``, ``DecodesMemoryStatically``,
    ``ReadsMemoryStatically`` and ``InspectsMemory``; its state is ``S`` ``[B, H, d, d]``.

    Args:
        dim: model width ``D``.
        heads: heads ``H``, each with its own memory of width ``d = D // H``.
        chunk_size: tokens per step of the chunked form (``kernel_chunk``; exact at any size).
        temperature: divides the log decay, so that decays start near 1 (long memory).
    """

    # InspectsMemory (docs/inspect.md): decay is 1 - a_t, the share of S forgotten at the token.
    inspect_series = ("decay", "state_norm", "read_output")
    _memory_recorder: MemoryRecorder | None = None
    #: Token-exact at any kernel chunk, so the framework's cycle is one token.
    chunk_size = 1

    def __init__(self, dim: int, heads: int, *, chunk_size: int, temperature: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.kernel_chunk, self.temperature = chunk_size, temperature
        self.qkv = memforge.Linear(dim, 3 * dim, bias=False)
        self.gate = memforge.Linear(dim, heads)
        self.out_gate = memforge.Linear(dim, dim, bias=False)
        self.out = memforge.Linear(dim, dim, bias=False)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``q, k, v`` ``[B, H, T, d]`` (``q`` and ``k`` of unit length) and ``g`` ``[B, H, T]``."""
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        g = F.logsigmoid(self.gate(x)).transpose(1, 2) / self.temperature
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, g

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """Heads ``[B, H, T, d]`` normalised, merged, gated by ``x`` and projected."""
        o = F.rms_norm(o, (self.head_dim,)).transpose(1, 2).flatten(2)
        return self.out(o * F.silu(self.out_gate(x)))

    def _start(self, state: Tensor | None, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"example.gla expects hidden states [batch, time, {self.dim}], "
                             f"got {shape}")
        return self.read_state(state, x.shape[0]).to(x.dtype)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The chunked form: ``x`` ``[B, T, D]`` and ``S`` (``None``: zeros) to ``(y, S)``."""
        memory = self._start(state, x)
        q, k, v, g = self._inputs(x)
        outputs = []
        for start in range(0, x.shape[1], self.kernel_chunk):
            part = slice(start, start + self.kernel_chunk)
            qc, kc, vc, b = q[:, :, part], k[:, :, part], v[:, :, part], g[:, :, part].cumsum(-1)
            later = torch.ones(b.shape[-1], b.shape[-1], dtype=torch.bool, device=x.device).tril()
            decay = (b[..., :, None] - b[..., None, :]).masked_fill(~later, -torch.inf).exp()
            outputs.append((qc * b.exp()[..., None]) @ memory + ((qc @ kc.mT) * decay) @ vc)
            last = b[..., -1:]
            memory = last.exp()[..., None] * memory + (kc * (last - b).exp()[..., None]).mT @ vc
        o = torch.cat(outputs, 2)
        y = self._output(o, x)
        if self._memory_recorder is not None:
            self._record(self._memory_recorder, x, self._start(state, x), k, v, g, o)
        return y, memory

    def set_memory_recorder(self, recorder: MemoryRecorder | None) -> None:
        """Record every later ``forward`` into ``recorder`` (``None``: stop); InspectsMemory."""
        self._memory_recorder = recorder

    @torch.no_grad()
    def _record(self, recorder: MemoryRecorder, x: Tensor, memory: Tensor, k: Tensor, v: Tensor,
                g: Tensor, o: Tensor) -> None:
        """The inspected series, from detached copies after the output is made: the decay
        ``1 - a_t``, ``||S_t||_F`` by the token recurrence, each head's share of the output."""
        recorder.record("decay", -torch.expm1(g))
        norms = []
        for t in range(x.shape[1]):
            memory = (g[:, :, t, None, None].exp() * memory
                      + k[:, :, t, :, None] * v[:, :, t, None, :])
            norms.append(memory.flatten(2).norm(dim=-1))
        recorder.record("state_norm", torch.stack(norms, -1))
        heads = F.rms_norm(o, (self.head_dim,)) * F.silu(self.out_gate(x)).unflatten(
            -1, (self.heads, self.head_dim)).transpose(1, 2)                     # [B, H, T, d]
        weight = self.out.weight.unflatten(1, (self.heads, self.head_dim))     # [D, H, d]
        recorder.record("read_output", torch.einsum("bhtd,ehd->bhte", heads, weight))

    def reference_forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The recurrence token by token, from the equations (slow; for tests)."""
        memory = self._start(state, x)
        q, k, v, g = self._inputs(x)
        outputs = []
        for t in range(x.shape[1]):
            memory = (g[:, :, t, None, None].exp() * memory
                      + k[:, :, t, :, None] * v[:, :, t, None, :])
            outputs.append(q[:, :, t, None, :] @ memory)
        return self._output(torch.cat(outputs, 2), x), memory

    # ReadsMemory: what titans.mac retrieves with.
    def read_state(self, state: Tensor | None, batch: int) -> Tensor:
        """The memory ``S`` ``[B, H, d, d]`` (zeros before any token); pure."""
        if state is None:
            return self.out.weight.new_zeros(batch, self.heads, self.head_dim, self.head_dim)
        if not isinstance(state, Tensor) or state.shape != (batch, self.heads, self.head_dim,
                                                             self.head_dim):
            raise InputError(f"example.gla's state must be the [batch={batch}, {self.heads}, "
                             f"{self.head_dim}, {self.head_dim}] tensor it returned")
        return state

    def read(self, queries: Tensor, snapshot: Tensor) -> Tensor:
        """``S^T q`` for queries ``[B, H, T, d]``; pure."""
        return queries @ snapshot

    # DecodesMemoryStatically: one token at a time, in place (compiled generation).
    def static_decode_buffers(self, state: Tensor, batch: int) -> Tensor:
        """A copy of ``S``, updated in place by each step."""
        return self.read_state(state, batch).clone()

    def static_decode_phase(self, state: Tensor) -> int:
        """0: every token read so far is already folded into ``S``."""
        return 0

    def static_decode_step(self, x: Tensor, buffers: Tensor, completes_chunk: bool) -> Tensor:
        """One token ``x`` ``[B, 1, D]``: the recurrence's step on ``buffers``."""
        q, k, v, g = self._inputs(x)
        buffers.mul_(g.exp()[..., None]).add_(k.mT @ v)
        return self._output(q @ buffers, x)

    def static_read_state(self, buffers: Tensor) -> Tensor:
        """``S`` as the buffers hold it (ReadsMemoryStatically)."""
        return buffers
