"""The conformance kit: what a plugin author runs against a component (docs/plugins.md, "Testing
your plugin with the conformance kit").

:mod:`memforge.conformance` checks, when a model is built, that a component has its kind's shape.
This kit checks its *behaviour*, in float64, the way memforge tests its own components:

* a memory layer (kind ``memory_layer``): the sequence split anywhere with the state carried
  equals the whole (outputs and gradients into the parameters and the input), causality, batch
  independence, finite outputs and gradients into every parameter, a pure ``read``/``read_state``
  (:class:`~memforge.interfaces.ReadsMemory`), static decoding equal to ``forward`` token by
  token (:class:`~memforge.interfaces.DecodesMemoryStatically`), and agreement with the layer's
  slow reference (``reference_forward``, below) when it has one;
* a memory network (kind ``memory``): its hand-written ``backward`` against the one autograd
  derives, outer gradients included (or, without one, that autograd can derive it);
* an objective (kind ``objective``): ``loss_grad`` against autograd of ``loss``, with its
  per-token side input.

Three ways to use it, from the least to the most typing:

* ``check_memory_layer("mylab.layer")`` (or a preset, a :class:`~memforge.ModelSpec`, a built
  module) runs every check on a fixed grid of lengths and split points and returns the names of
  the checks it ran; ``check_memory_network`` and ``check_objective`` do the same for parts;
* ``class TestMyLayer(MemoryLayerConformance): component = "mylab.layer"`` in a test module gives
  one pytest test per check, parametrised over chunk sizes and drawn by hypothesis over lengths
  and split points;
* the single checks (``check_split``, ``check_causal``, ...) on a :class:`LayerUnderTest`, for a
  test of one property.

A layer's slow reference: a method ``reference_forward(x, state) -> (y, state)`` on the layer,
written token by token from the equations with the layer's own parameters and taking and
returning the layer's own state (or a callable ``reference(layer, x, state)`` passed to the
checks). Every failure raises
:class:`ConformanceError` (an ``AssertionError``) whose message names the component, the check
and the numbers. Hypothesis is imported here, never by the library at run time; the pytest class
draws ``MemoryLayerConformance.examples`` examples per test (the environment variable
``MEMFORGE_CONFORMANCE_EXAMPLES``, default 3).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from memforge.builder import build_layer_component
from memforge.conformance import check_component, check_module
from memforge.engine.derived_backward import DerivedBackward, derivability_problem
from memforge.interfaces import BuildContext, DecodesMemoryStatically, FactorsThroughGram, ReadsMemory
from memforge.plugins import default_registry
from memforge.registry import ComponentRegistry
from memforge.spec import ModelSpec, override

#: A slow reference: ``reference(layer, x, state) -> (y, state)``.
Reference = Callable[[nn.Module, Tensor, Any], tuple[Tensor, Any]]

#: Relative tolerance of every float64 comparison (of the largest difference to the largest value).
TOLERANCE = 1e-8

#: Tolerance of a hand-written memory backward against the one autograd derives (both exact).
BACKWARD_TOLERANCE = 1e-10

#: The Titans memory layer's parts, set to ``none`` for a layer that does not use them.
_PARTS = ("projection", "memory", "objective", "optimizer", "retention", "retrieval")


class ConformanceError(AssertionError):
    """A component broke its kind's contract; the message names the component, check and numbers."""


@attrs.frozen
class LayerUnderTest:
    """A built memory layer and what the checks need to feed it.

    Attributes:
        module: the layer, in float64 and training mode.
        name: the component's name, for messages (``"mylab.layer (chunk_size=7)"``).
        dim: model width ``D`` of its input.
        heads: heads ``H`` (for the queries of ``read``).
    """

    module: nn.Module
    name: str
    dim: int
    heads: int

    def run(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """``module(x, state)``, checking that it returns ``(y [B, T, D], state)``."""
        out = self.module(x, state)
        if not isinstance(out, tuple) or len(out) != 2 or tuple(out[0].shape) != tuple(x.shape):
            _fail(self.name, "forward", f"forward(x {list(x.shape)}, state) must return (y of the "
                                        f"same shape, state), got {type(out).__name__}")
        return out


# -- building ------------------------------------------------------------------------------------
def layer_spec(name: str, registry: ComponentRegistry | None = None, *,
               base: str = "titans.lmm_tiny", chunk_size: int | None = None,
               overrides: Sequence[str] = ()) -> ModelSpec:
    """A spec of ``base`` with the memory layer ``name`` (its parts from ``base``, the Titans parts
    it does not use removed) and, when given, ``memory_layer.chunk_size``."""
    registry = registry or default_registry()
    component = registry.component("memory_layer", name)
    assignments = [f"memory_layer={name}", *(f"{kind}=none" for kind in _PARTS
                                             if kind not in component.uses)]
    if chunk_size is not None:
        assignments.append(f"memory_layer.chunk_size={chunk_size}")
    return override(_preset(base, registry), [*assignments, *overrides], registry)


def _preset(name: str, registry: ComponentRegistry) -> ModelSpec:
    return registry.preset(name).build()


def chunk_sizes(name: str, registry: ComponentRegistry | None = None) -> tuple[int | None, ...]:
    """The chunk sizes a memory layer is checked at: 1, 7 and its default when its config has a
    ``chunk_size`` option, else ``(None,)`` (its only setting)."""
    config_cls = (registry or default_registry()).component("memory_layer", name).config_cls
    field = attrs.fields_dict(config_cls).get("chunk_size")
    if field is None:
        return (None,)
    return tuple(dict.fromkeys((1, 7, field.default)))


def memory_layer(target: str | ModelSpec | nn.Module, registry: ComponentRegistry | None = None, *,
                 chunk_size: int | None = None, dim: int | None = None, heads: int | None = None,
                 layer: int = 0, seed: int = 0) -> LayerUnderTest:
    """Build the memory layer to check, in float64.

    ``target`` is a registered memory layer's name (built in ``titans.lmm_tiny``, see
    :func:`layer_spec`), a preset's name or a spec (its layer ``layer``'s memory layer), or a module
    built by hand (then ``dim`` and ``heads`` are required). Building goes through the registry with
    the layer's :class:`~memforge.BuildContext`, so its parts are the spec's choices, and the
    build-time check of its kind's shapes (:mod:`memforge.conformance`) runs first.
    """
    registry = registry or default_registry()
    if isinstance(target, nn.Module):
        if dim is None or heads is None:
            raise TypeError("memory_layer(module) needs dim= and heads=")
        check_module("memory_layer", target, dim=dim, heads=heads, name=type(target).__name__)
        return LayerUnderTest(copy.deepcopy(target).double().train(), type(target).__name__,
                              dim, heads)
    if isinstance(target, str) and target in registry.names("memory_layer"):
        spec = layer_spec(target, registry, chunk_size=chunk_size)
    else:
        spec = _preset(target, registry) if isinstance(target, str) else target
        if chunk_size is not None:
            spec = override(spec, [f"memory_layer.chunk_size={chunk_size}"], registry)
    choice = spec.choice("memory_layer", layer)
    if choice is None:
        raise ValueError(f"the spec has no memory layer in layer {layer}")
    label = choice.impl + (f" (chunk_size={chunk_size})" if chunk_size is not None else "")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_layer_component(spec, "memory_layer", layer, registry)
    return LayerUnderTest(module.double().train(), label, spec.dim, spec.heads)


def build_part(kind: str, name: str, registry: ComponentRegistry | None = None, *,
               dim: int = 16, heads: int = 2, config: Any = None, seed: int = 0) -> nn.Module:
    """Build component ``name`` of ``kind`` alone (a memory network, an objective) with its
    default config (or ``config``), in float64."""
    component = (registry or default_registry()).component(kind, name)

    def no_parts(part: str) -> nn.Module:
        raise ValueError(f"{name} builds a {part} component; check it inside a memory layer")

    ctx = BuildContext(dim=dim, heads=heads, head_dim=dim // heads, layer_index=0, num_layers=1,
                       vocab_size=2, build=no_parts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = component.factory(config if config is not None else component.config_cls(), ctx)
    check_component(kind, name, module, ctx)  # its kind's shapes first (memforge.conformance)
    return module.double()


# -- comparing -----------------------------------------------------------------------------------
def _fail(component: str, check: str, detail: str) -> None:
    raise ConformanceError(f"{component}: {check}: {detail}")


def _close(component: str, check: str, what: str, got: Tensor, want: Tensor,
           tolerance: float = TOLERANCE) -> None:
    """Fail unless ``got`` equals ``want`` to ``tolerance`` relative to the largest value."""
    got, want = got.detach(), want.detach()
    if got.shape != want.shape:
        _fail(component, check, f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    if not bool(torch.isfinite(got).all()):
        _fail(component, check, f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values")
    diff = (got - want).abs()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > tolerance * scale:
        at = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)]
        _fail(component, check, f"{what} differs by {worst:.3g} at index {at} ({float(got[tuple(at)]):.6g} "
                                f"vs {float(want[tuple(at)]):.6g}; allowed {tolerance * scale:.3g})")


def _tensors(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _clone(tree: Any) -> list[Tensor]:
    return [t.detach().clone() for t in _tensors(tree)]


def _unchanged(component: str, check: str, what: str, before: list[Tensor], tree: Any) -> None:
    after = list(_tensors(tree))
    if len(after) != len(before):
        _fail(component, check, f"{what} changed structure ({len(before)} -> {len(after)} tensors)")
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        if old.shape != new.shape or not torch.equal(old, new.detach()):
            change = float((old - new.detach()).abs().max()) if old.shape == new.shape else "shape"
            _fail(component, check, f"{what}: tensor {i} changed (largest change {change})")


def _inputs(layer: LayerUnderTest, batch: int, length: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, layer.dim, generator=generator, dtype=torch.float64)


def _grads(layer: LayerUnderTest, x: Tensor, run: Callable[[Tensor], Tensor], seed: int
           ) -> tuple[Tensor, list[Tensor | None]]:
    """Gradients of ``<run(x), w>`` (random ``w``) into ``x`` and every parameter."""
    x = x.detach().requires_grad_(True)
    y = run(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=y.dtype)
    params = [p for p in layer.module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * w).sum(), [x, *params], allow_unused=True)
    return grads[0], list(grads[1:])


# -- memory layer checks ---------------------------------------------------------------------------
def check_split(layer: LayerUnderTest, *, length: int = 13, split: int = 5, batch: int = 2,
                seed: int = 0) -> None:
    """Two calls with the state carried (split after ``split`` tokens) equal one call: outputs,
    and gradients into the input and every parameter (through the carried state)."""
    x = _inputs(layer, batch, length, seed)

    def whole(inp: Tensor) -> Tensor:
        return layer.run(inp)[0]

    def pieces(inp: Tensor) -> Tensor:
        first, state = layer.run(inp[:, :split])
        return torch.cat([first, layer.run(inp[:, split:], state)[0]], 1)

    check = f"split at {split} of {length} tokens"
    _close(layer.name, check, "output", pieces(x), whole(x))
    (gx_whole, gp_whole), (gx_split, gp_split) = _grads(layer, x, whole, seed), _grads(
        layer, x, pieces, seed)
    _close(layer.name, check, "gradient into the input", gx_split, gx_whole)
    names = [n for n, p in layer.module.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, gp_split, gp_whole, strict=True):
        if (got is None) != (want is None):
            _fail(layer.name, check, f"parameter {name} gets a gradient only in one of the runs")
        if got is not None:
            _close(layer.name, check, f"gradient into {name}", got, want)


def check_causal(layer: LayerUnderTest, *, length: int = 13, position: int = 6, batch: int = 2,
                 seed: int = 0) -> None:
    """Changing token ``position`` changes no output before it."""
    x = _inputs(layer, batch, length, seed)
    changed = x.clone()
    changed[:, position:] += 1.0 + _inputs(layer, batch, length - position, seed + 7)
    with torch.no_grad():
        y, y_changed = layer.run(x)[0], layer.run(changed)[0]
    _close(layer.name, f"causality (tokens from {position} of {length} changed)",
           f"output before token {position}", y_changed[:, :position], y[:, :position])


def check_batch_independent(layer: LayerUnderTest, *, length: int = 13, batch: int = 3,
                            seed: int = 0) -> None:
    """Each sequence of a batch gives what it gives alone (with its state carried, too)."""
    x = _inputs(layer, batch, length, seed)
    cut = length // 2
    with torch.no_grad():
        first, state = layer.run(x[:, :cut])
        together = torch.cat([first, layer.run(x[:, cut:], state)[0]], 1)
        for row in range(batch):
            one, one_state = layer.run(x[row : row + 1, :cut])
            alone = torch.cat([one, layer.run(x[row : row + 1, cut:], one_state)[0]], 1)
            _close(layer.name, f"batch independence (sequence {row} of {batch}, {length} tokens)",
                   "output alone vs in the batch", alone, together[row : row + 1])


def check_finite_gradients(layer: LayerUnderTest, *, length: int | None = None, batch: int = 2,
                           seed: int = 0) -> None:
    """Outputs are finite, and so are the gradients, which reach every parameter.

    ``length`` defaults to two chunks and a token (at least 13), so that a chunked layer's
    write of one chunk reaches the reads of the next (within its first chunk a layer that reads
    the chunk-start memory cannot depend on its write gates).
    """
    length = length or max(13, 2 * layer.module.chunk_size + 1)
    x = _inputs(layer, batch, length, seed)
    y = layer.run(x)[0]
    if not bool(torch.isfinite(y).all()):
        _fail(layer.name, "finite outputs", f"{int((~torch.isfinite(y)).sum())} of {y.numel()} "
                                            f"outputs are not finite ({length} tokens)")
    gx, grads = _grads(layer, x, lambda inp: layer.run(inp)[0], seed)
    names = [n for n, p in layer.module.named_parameters() if p.requires_grad]
    unreached = [n for n, g in zip(names, grads, strict=True) if g is None]
    if unreached:
        _fail(layer.name, "gradients", f"{len(unreached)} of {len(names)} parameters get no "
                                       f"gradient: {', '.join(unreached)}")
    for name, grad in [("the input", gx), *zip(names, grads, strict=True)]:
        if not bool(torch.isfinite(grad).all()):
            _fail(layer.name, "gradients", f"the gradient into {name} has "
                                           f"{int((~torch.isfinite(grad)).sum())} non-finite values")


def check_read_pure(layer: LayerUnderTest, *, length: int = 13, batch: int = 2,
                    seed: int = 0) -> None:
    """``read_state`` and ``read`` (:class:`~memforge.interfaces.ReadsMemory`) write nothing: the
    state and the snapshot are unchanged, and repeated reads are equal."""
    module, check = layer.module, "ReadsMemory is pure"
    x = _inputs(layer, batch, length, seed)
    with torch.no_grad():
        _, state = layer.run(x)
        before = _clone(state)
        for start in (None, state):
            snapshot = module.read_state(start, batch)
            _unchanged(layer.name, check, "the state after read_state", before, state)
            again = module.read_state(start, batch)
            kept = _clone(snapshot)
            for i, (a, b) in enumerate(zip(_tensors(snapshot), _tensors(again), strict=True)):
                _close(layer.name, check, f"read_state twice, tensor {i}", a, b)
            queries = torch.randn(batch, layer.heads, 5, layer.dim // layer.heads,
                                  generator=torch.Generator().manual_seed(seed + 3),
                                  dtype=torch.float64)
            read = module.read(queries, snapshot)
            _close(layer.name, check, "read twice", module.read(queries, snapshot), read)
            _unchanged(layer.name, check, "the snapshot after read", kept, snapshot)
            _unchanged(layer.name, check, "the state after read", before, state)


def check_static_decode(layer: LayerUnderTest, *, prefix: int = 3, steps: int = 9, batch: int = 2,
                        seed: int = 0) -> None:
    """Fixed-shape decoding (:class:`~memforge.interfaces.DecodesMemoryStatically`) after
    ``prefix`` tokens equals ``forward`` token by token for ``steps`` more, and leaves the state
    it started from unchanged."""
    module, check = layer.module, f"static decoding ({prefix} tokens, then {steps} steps)"
    x = _inputs(layer, batch, prefix + steps, seed)
    with torch.no_grad():
        _, state = layer.run(x[:, :prefix])
        before = _clone(state)
        buffers = module.static_decode_buffers(state, batch)
        phase = module.static_decode_phase(state)
        if not 0 <= phase < module.chunk_size:
            _fail(layer.name, check, f"static_decode_phase is {phase}, expected 0 <= phase < "
                                     f"chunk_size={module.chunk_size}")
        for t in range(prefix, prefix + steps):
            completes = (phase + 1) % module.chunk_size == 0
            got = module.static_decode_step(x[:, t : t + 1], buffers, completes)
            want, state_next = layer.run(x[:, t : t + 1], state)
            if t == prefix:
                _unchanged(layer.name, check, "the state the buffers were made from", before, state)
            _close(layer.name, check, f"step {t - prefix} (token {t})", got, want)
            state, phase = state_next, (phase + 1) % module.chunk_size


def check_reference(layer: LayerUnderTest, reference: Reference | None = None, *, length: int = 13,
                    split: int = 5, batch: int = 2, seed: int = 0) -> None:
    """The layer agrees with its slow reference in float64: outputs (whole, and the second piece
    after a carried state) and gradients into every parameter."""
    reference = reference or _own_reference(layer.module)
    if reference is None:
        _fail(layer.name, "reference", "no reference: give the layer a reference_forward(x, state) "
                                       "method or pass reference=")
    check = f"against the reference ({length} tokens)"
    x = _inputs(layer, batch, length, seed)
    _close(layer.name, check, "output", layer.run(x)[0].detach(),
           reference(layer.module, x, None)[0].detach())
    with torch.no_grad():
        _, state = layer.run(x[:, :split])
        _close(layer.name, check, f"output after a state carried from token {split}",
               layer.run(x[:, split:], state)[0], reference(layer.module, x[:, split:], state)[0])
    _, fast = _grads(layer, x, lambda inp: layer.run(inp)[0], seed)
    _, slow = _grads(layer, x, lambda inp: reference(layer.module, inp, None)[0], seed)
    names = [n for n, p in layer.module.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, fast, slow, strict=True):
        if got is not None and want is None:
            _fail(layer.name, check, f"the reference gives no gradient into {name}, the fast path "
                                     f"does; let gradients flow through the reference (no "
                                     f".detach() or torch.no_grad() on its parameters)")
        if got is None and want is not None:
            _fail(layer.name, check, f"the fast path gives no gradient into {name}, the reference "
                                     f"does")
        if got is not None and want is not None:
            _close(layer.name, check, f"gradient into {name}", got, want)


def _own_reference(module: nn.Module) -> Reference | None:
    method = getattr(module, "reference_forward", None)
    return None if method is None else (lambda _layer, x, state: method(x, state))


def capabilities(layer: LayerUnderTest, reference: Reference | None = None) -> dict[str, bool]:
    """Which optional checks apply: ``read`` (ReadsMemory), ``static_decode``
    (DecodesMemoryStatically), ``reference`` (a reference given or a ``reference_forward``)."""
    return {"read": isinstance(layer.module, ReadsMemory),
            "static_decode": isinstance(layer.module, DecodesMemoryStatically),
            "reference": reference is not None or _own_reference(layer.module) is not None}


#: The (length, split) pairs :func:`check_memory_layer` runs: odd lengths, splits next to the ends too.
GRID: tuple[tuple[int, int], ...] = ((3, 1), (7, 3), (13, 1), (13, 7), (17, 16))


def check_memory_layer(target: str | ModelSpec | nn.Module, registry: ComponentRegistry | None = None,
                       *, reference: Reference | None = None, chunk_size: int | None = None,
                       dim: int | None = None, heads: int | None = None) -> list[str]:
    """Run every check that applies to a memory layer on :data:`GRID`; return the checks run.

    ``target``, ``chunk_size``, ``dim`` and ``heads`` as for :func:`memory_layer`. A registered
    layer's name without ``chunk_size`` is checked at every size of :func:`chunk_sizes`.
    """
    registry = registry or default_registry()
    sizes: Sequence[int | None] = (chunk_sizes(target, registry)
                                   if chunk_size is None and isinstance(target, str)
                                   and target in registry.names("memory_layer") else (chunk_size,))
    ran: list[str] = []
    for size in sizes:
        layer = memory_layer(target, registry, chunk_size=size, dim=dim, heads=heads)
        can = capabilities(layer, reference)
        for length, split in GRID:
            check_split(layer, length=length, split=split)
            check_causal(layer, length=length, position=split)
        check_batch_independent(layer)
        check_finite_gradients(layer)
        ran += [f"{layer.name}: split", f"{layer.name}: causal", f"{layer.name}: batch",
                f"{layer.name}: gradients"]
        if can["read"]:
            check_read_pure(layer)
            ran.append(f"{layer.name}: read")
        if can["static_decode"]:
            check_static_decode(layer)
            ran.append(f"{layer.name}: static_decode")
        if can["reference"]:
            for length, split in GRID[1:]:
                check_reference(layer, reference, length=length, split=split)
            ran.append(f"{layer.name}: reference")
    return ran


# -- memory networks and objectives -----------------------------------------------------------------
def check_memory_network(module: nn.Module, *, name: str, heads: int, head_dim: int,
                         tokens: int = 5, batch: int = 2, seed: int = 0) -> bool:
    """A memory network's backward, in float64, for weights perturbed away from the initial ones.

    With a hand-written ``backward``: every token's gradient into every matrix, and the outer
    gradients through those (into the weights, the input and the back-propagated error), equal the
    ones of the backward autograd derives (:mod:`memforge.engine.derived_backward`) to
    :data:`BACKWARD_TOLERANCE`. Without one: autograd can derive it (the network applies every
    matrix once through ``linear`` and reads no fast weight otherwise). Returns whether a
    hand-written backward was compared.
    """
    module = copy.deepcopy(module).double()
    if not callable(getattr(module, "backward", None)):
        problem = derivability_problem(module)
        if problem is not None:
            _fail(name, "derived backward", problem)
        return False
    check = f"backward against autograd ({tokens} tokens)"
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    weights = [(w.detach().double().repeat(batch, 1, 1)
                + 0.3 * draw(batch * w.shape[0], *w.shape[1:])).requires_grad_(True)
               for w in module.initial_weights()]
    x = draw(batch * heads, tokens, head_dim).requires_grad_(True)
    grad_out = draw(batch * heads, tokens, weights[-1].shape[2]).requires_grad_(True)
    probes = [draw(batch * heads, tokens, w.shape[1], w.shape[2]) for w in weights]

    def run(network: Any) -> tuple[list[Tensor], list[Tensor]]:
        """Every token's gradient into every weight, and the gradients of a random scalar of them
        into the weights, the input and the error (the outer gradients)."""
        _, tape = network.forward(x, lambda i, h: torch.bmm(h, weights[i]))
        pairs = network.backward(tape, grad_out, lambda i, g: torch.bmm(g, weights[i].mT))
        if len(pairs) != len(weights):
            _fail(name, check, f"backward returned {len(pairs)} pairs for {len(weights)} weights")
        per_token = [inputs[..., :, None] * grads[..., None, :] for inputs, grads in pairs]
        scalar = sum((g * p).sum() for g, p in zip(per_token, probes, strict=True))
        if not scalar.requires_grad:
            _fail(name, check, "backward's result takes no outer gradient (it is detached from "
                               "the weights, the input and the error); build it from "
                               "differentiable torch ops")
        outer = torch.autograd.grad(scalar, [*weights, x, grad_out], allow_unused=True,
                                    materialize_grads=True)
        return per_token, list(outer)

    (got, got_outer), (want, want_outer) = run(module), run(DerivedBackward(module))
    for t in range(tokens):
        for i, (mine, derived) in enumerate(zip(got, want, strict=True)):
            _close(name, check, f"token {t}'s gradient into weight {i}", mine[:, t], derived[:, t],
                   BACKWARD_TOLERANCE)
    targets = [f"weight {i}" for i in range(len(weights))] + ["the input", "the error"]
    for target, mine, derived in zip(targets, got_outer, want_outer, strict=True):
        _close(name, check, f"the outer gradient into {target} through backward (build it from "
                            f"differentiable torch ops)", mine, derived, BACKWARD_TOLERANCE)
    return True


def check_objective(module: nn.Module, *, name: str, heads: int, head_dim: int,
                    tokens: int = 5, batch: int = 2, seed: int = 0) -> None:
    """An objective's ``loss_grad`` equals autograd of its ``loss`` in float64, token by token,
    with its own per-token side input (``forward`` of random layer inputs of width
    ``heads * head_dim``) when it has one."""
    module = copy.deepcopy(module).double()
    check = f"loss_grad against autograd of loss ({tokens} tokens)"
    generator = torch.Generator().manual_seed(seed)
    prediction, target = (torch.randn(batch * heads, tokens, head_dim, generator=generator,
                                      dtype=torch.float64) for _ in range(2))
    x = torch.randn(batch, tokens, heads * head_dim, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        side = module(x).side
    if side is not None:
        if tuple(side.shape) != (batch, tokens, heads):
            _fail(name, check, f"forward(x).side has shape {list(side.shape)}, expected "
                               f"{[batch, tokens, heads]}")
        side = side.permute(0, 2, 1).flatten(0, 1)  # [B, T, H] -> the kernels' [B * H, T]
    prediction.requires_grad_(True)
    loss = module.loss(prediction, target, side)
    if tuple(loss.shape) != (batch * heads, tokens):
        _fail(name, check, f"loss has shape {list(loss.shape)}, expected "
                           f"{[batch * heads, tokens]} (one per token)")
    (want,) = torch.autograd.grad(loss.sum(), prediction)
    _close(name, check, "loss_grad", module.loss_grad(prediction.detach(), target, side), want)


def check_gram_factor(module: nn.Module, *, name: str, size: int = 4, batch: int = 3,
                      seed: int = 0) -> bool:
    """An optimiser's ``gram_factor`` (:class:`memforge.FactorsThroughGram`) agrees with its
    ``transform`` in float64: ``transform(S)`` equals ``gram_factor(X X^T) @ X`` for the wide
    orientation ``X`` of ``S``, in value and in the gradient into ``S``, on random square, wide and
    tall updates with two batch dimensions (the sequential executor runs one where the reference
    runs the other). Returns whether the module declares it."""
    if not isinstance(module, FactorsThroughGram):
        return False
    if not callable(getattr(module, "transform", None)) or getattr(module, "applies_at", None) != "token":
        _fail(name, "gram_factor", "a gram_factor stands for a per-token transform: give the "
                                   "optimiser transform(update) and applies_at = 'token'")
    module = copy.deepcopy(module).double()
    generator = torch.Generator().manual_seed(seed)
    for rows, cols in ((size, size), (size, 2 * size + 1), (2 * size + 1, size)):
        check = f"gram_factor against transform ({rows} x {cols} update)"
        update = torch.randn(batch, 2, rows, cols, generator=generator, dtype=torch.float64)
        probe = torch.randn(update.shape, generator=generator, dtype=torch.float64)
        update.requires_grad_(True)
        tall = rows > cols
        wide = update.mT if tall else update
        factored = module.gram_factor(wide @ wide.mT) @ wide
        factored = factored.mT if tall else factored
        direct = module.transform(update)
        _close(name, check, "gram_factor(X X^T) @ X", factored, direct)
        (mine,) = torch.autograd.grad((factored * probe).sum(), update)
        (want,) = torch.autograd.grad((direct * probe).sum(), update)
        _close(name, check, "the gradient into the update through gram_factor", mine, want,
               BACKWARD_TOLERANCE)
    return True


# -- the pytest suite ------------------------------------------------------------------------------
def _examples() -> int:
    return int(os.environ.get("MEMFORGE_CONFORMANCE_EXAMPLES", "3"))


def _drawn(test: Callable[..., None]) -> Callable[..., None]:
    """``test(self, layer, length, split)`` drawn by hypothesis: odd lengths from 3 to 27, a split
    point strictly inside; ``self.examples`` examples on one layer per chunk size."""

    @st.composite
    def cases(draw: st.DrawFn) -> tuple[int, int]:
        length = 2 * draw(st.integers(1, 12)) + 1
        return length, draw(st.integers(1, length - 1))

    def run(self: MemoryLayerConformance, chunk_size: int | None) -> None:
        layer = self.layer(chunk_size)

        @settings(max_examples=self.examples, deadline=None, derandomize=True, database=None)
        @given(case=cases())
        def drawn(case: tuple[int, int]) -> None:
            test(self, layer, *case)

        drawn()

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


class MemoryLayerConformance:
    """Base class of a pytest suite for one memory layer: subclass it in a test module.

    ::

        from memforge.testing.conformance import MemoryLayerConformance

        class TestMyLayer(MemoryLayerConformance):
            component = "mylab.layer"        # its registered name (built in titans.lmm_tiny)
            # preset = "mylab.layer_lmm_tiny"  (or build it in a preset of yours)
            # registry = <a registry with your plugin>; default: memforge's, with your
            #            installed plugin found through its entry point
            # reference = staticmethod(my_reference)  # else the layer's reference_forward

    Every test runs at each of :func:`chunk_sizes`; the split, causality and reference tests draw
    ``examples`` odd lengths and split points with hypothesis. Tests of a capability the layer
    lacks are skipped, saying so.
    """

    component: str = ""
    preset: str | None = None
    registry: ComponentRegistry | None = None
    reference: Reference | None = None
    examples: int = _examples()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "chunk_size" in metafunc.fixturenames:
            sizes = chunk_sizes(self._component(), self.registry)
            metafunc.parametrize("chunk_size", sizes,
                                 ids=["default" if s is None else f"chunk{s}" for s in sizes])

    def _component(self) -> str:
        """``component``, or the registered name of the memory layer ``preset`` builds."""
        if self.component:
            return self.component
        if not self.preset:
            raise TypeError(f"{type(self).__name__} sets neither component nor preset; set one")
        choice = _preset(self.preset, self.registry or default_registry()).choice("memory_layer", 0)
        if choice is None:
            raise ValueError(f"preset {self.preset} has no memory layer in layer 0")
        return choice.impl

    def layer(self, chunk_size: int | None) -> LayerUnderTest:
        """The layer under test, built afresh (float64)."""
        return memory_layer(self.preset or self.component, self.registry, chunk_size=chunk_size)

    def _reference(self) -> Reference | None:
        return type(self).reference  # a function on the class, not bound to the instance

    def _can(self, layer: LayerUnderTest, what: str) -> None:
        if not capabilities(layer, self._reference())[what]:
            pytest.skip(f"{layer.name} has no {what} capability")

    @_drawn
    def test_split_equals_whole(self, layer: LayerUnderTest, length: int, split: int) -> None:
        """State carried across a split anywhere equals one call (outputs and gradients)."""
        check_split(layer, length=length, split=split)

    @_drawn
    def test_causal(self, layer: LayerUnderTest, length: int, split: int) -> None:
        """Later tokens never change earlier outputs."""
        check_causal(layer, length=length, position=split)

    @_drawn
    def test_reference(self, layer: LayerUnderTest, length: int, split: int) -> None:
        """The fast path equals the slow reference in float64."""
        self._can(layer, "reference")
        check_reference(layer, self._reference(), length=length, split=split)

    def test_batch_independent(self, chunk_size: int | None) -> None:
        """Each sequence gives what it gives alone."""
        check_batch_independent(self.layer(chunk_size))

    def test_finite_gradients(self, chunk_size: int | None) -> None:
        """Finite outputs; finite gradients into every parameter."""
        check_finite_gradients(self.layer(chunk_size))

    def test_read_is_pure(self, chunk_size: int | None) -> None:
        """ReadsMemory writes nothing; repeated reads are equal."""
        layer = self.layer(chunk_size)
        self._can(layer, "read")
        check_read_pure(layer)

    def test_static_decode_equals_forward(self, chunk_size: int | None) -> None:
        """DecodesMemoryStatically equals forward token by token."""
        layer = self.layer(chunk_size)
        self._can(layer, "static_decode")
        check_static_decode(layer)


__all__ = [
    "BACKWARD_TOLERANCE", "GRID", "TOLERANCE", "ConformanceError", "LayerUnderTest", "MemoryLayerConformance",
    "Reference", "build_part", "capabilities", "check_batch_independent", "check_causal",
    "check_finite_gradients", "check_gram_factor", "check_memory_layer", "check_memory_network",
    "check_objective", "check_read_pure", "check_reference", "check_split", "check_static_decode",
    "chunk_sizes", "layer_spec", "memory_layer",
]
