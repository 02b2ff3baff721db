"""The ``atlas`` plugin: feature map, Newton-Schulz, the three layers against their float64
token-loop reference, the conformance kit, dispatch, stability and the one-line spec errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memforge_atlas.features import PolynomialFeatures, feature_width
from memforge_atlas.network import PolyMLPMemory
from memforge_atlas.newton_schulz import newton_schulz
from memforge_atlas.reference import layer_reference, newton_schulz_iterated
from memforge_atlas.rules import DotObjective
from memforge_atlas.validation import matrix_problem

import memforge
from memforge.engine.executors import LearningRule, RuleInputs, select_executor
from memforge.engine.rules import GatedStep, NoForgetting, ReadAfterWrite
from memforge.errors import SpecError
from memforge.testing.conformance import (
    MemoryLayerConformance,
    build_part,
    check_memory_network,
    check_objective,
    memory_layer,
)

DT = torch.float64
LAYERS = {"omeganet": "atlas.omeganet_lmm_tiny", "deep_transformer": "atlas.deep_transformer_lmm_tiny",
          "atlas": "atlas.atlas_lmm_tiny"}


def _layer(model: str, chunk_size: int | None = None):
    return memory_layer(LAYERS[model], chunk_size=chunk_size).module


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest value of ``want``."""
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-9) -> None:
    error = _relative_error(got, want)
    assert error <= tol, error


# -- the feature map --------------------------------------------------------------------------------
@given(dim=st.integers(1, 6), degree=st.integers(1, 4))
@settings(max_examples=25, deadline=None)
def test_features_give_the_polynomial_kernel(dim: int, degree: int) -> None:
    """phi(x) . phi(y) = sum_i a_i^2 (x . y)^i with the module's own coefficients, at C(d + p, p)
    coordinates."""
    features = PolynomialFeatures(3, dim, degree).double()
    with torch.no_grad():
        features.coefficients.uniform_(0.2, 1.5)
    x, y = torch.randn(2, 6, 4, dim, dtype=DT)
    fx, fy = features(x), features(y)
    assert fx.shape[-1] == feature_width(dim, degree) == math.comb(dim + degree, degree)
    dot = (x * y).sum(-1).view(2, 3, 4)
    a = features.coefficients.detach()                                 # [H, p + 1]
    want = sum(a[None, :, None, i] ** 2 * dot ** i for i in range(degree + 1))
    _close((fx * fy).sum(-1).view(2, 3, 4), want)


def test_features_start_at_inverse_factorials_and_degree_one_can_be_the_identity() -> None:
    features = PolynomialFeatures(2, 5, 3)
    assert torch.allclose(features.coefficients[0], torch.tensor([1.0, 1.0, 0.5, 1 / 6]))
    linear = PolynomialFeatures(1, 4, 1).double()
    with torch.no_grad():
        linear.coefficients.copy_(torch.tensor([[0.0, 1.0]]))
    x = torch.randn(3, 5, 4, dtype=DT)
    out = linear(x)
    assert torch.equal(out[..., 1:], x) and torch.equal(out[..., 0], torch.zeros(3, 5, dtype=DT))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_poly_mlp_backward_matches_autograd(depth: int) -> None:
    network = PolyMLPMemory(2, 4, degree=2, depth=depth, expansion=1.5)
    assert check_memory_network(network, name="atlas.poly_mlp", heads=2, head_dim=4)


@pytest.mark.parametrize("name", ["atlas.omega", "atlas.dot"])
def test_objective_gradient_matches_autograd(name: str) -> None:
    check_objective(build_part("objective", name), name=name, heads=2, head_dim=8)


def test_omega_gates_lie_in_the_unit_interval() -> None:
    objective = build_part("objective", "atlas.omega")
    gamma = objective(100.0 * torch.randn(2, 9, 16, dtype=DT)).window
    assert gamma.shape == (2, 9, 2) and bool(((gamma >= 0) & (gamma <= 1)).all())


# -- Newton-Schulz ----------------------------------------------------------------------------------
def test_newton_schulz_is_close_to_the_polar_factor() -> None:
    """On well-conditioned input the quintic keeps the singular vectors and moves every singular
    value into Muon's band around 1, so the output is near U V^T."""
    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((6, 10), (10, 6), (8, 8)):
        u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=DT))
        v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=DT))
        k = min(rows, cols)
        sigma = torch.linspace(1.0, 2.0, k, dtype=DT)
        g = u[:, :k] @ torch.diag(sigma) @ v[:, :k].T
        out = newton_schulz(g)
        polar = u[:, :k] @ v[:, :k].T
        inner = u[:, :k].T @ out @ v[:, :k]                     # diagonal: same singular vectors
        assert (inner - torch.diag(inner.diagonal())).abs().max() < 1e-10
        assert ((inner.diagonal() > 0.65) & (inner.diagonal() < 1.2)).all(), inner.diagonal()
        assert torch.linalg.matrix_norm(out - polar, ord=2) < 0.35


def test_newton_schulz_is_scale_free_and_keeps_zero() -> None:
    g = torch.randn(3, 5, 7, dtype=DT)
    _close(newton_schulz(1e3 * g), newton_schulz(1e6 * g), 1e-6)   # the norm's epsilon is 1e-4
    zero = torch.zeros(2, 4, 3, dtype=DT, requires_grad=True)
    out = newton_schulz(zero)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(zero.grad).all()


@settings(deadline=None, max_examples=30)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), steps=st.integers(0, 6),
       scale=st.sampled_from([1e-6, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_newton_schulz_on_the_gram_side_is_the_iteration(rows: int, cols: int, steps: int,
                                                         scale: float, seed: int) -> None:
    """Iterating on ``A = X X^T`` (what Muon runs, keeping no ``m x n`` tensor per step) gives the
    iteration's output and its gradient to 1e-10 in float64."""
    generator = torch.Generator().manual_seed(seed)
    g = (scale * torch.randn(2, rows, cols, generator=generator, dtype=DT)).requires_grad_()
    probe = torch.randn(2, rows, cols, generator=generator, dtype=DT)
    fast, slow = newton_schulz(g, steps), newton_schulz_iterated(g, steps)
    (fast_grad,) = torch.autograd.grad((fast * probe).sum(), g)
    (slow_grad,) = torch.autograd.grad((slow * probe).sum(), g)
    assert _relative_error(fast, slow) <= 1e-10
    # Relative to the gradient's natural size 1 / ||G|| too: a 1 x 1 input's gradient is ~0.
    size = max(slow_grad.abs().max().item(), 1.0 / g.norm(dim=(-2, -1)).min().item())
    assert (fast_grad - slow_grad).abs().max().item() <= 1e-10 * size


# -- the layers against the reference ---------------------------------------------------------------
def _outer_grads(layer, run, x: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in layer.parameters() if p.requires_grad]
    loss = (run(x) * probe).sum()
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("model", list(LAYERS))
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_layer_equals_reference(model: str, chunk_size: int | None) -> None:
    """Outputs at an odd length, the second piece after a carried state (split inside a window
    that crosses a chunk boundary, and mid-chunk), and outer gradients into every parameter."""
    torch.manual_seed(0)
    layer = _layer(model, chunk_size)
    x = torch.randn(2, 13, layer.dim, dtype=DT)
    whole, _ = layer(x)
    _close(whole, layer_reference(layer, x)[0])
    for split in (1, 5, 9):
        with torch.no_grad():
            first, state = layer(x[:, :split])
            second, _ = layer(x[:, split:], state)
            _close(torch.cat((first, second), 1), whole)
            _close(second, layer_reference(layer, x[:, split:], state)[0])
            mine, ref_state = layer_reference(layer, x[:, :split])
            _close(layer_reference(layer, x[:, split:], ref_state)[0], second)
    probe = torch.randn_like(whole)
    fast = _outer_grads(layer, lambda inp: layer(inp)[0], x, probe)
    slow = _outer_grads(layer, lambda inp: layer_reference(layer, inp)[0], x, probe)
    errors = [_relative_error(got, want) for got, want in zip(fast, slow, strict=True)]
    assert errors and max(errors) <= 1e-8, errors


def test_float32_atlas_follows_float64() -> None:
    """Muon's chunks through the Gram matrices in float32 (the Gram matrix summed in float64)
    stay within 1e-3 of float64 over 256 tokens; the token loop was at 1.8e-3 there."""
    torch.manual_seed(0)
    layer = _layer("atlas")
    x = torch.randn(2, 256, layer.dim, dtype=DT)
    with torch.no_grad():
        want, _ = layer(x)
        got, _ = layer.float()(x.float())
    assert _relative_error(got.double(), want) <= 1e-3


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_hebbian_matrix_memory_is_polynomial_kernel_attention(chunk_size: int) -> None:
    """DeepTransformers' reduction (ATLAS Eq. 26): a matrix memory on phi_p, the dot-product
    objective, no decay, read after the write, starting empty, reads
    ``sum_{i <= t} theta_i (phi(k_i) . phi(q_t)) v_i``: unnormalised attention with the kernel
    ``sum_j a_j^2 (k . q)^j`` (exp's Taylor series with ``a_j = 1 / sqrt(j!)``)."""
    heads, d, steps = 2, 3, 11
    network = PolyMLPMemory(heads, d, degree=3, depth=1, residual=False, norm=False).double()
    rule = LearningRule(network, DotObjective(), GatedStep(4, heads, max_lr=1.0, lr_init=0.5,
                                                           momentum=False),
                        NoForgetting(), ReadAfterWrite(), chunk_size)
    executor = select_executor(rule)
    q, k, v = torch.randn(3, heads, steps, d, dtype=DT)
    theta = torch.rand(heads, steps, dtype=DT)
    inputs = RuleInputs(q, k, v, theta, None, None, None, None)
    read, _ = executor.scan(rule, executor.initial_state(rule, 1, inputs), inputs)
    phi = network.features
    scores = (phi(q) @ phi(k).mT).tril() * theta[:, None, :]          # [H, t, i]
    assert _relative_error(read, scores @ v) <= 1e-9


@pytest.mark.parametrize(("model", "chunk_size", "executor", "tier"), [
    ("omeganet", 7, "closed_form", "chunk-start"),
    ("omeganet", 1, "closed_form", "token-exact"),
    ("deep_transformer", 7, "closed_form", "chunk-start"),
    ("atlas", 7, "sequential", "chunk-start"),
    ("atlas", 1, "sequential", "token-exact"),
])
def test_dispatch_and_tier(model: str, chunk_size: int, executor: str, tier: str) -> None:
    """Muon goes to the sequential executor, GD (with a window of any length) to the closed
    form; every rule is chunk-start, token-exact at chunk size 1."""
    rule = _layer(model, chunk_size).describe_rule()
    assert (rule.executor, rule.tier) == (executor, tier)


def test_online_omega_rule_runs_on_the_closed_form() -> None:
    spec = memforge.override(memforge.preset(LAYERS["omeganet"]), ["objective.window=1"])
    assert memory_layer(spec).module.describe_rule().executor == "closed_form"


# -- the conformance kit ----------------------------------------------------------------------------
class TestOmegaNetConformance(MemoryLayerConformance):
    preset = LAYERS["omeganet"]
    reference = staticmethod(layer_reference)


class TestDeepTransformerConformance(MemoryLayerConformance):
    preset = LAYERS["deep_transformer"]
    reference = staticmethod(layer_reference)


class TestAtlasConformance(MemoryLayerConformance):
    preset = LAYERS["atlas"]
    reference = staticmethod(layer_reference)


@pytest.mark.parametrize("integration", ["lmm", "mac", "mag", "mal"])
@pytest.mark.parametrize("model", ["omeganet", "deep_transformer", "atlas"])
def test_presets_build_and_run(model: str, integration: str) -> None:
    model_ = memforge.build_model(memforge.preset(f"atlas.{model}_{integration}_tiny"))
    tokens = torch.randint(0, 64, (2, 19))
    out = model_(tokens, labels=tokens)
    assert torch.isfinite(out.loss)


# -- stability --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [
    "omeganet", "deep_transformer",
    # Muon's Newton-Schulz on the Gram matrix of every one of 16K tokens (about 10 seconds).
    pytest.param("atlas", marks=pytest.mark.slow),
])
def test_stable_over_16k_random_tokens(model: str) -> None:
    """Default settings, small dims, no gradients: 16K random tokens in pieces keep the output
    finite and the fast weights bounded (the decay holds them)."""
    torch.manual_seed(0)
    spec = memforge.override(memforge.preset(LAYERS[model]), ["dim=8", "heads=2"])
    layer = memory_layer(spec).module.float()
    state, norms = None, []
    with torch.no_grad():
        for _ in range(16):
            y, state = layer(torch.randn(1, 1024, 8), state)
            assert torch.isfinite(y).all()
            norms.append(max(w.norm().item() for w in layer.read_state(state, 1)))
    assert all(math.isfinite(n) for n in norms)
    assert max(norms[8:]) <= 2.0 * max(norms[:8]) + 1.0, norms


# -- bad input --------------------------------------------------------------------------------------
def _refused(preset: str, overrides: list[str]) -> str:
    with pytest.raises(SpecError) as error:
        memforge.build_model(memforge.override(memforge.preset(preset), overrides))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_window_too_long_is_one_line() -> None:
    message = _refused("atlas.omeganet_lmm_tiny", ["objective.window=40"])
    assert "objective.window" in message and "memory_layer.chunk_size" in message
    assert "objective.window <= 17" in message


def test_degree_that_explodes_the_width_is_one_line() -> None:
    message = _refused("atlas.atlas_lmm_tiny", ["memory.degree=4"])
    assert "memory.degree" in message and "4845" in message and "memory.degree <= 3" in message


@pytest.mark.parametrize("overrides", [
    ["dim=4", "heads=4"],                                   # head width 1: [3, 1] and [1, 1]
    ["dim=4", "heads=4", "memory=titans.linear"],            # a [1, 1] matrix memory
    ["memory=ttt.linear"],                                   # an inner bias: a [1, 16] matrix
])
def test_muon_on_a_non_matrix_weight_is_one_line(overrides: list[str]) -> None:
    message = _refused("atlas.atlas_lmm_tiny", overrides)
    assert "atlas.muon" in message and "optimizer=atlas.gd" in message


def test_muon_refuses_a_bias_matrix() -> None:
    """An inner bias is a [1, d_out] fast weight (ttt.linear's, say): Newton-Schulz of it would
    only normalise it."""
    message = matrix_problem([(16, 16), (1, 16)], "mylab.biased")
    assert message is not None and "1 x 16" in message and "\n" not in message
    assert matrix_problem([(153, 16), (16, 16)], "atlas.poly_mlp") is None
