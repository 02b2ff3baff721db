"""``torch.compile`` for memforge models: compile the steps of chunk loops, not the loops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memforge.interfaces import CompilesSteps


def compile_model(model: nn.Module, **options: Any) -> Callable[..., Any]:
    """``torch.compile(model, **options)``, after every :class:`CompilesSteps` submodule compiles its step.

    Memory layers loop over chunks in Python; compiled whole, each loop would be unrolled into one
    graph per sequence length. Here each such layer runs one compiled graph per chunk and the outer
    compile covers everything around it (projections, attention, feed-forward). ``model`` may be a
    wrapper such as ``DistributedDataParallel``: its submodules are reached through ``modules()``.
    Returns the compiled callable; ``model`` itself stays usable eagerly (its memory layers keep
    their compiled steps).
    """
    for module in model.modules():
        if isinstance(module, CompilesSteps):
            module.compile_steps()
    return torch.compile(model, **options)
