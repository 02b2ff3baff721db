"""The optimiser and learning-rate schedule: AdamW, linear warmup, cosine decay.

The schedule is a pure function of the step, so a resumed run needs no scheduler object: setting
each group's ``lr`` from :func:`lr_at` before every step reproduces it exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memforge.training.config import TrainConfig


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) only.

    Norm gains and biases are vectors; decaying them towards zero only fights the normalisation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=lr_at(0, config), betas=config.betas)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of (0-based) step ``step``: linear warmup, then cosine to the minimum.

    The warmup is capped at a fifth of the run, so that a short run still reaches the peak.
    """
    warmup = min(config.warmup_steps, config.steps // 5)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    span = max(1, config.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
