"""Recording a model's memory layers: :func:`recording` and the :class:`Trace` it fills.

Layers take part through the capability :class:`memforge.interfaces.InspectsMemory`: inside
``with recording(model) as trace`` each such layer holds a :class:`LayerRecorder`, every residual
block of ``model.blocks`` gets a forward hook that keeps the norm of its output (what a memory
read's contribution is measured against), and the model's final norm a pre-hook that keeps the
last hidden states (to decode reads into logits; docs/inspect.md, "Retrieval"). Leaving the block
takes them all away again, so a model that is not being inspected carries none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from memforge.errors import InputError
from memforge.interfaces import InspectsMemory


class LayerRecorder:
    """The :class:`memforge.interfaces.MemoryRecorder` of one memory layer: keeps every call's
    series, in call order (a sequence fed in pieces is joined along time)."""

    def __init__(self, name: str, block: int | None, layer: nn.Module) -> None:
        self.name, self.block, self.layer = name, block, layer
        self.calls: dict[str, list[Tensor]] = {}

    def record(self, series: str, values: Tensor) -> None:
        """Keep a detached CPU copy of ``values`` ``[B, H, T]`` or ``[B, H, T, d]``."""
        if not isinstance(values, Tensor) or values.ndim not in (3, 4):
            raise InputError(f"memory layer {self.name} recorded {series!r} with "
                             f"{getattr(values, 'shape', type(values).__name__)}; a series is "
                             f"[batch, heads, time] or [batch, heads, time, d]")
        self.calls.setdefault(series, []).append(values.detach().to("cpu", torch.float64))

    def series(self, name: str, length: int) -> Tensor:
        """The series ``name`` over the last ``length`` tokens recorded (writes before the model's
        first token, such as persistent tokens, come first and are left out)."""
        joined = torch.cat(self.calls[name], dim=2)
        if joined.shape[2] < length:
            raise InputError(f"memory layer {self.name} recorded {joined.shape[2]} tokens of "
                             f"{name!r}, fewer than the {length} the model read")
        return joined[:, :, joined.shape[2] - length:]


class Trace:
    """What one :func:`recording` saw: per memory layer its series, per block its output norms."""

    def __init__(self, layers: list[LayerRecorder], model: nn.Module) -> None:
        self.layers = layers
        self.block_norms: dict[int, list[Tensor]] = {}
        self.final_hidden: list[Tensor] = []
        self.hidden_dtype = torch.float32
        self._model = model

    @property
    def length(self) -> int:
        """Tokens the model read while recording: counted at its first block, or for a model
        without ``blocks`` (a bare memory layer), the tokens its first layer recorded."""
        if self.block_norms:
            return sum(n.shape[1] for n in self.block_norms[min(self.block_norms)])
        calls = next(iter(self.layers[0].calls.values()), [])
        return sum(c.shape[2] for c in calls)

    def block_output_norm(self, block: int) -> Tensor:
        """``||h_t||`` of block ``block``'s output, ``[B, T]``."""
        return torch.cat(self.block_norms[block], dim=1)

    def series(self, layer: LayerRecorder, name: str) -> Tensor:
        """Series ``name`` of ``layer`` over the model's tokens, ``[B, H, T(, D)]``.

        Two are derived from ``read_output``: ``read_norm``, its norm, and ``read_contribution``,
        that norm over the norm of the block's output at the token.
        """
        length = self.length
        if name == "read_norm":
            return layer.series("read_output", length).norm(dim=-1)
        if name == "read_contribution":
            norms = self.block_output_norm(layer.block)[:, None, :]
            return self.series(layer, "read_norm") / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        return layer.series(name, length)

    def names(self, layer: LayerRecorder) -> list[str]:
        """The series ``layer`` recorded, plus the ones derived from ``read_output``."""
        names = list(layer.calls)
        if "read_output" in names:
            names.append("read_norm")
            if layer.block in self.block_norms:
                names.append("read_contribution")
        return names

    @property
    def can_decode(self) -> bool:
        """Whether reads can be decoded: the model ends in an ``nn.RMSNorm`` and a bias-free
        linear head (every memforge model does) and its last hidden states were kept."""
        norm, head = getattr(self._model, "norm", None), getattr(self._model, "head", None)
        return (isinstance(norm, nn.RMSNorm) and isinstance(head, nn.Linear) and head.bias is None
                and bool(self.final_hidden))

    @property
    def hidden(self) -> Tensor:
        """The last hidden states ``h`` ``[B, T, D]`` (the final norm's input)."""
        return torch.cat(self.final_hidden, dim=1)[:, hidden_slice(self.length, self.final_hidden)]

    def decode(self, vectors: Tensor) -> Tensor:
        """Vectors ``[B, ..., T, D]`` in the residual stream decoded into logits ``[B, ..., T, V]``.

        The model's logits are ``head(norm(h))`` with ``h`` the last hidden states, a sum over
        every residual branch. With the norm's scale ``w / rms(h_t)`` taken from the real ``h``,
        the map is linear, so a branch ``c`` decodes to ``head(c * w / rms(h_t))`` and the
        branches' logits sum exactly to the model's (direct logit attribution).
        """
        if not self.can_decode:
            raise InputError("reads can be decoded only for a model that ends in nn.RMSNorm and a "
                             "bias-free linear head, inspected with memforge.inspect.recording")
        norm, head = self._model.norm, self._model.head
        hidden = self.hidden
        # nn.RMSNorm's default eps is the machine epsilon of its input's dtype.
        eps = norm.eps if norm.eps is not None else torch.finfo(self.hidden_dtype).eps
        weight = norm.weight.detach().to("cpu", torch.float64)
        scale = weight / (hidden.pow(2).mean(-1, keepdim=True) + eps).sqrt()       # [B, T, D]
        scale = scale.reshape(scale.shape[0], *([1] * (vectors.ndim - 3)), *scale.shape[1:])
        return (vectors * scale) @ head.weight.detach().to("cpu", torch.float64).T

    def decoded(self, layer: LayerRecorder) -> Tensor:
        """Each head's ``read_output`` decoded into logits, ``[B, H, T, V]`` (:meth:`decode`)."""
        return self.decode(self.series(layer, "read_output"))


def hidden_slice(length: int, pieces: list[Tensor]) -> slice:
    """The last ``length`` positions of the joined ``pieces`` (``[B, t, D]`` each)."""
    total = sum(p.shape[1] for p in pieces)
    return slice(total - length, total)


def _block_of(name: str, blocks: dict[str, int]) -> int | None:
    """The index of the block whose module path ``name`` lies under (``None``: no block)."""
    for prefix, index in blocks.items():
        if name == prefix or name.startswith(prefix + "."):
            return index
    return None


@contextmanager
def recording(model: nn.Module) -> Iterator[Trace]:
    """Record every :class:`~memforge.interfaces.InspectsMemory` memory layer of ``model``.

    ``with memforge.inspect.recording(model) as trace: model(tokens)``; the outputs are
    bit-identical to an uninspected call. Raises :class:`InputError` when ``model`` has no such
    layer, naming the layers it has.
    """
    blocks = getattr(model, "blocks", None)
    prefixes = {f"blocks.{i}": i for i in range(len(blocks))} if isinstance(blocks, nn.ModuleList) else {}
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, InspectsMemory) and isinstance(module, nn.Module)]
    if not found:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if hasattr(m, "chunk_size")})
        raise InputError(f"no memory layer of this model can be inspected (memory layers: "
                         f"{', '.join(kinds) or 'none'}); a memory layer takes part by "
                         f"implementing memforge.interfaces.InspectsMemory (docs/inspect.md)")
    trace = Trace([LayerRecorder(name, _block_of(name, prefixes), module) for name, module in found],
                  model)
    handles: list[Any] = []
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.Module):
        def keep_hidden(_module: nn.Module, args: Any) -> None:
            trace.hidden_dtype = args[0].dtype
            trace.final_hidden.append(args[0].detach().to("cpu", torch.float64))
        handles.append(norm.register_forward_pre_hook(keep_hidden))
    for index in prefixes.values():
        def keep(_module: nn.Module, _args: Any, output: Any, index: int = index) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            trace.block_norms.setdefault(index, []).append(
                hidden.detach().to("cpu", torch.float64).norm(dim=-1))
        handles.append(blocks[index].register_forward_hook(keep))
    try:
        for recorder in trace.layers:
            recorder.layer.set_memory_recorder(recorder)
        yield trace
    finally:
        for recorder in trace.layers:
            recorder.layer.set_memory_recorder(None)
        for handle in handles:
            handle.remove()
