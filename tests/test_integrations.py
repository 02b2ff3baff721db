"""Whole-model properties of the Titans integrations (``titans.lmm``/``mac``/``mag``/``mal``) and of
every tiny preset (docs/memory.md, "What the tests check"): causality, state chaining at any
split point, incremental decoding, persistent tokens, batch independence, trainability, MAC's within-segment
leak, and input errors.

Exactness checks build the models in float64 and compare at ~1e-10; inputs come from seeded
``torch.Generator`` objects drawn by hypothesis.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import memforge_titans.mac as mac
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memforge_titans.mac import MACBlock, MACState, mac_mask
from memforge_titans.mag import MAGBlock, MAGState
from memforge_titans.mal import MALBlock, MALState
from torch import Tensor, nn

import memforge
from memforge import InputError, SpecError
from memforge.builder import layer_layout
from memforge.nn import causal_mask

DT = torch.float64
EXACT = {"atol": 1e-10, "rtol": 1e-9}
FEW = settings(deadline=None, max_examples=6)

#: The tiny presets of titans, the baselines and delta (the hybrids included), and two or three
#: of each other family's (one memory-only, one MAC, their layers on every executor that family
#: uses):
#: those families' own test files run every one of their presets. Plus one tiny preset per
#: Titans integration.
FAMILY_TINY = ["ttt.linear_lmm_tiny", "ttt.mlp_mac_tiny", "miras.yaad_lmm_tiny",
               "miras.memora_mac_tiny", "atlas.omeganet_lmm_tiny", "atlas.atlas_lmm_tiny",
               "atlas.deep_transformer_mac_tiny",
               "lact.lact_tiny", "lact.mac_tiny"]
TINY = [name for name in memforge.presets() if name.endswith("_tiny")
        and name.split(".")[0] in ("titans", "baseline", "delta")] + FAMILY_TINY
INTEGRATIONS = ["titans.lmm_tiny", "titans.mac_tiny", "titans.mag_tiny", "titans.mal_tiny"]
HYBRID = "titans.mag_hybrid_tiny"

seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny models are dominated by per-op overhead; extra threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, seed: int, dtype: torch.dtype = DT, **overrides) -> memforge.MemforgeModel:
    """Preset ``name`` built with weights from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return memforge.build_model(memforge.preset(name, **overrides), dtype=dtype)


def tokens(gen: torch.Generator, vocab: int, batch: int, steps: int) -> Tensor:
    return torch.randint(0, vocab, (batch, steps), generator=gen)


def logits(model: nn.Module, x: Tensor, state=None) -> Tensor:
    return model(x, state).logits


def perturb(x: Tensor, gen: torch.Generator, start: int, vocab: int) -> Tensor:
    """``x`` with every token from ``start`` on changed (to a different id)."""
    y = x.clone()
    shift = torch.randint(1, vocab, y[:, start:].shape, generator=gen)
    y[:, start:] = (y[:, start:] + shift) % vocab
    return y


# --------------------------------------------------------------------------------------------
# Causality and state chaining


@pytest.mark.parametrize("name", TINY)
@FEW
@given(seed=seeds, steps=st.integers(2, 40), data=st.data())
def test_later_tokens_never_change_earlier_logits(name: str, seed: int, steps: int, data) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = build(name, seed)
    cut = data.draw(st.integers(1, steps - 1), label="cut")
    x = tokens(gen, model.vocab_size, 2, steps)
    full = logits(model, x)
    changed = logits(model, perturb(x, gen, cut, model.vocab_size))
    torch.testing.assert_close(changed[:, :cut], full[:, :cut], atol=0, rtol=0)
    assert not torch.allclose(changed[:, cut:], full[:, cut:])


@pytest.mark.parametrize("name", TINY)
@FEW
@given(seed=seeds, steps=st.integers(2, 40), data=st.data())
def test_split_anywhere_with_carried_state_equals_one_call(name: str, seed: int, steps: int,
                                                           data) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = build(name, seed)
    cuts = sorted(data.draw(st.sets(st.integers(1, steps - 1), min_size=1, max_size=3), label="cuts"))
    x = tokens(gen, model.vocab_size, 2, steps)
    full = logits(model, x)
    pieces, state = [], None
    for a, b in zip([0, *cuts], [*cuts, steps], strict=True):
        out = model(x[:, a:b], state)
        pieces.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(pieces, 1), full, **EXACT)
    assert state.position == steps


@pytest.mark.parametrize("name", TINY)
@FEW
@given(seed=seeds, prompt=st.integers(1, 20), new=st.integers(1, 24))
def test_token_by_token_decoding_equals_the_full_forward(name: str, seed: int, prompt: int,
                                                         new: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = build(name, seed)
    x = tokens(gen, model.vocab_size, 2, prompt + new)
    out = model(x[:, :prompt])
    steps, state = [out.logits], out.state
    for t in range(prompt, prompt + new):
        out = model(x[:, t : t + 1], state)
        steps.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(steps, 1), logits(model, x), **EXACT)


@pytest.mark.parametrize("name", TINY)
def test_greedy_generate_matches_rereading_the_whole_sequence(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    model = build(name, 3)
    prompt = tokens(gen, model.vocab_size, 2, 5)
    generated = model.generate(prompt, 20, temperature=0.0)
    seq = prompt
    for _ in range(20):  # the slow way: a full forward over everything so far, every step
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq)
    sampled = model.generate(prompt, 7, temperature=0.8, top_k=5, generator=gen)
    assert sampled.shape == (2, 12) and torch.equal(sampled[:, :5], prompt)


def _state_size(state) -> int:
    """Total elements of every tensor in a (nested) state."""
    if isinstance(state, Tensor):
        return state.numel()
    if isinstance(state, (tuple, list)):
        return sum(_state_size(s) for s in state)
    return 0


@pytest.mark.parametrize("name", [*INTEGRATIONS[1:], HYBRID])
def test_decoding_caches_stay_bounded(name: str) -> None:
    """The state holds a window (SWA) or the current segment (MAC), never the whole history."""
    model = build(name, 0)
    x = tokens(torch.Generator().manual_seed(0), model.vocab_size, 1, 96)
    sizes, state = {}, None
    for t in range(96):
        state = model(x[:, t : t + 1], state).state
        sizes[t + 1] = _state_size(state)
    # 48 and 96 are multiples of every chunk, segment and window of the tiny presets.
    assert sizes[48] == sizes[96]
    assert max(sizes.values()) == max(sizes[t] for t in range(49, 97))


# --------------------------------------------------------------------------------------------
# MAC: the within-segment leak of retrieved tokens (docs/memory.md, "MAC")


@FEW
@given(seed=seeds, data=st.data())
def test_mac_later_token_of_the_same_segment_never_changes_earlier_logits(seed: int, data) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = build("titans.mac_tiny", seed)
    segment = model.blocks[0].segment_len
    start = segment * data.draw(st.integers(0, 1), label="segment")
    later = start + data.draw(st.integers(1, segment - 1), label="later")
    x = tokens(gen, model.vocab_size, 2, start + segment)
    y = x.clone()
    y[:, later] = (y[:, later] + 1) % model.vocab_size  # one token, inside the segment
    full, changed = logits(model, x), logits(model, y)
    torch.testing.assert_close(changed[:, :later], full[:, :later], atol=0, rtol=0)
    assert not torch.allclose(changed[:, later], full[:, later])


def test_mac_leak_test_catches_a_plain_causal_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hazard is real: with a plain causal mask over [P | h | S] the test above would fail."""

    def plain_causal(queries: int, filled: int, persistent: int, device=None) -> Tensor:
        return causal_mask(queries, persistent + 2 * (filled + queries), device=device)

    model = build("titans.mac_tiny", 0)
    x = tokens(torch.Generator().manual_seed(0), model.vocab_size, 1, 16)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % model.vocab_size
    monkeypatch.setattr(mac, "mac_mask", plain_causal)
    assert not torch.allclose(logits(model, y)[:, :10], logits(model, x)[:, :10])


@given(queries=st.integers(1, 6), filled=st.integers(0, 6), persistent=st.integers(0, 3))
def test_mac_mask_is_diagonal_aligned(queries: int, filled: int, persistent: int) -> None:
    mask = mac_mask(queries, filled, persistent)
    span = filled + queries
    assert mask.shape == (queries, persistent + 2 * span)
    for i in range(queries):
        for j in range(span):
            visible = j <= filled + i
            assert mask[i, persistent + j] == visible  # retrieved row j
            assert mask[i, persistent + span + j] == visible  # segment token j
    assert mask[:, :persistent].all()


# --------------------------------------------------------------------------------------------
# Persistent tokens and batches


def _persistent_overrides(name: str, count: int) -> dict:
    if name == "titans.lmm_tiny":
        return {"integration": {"persistent_tokens": count}}
    return {"attention": {"persistent_tokens": count}}


@pytest.mark.parametrize("name", INTEGRATIONS)
@FEW
@given(seed=seeds, steps=st.integers(1, 40))
def test_zero_persistent_tokens_is_the_variant_without(name: str, seed: int, steps: int) -> None:
    """With the same weights, a model without persistent tokens equals the model with them once
    they are removed: the blocks use them only through the ``persistent`` parameter."""
    gen = torch.Generator().manual_seed(seed)
    with_p = build(name, seed, **_persistent_overrides(name, 3))
    without = build(name, seed, **_persistent_overrides(name, 0))
    unexpected = without.load_state_dict(with_p.state_dict(), strict=False).unexpected_keys
    assert unexpected and all(key.endswith("persistent") for key in unexpected)
    x = tokens(gen, with_p.vocab_size, 2, steps)
    before = logits(with_p, x)
    for module in with_p.modules():
        if isinstance(getattr(module, "persistent", None), nn.Parameter):
            module.persistent = None
    torch.testing.assert_close(logits(with_p, x), logits(without, x), atol=0, rtol=0)
    assert not torch.allclose(before, logits(without, x))  # and the tokens did matter


@pytest.mark.parametrize("name", TINY)
@FEW
@given(seed=seeds, steps=st.integers(1, 40))
def test_sequences_in_a_batch_are_independent(name: str, seed: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = build(name, seed)
    x = tokens(gen, model.vocab_size, 3, steps)
    together = logits(model, x)
    for b in range(3):
        torch.testing.assert_close(together[b : b + 1], logits(model, x[b : b + 1]), **EXACT)
    other = x.clone()
    other[1:] = perturb(x[1:], gen, 0, model.vocab_size)
    torch.testing.assert_close(logits(model, other)[0], together[0], **EXACT)


# --------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = build(name, 0)
    x = tokens(torch.Generator().manual_seed(0), model.vocab_size, 2, 40)  # several chunks/segments
    logits(model, x).square().sum().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent, f"parameters without gradient: {silent}"


def copy_batch(gen: torch.Generator, batch: int, length: int, alphabet: int, sep: int) -> Tensor:
    """``[a_1 .. a_n, SEP, a_1 .. a_n]`` with ``a_i`` drawn from ``alphabet`` symbols."""
    a = torch.randint(0, alphabet, (batch, length), generator=gen)
    return torch.cat([a, torch.full((batch, 1), sep), a], 1)


@pytest.mark.parametrize("name", TINY)
def test_trains_on_a_copy_task(name: str) -> None:
    """Loss falls clearly in a few dozen Adam steps; with attention the model really copies
    (beats ``ln(alphabet)``, the best loss without looking back)."""
    model = build(name, 0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    length, alphabet, losses = 4, 8, []
    for _ in range(60):
        x = copy_batch(gen, 16, length, alphabet, sep=model.vocab_size - 1)
        out = model(x[:, :-1]).logits[:, length:]  # predict the copy, after the separator
        loss = nn.functional.cross_entropy(out.flatten(0, 1), x[:, length + 1 :].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-5:]) / 5
    assert math.isfinite(last) and last < 0.6 * first, losses
    if not name.endswith("lmm_tiny"):  # memory alone needs far more steps to learn copying
        assert last < 0.75 * math.log(alphabet), losses


# --------------------------------------------------------------------------------------------
# Hybrid layout, configuration and input errors


def test_hybrid_preset_mixes_memory_and_attention_blocks() -> None:
    spec = memforge.preset(HYBRID)
    rows = layer_layout(spec, memforge.build_model(spec))
    assert [r["module"] for r in rows] == ["TransformerBlock", "MAGBlock"]
    small = memforge.preset("titans.mag_hybrid")
    assert small.num_layers == 4
    assert [small.choice("integration", i).impl for i in range(4)] == [
        "baseline.transformer", "titans.mag", "baseline.transformer", "titans.mag"]


def test_mac_segment_must_be_a_multiple_of_the_chunk() -> None:
    with pytest.raises(SpecError, match="segment_len.*chunk_size"):
        memforge.preset("titans.mac_tiny", integration={"segment_len": 12})
    with pytest.raises(SpecError, match="segment_len.*chunk_size"):
        memforge.preset("titans.mac_tiny", memory_layer={"chunk_size": 5})


def test_mac_refuses_a_sliding_window_attention() -> None:
    with pytest.raises(SpecError, match="sliding window"):
        memforge.build_model(memforge.preset("titans.mac_tiny", attention="baseline.sliding_window"))


@pytest.mark.parametrize("receiver", INTEGRATIONS)
@pytest.mark.parametrize("donor", [*INTEGRATIONS, HYBRID])
def test_a_state_from_another_model_is_an_input_error(receiver: str, donor: str) -> None:
    overrides = {"heads": 4} if receiver == donor else {}  # same kind, other shapes
    model, other = build(receiver, 0), build(donor, 0, **overrides)
    x = tokens(torch.Generator().manual_seed(0), model.vocab_size, 2, 5)
    state = other(x).state
    with pytest.raises(InputError):
        model(x, state)


@pytest.mark.parametrize("name", INTEGRATIONS)
def test_a_state_for_another_batch_is_an_input_error(name: str) -> None:
    model = build(name, 0)
    x = tokens(torch.Generator().manual_seed(0), model.vocab_size, 2, 5)
    state = model(x).state
    with pytest.raises(InputError, match="batch"):
        model(x[:1], state)
    block, layer_state = model.blocks[0], state.layers[0]
    with pytest.raises(InputError):  # the block itself checks, too
        block(torch.zeros(1, 3, block.memory.dim, dtype=DT), layer_state)


@pytest.mark.parametrize("block_type, state_type", [(MACBlock, MACState), (MAGBlock, MAGState),
                                                    (MALBlock, MALState)])
def test_blocks_reject_bad_hidden_states_and_foreign_states(block_type, state_type) -> None:
    name = {MACBlock: "titans.mac_tiny", MAGBlock: "titans.mag_tiny", MALBlock: "titans.mal_tiny"}
    block = build(name[block_type], 0).blocks[0]
    assert isinstance(block, block_type)
    hidden = torch.randn(2, 4, block.dim, dtype=DT)
    _, state = block(hidden, None)
    assert isinstance(state, state_type)
    for bad in (hidden[..., :-1], hidden.long(), hidden[:, :0], "text"):
        with pytest.raises(InputError):
            block(bad, None)
    with pytest.raises(InputError):
        block(hidden, tuple(state))  # a plain tuple is not the block's state


def test_mac_rejects_a_tampered_segment_cache() -> None:
    block = build("titans.mac_tiny", 0).blocks[0]
    hidden = torch.randn(2, 5, block.dim, dtype=DT)
    _, state = block(hidden, None)
    with pytest.raises(InputError, match="retrieved_keys"):
        block(hidden, state._replace(retrieved_keys=state.retrieved_keys[:, :, :-1]))
    with pytest.raises(InputError, match="inconsistent"):
        block(hidden, state._replace(segment_weights=None))


@pytest.mark.parametrize("name", ["titans.mac", "titans.mag", "titans.mal", "titans.mag_hybrid"])
def test_small_presets_stay_finite_on_long_random_input(name: str) -> None:
    """The memory's step-size bound keeps the fast weights from diverging over thousands of tokens."""
    model = build(name, 0, dtype=torch.float32)
    x = tokens(torch.Generator().manual_seed(0), model.vocab_size, 2, 4096)
    with torch.no_grad():
        assert torch.isfinite(logits(model, x)).all()
