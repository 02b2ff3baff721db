"""The generic language model every spec builds into: embedding, blocks, final norm, head.

Blocks are whatever the integration components built (see :class:`memforge.interfaces.Block`);
this module only threads their states through and checks the user's input. It never dispatches
plugin hooks, so the built model is a plain, picklable, compilable ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from memforge.decoding import StaticDecoder, check_static_decoding
from memforge.errors import InputError


class ModelState(NamedTuple):
    """The recurrent state of a model after reading a piece of some sequences.

    Attributes:
        layers: one state per block (attention caches, memory weights, partial chunks, ...).
        position: how many tokens of these sequences have been read.
        batch_size: how many sequences the state belongs to.
    """

    layers: tuple[Any, ...]
    position: int
    batch_size: int


class ModelOutput(NamedTuple):
    """What a model call returns: ``logits`` ``[batch, time, vocab]`` and the next ``state``."""

    logits: Tensor
    state: ModelState


class MemforgeModel(nn.Module):
    """A token model: ``model(tokens, state=None) -> ModelOutput(logits, state)``.

    Args:
        embedding: token embedding ``[vocab, dim]``.
        blocks: residual blocks, each ``forward(hidden, state) -> (hidden, state)``.
        norm: final normalisation.
        head: projection from ``dim`` to vocabulary logits.
    """

    def __init__(
        self, embedding: nn.Embedding, blocks: Sequence[nn.Module], norm: nn.Module, head: nn.Module
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts."""
        return self.embedding.num_embeddings

    def _check_tokens(self, tokens: Any) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise InputError(f"tokens must be a torch.LongTensor [batch, time], got "
                             f"{type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InputError(f"tokens must be integer ids (torch.long), got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise InputError(f"tokens must have shape [batch, time], got {list(tokens.shape)}; "
                             f"use tokens[None] for a single sequence")
        if tokens.shape[1] == 0:
            raise InputError("tokens has no time steps; pass at least one token")
        if not torch.compiler.is_compiling():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise InputError(f"token id {bad} is out of range for vocab_size="
                                 f"{self.vocab_size}; ids must lie in [0, {self.vocab_size - 1}]")
        return tokens.long()

    def _check_state(self, state: Any, batch: int) -> ModelState:
        if not isinstance(state, ModelState):
            raise InputError(f"state must be the ModelState a previous call returned, got "
                             f"{type(state).__name__}")
        if len(state.layers) != len(self.blocks):
            raise InputError(f"state has {len(state.layers)} layer states but the model has "
                             f"{len(self.blocks)} blocks; was it made by another model?")
        if state.batch_size != batch:
            raise InputError(f"state belongs to {state.batch_size} sequences but tokens has "
                             f"batch {batch}; pass the state of these same sequences")
        return state

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> ModelOutput:
        """Read ``tokens`` ``[batch, time]`` continuing from ``state`` (``None``: a fresh start)."""
        tokens = self._check_tokens(tokens)
        batch, time = tokens.shape
        if state is not None:
            state = self._check_state(state, batch)
        layer_states = state.layers if state is not None else (None,) * len(self.blocks)
        hidden = self.embedding(tokens)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states, strict=True):
            hidden, layer_state = block(hidden, layer_state)
            new_states.append(layer_state)
        logits = self.head(self.norm(hidden))
        position = (state.position if state is not None else 0) + time
        return ModelOutput(logits, ModelState(tuple(new_states), position, batch))

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        state: ModelState | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
    ) -> Tensor:
        """Continue ``prompt`` ``[batch, time]`` by ``max_new_tokens`` sampled tokens.

        Decoding is incremental: the prompt is read once, then each new token is fed alone with the
        carried state, so the cost per token does not grow with what has been read (attention
        caches hold only their window). ``temperature=0`` is greedy. Returns prompt + new tokens.

        ``compile=True`` decodes with fixed-shape buffers and a ``torch.compile``-d model step
        (:class:`memforge.decoding.StaticDecoder`): the same tokens up to float rounding, several
        times faster per token once compiled; the first generation per process pays a compilation
        of a few graphs. Every block must implement ``DecodesStatically`` (all of memforge's do).
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k must be >= 1 or None, got {top_k}")
        if compile:
            check_static_decoding(self)
        out = self(prompt, state)
        tokens = [self._check_tokens(prompt)]
        logits, state = out.logits[:, -1], out.state
        decoder = (StaticDecoder(self, state, capacity=max_new_tokens - 1)
                   if compile and max_new_tokens > 1 else None)
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature=temperature, top_k=top_k,
                                     generator=generator)
            tokens.append(next_token)
            if step + 1 < max_new_tokens:
                if decoder is not None:
                    logits = decoder.step(next_token)
                else:
                    out = self(next_token, state)
                    logits, state = out.logits[:, -1], out.state
        return torch.cat(tokens, dim=1)


def sample_next(
    logits: Tensor, *, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row of ``logits`` ``[batch, vocab]``: greedy, or softmax sampling with top-k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
