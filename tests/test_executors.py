"""Executors and the fast-weight memory layer that dispatches to them (docs/memory.md,
"Executors"): which rule goes where, refusals as one-line SpecErrors, a forced executor, the
retention in log space at full forgetting, the objective's side input through the closed form."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import memforge.engine.sequential  # noqa: F401  (registers the sequential executor)
from memforge.capabilities import missing
from memforge.engine import rules
from memforge.engine.executors import (
    EXECUTORS,
    ClosedFormExecutor,
    LearningRule,
    RuleInputs,
    register_executor,
    select_executor,
)
from memforge.engine.layer import FastWeightMemoryLayer, StaticDecodingMemoryLayer
from memforge.engine.networks import MLPMemory
from memforge.engine.projection import QKVProjection
from memforge.engine.reference import chunk_start_reference
from memforge.errors import SpecError
from memforge.interfaces import (
    DecodesMemoryStatically,
    DescribesRule,
    ObjectiveInputs,
    ReadsMemoryStatically,
    StepGates,
)
from tests.test_titans_kernel import HuberLoss

DIM, HEADS = 8, 2


class Muon(nn.Module):
    """A transforming optimiser (plain steps, then the update's sign: enough to be non-linear)."""

    applies_at = "token"

    def forward(self, x: Tensor) -> StepGates:
        return StepGates(x.new_full((*x.shape[:2], HEADS), 0.01), None)

    def transform(self, update: Tensor) -> Tensor:
        return update.sign()


class RowNorm(nn.Module):
    """A projecting retention (rows renormalised at chunk ends), no scalar decay."""

    applies_at = "chunk_end"

    def forward(self, x: Tensor) -> None:
        return None

    def project(self, weights: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(nn.functional.normalize(w, dim=-1) for w in weights)


class DecayFirst(rules.NoForgetting):
    """A retention that takes the gradient at the decayed state (GDN's order)."""

    decay_before_gradient = True


def parts(**overrides: nn.Module) -> dict[str, nn.Module]:
    """A Titans rule's parts (MLP memory, l2, momentum, adaptive decay, read before write)."""
    chosen = {
        "memory": MLPMemory(HEADS, DIM // HEADS, 2),
        "objective": rules.L2Objective(),
        "optimizer": rules.GatedStep(DIM, HEADS, max_lr=0.1, lr_init=0.05, momentum=True),
        "retention": rules.AdaptiveDecay(DIM, HEADS, init=0.1, max_decay=1.0),
        "retrieval": rules.ReadBeforeWrite(),
    }
    return {**chosen, **overrides}


def rule(chunk_size: int = 4, **overrides: nn.Module) -> LearningRule:
    chosen = parts(**overrides)
    return LearningRule(chosen["memory"], chosen["objective"], chosen["optimizer"],
                        chosen["retention"], chosen["retrieval"], chunk_size)


def layer(chunk_size: int = 4, executor: str = "auto", **overrides: nn.Module
          ) -> FastWeightMemoryLayer:
    return FastWeightMemoryLayer(
        DIM, HEADS, projection=QKVProjection(DIM, HEADS, DIM // HEADS, conv_kernel=2),
        chunk_size=chunk_size, executor=executor, **parts(**overrides))


# ----------------------------------------------------------------------------------------------
# Dispatch


def test_the_titans_rule_runs_on_the_closed_form() -> None:
    assert select_executor(rule()).name == "closed_form"
    windowed = rules.L2Objective()
    windowed.window = 3  # a window of pairs mixes the chunk's gradients: still the closed form
    assert select_executor(rule(objective=windowed)).name == "closed_form"
    assert ClosedFormExecutor().tier(rule()) == "chunk-start"
    assert ClosedFormExecutor().tier(rule(chunk_size=1)) == "token-exact"
    assert list(EXECUTORS).index("closed_form") < list(EXECUTORS).index("sequential")


REFUSED = {
    "transform": ({"optimizer": Muon()}, "Muon"),
    "projection": ({"retention": RowNorm(), "retrieval": rules.ReadAtChunkStart()}, "RowNorm"),
    "decay first": ({"retention": DecayFirst()}, "DecayFirst"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_closed_form_refuses_what_it_cannot_run(case: str) -> None:
    overrides, culprit = REFUSED[case]
    chunk = 1 if case == "decay first" else 4  # the sequential executor runs it at chunk size 1
    refused = rule(chunk, **overrides)
    assert culprit in ClosedFormExecutor().refusal(refused)
    assert select_executor(refused).name == "sequential"
    with pytest.raises(SpecError) as error:
        select_executor(refused, "closed_form")
    message = str(error.value)
    assert "\n" not in message
    for words in ("executor 'closed_form' cannot run", culprit, "MLPMemory",
                  "use executor 'auto' (it picks 'sequential')"):
        assert words in message


def test_a_rule_no_executor_runs_is_one_line_naming_every_refusal(monkeypatch) -> None:
    monkeypatch.delitem(EXECUTORS, "sequential")
    with pytest.raises(SpecError) as error:
        layer(optimizer=Muon())
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("no executor can run the rule (memory MLPMemory, objective "
                              "L2Objective, optimizer Muon, retention AdaptiveDecay")
    assert "closed_form: optimizer Muon transforms its update" in message


def test_unknown_executor_names_the_available_ones() -> None:
    with pytest.raises(SpecError, match="unknown executor 'fast'; available: auto, wy, "
                                        "closed_form, sequential$"):
        layer(executor="fast")


def test_registering_keeps_the_preference_order(monkeypatch) -> None:
    class Renamed(ClosedFormExecutor):
        name = "wy"

    monkeypatch.setattr("memforge.engine.executors.EXECUTORS", dict(EXECUTORS))
    from memforge.engine import executors

    register_executor(Renamed())
    assert list(executors.EXECUTORS)[:3] == ["wy", "closed_form", "sequential"]
    with pytest.raises(TypeError, match="not an Executor"):
        register_executor(object())


# ----------------------------------------------------------------------------------------------
# The layer with a forced executor


def test_only_an_executor_that_decodes_statically_gives_the_capability() -> None:
    closed, forced = layer(), layer(executor="sequential")
    assert isinstance(closed, StaticDecodingMemoryLayer)
    assert isinstance(closed, DecodesMemoryStatically) and isinstance(closed, ReadsMemoryStatically)
    assert type(forced) is FastWeightMemoryLayer
    assert not isinstance(forced, DecodesMemoryStatically)
    assert "static_decode_buffers" in missing(forced, DecodesMemoryStatically)


def test_describe_rule_names_the_parts_the_schedule_tier_and_executor() -> None:
    named = FastWeightMemoryLayer(
        DIM, HEADS, projection=QKVProjection(DIM, HEADS, DIM // HEADS, conv_kernel=0),
        chunk_size=16, names={"objective": "titans.l2", "optimizer": "titans.momentum"},
        **parts())
    assert isinstance(named, DescribesRule)
    described = named.describe_rule()
    assert described._asdict() == {
        "objective": "titans.l2", "retention": "AdaptiveDecay", "optimizer": "titans.momentum",
        "schedule": "chunks of 16", "tier": "chunk-start", "executor": "closed_form"}
    single = layer(chunk_size=1, executor="sequential").describe_rule()
    assert (single.schedule, single.tier, single.executor) == ("token by token", "token-exact",
                                                               "sequential")
    assert "executor='sequential'" in repr(layer(executor="sequential")).splitlines()[1]


# ----------------------------------------------------------------------------------------------
# Where a mirror map's dual starts


class HalvingMirror(RowNorm):
    """A mirror map ``W = D / 2`` that starts its dual at the inverse of the draw, ``2 W``."""

    mirror = True

    def project(self, weights: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(w / 2 for w in weights)

    def initial_dual(self, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(2 * w for w in weights)


class ComputedWeights(MLPMemory):
    """A memory whose initial weights are computed from its parameters, not the parameters."""

    def initial_weights(self) -> tuple[Tensor, ...]:
        return tuple(1.0 * w for w in self.weights)


def test_a_mirror_map_with_an_initial_dual_starts_the_memory_at_the_draw() -> None:
    torch.manual_seed(0)
    memory = MLPMemory(HEADS, DIM // HEADS, 2)
    drawn = tuple(w.detach().clone() for w in memory.initial_weights())
    built = layer(executor="sequential", memory=memory, retention=HalvingMirror(),
                  retrieval=rules.ReadAtChunkStart()).double()
    for stored, start, draw in zip(memory.initial_weights(), built.read_state(None, 1), drawn,
                                   strict=True):
        torch.testing.assert_close(stored, 2 * draw.double())
        torch.testing.assert_close(start, draw.double())


class StartsAtTheDraw(HalvingMirror):
    """A mirror map whose dual starts at the draw itself."""

    def initial_dual(self, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return weights


def test_an_initial_dual_away_from_the_draw_needs_initial_weights_it_can_store_in() -> None:
    with pytest.raises(SpecError, match=r"ComputedWeights.initial_weights\(\) does not return "
                                        r"its parameters or buffers to store the dual in"):
        layer(executor="sequential", memory=ComputedWeights(HEADS, DIM // HEADS, 2),
              retention=HalvingMirror(), retrieval=rules.ReadAtChunkStart())
    # A dual that starts at the draw needs nothing stored.
    layer(executor="sequential", memory=ComputedWeights(HEADS, DIM // HEADS, 2),
          retention=StartsAtTheDraw(), retrieval=rules.ReadAtChunkStart())


# ----------------------------------------------------------------------------------------------
# Retention in log space


@pytest.mark.parametrize("max_decay", [1.0, 0.5])
def test_adaptive_decay_is_log_one_minus_alpha(max_decay: float) -> None:
    decay = rules.AdaptiveDecay(DIM, HEADS, init=0.1 * max_decay, max_decay=max_decay).double()
    x = 3 * torch.randn(2, 5, DIM, dtype=torch.float64)
    alpha = max_decay * torch.sigmoid(decay.gate.proj(x))
    torch.testing.assert_close(decay(x), torch.log(1 - alpha), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("read", [rules.ReadBeforeWrite, rules.ReadAtChunkStart,
                                  rules.ReadAfterWrite])
@pytest.mark.parametrize("logit", [1e4, -1e4])
def test_full_forgetting_keeps_outputs_and_gradients_finite(read: type, logit: float) -> None:
    # max_decay = 1 with a huge gate logit: alpha = 1 up to exp(-1e4); log_keep = -1e4 stays
    # finite, where log(1 - alpha) would be log(0) = -inf with NaN gradients.
    torch.manual_seed(0)
    memory = layer(retrieval=read())
    with torch.no_grad():
        memory.retention.gate.proj.bias.fill_(logit)
    x = torch.randn(2, 13, DIM, requires_grad=True)
    log_keep = memory.retention(x)
    assert torch.isfinite(log_keep).all() and (log_keep <= 0).all()
    y, state = memory(x)
    y2, _ = memory(x, state)
    (y.square().sum() + y2.square().sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    grads = [x.grad, *(p.grad for p in memory.parameters() if p.grad is not None)]
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(memory.retention.gate.proj.bias.grad).all()


def test_constant_full_forgetting_is_finite() -> None:
    x = torch.randn(1, 3, DIM)
    assert rules.ConstantDecay(HEADS, alpha=1.0)(x).eq(math.log(torch.finfo(x.dtype).tiny)).all()
    torch.testing.assert_close(rules.ConstantDecay(HEADS, alpha=0.25)(x),
                               torch.full((1, 3, HEADS), math.log(0.75)))


# ----------------------------------------------------------------------------------------------
# The objective's side input through the closed form


class HuberObjective(HuberLoss, nn.Module):
    """Huber with a data-dependent threshold ``delta_t = softplus(x W)`` per token and head."""

    window = 1

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.proj = nn.Linear(DIM, HEADS)

    def forward(self, x: Tensor) -> ObjectiveInputs:
        return ObjectiveInputs(nn.functional.softplus(self.proj(x)), None)


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 12), cut=st.integers(0, 12),
       chunk=st.integers(1, 5), read=st.sampled_from(["chunk_start", "before_write",
                                                        "after_write"]))
def test_the_side_input_through_the_closed_form_is_the_reference(seed: int, steps: int, cut: int,
                                                                  chunk: int, read: str) -> None:
    torch.manual_seed(seed)
    retrieval = {"chunk_start": rules.ReadAtChunkStart, "before_write": rules.ReadBeforeWrite,
                 "after_write": rules.ReadAfterWrite}[read]()
    learning = rule(chunk, objective=HuberObjective(), retrieval=retrieval)
    learning.network.double()
    executor = select_executor(learning)
    assert executor.name == "closed_form"
    n = 2 * HEADS

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, dtype=torch.float64)

    inputs = RuleInputs(torch.randn(n, steps, DIM // HEADS, dtype=torch.float64),
                        nn.functional.normalize(torch.randn(n, steps, DIM // HEADS,
                                                            dtype=torch.float64), dim=-1),
                        torch.randn(n, steps, DIM // HEADS, dtype=torch.float64),
                        0.3 * rand(n, steps), rand(n, steps), torch.log1p(-rand(n, steps) / 2),
                        0.05 + rand(n, steps) / 2, None)
    inputs = RuleInputs(*(None if f is None else f.requires_grad_() for f in inputs))
    state = executor.initial_state(learning, 2, inputs)
    cut = min(cut, steps)
    first, middle = executor.scan(learning, state, RuleInputs(
        *(None if f is None else f[:, :cut] for f in inputs)))
    second, end = executor.scan(learning, middle, RuleInputs(
        *(None if f is None else f[:, cut:] for f in inputs)))
    out = torch.cat((first, second), 1)
    expected = chunk_start_reference(learning.network, learning.objective, read, state.weights,
                                     *inputs[:7], chunk_size=chunk)
    torch.testing.assert_close(out, expected.outputs, atol=1e-10, rtol=1e-9)
    for got, want in zip(executor.current_weights(learning, end), expected.weights, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    probe = torch.randn_like(out)
    leaves = [inputs.side, inputs.keys, inputs.log_keep]
    got = torch.autograd.grad((out * probe).sum(), leaves, materialize_grads=True)
    want = torch.autograd.grad((expected.outputs * probe).sum(), leaves, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)


def test_the_layer_hands_the_objectives_side_input_to_the_kernel() -> None:
    torch.manual_seed(1)
    huber = layer(objective=HuberObjective()).double()
    x = torch.randn(2, 9, DIM, dtype=torch.float64, requires_grad=True)
    y, state = huber(x)
    assert state.fast.pending.side is not None and state.fast.pending.side.shape == (2 * HEADS, 1)
    y.sum().backward()
    assert huber.objective.proj.weight.grad.abs().sum() > 0  # the threshold is learned
    # A fixed-shape decode step carries the side input too: it equals forward on the same token.
    tokens = x.detach()
    _, carried = huber(tokens[:, :8])
    buffers = huber.static_decode_buffers(carried, 2)
    step = huber.static_decode_step(tokens[:, 8:9], buffers, completes_chunk=False)
    torch.testing.assert_close(step, huber(tokens[:, 8:9], carried)[0], atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# memforge show


@pytest.mark.parametrize(("preset", "line"), [
    ("delta.gdn_lmm_tiny", "rule: objective squared error, optimizer delta step beta, retention "
                           "gated decay (before the gradient), WY chunks of 8; tier token-exact; "
                           "executor wy"),
    ("titans.lmm_tiny", "; tier chunk-start; executor closed_form"),
    ("atlas.omeganet_lmm", "objective 'atlas.omega', optimizer 'atlas.gd', retention "
                           "'titans.adaptive_decay', retrieval 'titans.chunk_start', projection "
                           "'titans.conv_qkv'; rule: chunks of 16; tier chunk-start; executor "
                           "closed_form"),
])
def test_show_prints_each_memory_layers_rule_tier_and_executor(capsys, preset: str,
                                                               line: str) -> None:
    from memforge.cli import main

    assert main(["show", preset]) == 0
    out = capsys.readouterr().out
    assert line in out


def test_a_built_layer_describes_its_parts_by_their_registered_names() -> None:
    model = memforge.build_model(memforge.preset("titans.lmm_tiny"))
    layers = [m for m in model.modules() if isinstance(m, FastWeightMemoryLayer)]
    assert layers
    for built in layers:
        described = built.describe_rule()
        assert (described.objective, described.optimizer, described.retention) == (
            "titans.l2", "titans.momentum", "titans.adaptive_decay")
