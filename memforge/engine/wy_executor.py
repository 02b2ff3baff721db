"""The WY executor: token-exact, at any chunk size, for the delta rule at the decayed state
(docs/memory.md, "Executors"; the kernel is :mod:`memforge.engine.wy`).

It runs a learning rule that is exactly DeltaNet or Gated DeltaNet: a single-matrix memory
``M(k) = k W`` (``linear_map``), the squared error ``0.5 * ||M(k) - v||^2`` over the token's own
pair (``squared_error``, window 1), plain gradient descent (no momentum, no update transform), and
either no decay (``full_retention``) or a scalar decay taken *before* the gradient
(``decay_before_gradient``), every token read after its own write. Per sequence and head::

    W_t = keep_t W_{t-1} - theta_t k_t^T (k_t keep_t W_{t-1} - v_t)        o_t = q_t W_t

which is the kernel's ``S_t = gamma_t S_{t-1} + beta_t k_t (v_t - gamma_t S_{t-1}^T k_t)^T`` with
``S = W``, ``beta = theta`` (times the objective's window weight ``gamma_t`` when it has one) and
``g = log_keep``. The kernel carries the state exactly at any ``T``, so the executor's state is
just the weights after every token so far: split anywhere, the scan equals the whole. Fixed-shape
decoding (``DecodesRuleStatically``) is one recurrence step per token on a copy of the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from memforge.engine.wy import WYWrite, wy_read, wy_write
from memforge.interfaces import ProjectsWeights, TransformsUpdate, retrieval_reads

if TYPE_CHECKING:
    from memforge.engine.executors import LearningRule, RuleInputs

__all__ = ["WYExecutor", "WYState"]


class WYState(NamedTuple):
    """State of the WY executor between calls.

    Attributes:
        weights: ``(W,)``, the fast weights after every token so far ``[N, d_k, d_v]`` (the chunk
            start of the next call: nothing is pending).
    """

    weights: tuple[Tensor]


class _AfterWriteReader:
    """What the WY kernel offers a retrieval rule: reads after the token's own write only
    (:class:`memforge.interfaces.ReadsAfterWrite`)."""

    def __init__(self, write: WYWrite) -> None:
        self._write = write

    def after_write(self, queries: Tensor) -> Tensor:
        """Read query ``t`` ``[N, T, d_k]`` with ``M_t`` (after token ``t`` writes)."""
        return wy_read(self._write, queries)


class _StepReader:
    """The reads of one decode step: its single query after the token's write."""

    def __init__(self, weights: Tensor) -> None:
        self._weights = weights

    def after_write(self, queries: Tensor) -> Tensor:
        """``q W`` for the step's queries ``[N, 1, d_k]`` and the weights after its write."""
        return queries @ self._weights


def _step_sizes(rule: LearningRule, inputs: RuleInputs) -> Tensor:
    """``beta = theta`` (times the window weight ``gamma`` where the objective gives one),
    after checking the parts gave what they declared.

    Raises:
        ValueError: momentum gates from an optimiser declaring ``uses_momentum = False``, or a
            decay from a retention that is neither ``decay_before_gradient`` nor a decay at all.
    """
    if inputs.momentum is not None:
        raise ValueError(f"optimizer {_name(rule.optimizer)} declares uses_momentum = False "
                         f"but gave momentum gates")
    if inputs.log_keep is not None and not getattr(rule.retention, "decay_before_gradient",
                                                   False):
        raise ValueError(f"retention {_name(rule.retention)} declares full_retention = True "
                         f"but gave a decay")
    return inputs.lr if inputs.window is None else inputs.lr * inputs.window


def _name(part: object) -> str:
    return type(part).__name__


class WYExecutor:
    """The WY (UT-transform) chunked kernel as an executor (name ``"wy"``, tier ``token-exact``
    at every chunk size). See the module docstring for the rules it runs."""

    name = "wy"

    def refusal(self, rule: LearningRule) -> str | None:
        """See :meth:`memforge.engine.executors.Executor.refusal`."""
        network, objective, optimizer = rule.network, rule.objective, rule.optimizer
        retention, retrieval = rule.retention, rule.retrieval
        if not getattr(network, "linear_map", False) or len(network.initial_weights()) != 1:
            return (f"memory {_name(network)} is not a single matrix M(k) = k W (it does not "
                    f"declare linear_map = True)")
        if not getattr(objective, "squared_error", False):
            return (f"objective {_name(objective)} is not the squared error 0.5 ||M(k) - v||^2 "
                    f"(it does not declare squared_error = True)")
        window = getattr(objective, "window", 1)
        if window != 1:
            return f"objective {_name(objective)} sums a window of {window} tokens, WY one"
        if isinstance(optimizer, TransformsUpdate):
            return (f"optimizer {_name(optimizer)} transforms its update "
                    f"(applies_at={optimizer.applies_at!r}), which WY cannot apply")
        if getattr(optimizer, "uses_momentum", True):
            return (f"optimizer {_name(optimizer)} may carry momentum (it does not declare "
                    f"uses_momentum = False); WY runs plain gradient steps")
        if isinstance(retention, ProjectsWeights):
            return (f"retention {_name(retention)} projects the weights "
                    f"(applies_at={retention.applies_at!r}), which WY cannot apply")
        if not (getattr(retention, "decay_before_gradient", False)
                or getattr(retention, "full_retention", False)):
            return (f"retention {_name(retention)} decays after the gradient (Titans' order); WY "
                    f"takes the gradient at the decayed state (decay_before_gradient = True) or "
                    f"runs no decay (full_retention = True)")
        reads = retrieval_reads(retrieval)
        if reads != {"after_write"}:
            return (f"retrieval {_name(retrieval)} reads {', '.join(sorted(reads))}; WY reads "
                    f"only after the token's own write (after_write, M_t)")
        return None

    def tier(self, rule: LearningRule) -> str:
        """``token-exact`` at every chunk size."""
        return "token-exact"

    def initial_state(self, rule: LearningRule, batch: int, inputs: RuleInputs) -> WYState:
        """The network's initial matrix repeated to ``[batch * H, d_k, d_v]`` (sequence-major,
        head-minor), connected to the parameter so outer gradients reach it."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        (initial,) = rule.network.initial_weights()
        return WYState((initial.repeat(batch, 1, 1),))

    def scan(self, rule: LearningRule, state: WYState, inputs: RuleInputs, *,
             compiled: bool = False) -> tuple[Tensor, WYState]:
        """Write and read ``T`` tokens through the WY kernel (``compiled`` is ignored: the kernel
        is a few large matmuls per call, with nothing to fuse).

        The squared error reads no side input (``inputs.side`` is ignored); a window weight
        ``gamma_t`` scales the token's step (``beta = theta * gamma``).

        Raises:
            ValueError: the optimiser gave momentum gates, or a ``full_retention`` retention a
                decay, against its declaration.
        """
        beta = _step_sizes(rule, inputs)
        write = wy_write(inputs.keys, inputs.values, beta, inputs.log_keep, state.weights[0],
                         rule.chunk_size)
        outputs = rule.retrieval(_AfterWriteReader(write), inputs.queries)
        return outputs, WYState((write.state,))

    def current_weights(self, rule: LearningRule, state: WYState) -> tuple[Tensor, ...]:
        """The weights after every token ``state`` has seen (the state itself)."""
        return state.weights

    # -- fixed-shape decoding (memforge.engine.executors.DecodesRuleStatically) ------------------
    def static_buffers(self, rule: LearningRule, state: WYState) -> WYState:
        """A copy of the weights (a step updates it in place)."""
        return WYState(tuple(w.clone() for w in state.weights))

    def static_phase(self, rule: LearningRule, state: WYState) -> int:
        """Always 0: every token's write is complete when its step returns; nothing is pending."""
        return 0

    def static_step(self, rule: LearningRule, buffers: WYState, inputs: RuleInputs,
                    completes: bool) -> Tensor:
        """One token of the recurrence on ``buffers`` (in place), read after its write:
        ``[N, 1, d_v]``. ``completes`` changes nothing (there is no pending chunk)."""
        (weights,) = buffers.weights
        beta = _step_sizes(rule, inputs)[:, 0, None, None]
        keys, values = inputs.keys[:, 0], inputs.values[:, 0]
        decayed = (weights if inputs.log_keep is None
                   else inputs.log_keep[:, 0, None, None].exp() * weights)
        error = values - (keys[:, None, :] @ decayed)[:, 0]
        weights.copy_(torch.baddbmm(decayed, beta * keys[:, :, None], error[:, None, :]))
        return rule.retrieval(_StepReader(weights), inputs.queries)
