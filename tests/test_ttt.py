"""The ``ttt`` plugin: TTT-Linear / TTT-MLP on the engine's closed form against the float64
mini-batch reference, the conformance kit, the presets, and bad settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memforge_ttt.networks import TTTMLP, TTTLinear
from memforge_ttt.reference import ttt_layer_reference, ttt_reference
from memforge_ttt.rules import LearnedStep

import memforge
from memforge import SpecError
from memforge.builder import build_layer_component
from memforge.engine.derived_backward import check_derivable, with_backward
from memforge.engine.executors import LearningRule, RuleInputs, select_executor
from memforge.engine.rules import L2Objective, NoForgetting, ReadAfterWrite
from memforge.plugins import load_plugins
from memforge.testing.conformance import (
    MemoryLayerConformance,
    build_part,
    check_memory_layer,
    check_memory_network,
    check_objective,
)

DT = torch.float64
NETWORKS = {"linear": TTTLinear, "mlp": TTTMLP}
TTT_PRESETS = [f"ttt.{net}_{integration}_tiny" for net in NETWORKS
               for integration in ("lmm", "mac", "mag", "mal")]
EXACT = {"rtol": 1e-9, "atol": 1e-10}


# -- the rule on the closed-form executor ---------------------------------------------------------
def network(kind: str, heads: int = 2, dim: int = 4, seed: int = 0):
    """A network in float64 with every parameter moved off its initial value (biases, norm)."""
    torch.manual_seed(seed)
    net = NETWORKS[kind](heads, dim).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def rule(net, chunk: int) -> LearningRule:
    return LearningRule(with_backward(net), L2Objective(),
                        LearnedStep(8, net.heads, net.dim, base_lr=1.0), NoForgetting(),
                        ReadAfterWrite(), chunk)


def tokens(n: int, steps: int, dim: int, seed: int) -> list[torch.Tensor]:
    """Queries, keys, values ``[N, T, d]`` and steps ``[N, T]`` that need gradients."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, steps, dim, generator=g, dtype=DT) for _ in range(3))
    eta = 0.3 * torch.rand(n, steps, generator=g, dtype=DT)
    return [t.requires_grad_() for t in (q, k, v, eta)]


def closed_form(net, chunk: int, q, k, v, eta, cuts=()):
    """Outputs of the engine's closed form, fed in pieces at ``cuts`` with the state carried."""
    r = rule(net, chunk)
    executor = select_executor(r)
    state, outputs, bounds = None, [], [0, *cuts, q.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        inputs = RuleInputs(q[:, a:b], k[:, a:b], v[:, a:b], eta[:, a:b], None, None, None, None)
        if state is None:
            state = executor.initial_state(r, q.shape[0] // net.heads, inputs)
        out, state = executor.scan(r, state, inputs)
        outputs.append(out)
    return torch.cat(outputs, 1), executor.current_weights(r, state), executor


def grads(out, net, inputs, seed: int):
    """Gradients of a random projection of ``out`` into the network's parameters and the inputs."""
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    wrt = [*net.parameters(), *inputs]
    return torch.autograd.grad((out * probe).sum(), wrt, allow_unused=True)


def test_the_rule_runs_on_the_closed_form_at_the_chunk_start_tier():
    net = network("linear")
    assert select_executor(rule(net, 16)).name == "closed_form"
    assert select_executor(rule(net, 16)).tier(rule(net, 16)) == "chunk-start"
    assert select_executor(rule(net, 1)).tier(rule(net, 1)) == "token-exact"


@pytest.mark.parametrize("kind", sorted(NETWORKS))
@pytest.mark.parametrize(("chunk", "steps"), [(1, 7), (7, 23), (16, 37)])
def test_closed_form_equals_the_reference_with_outer_gradients(kind, chunk, steps):
    net = network(kind)
    inputs = tokens(4, steps, 4, seed=chunk)
    fast, weights, _ = closed_form(net, chunk, *inputs)
    slow, end = ttt_reference(net, *inputs, chunk_size=chunk)
    torch.testing.assert_close(fast, slow, **EXACT)
    for got, want in zip(grads(fast, net, inputs, chunk), grads(slow, net, inputs, chunk), strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, **EXACT)
    assert len(weights) == len(net.initial_weights())


@settings(max_examples=12, deadline=None, derandomize=True)
@given(kind=st.sampled_from(sorted(NETWORKS)), chunk=st.sampled_from([1, 7, 16]),
       steps=st.integers(1, 20).map(lambda n: 2 * n - 1), data=st.data())
def test_split_anywhere_with_state_equals_the_reference_whole(kind, chunk, steps, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, steps - 1)), max_size=3))))
    cuts = [c for c in cuts if 0 < c < steps]
    net = network(kind, seed=steps)
    inputs = tokens(2, steps, 4, seed=steps)
    with torch.no_grad():
        fast, _, _ = closed_form(net, chunk, *inputs, cuts=cuts)
        slow, _ = ttt_reference(net, *inputs, chunk_size=chunk)
    torch.testing.assert_close(fast, slow, **EXACT)


def test_the_reference_continues_from_its_own_state():
    net = network("mlp")
    inputs = [t.detach() for t in tokens(2, 19, 4, seed=3)]
    whole, _ = ttt_reference(net, *inputs, chunk_size=7)
    first, state = ttt_reference(net, *(t[:, :10] for t in inputs), chunk_size=7)
    rest, _ = ttt_reference(net, *(t[:, 10:] for t in inputs), chunk_size=7, state=state)
    torch.testing.assert_close(torch.cat((first, rest), 1), whole, **EXACT)
    assert state.keys.shape[1] == 3  # tokens 7, 8, 9 of the second mini-batch are pending


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_inner_biases_move_and_the_norm_stays_an_outer_parameter(kind):
    net = network(kind)
    inputs = [t.detach() for t in tokens(4, 16, 4, seed=5)]
    _, weights, _ = closed_form(net, 16, *inputs)
    start = [w.detach().repeat(2, 1, 1) for w in net.initial_weights()]
    moved = [float((w.detach() - s).abs().max()) for w, s in zip(weights, start, strict=True)]
    assert all(m > 0 for m in moved), moved  # every fast weight, biases included, was written
    assert all(w.shape[1] == 1 for w in net.initial_weights()[1::2])  # biases: [H, 1, d_out]
    fast = {id(w) for w in net.initial_weights()}
    assert id(net.norm_weight) not in fast and id(net.norm_bias) not in fast
    assert tuple(net.norm_weight.shape) == (net.heads, net.dim)


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_networks_have_no_hand_written_backward_and_autograd_derives_one(kind):
    net = build_part("memory", f"ttt.{kind}", dim=8, heads=2)
    assert not hasattr(net, "backward")
    check_derivable(net, f"ttt.{kind}")
    assert check_memory_network(net, name=f"ttt.{kind}", heads=2, head_dim=4) is False


def test_the_objective_gradient_is_autograd_of_its_loss():
    check_objective(build_part("objective", "ttt.l2", dim=8, heads=2), name="ttt.l2", heads=2,
                    head_dim=4)


# -- the registered layer, the conformance kit, the presets -------------------------------------
class TestTTTLinearLayer(MemoryLayerConformance):
    preset = "ttt.linear_lmm_tiny"
    reference = staticmethod(ttt_layer_reference)


class TestTTTMLPLayer(MemoryLayerConformance):
    preset = "ttt.mlp_lmm_tiny"
    reference = staticmethod(ttt_layer_reference)


def test_the_kit_runs_every_check_on_the_layer():
    ran = check_memory_layer("ttt.linear_mac_tiny", reference=ttt_layer_reference, chunk_size=8)
    assert any(name.endswith("reference") for name in ran)
    assert any(name.endswith("static_decode") for name in ran)


def test_the_layer_builds_with_the_titans_plugin_blocked():
    registry = load_plugins(block=["titans"], autoload=False)
    assert "titans.neural_memory" not in registry.names("memory_layer")
    spec = memforge.preset("ttt.linear_lmm_tiny")
    layer = build_layer_component(spec, "memory_layer", 0, registry)
    y, _ = layer(torch.randn(2, 5, spec.dim), None)
    assert y.shape == (2, 5, spec.dim)


def test_show_describes_the_rule():
    layer = build_layer_component(memforge.preset("ttt.mlp_lmm_tiny"), "memory_layer", 0)
    described = layer.describe_rule()
    assert described.executor == "closed_form" and described.tier == "chunk-start"


@pytest.mark.parametrize("name", TTT_PRESETS)
def test_every_preset_builds_trains_splits_and_generates(name):
    spec = memforge.preset(name)
    torch.manual_seed(0)
    model = memforge.build_model(spec, dtype=DT)
    tokens_ = torch.randint(0, spec.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    whole = model(tokens_, labels=tokens_)
    first = model(tokens_[:, :6])
    rest = model(tokens_[:, 6:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole.logits, **EXACT)
    whole.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters() if p.requires_grad)
    out = model.generate(tokens_[:, :5], 4, temperature=0.0)
    assert out.shape == (2, 9)


@pytest.mark.parametrize("name", ["ttt.linear_lmm", "ttt.mlp_mac", "ttt.linear_mag", "ttt.mlp_mal"])
def test_small_presets_use_ttts_mini_batch(name):
    spec = memforge.preset(name)
    assert spec.choice("memory_layer", 0).config.chunk_size == 16
    assert spec.choice("optimizer", 0).config.base_lr == (1.0 if "linear" in name else 0.1)


@pytest.mark.parametrize(("assignment", "message"), [
    ("memory_layer.chunk_size=0", r"chunk_size"),
    ("optimizer.base_lr=-1.0", r"base_lr"),
    ("memory.init_std=0.0", r"init_std"),
    ("memory.norm_eps=0.0", r"norm_eps"),
    ("projection.conv_kernel=-2", r"conv_kernel"),
    ("memory_layer.chunk_size=5", r"segment_len'=16 must be a multiple of ttt.layer's "
                                  r"'chunk_size'=5"),
])
def test_bad_settings_are_one_line_errors(assignment, message):
    with pytest.raises(SpecError, match=message) as caught:
        memforge.override(memforge.preset("ttt.linear_mac_tiny"), [assignment])
    assert "\n" not in str(caught.value)


def test_mlp_expansion_is_bounded():
    with pytest.raises(SpecError, match=r"expansion"):
        memforge.override(memforge.preset("ttt.mlp_lmm_tiny"), ["memory.expansion=0"])
