"""An example third-party memforge plugin, shipped as its own package.

It adds one component, ``example.huber``: a *surprise* rule whose inner loss is the Huber loss
(MIRAS's "Yaad" attentional bias) instead of Titans' squared error, so that outlier tokens move
the memory by at most ``delta`` per coordinate. It also adds a preset, ``example.huber_lmm_tiny``,
which is ``titans.lmm_tiny`` with this surprise rule.

Install it (``pip install examples/plugin_example``) and memforge finds it through the entry point
``memforge.plugins``: ``memforge list`` shows ``example.huber``, ``memforge show
example.huber_lmm_tiny`` builds the preset.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

import memforge
from memforge.interfaces import BuildContext, SurpriseGates


@attrs.frozen(kw_only=True)
class HuberSurpriseConfig:
    """Settings of ``example.huber``."""

    delta: float = memforge.option(0.5, gt=0, help="where the loss turns from quadratic to linear")
    max_lr: float = memforge.option(0.1, gt=0, help="upper bound of the step size theta")


class HuberSurprise(nn.Module):
    """Huber associative loss per coordinate, step size ``theta_t = max_lr * sigmoid(x W)``, no
    momentum. Satisfies :class:`memforge.interfaces.SurpriseRule`."""

    def __init__(self, dim: int, heads: int, *, delta: float, max_lr: float) -> None:
        super().__init__()
        self.delta = delta
        self.max_lr = max_lr
        self.lr_proj = nn.Linear(dim, heads)
        nn.init.zeros_(self.lr_proj.weight)
        nn.init.constant_(self.lr_proj.bias, -1.5)

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Per-token Huber loss summed over features."""
        return nn.functional.huber_loss(prediction, target, reduction="none", delta=self.delta).sum(-1)

    def loss_grad(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The error, clipped to ``[-delta, delta]``: the Huber loss's gradient."""
        return (prediction - target).clamp(-self.delta, self.delta)

    def forward(self, x: Tensor) -> SurpriseGates:
        """Step sizes ``[B, T, H]``; no momentum."""
        return SurpriseGates(self.max_lr * torch.sigmoid(self.lr_proj(x)), None)


def _huber(config: HuberSurpriseConfig, ctx: BuildContext) -> HuberSurprise:
    return HuberSurprise(ctx.dim, ctx.heads, delta=config.delta, max_lr=config.max_lr)


@memforge.hookimpl
def memforge_register_components():
    return [
        memforge.ComponentSpec(
            kind="surprise", name="example.huber", config_cls=HuberSurpriseConfig, factory=_huber,
            summary="Huber associative loss (MIRAS Yaad), no momentum",
        )
    ]


def _huber_lmm_tiny() -> memforge.ModelSpec:
    return memforge.preset("titans.lmm_tiny", surprise="example.huber")


@memforge.hookimpl
def memforge_register_presets():
    return [
        memforge.PresetSpec(name="example.huber_lmm_tiny", summary="titans.lmm_tiny with Huber surprise",
                            build=_huber_lmm_tiny)
    ]
