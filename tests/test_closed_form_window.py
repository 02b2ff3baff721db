"""A windowed objective (ATLAS' Omega rule: the last ``c`` pairs, weighed by ``gamma``) on the
closed-form executor (docs/memory.md, "Executors"): outputs, final state and outer gradients
against the float64 token loop and the sequential executor, carried state split anywhere, static
decoding, and the layer that picks the closed form for it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from memforge.engine import rules
from memforge.engine.executors import EXECUTORS, ClosedFormExecutor, RuleInputs, select_executor
from memforge.engine.layer import StaticDecodingMemoryLayer
from memforge.engine.rule_reference import rule_reference
from memforge.interfaces import ObjectiveInputs
from tests.test_executors import DIM, HEADS, HuberObjective, layer, rule

READS = {"chunk_start": rules.ReadAtChunkStart, "before_write": rules.ReadBeforeWrite,
         "after_write": rules.ReadAfterWrite}


class GatedWindow(rules.L2Objective):
    """``0.5 * ||M(k_i) - v_i||^2`` over the last ``window`` pairs, weighed by a learned
    ``gamma_i = sigmoid(x_i W)`` (or all 1 when not ``gated``)."""

    def __init__(self, window: int, gated: bool = True) -> None:
        super().__init__()
        self.window = window
        self.gamma = nn.Linear(DIM, HEADS) if gated else None

    def forward(self, x: Tensor) -> ObjectiveInputs:
        return ObjectiveInputs(None, None if self.gamma is None else torch.sigmoid(self.gamma(x)))


class WindowedHuber(HuberObjective):
    """Huber with a per-token threshold (a side input) over a window of three pairs."""

    window = 3


def _inputs(steps: int, *, momentum: bool, decay: bool, side: bool, gated: bool) -> RuleInputs:
    n, d = 2 * HEADS, DIM // HEADS

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, dtype=torch.float64)

    fields = RuleInputs(
        torch.randn(n, steps, d, dtype=torch.float64),
        nn.functional.normalize(torch.randn(n, steps, d, dtype=torch.float64), dim=-1),
        torch.randn(n, steps, d, dtype=torch.float64),
        0.3 * rand(n, steps),
        rand(n, steps) if momentum else None,
        torch.log1p(-rand(n, steps) / 2) if decay else None,
        0.05 + rand(n, steps) / 2 if side else None,
        rand(n, steps) if gated else None)
    return RuleInputs(*(None if f is None else f.requires_grad_() for f in fields))


def _pieces(inputs: RuleInputs, cuts: list[int]) -> list[RuleInputs]:
    bounds = [0, *cuts, inputs.keys.shape[1]]
    return [RuleInputs(*(None if f is None else f[:, a:b] for f in inputs))
            for a, b in zip(bounds, bounds[1:], strict=False)]


def _run(executor, learning, inputs: RuleInputs, cuts: list[int]):
    state = start = executor.initial_state(learning, 2, inputs)
    outputs = []
    for piece in _pieces(inputs, cuts):
        out, state = executor.scan(learning, state, piece)
        outputs.append(out)
    return torch.cat(outputs, 1), start, state


@settings(deadline=None, max_examples=12)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 14),
       cuts=st.lists(st.integers(0, 14), max_size=2), chunk=st.sampled_from([1, 2, 3, 5, 7]),
       window=st.integers(2, 6), read=st.sampled_from(list(READS)),
       momentum=st.booleans(), decay=st.booleans(), gated=st.booleans(), side=st.booleans())
def test_a_window_through_the_closed_form_is_the_reference(
        seed: int, steps: int, cuts: list[int], chunk: int, window: int, read: str,
        momentum: bool, decay: bool, gated: bool, side: bool) -> None:
    """Outputs, the weights after the last token and outer gradients (keys, step sizes, window
    weights, side input, initial weights) equal the float64 token loop and the sequential
    executor, with the state carried across up to two cuts anywhere (mid-chunk, and before
    ``c - 1`` tokens have been seen)."""
    torch.manual_seed(seed)
    objective = (WindowedHuber() if side else GatedWindow(window)).double()
    optimizer = rules.GatedStep(DIM, HEADS, max_lr=0.1, lr_init=0.05, momentum=momentum)
    learning = rule(chunk, objective=objective, optimizer=optimizer, retrieval=READS[read]())
    learning.network.double()
    executor = select_executor(learning)
    assert executor.name == "closed_form"
    inputs = _inputs(steps, momentum=momentum, decay=decay, side=side, gated=gated)
    out, start, end = _run(executor, learning, inputs, sorted(min(c, steps) for c in cuts))
    expected = rule_reference(learning, start.weights, inputs)
    torch.testing.assert_close(out, expected.outputs, atol=1e-10, rtol=1e-9)
    for got, want in zip(executor.current_weights(learning, end), expected.weights, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    sequential = EXECUTORS["sequential"]
    slow, _, _ = _run(sequential, learning, inputs, [])
    torch.testing.assert_close(out, slow, atol=1e-10, rtol=1e-9)
    probe = torch.randn_like(out)
    leaves = [f for f in (inputs.keys, inputs.values, inputs.lr, inputs.window, inputs.side,
                          inputs.log_keep, *learning.network.initial_weights()) if f is not None]
    got = torch.autograd.grad((out * probe).sum(), leaves, materialize_grads=True)
    want = torch.autograd.grad((expected.outputs * probe).sum(), leaves, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("chunk", [1, 7, 16])
@pytest.mark.parametrize("window", [None, 1, 4])
def test_the_layer_runs_a_window_on_the_closed_form_like_the_sequential_executor(
        chunk: int, window: int | None) -> None:
    """The same layer forced onto the sequential executor gives the same outputs and outer
    gradients, at an odd length split mid-chunk; a window of one's weights scale the steps
    (``None``: the plain l2 objective, no window weights)."""
    torch.manual_seed(chunk + (window or 0))

    def objective() -> dict[str, nn.Module]:
        return {} if window is None else {"objective": GatedWindow(window)}

    closed = layer(chunk, **objective()).double()
    forced = layer(chunk, executor="sequential", **objective()).double()
    forced.load_state_dict(closed.state_dict())
    assert (closed.executor.name, forced.executor.name) == ("closed_form", "sequential")
    assert isinstance(closed, StaticDecodingMemoryLayer)
    x = torch.randn(2, 19, DIM, dtype=torch.float64, requires_grad=True)
    y_closed, _ = closed(x)
    first, state = forced(x[:, :6])
    second, _ = forced(x[:, 6:], state)
    y_forced = torch.cat((first, second), 1)
    torch.testing.assert_close(y_closed, y_forced, atol=1e-12, rtol=1e-10)
    probe = torch.randn_like(y_closed)
    params = [x, *closed.parameters()]
    got = torch.autograd.grad((y_closed * probe).sum(), params, materialize_grads=True)
    want = torch.autograd.grad((y_forced * probe).sum(), [x, *forced.parameters()],
                               materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    if window is not None:
        names = [name for name, _ in closed.named_parameters()]
        assert got[1 + names.index("objective.gamma.weight")].abs().sum() > 0  # gamma is learned


@pytest.mark.parametrize("read", list(READS))
@pytest.mark.parametrize(("chunk", "prefix"), [(1, 1), (3, 1), (3, 4), (7, 9)])
def test_static_decoding_of_a_window_equals_forward(read: str, chunk: int, prefix: int) -> None:
    """Fixed-shape steps after a prefix (shorter and longer than the window's reach) equal
    forward token by token, across chunk ends."""
    torch.manual_seed(prefix)
    memory = layer(chunk, objective=GatedWindow(4), retrieval=READS[read]()).double()
    x = torch.randn(2, prefix + 9, DIM, dtype=torch.float64)
    with torch.no_grad():
        _, state = memory(x[:, :prefix])
        buffers = memory.static_decode_buffers(state, 2)
        for t in range(prefix, x.shape[1]):
            want, state = memory(x[:, t : t + 1], state)
            completes = (t + 1) % chunk == 0
            got = memory.static_decode_step(x[:, t : t + 1], buffers, completes)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(
            memory.static_read_state(buffers)[0],
            memory.read_state(state, 2)[0] if x.shape[1] % chunk == 0 else state.fast.weights[0])


def test_the_window_must_match_the_state() -> None:
    learning = rule(4, objective=GatedWindow(3).double())
    learning.network.double()
    inputs = _inputs(5, momentum=True, decay=True, side=False, gated=True)
    executor = ClosedFormExecutor()
    state = executor.initial_state(learning, 2, inputs)
    from memforge.engine.chunked import memory_scan

    with pytest.raises(ValueError, match="window=1, but the state was made with a window > 1"):
        memory_scan(learning.network, learning.objective, learning.retrieval, state,
                    *inputs[:8], chunk_size=4)
