"""Executors: the kernels that run a learning rule, and how a layer picks one (docs/memory.md,
"Executors").

A *learning rule* is a memory network (the function class), an objective, an optimiser, a
retention and a retrieval rule, run on a schedule of chunks (:class:`LearningRule`). An
*executor* runs rules of some shape over a sequence: it says which rules it refuses and why
(:meth:`Executor.refusal`), the exactness tier it gives a rule (:data:`memforge.interfaces.TIERS`),
and scans the per-token inputs (:class:`RuleInputs`) into reads and a carried state.

:data:`EXECUTORS` holds every executor by name, in preference order; ``select_executor(rule)``
takes the first that does not refuse, or the one asked for. The WY kernel
(:mod:`memforge.engine.wy_executor`: token-exact for the delta rule at the decayed state), the
closed form and the sequential executor (:mod:`memforge.engine.sequential`) are built in, in that
order; other modules register theirs with :func:`register_executor`.

The closed-form executor (:class:`ClosedFormExecutor`) wraps the chunk kernel
(:mod:`memforge.engine.chunked`): the gradient of every token of a chunk at the chunk-start
weights, momentum and a scalar retention per token, any network whose fast weights are matrices,
any objective (side input and a window of the last ``c`` pairs with their weights included), any
read. It also decodes with fixed shapes (:mod:`memforge.engine.static_chunk`) and compiles its
chunk step (a window's chunks run eagerly).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from memforge.engine.chunked import current_weights, initial_state, memory_scan
from memforge.engine.sequential import SequentialExecutor
from memforge.engine.static_chunk import static_chunk, static_chunk_step
from memforge.engine.wy_executor import WYExecutor
from memforge.errors import SpecError
from memforge.interfaces import (
    TIERS,
    MemoryNetwork,
    Objective,
    Optimizer,
    ProjectsWeights,
    Retention,
    RetrievalRule,
    TransformsUpdate,
)


class LearningRule(NamedTuple):
    """What an executor looks at: the rule's modules (not their configs) and its schedule.

    A NamedTuple (immutable, and made inside compiled code: ``torch.compile`` traces its
    construction where it cannot trace a frozen attrs class's).

    Attributes:
        network: the memory network ``M`` (kind ``memory``).
        objective: the per-pair loss and its window (kind ``objective``).
        optimizer: step sizes, momentum, an optional update transform (kind ``optimizer``).
        retention: the scalar decay in log space, an optional projection (kind ``retention``).
        retrieval: which weights a token reads (kind ``retrieval``).
        chunk_size: tokens whose updates are computed together (``>= 1``).
    """

    network: MemoryNetwork
    objective: Objective
    optimizer: Optimizer
    retention: Retention
    retrieval: RetrievalRule
    chunk_size: int


class RuleInputs(NamedTuple):
    """The per-token inputs of one scan, in kernel layout: ``N = B * H`` sequences and heads,
    sequence-major and head-minor (``n = b * H + h``).

    Attributes:
        queries: ``[N, T, d_key]``.
        keys: ``[N, T, d_key]``.
        values: ``[N, T, d_value]``.
        lr: step sizes ``theta >= 0`` ``[N, T]``.
        momentum: ``eta`` in ``[0, 1]`` ``[N, T]``, or ``None`` without momentum.
        log_keep: ``log keep <= 0`` ``[N, T]``, or ``None`` without retention decay.
        side: the objective's side input ``[N, T]``, or ``None`` when it takes none.
        window: the objective's window weights ``gamma`` ``[N, T]``, or ``None`` (all 1).
    """

    queries: Tensor
    keys: Tensor
    values: Tensor
    lr: Tensor
    momentum: Tensor | None
    log_keep: Tensor | None
    side: Tensor | None
    window: Tensor | None


@runtime_checkable
class Executor(Protocol):
    """Runs learning rules over sequences. Every state it makes has a ``weights`` attribute: the
    fast weights at the start of the current chunk, ``[N, d_in_i, d_out_i]`` per matrix (what a
    layer checks a carried state's shapes against, and inspects)."""

    #: The executor's name (``"closed_form"``, ``"sequential"``, ``"wy"``).
    name: str

    def refusal(self, rule: LearningRule) -> str | None:
        """Why this executor cannot run ``rule`` (one clause naming the part and what it lacks),
        or ``None`` when it can."""
        ...

    def tier(self, rule: LearningRule) -> str:
        """The exactness tier (one of :data:`memforge.interfaces.TIERS`) it runs ``rule`` at."""
        ...

    def initial_state(self, rule: LearningRule, batch: int, inputs: RuleInputs) -> Any:
        """The state at the start of ``batch`` sequences; ``inputs`` (the first call's) say which
        optional inputs (momentum, log_keep, side, window) every later call passes."""
        ...

    def scan(self, rule: LearningRule, state: Any, inputs: RuleInputs, *,
             compiled: bool = False) -> tuple[Tensor, Any]:
        """Write and read ``T`` tokens: ``(outputs [N, T, d_value], new_state)``. Feeding a
        sequence in pieces with the state carried equals feeding it whole. ``compiled``: run the
        executor's per-chunk step through ``torch.compile`` where it has one (one without runs
        eagerly; results agree up to float rounding)."""
        ...

    def current_weights(self, rule: LearningRule, state: Any) -> tuple[Tensor, ...]:
        """The fast weights after every token ``state`` has seen (pure: ``state`` unchanged)."""
        ...


@runtime_checkable
class DecodesRuleStatically(Protocol):
    """Capability of an executor: single-token decoding with fixed-shape buffers (what a layer's
    :class:`memforge.interfaces.DecodesMemoryStatically` needs)."""

    def static_buffers(self, rule: LearningRule, state: Any) -> Any:
        """Buffers holding ``state`` (copies; a step changes them in place). They have a
        ``weights`` attribute: the chunk-start fast weights they hold."""
        ...

    def static_phase(self, rule: LearningRule, state: Any) -> int:
        """Tokens of the current chunk ``state`` has seen (``0 <= phase < chunk_size``)."""
        ...

    def static_step(self, rule: LearningRule, buffers: Any, inputs: RuleInputs,
                    completes: bool) -> Tensor:
        """One token (``T = 1`` inputs): update ``buffers`` in place, return ``[N, 1, d_value]``;
        ``completes``: the token is the last of its chunk."""
        ...


class ClosedFormExecutor:
    """The closed-form chunk kernel (:func:`memforge.engine.chunked.memory_scan`).

    Runs every rule whose step is linear in the chunk's gradients: no update transform, no weight
    projection, the gradient at the undecayed state; an objective's window of ``c`` pairs with
    weights ``gamma`` is a fixed mix of the gradients (:mod:`memforge.engine.chunk_window`).
    Tier ``chunk-start`` (``token-exact`` at chunk size 1).
    """

    name = "closed_form"

    def refusal(self, rule: LearningRule) -> str | None:
        """See :meth:`Executor.refusal`."""
        optimizer, retention = rule.optimizer, rule.retention
        if isinstance(optimizer, TransformsUpdate):
            return (f"optimizer {type(optimizer).__name__} transforms its update "
                    f"(applies_at={optimizer.applies_at!r}), which the closed form cannot apply")
        if isinstance(retention, ProjectsWeights):
            return (f"retention {type(retention).__name__} projects the weights "
                    f"(applies_at={retention.applies_at!r}), which the closed form cannot apply")
        if getattr(type(retention), "decay_before_gradient", False):
            return (f"retention {type(retention).__name__} takes the gradient at the decayed "
                    f"state (decay_before_gradient), the closed form at the chunk-start state")
        window = getattr(rule.objective, "window", 1)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            return (f"objective {type(rule.objective).__name__} has window {window!r}; the "
                    "window must be an int >= 1")
        return None

    def tier(self, rule: LearningRule) -> str:
        """``token-exact`` at chunk size 1, else ``chunk-start``."""
        return "token-exact" if rule.chunk_size == 1 else "chunk-start"

    def initial_state(self, rule: LearningRule, batch: int, inputs: RuleInputs) -> Any:
        """:func:`memforge.engine.chunked.initial_state` with the inputs' optional gates."""
        window = _window(rule)
        return initial_state(rule.network, batch, momentum_enabled=inputs.momentum is not None,
                             decay_enabled=inputs.log_keep is not None,
                             side_enabled=inputs.side is not None,
                             key_width=inputs.keys.shape[-1], window=window,
                             window_enabled=window > 1 and inputs.window is not None)

    def scan(self, rule: LearningRule, state: Any, inputs: RuleInputs, *,
             compiled: bool = False) -> tuple[Tensor, Any]:
        """:func:`memforge.engine.chunked.memory_scan`; a window of one's weights ``gamma``
        scale the step sizes (``theta_t gamma_t``: the token's only pair)."""
        window = _window(rule)
        if window == 1:
            return memory_scan(rule.network, rule.objective, rule.retrieval, state,
                               *_fold_window(inputs)[:7], chunk_size=rule.chunk_size,
                               compiled=compiled)
        return memory_scan(rule.network, rule.objective, rule.retrieval, state, *inputs[:8],
                           chunk_size=rule.chunk_size, compiled=compiled, window=window)

    def current_weights(self, rule: LearningRule, state: Any) -> tuple[Tensor, ...]:
        """:func:`memforge.engine.chunked.current_weights`."""
        return current_weights(rule.network, rule.objective, state, _window(rule))

    def static_buffers(self, rule: LearningRule, state: Any) -> Any:
        """:func:`memforge.engine.static_chunk.static_chunk` (a ``StaticChunk``)."""
        return static_chunk(rule.network, rule.objective, state, rule.chunk_size,
                            window=_window(rule))

    def static_phase(self, rule: LearningRule, state: Any) -> int:
        """The pending tokens of ``state``'s unfinished chunk."""
        return state.pending.keys.shape[1]

    def static_step(self, rule: LearningRule, buffers: Any, inputs: RuleInputs,
                    completes: bool) -> Tensor:
        """:func:`memforge.engine.static_chunk.static_chunk_step`."""
        window = _window(rule)
        if window == 1:
            return static_chunk_step(rule.network, rule.objective, rule.retrieval, buffers,
                                     *_fold_window(inputs)[:7], completes=completes)
        return static_chunk_step(rule.network, rule.objective, rule.retrieval, buffers,
                                 *inputs[:8], completes=completes, window=window)


def _window(rule: LearningRule) -> int:
    """The objective's window ``c`` (1 when it declares none)."""
    return int(getattr(rule.objective, "window", 1))


def _fold_window(inputs: RuleInputs) -> RuleInputs:
    """A window of one's weights folded into the step sizes (``inputs`` as they are without)."""
    if inputs.window is None:
        return inputs
    return inputs._replace(lr=inputs.lr * inputs.window, window=None)


#: Every executor by name, in preference order for ``"auto"``: the WY kernel (token-exact where
#: it runs), the closed form, then the sequential executor, which runs every rule.
EXECUTORS: dict[str, Executor] = {"wy": WYExecutor(), "closed_form": ClosedFormExecutor(),
                                  "sequential": SequentialExecutor()}

#: Where a registered executor goes in the preference order (lower first); unknown names last.
_PREFERENCE = {"wy": 0, "closed_form": 1, "sequential": 2}


def register_executor(executor: Executor) -> None:
    """Add ``executor`` to :data:`EXECUTORS` under ``executor.name`` (replacing one of that name),
    keeping the preference order ``wy``, ``closed_form``, ``sequential``, then others in the
    order they were registered."""
    if not isinstance(executor, Executor):
        raise TypeError(f"{type(executor).__name__} is not an Executor "
                        f"(memforge.engine.executors.Executor)")
    entries = dict(EXECUTORS)
    entries[executor.name] = executor
    order = sorted(entries, key=lambda name: _PREFERENCE.get(name, len(_PREFERENCE)))
    EXECUTORS.clear()
    EXECUTORS.update((name, entries[name]) for name in order)


def describe_parts(rule: LearningRule) -> str:
    """The rule's components by class name, for messages (``MLPMemory, L2Objective, ...``)."""
    parts = (("memory", rule.network), ("objective", rule.objective),
             ("optimizer", rule.optimizer), ("retention", rule.retention),
             ("retrieval", rule.retrieval))
    return ", ".join(f"{kind} {type(part).__name__}" for kind, part in parts)


def select_executor(rule: LearningRule, requested: str = "auto") -> Executor:
    """The executor that runs ``rule``: the first of :data:`EXECUTORS` that does not refuse it
    (``"auto"``) or the one named by ``requested``.

    Raises:
        SpecError: one line naming the rule's components, why each executor refuses, and the
            fix, when no executor (or not the requested one) can run the rule, or ``requested``
            names no executor.
    """
    if requested != "auto" and requested not in EXECUTORS:
        raise SpecError(f"unknown executor {requested!r}; available: auto, "
                        f"{', '.join(EXECUTORS)}")
    candidates = list(EXECUTORS.values()) if requested == "auto" else [EXECUTORS[requested]]
    refusals = []
    for executor in candidates:
        why = executor.refusal(rule)
        if why is None:
            tier = executor.tier(rule)
            if tier not in TIERS:
                raise SpecError(f"executor {executor.name!r} reports tier {tier!r}, not one of "
                                f"{', '.join(TIERS)}")
            return executor
        refusals.append(f"{executor.name}: {why}")
    if requested != "auto":
        runs = [e.name for e in EXECUTORS.values() if e.refusal(rule) is None]
        fix = (f"use executor 'auto' (it picks {runs[0]!r})" if runs
               else "choose components that some executor runs")
        raise SpecError(f"executor {requested!r} cannot run the rule ({describe_parts(rule)}): "
                        f"{refusals[0].split(': ', 1)[1]}; {fix}")
    raise SpecError(f"no executor can run the rule ({describe_parts(rule)}): "
                    f"{'; '.join(refusals)}; choose components that one of them runs")


__all__ = [
    "EXECUTORS",
    "ClosedFormExecutor",
    "DecodesRuleStatically",
    "Executor",
    "LearningRule",
    "RuleInputs",
    "describe_parts",
    "register_executor",
    "select_executor",
]
