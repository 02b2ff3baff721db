"""The ``lact`` plugin: the LaCT layer's fast path against its float64 token loop, the
conformance kit, causality, state carried across any split, stability, presets and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memforge_lact.layer import LaCTLayer, LaCTState
from memforge_lact.ops import (
    MUON_COEFFICIENTS,
    RENORM_EPS,
    newton_schulz,
    normalize_rows,
    renormalize,
)
from memforge_lact.reference import layer_token_loop

import memforge
from memforge.errors import InputError, SpecError
from memforge.testing.conformance import (
    MemoryLayerConformance,
    check_reference,
    check_split,
    layer_spec,
    memory_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = ("lact.lact", "lact.lmm", "lact.mac", "lact.mag", "lact.mal")
#: Settings away from the defaults, each checked against the reference.
VARIANTS = ((), ("memory_layer.momentum=false",), ("memory_layer.muon=true",),
            ("memory_layer.muon=true", "memory_layer.muon_coefficients=fixed"),
            ("memory_layer.renormalize=false", "memory_layer.output_scale=false"),
            ("memory_layer.expansion=2.0",))


class TestLaCTLayer(MemoryLayerConformance):
    component = "lact.layer"


class TestLaCTLayerInTheBlock(MemoryLayerConformance):
    preset = "lact.lact_tiny"


def _layer(chunk: int, overrides=(), seed: int = 0) -> LaCTLayer:
    spec = layer_spec("lact.layer", chunk_size=chunk, overrides=overrides)
    return memory_layer(spec, seed=seed).module


def _inputs(batch: int, steps: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, dim, generator=generator, dtype=torch.float64)


def _assert_states_equal(got: LaCTState, want: LaCTState) -> None:
    for a, b in zip(memforge_tensors(got), memforge_tensors(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def memforge_tensors(state: LaCTState) -> list[torch.Tensor]:
    """Every tensor of a state, in order (``None`` parts skipped)."""
    out: list[torch.Tensor] = []
    for part in state:
        if isinstance(part, tuple):
            out.extend(part)
        elif part is not None:
            out.append(part)
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("steps", [1, 13, 29, 131])
def test_the_fast_path_equals_the_token_loop(chunk, steps):
    """Outputs and the whole state (weights, momentum, pending tokens) at odd lengths."""
    if chunk == 1 and steps == 131:
        steps = 37  # the loop is the slow part; 37 updates show the same
    layer = _layer(chunk)
    x = _inputs(2, steps, layer.dim, steps)
    with torch.no_grad():
        y, state = layer(x)
        y_ref, state_ref = layer_token_loop(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    _assert_states_equal(state, state_ref)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("chunk", [1, 7])
def test_every_option_equals_the_token_loop_with_outer_gradients(overrides, chunk):
    layer = memory_layer(layer_spec("lact.layer", chunk_size=chunk, overrides=overrides))
    for length, split in ((13, 5), (17, 16), (9, 7)):
        check_reference(layer, length=length, split=split)
        check_split(layer, length=length, split=split)


def test_outer_gradients_into_the_input_equal_the_token_loop():
    layer = _layer(7, ("memory_layer.muon=true",))
    x = _inputs(2, 23, layer.dim, 3).requires_grad_(True)
    w = _inputs(2, 23, layer.dim, 4)
    (fast,) = torch.autograd.grad((layer(x)[0] * w).sum(), x)
    (slow,) = torch.autograd.grad((layer_token_loop(layer, x)[0] * w).sum(), x)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(chunk=st.sampled_from([1, 7, 64]), steps=st.integers(2, 150), data=st.data())
def test_split_anywhere_with_state_equals_whole(chunk, steps, data):
    """Cut into up to three pieces anywhere (mid-chunk, at a boundary, a full chunk pending)."""
    cuts = sorted(data.draw(st.lists(st.integers(1, steps - 1), min_size=1, max_size=2, unique=True)))
    layer = _layer(chunk)
    x = _inputs(2, steps, layer.dim, steps)
    with torch.no_grad():
        whole, whole_state = layer(x)
        pieces, state = [], None
        for start, end in zip([0, *cuts], [*cuts, steps], strict=True):
            y, state = layer(x[:, start:end], state)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-12)
    _assert_states_equal(state, whole_state)


def test_a_split_state_continues_like_the_token_loop():
    layer = _layer(7)
    x = _inputs(2, 30, layer.dim, 5)
    with torch.no_grad():
        _, state = layer(x[:, :14])     # two full chunks: the second one pending
        y, after = layer(x[:, 14:], state)
        y_ref, after_ref = layer_token_loop(layer, x[:, 14:], state)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    _assert_states_equal(after, after_ref)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_causal(chunk):
    layer = _layer(chunk)
    x = _inputs(1, 150, layer.dim, 6)
    for t in (0, 63, 64, 100):
        changed = x.clone()
        changed[:, t:] += 1.0
        with torch.no_grad():
            torch.testing.assert_close(layer(changed)[0][:, :t], layer(x)[0][:, :t], rtol=0, atol=0)


def test_a_chunk_reads_the_weights_from_before_its_update():
    """Apply then update: inside the first chunk the outputs do not depend on the steps."""
    layer = _layer(8)
    x = _inputs(1, 8, layer.dim, 7)
    with torch.no_grad():
        y = layer(x)[0]
        layer.lr_proj.bias.add_(3.0)
        torch.testing.assert_close(layer(x)[0], y, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), seed=st.integers(0, 2**16),
       schedule=st.sampled_from(sorted(MUON_COEFFICIENTS)))
def test_newton_schulz_pushes_singular_values_towards_one(rows, cols, seed, schedule):
    """Five quintic steps keep the singular vectors and map every singular value above 5% of
    the Frobenius norm into about [0.3, 1.3] (neither schedule converges exactly), none above."""
    g = torch.randn(2, rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = newton_schulz(g, MUON_COEFFICIENTS[schedule])
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.transpose(-1, -2) @ x @ vh.transpose(-1, -2)      # diagonal: the same vectors
    mapped = torch.diagonal(core, dim1=-2, dim2=-1)
    assert float((core - torch.diag_embed(mapped)).abs().max()) < 1e-8
    large = s > 0.05 * torch.linalg.matrix_norm(g)[:, None]
    assert bool((mapped < 1.3).all()) and bool((mapped[large] > 0.3).all())


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 24), width=st.integers(1, 16), seed=st.integers(0, 2**16),
       zero_row=st.booleans())
def test_row_normalisation_and_its_backward_equal_autograds(rows, width, seed, zero_row):
    """The hand-written backward of ``x / (||x|| + eps)`` against autograd of the expression, in
    float64, a zero row included (its gradient is ``grad / eps``, as autograd's)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, dtype=torch.float64, generator=generator)
    if zero_row:
        x[0] = 0.0
    grad = torch.randn(rows, width, dtype=torch.float64, generator=generator)
    fused_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = normalize_rows(fused_x, 1e-5)
    plain = plain_x / (torch.linalg.vector_norm(plain_x, dim=-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(fused, plain, atol=1e-14, rtol=1e-12)
    fused.backward(grad)
    plain.backward(grad)
    torch.testing.assert_close(fused_x.grad, plain_x.grad, atol=1e-10, rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 16), cols=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_renormalisation_restores_every_row_norm(rows, cols, seed):
    """To the norm at the sequence start, up to the eps added to the divisor."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(3, rows, cols, generator=generator, dtype=torch.float64) * 5
    norms = torch.rand(3, 1, cols, generator=generator, dtype=torch.float64) + 0.1
    before = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
    got = torch.linalg.vector_norm(renormalize(w, norms), dim=-2, keepdim=True)
    torch.testing.assert_close(got, norms * before / (before + RENORM_EPS), rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [2048, 16])
def test_stable_over_16k_random_tokens(chunk):
    """Default settings (and the presets' chunk): finite outputs and fast-weight rows that keep
    their initial norms over 16384 random tokens, in float32."""
    torch.manual_seed(0)
    layer = LaCTLayer(64, 4, chunk_size=chunk)
    x = torch.randn(1, 16384, 64) * 3
    with torch.no_grad():
        y, state = layer(x)
        weights = layer.read_state(state, 1)
    assert bool(torch.isfinite(y).all())
    for w, init in zip(weights, (layer.w02, layer.w1), strict=True):
        assert bool(torch.isfinite(w).all())
        norms = torch.linalg.vector_norm(w, dim=-2)
        torch.testing.assert_close(norms, torch.linalg.vector_norm(init, dim=-2).expand_as(norms),
                                   rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", [f"{p}_tiny" for p in PRESETS])
def test_every_preset_builds_trains_and_splits(name):
    torch.manual_seed(0)
    spec = memforge.preset(name)
    model = memforge.build_model(spec).double()
    tokens = torch.randint(0, spec.vocab_size, (2, 37))
    out = model(tokens, labels=tokens)
    out.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        first = model(tokens[:, :13])
        second = model(tokens[:, 13:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), out.logits.detach(),
                               rtol=1e-9, atol=1e-9)


def test_the_small_presets_chunk_is_shorter_than_an_mqar_sequence():
    for name in PRESETS:
        spec = memforge.preset(name)
        assert spec.choice("memory_layer", 0).config.chunk_size < 64


def test_the_layer_defaults_to_the_papers_chunk_and_the_block_to_a_window_of_one_chunk():
    from memforge_lact.configs import LaCTLayerConfig

    assert LaCTLayerConfig().chunk_size == 2048
    for name in ("lact.lact", "lact.lact_tiny"):
        spec = memforge.preset(name)
        assert (spec.choice("attention", 0).config.window
                == spec.choice("memory_layer", 0).config.chunk_size)


@pytest.mark.parametrize(("assignments", "message"), [
    (["memory_layer.chunk_size=0"], "chunk_size"),
    (["memory_layer.expansion=0.01"], "hidden width of 0"),
    (["memory_layer.muon_coefficients=cubic"], "muon_coefficients"),
    (["memory_layer.base_lr=-1"], "base_lr"),
])
def test_bad_settings_are_one_line_spec_errors(assignments, message):
    with pytest.raises(SpecError, match=message) as error:
        memforge.build_model(memforge.override(memforge.preset("lact.lact_tiny"), assignments))
    assert "\n" not in str(error.value)


def test_a_mac_segment_the_chunk_does_not_divide_is_refused():
    with pytest.raises(SpecError, match="segment_len") as error:
        memforge.override(memforge.preset("lact.mac_tiny"), ["memory_layer.chunk_size=6"])
    assert "\n" not in str(error.value)


def test_bad_input_and_state_are_one_line_errors():
    layer = _layer(7)
    x = _inputs(2, 5, layer.dim, 0)
    _, state = layer(x)
    cases = [lambda: layer(x[..., :-1]), lambda: layer(x.long()),
             lambda: layer(torch.full_like(x, float("nan"))),
             lambda: layer(x[:1], state), lambda: layer(x, ("not", "a", "state")),
             lambda: layer(x, state._replace(momentum=None, gate=None))]
    for case in cases:
        with pytest.raises(InputError) as error:
            case()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(("chunk", "tier"), [(1, "token-exact"), (64, "rule-specific")])
def test_the_layer_describes_its_rule(chunk, tier):
    from memforge.interfaces import DescribesRule

    layer = LaCTLayer(32, 2, chunk_size=chunk, muon="fixed")
    assert isinstance(layer, DescribesRule)
    rule = layer.describe_rule()
    assert (rule.tier, rule.executor) == (tier, "lact.large_chunk")
    assert "Muon (fixed" in rule.optimizer and "momentum" in rule.optimizer


# -- the continuum memory (lact.continuum) ------------------------------------------------------------
class TestContinuumLayer(MemoryLayerConformance):
    component = "lact.continuum"


def _continuum(chunk: int, ratio: int, levels: int, overrides=()):
    spec = layer_spec("lact.continuum", chunk_size=chunk,
                      overrides=[f"memory_layer.ratio={ratio}", f"memory_layer.levels={levels}",
                                 *overrides])
    return memory_layer(spec).module


@pytest.mark.parametrize(("chunk", "ratio", "levels", "steps"),
                         [(1, 2, 3, 19), (3, 2, 3, 29), (4, 4, 2, 37), (7, 2, 1, 23)])
def test_the_continuum_equals_its_token_loop(chunk, ratio, levels, steps):
    """Outputs and the state (every level's weights and gathered gradient, the pending block,
    the block count) at odd lengths over several periods of the slowest level."""
    from memforge_lact.continuum_reference import continuum_token_loop

    layer = _continuum(chunk, ratio, levels)
    x = _inputs(2, steps, layer.dim, steps)
    with torch.no_grad():
        y, state = layer(x)
        y_ref, state_ref = continuum_token_loop(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    assert state.blocks == state_ref.blocks
    for got, want in zip(state[:5], state_ref[:5], strict=True):
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("overrides", [(), ("memory_layer.renormalize=false",)],
                         ids=["defaults", "no-renorm"])
def test_the_continuum_with_outer_gradients_and_carried_state(overrides):
    layer = memory_layer(layer_spec("lact.continuum", chunk_size=2,
                                    overrides=["memory_layer.ratio=2", "memory_layer.levels=3",
                                               *overrides]))
    for length, split in ((13, 5), (17, 9)):
        check_reference(layer, length=length, split=split)
        check_split(layer, length=length, split=split)


def test_a_slow_level_changes_only_at_its_period():
    """Level 2 (period 8) keeps its weights for 7 blocks of 1 and moves at the 8th."""
    layer = _continuum(1, 8, 2)
    x = _inputs(1, 10, layer.dim, 1)
    with torch.no_grad():
        _, state = layer(x[:, :8])      # 7 blocks applied, the 8th pending
        before = state.weights[1][0].clone()
        _, state = layer(x[:, 8:9], state)
    assert torch.equal(before, layer.w02[1].expand_as(before))
    assert not torch.allclose(state.weights[1][0], before)


def test_the_continuum_is_stable_over_16k_random_tokens():
    torch.manual_seed(0)
    from memforge_lact.continuum import ContinuumLayer

    layer = ContinuumLayer(32, 2)
    with torch.no_grad():
        y, state = layer(torch.randn(1, 16384, 32) * 3)
    assert bool(torch.isfinite(y).all())
    for (w02, w1), init02, init1 in zip(state.weights, layer.w02, layer.w1, strict=True):
        for w, init in ((w02, init02), (w1, init1)):
            norms = torch.linalg.vector_norm(w, dim=-2)
            torch.testing.assert_close(norms, torch.linalg.vector_norm(init, dim=-2).expand_as(norms),
                                       rtol=1e-3, atol=0)


def test_continuum_preset_trains_and_splits():
    torch.manual_seed(0)
    spec = memforge.preset("lact.continuum_lmm_tiny")
    model = memforge.build_model(spec).double()
    tokens = torch.randint(0, spec.vocab_size, (2, 37))
    out = model(tokens, labels=tokens)
    out.loss.backward()
    with torch.no_grad():
        first = model(tokens[:, :13])
        second = model(tokens[:, 13:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), out.logits.detach(),
                               rtol=1e-9, atol=1e-9)
