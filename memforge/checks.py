"""When value checks may run inside ``forward``: never at the price of a host-device sync.

A check that reads a tensor's values in Python (token ids in range, hidden states finite) is free
for a CPU tensor, but on an accelerator it makes the host wait for every queued kernel, once per
call and layer: the same stall as ``.item()``. So inside ``forward`` such checks run on CPU tensors
only, and skip tensors on other devices unless asked for with :func:`device_value_checks` (for
debugging: a CUDA embedding given an id out of range otherwise stops with a device-side assert).
Shape, dtype and type checks need no values and always run. Inside ``torch.compile`` no value
check runs (it would break the graph).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_ON_DEVICE: ContextVar[bool] = ContextVar("memforge_device_value_checks", default=False)


def checks_values(tensor: Tensor) -> bool:
    """Whether a check of ``tensor``'s values should run now (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or _ON_DEVICE.get()


@contextmanager
def device_value_checks(enabled: bool = True) -> Iterator[None]:
    """Within the block, value checks also run on accelerator tensors (each syncs the device).

    ::

        with memforge.checks.device_value_checks():
            model(tokens.cuda())   # an id out of range: a clear InputError, not a device assert
    """
    token = _ON_DEVICE.set(bool(enabled))
    try:
        yield
    finally:
        _ON_DEVICE.reset(token)
