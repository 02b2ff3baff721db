"""The conformance kit (memforge.testing.conformance) over every registered memory component,
over the example plugin through its pytest base class, and against broken components: each
fault is found, and its message names the component, the check and the numbers.

The registry-wide tests are parametrised from the registry, so a plugin registered later is
covered without a change here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import pytest
import torch
from torch import Tensor, nn

import memforge
from memforge.conformance import check_module
from memforge.errors import SpecError
from memforge.interfaces import ObjectiveInputs
from memforge.plugins import as_module, load_plugins
from memforge.testing.conformance import (
    ConformanceError,
    MemoryLayerConformance,
    build_part,
    check_causal,
    check_gram_factor,
    check_memory_layer,
    check_memory_network,
    check_objective,
    check_read_pure,
    check_reference,
    check_split,
    check_static_decode,
    chunk_sizes,
    memory_layer,
)

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = load_plugins(autoload=False)
LAYERS = [(name, size) for name in REGISTRY.names("memory_layer")
          for size in chunk_sizes(name, REGISTRY)]
#: The optional checks that must run for these layers (each has the capability).
FULL = {name: {"reference", "read", "static_decode"}
        for name in ("delta.deltanet", "delta.gated_deltanet", "example.gla")}


@pytest.mark.parametrize(("name", "chunk_size"), LAYERS, ids=[f"{n}-chunk{s}" for n, s in LAYERS])
def test_every_registered_memory_layer_conforms(name: str, chunk_size: int | None):
    ran = {r.rsplit(": ", 1)[1] for r in check_memory_layer(name, REGISTRY, chunk_size=chunk_size)}
    assert {"split", "causal", "batch", "gradients"} <= ran
    if name in FULL:  # a capability lost (a renamed method, say) must not become a silent skip
        assert FULL[name] <= ran, f"{name}: {sorted(FULL[name] - ran)} did not run"


@pytest.mark.parametrize("name", REGISTRY.names("memory"))
def test_every_registered_memory_network_backward_matches_autograd(name: str):
    module = build_part("memory", name, REGISTRY, dim=16, heads=2)
    if not check_memory_network(module, name=name, heads=2, head_dim=8):
        pytest.skip(f"{name} has no hand-written backward")


@pytest.mark.parametrize("name", REGISTRY.names("objective"))
def test_every_registered_objective_loss_grad_matches_autograd(name: str):
    check_objective(build_part("objective", name, REGISTRY, dim=16, heads=2), name=name,
                    heads=2, head_dim=8)


@pytest.mark.parametrize("name", REGISTRY.names("optimizer"))
def test_every_registered_gram_factor_matches_its_transform(name: str):
    if not check_gram_factor(build_part("optimizer", name, REGISTRY, dim=16, heads=2), name=name):
        pytest.skip(f"{name} does not factor through the Gram matrix")


# -- the example plugin, through the pytest base class a plugin author subclasses ---------------
sys.path.insert(0, str(ROOT / "examples" / "plugin_example"))
import memforge_example_plugin  # noqa: E402  (the example package, from the source tree)

sys.path.pop(0)
EXAMPLE = load_plugins(autoload=False, extra=[memforge_example_plugin])


def test_every_optional_check_runs_for_the_example_layer():
    ran = {r.rsplit(": ", 1)[1] for r in check_memory_layer("example.gla", EXAMPLE, chunk_size=7)}
    assert FULL["example.gla"] <= ran, sorted(FULL["example.gla"] - ran)


class TestExampleGLA(MemoryLayerConformance):
    component = "example.gla"
    registry = EXAMPLE


class TestExampleGLAInMAC(MemoryLayerConformance):
    """The documented ``preset =`` form alone: the layer's name (for its chunk sizes) comes from
    the preset."""

    preset = "example.gla_mac_tiny"
    registry = EXAMPLE


# -- broken components: every fault is found -------------------------------------------------------
@attrs.frozen(kw_only=True)
class FaultConfig:
    fault: str = memforge.option("none", choices=("none", "drops_state", "peeks", "read_writes",
                                                  "decode_off", "reference_off",
                                                  "reference_detached"),
                                 help="the bug to plant")


class DecayingSum(nn.Module):
    """``S_t = 0.9 S_{t-1} + k_t``, ``y_t = S_t * q_t`` per channel; ``fault`` plants one bug."""

    chunk_size = 1

    def __init__(self, dim: int, heads: int, fault: str) -> None:
        super().__init__()
        self.heads, self.fault = heads, fault
        self.qk = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        q, k = self.qk(x).chunk(2, -1)
        if self.fault == "peeks":
            k = k + 0.5 * k.roll(-1, 1)
        memory = self.read_state(None if self.fault == "drops_state" else state, x.shape[0])
        outputs = []
        for t in range(x.shape[1]):
            memory = 0.9 * memory + k[:, t]
            outputs.append(memory * q[:, t])
        return torch.stack(outputs, 1), memory

    def reference_forward(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.fault == "reference_detached":  # right values, but no gradient into weights
            return torch.func.functional_call(
                self, {n: p.detach() for n, p in self.named_parameters()}, (x, state))
        y, memory = self(x, state)
        return (y * 1.001 if self.fault == "reference_off" else y), memory

    def read_state(self, state: Tensor | None, batch: int) -> Tensor:
        if state is None:
            return self.qk.weight.new_zeros(batch, self.qk.out_features // 2)
        return state

    def read(self, queries: Tensor, snapshot: Tensor) -> Tensor:
        if self.fault == "read_writes":
            snapshot.mul_(0.5)
        return queries * snapshot.unflatten(-1, (self.heads, -1))[:, :, None]

    def static_decode_buffers(self, state: Tensor, batch: int) -> Tensor:
        return state.clone()

    def static_decode_phase(self, state: Tensor) -> int:
        return 0

    def static_decode_step(self, x: Tensor, buffers: Tensor, completes_chunk: bool) -> Tensor:
        q, k = self.qk(x[:, 0]).chunk(2, -1)
        buffers.mul_(0.9 if self.fault != "decode_off" else 0.8).add_(k)
        return (buffers * q)[:, None]


def _faulty(fault: str):
    def factory(config: FaultConfig, ctx: memforge.BuildContext) -> DecayingSum:
        return DecayingSum(ctx.dim, ctx.heads, config.fault)

    @memforge.hookimpl
    def memforge_register_components():
        return [memforge.ComponentSpec(kind="memory_layer", name="lab.sum", config_cls=FaultConfig,
                                       factory=factory, summary="a decaying sum")]

    registry = load_plugins(autoload=False, extra=[as_module(
        "lab", memforge_register_components=memforge_register_components)])
    spec = memforge.override(memforge.preset("titans.lmm_tiny"), [
        "memory_layer=lab.sum", f"memory_layer.fault={fault}", "memory=none", "objective=none",
        "optimizer=none", "retention=none", "retrieval=none", "projection=none"], registry)
    return memory_layer(spec, registry)


def test_a_correct_layer_passes_every_check():
    assert len(check_memory_layer(_faulty("none").module, dim=32, heads=2)) == 7


@pytest.mark.parametrize(("fault", "check", "message"), [
    ("drops_state", check_split, r"^lab.sum: split at 5 of 13 tokens: output differs by [\d.e-]+ "
                                 r"at index \[\d+, \d+, \d+\] \(.* vs .*; allowed [\d.e-]+\)$"),
    ("peeks", check_causal, r"^lab.sum: causality \(tokens from 6 of 13 changed\): output before "
                            r"token 6 differs by"),
    ("read_writes", check_read_pure, r"^lab.sum: ReadsMemory is pure: read twice differs by "
                                     r"[\d.e-]+ at index \[\d+, \d+, \d+, \d+\]"),
    ("decode_off", check_static_decode, r"^lab.sum: static decoding \(3 tokens, then 9 steps\): "
                                        r"step 0 \(token 3\) differs by"),
    ("reference_off", check_reference, r"^lab.sum: against the reference \(13 tokens\): output "
                                       r"differs by"),
    ("reference_detached", check_reference, r"^lab.sum: against the reference \(13 tokens\): the "
                                            r"reference gives no gradient into qk.weight, the fast "
                                            r"path does"),
])
def test_each_fault_is_found_naming_component_check_and_numbers(fault, check, message):
    layer = _faulty(fault)
    with pytest.raises(ConformanceError, match=message):
        check(layer)


class _WrongBackward(nn.Module):
    """titans.linear with its hand-written backward's gradients scaled by 1.01."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.initial_weights, self.forward = inner.initial_weights, inner.forward

    def backward(self, tape, grad_output, linear_transposed):
        return [(i, g * 1.01) for i, g in self.inner.backward(tape, grad_output, linear_transposed)]


def test_a_wrong_memory_backward_is_found():
    module = _WrongBackward(build_part("memory", "titans.linear", REGISTRY))
    with pytest.raises(ConformanceError, match=r"^titans.linear\*: backward against autograd "
                                               r"\(5 tokens\): token 0's gradient into weight 0 "
                                               r"differs by"):
        check_memory_network(module, name="titans.linear*", heads=2, head_dim=8)


class _HalfLossGrad(nn.Module):
    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        return ((prediction - target) ** 2).sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        return prediction - target  # half of the true gradient

    def forward(self, x: Tensor) -> ObjectiveInputs:
        return ObjectiveInputs(None, None)


class _UnscaledGramFactor(nn.Module):
    """Muon's transform with a factor that forgets the scale of its step."""

    applies_at = "token"

    def __init__(self) -> None:
        super().__init__()
        self.muon = build_part("optimizer", "atlas.muon", REGISTRY, dim=16, heads=2)

    def transform(self, update: Tensor) -> Tensor:
        return self.muon.transform(update)

    def gram_factor(self, gram: Tensor) -> Tensor:
        return self.muon.gram_factor(gram) / self.muon.scale


class _DetachedGramFactor(_UnscaledGramFactor):
    """Muon's factor, right in value, with its gradient into the update cut off."""

    def gram_factor(self, gram: Tensor) -> Tensor:
        return self.muon.gram_factor(gram.detach())


class _GramFactorWithoutTransform(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.muon = build_part("optimizer", "atlas.muon", REGISTRY, dim=16, heads=2)

    def forward(self, x: Tensor):  # noqa: ANN201 - StepGates
        return self.muon(x)

    def gram_factor(self, gram: Tensor) -> Tensor:
        return self.muon.gram_factor(gram)


def test_a_wrong_gram_factor_is_found():
    with pytest.raises(ConformanceError, match=r"^lab.muon: gram_factor against transform \(4 x 4 "
                                               r"update\): gram_factor\(X X\^T\) @ X differs by"):
        check_gram_factor(_UnscaledGramFactor(), name="lab.muon")
    with pytest.raises(ConformanceError, match=r"^lab.muon: gram_factor against transform \(4 x 4 "
                                               r"update\): the gradient into the update through "
                                               r"gram_factor differs by"):
        check_gram_factor(_DetachedGramFactor(), name="lab.muon")
    with pytest.raises(ConformanceError, match=r"^lab.muon: gram_factor: a gram_factor stands for "
                                               r"a per-token transform"):
        check_gram_factor(_GramFactorWithoutTransform(), name="lab.muon")


def test_a_gram_factor_without_a_token_transform_is_refused_at_build_time():
    with pytest.raises(SpecError, match=r"optimizer 'module' .*it has gram_factor, which stands for "
                                        r"a per-token transform"):
        check_module("optimizer", _GramFactorWithoutTransform(), dim=16, heads=2)


class _NonMirrorWithInitialDual(nn.Module):
    """A projection of the weights themselves that also claims a dual to start from."""

    applies_at = "chunk_end"
    mirror = False
    decay_before_gradient = False

    def forward(self, x: Tensor) -> None:
        return None

    def project(self, weights, initial):  # noqa: ANN001, ANN201 - ProjectsWeights
        return weights

    def initial_dual(self, weights):  # noqa: ANN001, ANN201 - ProjectsWeights
        return weights


class _MirrorWithInitialDual(_NonMirrorWithInitialDual):
    mirror = True


class _InitialDualOfOneMatrix(_MirrorWithInitialDual):
    def initial_dual(self, weights):  # noqa: ANN001, ANN201 - ProjectsWeights
        return weights[0]


class _InitialDualOfAnotherShape(_MirrorWithInitialDual):
    def initial_dual(self, weights):  # noqa: ANN001, ANN201 - ProjectsWeights
        return tuple(w.mT[..., :1] for w in weights)


class _InitialDualNotAMethod(_MirrorWithInitialDual):
    initial_dual = "inverse"


@pytest.mark.parametrize(("module", "message"), [
    (_NonMirrorWithInitialDual(), r"it has initial_dual but is not a mirror map"),
    (_InitialDualOfOneMatrix(), r"initial_dual\(weights\) returned Tensor, expected a tuple"),
    (_InitialDualOfAnotherShape(), r"initial_dual\(weights\)\[0\]"),
    (_InitialDualNotAMethod(), r"its initial_dual is str, expected a method")])
def test_a_wrong_initial_dual_is_refused(module, message):
    with pytest.raises(SpecError, match=message):
        check_module("retention", module, dim=16, heads=2)
    check_module("retention", _MirrorWithInitialDual(), dim=16, heads=2)


def test_a_wrong_loss_grad_is_found():
    with pytest.raises(ConformanceError, match=r"^lab.l2: loss_grad against autograd of loss "
                                               r"\(5 tokens\): loss_grad differs by"):
        check_objective(_HalfLossGrad(), name="lab.l2", heads=2, head_dim=4)


class _WeightedL2(nn.Module):
    """``0.5 * w_t * ||p - t||^2`` with a per-token, per-head weight ``w_t`` as the side input."""

    def __init__(self, dim: int, heads: int, *, uses_side: bool) -> None:
        super().__init__()
        self.gate, self.uses_side = nn.Linear(dim, heads), uses_side

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        return 0.5 * side * (prediction - target).pow(2).sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        error = prediction - target
        return side[..., None] * error if self.uses_side else error  # the second forgets w_t

    def forward(self, x: Tensor) -> ObjectiveInputs:
        return ObjectiveInputs(torch.sigmoid(self.gate(x)) + 0.5, None)


def test_an_objectives_side_input_reaches_loss_and_loss_grad():
    check_objective(_WeightedL2(8, 2, uses_side=True), name="lab.weighted", heads=2, head_dim=4)
    with pytest.raises(ConformanceError, match=r"^lab.weighted: loss_grad against autograd of "
                                               r"loss \(5 tokens\): loss_grad differs by"):
        check_objective(_WeightedL2(8, 2, uses_side=False), name="lab.weighted", heads=2,
                        head_dim=4)
