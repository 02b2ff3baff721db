"""``delta.gated_decay``: Gated DeltaNet's decay gate as a retention of the engine
(docs/delta.md, "The engine layer").

``log_keep = g = -exp(A_log) * softplus(x W_a + dt_bias)`` per token and head, in log space
(Mamba2's parameterisation, as in ``delta.gated_deltanet``), and the delta step's gradient is
taken at the decayed state (``decay_before_gradient = True``, GDN's order): with a linear memory,
the squared error, plain gradient steps and reads after the write, the engine runs the rule on
the token-exact WY executor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge import Linear

#: Standard deviation of the gate projection's normal initialisation (as the delta layers').
INIT_STD = 0.02


class GatedDecay(nn.Module):
    """GDN's data-dependent decay ``g_t = -A * softplus(x_t W_a + dt_bias) <= 0`` per head.

    Args:
        dim: layer input width ``D``.
        heads: memory heads ``H``.
        decay_range: ``(min, max)`` of the initial decay rates ``A = exp(A_log)``, drawn uniformly.
        dt_range: ``(min, max)`` of the initial time steps ``softplus(dt_bias)``, log-uniform.
    """

    #: Declared capability (memforge.interfaces.Retention): the gradient at the decayed state.
    decay_before_gradient = True

    def __init__(self, dim: int, heads: int, *, decay_range: tuple[float, float] = (1.0, 16.0),
                 dt_range: tuple[float, float] = (0.001, 0.1)) -> None:
        super().__init__()
        self.decay_proj = Linear(dim, heads, bias=False)
        nn.init.normal_(self.decay_proj.weight, std=INIT_STD)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(*decay_range).log())
        # dt_bias = softplus^{-1}(dt) with dt log-uniform in dt_range (Mamba2's initialisation).
        dt = torch.empty(heads).uniform_(math.log(dt_range[0]), math.log(dt_range[1])).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: Tensor) -> Tensor:
        """``log_keep`` ``[B, T, H]`` (``<= 0``, finite) for ``x`` ``[B, T, D]``."""
        return -self.A_log.exp() * F.softplus(self.decay_proj(x) + self.dt_bias)
