"""The memory backward derived by autograd (memforge.engine.derived_backward; docs/plugins.md,
"Writing a memory network"): it equals the hand-written one, outer gradients included, a network
without a backward runs through the kernel and matches the token loop, and a network whose
backward cannot be derived is refused in one line."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from memforge.conformance import check_module
from memforge.engine.chunked import current_weights, initial_state, memory_scan
from memforge.engine.derived_backward import (
    FIX,
    DerivedBackward,
    check_derivable,
    derivability_problem,
    with_backward,
)
from memforge.engine.networks import ACTIVATIONS, MLPMemory
from memforge.engine.reference import chunk_start_reference
from memforge.engine.rules import L2Objective, ReadAfterWrite, ReadAtChunkStart, ReadBeforeWrite
from memforge.errors import SpecError
from memforge.interfaces import LinearFn
from memforge.testing.conformance import ConformanceError, check_memory_network

EXACT = 1e-10
FEW = settings(deadline=None, max_examples=12)
READERS = {"chunk_start": ReadAtChunkStart, "before_write": ReadBeforeWrite,
           "after_write": ReadAfterWrite}


class WithoutBackward(nn.Module):
    """A network's ``initial_weights`` and ``forward`` only, so its backward is derived."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def initial_weights(self) -> Sequence[Tensor]:
        return self.network.initial_weights()

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        return self.network.forward(x, linear)[0], None


class AffineMLP(nn.Module):
    """``x + LN(gelu(x W0 + b0) W1 + b1)`` with an affine per-head LN (outer parameters), the
    biases width-1 matrices applied to a column of ones (TTT-MLP's shape); no backward."""

    def __init__(self, heads: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads

        def matrix(rows: int, cols: int, scale: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(heads, rows, cols) * scale)

        self.w0, self.b0 = matrix(dim, hidden, 1 / math.sqrt(dim)), matrix(1, hidden, 0.1)
        self.w1, self.b1 = matrix(hidden, dim, 1 / math.sqrt(hidden)), matrix(1, dim, 0.1)
        self.gamma = nn.Parameter(1 + 0.1 * torch.randn(heads, dim))
        self.beta = nn.Parameter(0.1 * torch.randn(heads, dim))

    def initial_weights(self) -> tuple[Tensor, ...]:
        return (self.w0, self.b0, self.w1, self.b1)

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        ones = x.new_ones(*x.shape[:-1], 1)
        h = F.gelu(linear(0, x) + linear(1, ones))
        z = linear(2, h) + linear(3, ones)
        per_sequence = x.shape[0] // self.heads  # rows are sequence-major, head-minor
        gamma = self.gamma.repeat(per_sequence, 1)[:, None]
        beta = self.beta.repeat(per_sequence, 1)[:, None]
        return x + F.layer_norm(z, z.shape[-1:]) * gamma + beta, None


def _mlp(seed: int, heads: int, dim: int, depth: int, activation: str, residual: bool,
         norm: bool, dtype: torch.dtype = torch.float64) -> MLPMemory:
    torch.manual_seed(seed)
    net = MLPMemory(heads, dim, depth, expansion=1.5, activation=activation, residual=residual,
                    norm=norm).to(dtype)
    if depth == 1:  # the linear memory starts at zero: move it off, so every path is exercised
        with torch.no_grad():
            net.weights[0].normal_(0, 0.5)
    return net


def _assert_close(got: Tensor, want: Tensor, tolerance: float = EXACT) -> None:
    got, want = got.detach(), want.detach()
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= tolerance * scale, (got - want).abs().max()


networks = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "heads": st.integers(1, 3), "dim": st.integers(1, 5),
    "depth": st.integers(1, 3), "activation": st.sampled_from(ACTIVATIONS),
    "residual": st.booleans(), "norm": st.booleans(),
})


# -- the pairs -------------------------------------------------------------------------------------
@FEW
@given(config=networks, tokens=st.integers(1, 6), grad_mode=st.booleans())
def test_derived_pairs_equal_the_hand_written_ones(config, tokens, grad_mode):
    net = _mlp(**config)
    n = 2 * config["heads"]
    weights = [w.detach().repeat(2, 1, 1) + 0.3 * torch.randn(n, *w.shape[1:], dtype=w.dtype)
               for w in net.initial_weights()]
    x = torch.randn(n, tokens, config["dim"], dtype=torch.float64)
    error = torch.randn(n, tokens, config["dim"], dtype=torch.float64)

    def pairs(network):
        y, tape = network.forward(x, lambda i, h: h @ weights[i])
        return y, network.backward(tape, error, lambda i, g: g @ weights[i].mT)

    with torch.set_grad_enabled(grad_mode):
        (y_hand, hand), (y_derived, derived) = pairs(net), pairs(DerivedBackward(net))
    _assert_close(y_derived, y_hand)
    assert len(derived) == len(hand) == config["depth"]
    for (x_h, g_h), (x_d, g_d) in zip(hand, derived, strict=True):
        _assert_close(x_d, x_h)
        _assert_close(g_d, g_h)
    # Nothing outer requires a gradient here, so nothing the derived backward returns does.
    assert not any(t.requires_grad for pair in derived for t in pair) and not y_derived.requires_grad


def test_with_backward_keeps_a_hand_written_backward():
    net = _mlp(0, 2, 4, 2, "gelu", True, True)
    assert with_backward(net) is net
    derived = with_backward(WithoutBackward(net))
    assert isinstance(derived, DerivedBackward)
    assert tuple(derived.initial_weights()) == tuple(net.initial_weights())


# -- outer gradients through the whole scan ----------------------------------------------------------
def _scan_inputs(n: int, tokens: int, dim: int, seed: int, dtype=torch.float64) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {"queries": randn(n, tokens, dim), "keys": randn(n, tokens, dim),
            "values": randn(n, tokens, dim), "lr": 0.5 * torch.sigmoid(randn(n, tokens)),
            "momentum": torch.sigmoid(randn(n, tokens)),
            "log_keep": F.logsigmoid(randn(n, tokens) + 2)}


def _scan(network, read: str, inputs: dict[str, Tensor], chunk_size: int, batch: int = 2):
    """Outputs and the weights after the last token (the pending tokens' writes included)."""
    state = initial_state(network, batch, momentum_enabled=True, decay_enabled=True)
    out, state = memory_scan(network, L2Objective(), READERS[read](), state,
                             chunk_size=chunk_size, **inputs)
    return out, current_weights(network, L2Objective(), state)


def _scan_gradients(network, params, read, inputs, chunk_size):
    """Outputs, final weights and d(loss)/d(parameters, inputs) of one scan."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    out, weights = _scan(network, read, leaves, chunk_size)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + sum(
        (w * w.detach().sin()).sum() for w in weights)
    grads = torch.autograd.grad(loss, [*params, *leaves.values()], allow_unused=True,
                                materialize_grads=True)  # a pending chunk's gates reach nothing
    return out, weights, grads


@FEW
@given(config=networks, read=st.sampled_from(sorted(READERS)), chunk_size=st.integers(1, 5),
       tokens=st.integers(1, 11))
def test_outer_gradients_through_the_scan_equal_the_hand_written_ones(config, read, chunk_size,
                                                                       tokens):
    net = _mlp(**config)
    inputs = _scan_inputs(2 * config["heads"], tokens, config["dim"], config["seed"])
    params = list(net.parameters())
    hand = _scan_gradients(net, params, read, inputs, chunk_size)
    derived = _scan_gradients(WithoutBackward(net), params, read, inputs, chunk_size)
    _assert_close(derived[0], hand[0])
    for got, want in zip((*derived[1], *derived[2]), (*hand[1], *hand[2]), strict=True):
        _assert_close(got, want)


def test_the_derived_backward_passes_gradcheck_through_the_scan():
    """Finite differences, not the hand-written backward, agree with the derived outer gradients
    into the initial weights and the keys."""
    mlp = _mlp(3, 1, 2, 2, "silu", True, True)
    inputs = _scan_inputs(2, 5, 2, 7)
    keys = inputs.pop("keys").requires_grad_()

    class Given(WithoutBackward):
        """The MLP's forward with the initial weights gradcheck perturbs."""

        def __init__(self, weights: tuple[Tensor, ...]) -> None:
            super().__init__(mlp)
            self.given = weights

        def initial_weights(self) -> tuple[Tensor, ...]:
            return self.given

    def run(w0: Tensor, w1: Tensor, keys: Tensor) -> Tensor:
        return _scan(Given((w0, w1)), "after_write", {**inputs, "keys": keys}, 2)[0]

    weights = [w.detach().clone().requires_grad_() for w in mlp.initial_weights()]
    assert torch.autograd.gradcheck(run, (*weights, keys), eps=1e-6, atol=1e-7)


def test_float32_derived_matches_the_hand_written_backward():
    net = _mlp(1, 2, 8, 2, "gelu", True, True, dtype=torch.float32)
    inputs = _scan_inputs(4, 40, 8, 1, dtype=torch.float32)
    params = list(net.parameters())
    hand = _scan_gradients(net, params, "after_write", inputs, 8)
    derived = _scan_gradients(WithoutBackward(net), params, "after_write", inputs, 8)
    for got, want in zip((derived[0], *derived[2]), (hand[0], *hand[2]), strict=True):
        got, want = got.detach(), want.detach()
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_inference_builds_no_outer_graph():
    net = WithoutBackward(_mlp(0, 2, 4, 2, "gelu", True, True))
    inputs = _scan_inputs(4, 9, 4, 0)
    with torch.no_grad():
        out, weights = _scan(net, "after_write", inputs, 4)
    want, want_weights = _scan(net.network, "after_write", inputs, 4)
    assert not out.requires_grad and not any(w.requires_grad for w in weights)
    _assert_close(out, want.detach())
    for got, expected in zip(weights, want_weights, strict=True):
        _assert_close(got, expected.detach())


# -- a network without backward, against the token loop ----------------------------------------------
@FEW
@given(seed=st.integers(0, 2**16), read=st.sampled_from(sorted(READERS)),
       chunk_size=st.integers(1, 4), tokens=st.integers(1, 9))
def test_a_network_without_backward_matches_the_token_loop(seed, read, chunk_size, tokens):
    torch.manual_seed(seed)
    net = AffineMLP(heads=2, dim=3, hidden=4).double()
    check_derivable(net, "test.affine_mlp")
    inputs = _scan_inputs(4, tokens, 3, seed)
    params = list(net.parameters())
    out, weights, grads = _scan_gradients(net, params, read, inputs, chunk_size)

    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    start = [w.repeat(2, 1, 1) for w in net.initial_weights()]
    want = chunk_start_reference(net, L2Objective(), read, start, leaves["queries"], leaves["keys"],
                                 leaves["values"], leaves["lr"], leaves["momentum"],
                                 leaves["log_keep"], chunk_size=chunk_size)
    loss = (want.outputs * torch.linspace(-1, 1, 3, dtype=torch.float64)).sum() + sum(
        (w * w.detach().sin()).sum() for w in want.weights)
    want_grads = torch.autograd.grad(loss, [*params, *leaves.values()], allow_unused=True,
                                     materialize_grads=True)
    _assert_close(out, want.outputs)
    for got, expected in zip((*weights, *grads), (*want.weights, *want_grads), strict=True):
        _assert_close(got, expected)


# -- networks whose backward cannot be derived ---------------------------------------------------------
class ReadsItsWeight(nn.Module):
    """Applies its matrix through ``linear`` but also scales by the initial weight's norm."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(2, 4, 4))])

    def initial_weights(self) -> tuple[Tensor, ...]:
        return tuple(self.weights)

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        return linear(0, x) / self.weights[0].norm(), None


class BypassesLinear(ReadsItsWeight):
    """Multiplies by its own weight (per head) instead of calling ``linear``."""

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        return x @ self.weights[0].repeat(x.shape[0] // 2, 1, 1), None


class AppliesTwice(ReadsItsWeight):
    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        return linear(0, torch.tanh(linear(0, x))), None


class Detaches(ReadsItsWeight):
    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, None]:
        return x + linear(0, x).detach(), None


REFUSED = {
    ReadsItsWeight: r"reads fast weight 0 \(initial_weights\(\)\[0\]\) outside the linear callback",
    BypassesLinear: r"matrix 0 of its initial_weights\(\) is never applied through the linear callback",
    AppliesTwice: r"applies matrix 0 twice through the linear callback",
    Detaches: r"does not depend, through autograd, on any matrix's output",
}


@pytest.mark.parametrize("cls", list(REFUSED), ids=lambda c: c.__name__)
def test_a_network_whose_backward_cannot_be_derived_is_refused_in_one_line(cls):
    with pytest.raises(SpecError) as caught:
        check_derivable(cls(), "mylab.memory")
    message = str(caught.value)
    assert message.startswith("memory network 'mylab.memory': ")
    assert "\n" not in message
    assert pytest.raises(SpecError, check_derivable, cls(), "x").match(REFUSED[cls])
    assert message.endswith("or give the network a backward")
    if cls is not AppliesTwice:
        assert message.endswith(FIX)


def test_the_check_leaves_frozen_weights_frozen():
    net = ReadsItsWeight().requires_grad_(False)
    assert derivability_problem(net) is not None
    assert not any(p.requires_grad for p in net.parameters())


def test_the_build_time_kind_check_refuses_and_accepts():
    with pytest.raises(SpecError, match=r"^memory 'module' \(layer 0\): ReadsItsWeight is not a "
                                        r"memory component: it reads fast weight 0 .*"
                                        r"or give the network a backward"):
        check_module("memory", ReadsItsWeight(), dim=8, heads=2)
    check_module("memory", AffineMLP(heads=2, dim=4, hidden=3), dim=8, heads=2)


def test_the_conformance_kit_checks_a_network_without_backward():
    assert check_memory_network(AffineMLP(heads=2, dim=4, hidden=3), name="test.affine",
                                heads=2, head_dim=4) is False
    with pytest.raises(ConformanceError, match=r"^mylab.bad: derived backward: it reads fast"):
        check_memory_network(ReadsItsWeight(), name="mylab.bad", heads=2, head_dim=4)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_conformance_kit_compares_a_hand_written_backward_with_the_derived_one(depth):
    net = _mlp(0, 2, 4, depth, "gelu", True, depth > 1, dtype=torch.float32)
    assert check_memory_network(net, name="titans.mlp", heads=2, head_dim=4) is True


@pytest.mark.slow  # compiles two chunk-step graphs (93 s on the shared 2-core CPU under load)
def test_compiled_chunk_steps_run_the_derived_backward_exactly():
    """memory_scan(compiled=True) (each whole chunk one torch.compile-d step) equals the eager scan
    with a network without backward: outputs and outer gradients, outer parameters included."""
    torch.manual_seed(0)
    net = AffineMLP(heads=2, dim=3, hidden=4).double()
    inputs = _scan_inputs(4, 9, 3, 0)
    params = list(net.parameters())
    results = []
    for compiled in (False, True):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        state = initial_state(net, 2, momentum_enabled=True, decay_enabled=True)
        out, _ = memory_scan(net, L2Objective(), ReadAfterWrite(), state, chunk_size=4,
                             compiled=compiled, **leaves)
        results.append((out, torch.autograd.grad(out.square().sum(), [*params, *leaves.values()])))
    (eager, eager_grads), (compiled_out, compiled_grads) = results
    _assert_close(compiled_out, eager, 1e-8)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        _assert_close(got, want, 1e-8)
