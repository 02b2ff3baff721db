"""Attention, rotary, norm, SwiGLU and transformer-block tests.

The fast paths of ``CausalSelfAttention`` (block-local sliding window, masked SDPA with a cache,
SDPA's causal flag) are checked against ``dense_masked_attention``, which builds the full mask entry
by entry. Exactness checks run in float64 on tiny shapes; tensors come from seeded generators.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from memforge_baselines.attention import AttentionCache, CausalSelfAttention
from memforge_baselines.attention_reference import dense_masked_attention, reference_attention
from memforge_baselines.blocks import TransformerBlock

from memforge.conformance import check_module
from memforge.nn import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary, attend, causal_mask

DT = torch.float64
TIGHT = {"atol": 1e-12, "rtol": 1e-10}

seeds = st.integers(0, 2**31 - 1)
windows = st.one_of(st.none(), st.integers(1, 6))


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=DT) * scale


def make_attention(
    gen: torch.Generator, dim: int, heads: int, window: int | None, persistent: int
) -> CausalSelfAttention:
    """A float64 module whose weights all come from ``gen`` (persistent tokens made large)."""
    m = CausalSelfAttention(dim, heads, window=window, persistent_tokens=persistent).to(DT)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(randn(gen, *p.shape, scale=1.0 if name == "persistent" else dim**-0.5 * 1.5))
    return m


@st.composite
def attention_cases(draw, max_len: int = 20):
    """(generator, module, x) for a random small configuration."""
    gen = torch.Generator().manual_seed(draw(seeds))
    heads = draw(st.integers(1, 2))
    dim = heads * draw(st.sampled_from([2, 4]))
    m = make_attention(gen, dim, heads, draw(windows), draw(st.integers(0, 3)))
    x = randn(gen, draw(st.integers(1, 2)), draw(st.integers(1, max_len)), dim)
    return gen, m, x


def grads(y: torch.Tensor, weights: torch.Tensor, inputs: list[torch.Tensor]):
    return torch.autograd.grad((y * weights).sum(), inputs)


# ---------------------------------------------------------------------------------------------
# layers


@settings(deadline=None, max_examples=20)
@given(seed=seeds, d=st.sampled_from([2, 4, 8]), T=st.integers(1, 6), base=st.sampled_from([10.0, 1e4]))
def test_rotary_matches_complex_rotation(seed: int, d: int, T: int, base: float) -> None:
    """Pair (i, i + d/2) is the complex number rotated by pos * base**(-2i/d)."""
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, 2, 3, T, d)
    pos = torch.randint(0, 5000, (T,), generator=gen)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    theta = pos[:, None].to(DT) * base ** (-torch.arange(0, d, 2, dtype=DT) / d)
    rot = z * torch.polar(torch.ones_like(theta), theta)
    expected = torch.cat([rot.real, rot.imag], dim=-1)
    torch.testing.assert_close(apply_rotary(x, pos, base), expected, **TIGHT)
    torch.testing.assert_close(RotaryEmbedding(d, base)(x, pos), expected, **TIGHT)


@settings(deadline=None, max_examples=20)
@given(seed=seeds, shift=st.integers(-50, 50))
def test_rotary_scores_depend_only_on_relative_position(seed: int, shift: int) -> None:
    """<rot(q, m), rot(k, n)> is unchanged when both positions shift; norms are preserved."""
    gen = torch.Generator().manual_seed(seed)
    q, k = randn(gen, 1, 1, 5, 8), randn(gen, 1, 1, 5, 8)
    pq, pk = torch.randint(100, 200, (5,), generator=gen), torch.randint(100, 200, (5,), generator=gen)
    scores = apply_rotary(q, pq) @ apply_rotary(k, pk).transpose(-1, -2)
    shifted = apply_rotary(q, pq + shift) @ apply_rotary(k, pk + shift).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, **TIGHT)
    torch.testing.assert_close(apply_rotary(q, pq).norm(dim=-1), q.norm(dim=-1), **TIGHT)


def test_rotary_is_identity_at_position_zero() -> None:
    x = torch.randn(2, 3, 1, 8)
    assert torch.equal(apply_rotary(x, torch.zeros(1, dtype=torch.long)), x)


def test_rmsnorm_matches_formula_and_keeps_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(6, eps=1e-5).to(DT)
    with torch.no_grad():
        norm.weight.copy_(randn(gen, 6))
    x = randn(gen, 2, 3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, **TIGHT)
    half = RMSNorm(6).to(torch.bfloat16)
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_swiglu_matches_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    ffn = SwiGLU(4, 6).to(DT)
    x = randn(gen, 2, 3, 4)
    gate, up = ffn.gate_up.weight[:6], ffn.gate_up.weight[6:]
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), expected, **TIGHT)
    assert all(p.dim() == 2 for p in ffn.parameters())  # no biases


# ---------------------------------------------------------------------------------------------
# attention against the dense oracle


@settings(deadline=None, max_examples=25)
@given(case=attention_cases())
def test_forward_matches_dense_reference_values_and_gradients(case) -> None:
    """Every fast path (block-local window, masked, causal flag) equals the full-mask oracle."""
    gen, m, x = case
    x = x.requires_grad_()
    y, _ = m(x)
    ref = reference_attention(m, x)
    torch.testing.assert_close(y, ref, **TIGHT)
    weights = randn(gen, *y.shape)
    inputs = [x, *m.parameters()]
    for g, g_ref in zip(grads(y, weights, inputs), grads(ref, weights, inputs), strict=True):
        torch.testing.assert_close(g, g_ref, **TIGHT)


@pytest.mark.parametrize(("window", "T"), [(4, 3), (4, 4), (4, 5), (4, 8), (4, 13), (3, 1), (1, 7), (5, 11)])
@pytest.mark.parametrize("persistent", [0, 2])
def test_window_edge_lengths(window: int, T: int, persistent: int) -> None:
    """T below, at, and off multiples of the window, with and without persistent tokens."""
    gen = torch.Generator().manual_seed(window * 100 + T)
    m = make_attention(gen, 8, 2, window, persistent)
    x = randn(gen, 2, T, 8)
    torch.testing.assert_close(m(x)[0], reference_attention(m, x), **TIGHT)


def test_dense_masked_attention_window_semantics() -> None:
    """Query i sees exactly keys i-w+1..i: checked with one-hot values."""
    T, w = 7, 3
    q = torch.zeros(1, 1, T, 2, dtype=DT)  # equal scores: uniform weights over visible keys
    v = torch.eye(T, dtype=DT)[None, None]
    weights = dense_masked_attention(q, torch.zeros(1, 1, T, 2, dtype=DT), v, w)[0, 0]
    for i in range(T):
        visible = list(range(max(0, i - w + 1), i + 1))
        expected = torch.zeros(T, dtype=DT)
        expected[visible] = 1 / len(visible)
        torch.testing.assert_close(weights[i], expected)
    assert causal_mask(T, T, window=w).sum(1).tolist() == [min(i + 1, w) for i in range(T)]


# ---------------------------------------------------------------------------------------------
# caches


@settings(deadline=None, max_examples=20)
@given(case=attention_cases(max_len=14))
def test_token_by_token_decoding_matches_full_forward(case) -> None:
    _, m, x = case
    cache, outs = None, []
    for t in range(x.shape[1]):
        y_t, cache = m(x[:, t : t + 1], cache)
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), m(x)[0], **TIGHT)
    assert int(cache.position) == x.shape[1]


@settings(deadline=None, max_examples=25)
@given(case=attention_cases(max_len=24), data=st.data())
def test_pieces_with_cache_match_whole_values_and_gradients(case, data) -> None:
    """Any split (chunked prefill, long and short pieces) equals the whole, gradients included."""
    gen, m, x = case
    T = x.shape[1]
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=3)) if T > 1 else set())
    x = x.requires_grad_()
    cache, outs = None, []
    for start, stop in zip([0, *cuts], [*cuts, T], strict=True):
        y, cache = m(x[:, start:stop], cache)
        outs.append(y)
    pieces, whole = torch.cat(outs, dim=1), m(x)[0]
    torch.testing.assert_close(pieces, whole, **TIGHT)
    weights = randn(gen, *whole.shape)
    inputs = [x, *m.parameters()]
    for g, g_whole in zip(grads(pieces, weights, inputs), grads(whole, weights, inputs), strict=True):
        torch.testing.assert_close(g, g_whole, **TIGHT)


@pytest.mark.parametrize("window", [1, 2, 5])
def test_cache_stays_bounded_by_window(window: int) -> None:
    gen = torch.Generator().manual_seed(window)
    m = make_attention(gen, 8, 2, window, persistent=2)
    x = randn(gen, 1, 60, 8)
    _, cache = m(x[:, :23])  # long prefill through the block-local path
    assert cache.keys.shape == cache.values.shape == (1, 2, window - 1, 4)
    for t in range(23, 60):
        _, cache = m(x[:, t : t + 1], cache)
        assert cache.keys.shape[2] == cache.values.shape[2] == window - 1
    # What is kept is exactly the last window - 1 rotated keys of the whole sequence.
    torch.testing.assert_close(cache.keys, m(x)[1].keys, **TIGHT)
    assert cache.position.dim() == 0 and cache.position.dtype == torch.long
    assert int(cache.position) == 60


def test_full_attention_cache_keeps_everything() -> None:
    gen = torch.Generator().manual_seed(3)
    m = make_attention(gen, 8, 2, None, persistent=1)
    _, cache = m(randn(gen, 2, 5, 8))
    _, cache = m(randn(gen, 2, 3, 8), cache)
    assert cache.keys.shape == (2, 2, 8, 4) and int(cache.position) == 8


def test_early_cache_fills_up_to_window() -> None:
    """Before position window - 1, the cache holds every token so far."""
    gen = torch.Generator().manual_seed(4)
    m = make_attention(gen, 8, 2, 6, persistent=0)
    cache = None
    for t in range(8):
        _, cache = m(randn(gen, 1, 1, 8), cache)
        assert cache.keys.shape[2] == min(t + 1, 5)


# ---------------------------------------------------------------------------------------------
# structure: persistent tokens, causality, batches


def test_no_persistent_tokens_is_plain_attention_bit_for_bit() -> None:
    """P = 0: no extra parameter, and output equals hand-written plain (windowed) attention."""
    for window, T in [(None, 9), (5, 5), (3, 2)]:
        gen = torch.Generator().manual_seed(T)
        m = make_attention(gen, 8, 2, window, persistent=0)
        assert m.persistent is None and m.persistent_kv() is None
        assert set(m.state_dict()) == {f"{n}_proj.weight" for n in "qkvo"}
        x = randn(gen, 2, T, 8)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (2, 4)).transpose(1, 2)

        pos = torch.arange(T)
        q = apply_rotary(heads(x @ m.q_proj.weight.T), pos)
        k = apply_rotary(heads(x @ m.k_proj.weight.T), pos)
        o = F.scaled_dot_product_attention(q, k, heads(x @ m.v_proj.weight.T), is_causal=True)
        plain = o.transpose(1, 2).reshape(2, T, 8) @ m.o_proj.weight.T
        assert torch.equal(m(x)[0], plain)


def test_persistent_tokens_visible_to_every_query_even_with_window_one() -> None:
    gen = torch.Generator().manual_seed(5)
    m = make_attention(gen, 8, 2, window=1, persistent=2)
    x = randn(gen, 2, 9, 8)
    y, _ = m(x)
    for t in range(9):
        (g,) = torch.autograd.grad(y[:, t].sum(), m.persistent, retain_graph=True)
        assert g.abs().sum() > 0, f"query {t} does not see the persistent tokens"
    # Without them, window 1 means each token attends only to itself: y_t = o_proj(v_proj(x_t)).
    plain = make_attention(gen, 8, 2, window=1, persistent=0)
    torch.testing.assert_close(plain(x)[0], plain.o_proj(plain.v_proj(x)), **TIGHT)


@settings(deadline=None, max_examples=20)
@given(case=attention_cases(), data=st.data())
def test_later_tokens_never_change_earlier_outputs(case, data) -> None:
    gen, m, x = case
    T = x.shape[1]
    s = data.draw(st.integers(0, T - 1))
    perturbed = x.clone()
    perturbed[:, s:] += randn(gen, x.shape[0], T - s, x.shape[2], scale=10.0)
    torch.testing.assert_close(m(perturbed)[0][:, :s], m(x)[0][:, :s], atol=1e-13, rtol=0)


@settings(deadline=None, max_examples=15)
@given(case=attention_cases())
def test_batch_elements_are_independent(case) -> None:
    gen, m, x = case
    x = torch.cat([x, randn(gen, 1, *x.shape[1:])])
    y, _ = m(x)
    for b in range(x.shape[0]):
        torch.testing.assert_close(y[b : b + 1], m(x[b : b + 1])[0], **TIGHT)


def test_attend_is_masked_softmax_attention() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v = randn(gen, 2, 3, 4), randn(gen, 2, 5, 4), randn(gen, 2, 5, 4)
    mask = causal_mask(3, 5, window=2, prefix=0)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask, -math.inf)
    torch.testing.assert_close(attend(q, k, v, mask), scores.softmax(-1) @ v, **TIGHT)


def test_protocols_are_met() -> None:
    """Each module behaves like its kind on a tiny input (isinstance would pass nn.Identity too)."""
    attn = CausalSelfAttention(8, 2, window=3, persistent_tokens=1)
    ffn = SwiGLU(8, 16)
    check_module("attention", attn, dim=8, heads=2)
    check_module("feedforward", ffn, dim=8, heads=2)
    check_module("integration", TransformerBlock(attn, ffn, 8), dim=8, heads=2)


def test_compiles_without_graph_breaks() -> None:
    """fullgraph=True: no graph break on prefill (block-local) or cached decoding steps."""
    gen = torch.Generator().manual_seed(7)
    m = make_attention(gen, 8, 2, window=3, persistent=2)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = randn(gen, 1, 10, 8)
    y, cache = compiled(x[:, :7])
    outs = [y]
    for t in range(7, 10):
        y_t, cache = compiled(x[:, t : t + 1], cache)
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), reference_attention(m, x), **TIGHT)


def test_low_precision_forward_runs() -> None:
    torch.manual_seed(8)
    m = CausalSelfAttention(16, 2, window=4, persistent_tokens=2)
    x = torch.randn(2, 11, 16)
    y32 = m(x)[0]
    y16 = m.to(torch.bfloat16)(x.to(torch.bfloat16))[0]
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# transformer block


@settings(deadline=None, max_examples=15)
@given(case=attention_cases(max_len=16), data=st.data())
def test_transformer_block_state_round_trips(case, data) -> None:
    gen, attn, x = case
    dim = x.shape[-1]
    block = TransformerBlock(attn, SwiGLU(dim, 2 * dim), dim).to(DT)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(p + randn(gen, *p.shape, scale=0.1))
    whole, state = block(x, None)
    h = x + attn(block.norm1(x))[0]
    torch.testing.assert_close(whole, h + block.feedforward(block.norm2(h)), **TIGHT)
    cut = data.draw(st.integers(0, x.shape[1]))
    first, mid = block(x[:, :cut], None) if cut else (x[:, :0], None)
    second, end = block(x[:, cut:], mid) if cut < x.shape[1] else (x[:, :0], mid)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, **TIGHT)
    assert isinstance(end, AttentionCache)
    for a, b in zip(end, state, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_constructor_arguments_raise_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"heads must divide dim.*dim=10, heads=4"):
        CausalSelfAttention(10, 4)
    with pytest.raises(ValueError, match=r"window must be >= 1.*window=0"):
        CausalSelfAttention(8, 2, window=0)
    with pytest.raises(ValueError, match="persistent_tokens must be >= 0"):
        CausalSelfAttention(8, 2, persistent_tokens=-1)
    with pytest.raises(ValueError, match="even head_dim"):
        CausalSelfAttention(6, 2)


@pytest.mark.parametrize("shape", [(2, 8), (2, 3, 6), (1, 2, 3, 8), (2, 0, 8)])
def test_bad_input_shapes_name_expected_and_got(shape: tuple[int, ...]) -> None:
    m = CausalSelfAttention(8, 2, window=2)
    expected = r"expected x of shape \[B, T, 8\].*got " + re_shape(shape)
    with pytest.raises(ValueError, match=expected):
        m(torch.zeros(shape))
    block = TransformerBlock(m, SwiGLU(8, 8), 8)
    with pytest.raises(ValueError, match=r"\[B, T, 8\].*got " + re_shape(shape)):
        block(torch.zeros(shape), None)


def test_oversized_cache_is_rejected() -> None:
    m = CausalSelfAttention(8, 2, window=2)
    big = AttentionCache(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.tensor(3))
    with pytest.raises(ValueError, match="at most 1 tokens"):
        m(torch.zeros(1, 1, 8), big)


def re_shape(shape: tuple[int, ...]) -> str:
    return r"\(" + r",\s*".join(str(s) for s in shape) + (r",\)" if len(shape) == 1 else r"\)")
