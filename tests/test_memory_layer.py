"""The Titans memory layer as users build it: state carrying, causality, stability, bad input,
and the known failures of the peer implementation that must not happen here."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memforge
from memforge.builder import build_layer_component
from memforge.errors import InputError
from memforge.plugins import load_plugins

REGISTRY = load_plugins(autoload=False)
READS = ["titans.chunk_start", "titans.before_write", "titans.after_write"]


def make_layer(*assignments, dim=16, heads=2, chunk_size=4, dtype=torch.float64, seed=0):
    """A memory layer built from the ``titans.lmm_tiny`` preset with overrides."""
    spec = memforge.override(memforge.preset("titans.lmm_tiny"), [
        f"dim={dim}", f"heads={heads}", f"memory_layer.chunk_size={chunk_size}", *assignments],
        REGISTRY)
    torch.manual_seed(seed)
    return build_layer_component(spec, "memory_layer", 0, REGISTRY).to(dtype)


def hidden(batch, steps, dim, seed, dtype=torch.float64):
    return torch.randn(batch, steps, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@given(
    seed=st.integers(0, 2**16),
    steps=st.integers(2, 23),
    split=st.data(),
    read=st.sampled_from(READS),
    chunk=st.integers(1, 6),
    optimizer=st.sampled_from(["titans.momentum", "titans.sgd"]),
    retention=st.sampled_from(["titans.adaptive_decay", "titans.constant_decay", "titans.no_forgetting"]),
    projection=st.sampled_from(["titans.conv_qkv", "titans.plain_qkv"]),
)
def test_split_with_state_equals_whole(seed, steps, split, read, chunk, optimizer, retention, projection):
    layer = make_layer(f"retrieval={read}", f"optimizer={optimizer}", f"retention={retention}",
                       f"projection={projection}", chunk_size=chunk, seed=seed)
    x = hidden(2, steps, 16, seed)
    cut = split.draw(st.integers(1, steps - 1))
    whole, whole_state = layer(x)
    first, state = layer(x[:, :cut])
    second, second_state = layer(x[:, cut:], state)
    torch.testing.assert_close(torch.cat((first, second), 1), whole, rtol=1e-9, atol=1e-10)
    for a, b in zip(second_state.fast.weights, whole_state.fast.weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@given(seed=st.integers(0, 2**16), steps=st.integers(3, 20), data=st.data(), read=st.sampled_from(READS))
def test_causality(seed, steps, data, read):
    layer = make_layer(f"retrieval={read}", chunk_size=data.draw(st.integers(1, 5)), seed=seed)
    x = hidden(1, steps, 16, seed)
    t = data.draw(st.integers(0, steps - 2))
    perturbed = x.clone()
    perturbed[:, t + 1:] += hidden(1, steps - t - 1, 16, seed + 1)
    torch.testing.assert_close(layer(perturbed)[0][:, : t + 1], layer(x)[0][:, : t + 1], rtol=0, atol=0)


def test_batch_sequences_are_independent():
    layer = make_layer()
    x = hidden(3, 11, 16, 0)
    together = layer(x)[0]
    alone = torch.cat([layer(x[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_forward_does_not_modify_the_state_it_is_given():
    layer = make_layer("retrieval=titans.after_write")
    x = hidden(2, 9, 16, 0)
    _, state = layer(x[:, :6])
    snapshot = [t.clone() for t in state.fast.weights + state.fast.momentum]
    a, _ = layer(x[:, 6:], state)
    b, _ = layer(x[:, 6:], state)
    assert torch.equal(a, b)
    for before, after in zip(snapshot, state.fast.weights + state.fast.momentum, strict=True):
        assert torch.equal(before, after)


def test_multi_head_optimizer_step_works():
    """The peer's per-head parameters alias one tensor and Adam.step() raises; not here."""
    layer = make_layer(dim=32, heads=4, dtype=torch.float32)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in layer.memory.parameters()]
    out, _ = layer(hidden(2, 13, 32, 0, torch.float32))
    out.pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, layer.memory.parameters(), strict=True))


def test_default_gates_keep_memory_bounded_on_long_random_input():
    """The peer's fast weights reach 1e9 within 512 tokens at its default step size."""
    spec = memforge.preset("titans.lmm", dim=256, heads=4)  # the benchmark's width
    torch.manual_seed(0)
    layer = build_layer_component(spec, "memory_layer", 0, REGISTRY)
    x = torch.randn(1, 4096, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, state = layer(x)
    assert torch.isfinite(out).all()
    largest = max(w.abs().max().item() for w in state.fast.weights)
    initial = max(w.abs().max().item() for w in layer.memory.initial_weights())
    assert largest < 10 * initial + 10, f"fast weights grew to {largest}"


def test_long_sequence_gives_finite_outputs_and_gradients():
    layer = make_layer(dim=32, heads=2, chunk_size=64, dtype=torch.float32)
    x = hidden(1, 16384, 32, 0, torch.float32).requires_grad_()
    out, _ = layer(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(2, 16), r"expects hidden states \[batch, time, 16\], got \[2, 16\]"),
        (torch.zeros(2, 3, 8), r"\[batch, time, 16\], got \[2, 3, 8\]"),
        (torch.zeros(2, 3, 16, dtype=torch.long), "floating-point"),
        (torch.full((1, 3, 16), float("nan")), "non-finite"),
    ],
)
def test_bad_input_names_what_was_expected(x, message):
    with pytest.raises(InputError, match=message):
        make_layer()(x)


def test_state_from_another_configuration_or_batch_is_refused():
    layer = make_layer()
    _, state = layer(hidden(2, 5, 16, 0))
    with pytest.raises(InputError, match="does not fit this layer and batch 3"):
        layer(hidden(3, 5, 16, 0), state)
    deeper = make_layer("memory.depth=3")
    with pytest.raises(InputError, match="does not fit this layer"):
        deeper(hidden(2, 5, 16, 0), state)
    with pytest.raises(InputError, match="must be the MemoryLayerState"):
        layer(hidden(2, 5, 16, 0), (1, 2))
