"""The sequential executor (memforge.engine.sequential) against the float64 token-loop reference
(memforge.engine.rule_reference), the closed-form chunk kernel and the token recurrence: outputs,
weights and outer gradients, any chunk size and split point, causality, batch independence,
reads that never write, and which rules it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from memforge.engine import rules
from memforge.engine.executors import EXECUTORS, ClosedFormExecutor, LearningRule, RuleInputs, select_executor
from memforge.engine.networks import MLPMemory
from memforge.engine.reference import token_recurrence
from memforge.engine.rule_reference import rule_reference
from memforge.engine.sequential import SequentialExecutor
from memforge.errors import SpecError

SEQUENTIAL = SequentialExecutor()
FAST = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
READERS = {"at_chunk_start": rules.ReadAtChunkStart, "before_write": rules.ReadBeforeWrite,
           "after_write": rules.ReadAfterWrite}


# --------------------------------------------------------------------------------------------
# Rule parts written for these tests


class WindowedLoss:
    """An objective over a window of ``window`` pairs, with a side input weighing each pair's
    loss by ``1 + side``: the squared error or (``smooth``) the log-cosh loss, whose gradient is
    not linear in the error."""

    def __init__(self, window: int = 1, smooth: bool = False) -> None:
        self.window, self.smooth = window, smooth

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        error = prediction - target
        per_feature = (error + torch.nn.functional.softplus(-2 * error) - math.log(2.0)
                       if self.smooth else 0.5 * error.square())
        weight = 1.0 if side is None else 1.0 + side
        return weight * per_feature.sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        error = prediction - target
        grad = torch.tanh(error) if self.smooth else error
        return grad if side is None else (1.0 + side)[..., None] * grad


class PlainStep:
    """An optimiser without an update transform (the gates come with the inputs)."""


class NormalisedStep:
    """A non-linear update transform: ``u / sqrt(1 + ||u||_F^2)`` per memory and matrix."""

    def __init__(self, applies_at: str) -> None:
        self.applies_at = applies_at

    def transform(self, update: Tensor) -> Tensor:
        return update * torch.rsqrt(1.0 + update.square().sum((-2, -1), keepdim=True))


class GramStep:
    """A per-token transform through the update's Gram matrix, ``(I + X X^T)^{-1} X`` on the
    update's wide orientation ``X``; declaring ``gram_factor`` sends chunk-start reads down the
    executor's Gram path. Counts the calls of each."""

    applies_at = "token"

    def __init__(self) -> None:
        self.calls = {"gram_factor": 0, "transform": 0}

    def gram_factor(self, gram: Tensor) -> Tensor:
        self.calls["gram_factor"] += 1
        return torch.linalg.inv(torch.eye(gram.shape[-1], dtype=gram.dtype) + gram)

    def transform(self, update: Tensor) -> Tensor:
        self.calls["transform"] += 1
        tall = update.shape[-2] > update.shape[-1]
        wide = update.mT if tall else update
        out = torch.linalg.solve(torch.eye(wide.shape[-2], dtype=wide.dtype) + wide @ wide.mT, wide)
        return out.mT if tall else out


class ScalarDecay:
    """A retention whose decay comes with the inputs, applied after the step (Titans' order)."""

    decay_before_gradient = False


class DecayFirst:
    """A retention whose decay comes with the inputs, applied before the gradient (GDN's order)."""

    decay_before_gradient = True


class RowRenormalisation:
    """A weight projection: every row of every matrix rescaled to its norm at the sequence start
    (LaCT's renormalisation); with ``mirror``, a mirror map of a carried dual state."""

    decay_before_gradient = False

    def __init__(self, applies_at: str, mirror: bool = False) -> None:
        self.applies_at, self.mirror = applies_at, mirror

    def project(self, weights: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(w * (w0.norm(dim=-1, keepdim=True) / (w.norm(dim=-1, keepdim=True) + 1e-6))
                     for w, w0 in zip(weights, initial, strict=True))


class ForwardOnly(torch.nn.Module):
    """A memory network without a hand-written backward (the executor derives it by autograd)."""

    def __init__(self, network: MLPMemory) -> None:
        super().__init__()
        self.inner = network

    def initial_weights(self) -> tuple[Tensor, ...]:
        return self.inner.initial_weights()

    def forward(self, x: Tensor, linear):  # noqa: ANN001 - the MemoryNetwork signature
        return self.inner.forward(x, linear)


class ReadsEverything(torch.nn.Module):
    """Calls every read twice and returns the after-write read."""

    def forward(self, reader, queries: Tensor) -> Tensor:  # noqa: ANN001
        for _ in range(2):
            reader.at_chunk_start(queries)
            reader.before_write(queries)
            out = reader.after_write(queries)
        return out


# --------------------------------------------------------------------------------------------
# Helpers


def network(heads: int, dim: int, depth: int, seed: int, derived: bool = False) -> torch.nn.Module:
    """A float64 MLP memory with random initial weights (also for the linear one, whose rows a
    renormalisation needs non-zero)."""
    torch.manual_seed(seed)
    net = MLPMemory(heads, dim, depth, expansion=2.0, norm=depth > 1).double()
    with torch.no_grad():
        for w in net.weights:
            w.normal_().div_(math.sqrt(w.shape[1]))
    return ForwardOnly(net) if derived else net


def random_inputs(n: int, steps: int, dim: int, seed: int, *, momentum: bool, decay: bool,
                  side: bool = False, window: bool = False) -> RuleInputs:
    """Float64 inputs that all take outer gradients."""
    gen = torch.Generator().manual_seed(seed + 1)

    def leaf(x: Tensor) -> Tensor:
        return x.double().requires_grad_()

    return RuleInputs(
        queries=leaf(torch.randn(n, steps, dim, generator=gen)),
        keys=leaf(torch.randn(n, steps, dim, generator=gen)),
        values=leaf(torch.randn(n, steps, dim, generator=gen)),
        lr=leaf(0.4 * torch.rand(n, steps, generator=gen)),
        momentum=leaf(torch.rand(n, steps, generator=gen)) if momentum else None,
        log_keep=leaf(-0.3 * torch.rand(n, steps, generator=gen)) if decay else None,
        side=leaf(torch.rand(n, steps, generator=gen)) if side else None,
        window=leaf(torch.rand(n, steps, generator=gen)) if window else None,
    )


def pieces(inputs: RuleInputs, splits: list[int]) -> list[RuleInputs]:
    """``inputs`` cut along time at ``splits``."""
    bounds = [0, *splits, inputs.keys.shape[1]]
    return [RuleInputs(*(None if x is None else x[:, a:b] for x in inputs))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def run(executor, rule: LearningRule, batch: int, inputs: RuleInputs, splits: list[int] = ()
        ) -> tuple[Tensor, tuple[Tensor, ...], object, object]:
    """Outputs, current weights, the first and the last state of ``executor`` fed in pieces."""
    first = state = executor.initial_state(rule, batch, inputs)
    outputs = []
    for piece in pieces(inputs, list(splits)):
        out, state = executor.scan(rule, state, piece)
        outputs.append(out)
    return torch.cat(outputs, 1), tuple(executor.current_weights(rule, state)), first, state


def assert_close(actual: Tensor, expected: Tensor, tol: float) -> None:
    """Equal up to ``tol`` relative to the larger of 1 and the expected values' magnitude."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tol * scale)


def outer_gradients(outputs: Tensor, weights: tuple[Tensor, ...], leaves: list[Tensor]) -> list[Tensor]:
    """Gradients of a fixed non-linear scalar of the outputs and final weights."""
    scalar = outputs.sin().sum() + sum(w.cos().sum() for w in weights)
    grads = torch.autograd.grad(scalar, leaves, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]


def check_against_reference(rule: LearningRule, batch: int, inputs: RuleInputs, splits: list[int],
                            tol: float = 1e-9) -> None:
    """Outputs, final weights and outer gradients of the executor fed in pieces equal the
    reference's on the whole sequence."""
    outputs, weights, _, _ = run(SEQUENTIAL, rule, batch, inputs, splits)
    start = tuple(w.repeat(batch, 1, 1) for w in rule.network.initial_weights())
    expected = rule_reference(rule, start, inputs)
    assert_close(outputs, expected.outputs, tol)
    for w, e in zip(weights, expected.weights, strict=True):
        assert_close(w, e, tol)
    leaves = [x for x in inputs if x is not None] + list(rule.network.initial_weights())
    # Gradients pass the layer norm's 1 / std many times over: rounding grows a little more.
    for got, want in zip(outer_gradients(outputs, weights, leaves),
                         outer_gradients(expected.outputs, expected.weights, leaves), strict=True):
        assert_close(got, want, 10 * tol)


@st.composite
def shapes(draw: st.DrawFn, max_steps: int = 21) -> dict:
    """Seed, batch, heads, width, depth, an odd length, a chunk size and split points."""
    steps = draw(st.integers(0, max_steps // 2)) * 2 + 1
    splits = sorted(draw(st.sets(st.integers(1, steps - 1), max_size=3))) if steps > 1 else []
    return {"seed": draw(st.integers(0, 2**16)), "batch": draw(st.integers(1, 2)),
            "heads": draw(st.integers(1, 2)), "dim": draw(st.integers(3, 5)),
            "depth": draw(st.integers(1, 2)), "steps": steps,
            "chunk": draw(st.sampled_from([1, 7, 16])), "splits": splits}


# --------------------------------------------------------------------------------------------
# Against the reference


@FAST
@given(shape=shapes(), window=st.sampled_from([1, 3]), smooth=st.booleans(), momentum=st.booleans(),
       decay=st.booleans(), side=st.booleans(), gamma=st.booleans(), derived=st.booleans(),
       read=st.sampled_from(sorted(READERS)))
def test_linear_rules_match_the_reference(shape: dict, window: int, smooth: bool, momentum: bool,
                                          decay: bool, side: bool, gamma: bool, derived: bool,
                                          read: str) -> None:
    """Without transforms or projections (the chunk's closed form inside the executor): windows,
    side inputs, gamma gates, momentum, decay, every read, a derived backward."""
    net = network(shape["heads"], shape["dim"], shape["depth"], shape["seed"], derived)
    rule = LearningRule(net, WindowedLoss(window, smooth), PlainStep(), ScalarDecay(),
                        READERS[read](), shape["chunk"])
    inputs = random_inputs(shape["batch"] * shape["heads"], shape["steps"], shape["dim"],
                           shape["seed"], momentum=momentum, decay=decay, side=side, window=gamma)
    check_against_reference(rule, shape["batch"], inputs, shape["splits"])


@FAST
@given(shape=shapes(max_steps=17), transform=st.sampled_from([None, "token", "chunk_end"]),
       projection=st.sampled_from([None, "token", "chunk_end"]), window=st.sampled_from([1, 2]),
       mirror=st.booleans(), momentum=st.booleans(), decay=st.booleans(), gamma=st.booleans(),
       read=st.sampled_from(sorted(READERS)))
def test_transforms_and_projections_match_the_reference(
        shape: dict, transform: str | None, projection: str | None, window: int, mirror: bool,
        momentum: bool, decay: bool, gamma: bool, read: str) -> None:
    """A non-linear update transform and a row renormalisation (of the weights, or as a mirror
    map of a carried dual state), per token or at chunk ends, with or without gamma gates."""
    if "chunk_end" in (transform, projection):
        read = "at_chunk_start"  # the only read such a rule has
    net = network(shape["heads"], shape["dim"], shape["depth"], shape["seed"])
    optimizer = PlainStep() if transform is None else NormalisedStep(transform)
    retention = ScalarDecay() if projection is None else RowRenormalisation(projection, mirror)
    rule = LearningRule(net, WindowedLoss(window, smooth=True), optimizer, retention,
                        READERS[read](), shape["chunk"])
    assert SEQUENTIAL.refusal(rule) is None
    inputs = random_inputs(shape["batch"] * shape["heads"], shape["steps"], shape["dim"],
                           shape["seed"], momentum=momentum, decay=decay, side=True, window=gamma)
    check_against_reference(rule, shape["batch"], inputs, shape["splits"])


@FAST
@given(shape=shapes(max_steps=17), window=st.sampled_from([1, 2]), momentum=st.booleans(),
       decay=st.booleans(), gamma=st.booleans(), read=st.sampled_from(sorted(READERS)),
       projection=st.sampled_from([None, "token", "chunk_end"]), mirror=st.booleans())
def test_transforms_through_the_gram_matrix_match_the_reference(
        shape: dict, window: int, momentum: bool, decay: bool, gamma: bool, read: str,
        projection: str | None, mirror: bool) -> None:
    """A transform that factors through the Gram matrix equals the reference on both of the
    executor's paths: the Gram path (chunk-start reads, no per-token projection; it never calls
    ``transform``) and the token loop (exact reads or a per-token projection; it never calls
    ``gram_factor`` for a chunk it reads)."""
    if projection == "chunk_end":
        read = "at_chunk_start"
    net = network(shape["heads"], shape["dim"], shape["depth"], shape["seed"])
    optimizer = GramStep()
    retention = ScalarDecay() if projection is None else RowRenormalisation(projection, mirror)
    rule = LearningRule(net, WindowedLoss(window, smooth=True), optimizer, retention,
                        READERS[read](), shape["chunk"])
    inputs = random_inputs(shape["batch"] * shape["heads"], shape["steps"], shape["dim"],
                           shape["seed"], momentum=momentum, decay=decay, side=True, window=gamma)
    check_against_reference(rule, shape["batch"], inputs, shape["splits"])

    optimizer.calls = dict.fromkeys(optimizer.calls, 0)
    with torch.no_grad():
        state = SEQUENTIAL.initial_state(rule, shape["batch"], inputs)
        SEQUENTIAL.scan(rule, state, inputs)
    if read == "at_chunk_start" and projection != "token":
        ends = shape["steps"] // shape["chunk"]  # a finished chunk's end, once per matrix
        assert optimizer.calls == {"gram_factor": ends * len(net.initial_weights()), "transform": 0}
    else:
        assert optimizer.calls["gram_factor"] == 0


@pytest.mark.parametrize("window", [1, 3])
def test_token_loop_gradients_equal_the_reference_to_1e_10(window: int) -> None:
    """The token loop (each token's step built when the loop reaches it, the chunk recomputed in
    the backward) gives the reference's outputs and outer gradients, with respect to every input
    and the initial weights, to 1e-10: memory-lean without changing results."""
    net = network(2, 4, 2, seed=3)
    rule = LearningRule(net, WindowedLoss(window, smooth=True), NormalisedStep("token"),
                        ScalarDecay(), rules.ReadAfterWrite(), 5)
    inputs = random_inputs(2, 13, 4, 3, momentum=True, decay=True, side=True, window=True)
    outputs, weights, _, _ = run(SEQUENTIAL, rule, 1, inputs, [6])
    start = tuple(w.repeat(1, 1, 1) for w in net.initial_weights())
    expected = rule_reference(rule, start, inputs)
    assert_close(outputs, expected.outputs, 1e-10)
    leaves = [x for x in inputs if x is not None] + list(net.initial_weights())
    got = outer_gradients(outputs, weights, leaves)
    want = outer_gradients(expected.outputs, expected.weights, leaves)
    assert len(got) == 10 and all(g.abs().max() > 0 for g in want)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, 1e-10)


@FAST
@given(shape=shapes(), transform=st.sampled_from([None, "token"]), read=st.sampled_from(sorted(READERS)))
def test_decay_before_gradient_matches_the_reference_at_chunk_size_one(
        shape: dict, transform: str | None, read: str) -> None:
    """The gradient at the decayed state (Gated DeltaNet's order), token by token."""
    net = network(shape["heads"], shape["dim"], shape["depth"], shape["seed"])
    optimizer = PlainStep() if transform is None else NormalisedStep(transform)
    rule = LearningRule(net, WindowedLoss(), optimizer, DecayFirst(),
                        READERS[read](), 1)
    inputs = random_inputs(shape["batch"] * shape["heads"], shape["steps"], shape["dim"],
                           shape["seed"], momentum=True, decay=True)
    check_against_reference(rule, shape["batch"], inputs, shape["splits"])


def test_the_reference_with_decay_before_gradient_is_the_gated_delta_rule() -> None:
    """Linear memory, squared error, no momentum, gradient at the decayed state: the reference
    is ``S_t = g_t S_{t-1} + beta_t k_t (v_t - g_t S_{t-1}^T k_t)^T``, read after the write."""
    torch.manual_seed(3)
    n, steps, dim = 3, 9, 4
    net = MLPMemory(1, dim, 1, residual=False).double()
    with torch.no_grad():
        net.weights[0].normal_()
    rule = LearningRule(net, rules.L2Objective(), PlainStep(), DecayFirst(),
                        rules.ReadAfterWrite(), 1)
    inputs = random_inputs(n, steps, dim, 3, momentum=False, decay=True)
    state = net.initial_weights()[0].repeat(n, 1, 1)
    expected = []
    for t in range(steps):
        k, v, q = inputs.keys[:, t], inputs.values[:, t], inputs.queries[:, t]
        g, beta = inputs.log_keep[:, t, None, None].exp(), inputs.lr[:, t, None, None]
        decayed = g * state
        state = decayed + beta * k[:, :, None] * (v - (k[:, None, :] @ decayed).squeeze(1))[:, None, :]
        expected.append((q[:, None, :] @ state).squeeze(1))
    result = rule_reference(rule, (net.initial_weights()[0].repeat(n, 1, 1),), inputs)
    assert_close(result.outputs, torch.stack(expected, 1), 1e-12)
    outputs, weights, _, _ = run(SEQUENTIAL, rule, n, inputs)
    assert_close(outputs, torch.stack(expected, 1), 1e-12)


# --------------------------------------------------------------------------------------------
# Against the closed form and the token recurrence


@settings(deadline=None, max_examples=30)
@given(shape=shapes(max_steps=41), momentum=st.booleans(), adaptive=st.booleans(),
       read=st.sampled_from(sorted(READERS)))
def test_equals_the_closed_form_where_both_run(shape: dict, momentum: bool, adaptive: bool,
                                               read: str) -> None:
    """L2 objective, gated step with or without momentum, adaptive decay or none: the sequential
    executor and the closed-form kernel agree to 1e-10 (outputs, weights, outer gradients)."""
    batch, heads, dim, steps = shape["batch"], shape["heads"], shape["dim"], shape["steps"]
    net = network(heads, dim, shape["depth"], shape["seed"])
    width = heads * dim
    optimizer = rules.GatedStep(width, heads, max_lr=0.5, lr_init=0.2, momentum=momentum).double()
    retention = (rules.AdaptiveDecay(width, heads, init=0.1, max_decay=1.0).double() if adaptive
                 else rules.NoForgetting())
    rule = LearningRule(net, rules.L2Objective(), optimizer, retention, READERS[read](),
                        shape["chunk"])
    assert ClosedFormExecutor().refusal(rule) is None and SEQUENTIAL.refusal(rule) is None
    gen = torch.Generator().manual_seed(shape["seed"])
    x = torch.randn(batch, steps, width, generator=gen, dtype=torch.float64)
    gates = optimizer(x)
    log_keep = retention(x)

    def flat(gate: Tensor | None) -> Tensor | None:
        return None if gate is None else gate.permute(0, 2, 1).flatten(0, 1)

    # Unit queries and keys, as the layer's projection makes them: steps theta |k|^2 < 2 keep the
    # memory stable, so the comparison measures the executors, not amplified rounding.
    qkv = [torch.randn(batch * heads, steps, dim, generator=gen, dtype=torch.float64)
           for _ in range(3)]
    qkv = [x.requires_grad_() for x in (*(torch.nn.functional.normalize(x, dim=-1) for x in qkv[:2]),
                                        qkv[2])]
    inputs = RuleInputs(*qkv, flat(gates.lr), flat(gates.momentum), flat(log_keep), None, None)
    got = run(SEQUENTIAL, rule, batch, inputs, shape["splits"])
    want = run(ClosedFormExecutor(), rule, batch, inputs, shape["splits"])
    assert_close(got[0], want[0], 1e-10)
    for w, e in zip(got[1], want[1], strict=True):
        assert_close(w, e, 1e-10)
    leaves = [*qkv, *optimizer.parameters(), *retention.parameters(), *net.parameters()]
    for a, b in zip(outer_gradients(got[0], got[1], leaves), outer_gradients(want[0], want[1], leaves),
                    strict=True):
        assert_close(a, b, 1e-10)


@FAST
@given(shape=shapes(), momentum=st.booleans(), decay=st.booleans(),
       read=st.sampled_from(sorted(READERS)))
def test_chunk_size_one_is_the_token_recurrence(shape: dict, momentum: bool, decay: bool,
                                                read: str) -> None:
    """At chunk size 1 every gradient is at ``W_{t-1}``: memforge.engine.reference's recurrence."""
    net = network(shape["heads"], shape["dim"], shape["depth"], shape["seed"])
    rule = LearningRule(net, rules.L2Objective(), PlainStep(), ScalarDecay(), READERS[read](), 1)
    inputs = random_inputs(shape["batch"] * shape["heads"], shape["steps"], shape["dim"],
                           shape["seed"], momentum=momentum, decay=decay)
    outputs, weights, first, _ = run(SEQUENTIAL, rule, shape["batch"], inputs, shape["splits"])
    mode = "chunk_start" if read == "at_chunk_start" else read
    expected = token_recurrence(net, rules.L2Objective(), mode, first.weights, *inputs[:6])
    assert SEQUENTIAL.tier(rule) == "token-exact"
    assert_close(outputs, expected.outputs, 1e-10)
    for w, e in zip(weights, expected.weights, strict=True):
        assert_close(w, e, 1e-10)


# --------------------------------------------------------------------------------------------
# Invariants


RULE_PARTS = st.sampled_from([
    ("plain", "after_write"), ("token", "before_write"), ("chunk_end", "at_chunk_start")])


@settings(deadline=None, max_examples=15)
@given(shape=shapes(max_steps=33), parts=RULE_PARTS, cut=st.integers(0, 32))
def test_causal(shape: dict, parts: tuple[str, str], cut: int) -> None:
    """Changing tokens after ``cut`` changes no output at or before ``cut``."""
    kind, read = parts
    steps = shape["steps"]
    cut = min(cut, steps - 1)
    rule = LearningRule(network(shape["heads"], shape["dim"], shape["depth"], shape["seed"]),
                        WindowedLoss(2, smooth=True),
                        PlainStep() if kind == "plain" else NormalisedStep(kind),
                        RowRenormalisation(kind) if kind != "plain" else ScalarDecay(),
                        READERS[read](), shape["chunk"])
    n = shape["batch"] * shape["heads"]
    inputs = random_inputs(n, steps, shape["dim"], shape["seed"], momentum=True, decay=True,
                           side=True, window=True)
    changed = RuleInputs(*(None if x is None else
                           torch.cat((x[:, : cut + 1], x[:, cut + 1 :] * 1.5 + 0.25), 1).detach()
                           for x in inputs))
    a = run(SEQUENTIAL, rule, shape["batch"], inputs, shape["splits"])[0]
    b = run(SEQUENTIAL, rule, shape["batch"], changed, shape["splits"])[0]
    torch.testing.assert_close(a[:, : cut + 1], b[:, : cut + 1], rtol=0.0, atol=1e-12)


@settings(deadline=None, max_examples=15)
@given(shape=shapes(max_steps=33), parts=RULE_PARTS)
def test_batch_independent(shape: dict, parts: tuple[str, str]) -> None:
    """Each sequence of a batch of two gives what it gives alone."""
    kind, read = parts
    heads = shape["heads"]
    rule = LearningRule(network(heads, shape["dim"], shape["depth"], shape["seed"]),
                        WindowedLoss(3), PlainStep() if kind == "plain" else NormalisedStep(kind),
                        RowRenormalisation(kind) if kind != "plain" else ScalarDecay(),
                        READERS[read](), shape["chunk"])
    inputs = random_inputs(2 * heads, shape["steps"], shape["dim"], shape["seed"], momentum=True,
                           decay=True, side=True, window=True)
    together = run(SEQUENTIAL, rule, 2, inputs, shape["splits"])
    for b in range(2):
        rows = slice(b * heads, (b + 1) * heads)
        alone = run(SEQUENTIAL, rule, 1, RuleInputs(*(None if x is None else x[rows] for x in inputs)),
                    shape["splits"])
        # Batched products of other batch sizes may round differently, nothing more.
        assert_close(together[0][rows], alone[0], 1e-10)
        for w, e in zip(together[1], alone[1], strict=True):
            assert_close(w[rows], e, 1e-10)


@pytest.mark.parametrize("kind", ["plain", "token"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_reads_write_nothing(kind: str, chunk: int) -> None:
    """Every read, called twice, leaves the state as reading at the chunk start does, and the
    after-write read equals the read-after-write rule's."""
    net = network(2, 3, 2, seed=5)
    optimizer = PlainStep() if kind == "plain" else NormalisedStep(kind)
    inputs = random_inputs(4, 13, 3, 5, momentum=True, decay=True, side=True, window=True)

    def rule(retrieval: torch.nn.Module) -> LearningRule:
        return LearningRule(net, WindowedLoss(2), optimizer, ScalarDecay(), retrieval, chunk)

    everything = run(SEQUENTIAL, rule(ReadsEverything()), 2, inputs, [3, 4])
    start = run(SEQUENTIAL, rule(rules.ReadAtChunkStart()), 2, inputs, [3, 4])
    after = run(SEQUENTIAL, rule(rules.ReadAfterWrite()), 2, inputs, [3, 4])
    assert_close(everything[0], after[0], 1e-13)
    for state in (everything[3], after[3]):
        for a, b in zip(state.weights + state.momentum, start[3].weights + start[3].momentum,
                        strict=True):
            assert torch.equal(a, b)


def test_an_empty_call_changes_nothing() -> None:
    """``T = 0`` reads nothing and returns the same state."""
    rule = LearningRule(network(1, 3, 1, seed=1), WindowedLoss(), PlainStep(), ScalarDecay(),
                        rules.ReadAfterWrite(), 4)
    inputs = random_inputs(2, 5, 3, 1, momentum=False, decay=True)
    _, _, _, state = run(SEQUENTIAL, rule, 2, inputs, [3])
    out, again = SEQUENTIAL.scan(rule, state, pieces(inputs, [0])[0])
    assert out.shape == (2, 0, 3) and again is state


def test_a_state_remembers_which_inputs_it_takes() -> None:
    """A call without the momentum its state was made with is refused in one line."""
    rule = LearningRule(network(1, 3, 1, seed=1), WindowedLoss(), PlainStep(), ScalarDecay(),
                        rules.ReadAfterWrite(), 4)
    inputs = random_inputs(2, 5, 3, 1, momentum=True, decay=False)
    state = SEQUENTIAL.initial_state(rule, 2, inputs)
    with pytest.raises(ValueError, match="momentum must be given exactly"):
        SEQUENTIAL.scan(rule, state, inputs._replace(momentum=None))


# --------------------------------------------------------------------------------------------
# Refusals, tiers, registration


def test_refuses_what_it_cannot_run() -> None:
    """The decayed-state gradient beyond chunk size 1, exact reads with a chunk-end part and an
    unknown place to apply a part, each named in one line with the fix."""
    net = network(1, 3, 1, seed=0)
    gdn = LearningRule(net, rules.L2Objective(), PlainStep(), DecayFirst(),
                       rules.ReadAfterWrite(), 8)
    assert "chunk_size 1" in SEQUENTIAL.refusal(gdn)
    assert SEQUENTIAL.refusal(gdn.__class__(net, gdn.objective, gdn.optimizer, gdn.retention,
                                            gdn.retrieval, 1)) is None
    moneta = LearningRule(net, rules.L2Objective(), PlainStep(), RowRenormalisation("chunk_end"),
                          rules.ReadBeforeWrite(), 8)
    assert "at_chunk_start" in SEQUENTIAL.refusal(moneta)
    odd = LearningRule(net, rules.L2Objective(), NormalisedStep("sometimes"), ScalarDecay(),
                       rules.ReadAtChunkStart(), 8)
    assert "'sometimes'" in SEQUENTIAL.refusal(odd)
    for why in (SEQUENTIAL.refusal(gdn), SEQUENTIAL.refusal(moneta), SEQUENTIAL.refusal(odd)):
        assert "\n" not in why


def test_tiers() -> None:
    """Token-exact at chunk size 1, rule-specific with a chunk-end part, else chunk-start."""
    net = network(1, 3, 1, seed=0)

    def rule(optimizer: object, retention: object, chunk: int) -> LearningRule:
        return LearningRule(net, rules.L2Objective(), optimizer, retention,
                            rules.ReadAtChunkStart(), chunk)

    assert SEQUENTIAL.tier(rule(PlainStep(), ScalarDecay(), 1)) == "token-exact"
    assert SEQUENTIAL.tier(rule(NormalisedStep("chunk_end"), ScalarDecay(), 1)) == "token-exact"
    assert SEQUENTIAL.tier(rule(PlainStep(), ScalarDecay(), 16)) == "chunk-start"
    assert SEQUENTIAL.tier(rule(NormalisedStep("token"), RowRenormalisation("token"), 16)) == "chunk-start"
    assert SEQUENTIAL.tier(rule(NormalisedStep("chunk_end"), ScalarDecay(), 16)) == "rule-specific"
    assert SEQUENTIAL.tier(rule(PlainStep(), RowRenormalisation("chunk_end"), 16)) == "rule-specific"


def test_registered_after_the_closed_form() -> None:
    """``auto`` keeps the closed form for the rules it runs and picks the sequential executor for
    a transform; a rule neither runs is refused in one line naming both."""
    assert list(EXECUTORS).index("sequential") > list(EXECUTORS).index("closed_form")
    net = network(1, 3, 1, seed=0)
    linear = LearningRule(net, rules.L2Objective(), PlainStep(), rules.NoForgetting(),
                          rules.ReadAtChunkStart(), 16)
    assert select_executor(linear).name == "closed_form"
    muon = LearningRule(net, rules.L2Objective(), NormalisedStep("chunk_end"), rules.NoForgetting(),
                        rules.ReadAtChunkStart(), 16)
    assert select_executor(muon).name == "sequential"
    assert select_executor(linear, "sequential").name == "sequential"
    bad = LearningRule(net, rules.L2Objective(), PlainStep(), DecayFirst(),
                       rules.ReadAtChunkStart(), 16)
    with pytest.raises(SpecError, match="sequential: .*chunk_size 1"):
        select_executor(bad)


class BreaksItsPromise(torch.nn.Module):
    """Declares chunk-start reads only, then reads after the write."""

    reads = ("at_chunk_start",)

    def forward(self, reader, queries: Tensor) -> Tensor:  # noqa: ANN001
        return reader.after_write(queries)


def test_a_read_the_retrieval_did_not_declare_is_refused() -> None:
    """The executor builds per-token weights only for declared exact reads; an undeclared one is
    an error naming the fix, not a wrong read."""
    rule = LearningRule(network(1, 3, 1, seed=1), WindowedLoss(), PlainStep(), ScalarDecay(),
                        BreaksItsPromise(), 4)
    inputs = random_inputs(2, 6, 3, 1, momentum=False, decay=True)
    with pytest.raises(ValueError, match="declare every read"):
        run(SEQUENTIAL, rule, 2, inputs)
