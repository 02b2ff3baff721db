"""The fast-weight memory layer (docs/memory.md): one sequence layer for every test-time learning
rule the executors run; ``titans.neural_memory`` builds it, and so can any plugin's memory layer.

``x -> q, k, v`` (projection), per-token inputs of the rule (the optimiser's step sizes and
momentum, the retention's log-decay, the objective's side input and window weights), the
executor's scan (:mod:`memforge.engine.executors`: the test-time update and the read), then a
per-head RMS norm, a SiLU output gate from ``x`` and the output projection (docs/memory.md, "The
memory layer"; after Gated State Spaces / GDN).

Every sequence in the batch owns its memory: the learned initial weights are copied per sequence
at the start and updated while the layer reads. The layer's state carries them (plus whatever
the executor keeps, and the projection's cache), so feeding a sequence in pieces equals feeding
it whole at any split point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.checks import checks_values
from memforge.engine import LAYER_PARTS
from memforge.engine.derived_backward import check_derivable
from memforge.engine.executors import (
    DecodesRuleStatically,
    Executor,
    LearningRule,
    RuleInputs,
    select_executor,
)
from memforge.engine.inspection import SERIES, record_forward
from memforge.engine.static_chunk import clone_tree, copy_into
from memforge.errors import InputError, NonFiniteError, SpecError
from memforge.interfaces import (
    BuildContext,
    MemoryNetwork,
    MemoryRecorder,
    Objective,
    Optimizer,
    Projection,
    ProjectsWeights,
    Retention,
    RetrievalRule,
    RuleDescription,
)
from memforge.linear import Linear


def _without_autocast(device: torch.device):
    """Autocast switched off on ``device``'s type (a no-op where it was not on)."""
    return torch.autocast(device.type, enabled=False)


def _scan_with_compiled_steps(executor: Executor, rule: LearningRule, state: Any,
                              inputs: RuleInputs) -> tuple[Tensor, Any]:
    """The executor's scan with its compiled chunk step."""
    return executor.scan(rule, state, inputs, compiled=True)


_hidden_scan: Callable[..., tuple[Tensor, Any]] | None = None


def _scan_hidden_from_compile() -> Callable[..., tuple[Tensor, Any]]:
    """:func:`_scan_with_compiled_steps` hidden from any outer ``torch.compile`` (which would
    otherwise trace into the loop, unroll it and inline the step).

    Made on first use, by ``compile_steps()``: ``torch.compiler.disable`` imports the compiler
    stack (about a second), which a model that never compiles should not pay for.
    """
    global _hidden_scan
    if _hidden_scan is None:
        _hidden_scan = torch.compiler.disable(_scan_with_compiled_steps)
    return _hidden_scan


def _store_initial_dual(memory: MemoryNetwork, retention: Retention) -> None:
    """For a mirror retention with ``initial_dual`` (:class:`memforge.interfaces.ProjectsWeights`),
    replace the network's drawn initial weights, in place, by the dual it starts from for them
    (the projection's inverse starts the memory at the draw); otherwise leave them as drawn.

    Raises:
        SpecError: the dual differs from the draw, but the network's ``initial_weights()`` are
            not its own parameters or buffers, so there is nothing to store it in.
    """
    initial_dual = getattr(retention, "initial_dual", None)
    if not (isinstance(retention, ProjectsWeights) and getattr(retention, "mirror", False)
            and callable(initial_dual)):
        return
    drawn = tuple(memory.initial_weights())
    with torch.no_grad():
        duals = tuple(initial_dual(drawn))
    if all(dual is weights for dual, weights in zip(duals, drawn, strict=True)):
        return
    owned = {id(t) for t in (*memory.parameters(), *memory.buffers())}
    if not all(id(w) in owned for w in drawn):
        raise SpecError(f"retention {type(retention).__name__} starts its dual away from the "
                        f"memory's initial weights, but {type(memory).__name__}.initial_weights() "
                        f"does not return its parameters or buffers to store the dual in; use a "
                        f"memory whose initial weights are its parameters, or start the dual at "
                        f"the draw")
    with torch.no_grad():
        for weights, dual in zip(drawn, duals, strict=True):
            weights.copy_(dual)


class MemoryLayerState(NamedTuple):
    """State of a :class:`FastWeightMemoryLayer` between calls on the same sequences.

    Attributes:
        fast: the executor's state (fast weights at the current chunk start in ``fast.weights``,
            momentum, the unfinished chunk).
        projection: the projection's cache (``None`` when it keeps none).
    """

    fast: Any
    projection: Any


class MemoryDecodeBuffers(NamedTuple):
    """What a fixed-shape decode of a :class:`FastWeightMemoryLayer` keeps (changed in place).

    Attributes:
        chunk: the executor's buffers (fast weights, momentum and the current chunk's rows).
        projection: a copy of the projection's cache (``None`` when it keeps none).
    """

    chunk: Any
    projection: Any


class FastWeightMemoryLayer(nn.Module):
    """A fast-weight memory: ``forward(x [B, T, D], state) -> (y [B, T, D], state)``.

    A :class:`memforge.interfaces.MemoryLayer` with the capabilities ``ReadsMemory``,
    ``CompilesSteps``, ``InspectsMemory`` (:mod:`memforge.engine.inspection` says what it
    records) and ``DescribesRule``; and ``DecodesMemoryStatically`` with
    ``ReadsMemoryStatically`` when its executor decodes with fixed shapes (the closed form does).
    A capability is a set of methods that callers look for, so a layer whose executor cannot
    decode that way must not have them: it is then a plain :class:`FastWeightMemoryLayer`, and
    otherwise a :class:`StaticDecodingMemoryLayer` (chosen at construction, once the executor is
    known).

    A mirror retention with ``initial_dual`` (:class:`memforge.interfaces.ProjectsWeights`) has
    the memory's drawn initial weights replaced, at construction, by the dual it starts from; a
    memory or retention swapped in later is not re-initialised.

    Args:
        dim: model width ``D``.
        heads: memory heads ``H``; each has its own memory of width ``d = D // H``.
        projection: makes ``q, k, v`` ``[B, H, T, d]`` from ``x`` (kind ``projection``).
        memory: the memory network ``M`` (kind ``memory``).
        objective: the loss a step descends (kind ``objective``).
        optimizer: step sizes and momentum (kind ``optimizer``).
        retention: the decay of old memory in log space (kind ``retention``).
        retrieval: which weights a token reads (kind ``retrieval``).
        chunk_size: tokens whose updates are computed together (their gradients at the
            chunk-start weights, for the closed form).
        executor: ``"auto"`` (the first executor that runs the rule,
            :func:`memforge.engine.executors.select_executor`) or an executor's name.
        names: the components' names by kind (``{"objective": "titans.l2", ...}``) for
            :meth:`describe_rule`; a kind without one is described by its class name.

    Raises:
        SpecError: no executor (or not the one asked for) can run the rule; one line naming the
            components and the fix.
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
        objective: Objective,
        optimizer: Optimizer,
        retention: Retention,
        retrieval: RetrievalRule,
        chunk_size: int,
        executor: str = "auto",
        names: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dim, self.heads, self.head_dim, self.chunk_size = dim, heads, dim // heads, chunk_size
        self.projection = projection
        self.memory = memory
        self.objective = objective
        self.optimizer = optimizer
        self.retention = retention
        self.retrieval = retrieval
        # A network without a hand-written backward must be derivable by autograd: say so now,
        # in one line, rather than deep in the first forward.
        check_derivable(memory, type(memory).__name__)
        self.executor = select_executor(self.rule, executor)
        _store_initial_dual(memory, retention)
        self.component_names = dict(names or {})
        self.compiled_steps = False
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.out_gate = Linear(dim, dim, bias=False)
        self.out_proj = Linear(dim, dim, bias=False)
        if type(self) is FastWeightMemoryLayer and isinstance(self.executor, DecodesRuleStatically):
            self.__class__ = StaticDecodingMemoryLayer

    @classmethod
    def from_context(cls, ctx: BuildContext, *, chunk_size: int, executor: str = "auto"
                     ) -> FastWeightMemoryLayer:
        """The layer built from the spec's choices of its six parts for ``ctx``'s layer
        (``ctx.build(kind)`` for each of :data:`LAYER_PARTS`), described by their registered
        names: what a ``memory_layer`` factory returns (its ComponentSpec must declare the six
        kinds in ``requires``)."""
        parts = {kind: ctx.build(kind) for kind in LAYER_PARTS}
        names = {kind: name for kind in LAYER_PARTS if (name := ctx.component_name(kind))}
        return cls(ctx.dim, ctx.heads, **parts, chunk_size=chunk_size, executor=executor,
                   names=names)

    @property
    def rule(self) -> LearningRule:
        """The rule the executor runs, from the layer's current parts (made on each access, so a
        part replaced after construction is the one that runs)."""
        return LearningRule(self.memory, self.objective, self.optimizer, self.retention,
                            self.retrieval, self.chunk_size)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, executor={self.executor.name!r}"

    def describe_rule(self) -> RuleDescription:
        """The rule's parts (names where the builder gave them, else class names), its schedule,
        tier and executor (:class:`memforge.interfaces.DescribesRule`)."""

        def name(kind: str, part: Any) -> str:
            return self.component_names.get(kind) or type(part).__name__

        schedule = "token by token" if self.chunk_size == 1 else f"chunks of {self.chunk_size}"
        return RuleDescription(
            objective=name("objective", self.objective),
            retention=name("retention", self.retention),
            optimizer=name("optimizer", self.optimizer),
            schedule=schedule,
            tier=self.executor.tier(self.rule),
            executor=self.executor.name,
        )

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
    def forward(self, x: Tensor, state: MemoryLayerState | None = None
                ) -> tuple[Tensor, MemoryLayerState]:
        """Write ``x`` into the memory and read it; returns the layer output and the new state."""
        self._check_input(x)
        batch = x.shape[0]
        if state is not None:
            state = self._check_state(state, batch)
        dtype = (state.fast.weights if state is not None else self.memory.initial_weights())[0].dtype
        inputs, projection_cache = self._rule_inputs(
            x, None if state is None else state.projection, dtype)
        rule = self.rule
        # Which optional inputs the state carries follows from the first call's (None = off).
        fast = self.executor.initial_state(rule, batch, inputs) if state is None else state.fast
        with _without_autocast(x.device):
            if self.compiled_steps:
                read, new_fast = _scan_hidden_from_compile()(self.executor, rule, fast, inputs)
            else:
                read, new_fast = self.executor.scan(rule, fast, inputs)
        y = self.output(read, x)
        if self._memory_recorder is not None:
            record_forward(self, self._memory_recorder, x, fast, inputs, read)
        return y, MemoryLayerState(new_fast, projection_cache)

    def set_memory_recorder(self, recorder: MemoryRecorder | None) -> None:
        """Record every later ``forward`` into ``recorder`` (``None``: stop); InspectsMemory."""
        self._memory_recorder = recorder

    def _heads_first(self, gate: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """``[B, T, H] -> [B * H, T]`` in ``dtype``, the kernel's sequence-major, head-minor order."""
        return None if gate is None else gate.permute(0, 2, 1).flatten(0, 1).to(dtype)

    def _rule_inputs(self, x: Tensor, projection_cache: Any, dtype: torch.dtype
                     ) -> tuple[RuleInputs, Any]:
        """The rule's per-token inputs in kernel layout (``q, k, v`` ``[B * H, T, d]``, the rest
        ``[B * H, T]`` or ``None``) in the fast weights' ``dtype``, and the projection's new cache.

        The test-time update runs at the fast weights' precision even under autocast: momentum and
        decay accumulate over thousands of tokens, and bfloat16 steps would drift (the attention
        and projections around it still take autocast's low precision).
        """
        q, k, v, cache = self.projection(x, projection_cache)
        gates = self.optimizer(x)
        log_keep = self.retention(x)
        extra = self.objective(x)
        inputs = RuleInputs(
            *(t.flatten(0, 1).to(dtype) for t in (q, k, v)),
            *(self._heads_first(g, dtype)
              for g in (gates.lr, gates.momentum, log_keep, extra.side, extra.window)),
        )
        return inputs, cache

    def output(self, read: Tensor, x: Tensor) -> Tensor:
        """The layer's output stage: the raw reads ``[B * H, T, d]`` normalised per head, gated
        by ``x`` ``[B, T, D]`` and projected to ``[B, T, D]`` (public for layer-level references
        that run their own update between the projection and this stage)."""
        batch, steps, _ = x.shape
        y = self.out_norm(read.unflatten(0, (batch, self.heads)))   # [B, H, T, d]
        y = y.transpose(1, 2).reshape(batch, steps, self.dim)
        return self.out_proj(y * F.silu(self.out_gate(x)))

    def compile_steps(self, enabled: bool = True) -> None:
        """Run the executor's chunk loop with a ``torch.compile``-d chunk step (or back to eager).

        The loop over chunks stays in Python and each whole chunk goes through one compiled graph
        (the closed form's :func:`memforge.engine.chunked.compiled_chunk_step`), which fuses the
        element-wise work between the matmuls: compiling the layer or model as a whole would
        instead unroll the loop, compile one graph per sequence length and take minutes. With
        this on, an outer ``torch.compile`` of the model compiles everything around the scan and
        leaves the scan to its step. Results agree with the eager path up to float rounding.
        """
        if enabled:
            _scan_hidden_from_compile()
        self.compiled_steps = bool(enabled)

    # -- read-only access (memforge.interfaces.ReadsMemory: MAC retrieves without writing) ------
    def read_state(self, state: MemoryLayerState | None, batch: int) -> tuple[Tensor, ...]:
        """The snapshot of the memory: the fast weights after every token written so far; pure.

        ``state=None`` gives the memory before any token for ``batch`` sequences: the learned
        initial weights repeated (as the executor starts from them; a mirror retention reads
        their projection). Each tensor is ``[batch * H, d_in_i, d_out_i]``, sequence-major as in
        the kernel.
        """
        if state is None:
            like = self.memory.initial_weights()[0]
            rows, heads_first = like.new_zeros(batch * self.heads, 0, self.head_dim), like.new_zeros(
                batch * self.heads, 0)
            nothing = RuleInputs(rows, rows, rows, heads_first, None, None, None, None)
            start = self.executor.initial_state(self.rule, batch, nothing)
            return self.executor.current_weights(self.rule, start)
        state = self._check_state(state, batch)
        with _without_autocast(state.fast.weights[0].device):
            return self.executor.current_weights(self.rule, state.fast)

    def read(self, queries: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """``M(queries)`` with fixed fast ``weights`` (from :meth:`read_state`); pure.

        ``queries`` ``[B, H, T, d]`` -> raw memory output ``[B, H, T, d]`` (no norm, gate or
        projection: the caller decides what to do with the read).
        """
        flat = queries.flatten(0, 1)
        out, _ = self.memory.forward(flat, lambda i, h: h @ weights[i])
        return out.unflatten(0, queries.shape[:2])


class StaticDecodingMemoryLayer(FastWeightMemoryLayer):
    """A :class:`FastWeightMemoryLayer` whose executor decodes with fixed shapes (compiled
    generation): adds ``DecodesMemoryStatically`` and ``ReadsMemoryStatically``. Built by
    :class:`FastWeightMemoryLayer` itself; never constructed directly."""

    executor: DecodesRuleStatically

    def static_decode_buffers(self, state: MemoryLayerState, batch: int) -> MemoryDecodeBuffers:
        """Fixed-shape buffers holding ``state`` (after at least one token), for
        :meth:`static_decode_step`; copies, so the decode never changes ``state`` itself."""
        state = self._check_state(state, batch)
        with _without_autocast(state.fast.weights[0].device):
            chunk = self.executor.static_buffers(self.rule, state.fast)
        return MemoryDecodeBuffers(chunk, clone_tree(state.projection))

    def static_decode_phase(self, state: MemoryLayerState) -> int:
        """How many tokens of the current chunk ``state`` has read (the row the next one writes)."""
        return self.executor.static_phase(self.rule, state.fast)

    def static_decode_step(self, x: Tensor, buffers: MemoryDecodeBuffers, completes_chunk: bool
                           ) -> Tensor:
        """One token ``x`` ``[B, 1, D]`` through the layer, updating ``buffers`` in place.

        Equals :meth:`forward` on that token with the state the buffers hold; every call has the
        same shapes. ``completes_chunk``: this token is the last of its chunk (the decoder knows
        the position, so the branch is a Python bool and a compiled step never reads a tensor).
        No input checks: the decoder feeds the model's own hidden states.
        """
        inputs, cache = self._rule_inputs(x, buffers.projection, buffers.chunk.weights[0].dtype)
        copy_into(buffers.projection, cache)
        with _without_autocast(x.device):
            read = self.executor.static_step(self.rule, buffers.chunk, inputs, completes_chunk)
        return self.output(read, x)

    def static_read_state(self, buffers: MemoryDecodeBuffers) -> tuple[Tensor, ...]:
        """The fast weights ``buffers`` hold (views), the :meth:`read_state` snapshot right after a
        step that completed a chunk (:class:`memforge.interfaces.ReadsMemoryStatically`)."""
        return tuple(buffers.chunk.weights)


__all__ = ["FastWeightMemoryLayer", "MemoryDecodeBuffers", "MemoryLayerState",
           "StaticDecodingMemoryLayer"]
