"""Fixed-shape decoding (``memforge.decoding.StaticDecoder``, ``generate(compile=True)``).

The reference is the model's own full forward pass over the same tokens: every logit a static
step gives must match it (float64, ~1e-10), across memory-chunk and MAC-segment ends, from any
prompt length, for every read order, optimizer and retention. The compiled step is checked
with ``aot_eager`` (the same captured graphs, run op by op) over drawn cases, and once with the
real Inductor compiler in float32.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import memforge
from memforge import InputError, decoding
from memforge.decoding import StaticDecoder
from memforge.interfaces import DecodesMemoryStatically, ReadsMemoryStatically
from tests.test_titans_compiled import aot_eager_compiled

DT = torch.float64
EXACT = {"atol": 1e-10, "rtol": 1e-9}
#: Every tiny preset (the hybrid included): each decodes statically, or its memory layer's
#: executor has no fixed-shape decoding and compiled generation says so up front.
TINY = [name for name in memforge.presets() if name.endswith("_tiny")]
MEMORY_TINY = [name for name in TINY if name.startswith("titans.")]

seeds = st.integers(0, 2**31 - 1)
variants = st.fixed_dictionaries({
    "retrieval": st.sampled_from(["titans.chunk_start", "titans.before_write", "titans.after_write"]),
    "optimizer": st.sampled_from(["titans.momentum", "titans.sgd"]),
    "retention": st.sampled_from(["titans.adaptive_decay", "titans.constant_decay",
                                  "titans.no_forgetting"]),
    "projection": st.sampled_from(["titans.conv_qkv", "titans.plain_qkv"]),
})


def build(name: str, seed: int, dtype: torch.dtype = DT, **overrides) -> memforge.MemforgeModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return memforge.build_model(memforge.preset(name, **overrides), dtype=dtype).eval()


def tokens(seed: int, vocab: int, batch: int, steps: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, steps), generator=torch.Generator().manual_seed(seed))


def static_logits(model, seq: torch.Tensor, prompt: int, *, compiled: bool = False) -> torch.Tensor:
    """Logits ``[B, T - prompt, V]`` of a static decode of ``seq`` after reading ``prompt`` tokens."""
    with torch.no_grad():
        decoder = StaticDecoder(model, model(seq[:, :prompt]).state,
                                capacity=seq.shape[1] - prompt, compiled=compiled)
        return torch.stack([decoder.step(seq[:, t:t + 1]) for t in range(prompt, seq.shape[1])], 1)


def aot_eager_decoding() -> contextlib.AbstractContextManager[CompileCounterWithBackend]:
    """The compiled decode step through ``aot_eager`` with a fresh compiler, counting graphs."""
    return aot_eager_compiled(decoding, "compiled_decode_step", decoding.decode_step)


@settings(deadline=None, max_examples=12)
@given(seed=seeds, name=st.sampled_from(MEMORY_TINY), variant=variants, prompt=st.integers(1, 30),
       persistent=st.sampled_from([0, 2]), batch=st.integers(1, 2))
def test_static_steps_equal_the_full_forward(seed, name, variant, prompt, persistent, batch) -> None:
    # 50 tokens cross several chunks (8), MAC segments (16) and attention windows (8) from any
    # prompt length.
    persistent_option = ({"integration": {"persistent_tokens": persistent}} if name == "titans.lmm_tiny"
                         else {"attention": {"persistent_tokens": persistent}})
    model = build(name, seed, **variant, **persistent_option)
    seq = tokens(seed, model.vocab_size, batch, 50)
    with torch.no_grad():
        full = model(seq).logits[:, prompt:]
    torch.testing.assert_close(static_logits(model, seq, prompt), full, **EXACT)


def _lacks_static_decoding(model: memforge.MemforgeModel) -> bool:
    """Whether some memory layer of ``model`` lacks a fixed-shape capability (a layer on an
    executor without fixed-shape decoding, such as the sequential one, has neither)."""
    layers = [block.memory for block in model.blocks if hasattr(block, "memory")]
    return not all(isinstance(layer, DecodesMemoryStatically)
                   and isinstance(layer, ReadsMemoryStatically) for layer in layers)


@settings(deadline=None, max_examples=12)
@given(seed=seeds, name=st.sampled_from(TINY), prompt=st.integers(1, 30),
       window=st.sampled_from([None, 1, 2, 5]))
def test_every_preset_decodes_statically_or_says_it_cannot(seed, name, prompt, window) -> None:
    attention = memforge.preset(name).attention.impl
    overrides = ({"attention": {"window": window}}
                 if attention == "baseline.sliding_window" and window is not None else {})
    model = build(name, seed, **overrides)
    seq = tokens(seed, model.vocab_size, 2, 40)
    with torch.no_grad():
        full = model(seq).logits[:, prompt:]
    try:
        static = static_logits(model, seq, prompt)
    except InputError as error:  # said up front, in one line, by a preset that cannot
        assert _lacks_static_decoding(model)
        assert re.fullmatch(r".* needs a (Decodes|Reads)MemoryStatically component .*; use "
                            r"generate\(\.\.\., compile=False\)", str(error))
        return
    torch.testing.assert_close(static, full, **EXACT)


def test_the_callers_state_is_never_changed() -> None:
    model = build("titans.mac_tiny", 0)
    seq = tokens(1, model.vocab_size, 2, 30)
    with torch.no_grad():
        state = model(seq[:, :13]).state
        before = [t.clone() for t in _tensors(state)]
        decoder = StaticDecoder(model, state, capacity=17, compiled=False)
        for t in range(13, 30):
            decoder.step(seq[:, t:t + 1])
    after = _tensors(state)
    assert len(before) == len(after) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, tuple):
        return [t for leaf in tree for t in _tensors(leaf)]
    return []


@pytest.mark.slow
@settings(deadline=None, max_examples=4)
@given(seed=seeds, variant=variants, prompt=st.integers(1, 20))
def test_compiled_steps_equal_eager_static_steps(seed, variant, prompt) -> None:
    model = build("titans.mac_tiny", seed, **variant)
    seq = tokens(seed, model.vocab_size, 2, 45)
    want = static_logits(model, seq, prompt)
    with aot_eager_decoding() as count:
        got = static_logits(model, seq, prompt, compiled=True)
        # One graph per combination of cycle ends met (none, chunk, chunk and segment), whatever
        # the position: 45 tokens meet all three.
        assert count.frame_count == 3
        static_logits(model, seq, prompt + 5, compiled=True)  # another start: no new graph
        assert count.frame_count == 3
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize(("name", "graphs"), [("titans.mag_tiny", 2), ("titans.mal_tiny", 2),
                                             ("baseline.transformer_tiny", 1)])
def test_compiled_attention_steps_equal_eager_static_steps(name: str, graphs: int) -> None:
    # Ring (sliding window) and growing (full attention) caches: one graph per memory-chunk end.
    model = build(name, 7)
    seq = tokens(8, model.vocab_size, 2, 40)
    want = static_logits(model, seq, 11)
    with aot_eager_decoding() as count:
        got = static_logits(model, seq, 11, compiled=True)
        assert count.frame_count == graphs
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.slow
def test_generate_compiled_with_inductor_gives_the_same_tokens() -> None:
    torch._dynamo.reset()
    model = build("titans.mac_tiny", 3, dtype=torch.float32)
    prompt = tokens(4, model.vocab_size, 2, 21)
    eager = model.generate(prompt, 40, temperature=0)
    compiled = model.generate(prompt, 40, temperature=0, compile=True)
    assert torch.equal(compiled, eager)
    # Sampling takes the same path through the same generator.
    eager = model.generate(prompt, 12, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(5))
    compiled = model.generate(prompt, 12, temperature=0.9, top_k=5,
                              generator=torch.Generator().manual_seed(5), compile=True)
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


class ForwardOnlyBlock(nn.Module):
    """A third-party block with ``forward`` and nothing else."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden, state=None):
        return self.inner(hidden, state)


def test_compile_on_a_model_without_static_blocks_names_them() -> None:
    model = build("titans.mac_tiny", 0)
    model.blocks[1] = ForwardOnlyBlock(model.blocks[1])
    prompt = tokens(0, model.vocab_size, 1, 5)
    with pytest.raises(InputError, match=r"ForwardOnlyBlock.*compile=False"):
        model.generate(prompt, 3, compile=True)
    assert model.generate(prompt, 3).shape == (1, 8)


def test_an_attention_without_static_decoding_is_named() -> None:
    model = build("baseline.transformer_tiny", 0)
    model.blocks[0].attention = ForwardOnlyBlock(model.blocks[0].attention)
    prompt = tokens(0, model.vocab_size, 1, 5)
    with pytest.raises(InputError, match=r"DecodesAttentionStatically.*ForwardOnlyBlock has no "
                                         r"static_decode_buffers"):
        model.generate(prompt, 3, compile=True)


def test_decoder_input_errors() -> None:
    model = build("titans.lmm_tiny", 0)
    seq = tokens(0, model.vocab_size, 2, 6)
    with torch.no_grad():
        state = model(seq).state
    with pytest.raises(InputError, match="read the prompt first"):
        StaticDecoder(model, None, capacity=3)
    with pytest.raises(InputError, match="capacity must be an int >= 0"):
        StaticDecoder(model, state, capacity=-1)
    decoder = StaticDecoder(model, state, capacity=1, compiled=False)
    with pytest.raises(InputError, match=r"one token per sequence, \[2, 1\]"):
        decoder.step(seq[:, :2])
    decoder.step(seq[:, :1])
    with pytest.raises(InputError, match="capacity it was made for"):
        decoder.step(seq[:, :1])


class LyingRetrieval(nn.Module):
    """Promises chunk-start reads only, then reads exactly."""

    reads_within_chunk = False

    def forward(self, reader, queries):
        return reader.after_write(queries)


def test_a_retrieval_rule_that_breaks_its_promise_is_named() -> None:
    model = build("titans.lmm_tiny", 0)
    model.blocks[0].memory.retrieval = LyingRetrieval()
    seq = tokens(0, model.vocab_size, 1, 6)
    with torch.no_grad():
        decoder = StaticDecoder(model, model(seq).state, capacity=2, compiled=False)
        with pytest.raises(RuntimeError, match="LyingRetrieval declares reads_within_chunk = False"):
            decoder.step(seq[:, :1])
