"""The exact chunk-parallel Titans memory kernel (docs/memory.md, "The exact chunk kernel").

Semantics, per sequence and head (``N = B * H`` of them), for token ``t`` in the chunk that starts
at ``t'`` (chunks are ``[0, b), [b, 2b), ...`` counted from the start of the sequence)::

    u_t = grad_W loss(M_{t'}(k_t), v_t; side_t)  # surprise, at the chunk-start weights
    S_t = eta_t * S_{t-1} - theta_t * u_t        # momentum (eta = 0 when it is off)
    M_t = keep_t * M_{t-1} + S_t                 # retention, keep_t = exp(log_keep_t) (1 when off)

applied to every fast-weight matrix separately (docs/memory.md, "The update rule"). The retention
arrives in log space and stays there: full forgetting is a large negative ``log_keep`` with a
finite gradient, never ``log 0``. Inside a chunk the recurrences are linear, so with
``E_l = prod_{j<=l} eta_j``, ``A_l = prod_{j<=l} keep_j``, ``Q[i, j] = E_i / E_j`` and
``P[l, i] = A_l / A_i`` (both causal) the state after chunk position ``l`` is::

    M_l = A_l M_0 + c_l S_0 - sum_j W[l, j] u_j,   c = P @ E,   W = (P @ Q) * theta[None, :]
    S_l = E_l S_0 - sum_j theta_j Q[l, j] u_j

Every ``u_j`` is an outer product ``x_j^T g_j`` (matrix input times back-propagated error), so each
weighted sum is one batched matmul ``X^T @ (w * G)``; no per-token weight copy is ever built. The
products come from segment sums in log space (no ``-inf - -inf``). Exact per-token reads use the
same coefficients in the TTT dual form.

The kernel's parts live in modules of their own: the carried state
(:mod:`memforge.engine.chunk_state`), the coefficients and the chunk-end update
(:mod:`memforge.engine.chunk_coefficients`), the per-chunk gradients and reads
(:mod:`memforge.engine.chunk_reads`); this module is the scan over chunks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from memforge.engine.chunk_coefficients import CoefficientBank, advance
from memforge.engine.chunk_reads import ClosedFormReader, LazyPairs, surprise_pairs
from memforge.engine.chunk_state import (
    FastWeightState,
    LossGradient,
    PendingChunk,
    Retrieval,
    initial_state,
)
from memforge.engine.chunk_window import WindowedBank, next_history, pending_pieces, window_pieces
from memforge.engine.window import WindowHistory, join_time
from memforge.interfaces import MemoryNetwork


def memory_scan(
    network: MemoryNetwork,
    objective: LossGradient,
    retrieval: Retrieval,
    state: FastWeightState,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    log_keep: Tensor | None,
    side: Tensor | None = None,
    gamma: Tensor | None = None,
    *,
    chunk_size: int,
    compiled: bool = False,
    window: int = 1,
) -> tuple[Tensor, FastWeightState]:
    """Write ``T`` tokens into the memory and read ``T`` queries, chunk-parallel and exact.

    Args:
        network: the memory network (its ``forward`` / ``backward`` give the surprise).
        objective: gives ``loss_grad(prediction, target, side)``, the inner loss's gradient.
        retrieval: called once per chunk as ``retrieval(reader, chunk_queries)``; ``reader`` offers
            ``at_chunk_start`` / ``before_write`` / ``after_write`` (a ``ChunkReader``). It sees
            this call's queries of that chunk only (``<= chunk_size`` rows; the first chunk's
            rows start after the pending tokens), and the reader aligns them with their
            positions in the chunk.
        state: from :func:`initial_state` or a previous call with the same ``chunk_size``.
        queries: ``[N, T, d_key]``.
        keys: ``[N, T, d_key]``.
        values: ``[N, T, d_value]``.
        lr: ``theta >= 0`` ``[N, T]``.
        momentum: ``eta`` in ``[0, 1]`` ``[N, T]``, or ``None`` for none (exactly ``eta = 0``).
        log_keep: ``log keep <= 0`` ``[N, T]`` (``log(1 - alpha)`` in Titans' terms), or ``None``
            for none (exactly ``keep = 1``).
        side: the objective's per-token side input ``[N, T]``, handed to ``loss_grad`` with each
            chunk's rows, or ``None`` for none.
        gamma: a windowed objective's weights ``[N, T]`` (one per pair), or ``None`` for all 1;
            only with ``window > 1`` (a window of one's weights are a factor of ``lr``).
        chunk_size: ``b >= 1``; chunk boundaries are multiples of ``b`` from the sequence start.
        compiled: run every chunk that this call reads whole through :func:`compiled_chunk_step`
            (``torch.compile`` of :func:`chunk_step`, one graph per chunk shape, reused by every
            chunk) instead of the eager, vectorised-over-chunks path. Same results up to float
            rounding; the first call per shape pays the compilation. A windowed objective's
            chunks run eagerly.
        window: the objective's window ``c`` (token ``t`` steps with the gradients of the last
            ``c`` pairs at the chunk-start weights, :mod:`memforge.engine.chunk_window`); the
            state must be made with the same ``window``.

    Returns:
        ``(outputs [N, T, d_value], new_state)``. Calls may end mid-chunk: the partial chunk's
        tokens are visible to exact reads and :func:`current_weights`, and stay pending.

    ``eta`` is clamped to ``>= tiny`` (of the dtype) before its log, and ``log_keep`` to
    ``>= log(tiny)``, so ``eta = 0`` and full forgetting are exact up to that tiny number and give
    finite gradients (zero below the clamp, where the true one is below ``tiny`` too).
    """
    _check_scan_inputs(network, state, queries, keys, values, lr, momentum, log_keep, side,
                       chunk_size, gamma, window)
    n, steps = keys.shape[0], keys.shape[1]
    if steps == 0:
        return queries.new_zeros(n, 0, state.pending.values.shape[2]), state
    pending = state.pending
    done = pending.keys.shape[1]
    total = done + steps
    full, partial = divmod(total, chunk_size)
    stream = PendingChunk(
        keys=torch.cat((pending.keys, keys), 1) if done else keys,
        values=torch.cat((pending.values, values), 1) if done else values,
        lr=torch.cat((pending.lr, lr), 1) if done else lr,
        momentum=join_time(pending.momentum, momentum),
        log_keep=join_time(pending.log_keep, log_keep),
        side=join_time(pending.side, side),
        window=join_time(pending.window, gamma),
    )
    # Complete chunks share one vectorised bank; an unfinished last chunk gets its own, sized to
    # its tokens. Nothing is padded: a decoding step with r pending tokens costs O(r) surprise
    # rows and O(r^2) coefficients, not O(b) and O(b^2).
    def halves(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``x`` split into its complete chunks and the unfinished rest."""
        return (None, None) if x is None else x.split((full * chunk_size, partial), dim=1)

    complete, unfinished = (PendingChunk(*fields) for fields in zip(*map(halves, stream), strict=True))
    pieces: list[tuple[CoefficientBank | WindowedBank, int, Tensor, Tensor]] = []
    side_chunks: list[Tensor | None] = []
    history = state.history
    if history is not None:  # a window: each chunk's pairs reach back window - 1 (chunk_window)
        pieces, side_chunks = _window_pieces(history, stream, complete, unfinished, full, partial,
                                             chunk_size, window)
    else:
        if full:
            bank = CoefficientBank(complete, chunk_size)
            key_chunks = _split_chunks(complete.keys, chunk_size)
            value_chunks = _split_chunks(complete.values, chunk_size)
            pieces += [(bank, i, key_chunks[i], value_chunks[i]) for i in range(full)]
            side_chunks += ([None] * full if complete.side is None
                            else list(complete.side.unflatten(1, (-1, chunk_size)).unbind(1)))
        if partial:
            pieces.append((CoefficientBank(unfinished, partial), 0, unfinished.keys,
                           unfinished.values))
            side_chunks.append(unfinished.side)
    # This call's queries per chunk, unpadded: the first chunk starts `done` rows in, the last
    # may end early. Padding them to whole chunks would multiply the read cost of decoding by b.
    first = min(chunk_size - done, steps)
    rest = [chunk_size] * ((steps - first) // chunk_size)
    sizes = [first, *rest] + ([steps - first - sum(rest)] if steps - first - sum(rest) else [])
    query_chunks = queries.split(sizes, dim=1)
    weights, moments = state.weights, state.momentum
    # The chunks the compiled step takes, copied chunk-major once (see _compiled_step_inputs).
    step_inputs = (_compiled_step_inputs(complete, queries, done, chunk_size)
                   if compiled and history is None else {})
    outputs: list[Tensor] = []
    for index, (bank, local, chunk_keys, chunk_values) in enumerate(pieces):
        if index in step_inputs:
            chunk, chunk_queries = step_inputs[index]
            out, weights, moments = compiled_chunk_step()(
                network, objective, retrieval, weights, moments, chunk, chunk_queries)
            outputs.append(out)
            continue
        pairs = LazyPairs(network, objective, weights, chunk_keys, chunk_values,
                           side_chunks[index])
        offset = done if index == 0 else 0
        rows = slice(offset, offset + query_chunks[index].shape[1])
        reader = ClosedFormReader(network, weights, moments, pairs, bank, local, rows)
        outputs.append(retrieval(reader, query_chunks[index]))
        if index < full:  # the unfinished chunk stays pending
            weights, moments = advance(weights, moments, pairs.get(), bank.end(local))
    # A copy, not a view: a carried state must not keep the whole call's inputs alive.
    new_pending = PendingChunk(*(None if x is None else x.clone() for x in unfinished))
    joined = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)  # decoding: no copy
    if history is not None and full:
        history = next_history(history, stream, full * chunk_size, window)
    return joined, FastWeightState(weights, moments, new_pending, history)


def chunk_step(
    network: MemoryNetwork,
    objective: LossGradient,
    retrieval: Retrieval,
    weights: tuple[Tensor, ...],
    moments: tuple[Tensor, ...],
    chunk: PendingChunk,
    queries: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One whole chunk: read its ``b`` queries, then move ``(M, S)`` from its start to its end.

    ``chunk`` holds the chunk's ``b`` keys, values and gates (``[N, b, .]`` / ``[N, b]``); returns
    ``(outputs [N, b, d_value], weights, moments)``. The same arithmetic as one step of
    :func:`memory_scan`'s loop, with the coefficients built for this chunk alone: written for
    ``torch.compile`` (no Python state that outlives the call), which fuses the element-wise work
    between the matmuls. :func:`memory_scan` with ``compiled=True`` runs it per chunk.
    """
    bank = CoefficientBank(chunk, queries.shape[1])
    pairs = LazyPairs(network, objective, weights, chunk.keys, chunk.values, chunk.side)
    reader = ClosedFormReader(network, weights, moments, pairs, bank, 0, slice(0, queries.shape[1]))
    outputs = retrieval(reader, queries)
    return (outputs, *advance(weights, moments, pairs.get(), bank.end(0)))


@functools.cache
def compiled_chunk_step() -> Any:
    """``torch.compile(chunk_step)``, made once per process and shared by every layer.

    ``dynamic=False``: chunks have one shape per configuration, so static shapes cost one
    compilation per (shape, dtype, device, grad mode) and give the best kernels; layers of the same
    configuration share their graphs. Past torch's recompile limit (8 by default) further shapes
    run eagerly, with torch's warning. Graph breaks in a plugin's network or retrieval are allowed
    (they only cost speed), hence no ``fullgraph``.

    ``inplace_buffers`` is off for this graph: with it, Inductor (torch 2.13, CPU) wrote a buffer in
    place that the backward still read, and the queries' gradient of an exact read came out wrong
    (depth-2 memory with decay; ``tests/test_titans_compiled.py`` caught it, ``aot_eager`` was exact).
    """
    return torch.compile(chunk_step, dynamic=False, options=INDUCTOR_OPTIONS)


#: Inductor options of :func:`compiled_chunk_step` (see there why).
INDUCTOR_OPTIONS: dict[str, Any] = {"inplace_buffers": False}


def current_weights(
    network: MemoryNetwork, objective: LossGradient, state: FastWeightState, window: int = 1
) -> tuple[Tensor, ...]:
    """Materialise ``M`` at the current position, i.e. after the pending tokens have written.

    Equals ``state.weights`` when no token is pending. Useful to read "the memory so far"; costs
    one surprise computation over the pending tokens (and, with a ``window > 1``, the carried
    pairs before them).
    """
    pending = state.pending
    done = pending.keys.shape[1]
    if done == 0:
        return state.weights
    bank = CoefficientBank(pending, done)  # the pending tokens as one chunk of `done`
    if state.history is None:
        pairs = surprise_pairs(network, objective, state.weights, pending.keys, pending.values,
                                pending.side)
        return advance(state.weights, state.momentum, pairs, bank.end(0))[0]
    keys, values, side, mix = pending_pieces(state.history, pending, window)
    pairs = surprise_pairs(network, objective, state.weights, keys, values, side)
    return advance(state.weights, state.momentum, pairs, WindowedBank(bank, [mix]).end(0))[0]


# --------------------------------------------------------------------------------------------
# Plumbing


def _split_chunks(x: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    """Split ``[N, C * b, d]`` into ``C x [N, b, d]``.

    Unbound once: slicing a chunk per loop step makes backward traffic quadratic
    (docs/memory.md, "The exact chunk kernel").
    """
    return x.unflatten(1, (-1, chunk_size)).unbind(1)


def _compiled_step_inputs(
    complete: PendingChunk, queries: Tensor, done: int, chunk_size: int
) -> dict[int, tuple[PendingChunk, Tensor]]:
    """``{chunk index: (chunk, queries)}`` for the complete chunks a call reads whole.

    A call that starts ``done > 0`` tokens into a chunk reads fewer queries of that chunk than it
    has tokens: that chunk stays with the eager loop (a graph per decoding position would cost
    more than it saves), and every later complete chunk comes here. Each field is made contiguous
    chunk-major in one copy, so every chunk has the same strides at any sequence length (a
    compiled graph is specialised on strides; views into the whole sequence would recompile per
    length).
    """
    first = 1 if done else 0
    count = complete.keys.shape[1] // chunk_size - first
    if count <= 0:
        return {}
    offset = chunk_size - done if done else 0  # where this call's queries of chunk `first` start

    def chunks(x: Tensor | None, start: int) -> list[Tensor | None]:
        if x is None:
            return [None] * count
        x = x[:, start : start + count * chunk_size].unflatten(1, (count, chunk_size))
        return list(x.transpose(0, 1).contiguous().unbind(0))

    fields = [chunks(x, first * chunk_size) for x in complete]
    rows = zip(*fields, chunks(queries, offset), strict=True)
    return {first + i: (PendingChunk(*row[:-1]), row[-1]) for i, row in enumerate(rows)}


def _window_pieces(
    history: WindowHistory, stream: PendingChunk, complete: PendingChunk,
    unfinished: PendingChunk, full: int, partial: int, chunk_size: int, window: int,
) -> tuple[list[tuple[CoefficientBank | WindowedBank, int, Tensor, Tensor]],
           list[Tensor | None]]:
    """:func:`memory_scan`'s pieces for a windowed objective: each chunk's window pairs (the
    ``window - 1`` before it, then its own) and its bank spread over them."""
    pieces: list[tuple[CoefficientBank | WindowedBank, int, Tensor, Tensor]] = []
    side_chunks: list[Tensor | None] = []
    for gates, first, count, size in ((complete, 0, full, chunk_size),
                                      (unfinished, full * chunk_size, 1, partial)):
        if count == 0 or size == 0:
            continue
        found = window_pieces(history, stream, first, count, size, window)
        bank = WindowedBank(CoefficientBank(gates, size), found.mixes)
        pieces += [(bank, i, found.keys[i], found.values[i]) for i in range(count)]
        side_chunks += found.side
    return pieces, side_chunks


def _check_scan_inputs(
    network: MemoryNetwork,
    state: FastWeightState,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    log_keep: Tensor | None,
    side: Tensor | None,
    chunk_size: int,
    gamma: Tensor | None,
    window: int,
) -> None:
    """Raise a ValueError naming the first input whose shape or kind is not what is expected."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if (window > 1) != (state.history is not None):
        made = "a window > 1" if state.history is not None else "window 1"
        raise ValueError(f"window={window}, but the state was made with {made}; continue a "
                         "state with the window that made it")
    for name, x in (("queries", queries), ("keys", keys), ("values", values)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [N, T, d], got shape {tuple(x.shape)}")
    n, steps = keys.shape[0], keys.shape[1]
    for name, x in (("queries", queries), ("values", values)):
        if x.shape[:2] != keys.shape[:2]:
            raise ValueError(
                f"{name} must share [N, T] = {(n, steps)} with keys, got {tuple(x.shape[:2])}"
            )
    for name, x in (("lr", lr), ("momentum", momentum), ("log_keep", log_keep), ("side", side),
                    ("gamma", gamma)):
        if x is not None and tuple(x.shape) != (n, steps):
            raise ValueError(f"{name} must be [N, T] = {(n, steps)}, got {tuple(x.shape)}")
    pending = state.pending
    if state.weights[0].shape[0] != n:
        raise ValueError(f"state holds N = {state.weights[0].shape[0]} memories, inputs have {n}")
    d_key, d_value = pending.keys.shape[2], state.weights[-1].shape[2]
    if keys.shape[2] != d_key or queries.shape[2] != d_key:
        raise ValueError(
            f"queries and keys must have d_key = {d_key} features, got "
            f"{queries.shape[2]} and {keys.shape[2]}"
        )
    if values.shape[2] != d_value:
        raise ValueError(f"values must have d_value = {d_value} features, got {values.shape[2]}")
    if (momentum is None) != (pending.momentum is None) or (momentum is None) == bool(
        state.momentum
    ):
        raise ValueError(
            "momentum must be given exactly when the state was made with momentum_enabled=True"
        )
    if (log_keep is None) != (pending.log_keep is None):
        raise ValueError("log_keep must be given exactly when the state was made with "
                         "decay_enabled=True")
    if (side is None) != (pending.side is None):
        raise ValueError("side must be given exactly when the state was made with side_enabled=True")
    if (gamma is None) != (pending.window is None):
        raise ValueError("gamma must be given exactly when the state was made with "
                         "window_enabled=True")
    if pending.keys.shape[1] >= chunk_size:
        raise ValueError(
            f"the state has {pending.keys.shape[1]} pending tokens, so chunk_size must be larger "
            f"(got {chunk_size}); a state must be continued with the chunk_size that made it"
        )
    if len(network.initial_weights()) != len(state.weights):
        raise ValueError(
            f"state has {len(state.weights)} weight matrices, the network "
            f"{len(network.initial_weights())}"
        )


__all__ = ["INDUCTOR_OPTIONS", "FastWeightState", "LossGradient", "PendingChunk", "Retrieval",
           "chunk_step", "compiled_chunk_step", "current_weights", "initial_state", "memory_scan"]
