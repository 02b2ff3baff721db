"""The generic language model every spec builds into: embedding, blocks, final norm, head.

Blocks are whatever the integration components built (see :class:`memforge.interfaces.Block`);
this module only threads their states through and checks the user's input. It never dispatches
plugin hooks, so the built model is a plain, picklable, compilable ``nn.Module``.

Input checks that read tensor values (token ids in range) run only where they cost no host-device
synchronisation (see :mod:`memforge.checks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memforge.checks import checks_values
from memforge.decoding import StaticDecoder, check_static_decoding
from memforge.errors import InputError
from memforge.sampling import check_sampling_arguments, sample_next

if TYPE_CHECKING:
    from memforge.spec import ModelSpec

#: The label of a position that takes no part in the loss (``F.cross_entropy``'s default, and
#: what :mod:`memforge.tasks` puts at unscored positions).
IGNORE_INDEX = -100


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
    """What a model call returns.

    Attributes:
        logits: ``[batch, time, vocab]``, the next-token scores at every position.
        state: the :class:`ModelState` that continues these sequences in the next call.
        loss: with ``labels=`` the mean next-token cross entropy (a float32 scalar), else ``None``.
    """

    logits: Tensor
    state: ModelState
    loss: Tensor | None = None


def _is_integer_tensor(tensor: Tensor) -> bool:
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex
                or tensor.dtype == torch.bool)


class MemforgeModel(nn.Module):
    """A token model: ``model(tokens, state=None, labels=None) -> ModelOutput(logits, state, loss)``.

    Args:
        embedding: token embedding ``[vocab, dim]``.
        blocks: residual blocks, each ``forward(hidden, state) -> (hidden, state)``.
        norm: final normalisation.
        head: projection from ``dim`` to vocabulary logits.
        spec: the spec the model was built from (:func:`memforge.build_model` passes it), kept as
            ``model.spec`` so that :func:`memforge.save_model` can save the model whole.
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        blocks: Sequence[nn.Module],
        norm: nn.Module,
        head: nn.Module,
        spec: ModelSpec | None = None,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head
        self.spec = spec

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts."""
        return self.embedding.num_embeddings

    def _check_tokens(self, tokens: Any) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise InputError(f"tokens must be a torch.LongTensor [batch, time], got "
                             f"{type(tokens).__name__}")
        if not _is_integer_tensor(tokens):
            raise InputError(f"tokens must be integer ids (torch.long), got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise InputError(f"tokens must have shape [batch, time], got {list(tokens.shape)}; "
                             f"use tokens[None] for a single sequence")
        if tokens.shape[0] == 0:
            raise InputError("tokens has an empty batch (shape [0, time]); pass at least one "
                             "sequence")
        if tokens.shape[1] == 0:
            raise InputError("tokens has no time steps; pass at least one token")
        device = self.embedding.weight.device
        if tokens.device != device:
            raise InputError(f"tokens are on {tokens.device} but the model is on {device}; move "
                             f"them with tokens.to({str(device)!r})")
        if checks_values(tokens):
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise InputError(f"token id {bad} is out of range for vocab_size="
                                 f"{self.vocab_size}; ids must lie in [0, {self.vocab_size - 1}]")
        return tokens.long()

    def _check_labels(self, labels: Any, tokens: Tensor) -> Tensor:
        if not isinstance(labels, Tensor) or not _is_integer_tensor(labels):
            what = f"dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise InputError(f"labels must be integer token ids (torch.long) like tokens, got "
                             f"{what}")
        if labels.shape != tokens.shape:
            raise InputError(f"labels must have the shape of tokens, {list(tokens.shape)}, got "
                             f"{list(labels.shape)}; they are aligned with tokens and shifted "
                             f"inside the model")
        if tokens.shape[1] < 2:
            raise InputError("labels need at least 2 time steps: position t is scored against "
                             "labels[:, t + 1], so one token has nothing to predict")
        if labels.device != tokens.device:
            raise InputError(f"labels are on {labels.device} but tokens on {tokens.device}; put "
                             f"them on the same device")
        if checks_values(labels):
            scored = labels[labels != IGNORE_INDEX]
            low, high = (int(scored.min()), int(scored.max())) if scored.numel() else (0, 0)
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise InputError(f"label {bad} is out of range for vocab_size={self.vocab_size}; "
                                 f"labels must lie in [0, {self.vocab_size - 1}], or be "
                                 f"{IGNORE_INDEX} where no loss is wanted")
        return labels.long()

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

    def forward(
        self, tokens: Tensor, state: ModelState | None = None, *, labels: Tensor | None = None
    ) -> ModelOutput:
        """Read ``tokens`` ``[batch, time]`` continuing from ``state`` (``None``: a fresh start).

        ``labels`` (optional) are aligned with ``tokens``, as in HF transformers: the logits at
        position ``t`` are scored against ``labels[:, t + 1]`` (the shift happens here), positions
        labelled ``-100`` are left out, and ``.loss`` is the mean cross entropy over the rest
        (NaN when none is left). ``model(tokens, labels=tokens)`` is the language-model loss.
        With a ``state``, the piece's first label is never a target: its prediction was made at
        the end of the previous piece.
        """
        tokens = self._check_tokens(tokens)
        batch, time = tokens.shape
        if labels is not None:
            labels = self._check_labels(labels, tokens)
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
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits, ModelState(tuple(new_states), position, batch), loss)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        state: ModelState | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
    ) -> Tensor:
        """Continue ``prompt`` ``[batch, time]`` by up to ``max_new_tokens`` sampled tokens.

        Decoding is incremental: the prompt is read once, then each new token is fed alone with the
        carried state, so the cost per token does not grow with what has been read (attention
        caches hold only their window). Returns prompt + new tokens.

        Each token is drawn by :func:`memforge.sampling.sample_next`: ``temperature=0`` is greedy;
        otherwise the logits are divided by ``temperature``, cut to the ``top_k`` most likely
        tokens and then to the nucleus of probability ``top_p``, and sampled with ``generator``.

        ``stop_token``: a sequence that draws it is finished; the stop token is kept and every
        later position of that sequence holds the stop token again (the model still reads them,
        so the batch keeps its shape). Decoding ends when every sequence has finished, so the
        result may be shorter than ``time + max_new_tokens``. Checking that costs one
        host-device synchronisation per new token on an accelerator.

        ``compile=True`` decodes with fixed-shape buffers and a ``torch.compile``-d model step
        (:class:`memforge.decoding.StaticDecoder`): the same tokens up to float rounding, several
        times faster per token once compiled; the first generation per process pays a compilation
        of a few graphs. Every block must implement ``DecodesStatically`` (all of memforge's do).
        Sampling and stopping are the same on both paths.

        Prompt and new tokens together may not exceed
        :data:`memforge.sampling.MAX_SEQUENCE_TOKENS` (2^24); more is refused up front.
        """
        check_sampling_arguments(max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, stop_token=stop_token,
                                 vocab_size=self.vocab_size,
                                 prompt_length=prompt.shape[-1] if isinstance(prompt, Tensor) else 0)
        device = self.embedding.weight.device
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != device.type):
            what = (f"a generator on {generator.device}" if isinstance(generator, torch.Generator)
                    else type(generator).__name__)
            raise InputError(f"generator must be a torch.Generator on the model's device "
                             f"({device}), got {what}")
        if not isinstance(compile, bool):
            raise InputError(f"compile must be True or False, got {compile!r}")
        if compile:
            check_static_decoding(self)
        out = self(prompt, state)
        tokens = [self._check_tokens(prompt)]
        logits, state = out.logits[:, -1], out.state
        decoder = (StaticDecoder(self, state, capacity=max_new_tokens - 1)
                   if compile and max_new_tokens > 1 else None)
        finished = torch.zeros(state.batch_size, 1, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                     generator=generator)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            tokens.append(next_token)
            if step + 1 == max_new_tokens or (stop_token is not None and bool(finished.all())):
                break
            if decoder is not None:
                logits = decoder.step(next_token)
            else:
                out = self(next_token, state)
                logits, state = out.logits[:, -1], out.state
        return torch.cat(tokens, dim=1)
