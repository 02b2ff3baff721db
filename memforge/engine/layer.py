"""The Titans neural long-term memory as a sequence layer (docs/memory.md), the memory layer
``titans.neural_memory``.

``x -> q, k, v`` (projection), per-token gates (surprise and forgetting rules), the chunk-parallel
test-time update and read (:func:`memforge.engine.chunked.memory_scan`), then a per-head RMS norm,
a SiLU output gate from ``x`` and the output projection (docs/memory.md, "The memory layer";
after Gated State Spaces / GDN).

Every sequence in the batch owns its memory: the learned initial weights are copied per sequence
at the start and updated while the layer reads. The layer's state carries them (plus momentum,
the convolution cache and the unfinished chunk), so feeding a sequence in pieces equals feeding it
whole at any split point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.checks import checks_values
from memforge.engine.chunked import FastWeightState, current_weights, initial_state, memory_scan
from memforge.engine.inspection import SERIES, record_forward
from memforge.engine.static_chunk import StaticChunk, clone_tree, copy_into, static_chunk, static_chunk_step
from memforge.errors import InputError, NonFiniteError
from memforge.interfaces import (
    ForgettingRule,
    MemoryNetwork,
    MemoryRecorder,
    Projection,
    RetrievalRule,
    SurpriseGates,
    SurpriseRule,
)
from memforge.linear import Linear


def _without_autocast(device: torch.device):
    """Autocast switched off on ``device``'s type (a no-op where it was not on)."""
    return torch.autocast(device.type, enabled=False)


def _scan_with_compiled_steps(*args: Any, **kwargs: Any) -> tuple[Tensor, FastWeightState]:
    """:func:`memory_scan` with its compiled chunk step."""
    return memory_scan(*args, compiled=True, **kwargs)


_hidden_scan: Callable[..., tuple[Tensor, FastWeightState]] | None = None


def _scan_hidden_from_compile() -> Callable[..., tuple[Tensor, FastWeightState]]:
    """:func:`_scan_with_compiled_steps` hidden from any outer ``torch.compile`` (which would
    otherwise trace into the loop, unroll it and inline the step).

    Made on first use, by ``compile_steps()``: ``torch.compiler.disable`` imports the compiler
    stack (about a second), which a model that never compiles should not pay for.
    """
    global _hidden_scan
    if _hidden_scan is None:
        _hidden_scan = torch.compiler.disable(_scan_with_compiled_steps)
    return _hidden_scan


class MemoryLayerState(NamedTuple):
    """State of a :class:`NeuralMemoryLayer` between calls on the same sequences.

    Attributes:
        fast: fast weights and momentum at the current chunk start, plus the unfinished chunk.
        projection: the projection's cache (``None`` when it keeps none).
    """

    fast: FastWeightState
    projection: Any


class MemoryDecodeBuffers(NamedTuple):
    """What a fixed-shape decode of a :class:`NeuralMemoryLayer` keeps (changed in place).

    Attributes:
        chunk: fast weights, momentum and the current chunk's rows.
        projection: a copy of the projection's cache (``None`` when it keeps none).
    """

    chunk: StaticChunk
    projection: Any


class NeuralMemoryLayer(nn.Module):
    """Neural long-term memory (LMM): ``forward(x [B, T, D], state) -> (y [B, T, D], state)``.

    A :class:`memforge.interfaces.MemoryLayer` with every capability: ``ReadsMemory``,
    ``DecodesMemoryStatically``, ``ReadsMemoryStatically``, ``CompilesSteps`` and
    ``InspectsMemory`` (:mod:`memforge.engine.inspection` says what it records).

    Args:
        dim: model width ``D``.
        heads: memory heads ``H``; each has its own memory of width ``d = D // H``.
        projection: makes ``q, k, v`` ``[B, H, T, d]`` from ``x`` (kind ``projection``).
        memory: the memory network ``M`` (kind ``memory``).
        surprise: inner loss and step-size/momentum gates (kind ``surprise``).
        forgetting: decay gate (kind ``forgetting``).
        retrieval: which weights a token reads (kind ``retrieval``).
        chunk_size: tokens whose surprise is taken at the same (chunk-start) weights.
    """

    inspect_series = SERIES
    _memory_recorder: MemoryRecorder | None = None

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        projection: Projection,
        memory: MemoryNetwork,
        surprise: SurpriseRule,
        forgetting: ForgettingRule,
        retrieval: RetrievalRule,
        chunk_size: int,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dim, self.heads, self.head_dim, self.chunk_size = dim, heads, dim // heads, chunk_size
        self.projection = projection
        self.memory = memory
        self.surprise = surprise
        self.forgetting = forgetting
        self.retrieval = retrieval
        self.compiled_steps = False
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.out_gate = Linear(dim, dim, bias=False)
        self.out_proj = Linear(dim, dim, bias=False)

    # -- input checks --------------------------------------------------------------------------
    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"memory layer expects hidden states [batch, time, {self.dim}], "
                             f"got {shape}")
        if not x.dtype.is_floating_point:
            raise InputError(f"memory layer expects floating-point hidden states, got {x.dtype}")
        # A value check: on an accelerator only when asked for (see memforge.checks).
        if checks_values(x) and not bool(torch.isfinite(x).all()):
            raise NonFiniteError("memory layer got non-finite hidden states (NaN or inf): either the "
                                 "inputs hold them or the model's activations overflowed before "
                                 "this layer; check the inputs and the learning rate")

    def _check_state(self, state: Any, batch: int) -> MemoryLayerState:
        if not isinstance(state, MemoryLayerState):
            raise InputError(f"memory layer state must be the MemoryLayerState it returned, got "
                             f"{type(state).__name__}")
        weights = state.fast.weights
        expected = [(batch * self.heads, *w.shape[1:]) for w in self.memory.initial_weights()]
        got = [tuple(w.shape) for w in weights]
        if got != expected:
            raise InputError(f"memory state does not fit this layer and batch {batch}: fast "
                             f"weights {got}, expected {expected}; pass the state returned for "
                             f"these same sequences by this layer")
        return state

    # -- the layer -----------------------------------------------------------------------------
    def _heads_first(self, gate: Tensor) -> Tensor:
        # [B, T, H] -> [B * H, T], matching the kernel's sequence-major, head-minor order.
        return gate.permute(0, 2, 1).flatten(0, 1)

    def forward(self, x: Tensor, state: MemoryLayerState | None = None
                ) -> tuple[Tensor, MemoryLayerState]:
        """Write ``x`` into the memory and read it; returns the layer output and the new state."""
        self._check_input(x)
        batch = x.shape[0]
        gates = self.surprise(x)
        decay = self.forgetting(x)
        if state is None:
            # Whether momentum/decay state exists follows from the rules' gates (None = off).
            fast = initial_state(self.memory, batch, momentum_enabled=gates.momentum is not None,
                                 decay_enabled=decay is not None)
            state = MemoryLayerState(fast, None)
        else:
            state = self._check_state(state, batch)
        flat, (gate_lr, gate_momentum, gate_decay), projection_cache = self._kernel_inputs(
            x, gates, decay, state.projection, state.fast.weights[0].dtype)
        scan = _scan_hidden_from_compile() if self.compiled_steps else memory_scan
        with _without_autocast(x.device):
            read, fast = scan(
                self.memory, self.surprise, self.retrieval, state.fast, *flat,
                lr=gate_lr, momentum=gate_momentum, decay=gate_decay, chunk_size=self.chunk_size,
            )
        y = self._output(read, x)
        if self._memory_recorder is not None:
            record_forward(self, self._memory_recorder, x, state.fast, flat,
                           (gate_lr, gate_momentum, gate_decay), read)
        return y, MemoryLayerState(fast, projection_cache)

    def set_memory_recorder(self, recorder: MemoryRecorder | None) -> None:
        """Record every later ``forward`` into ``recorder`` (``None``: stop); InspectsMemory."""
        self._memory_recorder = recorder

    def _kernel_inputs(self, x: Tensor, gates: SurpriseGates, decay: Tensor | None,
                       projection_cache: Any, dtype: torch.dtype
                       ) -> tuple[list[Tensor], list[Tensor | None], Any]:
        """``q, k, v`` as ``[B * H, T, d]`` and the gates ``theta, eta, alpha`` as ``[B * H, T]``
        (``None`` when off), in the fast weights' ``dtype``, and the projection's new cache.

        The test-time update runs at the fast weights' precision even under autocast: momentum and
        decay accumulate over thousands of tokens, and bfloat16 steps would drift (the attention
        and projections around it still take autocast's low precision).
        """
        q, k, v, cache = self.projection(x, projection_cache)
        flat = [t.flatten(0, 1).to(dtype) for t in (q, k, v)]
        gate_values = [None if g is None else self._heads_first(g).to(dtype)
                       for g in (gates.lr, gates.momentum, decay)]
        return flat, gate_values, cache

    def _output(self, read: Tensor, x: Tensor) -> Tensor:
        """The raw reads ``[B * H, T, d]`` normalised, gated by ``x`` ``[B, T, D]`` and projected."""
        batch, steps, _ = x.shape
        y = self.out_norm(read.unflatten(0, (batch, self.heads)))   # [B, H, T, d]
        y = y.transpose(1, 2).reshape(batch, steps, self.dim)
        return self.out_proj(y * F.silu(self.out_gate(x)))

    # -- fixed-shape decoding (compiled generation) --------------------------------------------
    def static_decode_buffers(self, state: MemoryLayerState, batch: int) -> MemoryDecodeBuffers:
        """Fixed-shape buffers holding ``state`` (after at least one token), for
        :meth:`static_decode_step`; copies, so the decode never changes ``state`` itself."""
        state = self._check_state(state, batch)
        with _without_autocast(state.fast.weights[0].device):
            chunk = static_chunk(self.memory, self.surprise, state.fast, self.chunk_size)
        return MemoryDecodeBuffers(chunk, clone_tree(state.projection))

    def static_decode_phase(self, state: MemoryLayerState) -> int:
        """How many tokens of the current chunk ``state`` has read (the row the next one writes)."""
        return state.fast.pending.keys.shape[1]

    def static_decode_step(self, x: Tensor, buffers: MemoryDecodeBuffers, completes_chunk: bool
                           ) -> Tensor:
        """One token ``x`` ``[B, 1, D]`` through the layer, updating ``buffers`` in place.

        Equals :meth:`forward` on that token with the state the buffers hold; every call has the
        same shapes. ``completes_chunk``: this token is the last of its chunk (the decoder knows
        the position, so the branch is a Python bool and a compiled step never reads a tensor).
        No input checks: the decoder feeds the model's own hidden states.
        """
        flat, gate_values, cache = self._kernel_inputs(
            x, self.surprise(x), self.forgetting(x), buffers.projection, buffers.chunk.weights[0].dtype)
        copy_into(buffers.projection, cache)
        with _without_autocast(x.device):
            read = static_chunk_step(self.memory, self.surprise, self.retrieval, buffers.chunk, *flat,
                                     *gate_values, completes=completes_chunk)
        return self._output(read, x)

    def static_read_state(self, buffers: MemoryDecodeBuffers) -> tuple[Tensor, ...]:
        """The fast weights ``buffers`` hold (views), the :meth:`read_state` snapshot right after a
        step that completed a chunk (:class:`memforge.interfaces.ReadsMemoryStatically`)."""
        return tuple(buffers.chunk.weights)

    def compile_steps(self, enabled: bool = True) -> None:
        """Run the memory's chunk loop with a ``torch.compile``-d chunk step (or back to eager).

        The loop over chunks stays in Python and each whole chunk goes through one compiled graph
        (:func:`memforge.engine.chunked.compiled_chunk_step`), which fuses the element-wise work
        between the matmuls: compiling the layer or model as a whole would instead unroll the loop,
        compile one graph per sequence length and take minutes. With this on, an outer
        ``torch.compile`` of the model compiles everything around the scan and leaves the scan to
        its step. Results agree with the eager path up to float rounding.
        """
        if enabled:
            _scan_hidden_from_compile()
        self.compiled_steps = bool(enabled)

    # -- read-only access (memforge.interfaces.ReadsMemory: MAC retrieves without writing) ------
    def read_state(self, state: MemoryLayerState | None, batch: int) -> tuple[Tensor, ...]:
        """The snapshot of the memory: the fast weights after every token written so far; pure.

        ``state=None`` gives the learned initial weights repeated for ``batch`` sequences. Each
        tensor is ``[batch * H, d_in_i, d_out_i]``, sequence-major as in the kernel.
        """
        if state is None:
            return tuple(w.repeat(batch, 1, 1) for w in self.memory.initial_weights())
        state = self._check_state(state, batch)
        with _without_autocast(state.fast.weights[0].device):
            return current_weights(self.memory, self.surprise, state.fast)

    def read(self, queries: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """``M(queries)`` with fixed fast ``weights`` (from :meth:`read_state`); pure.

        ``queries`` ``[B, H, T, d]`` -> raw memory output ``[B, H, T, d]`` (no norm, gate or
        projection: the caller decides what to do with the read).
        """
        flat = queries.flatten(0, 1)
        out, _ = self.memory.forward(flat, lambda i, h: h @ weights[i])
        return out.unflatten(0, queries.shape[:2])
