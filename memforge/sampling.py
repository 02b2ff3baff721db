"""Choosing each next token in ``generate``: greedy, or sampling with temperature, top-k, top-p.

The filters apply in the order HF ``generate`` users know: the logits are divided by the
temperature, then only the ``top_k`` most likely tokens are kept, then only the smallest set of
those whose probabilities sum to at least ``top_p`` (nucleus sampling; the most likely token is
always kept). ``temperature=0`` is greedy and ignores both filters. See ``docs/decoding.md``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from memforge.errors import InputError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: The longest sequence ``generate`` makes, prompt and new tokens together (2^24 = 16M tokens).
#: The result alone then takes 128 MiB per sequence; far longer runs are typos (``2**40``).
MAX_SEQUENCE_TOKENS = 2**24


def check_sampling_arguments(
    *,
    max_new_tokens: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    stop_token: Any,
    vocab_size: int,
    prompt_length: int = 0,
) -> None:
    """Raise an :class:`InputError` naming the first of ``generate``'s arguments that is unusable.

    ``prompt_length`` tokens plus ``max_new_tokens`` may not exceed :data:`MAX_SEQUENCE_TOKENS`.
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_length + max_new_tokens > MAX_SEQUENCE_TOKENS:
        raise InputError(f"max_new_tokens={max_new_tokens} after a prompt of {prompt_length} tokens "
                         f"is more than the {MAX_SEQUENCE_TOKENS} tokens a generated sequence may "
                         f"hold; ask for at most {max(MAX_SEQUENCE_TOKENS - prompt_length, 0)}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0: greedy), got "
                         f"{temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1, or None to keep every token; got "
                         f"{top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be a number in (0, 1], or None to keep every token; got "
                         f"{top_p!r}")
    if stop_token is not None and (not _is_int(stop_token) or not 0 <= stop_token < vocab_size):
        raise InputError(f"stop_token must be a token id in [0, {vocab_size - 1}], or None; got "
                         f"{stop_token!r}")


def keep_top_p(logits: Tensor, top_p: float) -> Tensor:
    """``logits`` ``[batch, vocab]`` with every token outside the nucleus of ``top_p`` at -inf.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    ``top_p``: a token is dropped when the tokens ranked above it already reach ``top_p``, so the
    most likely one always stays. Ties keep the lower token id first, as ``argmax`` does.
    """
    ranked, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(ranked, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    ranked = ranked.masked_fill(before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ranked)


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of ``logits`` ``[batch, vocab]`` as ``[batch, 1]`` (see the module).

    ``top_p=1`` (or ``None``) and ``top_k >= vocab`` filter nothing: the draw is then the same as
    plain sampling with the same ``generator``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = keep_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
