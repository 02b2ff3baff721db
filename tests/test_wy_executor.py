"""The WY executor (memforge.engine.wy_executor): which rules the engine sends to it, and the
engine layer on it against the float64 token loop of the Gated DeltaNet recurrence, written here
from the equations (docs/delta.md, "The rule"):

    W_t = g_t W_{t-1} + beta_t k_t^T (v_t - k_t g_t W_{t-1})        o_t = q_t W_t

with ``g_t = exp(log_keep_t)`` and ``beta_t`` the optimiser's step size.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memforge_delta.retention import GatedDecay
from torch import Tensor, nn

import memforge
from memforge.decoding import StaticDecoder
from memforge.engine import rules
from memforge.engine.executors import (
    EXECUTORS,
    LearningRule,
    RuleInputs,
    select_executor,
)
from memforge.engine.layer import FastWeightMemoryLayer, MemoryLayerState
from memforge.engine.networks import MLPMemory
from memforge.engine.projection import QKVProjection
from memforge.engine.wy_executor import WYState
from memforge.errors import SpecError
from memforge.interfaces import StepGates
from memforge.testing.conformance import check_memory_layer, memory_layer

DIM, HEADS = 12, 3
HEAD = DIM // HEADS
EXACT = {"atol": 1e-10, "rtol": 1e-10}


class Muon(nn.Module):
    """An optimiser that transforms its update (no momentum)."""

    applies_at = "token"
    uses_momentum = False

    def forward(self, x: Tensor) -> StepGates:
        return StepGates(torch.sigmoid(x[..., :HEADS]), None)

    def transform(self, update: Tensor) -> Tensor:
        return update


class RowNorm(rules.NoForgetting):
    """A projecting retention."""

    applies_at = "token"

    def project(self, weights: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(nn.functional.normalize(w, dim=-1) for w in weights)


class Windowed(rules.L2Objective):
    window = 2


class Absolute(rules.L2Objective):
    """A loss that is not the squared error."""

    squared_error = False


def linear_memory(seed: int = 0) -> MLPMemory:
    """A single-matrix memory with random (non-zero) initial weights, in float64."""
    torch.manual_seed(seed)
    net = MLPMemory(HEADS, HEAD, 1, residual=False).double()
    with torch.no_grad():
        net.weights[0].normal_().mul_(0.3)
    return net


def parts(seed: int = 0, **overrides: nn.Module) -> dict[str, nn.Module]:
    """The Gated DeltaNet rule's parts (float64): linear memory, l2, plain steps in (0, 1), GDN's
    decay gate, reads after the write, a conv q/k/v projection."""
    torch.manual_seed(seed)
    chosen = {
        "projection": QKVProjection(DIM, HEADS, HEAD, conv_kernel=3),
        "memory": linear_memory(seed),
        "objective": rules.L2Objective(),
        "optimizer": rules.GatedStep(DIM, HEADS, max_lr=1.0, lr_init=0.5, momentum=False),
        # Faster decays than GDN's initialisation, so that every factor matters.
        "retention": GatedDecay(DIM, HEADS, decay_range=(0.5, 4.0), dt_range=(0.05, 0.5)),
        "retrieval": rules.ReadAfterWrite(),
    }
    chosen.update(overrides)
    return {kind: module.double() for kind, module in chosen.items()}


def rule(chunk: int = 8, **overrides: nn.Module) -> LearningRule:
    p = parts(**overrides)
    return LearningRule(p["memory"], p["objective"], p["optimizer"], p["retention"],
                        p["retrieval"], chunk)


def make_layer(chunk: int, *, seed: int = 0, executor: str = "auto",
               **overrides: nn.Module) -> FastWeightMemoryLayer:
    p = parts(seed, **overrides)
    torch.manual_seed(seed + 1)
    return FastWeightMemoryLayer(DIM, HEADS, chunk_size=chunk, executor=executor, **p).double()


def hidden(batch: int, steps: int, seed: int) -> Tensor:
    return torch.randn(batch, steps, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def token_loop(layer: FastWeightMemoryLayer, x: Tensor, state: MemoryLayerState | None = None
               ) -> tuple[Tensor, Tensor]:
    """The layer's output and final weights by the GDN recurrence, token by token (float64), from
    the layer's own projection, gates and output stage, continuing ``state`` when given."""
    return _token_loop(layer, x, state)[:2]


def _token_loop(layer: FastWeightMemoryLayer, x: Tensor, state: MemoryLayerState | None
                ) -> tuple[Tensor, Tensor, object]:
    batch, steps, _ = x.shape
    q, k, v, cache = layer.projection(x, None if state is None else state.projection)
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))           # [B * H, T, d]

    def heads_first(gate: Tensor) -> Tensor:                 # [B, T, H] -> [B * H, T]
        return gate.permute(0, 2, 1).flatten(0, 1)

    beta = heads_first(layer.optimizer(x).lr)
    log_keep = layer.retention(x)
    keep = torch.ones_like(beta) if log_keep is None else heads_first(log_keep).exp()
    weights = (layer.memory.initial_weights()[0].repeat(batch, 1, 1) if state is None
               else layer.read_state(state, batch)[0])          # [B * H, d_k, d_v]
    reads = []
    for t in range(steps):
        decayed = keep[:, t, None, None] * weights
        error = v[:, t] - (k[:, t, None, :] @ decayed)[:, 0]
        weights = decayed + beta[:, t, None, None] * k[:, t, :, None] * error[:, None, :]
        reads.append((q[:, t, None, :] @ weights)[:, 0])
    return layer.output(torch.stack(reads, 1), x), weights, cache


def reference(layer: FastWeightMemoryLayer, x: Tensor, state: MemoryLayerState | None
              ) -> tuple[Tensor, MemoryLayerState]:
    """:func:`token_loop` as the conformance kit's reference ``(layer, x, state) -> (y, state)``."""
    y, weights, cache = _token_loop(layer, x, state)
    return y, MemoryLayerState(WYState((weights,)), cache)


def outer_gradients(layer: nn.Module, output: Tensor, weights: Tensor) -> list[Tensor]:
    """Gradients of a fixed random projection of the outputs and final weights w.r.t. every
    parameter of ``layer``."""
    gen = torch.Generator().manual_seed(7)
    loss = ((output * torch.randn(output.shape, generator=gen, dtype=output.dtype)).sum()
            + (weights * torch.randn(weights.shape, generator=gen, dtype=weights.dtype)).sum())
    return list(torch.autograd.grad(loss, list(layer.parameters()), allow_unused=True))


def assert_all_close(got: list[Tensor | None], want: list[Tensor | None]) -> None:
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **EXACT)


# -- dispatch ----------------------------------------------------------------------------------


def test_auto_picks_wy_first_for_the_gated_delta_rule() -> None:
    assert next(iter(EXECUTORS)) == "wy"
    for chunk in (1, 7, 64):
        chosen = select_executor(rule(chunk))
        assert chosen.name == "wy" and chosen.tier(rule(chunk)) == "token-exact"
    # No decay at all runs on WY too (the order of decay and gradient is then moot).
    assert select_executor(rule(retention=rules.NoForgetting())).name == "wy"


def test_momentum_goes_to_the_closed_form() -> None:
    momentum = rules.GatedStep(DIM, HEADS, max_lr=1.0, lr_init=0.5, momentum=True)
    plain = rule(16, optimizer=momentum, retention=rules.NoForgetting())
    assert select_executor(plain).name == "closed_form"
    # With GDN's decay order the closed form refuses too: only the sequential executor, at chunk 1.
    assert select_executor(rule(1, optimizer=momentum)).name == "sequential"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"memory": MLPMemory(HEADS, HEAD, 1)},
     r"memory MLPMemory is not a single matrix M\(k\) = k W \(it does not declare linear_map"),
    ({"memory": MLPMemory(HEADS, HEAD, 2, residual=False)}, r"memory MLPMemory is not a single"),
    ({"memory": MLPMemory(HEADS, HEAD, 1, residual=False, norm=True)}, r"memory MLPMemory is not"),
    ({"objective": Absolute()}, r"objective Absolute is not the squared error"),
    ({"objective": Windowed()}, r"objective Windowed sums a window of 2 tokens, WY one"),
    ({"optimizer": rules.GatedStep(DIM, HEADS, max_lr=1.0, lr_init=0.5, momentum=True)},
     r"optimizer GatedStep may carry momentum \(it does not declare uses_momentum = False\)"),
    ({"optimizer": Muon()}, r"optimizer Muon transforms its update \(applies_at='token'\)"),
    ({"retention": RowNorm()}, r"retention RowNorm projects the weights"),
    ({"retention": rules.AdaptiveDecay(DIM, HEADS, init=0.1, max_decay=1.0)},
     r"retention AdaptiveDecay decays after the gradient \(Titans' order\)"),
    ({"retention": rules.ConstantDecay(HEADS, alpha=0.1)}, r"retention ConstantDecay decays after"),
    ({"retrieval": rules.ReadBeforeWrite()},
     r"retrieval ReadBeforeWrite reads before_write; WY reads only after the token's own write"),
    ({"retrieval": rules.ReadAtChunkStart()}, r"retrieval ReadAtChunkStart reads at_chunk_start"),
])
def test_refusals_name_the_part(overrides: dict, reason: str) -> None:
    """Each part WY cannot run is refused in one clause naming it; forcing WY on such a rule is a
    one-line SpecError naming the components and the fix. (Chunk size 1, where the sequential
    executor runs GDN's decay order, so that auto finds another executor.)"""
    refused = rule(1, **overrides)
    why = EXECUTORS["wy"].refusal(refused)
    assert why is not None and "\n" not in why
    assert re.match(reason, why), why
    assert select_executor(refused).name != "wy"
    with pytest.raises(SpecError, match=r"^executor 'wy' cannot run the rule \(memory ") as info:
        select_executor(refused, "wy")
    assert "\n" not in str(info.value)


def test_a_broken_declaration_is_caught_at_scan() -> None:
    """An optimiser declaring no momentum that gives momentum gates, or a full-retention retention
    that gives a decay, is refused with a ValueError, not silently run as another rule."""
    wy = EXECUTORS["wy"]
    plain = rule(4, retention=rules.NoForgetting())
    n, steps = 2 * HEADS, 5
    zeros = torch.zeros(n, steps, HEAD, dtype=torch.float64)
    gate = torch.full((n, steps), 0.5, dtype=torch.float64)
    state = wy.initial_state(plain, 2, RuleInputs(zeros, zeros, zeros, gate, None, None, None, None))
    with pytest.raises(ValueError, match="declares uses_momentum = False but gave momentum"):
        wy.scan(plain, state, RuleInputs(zeros, zeros, zeros, gate, gate, None, None, None))
    with pytest.raises(ValueError, match="declares full_retention = True but gave a decay"):
        wy.scan(plain, state, RuleInputs(zeros, zeros, zeros, gate, None, -gate, None, None))


# -- the engine layer on WY against the token loop -----------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("steps", [1, 13, 71])
def test_layer_equals_the_token_loop(chunk: int, steps: int) -> None:
    layer = make_layer(chunk)
    assert layer.executor.name == "wy"
    x = hidden(2, steps, seed=steps)
    got, state = layer(x)
    want, want_weights = token_loop(layer, x)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(state.fast.weights[0], want_weights, **EXACT)
    # ReadsMemory (MAC): the snapshot is the weights after every token.
    torch.testing.assert_close(layer.read_state(state, 2)[0], want_weights, **EXACT)
    assert_all_close(outer_gradients(layer, got, state.fast.weights[0]),
                     outer_gradients(layer, want, want_weights))


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 40), chunk=st.sampled_from([1, 3, 7, 64]),
       cuts=st.lists(st.integers(1, 39), max_size=3), decay=st.booleans())
def test_split_with_state_anywhere_equals_the_token_loop(seed: int, steps: int, chunk: int,
                                                        cuts: list[int], decay: bool) -> None:
    """Fed in pieces with the state carried (cuts inside and across chunks), the layer equals the
    token loop on the whole sequence, outputs, weights and outer gradients."""
    overrides = {} if decay else {"retention": rules.NoForgetting()}
    layer = make_layer(chunk, seed=seed, **overrides)
    assert layer.executor.name == "wy"
    x = hidden(2, steps, seed)
    bounds = [0, *sorted({c for c in cuts if c < steps}), steps]
    pieces, state = [], None
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        y, state = layer(x[:, start:stop], state)
        pieces.append(y)
    got = torch.cat(pieces, 1)
    want, want_weights = token_loop(layer, x)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(state.fast.weights[0], want_weights, **EXACT)
    assert_all_close(outer_gradients(layer, got, state.fast.weights[0]),
                     outer_gradients(layer, want, want_weights))


@pytest.mark.parametrize("decay", [True, False])
def test_equals_the_sequential_executor(decay: bool) -> None:
    """The same rule forced onto the sequential executor (token by token: it takes the gradient
    at the decayed state only at chunk size 1) agrees with WY at chunk 7 in float64."""
    overrides = {} if decay else {"retention": rules.NoForgetting()}
    wy = make_layer(7, **overrides)
    sequential = make_layer(1, executor="sequential", **overrides)
    sequential.load_state_dict(wy.state_dict())
    assert (wy.executor.name, sequential.executor.name) == ("wy", "sequential")
    x = hidden(2, 23, seed=3)
    first, state = wy(x[:, :9])
    second, state = wy(x[:, 9:], state)
    got = torch.cat((first, second), 1)
    want, want_state = sequential(x)
    torch.testing.assert_close(got, want, **EXACT)
    want_weights = sequential.read_state(want_state, 2)[0]
    torch.testing.assert_close(wy.read_state(state, 2)[0], want_weights, **EXACT)
    assert_all_close(outer_gradients(wy, got, wy.read_state(state, 2)[0]),
                     outer_gradients(sequential, want, want_weights))


def test_sequential_refuses_gdn_order_in_chunks_and_says_so() -> None:
    with pytest.raises(SpecError, match=r"^executor 'sequential' cannot run the rule .*"
                                        r"use executor 'auto' \(it picks 'wy'\)$"):
        make_layer(7, executor="sequential")


# -- the plugin's engine preset -------------------------------------------------------------------


def test_engine_preset_runs_on_wy() -> None:
    """``delta.engine_gdn_lmm_tiny``: every memory layer describes the rule on WY, token-exact,
    and the model trains (finite loss and gradients)."""
    torch.manual_seed(0)
    model = memforge.build_model(memforge.preset("delta.engine_gdn_lmm_tiny"))
    layers = [m for m in model.modules() if isinstance(m, FastWeightMemoryLayer)]
    assert len(layers) == 2
    for layer in layers:
        described = layer.describe_rule()
        assert (described.executor, described.tier) == ("wy", "token-exact")
        assert described.retention == "delta.gated_decay"  # the registered name, from the builder
    tokens = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    out = model(tokens)
    loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("integration", ["titans.lmm", "titans.mac"])
def test_engine_preset_decodes_statically_and_splits(integration: str) -> None:
    """On WY the layer decodes with fixed shapes (one recurrence step per token) and MAC reads
    its memory (ReadsMemory): both equal the full forward, as does a split with the state."""
    spec = memforge.preset("delta.engine_gdn_lmm_tiny")
    if integration == "titans.mac":
        spec = memforge.apply_overrides(spec, {"integration": "titans.mac",
                                               "integration.segment_len": 16})
    torch.manual_seed(1)
    model = memforge.build_model(spec, dtype=torch.float64).eval()
    seq = torch.randint(0, spec.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq).logits
        first = model(seq[:, :11])
        rest = model(seq[:, 11:], state=first.state).logits
        torch.testing.assert_close(torch.cat((first.logits, rest), 1), full, **EXACT)
        decoder = StaticDecoder(model, first.state, capacity=26, compiled=False)
        steps = torch.stack([decoder.step(seq[:, t:t + 1]) for t in range(11, 37)], 1)
    torch.testing.assert_close(steps, full[:, 11:], **EXACT)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"memory": "titans.mlp"}, r"delta.engine with retention delta.gated_decay \(layers 0, 1\): no "
                               r"executor can run the rule \(memory MLPMemory, .*wy: memory "
                               r"MLPMemory is not"),
    ({"optimizer": "titans.momentum"}, r"wy: optimizer GatedStep may carry momentum"),
    ({"memory_layer": "titans.neural_memory", "retrieval": "titans.before_write"},
     r"titans.neural_memory with retention delta.gated_decay \(layers 0, 1\): .*wy: retrieval "
     r"ReadBeforeWrite reads before_write"),
    ({"integration": "titans.mac", "integration.segment_len": 12},
     r"titans.mac's 'segment_len'=12 must be a multiple of delta.engine's 'chunk_size'=8; choose "
     r"memory_layer.chunk_size among \[1, 2, 3, 4, 6, 12\]"),
])
def test_spec_checks_refuse_before_building(overrides: dict, message: str) -> None:
    """A spec whose delta.gated_decay rule no executor runs, or whose MAC segment splits an engine
    chunk, is refused by the spec check in one line, before anything is built."""
    spec = memforge.preset("delta.engine_gdn_lmm_tiny")
    with pytest.raises(SpecError, match=r"^invalid spec: .*" + message) as info:
        memforge.apply_overrides(spec, overrides)
    assert "\n" not in str(info.value)
    # At chunk size 1 the sequential executor runs GDN's order with any parts: the spec builds.
    if "integration" not in overrides:
        memforge.build_model(memforge.apply_overrides(spec, {**overrides,
                                                             "memory_layer.chunk_size": 1}))


@pytest.mark.parametrize("chunk", [1, 7, 8])
def test_the_conformance_kit_passes_on_wy(chunk: int) -> None:
    """The kit on the engine GDN preset's layer (on WY at every chunk size), with the token loop
    above as its reference: split, causality, batch independence, gradients, pure reads, static
    decoding, and the reference whole, after a carried state and in every parameter's gradient."""
    spec = memforge.preset("delta.engine_gdn_lmm_tiny")
    assert memory_layer(spec, chunk_size=chunk).module.executor.name == "wy"
    ran = check_memory_layer(spec, reference=reference, chunk_size=chunk)
    assert {r.rsplit(": ", 1)[1] for r in ran} >= {"split", "causal", "batch", "gradients",
                                                    "read", "static_decode", "reference"}
