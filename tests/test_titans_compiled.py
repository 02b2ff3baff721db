"""The compiled chunk step (``memory_scan(..., compiled=True)``) against the eager kernel.

Most cases compile with the ``aot_eager`` backend: it captures the same graphs (Dynamo, then
AOTAutograd's joint forward/backward) and runs them op by op, in a second or two, so it checks the
capture itself. One case runs the real Inductor compiler (C++ on the CPU), in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from memforge.engine import chunked
from memforge.engine.chunked import current_weights, memory_scan
from tests.test_titans_kernel import (
    EXACT,
    Case,
    Reading,
    cases,
    loss_of,
    make_inputs,
    make_network,
    start,
)


@contextlib.contextmanager
def aot_eager_compiled(module: Any, factory: str, function: Callable) -> Iterator[CompileCounterWithBackend]:
    """Make ``module.<factory>()`` return ``function`` compiled with ``aot_eager``, counting graphs.

    ``aot_eager`` captures the same graphs as Inductor and runs them op by op, in a second or two.
    A fresh compiler each time: compiled code is cached per code object across ``torch.compile``
    calls, and past torch's recompile limit the step would silently run eagerly (compiled would
    then be compared with eager by eager).
    """
    torch._dynamo.reset()
    count = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=count, dynamic=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, factory, lambda: compiled)
        yield count
    torch._dynamo.reset()


def aot_eager_steps() -> contextlib.AbstractContextManager[CompileCounterWithBackend]:
    """The kernel's compiled chunk step through :func:`aot_eager_compiled`."""
    return aot_eager_compiled(chunked, "compiled_chunk_step", chunked.chunk_step)


@pytest.fixture
def counter() -> Iterator[CompileCounterWithBackend]:
    """:func:`aot_eager_steps` for one test."""
    with aot_eager_steps() as count:
        yield count


def run(case: Case, inputs: dict, *, compiled: bool, cuts: tuple[int, ...] = ()):
    """Scan ``inputs`` in pieces cut at ``cuts``; returns outputs, final weights and momentum."""
    net = make_network(case)
    state, outs = start(net, case), []
    bounds = [0, *cuts, case.steps]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = {k: None if v is None else v[:, lo:hi] for k, v in inputs.items()}
        out, state = memory_scan(net, loss_of(case), Reading(case.read), state, **part,
                                 chunk_size=case.chunk, compiled=compiled)
        outs.append(out)
    return net, torch.cat(outs, 1), current_weights(net, loss_of(case), state), state.momentum


def grads(case: Case, *, compiled: bool, cuts: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Outputs, final weights, and the gradients of a random objective w.r.t. every input."""
    inputs = make_inputs(case)
    leaves = [v.requires_grad_() for v in inputs.values() if v is not None]
    net, out, weights, moments = run(case, inputs, compiled=compiled, cuts=cuts)
    gen = torch.Generator().manual_seed(case.seed + 7)
    total = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
                for t in (out, *weights, *moments))
    return [out, *weights, *torch.autograd.grad(total, leaves + list(net.parameters()))]


@pytest.mark.parametrize(
    ("depth", "momentum", "decay", "read", "norm", "side"),
    [
        (2, True, True, "chunk_start", True, False),
        (2, True, True, "after_write", False, True),
        (2, False, True, "before_write", True, False),
        (1, True, False, "after_write", False, False),
        (3, False, False, "chunk_start", False, True),
    ],
)
def test_compiled_steps_equal_the_eager_kernel(counter, depth, momentum, decay, read, norm,
                                               side) -> None:
    # 3 whole chunks and a partial one, whole and cut: inside a chunk, then on a boundary (the
    # call from 5 reads [5, 8), all eager); inside a chunk only (the call from 5 reads [5, 8)
    # eager and [8, 12) compiled). With side, the objective's per-token input rides in the chunk.
    case = Case(11, depth, "gelu", True, norm, momentum, decay, 2, 14, 4, read, side)
    for cuts in ((), (5, 8), (5,)):
        eager = grads(case, compiled=False, cuts=cuts)
        compiled = grads(case, compiled=True, cuts=cuts)
        for got, want in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, want, **EXACT)
    # The first chunk gets a graph of its own only where its momentum is the constant zero state
    # (no gradient), unlike every later chunk's.
    assert counter.frame_count == (2 if momentum else 1)


@pytest.mark.slow
@settings(deadline=None, max_examples=12)
@given(cases(max_steps=13), st.integers(0, 13))
def test_compiled_steps_equal_the_eager_kernel_for_drawn_cases(case: Case, cut: int) -> None:
    cuts = (min(cut, case.steps),)
    with aot_eager_steps() as count:  # a fresh compiler per example (see there)
        compiled = grads(case, compiled=True, cuts=cuts)
    eager = grads(case, compiled=False, cuts=cuts)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, **EXACT)
    if case.steps >= 2 * case.chunk:  # then some call reads a whole chunk, wherever the cut falls
        assert count.frame_count >= 1


def test_one_graph_serves_every_sequence_length(counter) -> None:
    case = Case(3, 2, "gelu", True, True, True, True, 1, 16, 4, "chunk_start")
    frames = []
    for steps in (8, 16, 13):
        run(case._replace(steps=steps), make_inputs(case._replace(steps=steps)), compiled=True)
        frames.append(counter.frame_count)
    assert frames == [2, 2, 2]  # chunks are copied to fixed strides, so no recompilation


@pytest.mark.slow
def test_inductor_compiled_steps_match_in_float32() -> None:
    torch._dynamo.reset()
    case = Case(5, 2, "gelu", True, True, True, True, 1, 10, 4, "after_write")
    net = make_network(case).float()
    inputs = {k: None if v is None else v.float() for k, v in make_inputs(case).items()}
    results = []
    for compiled in (False, True):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
        out, state = memory_scan(net, loss_of(case), Reading(case.read), start(net, case),
                                 **{k: leaves.get(k) for k in inputs}, chunk_size=case.chunk,
                                 compiled=compiled)
        loss = out.square().sum() + sum(w.square().sum() for w in state.weights)
        results.append([out, *state.weights, *torch.autograd.grad(loss, list(leaves.values()))])
    for got, want in zip(*results, strict=True):
        # float32 with gradients in the thousands: compare to each tensor's own scale.
        assert (got - want).norm() <= 1e-4 * want.norm(), (got - want).abs().max()


def split_logits_and_grads(call, model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of ``tokens`` read in two calls with the state carried (split at 21, inside a
    memory chunk), then the gradients of a loss on them w.r.t. every parameter of ``model``."""
    first = call(tokens[:, :21])
    second = call(tokens[:, 21:], first.state)
    logits = torch.cat((first.logits, second.logits), 1)
    return [logits, *torch.autograd.grad(logits.square().mean(), list(model.parameters()))]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["titans.lmm_tiny", "titans.mac_tiny"])
def test_compile_model_matches_eager_with_state(counter, name: str) -> None:
    import memforge

    spec = memforge.preset(name)
    torch.manual_seed(0)
    eager = memforge.build_model(spec).double()
    compiled_model = memforge.build_model(spec).double()
    compiled_model.load_state_dict(eager.state_dict())
    forward = memforge.compile_model(compiled_model, backend="aot_eager")
    tokens = torch.randint(0, spec.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    for got, want in zip(split_logits_and_grads(forward, compiled_model, tokens),
                         split_logits_and_grads(eager, eager, tokens), strict=True):
        torch.testing.assert_close(got, want, **EXACT)
    assert counter.frame_count >= 1  # the memory layers did run their compiled step
