"""The sequential-in-chunks executor: runs every learning rule, exact for its tier
(docs/memory.md, "The sequential executor").

Per chunk of ``b`` tokens with start weights ``W0`` and momentum ``S0`` (chunks are ``[0, b),
[b, 2b), ...`` from the sequence start), for token ``t`` of the chunk::

    u_t = sum_{i=t-c+1..t} gamma_i * grad_W loss(M_{W0}(k_i), v_i; side_i)   # c = window
    S_t = eta_t S_{t-1} + theta_t u_t          # S_t = theta_t u_t without momentum
    D_t = transform(S_t)                       # an optimiser's "token" transform, else S_t
    W_t = keep_t W_{t-1} - D_t                 # keep_t = exp(log_keep_t)
    W_t = project(W_t, W_init)                 # a retention's "token" projection, if any

Pairs ``i`` from before the chunk (a window reaching back) are carried and re-evaluated at
``W0``. A retention with ``decay_before_gradient`` takes the gradient at ``keep_t W0`` (chunk
size 1 only). At the chunk's end a ``"chunk_end"`` transform replaces the chunk's summed update
``U = keep_prod W0 - W_end`` by ``transform(U)`` and a ``"chunk_end"`` projection maps the
result; such rules read at the chunk start only. A *mirror* projection (``mirror = True``:
Moneta's ℓq link, Memora's softmax) maps an unprojected state ``D`` that the executor carries
beside the weights: the linear update above moves ``D`` (``D_0`` = the initial weights) and
``W = project(D)`` is what gradients and reads use.

Every per-token gradient is an outer product ``x_i^T g_i`` of a matrix input and its
back-propagated error, computed for a whole chunk (and every memory) in one forward/backward.
Without per-token transforms or projections the recurrences inside a chunk are linear, and the
chunk moves in closed form (one weighted ``X^T G`` matmul per matrix, reads in the TTT dual
form). A per-token transform that factors through the update's Gram matrix (Muon), read at the
chunk start, moves the chunk through its tokens' Gram matrices (:mod:`memforge.engine.gram_chunk`).
Otherwise a Python loop over the chunk's tokens applies them. Autograd runs through
everything, so outer gradients reach the initial weights, inputs and gates.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from memforge.engine.derived_backward import with_backward
from memforge.engine.gram_chunk import gram_chunk_end
from memforge.engine.window import WindowHistory, join_time, window_mix
from memforge.interfaces import (
    FactorsThroughGram,
    LinearFn,
    MemoryNetwork,
    ProjectsWeights,
    TransformsUpdate,
    retrieval_reads,
)

if TYPE_CHECKING:
    from memforge.engine.executors import LearningRule, RuleInputs

#: Where an update transform or a weight projection may apply.
APPLIES_AT: tuple[str, ...] = ("token", "chunk_end")


class PendingTokens(NamedTuple):
    """The ``r`` tokens already seen of the current, unfinished chunk (``r`` may be 0).

    Their writes are recomputed in the next call from the same chunk-start weights, so feeding a
    sequence in pieces equals feeding it whole. Fields are ``[N, r, d]`` / ``[N, r]``; the
    optional ones are ``None`` exactly when the inputs that made the state had them ``None``.
    """

    keys: Tensor
    values: Tensor
    lr: Tensor
    momentum: Tensor | None
    log_keep: Tensor | None
    side: Tensor | None
    window: Tensor | None


class SequentialState(NamedTuple):
    """State of the sequential executor between calls.

    Attributes:
        weights: ``W`` at the start of the current chunk, one ``[N, d_in_i, d_out_i]`` per matrix.
        momentum: ``S`` at the start of the current chunk, same shapes; ``()`` without momentum.
        initial: the weights at the start of the sequence (a projection's reference); ``()``
            when the retention does not project.
        pending: the tokens of the current chunk seen so far.
        history: the window's pairs from before the current chunk.
        dual: for a mirror projection, the unprojected state ``D`` at the start of the current
            chunk (``weights = project(dual)``); ``()`` otherwise.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    initial: tuple[Tensor, ...]
    pending: PendingTokens
    history: WindowHistory
    dual: tuple[Tensor, ...] = ()


class _Parts(NamedTuple):
    """What the executor reads off a rule's components (their declared capabilities)."""

    window: int
    decay_first: bool
    transform: Callable[[Tensor], Tensor] | None
    transform_at: str | None
    project: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]] | None
    project_at: str | None
    mirror: bool
    params: tuple[Tensor, ...] = ()
    gram_factor: Callable[[Tensor], Tensor] | None = None

    @property
    def per_token(self) -> bool:
        """Whether a part applies at every token (the chunk then needs the token loop)."""
        return "token" in (self.transform_at, self.project_at)

    @property
    def at_chunk_end(self) -> bool:
        """Whether a part applies once per chunk, to the chunk's end weights."""
        return "chunk_end" in (self.transform_at, self.project_at)


def _parts(rule: LearningRule) -> _Parts:
    """The capabilities of ``rule``'s objective, optimiser and retention."""
    optimizer, retention = rule.optimizer, rule.retention
    transforms = isinstance(optimizer, TransformsUpdate)
    projects = isinstance(retention, ProjectsWeights)
    return _Parts(
        window=int(getattr(rule.objective, "window", 1)),
        decay_first=bool(getattr(retention, "decay_before_gradient", False)),
        transform=optimizer.transform if transforms else None,
        transform_at=optimizer.applies_at if transforms else None,
        project=retention.project if projects else None,
        project_at=retention.applies_at if projects else None,
        mirror=projects and bool(getattr(retention, "mirror", False)),
        # What a transform or projection may read besides its arguments (a learned scale).
        params=tuple(p for part in (optimizer, retention) if isinstance(part, nn.Module)
                     for p in part.parameters() if p.requires_grad),
        gram_factor=optimizer.gram_factor if transforms and isinstance(optimizer, FactorsThroughGram)
        else None,
    )


class SequentialExecutor:
    """The :class:`memforge.engine.executors.Executor` that runs every rule (name
    ``"sequential"``): chunk by chunk, the gradients batched over the chunk's tokens, the
    per-token parts in a loop over tokens. The reference it is tested against is
    :func:`memforge.engine.rule_reference.rule_reference`."""

    name = "sequential"

    def refusal(self, rule: LearningRule) -> str | None:
        """Why this executor cannot run ``rule``, in one line naming the component and the fix;
        ``None`` when it can."""
        parts = _parts(rule)
        if parts.window < 1:
            return (f"objective {type(rule.objective).__name__} has window {parts.window}; "
                    "the window must be an int >= 1")
        for kind, component, where in (("optimizer", rule.optimizer, parts.transform_at),
                                       ("retention", rule.retention, parts.project_at)):
            if where is not None and where not in APPLIES_AT:
                return (f"{kind} {type(component).__name__} applies at {where!r}; the sequential "
                        f"executor applies transforms and projections at one of {APPLIES_AT}")
        if parts.decay_first and rule.chunk_size > 1:
            return (f"retention {type(rule.retention).__name__} takes the gradient at the decayed "
                    f"state (decay_before_gradient), which the sequential executor runs only at "
                    f"chunk_size 1 (got {rule.chunk_size}); set chunk_size=1 or use the wy executor")
        exact = retrieval_reads(rule.retrieval) - {"at_chunk_start"}
        if parts.at_chunk_end and exact:
            return (f"retrieval {type(rule.retrieval).__name__} reads {', '.join(sorted(exact))}, "
                    "but a rule with a chunk_end transform or projection has no per-token "
                    "weights inside a chunk; read at the chunk start (at_chunk_start)")
        return None

    def tier(self, rule: LearningRule) -> str:
        """``token-exact`` at chunk size 1, ``rule-specific`` with a part applied at chunk ends,
        ``chunk-start`` otherwise (docs/memory.md, "Exactness tiers")."""
        if rule.chunk_size == 1:
            return "token-exact"
        return "rule-specific" if _parts(rule).at_chunk_end else "chunk-start"

    def initial_state(self, rule: LearningRule, batch: int, inputs: RuleInputs) -> SequentialState:
        """The state at the start of ``batch`` sequences: the network's initial weights repeated
        to ``[batch * H, d_in, d_out]`` (connected to the parameters), ``S = 0``, nothing pending.
        Which of ``inputs``' optional fields are ``None`` is fixed for every later call."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        weights = tuple(w.repeat(batch, 1, 1) for w in rule.network.initial_weights())
        momentum = tuple(torch.zeros_like(w) for w in weights) if inputs.momentum is not None else ()
        parts = _parts(rule)
        initial = weights if parts.project is not None else ()
        dual = ()
        if parts.mirror:
            # A mirror map's linear state starts at the initial weights; the memory reads its map.
            dual, weights = weights, tuple(parts.project(weights, initial))
        n, like = weights[0].shape[0], weights[0]
        empty = like.new_zeros(n, 0)

        def optional(x: Tensor | None) -> Tensor | None:
            return None if x is None else empty

        keys = like.new_zeros(n, 0, inputs.keys.shape[-1])
        values = like.new_zeros(n, 0, inputs.values.shape[-1])
        pending = PendingTokens(keys, values, empty, optional(inputs.momentum),
                                optional(inputs.log_keep), optional(inputs.side),
                                optional(inputs.window))
        history = WindowHistory(keys, values, optional(inputs.side), optional(inputs.window))
        return SequentialState(weights, momentum, initial, pending, history, dual)

    def scan(self, rule: LearningRule, state: SequentialState, inputs: RuleInputs, *,
             compiled: bool = False) -> tuple[Tensor, SequentialState]:
        """Write ``T`` tokens and read ``T`` queries; returns ``(outputs [N, T, d_value], state)``.

        Calls may end mid-chunk: the partial chunk's tokens stay pending (visible to exact reads
        and :meth:`current_weights`), so a sequence split anywhere equals it whole. ``compiled``
        changes nothing: this executor has no compiled step and always runs eagerly.
        """
        _check_inputs(state, inputs, rule.chunk_size)
        size, parts = rule.chunk_size, _parts(rule)
        network = with_backward(rule.network)
        exact = bool(retrieval_reads(rule.retrieval) - {"at_chunk_start"})
        queries = inputs.queries
        n, steps = inputs.keys.shape[:2]
        if steps == 0:
            return queries.new_zeros(n, 0, inputs.values.shape[-1]), state
        pending = state.pending
        done = pending.keys.shape[1]
        stream = PendingTokens(*(None if old is None else torch.cat((old, new), 1) if done else new
                                 for old, new in zip(pending, _tokens(inputs), strict=True)))
        total = done + steps
        weights, moments, history, dual = state.weights, state.momentum, state.history, state.dual
        # Split once: slicing a chunk per step would make every slice's backward fill a zero
        # tensor as long as the call (quadratic in the length).
        sizes = [min(size, total - start) for start in range(0, total, size)]
        chunks = [PendingTokens(*fields) for fields in zip(*(
            [None] * len(sizes) if x is None else x.split(sizes, 1) for x in stream), strict=True)]
        query_chunks = queries.split([sizes[0] - done, *sizes[1:]], 1)
        outputs: list[Tensor] = []
        for index, (chunk, chunk_queries) in enumerate(zip(chunks, query_chunks, strict=True)):
            rows = slice(done if index == 0 else 0, sizes[index])
            step = _ChunkStep(network, rule.objective, parts, weights, moments, state.initial,
                              history, chunk, exact_reads=exact, dual=dual)
            outputs.append(rule.retrieval(_ChunkReader(step, rows), chunk_queries))
            if sizes[index] == size:
                weights, moments, dual = step.end()
                history = _advance_history(history, chunk, parts.window)
        unfinished = chunks[-1] if sizes[-1] < size else _empty(chunks[-1])
        # Copies, not views: a carried state must not keep the whole call's inputs alive.
        new_pending = PendingTokens(*(None if x is None else x.clone() for x in unfinished))
        history = WindowHistory(*(None if x is None else x.clone() for x in history))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)
        return out, SequentialState(weights, moments, state.initial, new_pending, history, dual)

    def current_weights(self, rule: LearningRule, state: SequentialState) -> tuple[Tensor, ...]:
        """The weights after every token so far (pure). The pending tokens count as a chunk that
        ends now: a ``"chunk_end"`` part is applied to them as if their chunk ended here."""
        if state.pending.keys.shape[1] == 0:
            return state.weights
        step = _ChunkStep(with_backward(rule.network), rule.objective, _parts(rule), state.weights,
                          state.momentum, state.initial, state.history, state.pending,
                          exact_reads=False, dual=state.dual)
        return step.end()[0]


# --------------------------------------------------------------------------------------------
# One chunk


class _ChunkStep:
    """One chunk (possibly unfinished): its gradient pairs at the chunk-start weights, its
    per-token weights for exact reads, and its end state. Everything is computed on first use,
    so a decoding step that only reads at the chunk start costs one read."""

    def __init__(self, network: MemoryNetwork, objective: Any, parts: _Parts,
                 weights: tuple[Tensor, ...], moments: tuple[Tensor, ...],
                 initial: tuple[Tensor, ...], history: WindowHistory, chunk: PendingTokens,
                 *, exact_reads: bool, dual: tuple[Tensor, ...] = ()) -> None:
        self.network, self.objective, self.parts = network, objective, parts
        # What the linear update moves: the unprojected state of a mirror map, else the weights.
        self.base = dual if parts.mirror else weights
        self.weights, self.moments, self.initial = weights, moments, initial
        self.history, self.chunk, self.exact_reads = history, chunk, exact_reads
        self._pairs: list[tuple[Tensor, Tensor]] | None = None
        self._mix: Tensor | None = None
        self._linear: _LinearCoefficients | None = None
        self._loop: tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...], tuple[Tensor, ...]] | None = None

    @property
    def length(self) -> int:
        """Tokens in the chunk."""
        return self.chunk.keys.shape[1]

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(inputs_i, grads_i)`` per matrix for the history's and the chunk's pairs
        (``[N, lag + b, d]``), at the weights the gradient is taken at."""
        if self._pairs is None:
            keys = torch.cat((self.history.keys, self.chunk.keys), 1)
            values = torch.cat((self.history.values, self.chunk.values), 1)
            side = join_time(self.history.side, self.chunk.side)
            at = self.weights
            if self.parts.decay_first and self.chunk.log_keep is not None:
                # Chunk size 1: the gradient at the decayed state keep_t * W_{t-1}.
                keep = self.chunk.log_keep[:, 0].exp()[:, None, None]
                at = tuple(w * keep for w in at)
            prediction, tape = self.network.forward(keys, lambda i, h: h @ at[i])
            error = self.objective.loss_grad(prediction, values, side)
            self._pairs = self.network.backward(tape, error, lambda i, g: g @ at[i].mT)
        return self._pairs

    def mix(self) -> Tensor:
        """``[N, b, lag + b]``: entry ``[t, i]`` is ``gamma_i`` when pair ``i`` is in token
        ``t``'s window, else 0, so ``u_t = sum_i mix[t, i] x_i^T g_i``."""
        if self._mix is None:
            like = self.chunk.lr
            mix = window_mix(self.history.keys.shape[1], self.length, self.parts.window,
                             join_time(self.history.window, self.chunk.window), None, like)
            self._mix = mix.expand(like.shape[0], -1, -1)
        return self._mix

    def spread(self, coef: Tensor) -> Tensor:
        """Per-token coefficients ``[N, r, b]`` as per-pair ones ``[N, r, lag + b]``
        (``coef @ mix``; a window of one token needs no matmul)."""
        if self.parts.window > 1:
            return coef @ self.mix()
        gamma = self.chunk.window
        return coef if gamma is None else coef * gamma[:, None, :]

    def linear(self) -> _LinearCoefficients:
        """The chunk's closed-form coefficients (no per-token part)."""
        if self._linear is None:
            self._linear = _linear_coefficients(self.chunk, self.spread, full=self.exact_reads)
        return self._linear

    def loop(self) -> tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The per-token weights ``W_t``, the momentum and the linearly moved state (the weights,
        or a mirror map's unprojected state) after the chunk, token by token."""
        if self._loop is None:
            pairs = self.pairs()  # outside the recomputation: other parts of the chunk share them
            mix = self.mix() if self.parts.window > 1 else None
            chunk = self.chunk
            args = (pairs, mix, chunk.lr, chunk.momentum, chunk.log_keep, chunk.window,
                    self.base, self.moments, self.initial)
            if torch.is_grad_enabled():
                # Run without a graph, again with one in the backward: the loop's per-token
                # tensors (weight-sized, several per token) are then never kept for the whole
                # sequence, nor are its graph's small objects, which would pin the freed
                # weight-sized blocks in the allocator (docs/memory.md, "The sequential executor").
                # A partial, not a bound method: the graph must not hold this step (whose
                # results hold the graph), or the two would wait for the cycle collector.
                run = partial(_token_loop, self.parts, self.exact_reads, self.length)
                self._loop = _recomputed(run, args, self.parts.params)
            else:
                self._loop = _token_loop(self.parts, self.exact_reads, self.length, *args)
        return self._loop

    @property
    def through_gram(self) -> bool:
        """Whether the chunk's end comes from the Gram matrices of its per-token momenta
        (:mod:`memforge.engine.gram_chunk`): a token transform that factors through them, no
        token projection, and no read of a token's weights."""
        parts = self.parts
        return (parts.gram_factor is not None and parts.transform_at == "token"
                and parts.project_at != "token" and not self.exact_reads)

    def gram_end(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The linearly moved state and the momentum after the chunk, on the Gram path."""
        chunk = self.chunk
        theta, log_keep = chunk.lr, chunk.log_keep
        if chunk.momentum is None:
            own, carried = torch.diag_embed(theta), None                # S_t = theta_t u_t
        else:
            eta, carried = _momentum_products(chunk.momentum)
            own = eta * theta[:, None, :]
        to_end = None if log_keep is None else _segment_sums(log_keep)[:, -1].exp()
        keep_end = None if log_keep is None else log_keep.sum(1).exp()
        mixes = self.spread(own)
        run = partial(gram_chunk_end, self.parts.gram_factor)
        args = (self.pairs(), mixes, carried, to_end, keep_end, self.base, self.moments)
        # Each token's Gram matrix and its factor's steps are small, but b of them per memory,
        # kept for the backward, add up to gigabytes over a sequence: recomputed per chunk in
        # the backward, as the token loop is.
        weights = _recomputed(run, args, self.parts.params) if torch.is_grad_enabled() else run(*args)
        moments = self.moments
        if carried is not None:  # linear: S_b = e_b S_0 + X^T diag(q_b) G
            moments = _moved_momentum(self.moments, self.pairs(), carried[:, -1], mixes[:, -1])
        return weights, moments

    def end(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(W, S, D)`` after the chunk, with its ``"chunk_end"`` parts applied; ``D`` is a mirror
        map's unprojected state (``()`` without one)."""
        parts = self.parts
        if self.through_gram:
            weights, moments = self.gram_end()
        elif parts.per_token:
            per_token, moments, linear = self.loop()
            weights = linear if parts.mirror else per_token[-1]
        else:
            coef = self.linear()
            weights = tuple(_combine(w, s, x, g, coef.keep_end, coef.carry_end, coef.gain_end)
                            for w, s, (x, g) in zip(self.base, self.moments or (None,) * len(self.weights),
                                                    self.pairs(), strict=True))
            moments = self.moments
            if coef.momentum_keep is not None:
                moments = _moved_momentum(self.moments, self.pairs(), coef.momentum_keep,
                                          coef.momentum_gain)
        if parts.transform_at == "chunk_end":
            keep = None if self.chunk.log_keep is None else self.chunk.log_keep.sum(1).exp()[:, None, None]
            starts = self.base if keep is None else tuple(keep * w for w in self.base)
            weights = tuple(w0 - parts.transform(w0 - w) for w0, w in zip(starts, weights, strict=True))
        dual: tuple[Tensor, ...] = ()
        if parts.mirror:
            dual, weights = weights, tuple(parts.project(weights, self.initial))
        elif parts.project_at == "chunk_end":
            weights = tuple(parts.project(weights, self.initial))
        return weights, moments, dual

    def exact_linear(self, rows: slice, after: bool) -> LinearFn:
        """A ``linear`` callback applying, to query row ``l``, ``W_l`` (``after``) or ``W_{l-1}``."""
        if self.parts.per_token:
            per_token = self.loop()[0]
            stacks = [torch.stack(ws, 1) for ws in zip(*per_token, strict=True)]  # [N, b, d_in, d_out]
            if not after:
                stacks = [torch.cat((w[:, None], s[:, :-1]), 1)
                          for w, s in zip(self.weights, stacks, strict=True)]

            def per_row(i: int, h: Tensor) -> Tensor:
                return (h.unsqueeze(-2) @ stacks[i][:, rows]).squeeze(-2)

            return per_row
        coef = self.linear().after_write if after else self.linear().before_write()
        keep = None if coef.keep is None else coef.keep[:, rows]
        carry = None if coef.carry is None else coef.carry[:, rows]
        gain = coef.gain[:, rows]

        def dual(i: int, h: Tensor) -> Tensor:
            x, g = self.pairs()[i]
            out = h @ self.weights[i]
            if keep is not None:
                out = out * keep[..., None]
            if carry is not None:
                out = out - (h @ self.moments[i]) * carry[..., None]
            return torch.baddbmm(out, (h @ x.mT) * gain, g, alpha=-1)

        return dual


class _ChunkReader:
    """The :class:`memforge.interfaces.ChunkReader` of one chunk for the query rows ``rows``;
    every read is pure."""

    def __init__(self, step: _ChunkStep, rows: slice) -> None:
        self._step, self._rows = step, rows

    def at_chunk_start(self, queries: Tensor) -> Tensor:
        """Read every query with the weights at the start of the chunk."""
        weights = self._step.weights
        return self._step.network.forward(queries, lambda i, h: h @ weights[i])[0]

    def before_write(self, queries: Tensor) -> Tensor:
        """Read query ``l`` with ``W_{l-1}``."""
        return self._exact(queries, after=False)

    def after_write(self, queries: Tensor) -> Tensor:
        """Read query ``l`` with ``W_l``."""
        return self._exact(queries, after=True)

    def _exact(self, queries: Tensor, after: bool) -> Tensor:
        if self._step.parts.at_chunk_end:
            raise ValueError("a rule with a chunk_end transform or projection reads at the chunk "
                             "start only (the sequential executor refuses other retrievals)")
        if not self._step.exact_reads:
            raise ValueError("the retrieval rule declares reads = ('at_chunk_start',) but read "
                             "before or after the write; declare every read it makes")
        return self._step.network.forward(queries, self._step.exact_linear(self._rows, after))[0]


# --------------------------------------------------------------------------------------------
# Closed-form coefficients of a chunk without per-token parts


class _Coefficients(NamedTuple):
    """``W_l = keep_l W0 - carry_l S0 - sum_i gain[l, i] x_i^T g_i`` (``[N, b(, lag + b)]``)."""

    keep: Tensor | None
    carry: Tensor | None
    gain: Tensor


class _LinearCoefficients(NamedTuple):
    """A chunk's per-token (after-write) coefficients and its end.

    ``after_write`` holds every row when exact reads may come, else only the last; the end is
    ``W_b = keep_end W0 - carry_end S0 - X^T (gain_end * G)`` and
    ``S_b = momentum_keep S0 + X^T (momentum_gain * G)``.
    """

    after_write: _Coefficients
    keep_end: Tensor | None
    carry_end: Tensor | None
    gain_end: Tensor
    momentum_keep: Tensor | None
    momentum_gain: Tensor | None

    def before_write(self) -> _Coefficients:
        """The coefficients of ``W_{l-1}`` (row 0: the chunk-start weights)."""
        keep, carry, gain = self.after_write
        pad = torch.nn.functional.pad
        return _Coefficients(None if keep is None else pad(keep[:, :-1], (1, 0), value=1.0),
                             None if carry is None else pad(carry[:, :-1], (1, 0)),
                             pad(gain[:, :-1], (0, 0, 1, 0)))


def _linear_coefficients(chunk: PendingTokens, spread: Callable[[Tensor], Tensor], *,
                         full: bool) -> _LinearCoefficients:
    """With ``A_l = prod_{m<=l} keep_m``, ``E_l = prod_{m<=l} eta_m``, ``P[l, m] = A_l / A_m`` and
    ``Q[m, j] = E_m / E_j`` (both causal): ``S_l = E_l S0 + sum_j Q[l, j] theta_j u_j`` and
    ``W_l = A_l W0 - (P E)_l S0 - sum_j (P Q)[l, j] theta_j u_j``; ``spread`` maps the tokens'
    coefficients to the pairs' (``u = mix @ pairs``). ``full``: every row (for exact reads),
    else the last only."""
    theta, log_keep = chunk.lr, chunk.log_keep
    decay = None if log_keep is None else _segment_sums(log_keep).exp()
    rows = slice(None) if full else slice(-1, None)
    keep = None if log_keep is None else log_keep.cumsum(1).exp()[:, rows]
    decay_rows = None if decay is None else decay[:, rows]
    if chunk.momentum is None:
        carry = momentum_keep = momentum_gain = None
        weight = _causal_ones(theta)[rows] if decay_rows is None else decay_rows
        gain = weight * theta[:, None, :]
    else:
        eta, cumulative = _momentum_products(chunk.momentum)
        if decay_rows is None:
            weight, carry = eta.cumsum(1)[:, rows], cumulative.cumsum(1)[:, rows]
        else:
            weight, carry = decay_rows @ eta, (decay_rows @ cumulative[..., None]).squeeze(-1)
        gain = weight * theta[:, None, :]
        momentum_keep = cumulative[:, -1]
        momentum_gain = spread((eta[:, -1] * theta)[:, None, :]).squeeze(1)
    gain = spread(gain)
    after = _Coefficients(keep, carry, gain)
    return _LinearCoefficients(after, None if keep is None else keep[:, -1],
                               None if carry is None else carry[:, -1], gain[:, -1],
                               momentum_keep, momentum_gain)


def _momentum_products(momentum: Tensor) -> tuple[Tensor, Tensor]:
    """``Q`` ``[N, b, b]`` with ``Q[l, j] = E_l / E_j`` (causal) and ``E`` ``[N, b]``,
    ``E_l = prod_{m<=l} eta_m``, from the momentum gates ``eta`` ``[N, b]`` (in log space, so a
    gate of 0 stays finite)."""
    log_eta = momentum.clamp_min(torch.finfo(momentum.dtype).tiny).log()
    return _segment_sums(log_eta).exp(), log_eta.cumsum(1).exp()


def _moved_momentum(moments: tuple[Tensor, ...], pairs: list[tuple[Tensor, Tensor]], keep: Tensor,
                    gain: Tensor) -> tuple[Tensor, ...]:
    """``keep S0 + X^T diag(gain) G`` per matrix: the momentum at a chunk's end."""
    return tuple(torch.baddbmm(s * keep[:, None, None], *_weighted(x, g, gain))
                 for s, (x, g) in zip(moments, pairs, strict=True))


def _segment_sums(log_gate: Tensor) -> Tensor:
    """``[N, b] -> [N, b, b]``, entry ``[l, m] = sum_{m<j<=l} log_gate_j``, ``-inf`` above the
    diagonal (``exp`` gives exactly 0 there, with a zero gradient). Differences of cumulative
    sums in float64: in float32 they would lose ``|sum| * 6e-8`` to cancellation."""
    sums = log_gate.to(torch.float64).cumsum(-1) if log_gate.device.type != "mps" else log_gate.cumsum(-1)
    causal = _causal_ones(log_gate).bool()
    return (sums[..., :, None] - sums[..., None, :]).to(log_gate.dtype).masked_fill(~causal, float("-inf"))


def _causal_ones(like: Tensor) -> Tensor:
    """The ``[b, b]`` lower-triangular all-ones matrix (``b = like.shape[-1]``)."""
    size = like.shape[-1]
    return torch.ones(size, size, dtype=like.dtype, device=like.device).tril()


def _weighted(x: Tensor, g: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """``(left, right)`` with ``left @ right = X^T diag(gain) G``, scaling the narrower side."""
    if x.shape[-1] <= g.shape[-1]:
        return (x * gain[..., None]).mT, g
    return x.mT, g * gain[..., None]


def _combine(w0: Tensor, s0: Tensor | None, x: Tensor, g: Tensor, keep: Tensor | None,
             carry: Tensor | None, gain: Tensor) -> Tensor:
    """``keep W0 - carry S0 - X^T diag(gain) G`` for one matrix."""
    base = w0 if keep is None else w0 * keep[:, None, None]
    if carry is not None:
        base = base - s0 * carry[:, None, None]
    return torch.baddbmm(base, *_weighted(x, g, gain), alpha=-1)


# --------------------------------------------------------------------------------------------
# Plumbing


def _token_loop(parts: _Parts, exact_reads: bool, length: int,
                pairs: list[tuple[Tensor, Tensor]], mix: Tensor | None, lr: Tensor,
                momentum: Tensor | None, log_keep: Tensor | None, window: Tensor | None,
                base: tuple[Tensor, ...], start_moments: tuple[Tensor, ...],
                initial: tuple[Tensor, ...]
                ) -> tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """:meth:`_ChunkStep.loop` over a chunk of ``length`` tokens, from its tensors; keeps every
    token's weights only when ``exact_reads`` need them."""
    # Token t's step theta_t u_t is built when the loop reaches it, one matmul per matrix,
    # never all b weight-sized updates at once. Unbound once (an index per token would fill
    # a zero tensor per token in the backward).
    if mix is not None:
        coefs = (lr[..., None] * mix).unbind(1)                        # [N, lag + b] each
    else:
        coefs = (lr if window is None else lr * window).unbind(1)      # [N] each
        token_pairs = [(x.unbind(1), g.unbind(1)) for x, g in pairs]
    eta = None if momentum is None else momentum[..., None, None].unbind(1)
    keep = None if log_keep is None else log_keep.exp()[..., None, None].unbind(1)
    linear, moments = base, start_moments
    per_token: list[tuple[Tensor, ...]] = []
    for t in range(length):
        if mix is not None:
            factors = [_weighted(x, g, coefs[t]) for x, g in pairs]
        else:
            factors = [((xs[t] * coefs[t][:, None])[..., None], gs[t][:, None, :])
                       for xs, gs in token_pairs]
        if eta is None:
            steps = tuple(torch.bmm(*f) for f in factors)
        else:
            steps = tuple(torch.baddbmm(eta[t] * s, *f)
                          for s, f in zip(moments, factors, strict=True))
            moments = steps
        applied = steps
        if parts.transform_at == "token":
            applied = tuple(parts.transform(s) for s in steps)
        if keep is not None:
            linear = tuple(keep[t] * w - d for w, d in zip(linear, applied, strict=True))
        else:
            linear = tuple(w - d for w, d in zip(linear, applied, strict=True))
        weights = linear
        if parts.project_at == "token":
            weights = tuple(parts.project(linear, initial))
            if not parts.mirror:
                linear = weights
        if exact_reads or t == length - 1:
            per_token.append(weights)
    return per_token, moments, linear


class _Recompute(torch.autograd.Function):
    """``fn(*tensors[:count])`` computed without a graph; the backward computes it again with one
    and differentiates that. ``tensors[count:]`` are parameters ``fn`` reads by itself."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., tuple[Tensor, ...]], count: int, *tensors: Tensor
                ) -> tuple[Tensor, ...]:
        ctx.fn, ctx.count = fn, count
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return fn(*tensors[:count])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        tensors = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors[:ctx.count]]
        create_graph = torch.is_grad_enabled()  # set by an outer create_graph=True
        with torch.enable_grad():
            outputs = ctx.fn(*inputs)
        wanted = [t for t in (*inputs, *tensors[ctx.count:]) if t.requires_grad]
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         allow_unused=True, create_graph=create_graph)
                     if pairs and wanted else ())
        return (None, None, *(next(found) if t.requires_grad else None
                              for t in (*inputs, *tensors[ctx.count:])))


def _recomputed(fn: Callable[..., Any], args: tuple[Any, ...], params: tuple[Tensor, ...]) -> Any:
    """``fn(*args)`` (nested tuples and lists of tensors, ``None``s allowed, in and out) through
    :class:`_Recompute`, with gradients to every tensor in ``args`` and to ``params``. The
    flattening is torch's own (``torch.utils._pytree``, what torch.func and torch.compile use;
    torch 2.13 has no public alias)."""
    leaves, spec = tree_flatten(args)
    where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    out_spec: list[Any] = []

    def flat(*tensors: Tensor) -> tuple[Tensor, ...]:
        filled = list(leaves)
        for i, t in zip(where, tensors, strict=True):
            filled[i] = t
        out, spec_out = tree_flatten(fn(*tree_unflatten(filled, spec)))
        out_spec[:] = [spec_out]
        return tuple(out)

    outputs = _Recompute.apply(flat, len(where), *(leaves[i] for i in where), *params)
    return tree_unflatten(list(outputs), out_spec[0])


def _tokens(inputs: RuleInputs) -> PendingTokens:
    """A call's inputs in the pending chunk's layout."""
    return PendingTokens(inputs.keys, inputs.values, inputs.lr, inputs.momentum, inputs.log_keep,
                         inputs.side, inputs.window)


def _empty(tokens: PendingTokens) -> PendingTokens:
    """No tokens, with the fields (and their ``None``s) of ``tokens``."""
    return PendingTokens(*(None if x is None else x[:, :0] for x in tokens))


def _advance_history(history: WindowHistory, chunk: PendingTokens, window: int) -> WindowHistory:
    """The last ``window - 1`` pairs up to the end of ``chunk``."""
    keep = window - 1
    fields = (torch.cat((old, new), 1)[:, max(0, old.shape[1] + new.shape[1] - keep):]
              if old is not None else None
              for old, new in zip(history, (chunk.keys, chunk.values, chunk.side, chunk.window),
                                  strict=True))
    return WindowHistory(*fields)


def _check_inputs(state: SequentialState, inputs: RuleInputs, chunk_size: int) -> None:
    """Raise a ValueError naming the first input that does not fit ``state``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not isinstance(state, SequentialState):
        raise ValueError(f"state must be a SequentialState, got {type(state).__name__}")
    n, steps = inputs.keys.shape[:2]
    for name in ("queries", "values"):
        if getattr(inputs, name).shape[:2] != (n, steps):
            raise ValueError(f"{name} must share [N, T] = {(n, steps)} with keys")
    for name in ("lr", "momentum", "log_keep", "side", "window"):
        x = getattr(inputs, name)
        if x is not None and tuple(x.shape) != (n, steps):
            raise ValueError(f"{name} must be [N, T] = {(n, steps)}, got {tuple(x.shape)}")
        if name != "lr" and (x is None) != (getattr(state.pending, name) is None):
            raise ValueError(f"{name} must be given exactly when the state was made with it")
    if state.weights[0].shape[0] != n:
        raise ValueError(f"state holds N = {state.weights[0].shape[0]} memories, inputs have {n}")
    if state.pending.keys.shape[1] >= chunk_size:
        raise ValueError(f"the state has {state.pending.keys.shape[1]} pending tokens, so "
                         f"chunk_size must be larger (got {chunk_size}); continue a state with "
                         "the chunk_size that made it")


