"""Fixed-shape incremental decoding: one model step whose shapes never change, compiled once.

``MemforgeModel.forward`` decodes a token by growing every cache by one row, which is right for any
call but gives each step new shapes, and an eager step of a small model is mostly Python and
dispatch overhead (hundreds of tiny ops). :class:`StaticDecoder` instead asks every block for
fixed-shape buffers (:class:`memforge.interfaces.DecodesStatically`) and runs the model step on
them; ``compiled=True`` puts that step through ``torch.compile``, which fuses the element-wise work.
Only the cycles' ends change the computation (a memory chunk that completes moves the weights),
and the decoder passes those as Python bools: a handful of graphs serve a whole generation.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from memforge.errors import InputError
from memforge.interfaces import DecodesStatically

#: Inductor options of the compiled decode step: the C++ wrapper calls the step's kernels without
#: a Python line per kernel, which matters when each kernel is a few microseconds (one token):
#: 0.93 instead of 1.11 ms for a step of the benchmark MAC on this project's CPU.
INDUCTOR_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


def decode_step(model: nn.Module, tokens: Tensor, buffers: list[Any],
                completes: tuple[tuple[bool, ...], ...]) -> Tensor:
    """One token per sequence ``tokens`` ``[B, 1]`` through ``model`` on static ``buffers``.

    Returns the next-token logits ``[B, vocab]``; every block's buffers are updated in place.
    ``completes[i]`` is block ``i``'s cycle ends (see :class:`DecodesStatically`).
    """
    hidden = model.embedding(tokens)
    for block, block_buffers, block_completes in zip(model.blocks, buffers, completes, strict=True):
        hidden = block.static_decode_step(hidden, block_buffers, block_completes)
    return model.head(model.norm(hidden))[:, -1]


@functools.cache
def compiled_decode_step() -> Any:
    """``torch.compile(decode_step)``, made once per process (graphs are per model and shape).

    ``dynamic=False``: a decode's shapes are fixed. Past torch's recompile limit (8 by default:
    models times cycle-end combinations) further graphs run eagerly, with torch's warning.
    """
    return torch.compile(decode_step, dynamic=False, options=INDUCTOR_OPTIONS)


def check_static_decoding(model: nn.Module) -> None:
    """Raise an :class:`InputError` naming the blocks of ``model`` that cannot decode statically."""
    unsupported = sorted({type(block).__name__ for block in model.blocks
                          if not isinstance(block, DecodesStatically)})
    if unsupported:
        raise InputError(f"fixed-shape (compiled) decoding needs every block to implement "
                         f"DecodesStatically; {', '.join(unsupported)} does not. Use "
                         f"generate(..., compile=False), which decodes any model")


class StaticDecoder:
    """Continue ``state`` token by token with fixed-shape buffers.

    Args:
        model: a :class:`memforge.model.MemforgeModel` whose every block implements
            :class:`DecodesStatically` (every block of memforge's own presets does, with
            ``baseline.causal`` / ``baseline.sliding_window`` attention).
        state: the ``ModelState`` after reading at least one token (e.g. the prompt).
        capacity: the most tokens :meth:`step` will read; full-attention caches are sized by it
            (a window or a memory needs the same buffers whatever the length).
        compiled: run the step through ``torch.compile`` (the first step of each cycle-end
            combination compiles, which takes a while); ``False`` runs the same step eagerly, as
            a reference and where compiling is not worth it.

    The state is copied, never changed. :meth:`step` gives the logits of each next token, equal to
    those of ``model(tokens, state)`` up to float rounding.
    """

    def __init__(self, model: nn.Module, state: Any, *, capacity: int, compiled: bool = True) -> None:
        check_static_decoding(model)
        if state is None or not hasattr(state, "layers") or len(state.layers) != len(model.blocks):
            raise InputError("StaticDecoder needs the ModelState of this model after at least one "
                             "token; read the prompt first (model(prompt).state)")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InputError(f"capacity must be an int >= 0 (the most tokens to decode), got "
                             f"{capacity!r}")
        starts = [block.static_decode_start(layer_state, state.batch_size, capacity)
                  for block, layer_state in zip(model.blocks, state.layers, strict=True)]
        self._model = model
        self._buffers = [start.buffers for start in starts]
        self._phases = [list(start.phases) for start in starts]
        self._periods = [start.periods for start in starts]
        self._step = compiled_decode_step() if compiled else decode_step
        self.batch_size: int = state.batch_size
        self.position: int = state.position
        self.capacity: int = capacity

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Read one token per sequence ``tokens`` ``[B, 1]``; returns the next logits ``[B, vocab]``."""
        if tokens.shape != (self.batch_size, 1):
            raise InputError(f"a decode step takes one token per sequence, [{self.batch_size}, 1]; "
                             f"got {list(tokens.shape)}")
        if self.capacity == 0:
            raise InputError("this decoder has read the capacity it was made for; make a new one "
                             "with a larger capacity")
        completes = tuple(
            tuple((phase + 1) % period == 0 for phase, period in zip(phases, periods, strict=True))
            for phases, periods in zip(self._phases, self._periods, strict=True)
        )
        # Contiguous: a compiled step is specialised on strides, and a column sliced out of a
        # longer sequence would otherwise compile its own graphs.
        logits = self._step(self._model, tokens.contiguous(), self._buffers, completes)
        for phases, periods in zip(self._phases, self._periods, strict=True):
            phases[:] = [(phase + 1) % period for phase, period in zip(phases, periods, strict=True)]
        self.position += 1
        self.capacity -= 1
        return logits
