"""Position-wise feed-forward layers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from memforge.linear import Linear
from memforge.nn._checks import check_width

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """Llama's gated feed-forward layer: ``down(silu(gate(x)) * up(x))``, no biases.

    ``gate`` and ``up`` are fused into one ``[dim -> 2 * hidden]`` linear layer (one matmul instead
    of two); its first ``hidden`` outputs are the gate. Satisfies the ``FeedForward`` protocol.

    Args:
        dim: model width ``D`` (input and output).
        hidden: inner width (Llama uses about ``8 / 3 * D``, rounded up).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"SwiGLU needs dim >= 1 and hidden >= 1, got dim={dim}, hidden={hidden}")
        self.dim = dim
        self.hidden = hidden
        self.gate_up = Linear(dim, 2 * hidden, bias=False)
        self.down = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``[..., dim]`` to ``[..., dim]`` position-wise."""
        check_width(x, self.dim, "SwiGLU")
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
