"""The ``miras`` plugin: Moneta, Yaad and Memora on the engine against the float64 token loop of
the paper's equations, their parts' invariants, the conformance kit, stability over 16K tokens,
the presets and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from memforge_miras.configs import SCALE_INVERSE_GAP, HuberObjectiveConfig
from memforge_miras.presets import SETTINGS
from memforge_miras.reference import final_weights, layer_reference
from memforge_miras.rules import (
    L1_STEPS,
    HuberObjective,
    KLRetention,
    LpObjective,
    LqRetention,
    lp_gradient,
    lq_inverse,
    lq_normalise,
)

import memforge
from memforge import SpecError
from memforge.builder import build_layer_component
from memforge.cli import main
from memforge.engine.executors import RuleInputs
from memforge.testing.conformance import (
    MemoryLayerConformance,
    build_part,
    check_memory_network,
    check_objective,
    memory_layer,
)

DT = torch.float64
MODELS = ("moneta", "yaad", "memora")
PRESETS = [f"miras.{model}_{integration}_tiny" for model in MODELS
           for integration in ("lmm", "mac", "mag", "mal")]
EXACT = {"rtol": 1e-9, "atol": 1e-10}
#: Yaad's steps above the threshold other than its presets' (the plain tests run that one), each
#: held to the reference too.
OTHER_L1_STEPS = [step for step in L1_STEPS if step != SETTINGS["yaad"]["objective.l1_step"]]


def layer(model: str, chunk: int | None = None, *settings: str):
    """The memory layer of ``miras.<model>_lmm_tiny`` in float64 (``chunk``: its chunk size;
    ``settings``: further ``key=value`` overrides)."""
    spec = memforge.override(memforge.preset(f"miras.{model}_lmm_tiny"), list(settings))
    return memory_layer(spec, chunk_size=chunk).module


def inputs(length: int, dim: int = 32, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed), dtype=DT)


# -- the objectives ------------------------------------------------------------------------------
errors = st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=6).map(
    lambda xs: torch.tensor(xs, dtype=DT)[None, None])


@settings(deadline=None, max_examples=30)
@given(errors, st.floats(1.0, 4.0), st.sampled_from(("tanh", "sqrt")))
def test_lp_loss_back_propagates_exactly_its_gradient(error, p, surrogate):
    objective = LpObjective(p=p, surrogate=surrogate, sharpness=10.0, eps=1e-6)
    prediction = error.clone().requires_grad_()
    target = torch.zeros_like(error)
    (grad,) = torch.autograd.grad(objective.loss(prediction, target).sum(), prediction)
    torch.testing.assert_close(grad, objective.loss_grad(prediction, target), **EXACT)


@settings(deadline=None, max_examples=30)
@given(errors, st.floats(1.0, 4.0))
def test_the_sqrt_surrogate_is_the_gradient_of_the_smoothed_loss(error, p):
    error = error.requires_grad_()
    smoothed = ((error.square() + 1e-6).pow(p / 2) - 1e-6 ** (p / 2)).sum()
    (want,) = torch.autograd.grad(smoothed, error)
    torch.testing.assert_close(lp_gradient(error, p, "sqrt", 10.0, 1e-6), want, **EXACT)


@settings(deadline=None, max_examples=30)
@given(errors.filter(lambda e: bool((e.abs() > 0.05).all())), st.floats(1.0, 4.0))
def test_the_surrogates_approach_the_exact_lp_gradient_as_they_sharpen(error, p):
    exact = p * torch.sign(error) * error.abs().pow(p - 1)
    for surrogate in ("tanh", "sqrt"):
        loose = (lp_gradient(error, p, surrogate, 10.0, 1e-2) - exact).abs().max()
        sharp = (lp_gradient(error, p, surrogate, 1e4, 1e-12) - exact).abs().max()
        assert sharp <= loose + 1e-12 and sharp < 1e-5 * max(1.0, float(exact.abs().max()))


def test_moneta_at_p_2_is_the_l2_gradient_doubled():
    error = torch.randn(3, 5, 4, dtype=DT)
    objective = LpObjective(p=2.0, surrogate="sqrt", sharpness=10.0, eps=1e-6)
    torch.testing.assert_close(objective.loss_grad(error, torch.zeros_like(error)), 2 * error, **EXACT)


def huber(delta: float, l1_step: str = "sign") -> tuple[HuberObjective, torch.Tensor]:
    objective = HuberObjective(8, 2, 4, delta_init=delta, l1_step=l1_step).to(DT)
    return objective, objective(torch.zeros(1, 3, 8, dtype=DT)).side


def test_huber_threshold_is_a_positive_per_token_per_head_side_input():
    objective, delta = huber(0.7)
    assert delta.shape == (1, 3, 2)
    torch.testing.assert_close(delta, torch.full_like(delta, 2 * 0.7), **EXACT)  # sqrt(4) * 0.7
    x = torch.randn(2, 5, 8, dtype=DT) * 50
    assert bool((objective(x).side > 0).all())


@pytest.mark.parametrize(("l1_step", "step"), [
    ("sign", torch.sign), ("tanh", lambda e: torch.tanh(10 * e)), ("normalised", lambda e: e / e.norm())])
def test_huber_switches_between_l2_and_l1_per_token(l1_step, step):
    objective, _ = huber(1.0, l1_step)
    target = torch.zeros(1, 2, 3, dtype=DT)
    prediction = torch.tensor([[[0.3, -0.4, 0.1], [2.0, -3.0, 0.5]]], dtype=DT)
    delta = torch.tensor([[1.0, 1.5]], dtype=DT)
    grad = objective.loss_grad(prediction, target, delta)
    torch.testing.assert_close(grad[0, 0], prediction[0, 0])                  # ||e|| <= delta
    torch.testing.assert_close(grad[0, 1], 1.5 * step(prediction[0, 1]))     # above: delta s(e)
    leaf = prediction.clone().requires_grad_()
    (want,) = torch.autograd.grad(objective.loss(leaf, target, delta).sum(), leaf)
    torch.testing.assert_close(grad, want, **EXACT)


@settings(deadline=None, max_examples=30)
@given(errors, st.floats(0.05, 4.0), st.sampled_from(L1_STEPS))
def test_huber_loss_back_propagates_exactly_its_gradient_on_both_branches(error, delta, l1_step):
    objective, _ = huber(1.0, l1_step)
    prediction = error.clone().requires_grad_()
    target, side = torch.zeros_like(error), torch.full(error.shape[:-1], delta, dtype=DT)
    (grad,) = torch.autograd.grad(objective.loss(prediction, target, side).sum(), prediction)
    torch.testing.assert_close(grad, objective.loss_grad(prediction, target, side), **EXACT)


@settings(deadline=None, max_examples=30)
@given(errors.filter(lambda e: bool(e.norm() > 0.1)), st.floats(0.2, 1.0))
def test_the_normalised_step_is_the_l2_step_capped_at_delta_and_continuous(error, fraction):
    """Above the threshold the step has the ℓ2 step's direction and length ``delta``; at the
    threshold both branches give ``e`` (the sign step jumps there, up to ``sqrt(d)`` times)."""
    objective, _ = huber(1.0, "normalised")
    norm, zero = error.norm(), torch.zeros_like(error)
    capped = objective.loss_grad(error, zero, (fraction * norm)[None, None])
    torch.testing.assert_close(capped, fraction * error, **EXACT)
    torch.testing.assert_close(objective.loss_grad(error, zero, norm[None, None] * (1 - 1e-12)),
                               error, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("l1_step", "passes"), [("sign", False), ("tanh", True), ("normalised", True)])
def test_which_steps_pass_outer_gradient_through_the_l1_branch(l1_step, passes):
    """Only a step that varies with the error lets the outer loss reach the values through a
    token above the threshold (docs/zoo.md, "MIRAS": Yaad's switch)."""
    objective, _ = huber(1.0, l1_step)
    error = torch.tensor([[[0.05, -0.08, 0.02, 3.0]]], dtype=DT, requires_grad=True)
    step = objective.loss_grad(error, torch.zeros_like(error), torch.tensor([[1.0]], dtype=DT))
    (grad,) = torch.autograd.grad(step.square().sum(), error)
    assert bool(grad.any()) is passes


@pytest.mark.parametrize("l1_step", L1_STEPS)
def test_huber_with_a_huge_threshold_is_the_l2_objective(l1_step):
    objective, _ = huber(1.0, l1_step)
    prediction, target = torch.randn(2, 7, 4, dtype=DT), torch.randn(2, 7, 4, dtype=DT)
    grad = objective.loss_grad(prediction, target, torch.full((2, 7), 1e6, dtype=DT))
    torch.testing.assert_close(grad, prediction - target, **EXACT)


def test_huber_needs_its_side_input():
    objective, _ = huber(1.0)
    with pytest.raises(ValueError, match="side input"):
        objective.loss_grad(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), None)


# -- the retentions ------------------------------------------------------------------------------
matrices = st.integers(0, 2**31 - 1).map(
    lambda seed: torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=DT))


@settings(deadline=None, max_examples=25)
@given(matrices, st.floats(2.0, 8.0), st.floats(0.01, 100.0))
def test_the_p_norm_link_is_homogeneous_of_degree_1_and_keeps_the_dual_norm(a, q, scale):
    w = lq_normalise(a, q, "p_norm")
    torch.testing.assert_close(lq_normalise(scale * a, q, "p_norm"), scale * w, rtol=1e-9, atol=1e-12)
    dual = q / (q - 1)
    norm = w.abs().pow(dual).sum((-2, -1)).pow(1 / dual)
    torch.testing.assert_close(norm, a.abs().pow(q).sum((-2, -1)).pow(1 / q), rtol=1e-9, atol=1e-12)


@settings(deadline=None, max_examples=25)
@given(matrices, st.floats(2.0, 8.0), st.floats(0.1, 10.0))
def test_the_scale_link_is_homogeneous_of_degree_3_minus_q(a, q, scale):
    torch.testing.assert_close(lq_normalise(scale * a, q, "scale"),
                               scale ** (3 - q) * lq_normalise(a, q, "scale"), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("link", ["p_norm", "scale"])
def test_q_2_is_no_normalisation(link):
    a = torch.randn(2, 3, 4, dtype=DT)
    assert lq_normalise(a, 2.0, link) is a


@settings(deadline=None, max_examples=40)
@given(matrices, st.floats(2.0, 8.0), st.sampled_from(("p_norm", "scale")), st.floats(0.01, 100.0))
def test_the_inverse_link_is_a_dual_the_link_maps_back_to_the_weights(w, q, link, scale):
    if link == "scale" and abs(q - 3.0) < SCALE_INVERSE_GAP:
        q = 3.0 - SCALE_INVERSE_GAP
    w = scale * w
    dual = lq_inverse(w, q, link)
    # Both maps floor the norm at 1e-6 (the scale link's dual of a large w is tiny for q > 3).
    assume(float(dual.abs().pow(q).sum((-2, -1)).pow(1 / q).min()) > 1e-4)
    torch.testing.assert_close(lq_normalise(dual, q, link), w, rtol=1e-9, atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(matrices, st.floats(2.0, 8.0))
def test_the_inverse_p_norm_link_round_trips_in_float32(w, q):
    w = w.float()
    torch.testing.assert_close(lq_normalise(lq_inverse(w, q, "p_norm"), q, "p_norm"), w,
                               rtol=1e-4, atol=1e-6)


def test_a_fresh_moneta_memory_starts_at_its_draw_or_at_the_draws_link():
    """``retention.dual_init``: the layer stores the dual it starts from in the network's initial
    weights; ``inverse`` (the default) reads the network's draw, ``draw`` the draw's link.
    (``layer`` builds from the same seed, so both draw the same weights.)"""
    inverse, draw = layer("moneta", 8), layer("moneta", 8, "retention.dual_init=draw")
    drawn = tuple(draw.memory.initial_weights())
    # The layer is built in float32 and then cast, so the round trip is float32's.
    for start, weights in zip(inverse.read_state(None, 1), drawn, strict=True):
        torch.testing.assert_close(start, weights, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(start, lq_normalise(weights, 4.0, "p_norm"))
    for start, weights in zip(draw.read_state(None, 1), drawn, strict=True):
        torch.testing.assert_close(start, lq_normalise(weights, 4.0, "p_norm"), **EXACT)


def _share_of_the_way_writes_move_the_reads(dual_init: str) -> float:
    """32 random unit keys and values written into a fresh ``miras.moneta_lmm`` layer (float64,
    step 0.01, decay 0.02), the keys read back: how far the reads moved toward their values."""
    spec = memforge.override(memforge.preset("miras.moneta_lmm"), [f"retention.dual_init={dual_init}"])
    module = memory_layer(spec).module
    n, steps, d = module.heads, 32, module.head_dim
    generator = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(n, steps, d, generator=generator, dtype=DT), dim=-1)
    values = torch.randn(n, steps, d, generator=generator, dtype=DT)
    gate = torch.ones(n, steps, dtype=DT)
    written = RuleInputs(keys, keys, values, 0.01 * gate, None, math.log(1 - 0.02) * gate, None, None)
    with torch.no_grad():
        start = module.executor.initial_state(module.rule, 1, written)
        _, end = module.executor.scan(module.rule, start, written)
        before = module.read(keys[None], module.executor.current_weights(module.rule, start))[0]
        after = module.read(keys[None], module.executor.current_weights(module.rule, end))[0]
    return float(((after - before) * (values - before)).sum() / (values - before).square().sum())


def test_writes_into_a_fresh_moneta_memory_move_its_reads_toward_their_values():
    """docs/zoo.md, "MIRAS": where Moneta's dual starts. From the draw's link the memory sits
    below its layer norm's epsilon and writes hardly move the reads (-1.5% measured); from the
    draw itself they move them as an l2 memory's do (40%)."""
    assert _share_of_the_way_writes_move_the_reads("inverse") > 0.3
    assert abs(_share_of_the_way_writes_move_the_reads("draw")) < 0.05


@settings(deadline=None, max_examples=25)
@given(matrices, st.floats(0.1, 10.0))
def test_memora_weights_lie_on_the_scaled_simplex_and_ignore_a_shift_per_column(logits, scale):
    retention = KLRetention(8, 2, scale=scale, init=0.02, max_decay=1.0)
    (w,) = retention.project((logits,), (logits,))
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-2), torch.full_like(w.sum(-2), scale), **EXACT)
    shifted = logits + torch.randn(3, 1, 5, dtype=DT)
    torch.testing.assert_close(retention.project((shifted,), (shifted,))[0], w, **EXACT)


@pytest.mark.parametrize("retention", [
    LqRetention(8, 2, q=4.0, link="p_norm", init=0.02, max_decay=1.0),
    KLRetention(8, 2, scale=1.0, init=0.02, max_decay=1.0)])
def test_retentions_are_mirror_maps_at_chunk_ends_with_a_log_space_decay(retention):
    assert retention.applies_at == "chunk_end" and retention.mirror
    log_keep = retention(torch.randn(2, 5, 8) * 100)
    assert log_keep.shape == (2, 5, 2) and bool((log_keep <= 0).all() and torch.isfinite(log_keep).all())


# -- the layers against the reference ------------------------------------------------------------
@pytest.mark.parametrize(("model", "executor", "tier"), [
    ("moneta", "sequential", "rule-specific"), ("yaad", "closed_form", "chunk-start"),
    ("memora", "sequential", "rule-specific")])
def test_each_rule_runs_on_its_executor_at_its_tier(model, executor, tier):
    described = layer(model, 16).describe_rule()
    assert (described.executor, described.tier) == (executor, tier)
    assert layer(model, 1).describe_rule().tier == "token-exact"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_the_layer_equals_the_reference_with_outer_gradients(model, chunk):
    assert_equals_the_reference_with_outer_gradients(layer(model, chunk))


@pytest.mark.parametrize("l1_step", OTHER_L1_STEPS)
@pytest.mark.parametrize("chunk", [1, 7])
def test_yaad_equals_the_reference_with_outer_gradients_at_each_l1_step(l1_step, chunk):
    assert_equals_the_reference_with_outer_gradients(
        layer("yaad", chunk, f"objective.l1_step={l1_step}"), sharp=l1_step == "tanh")


def assert_equals_the_reference_with_outer_gradients(module, *, sharp: bool = False) -> None:
    """Outputs and every outer gradient equal the reference's. With ``sharp`` (Yaad's ``tanh(a e)``
    step, whose slope ``a * delta * theta`` per token multiplies rounding differences along the
    sequence) gradients are held to 1e-10 of their largest value instead of element by element."""
    x = inputs(23).requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    fast, _ = module(x)
    slow, _ = layer_reference(module, x)
    torch.testing.assert_close(fast, slow, **EXACT)
    w = torch.randn_like(fast)
    got = torch.autograd.grad((fast * w).sum(), [x, *params], allow_unused=True)
    want = torch.autograd.grad((slow * w).sum(), [x, *params], allow_unused=True)
    for g, r in zip(got, want, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            scaled = {"rtol": 0.0, "atol": 1e-10 * float(r.abs().max())}
            torch.testing.assert_close(g, r, **(scaled if sharp else EXACT))


@settings(deadline=None, max_examples=4)
@given(st.data())
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_split_anywhere_with_state_equals_the_reference_whole(model, chunk, data):
    assert_split_equals_the_reference_whole(layer(model, chunk), chunk, data)


@settings(deadline=None, max_examples=4)
@given(st.data())
@pytest.mark.parametrize("l1_step", OTHER_L1_STEPS)
def test_yaad_split_anywhere_equals_the_reference_whole_at_each_l1_step(l1_step, data):
    assert_split_equals_the_reference_whole(layer("yaad", 7, f"objective.l1_step={l1_step}"), 7, data)


def assert_split_equals_the_reference_whole(module, chunk: int, data) -> None:
    length = data.draw(st.integers(2, 40).filter(lambda n: n % 2), label="length")
    cuts = sorted(set(data.draw(st.lists(st.integers(1, length - 1), max_size=3), label="cuts")))
    x = inputs(length, seed=length)
    outs, state = [], None
    with torch.no_grad():
        for lo, hi in zip([0, *cuts], [*cuts, length], strict=True):
            y, state = module(x[:, lo:hi], state)
            outs.append(y)
        slow, end = layer_reference(module, x)
        torch.testing.assert_close(torch.cat(outs, 1), slow, **EXACT)
        want = final_weights(module.memory, module.objective, module.retention, end.rule,
                             chunk_size=chunk)
        for got, ref in zip(module.read_state(state, 2), want, strict=True):
            torch.testing.assert_close(got, ref, **EXACT)


@pytest.mark.parametrize("model", MODELS)
def test_the_reference_continues_from_the_layers_state(model):
    module = layer(model, 7)
    x = inputs(20)
    with torch.no_grad():
        _, state = module(x[:, :9])
        torch.testing.assert_close(layer_reference(module, x[:, 9:], state)[0],
                                   layer_reference(module, x)[0][:, 9:], **EXACT)


@pytest.mark.parametrize("l1_step", L1_STEPS)
def test_yaad_takes_both_branches_of_the_huber_switch(l1_step):
    module = layer("yaad", 7, f"objective.l1_step={l1_step}")
    x = inputs(29)
    q, k, v, _ = module.projection(x, None)
    delta = module.objective(x).side.permute(0, 2, 1).flatten(0, 1)
    weights = module.read_state(None, 2)
    prediction = module.memory.forward(k.flatten(0, 1), lambda i, h: h @ weights[i])[0]
    below = (prediction - v.flatten(0, 1)).norm(dim=-1) <= delta
    assert bool(below.any()) and bool((~below).any())


def test_memora_weights_stay_on_the_simplex():
    module = layer("memora", 7)
    with torch.no_grad():
        _, state = module(inputs(30))
        for w in module.read_state(state, 2):
            assert bool((w >= 0).all())
            torch.testing.assert_close(w.sum(-2), torch.ones_like(w.sum(-2)), **EXACT)


# -- the conformance kit -------------------------------------------------------------------------
class TestMonetaLayer(MemoryLayerConformance):
    preset = "miras.moneta_lmm_tiny"
    reference = staticmethod(layer_reference)


class TestYaadLayer(MemoryLayerConformance):
    preset = "miras.yaad_lmm_tiny"
    reference = staticmethod(layer_reference)


class TestMemoraLayer(MemoryLayerConformance):
    preset = "miras.memora_lmm_tiny"
    reference = staticmethod(layer_reference)


@pytest.mark.parametrize("name", ["miras.lp", "miras.huber", "miras.l2"])
def test_the_kit_checks_each_objective_against_autograd(name):
    check_objective(build_part("objective", name), name=name, heads=2, head_dim=8)


@pytest.mark.parametrize("l1_step", OTHER_L1_STEPS)
def test_the_kit_checks_each_huber_step_against_autograd(l1_step):
    objective = build_part("objective", "miras.huber", config=HuberObjectiveConfig(l1_step=l1_step))
    check_objective(objective, name=f"miras.huber ({l1_step})", heads=2, head_dim=8)


def test_the_kit_checks_the_memory_networks_backward():
    network = build_part("memory", "miras.mlp")
    assert check_memory_network(network, name="miras.mlp", heads=2, head_dim=8) is True


# -- stability -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "overrides"), [
    *[pytest.param(model, [], id=model) for model in MODELS],
    *[pytest.param("yaad", [f"objective.l1_step={step}"], id=f"yaad-{step}") for step in OTHER_L1_STEPS]])
def test_16k_random_tokens_stay_finite_and_bounded_with_default_settings(model, overrides):
    """Default components and chunk size on 16K random tokens (width 16, two heads, fed in pieces
    of 1024): finite outputs, and fast weights that stay within a few times their start."""
    spec = memforge.override(memforge.preset(f"miras.{model}_lmm_tiny"),
                             ["dim=16", "memory_layer.chunk_size=16", *overrides])
    torch.manual_seed(0)
    module = build_layer_component(spec, "memory_layer", 0)
    state, norms = None, []
    with torch.no_grad():
        start = max(float(w.norm(dim=(-2, -1)).max()) for w in module.read_state(None, 2))
        for piece in range(16):
            y, state = module(torch.randn(2, 1024, 16, generator=torch.Generator().manual_seed(piece)),
                              state)
            assert bool(torch.isfinite(y).all())
            norms.append(max(float(w.norm(dim=(-2, -1)).max()) for w in module.read_state(state, 2)))
    assert all(math.isfinite(n) for n in norms)
    assert max(norms) < 10 * max(start, 1.0), (start, norms)


# -- presets, build, bad settings ----------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_trains_and_splits(name):
    spec = memforge.preset(name)
    torch.manual_seed(0)
    model = memforge.build_model(spec, dtype=DT)
    tokens = torch.randint(0, spec.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    whole = model(tokens, labels=tokens)
    first = model(tokens[:, :6])
    rest = model(tokens[:, 6:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole.logits, **EXACT)
    whole.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", ["moneta", "memora"])
def test_compiled_generation_on_the_sequential_executor_is_refused_in_one_line(model):
    spec = memforge.preset(f"miras.{model}_lmm_tiny")
    net = memforge.build_model(spec)
    prompt = torch.randint(0, spec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    assert net.generate(prompt, 3, temperature=0.0).shape == (1, 8)
    with pytest.raises(memforge.InputError, match=r"compile=False") as caught:
        net.generate(prompt, 3, temperature=0.0, compile=True)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("model", MODELS)
def test_small_presets_use_the_papers_parts(model):
    spec = memforge.preset(f"miras.{model}_lmm")
    parts = {kind: spec.choice(kind, 0).impl for kind in
             ("memory", "objective", "optimizer", "retention", "retrieval", "projection")}
    assert parts["memory"] == "miras.mlp" and parts["optimizer"] == "miras.gd"
    assert (parts["objective"], parts["retention"]) == {
        "moneta": ("miras.lp", "miras.lq"), "yaad": ("miras.huber", "miras.l2_decay"),
        "memora": ("miras.l2", "miras.kl")}[model]
    assert spec.choice("memory_layer", 0).config.chunk_size == 16


def test_yaad_presets_take_the_normalised_step_and_their_measured_step_bounds():
    """docs/zoo.md, "MIRAS": Yaad's default step and step size; the other models keep miras.gd's."""
    for size in ("", "_tiny"):
        spec = memforge.preset(f"miras.yaad_mag{size}")
        optimizer = spec.choice("optimizer", 0).config
        assert spec.choice("objective", 0).config.l1_step == "normalised"
        assert (optimizer.max_lr, optimizer.lr_init) == (0.1, 0.05)
    assert memforge.preset("miras.moneta_lmm").choice("optimizer", 0).config.max_lr == 0.01


@pytest.mark.parametrize(("preset", "assignment", "field"), [
    ("miras.moneta_lmm_tiny", "objective.p=5", "'p'"),
    ("miras.moneta_lmm_tiny", "objective.p=0.5", "'p'"),
    ("miras.moneta_lmm_tiny", "retention.q=1.5", "'q'"),
    ("miras.moneta_lmm_tiny", "retention.q=9", "'q'"),
    ("miras.moneta_lmm_tiny", "retention.link=cube", "'link'"),
    ("miras.moneta_lmm_tiny", "retention.dual_init=zero", "'dual_init'"),
    ("miras.moneta_lmm_tiny", ["retention.link=scale", "retention.q=3"], "dual_init='draw'"),
    ("miras.yaad_lmm_tiny", "objective.delta_init=0", "'delta_init'"),
    ("miras.yaad_lmm_tiny", "objective.l1_step=huber", "'l1_step'.*'sign', 'tanh', 'normalised'"),
    ("miras.yaad_lmm_tiny", "objective.sharpness=0", "'sharpness'"),
    ("miras.memora_lmm_tiny", "retention.scale=0", "'scale'"),
    ("miras.memora_mac_tiny", "memory_layer.chunk_size=5", "'segment_len'=16 must be a multiple"),
])
def test_bad_settings_are_one_line_spec_errors_naming_the_field(preset, assignment, field):
    assignments = assignment if isinstance(assignment, list) else [assignment]
    with pytest.raises(SpecError, match=field) as caught:
        memforge.override(memforge.preset(preset), assignments)
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_p_out_of_range_in_one_line(capsys):
    assert main(["show", "miras.moneta_lmm_tiny", "--set", "objective.p=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "memforge: error: objective: 'p' must be <= 4.0, got 5.0"
