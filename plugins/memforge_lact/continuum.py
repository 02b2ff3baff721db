"""``lact.continuum``: a continuum memory, a chain of fast-weight MLPs with one update period
each (Nested Learning / HOPE's continuum memory system; docs/zoo.md, "Continuum memory").

Levels ``l = 1..L`` with periods ``C_l = base_period * ratio^(l-1)`` (16, 256, 4096 by default).
Per sequence and head, level ``l`` is a residual SwiGLU MLP with fast weights ``W_l`` (LaCT's
``f``, :func:`memforge_lact.ops.apply`), and the memory reads through the chain::

    M(x) = h_L,   h_0 = x,   h_l = h_{l-1} + f_{W_l}(h_{l-1})

Every token ``t`` writes the loss ``-eta_t <M(k_t), v_t>`` (LaCT's dot product, one learned step
per token, head and level). Its gradient with respect to every level is taken at the weights the
token reads with, and level ``l`` adds the gradients gathered since its last update to its
weights every ``C_l`` tokens (counted from the sequence start), then renormalises each output
row to its initial norm (optional)::

    G_l += sum_{t in block} eta_{l,t} d<M(k_t), v_t>/dW_l      (each block of C_1 tokens)
    W_l <- renorm(W_l + G_l), G_l <- 0                          (when C_l divides the tokens seen)

Since every period is a multiple of ``C_1``, the weights are constant inside each block of
``C_1`` tokens: a block's queries read the weights from before its update (apply, then update,
as LaCT), and the block's gradients are one autograd call. Tier ``rule-specific`` (every
gradient at its block-start weights); at ``C_1 = 1`` every token's gradient is at the weights
after every earlier token. The state keeps the pending block (the last block of a call, applied
when the token after it arrives), each level's gathered gradient, and the blocks completed
modulo the longest period.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge import Linear, checks_values
from memforge.errors import InputError, NonFiniteError
from memforge.interfaces import RuleDescription
from memforge.nn import RMSNorm
from memforge_lact.ops import FastWeights, apply, renormalize

#: Added to |q| and |k| before dividing (as the LaCT layer).
QK_EPS = 1e-5
#: Standard deviation of the projections' normal initialisation.
INIT_STD = 0.02


class ContinuumState(NamedTuple):
    """State of a :class:`ContinuumLayer` between calls on the same sequences.

    Attributes:
        weights: per level ``(w02 [B, H, d, 2h], w1 [B, H, h, d])``, those the pending block reads.
        gathered: per level the gradients gathered since its last update (same shapes).
        keys: ``[B, H, p, d]`` the pending block's keys (``0 <= p <= C_1``).
        values: ``[B, H, p, d]``.
        lr: ``[B, H, p, L]`` their steps.
        blocks: blocks of ``C_1`` tokens completed before the pending one, modulo ``C_L / C_1``.
    """

    weights: tuple[tuple[Tensor, Tensor], ...]
    gathered: tuple[tuple[Tensor, Tensor], ...]
    keys: Tensor
    values: Tensor
    lr: Tensor
    blocks: int


def chain(levels: list[FastWeights], x: Tensor) -> Tensor:
    """``M(x)``: the residual chain of the levels' SwiGLU MLPs on ``x`` ``[N, t, d]``."""
    for weights in levels:
        x = x + apply(weights, x)
    return x


class ContinuumLayer(nn.Module):
    """A continuum memory layer: ``forward(x, state)`` (see the module docstring).

    A :class:`memforge.interfaces.MemoryLayer` with ``ReadsMemory`` and ``DescribesRule``.

    Args:
        dim: model width ``D``.
        heads: heads ``H``, each with its own chain on ``d = D // H`` channels.
        periods: ``C_1 < C_2 < ...``, each a multiple of the one before.
        expansion: each level's hidden width ``h = round(d * expansion)``.
        base_lr: the initial step ``eta``.
        renormalize: rescale each output row to its initial norm after a level's update.
        norm_eps: epsilon of the per-head output RMSNorm.
    """

    def __init__(self, dim: int, heads: int, *, periods: tuple[int, ...] = (16, 256, 4096),
                 expansion: float = 1.0, base_lr: float = 1e-3, renormalize: bool = True,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        if not periods or periods[0] < 1 or any(b % a or b <= a for a, b in itertools.pairwise(periods)):
            raise ValueError(f"periods={periods} must rise, each a multiple of the one before")
        head = dim // heads
        hidden = round(head * expansion)
        if hidden < 1:
            raise ValueError(f"expansion={expansion} gives a hidden width of 0 at head width {head}")
        self.dim, self.heads, self.head_dim, self.hidden = dim, heads, head, hidden
        self.periods, self.chunk_size, self.renormalize = tuple(periods), periods[0], renormalize
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.lr_proj = Linear(dim, len(periods) * heads)
        self.lr_offset = base_lr + math.log(-math.expm1(-base_lr))   # softplus^-1(base_lr)
        self.out_norm = RMSNorm(head, eps=norm_eps)
        self.out_proj = Linear(dim, dim, bias=False)
        for module in self.modules():
            if isinstance(module, Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Small residual branches at the start, so the chain begins near the identity.
        self.w02 = nn.ParameterList(nn.Parameter(torch.randn(heads, head, 2 * hidden) / math.sqrt(head))
                                    for _ in periods)
        self.w1 = nn.ParameterList(nn.Parameter(torch.randn(heads, hidden, head) / math.sqrt(hidden))
                                   for _ in periods)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, hidden={self.hidden}, periods={self.periods}"

    def describe_rule(self) -> RuleDescription:
        """The rule in words (:class:`memforge.interfaces.DescribesRule`)."""
        one = self.chunk_size == 1
        return RuleDescription(
            objective="negative dot product -eta_t <M(k_t), v_t> through a chain of SwiGLU MLPs",
            retention="rows renormalised to their initial norms" if self.renormalize else "none",
            optimizer="gradients gathered over each level's period",
            schedule="levels updating every " + ", ".join(str(p) for p in self.periods) + " tokens",
            tier="token-exact" if one and len(self.periods) == 1 else "rule-specific",
            executor="lact.continuum")

    # -- checks ------------------------------------------------------------------------------------
    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"lact.continuum expects hidden states [batch, time, {self.dim}], "
                             f"got {shape}")
        if not x.dtype.is_floating_point:
            raise InputError(f"lact.continuum expects floating-point hidden states, got {x.dtype}")
        if checks_values(x) and not bool(torch.isfinite(x).all()):
            raise NonFiniteError("lact.continuum got non-finite hidden states (NaN or inf): the "
                                 "inputs hold them or the activations overflowed before this "
                                 "layer; check the inputs and the learning rate")

    def _check_state(self, state: Any, batch: int) -> ContinuumState:
        if not isinstance(state, ContinuumState):
            raise InputError(f"lact.continuum state must be the ContinuumState it returned, got "
                             f"{type(state).__name__}")
        b, h, d, hid, levels = batch, self.heads, self.head_dim, self.hidden, len(self.periods)
        p = state.keys.shape[2] if state.keys.ndim == 4 else -1
        shapes = [(state.keys, (b, h, p, d)), (state.values, (b, h, p, d)),
                  (state.lr, (b, h, p, levels))]
        if len(state.weights) != levels or len(state.gathered) != levels:
            raise InputError(f"lact.continuum state has {len(state.weights)} levels, this layer "
                             f"{levels}; pass the state this layer returned for these sequences")
        for pair in (*state.weights, *state.gathered):
            shapes += [(pair[0], (b, h, d, 2 * hid)), (pair[1], (b, h, hid, d))]
        for tensor, shape in shapes:
            if tuple(tensor.shape) != shape or not 0 <= p <= self.chunk_size:
                raise InputError(f"lact.continuum state does not fit this layer and batch {batch}: "
                                 f"a tensor is {list(tensor.shape)}, expected {list(shape)}; pass "
                                 f"the state returned for these same sequences by this layer")
        return state

    # -- parts ---------------------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``q, k, v`` ``[N, T, d]`` and ``lr`` ``[N, T, L]``."""
        batch, steps, _ = x.shape
        q, k, v = F.silu(self.qkv(x)).unflatten(-1, (3, self.heads, self.head_dim)).permute(
            2, 0, 3, 1, 4).reshape(3, batch * self.heads, steps, self.head_dim).unbind(0)
        q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + QK_EPS)
        k = k / (torch.linalg.vector_norm(k, dim=-1, keepdim=True) + QK_EPS)
        lr = F.softplus(self.lr_proj(x) + self.lr_offset).unflatten(-1, (self.heads, -1))
        return q, k, v, lr.transpose(1, 2).reshape(batch * self.heads, steps, -1)

    def initial_state(self, batch: int, like: Tensor) -> ContinuumState:
        """``batch`` new sequences: the learned weights, nothing gathered or pending."""
        weights = tuple((w02.to(like.dtype).expand(batch, -1, -1, -1),
                         w1.to(like.dtype).expand(batch, -1, -1, -1))
                        for w02, w1 in zip(self.w02, self.w1, strict=True))
        gathered = tuple((torch.zeros_like(a), torch.zeros_like(b)) for a, b in weights)
        empty = like.new_zeros(batch, self.heads, 0, self.head_dim)
        return ContinuumState(weights, gathered, empty, empty,
                              like.new_zeros(batch, self.heads, 0, len(self.periods)), 0)

    def _block_update(self, levels: list[FastWeights], gathered: list[FastWeights], keys: Tensor,
                      values: Tensor, lr: Tensor, blocks: int, batch: int
                      ) -> tuple[list[FastWeights], list[FastWeights], int]:
        """Gather one block's gradients and apply every level whose period the block completes."""
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = [FastWeights(*(w if create and w.requires_grad
                                    else w.detach().requires_grad_(True) for w in level))
                      for level in levels]
            read = chain(leaves, keys)
            # Level l's steps weigh only its own gradient: one score per level.
            grads = [torch.autograd.grad((read * values * lr[..., index, None]).sum(), level,
                                         create_graph=create, retain_graph=True)
                     for index, level in enumerate(leaves)]
        gathered = [FastWeights(*(g + d for g, d in zip(old, new, strict=True)))
                    for old, new in zip(gathered, grads, strict=True)]
        blocks += 1
        for index, period in enumerate(self.periods):
            if (blocks * self.chunk_size) % period == 0:
                w02, w1 = (w + g for w, g in zip(levels[index], gathered[index], strict=True))
                if self.renormalize:
                    w02 = renormalize(w02, torch.linalg.vector_norm(
                        self.w02[index], dim=-2, keepdim=True).repeat(batch, 1, 1).to(w02.dtype))
                    w1 = renormalize(w1, torch.linalg.vector_norm(
                        self.w1[index], dim=-2, keepdim=True).repeat(batch, 1, 1).to(w1.dtype))
                levels[index] = FastWeights(w02, w1)
                gathered[index] = FastWeights(*(torch.zeros_like(g) for g in gathered[index]))
        return levels, gathered, blocks % (self.periods[-1] // self.chunk_size)

    # -- the layer -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: ContinuumState | None = None) -> tuple[Tensor, ContinuumState]:
        """Read and write ``x`` ``[B, T, D]``; returns ``(y [B, T, D], state)``."""
        self._check_input(x)
        batch, steps, _ = x.shape
        state = self.initial_state(batch, x) if state is None else self._check_state(state, batch)
        if steps == 0:
            return x.new_zeros(x.shape), state
        n, c = batch * self.heads, self.chunk_size

        def flat(t: Tensor) -> Tensor:
            return t.reshape(n, *t.shape[2:])

        levels = [FastWeights(flat(a.to(x.dtype)), flat(b.to(x.dtype))) for a, b in state.weights]
        gathered = [FastWeights(flat(a), flat(b)) for a, b in state.gathered]
        q, k, v, lr = self._tokens(x)
        done = state.keys.shape[2]
        keys = torch.cat([flat(state.keys), k], 1)
        values = torch.cat([flat(state.values), v], 1)
        lrs = torch.cat([flat(state.lr), lr], 1)
        total, blocks = done + steps, state.blocks
        applied = (total - 1) // c
        first = min(c - done % c, steps)
        sizes = [first] + [c] * ((steps - first) // c) + [(steps - first) % c] * bool((steps - first) % c)
        reads = list(q.split(sizes, dim=1))
        outputs = []
        for j, (k_j, v_j, lr_j) in enumerate(zip(*(t.split(c, dim=1) for t in (keys, values, lrs)),
                                                 strict=True)):
            if (j + 1) * c > done:
                outputs.append(chain(levels, reads[len(outputs)]))
            if j < applied:
                levels, gathered, blocks = self._block_update(levels, gathered, k_j, v_j, lr_j,
                                                              blocks, batch)
        cut = applied * c
        o = torch.cat(outputs, 1).reshape(batch, self.heads, steps, self.head_dim)
        y = self.out_proj(self.out_norm(o).transpose(1, 2).flatten(2))

        def unflat(t: Tensor) -> Tensor:
            return t.reshape(batch, self.heads, *t.shape[1:])

        return y, ContinuumState(tuple((unflat(a), unflat(b)) for a, b in levels),
                                 tuple((unflat(a), unflat(b)) for a, b in gathered),
                                 unflat(keys[:, cut:]), unflat(values[:, cut:]), unflat(lrs[:, cut:]),
                                 blocks)

    def reference_forward(self, x: Tensor, state: ContinuumState | None = None
                          ) -> tuple[Tensor, ContinuumState]:
        """This layer token by token in float64 (:mod:`memforge_lact.continuum_reference`)."""
        from memforge_lact.continuum_reference import continuum_token_loop  # it imports this module

        return continuum_token_loop(self, x, state)

    # -- read-only access (ReadsMemory) -------------------------------------------------------------
    def read_state(self, state: ContinuumState | None, batch: int) -> tuple[Tensor, ...]:
        """Every level's ``(w02, w1)`` after every token ``state`` has read (the pending block's
        gradients gathered and the levels it completes applied), flattened into one tuple; pure."""
        if state is None:
            return tuple(w.expand(batch, -1, -1, -1) for pair in zip(self.w02, self.w1, strict=True)
                         for w in pair)
        state = self._check_state(state, batch)
        n = batch * self.heads
        levels = [FastWeights(a.reshape(n, *a.shape[2:]), b.reshape(n, *b.shape[2:]))
                  for a, b in state.weights]
        if state.keys.shape[2]:
            gathered = [FastWeights(a.reshape(n, *a.shape[2:]), b.reshape(n, *b.shape[2:]))
                        for a, b in state.gathered]
            levels, _, _ = self._block_update(
                levels, gathered, *(t.reshape(n, *t.shape[2:]) for t in (state.keys, state.values,
                                                                          state.lr)),
                state.blocks, batch)
        return tuple(w.reshape(batch, self.heads, *w.shape[1:]) for level in levels for w in level)

    def read(self, queries: Tensor, snapshot: tuple[Tensor, ...]) -> Tensor:
        """``M(q)`` for queries ``[B, H, T, d]`` with the snapshot's weights: ``[B, H, T, d]``."""
        weights = [w.to(queries.dtype) for w in snapshot]
        return chain([FastWeights(weights[i], weights[i + 1]) for i in range(0, len(weights), 2)],
                     queries)
