"""The ``delta`` plugin's memory layers (DeltaNet, Gated DeltaNet) and presets.

The oracle is :func:`memforge_delta.layer_reference.layer_token_loop`, the whole layer one token at
a time in float64, written from the equations of docs/delta.md ("The memory layers").
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memforge_delta.configs import DeltaNetConfig, GatedDeltaNetConfig
from memforge_delta.layer import DeltaLayer, DeltaState
from memforge_delta.layer_reference import layer_token_loop

import memforge
from memforge.decoding import StaticDecoder
from memforge.errors import InputError, SpecError
from memforge.plugins import default_registry
from memforge.testing.strategies import configs

DT = torch.float64
EXACT = {"atol": 1e-10, "rtol": 1e-9}
LAYERS = {"delta.deltanet": DeltaNetConfig, "delta.gated_deltanet": GatedDeltaNetConfig}
DELTA_PRESETS = [name for name in memforge.presets() if name.startswith("delta.")]
TITANS_PARTS = ("memory", "objective", "optimizer", "retention", "retrieval", "projection")

seeds = st.integers(0, 2**31 - 1)
names = st.sampled_from(sorted(LAYERS))
chunks = st.sampled_from([1, 7, 64]) | st.integers(2, 16)


def make_layer(name: str, seed: int, dim: int = 12, heads: int = 2, **settings) -> DeltaLayer:
    """The registry's ``name`` built by its factory in float64, every parameter perturbed (so the
    output norm, gates and biases are not at their neutral initial values)."""
    config = LAYERS[name](**settings)
    ctx = memforge.BuildContext(dim=dim, heads=heads, head_dim=dim // heads, layer_index=0,
                                num_layers=1, vocab_size=8, build=lambda kind: None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = default_registry().component("memory_layer", name).factory(config, ctx).to(DT)
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    return layer


def inputs(seed: int, batch: int, steps: int, dim: int = 12) -> torch.Tensor:
    return torch.randn(batch, steps, dim, dtype=DT, generator=torch.Generator().manual_seed(seed))


def assert_states_equal(got: DeltaState, want: DeltaState) -> None:
    torch.testing.assert_close(got.memory, want.memory, **EXACT)
    torch.testing.assert_close(got.conv, want.conv, **EXACT)


@settings(deadline=None, max_examples=25)
@given(seed=seeds, name=names, chunk=chunks, conv=st.integers(1, 5),
       first=st.integers(0, 9), steps=st.integers(1, 71), batch=st.integers(1, 2))
def test_the_layer_equals_the_float64_token_loop(seed, name, chunk, conv, first, steps, batch):
    layer = make_layer(name, seed, chunk_size=chunk, conv_size=conv)
    x = inputs(seed, batch, first + steps)
    state = layer(x[:, :first], None)[1] if first else None
    with torch.no_grad():
        y, got = layer(x[:, first:], state)
    want_y, want = layer_token_loop(layer, x[:, first:], state)
    torch.testing.assert_close(y, want_y, **EXACT)
    assert_states_equal(got, want)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_odd_lengths_at_the_chunk_sizes_of_the_issue(name, chunk):
    layer = make_layer(name, 3, chunk_size=chunk)
    for steps in (1, 7, 13, 65, 129):
        x = inputs(steps, 2, steps)
        with torch.no_grad():
            y, state = layer(x, None)
        want_y, want = layer_token_loop(layer, x, None)
        torch.testing.assert_close(y, want_y, **EXACT)
        assert_states_equal(state, want)


@settings(deadline=None, max_examples=20)
@given(seed=seeds, name=names, data=st.data(), steps=st.integers(2, 60),
       cuts=st.lists(st.integers(1, 59), max_size=4))
def test_split_anywhere_with_state_equals_whole(seed, name, data, steps, cuts):
    config = data.draw(configs(LAYERS[name]))
    layer = make_layer(name, seed, **attrs.asdict(config))
    x = inputs(seed, 2, steps)
    with torch.no_grad():
        whole, whole_state = layer(x, None)
        bounds = [0, *sorted({c for c in cuts if c < steps}), steps]
        pieces, state = [], None
        for start, stop in zip(bounds, bounds[1:], strict=False):
            y, state = layer(x[:, start:stop], state)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, **EXACT)
    assert_states_equal(state, whole_state)


@settings(deadline=None, max_examples=10)
@given(seed=seeds, name=names, chunk=chunks, t=st.integers(0, 30))
def test_causal(seed, name, chunk, t):
    layer = make_layer(name, seed, chunk_size=chunk)
    x = inputs(seed, 1, 31)
    changed = x.clone()
    changed[:, t + 1:] = inputs(seed + 1, 1, 30 - t)
    with torch.no_grad():
        torch.testing.assert_close(layer(changed, None)[0][:, :t + 1], layer(x, None)[0][:, :t + 1],
                                   **EXACT)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_batch_rows_are_independent(name):
    layer = make_layer(name, 5, chunk_size=7)
    x = inputs(5, 3, 20)
    with torch.no_grad():
        together, state = layer(x, None)
        for row in range(3):
            alone, own = layer(x[row:row + 1], None)
            torch.testing.assert_close(together[row:row + 1], alone, **EXACT)
            torch.testing.assert_close(state.memory[row:row + 1], own.memory, **EXACT)


@settings(deadline=None, max_examples=10)
@given(seed=seeds, name=names, prompt=st.integers(1, 20), conv=st.integers(1, 5))
def test_static_decoding_equals_forward(seed, name, prompt, conv):
    layer = make_layer(name, seed, chunk_size=8, conv_size=conv)
    x = inputs(seed, 2, 30)
    with torch.no_grad():
        whole, whole_state = layer(x, None)
        start = layer(x[:, :prompt], None)[1]
        buffers = layer.static_decode_buffers(start, 2)
        assert layer.static_decode_phase(start) == 0
        steps = [layer.static_decode_step(x[:, t:t + 1], buffers, True) for t in range(prompt, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), whole[:, prompt:], **EXACT)
    torch.testing.assert_close(layer.static_read_state(buffers), whole_state.memory, **EXACT)
    assert_states_equal(DeltaState(buffers.memory, buffers.conv), whole_state)
    torch.testing.assert_close(start.memory, layer(x[:, :prompt], None)[1].memory, **EXACT)  # untouched


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reads_without_writing(name):
    layer = make_layer(name, 9)
    x = inputs(9, 2, 11)
    with torch.no_grad():
        _, state = layer(x, None)
        before = state.memory.clone()
        snapshot = layer.read_state(state, 2)
        queries = torch.randn(2, 2, 4, 6, dtype=DT, generator=torch.Generator().manual_seed(10))
        read = layer.read(queries, snapshot)
    torch.testing.assert_close(read, queries @ state.memory, **EXACT)   # o = S^T q, per row
    assert torch.equal(state.memory, before)
    assert torch.equal(layer.read_state(None, 3), torch.zeros(3, 2, 6, 6, dtype=DT))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradients_reach_every_parameter_and_the_input(name):
    layer = make_layer(name, 2, chunk_size=4)
    x = inputs(2, 2, 13).requires_grad_()
    _, state = layer(x[:, :5], None)
    y, state = layer(x[:, 5:], state)
    (y.square().sum() + state.memory.square().sum()).backward()
    for label, parameter in [*layer.named_parameters(), ("x", x)]:
        assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), label
        assert parameter.grad.abs().sum() > 0, label


@pytest.mark.parametrize("name", DELTA_PRESETS)
def test_every_preset_builds_trains_and_splits(name):
    spec = memforge.preset(name)
    torch.manual_seed(0)
    model = memforge.build_model(spec, dtype=DT)
    tokens = torch.randint(0, spec.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    whole = model(tokens)
    first = model(tokens[:, :6])
    rest = model(tokens[:, 6:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole.logits, **EXACT)
    whole.logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    kinds = {type(block.memory).__name__ for block in model.blocks if hasattr(block, "memory")}
    # The engine presets run the same rule on the engine's layer (executor wy).
    assert kinds == ({"StaticDecodingMemoryLayer"} if ".engine_" in name else {"DeltaLayer"})


def test_the_hybrid_puts_gdn_at_layers_0_and_2_and_attention_at_1_and_3():
    spec = memforge.preset("delta.gdn_hybrid_tiny")
    rows = memforge.builder.layer_layout(spec, memforge.build_model(spec), default_registry())
    assert [r["integration"] for r in rows] == ["titans.lmm", "baseline.transformer"] * 2
    assert [r["memory_layer"] for r in rows][::2] == ["delta.gated_deltanet"] * 2


@pytest.mark.parametrize("name", ["delta.gdn_lmm_tiny", "delta.gdn_mac_tiny"])
def test_compiled_decoding_equals_forward(name):
    from tests.test_static_decoding import aot_eager_decoding

    torch.manual_seed(1)
    model = memforge.build_model(memforge.preset(name), dtype=DT).eval()
    seq = torch.randint(0, model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), aot_eager_decoding() as count:
        full = model(seq).logits[:, 7:]
        decoder = StaticDecoder(model, model(seq[:, :7]).state, capacity=17, compiled=True)
        steps = torch.stack([decoder.step(seq[:, t:t + 1]) for t in range(7, 24)], 1)
        assert count.frame_count >= 1  # the step really went through the compiler
    torch.testing.assert_close(steps, full, **EXACT)


@pytest.mark.parametrize("kind", TITANS_PARTS)
def test_a_titans_part_next_to_a_delta_layer_is_refused_naming_it(kind):
    spec = memforge.preset("titans.lmm_tiny")
    unset = [f"{other}=none" for other in TITANS_PARTS if other != kind]
    with pytest.raises(SpecError, match=rf"memory_layer 'delta.gated_deltanet' uses no {kind} "
                                        rf"component.*--set {kind}=none"):
        memforge.override(spec, ["memory_layer=delta.gated_deltanet", *unset])


@pytest.mark.parametrize(("assignment", "message"), [
    ("memory_layer.chunk_size=0", r"chunk_size"),
    ("memory_layer.conv_size=0", r"conv_size"),
    ("memory_layer.decay_min=20.0", r"decay_min=20 must be <= decay_max=16"),
    ("memory_layer.dt_min=0.5", r"dt_min=0.5 must be <= dt_max=0.1"),
])
def test_bad_settings_are_refused(assignment, message):
    with pytest.raises(SpecError, match=message):
        memforge.override(memforge.preset("delta.gdn_lmm_tiny"), [assignment])


def test_bad_input_and_state_are_one_line_errors():
    layer = make_layer("delta.gated_deltanet", 0)
    x = inputs(0, 2, 5)
    with pytest.raises(InputError, match=r"hidden states \[batch, time, 12\], got \[2, 5, 7\]"):
        layer(x[..., :7], None)
    _, state = layer(x, None)
    with pytest.raises(InputError, match=r"does not fit this layer and batch 1: memory is "
                                         r"\[2, 2, 6, 6\], expected \[1, 2, 6, 6\]"):
        layer(x[:1], state)
    with pytest.raises(InputError, match=r"must be the DeltaState it returned, got tuple"):
        layer(x, tuple(state))


class _Recorder:
    """A MemoryRecorder that keeps what it is given."""

    def __init__(self) -> None:
        self.series: dict[str, torch.Tensor] = {}

    def record(self, series: str, values: torch.Tensor) -> None:
        self.series[series] = values


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inspected_series_are_what_the_layer_used_and_change_nothing(name):
    layer = make_layer(name, 4, chunk_size=3)
    x = inputs(4, 2, 9)
    with torch.no_grad():
        _, start = layer(x[:, :4], None)
        plain, _ = layer(x[:, 4:], start)
        recorder = _Recorder()
        layer.set_memory_recorder(recorder)
        seen, _ = layer(x[:, 4:], start)
        layer.set_memory_recorder(None)
    assert torch.equal(plain, seen)
    series = recorder.series
    assert set(series) == set(layer.inspect_series)
    torch.testing.assert_close(series["read_output"].sum(1), plain, **EXACT)
    beta, g = layer._gates(x[:, 4:])
    torch.testing.assert_close(series["step_size"], beta.transpose(1, 2), **EXACT)
    if g is not None:
        torch.testing.assert_close(series["decay"], -torch.expm1(g).transpose(1, 2), **EXACT)
    # ||S_t||: the float64 token-loop reference's memory after each prefix.
    norms = [layer_token_loop(layer, x[:, 4:5 + t], start)[1].memory.flatten(2).norm(dim=-1)
             for t in range(5)]
    torch.testing.assert_close(series["state_norm"], torch.stack(norms, -1), **EXACT)
