"""Memory networks without a hand-written backward: the backward derived by autograd
(docs/plugins.md, "Writing a memory network").

The kernels need, for every fast-weight matrix ``i``, the pair ``(inputs_i, grads_i)`` of
:meth:`memforge.interfaces.MemoryNetwork.backward`: what the matrix was applied to and the error
back-propagated to its output, per token. A network that applies every matrix exactly once
through the ``linear`` callback has both at hand: the callback sees each matrix's input, and
``torch.autograd.grad`` of the output with respect to each matrix's output gives the error, for
all matrices in one call. So a plugin author writes ``forward`` only; a hand-written ``backward``
stays an optional speed-up, which the conformance kit compares with this one.

:func:`with_backward` is what the kernels call a network through. :func:`check_derivable` runs
when a memory is built and refuses, in one line, a network whose backward cannot be derived this
way: one that reads a fast weight outside the callback (the kernels would never see that read),
applies a matrix twice or never, or cuts the gradient between a matrix and the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from memforge.errors import SpecError
from memforge.interfaces import LinearFn, MemoryNetwork

#: The fix every refusal names.
FIX = "apply every fast-weight matrix through linear(i, h), or give the network a backward"

#: Tokens of the input :func:`check_derivable` runs the network on.
_CHECK_TOKENS = 2


class DerivedTape(NamedTuple):
    """What :meth:`DerivedBackward.forward` keeps for :meth:`DerivedBackward.backward`.

    Attributes:
        inputs: per matrix, the input it was applied to, ``[N, t, d_in_i]``.
        outputs: per matrix, its output as the network received it, ``[N, t, d_out_i]``: the
            points of the graph at which the error is taken.
        prediction: the network's output, the root of that graph.
        outer: whether the forward ran with outer gradients (then the derived backward is
            differentiable itself, like a hand-written one built from torch ops).
    """

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    prediction: Tensor
    outer: bool


class DerivedBackward:
    """A memory network with a ``backward`` derived by autograd; see :func:`with_backward`.

    ``initial_weights`` is the network's own. ``forward(x, linear)`` runs the network with a
    callback that records each matrix's input and output (under ``torch.enable_grad``, so the
    small graph from the matrices' outputs to the prediction exists in inference too). Without
    outer gradients the inputs are detached and every matrix output is a fresh leaf, so nothing
    outside is recorded and the graph is freed by the backward. ``backward(tape, grad_output,
    linear_transposed)`` is one ``torch.autograd.grad`` of the prediction with respect to every
    matrix output, with ``create_graph`` when outer gradients flow, so they pass through the
    derived backward exactly as through a hand-written one. ``linear_transposed`` is unused:
    autograd transposes the matrices the forward applied.
    """

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network

    def initial_weights(self) -> Sequence[Tensor]:
        """The network's learned initial fast weights."""
        return self.network.initial_weights()

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, DerivedTape]:
        """Run the network on ``x`` ``[N, t, d_key]``, recording every matrix's input and output."""
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self._forward)(x, linear)
        return self._forward(x, linear)

    def backward(
        self, tape: DerivedTape, grad_output: Tensor, linear_transposed: LinearFn
    ) -> list[tuple[Tensor, Tensor]]:
        """``[(inputs_i, grads_i)]``: ``grads_i`` is ``d <prediction, grad_output> / d output_i``."""
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self._backward)(tape, grad_output)
        return self._backward(tape, grad_output)

    # Both run eagerly inside a compiled chunk step: traced by torch.compile (torch 2.13, aot_eager
    # and inductor alike), the leaves, the grad-mode switches and autograd.grad over the
    # graph-broken forward gave wrong outputs and gradients in training
    # (tests/test_derived_backward.py, the compiled test).
    def _forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, DerivedTape]:
        count = len(self.network.initial_weights())
        grad_mode = torch.is_grad_enabled()
        inputs: list[Tensor | None] = [None] * count
        outputs: list[Tensor | None] = [None] * count
        connected = False  # whether a matrix output depends on something outer
        leaves = False  # whether a matrix output was made a leaf (then later ones depend on it)

        def record(i: int, h: Tensor) -> Tensor:
            nonlocal connected, leaves
            _check_index(i, count, outputs)
            out = linear(i, h)
            if out.requires_grad and not connected:
                # Through an earlier leaf only? Ask the matrix alone, on zero tokens (no cost).
                connected = not leaves or linear(i, h[:, :0].detach()).requires_grad
            if not out.requires_grad:  # nothing outer reaches it: a leaf to take the error at
                out = out.detach().requires_grad_()
                leaves = True
            inputs[i], outputs[i] = h, out
            return out

        try:
            with torch.enable_grad():
                prediction, _ = self.network.forward(x if grad_mode else x.detach(), record)
        except _NotDerivable as exc:
            raise SpecError(f"memory network {_name(self.network)}: {exc}") from None
        missing = [i for i, out in enumerate(outputs) if out is None]
        if missing:
            raise SpecError(f"memory network {_name(self.network)}: matrix {missing[0]} was never "
                            f"applied through the linear callback; {FIX}")
        outer = grad_mode and (connected or x.requires_grad or _has_trainable(self.network))
        if not outer:
            inputs = [h.detach() for h in inputs]
        tape = DerivedTape(tuple(inputs), tuple(outputs), prediction, outer)
        return (prediction if outer else prediction.detach()), tape

    def _backward(self, tape: DerivedTape, grad_output: Tensor) -> list[tuple[Tensor, Tensor]]:
        create = torch.is_grad_enabled() and (tape.outer or grad_output.requires_grad)
        grads = torch.autograd.grad(tape.prediction, tape.outputs, grad_output,
                                    retain_graph=create, create_graph=create,
                                    allow_unused=True, materialize_grads=True)
        return list(zip(tape.inputs, grads, strict=True))


def with_backward(network: MemoryNetwork) -> Any:
    """``network`` itself when it has a ``backward``, else a :class:`DerivedBackward` of it.

    Either offers the :class:`~memforge.interfaces.MemoryNetwork` methods the kernels call.
    """
    if callable(getattr(network, "backward", None)):
        return network
    return DerivedBackward(network)


def derivability_problem(network: MemoryNetwork) -> str | None:
    """Why autograd cannot derive ``network``'s backward (the reason and the fix), or ``None``.

    Runs the network once on a two-token input, with a ``linear`` callback over copies of its
    initial weights, and checks that every matrix is applied exactly once through the callback,
    that the output does not depend on an initial weight itself (a fast weight read outside the
    callback, which the kernels' weights would never replace), and that the output depends,
    through autograd, on every matrix's output. Networks on the meta device are not run (there
    are no values; the size estimate builds there).
    """
    weights = tuple(network.initial_weights())
    if not weights or not all(isinstance(w, Tensor) and w.ndim == 3 for w in weights) or any(
            w.device.type == "meta" for w in weights):
        return None  # no values to run on, or not matrices (the kind check names that)
    first = weights[0]
    x = torch.linspace(-1.0, 1.0, first.shape[0] * _CHECK_TOKENS * first.shape[1],
                       dtype=torch.float64).sin().reshape(first.shape[0], _CHECK_TOKENS, -1)
    x = x.to(device=first.device, dtype=first.dtype)
    copies = [w.detach().clone().requires_grad_() for w in weights]
    outputs: list[Tensor | None] = [None] * len(weights)

    def linear(i: int, h: Tensor) -> Tensor:
        _check_index(i, len(weights), outputs)
        outputs[i] = torch.bmm(h, copies[i])
        return outputs[i]

    # A weight that does not take part in autograd must, for this check only: a direct read of
    # it must show up in the graph.
    switched = [w for w in weights if w.is_leaf and not w.requires_grad]
    try:
        for w in switched:
            w.requires_grad_(True)
        with torch.enable_grad():
            prediction, _ = network.forward(x, linear)
            never = [i for i, out in enumerate(outputs) if out is None]
            if never:
                return (f"matrix {never[0]} of its initial_weights() is never applied through the "
                        f"linear callback, so autograd cannot derive its backward; {FIX}")
            if not prediction.requires_grad:
                return (f"its output does not depend, through autograd, on any matrix's output "
                        f"(a .detach() or a non-differentiable op?), so autograd cannot derive "
                        f"its backward; {FIX}")
            read = [w for w in weights if w.requires_grad]
            found = torch.autograd.grad(prediction.sum(), [*read, *outputs], allow_unused=True)
    except _NotDerivable as exc:
        return str(exc)
    finally:
        for w in switched:
            w.requires_grad_(False)
    for w, grad in zip(read, found[: len(read)], strict=True):
        if grad is not None:
            index = next(i for i, v in enumerate(weights) if v is w)
            return (f"it reads fast weight {index} (initial_weights()[{index}]) outside the linear "
                    f"callback, so the kernels' per-sequence weights never reach that read and "
                    f"autograd cannot derive its backward; {FIX}")
    for i, grad in enumerate(found[len(read) :]):
        if grad is None:
            return (f"its output does not depend, through autograd, on the output of matrix {i} "
                    f"(a .detach() or a non-differentiable op after it?), so autograd cannot "
                    f"derive its backward; {FIX}")
    return None


def check_derivable(network: MemoryNetwork, name: str) -> None:
    """Raise a one-line :class:`~memforge.errors.SpecError` naming ``name`` and the fix when
    ``network`` has no ``backward`` and autograd cannot derive one (:func:`derivability_problem`).

    A network with a hand-written ``backward`` passes (the conformance kit compares that one with
    the derived backward). So does what is not a memory network at all, or one that fails on the
    check's input: the build-time kind check (:func:`memforge.conformance.check_component`) names
    those in one line of its own.
    """
    if callable(getattr(network, "backward", None)) or not (
            callable(getattr(network, "initial_weights", None))
            and callable(getattr(network, "forward", None))):
        return  # a hand-written backward, or not a memory network (the kind check names that)
    try:
        problem = derivability_problem(network)
    except Exception:  # it fails on a well-formed input: the kind check reports that
        return
    if problem is not None:
        raise SpecError(f"memory network {name!r}: {problem}")


class _NotDerivable(SpecError):
    """Raised from inside a network's forward by the recording callback (caught by the check)."""


def _check_index(i: Any, count: int, outputs: list[Tensor | None]) -> None:
    """Refuse a matrix index outside ``initial_weights()`` or a matrix applied a second time."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
        raise _NotDerivable(f"it applies matrix {i!r} through the linear callback, but "
                            f"initial_weights() has {count} (indices 0 to {count - 1}); {FIX}")
    if outputs[i] is not None:
        raise _NotDerivable(f"it applies matrix {i} twice through the linear callback, so its "
                            f"per-token gradient is not one outer product and autograd cannot "
                            f"derive its backward; apply each fast-weight matrix exactly once "
                            f"(give a shared matrix two entries in initial_weights()), or give "
                            f"the network a backward")


def _has_trainable(network: MemoryNetwork) -> bool:
    """Whether the network has parameters besides its initial weights that take outer gradients
    (an affine norm's, say). The initial weights reach the forward only through ``linear``, where
    the kernels' weights show whether they carry outer gradients."""
    if not isinstance(network, nn.Module):
        return False
    initial = {id(w) for w in network.initial_weights()}
    return any(p.requires_grad and id(p) not in initial for p in network.parameters())


def _name(network: MemoryNetwork) -> str:
    return type(network).__name__
