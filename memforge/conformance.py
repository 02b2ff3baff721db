"""Build-time checks that a component behaves like its kind, not merely that it has a ``forward``.

The kinds' Protocols (:mod:`memforge.interfaces`) are structural: ``isinstance(nn.Identity(),
FeedForward)`` holds, and so does it for most kinds, since they only name ``forward``.
So :func:`check_component` calls the component once on a tiny input of the right shape (one
sequence of two tokens) and checks the declared methods and the shapes of what comes back. A
factory that returns the wrong thing then fails when the model is built, with an error naming the
component and the contract, instead of an ``AttributeError`` or a shape error at the first forward.

The call runs in evaluation mode, without gradients and with the CPU random state restored
afterwards, so it changes neither the module (no dropout or running statistics update) nor the
random stream that initialises the rest of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from memforge.engine.derived_backward import derivability_problem
from memforge.errors import SpecError
from memforge.interfaces import READS, BuildContext, retrieval_reads
from memforge.registry import with_article

#: Where a declared ``applies_at`` of an update transform or weight projection may apply.
_APPLIES_AT = ("token", "chunk_end")

#: What each kind must do, for error messages (the Protocol in :mod:`memforge.interfaces`).
CONTRACTS: dict[str, tuple[str, str]] = {
    "memory": ("MemoryNetwork", "offer initial_weights() -> [H, d_in, d_out] matrices and "
                                "forward(x, linear) -> (y, tape), and optionally "
                                "backward(tape, grad, linear_t)"),
    "objective": ("Objective", "offer loss(pred, target, side), loss_grad(pred, target, side) "
                               "and forward(x [B, T, D]) -> ObjectiveInputs(side, window), each "
                               "[B, T, H] or None"),
    "optimizer": ("Optimizer", "map x [B, T, D] to StepGates(lr [B, T, H], momentum [B, T, H] "
                               "or None)"),
    "retention": ("Retention", "map x [B, T, D] to log_keep [B, T, H] (<= 0) or None"),
    "retrieval": ("RetrievalRule", "map (reader, queries [N, t, d]) to a read-out [N, t, d]"),
    "projection": ("Projection", "map (x [B, T, D], cache) to (q, k, v [B, H, T, d], cache)"),
    "attention": ("Attention", "map (x [B, T, D], cache) to (y [B, T, D], cache)"),
    "feedforward": ("FeedForward", "map x [B, T, D] to y [B, T, D]"),
    "memory_layer": ("MemoryLayer", "map (x [B, T, D], state) to (y [B, T, D], state) and have "
                                    "an int chunk_size >= 1"),
    "integration": ("Block", "map (hidden [B, T, D], state) to (hidden [B, T, D], state)"),
}

#: Tokens in the check input: two, so a component that mixes positions is exercised.
_STEPS = 2


class _Mismatch(Exception):
    """A component returned something of the wrong kind (the message says what)."""


def _shape(value: Any) -> str:
    if isinstance(value, Tensor):
        return "[" + ", ".join(str(s) for s in value.shape) + "]"
    return type(value).__name__


def _expect(value: Any, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(value, Tensor):
        raise _Mismatch(f"{what} is a {type(value).__name__}, not a tensor of shape {list(shape)}")
    if tuple(value.shape) != shape:
        raise _Mismatch(f"{what} has shape {_shape(value)}, expected {list(shape)}")


def _methods(module: nn.Module, names: Sequence[str]) -> None:
    missing = [name for name in names if not callable(getattr(module, name, None))]
    if missing:
        raise _Mismatch(f"it has no {', '.join(f'{m}()' for m in missing)}")


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise _Mismatch(f"{what} returned {type(value).__name__}, expected a pair "
                        f"(output, state/cache)")
    return value


class _IdentityReader:
    """A reader offering only the ``reads`` a retrieval rule declares (see
    :func:`memforge.interfaces.retrieval_reads`), each returning the queries: a rule that calls
    a read it did not declare fails here, not inside a kernel that lacks it."""

    def __init__(self, reads: frozenset[str]) -> None:
        for name in reads:
            setattr(self, name, self._read)

    @staticmethod
    def _read(queries: Tensor) -> Tensor:
        return queries.clone()


def _memory(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    _methods(module, ("initial_weights", "forward"))
    weights = list(module.initial_weights())
    if not weights or not all(isinstance(w, Tensor) and w.ndim == 3 for w in weights):
        raise _Mismatch(f"initial_weights() returned {[_shape(w) for w in weights]}, expected "
                        f"one or more [H, d_in, d_out] tensors")
    first, last = weights[0], weights[-1]
    # The first matrix may be wider than d: a network that lifts its keys first (a feature map,
    # atlas.poly_mlp) reads d-wide keys through a wider matrix; forward() below checks the keys.
    if first.shape[0] != ctx.heads or last.shape[2] != ctx.head_dim:
        raise _Mismatch(f"initial_weights() gives matrices {[_shape(w) for w in weights]}; they "
                        f"must hold H={ctx.heads} heads and the last write [..., d={ctx.head_dim}] "
                        f"values")
    x = like.new_ones(ctx.heads, _STEPS, ctx.head_dim)

    def linear(i: int, h: Tensor) -> Tensor:
        return torch.bmm(h, weights[i])

    def linear_transposed(i: int, g: Tensor) -> Tensor:
        return torch.bmm(g, weights[i].transpose(1, 2))

    y, tape = _pair(module(x, linear), "forward(x, linear)")
    _expect(y, (ctx.heads, _STEPS, ctx.head_dim), "forward's output")
    if not callable(getattr(module, "backward", None)):  # autograd derives it, if it can
        problem = derivability_problem(module)
        if problem is not None:
            raise _Mismatch(problem)
        return
    grads = module.backward(tape, torch.ones_like(y), linear_transposed)
    if not isinstance(grads, Sequence) or len(grads) != len(weights):
        raise _Mismatch(f"backward() returned {type(grads).__name__}, expected a list of "
                        f"{len(weights)} (inputs, grads) pairs, one per weight matrix")
    for i, (pair, weight) in enumerate(zip(grads, weights, strict=True)):
        inputs, grad = _pair(tuple(pair), f"backward()[{i}]")
        _expect(inputs, (ctx.heads, _STEPS, weight.shape[1]), f"backward()[{i}]'s inputs")
        _expect(grad, (ctx.heads, _STEPS, weight.shape[2]), f"backward()[{i}]'s grads")


def _flag(module: nn.Module, name: str, check: Callable[[Any], bool], expected: str) -> None:
    """A declared capability attribute (``window``, ``squared_error``, ...) has a usable value."""
    if hasattr(type(module), name) or hasattr(module, name):
        value = getattr(module, name)
        if not check(value):
            raise _Mismatch(f"its {name} is {value!r}, expected {expected}")


def _per_head(value: Any, ctx: BuildContext, what: str) -> Tensor | None:
    """``value`` checked to be ``None`` or ``[1, T, H]``; returned in the kernels' ``[H, T]``."""
    if value is None:
        return None
    _expect(value, (1, _STEPS, ctx.heads), what)
    return value[0].t()


def _objective(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    _methods(module, ("loss", "loss_grad", "forward"))
    _flag(module, "window", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "an int >= 1 (pairs per step)")
    _flag(module, "squared_error", lambda v: isinstance(v, bool), "True or False")
    inputs = module(like)
    if not hasattr(inputs, "side") or not hasattr(inputs, "window"):
        raise _Mismatch(f"forward(x) returned {type(inputs).__name__}, expected "
                        f"ObjectiveInputs(side, window)")
    side = _per_head(inputs.side, ctx, "forward(x).side")
    _per_head(inputs.window, ctx, "forward(x).window")
    prediction = like.new_ones(ctx.heads, _STEPS, ctx.head_dim)
    target = prediction * 0.5
    _expect(module.loss(prediction, target, side), (ctx.heads, _STEPS), "loss(pred, target, side)")
    _expect(module.loss_grad(prediction, target, side), tuple(prediction.shape),
            "loss_grad(pred, target, side)")


def _optimizer(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    gates = module(like)
    if not hasattr(gates, "lr") or not hasattr(gates, "momentum"):
        raise _Mismatch(f"forward(x) returned {type(gates).__name__}, expected "
                        f"StepGates(lr, momentum)")
    _expect(gates.lr, (1, _STEPS, ctx.heads), "forward(x).lr")
    _per_head(gates.momentum, ctx, "forward(x).momentum")
    if callable(getattr(module, "transform", None)):  # TransformsUpdate
        _flag(module, "applies_at", lambda v: v in _APPLIES_AT, f"one of {list(_APPLIES_AT)}")
        update = like.new_ones(ctx.heads, ctx.head_dim, ctx.head_dim)
        _expect(module.transform(update), tuple(update.shape), "transform(update)")
    if callable(getattr(module, "gram_factor", None)):  # FactorsThroughGram
        if getattr(module, "applies_at", None) != "token":
            raise _Mismatch("it has gram_factor, which stands for a per-token transform, but "
                            "not transform(update) with applies_at = 'token'")
        gram = like.new_ones(ctx.heads, 2, ctx.head_dim, ctx.head_dim)
        _expect(module.gram_factor(gram), tuple(gram.shape), "gram_factor(gram)")


def _retention(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    _flag(module, "decay_before_gradient", lambda v: isinstance(v, bool), "True or False")
    log_keep = module(like)
    if log_keep is not None:
        _expect(log_keep, (1, _STEPS, ctx.heads), "forward(x)")
        if not bool((log_keep <= 0).all()):
            raise _Mismatch(f"forward(x) has log_keep up to {float(log_keep.max()):.3g}; it is "
                            f"the log of the fraction of the state kept, so <= 0")
    if callable(getattr(module, "project", None)):  # ProjectsWeights
        _flag(module, "applies_at", lambda v: v in _APPLIES_AT, f"one of {list(_APPLIES_AT)}")
        _flag(module, "mirror", lambda v: isinstance(v, bool), "True or False")
        weights = (like.new_ones(ctx.heads, ctx.head_dim, ctx.head_dim),)
        projected = module.project(weights, weights)
        if not isinstance(projected, Sequence) or len(projected) != 1:
            raise _Mismatch(f"project(weights, initial) returned {type(projected).__name__}, "
                            f"expected a tuple of one tensor per weight matrix")
        _expect(projected[0], tuple(weights[0].shape), "project(weights, initial)[0]")
        initial_dual = getattr(module, "initial_dual", None)
        if initial_dual is not None:
            if not callable(initial_dual):
                raise _Mismatch(f"its initial_dual is {type(initial_dual).__name__}, expected a "
                                f"method initial_dual(weights)")
            if not module.mirror:
                raise _Mismatch("it has initial_dual but is not a mirror map; initial_dual is a "
                                "method of projections with mirror = True")
            dual = initial_dual(weights)
            if not isinstance(dual, Sequence) or len(dual) != 1:
                raise _Mismatch(f"initial_dual(weights) returned {type(dual).__name__}, expected "
                                f"a tuple of one tensor per weight matrix")
            _expect(dual[0], tuple(weights[0].shape), "initial_dual(weights)[0]")


def _retrieval(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    flag = getattr(type(module), "reads_within_chunk", True)
    if not isinstance(flag, bool):
        raise _Mismatch(f"its reads_within_chunk is {flag!r}, expected True or False")
    queries = like.new_ones(ctx.heads, _STEPS, ctx.head_dim)
    reads = retrieval_reads(module)
    if not reads <= set(READS):
        raise _Mismatch(f"its reads {sorted(reads)} name no ChunkReader read; expected some of "
                        f"{list(READS)}")
    _expect(module(_IdentityReader(reads), queries), tuple(queries.shape),
            "forward(reader, queries)")


def _projection(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    out = module(like, None)
    if not isinstance(out, tuple) or len(out) != 4:
        raise _Mismatch(f"forward(x, None) returned {type(out).__name__}, expected (q, k, v, cache)")
    for name, value in zip("qkv", out[:3], strict=True):
        _expect(value, (1, ctx.heads, _STEPS, ctx.head_dim), f"forward(x, None)'s {name}")


def _mixer(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    y, _ = _pair(module(like, None), "forward(x, None)")
    _expect(y, tuple(like.shape), "forward(x, None)'s output")


def _memory_layer(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    chunk = getattr(module, "chunk_size", None)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise _Mismatch(f"its chunk_size is {chunk!r}, expected an int >= 1 (1 for a "
                        f"token-recurrent layer)")
    _mixer(module, ctx, like)


def _feedforward(module: nn.Module, ctx: BuildContext, like: Tensor) -> None:
    _expect(module(like), tuple(like.shape), "forward(x)")


_CHECKS: dict[str, Callable[[nn.Module, BuildContext, Tensor], None]] = {
    "memory": _memory,
    "objective": _objective,
    "optimizer": _optimizer,
    "retention": _retention,
    "retrieval": _retrieval,
    "projection": _projection,
    "attention": _mixer,
    "feedforward": _feedforward,
    "memory_layer": _memory_layer,
    "integration": _mixer,
}


def _example_input(module: nn.Module, dim: int, device: torch.device | None) -> Tensor:
    """``[1, 2, dim]`` distinct, moderate values on the module's device and in its dtype (a
    module without parameters: float32 on ``device``, default the CPU)."""
    tensor = next(iter(module.parameters()), None)
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    device = tensor.device if tensor is not None else torch.device(device or "cpu")
    values = torch.linspace(-1.0, 1.0, _STEPS * dim, dtype=torch.float64).sin()
    return values.reshape(1, _STEPS, dim).to(device=device, dtype=dtype)


def check_component(kind: str, impl: str, module: Any, ctx: BuildContext,
                    device: torch.device | str | None = None) -> None:
    """Raise :class:`SpecError` unless ``module`` behaves like a ``kind`` component.

    Args:
        kind: the kind the module was built for.
        impl: the registered name of its component, for the message.
        module: what the factory returned.
        ctx: the context it was built in (widths and heads of the check input).
        device: where a module without parameters is called (default the CPU); a module with
            parameters is called where they are, in their dtype.
    """
    protocol, contract = CONTRACTS.get(kind, ("", "be a torch.nn.Module"))
    where = f"{kind} {impl!r} (layer {ctx.layer_index})"
    fix = (f"{with_article(kind)} component must {contract}"
           + (f" (memforge.interfaces.{protocol})" if protocol else "")
           + f"; fix the factory of {impl!r}")
    if not isinstance(module, nn.Module):
        raise SpecError(f"{where}: the factory returned {type(module).__name__}, not a "
                        f"torch.nn.Module; {fix}")
    if kind not in _CHECKS:
        return  # a kind without a behavioural contract here: being a module is all it promises
    if torch.get_default_device().type == "meta" or any(
            p.device.type == "meta" for p in module.parameters()):
        return  # no values to compute with (the size estimate builds on the meta device)
    modes = {sub: sub.training for sub in module.modules()}
    try:
        example = _example_input(module, ctx.dim, torch.device(device) if device else None)
        accelerators = ([example.device.index if example.device.index is not None
                         else torch.cuda.current_device()] if example.device.type == "cuda" else [])
        with torch.random.fork_rng(devices=accelerators), torch.no_grad():
            module.eval()
            _CHECKS[kind](module, ctx, example)
    except _Mismatch as exc:
        raise SpecError(f"{where}: {type(module).__name__} is not {with_article(kind)} component: "
                        f"{exc}; {fix}") from None
    except Exception as exc:  # the plugin's own code failed on a well-formed input
        detail = " ".join(str(exc).split())[:300]
        raise SpecError(f"{where}: {type(module).__name__} failed on a well-formed input "
                        f"(x [1, {_STEPS}, {ctx.dim}]): {type(exc).__name__}: {detail}; "
                        f"{fix}") from None
    finally:
        for sub, training in modes.items():
            sub.training = training


def check_module(kind: str, module: Any, *, dim: int, heads: int, name: str = "module") -> None:
    """:func:`check_component` for a module built by hand (in a plugin's tests, say).

    ``dim`` and ``heads`` are the model width and head count it was built for; ``name`` appears
    in the message.
    """
    ctx = BuildContext(dim=dim, heads=heads, head_dim=dim // heads, layer_index=0, num_layers=1,
                       vocab_size=2, build=_no_build)
    check_component(kind, name, module, ctx)


def _no_build(kind: str) -> nn.Module:
    raise SpecError(f"check_module cannot build {with_article(kind)} component; build the module whole first")
