"""S-NIAH, a token-level analogue of RULER's single-needle-in-a-haystack tasks (arXiv 2404.06654).

One row is the first ``seq_len`` tokens of the stream::

    haystack[:p]  MARK key SEP value  haystack[p:]  QUERY key SEP value

and the targets are the stream shifted by one, scored only on the ``value_len`` value tokens of
the answer (the first is predicted after SEP). Token ids:

* 0 pad (unused), 1 MARK, 2 SEP, 3 QUERY;
* 4..19 the 16 hex digits ``0-9a-f`` (number values use only ``0-9``);
* 20..vocab_size-1 "words": haystack filler and key tokens.

Variants, after RULER's ``niah_single_1/2/3``:

* ``"repeat"``: the haystack repeats one fixed pattern of ``pattern_len`` words (the same for every
  row, seed and split, like RULER's "The grass is green. The sky is blue. ..."); number value.
* ``"random"``: uniform random words (standing in for essays); number value.
* ``"uuid"``: uniform random words; a 32-hex-digit value.

The needle starts at haystack offset ``p = round(depth * haystack_len)``: depth 0 puts it first,
depth 1 right before the query. Generation is a few vectorised ops, cheap at any length.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from memforge.tasks.base import (
    IGNORE_INDEX,
    TaskBatch,
    check_batch_size,
    describe_fields,
    float_range,
    int_range,
    one_of,
    require,
    split_generator,
)

MARK, SEP, QUERY = 1, 2, 3
#: Token id of hex digit 0; digit ``d`` is ``FIRST_DIGIT + d``.
FIRST_DIGIT = 4
#: Token id of the first word (haystack filler and key tokens).
FIRST_WORD = FIRST_DIGIT + 16
VARIANTS: tuple[str, ...] = ("repeat", "random", "uuid")


def _default_value_len(task: NeedleInHaystack) -> int:
    """RULER's value lengths: a 7-digit number, or a 32-hex-digit UUID."""
    return 32 if task.variant == "uuid" else 7


@attrs.frozen(kw_only=True)
class NeedleInHaystack:
    """Single needle in a haystack (see the module docstring for the token layout).

    Attributes:
        variant: ``"repeat"``, ``"random"`` or ``"uuid"``.
        vocab_size: total vocabulary; ids from 20 up are words.
        seq_len: tokens per row; evaluation may raise it (``attrs.evolve``) far past training.
        depth: needle position as a fraction of the haystack, 0..1; ``None`` draws it uniformly
            per row.
        key_len: key tokens (RULER keys are adjective-noun pairs, hence 2).
        value_len: value tokens; defaults to 7 (number) or 32 (``"uuid"``).
        pattern_len: length of the repeated haystack pattern (``"repeat"`` only).
    """

    name: ClassVar[str] = "s-niah"

    variant: str = attrs.field(default="random", validator=one_of(VARIANTS))
    vocab_size: int = attrs.field(default=256, validator=int_range(FIRST_WORD + 2))
    seq_len: int = attrs.field(default=256, validator=int_range(8))
    depth: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(float_range(0.0, 1.0))
    )
    key_len: int = attrs.field(default=2, validator=int_range(1))
    value_len: int = attrs.field(
        default=attrs.Factory(_default_value_len, takes_self=True), validator=int_range(1)
    )
    pattern_len: int = attrs.field(default=16, validator=int_range(1))

    def __attrs_post_init__(self) -> None:
        need = 2 * self._needle_len
        require(
            self.seq_len >= need,
            f"s-niah: seq_len={self.seq_len} is too short for key_len={self.key_len} and "
            f"value_len={self.value_len}: needle and query take 2*(2+key_len+value_len)={need} "
            f"tokens; raise seq_len to at least {need}",
        )

    @property
    def _needle_len(self) -> int:
        """Tokens in ``MARK key SEP value`` (the query tail has the same length)."""
        return 2 + self.key_len + self.value_len

    @property
    def haystack_len(self) -> int:
        """Filler tokens per row; the needle starts at offset ``round(depth * haystack_len)``."""
        return self.seq_len + 1 - 2 * self._needle_len

    def batch(self, batch_size: int, *, seed: int, split: str = "train") -> TaskBatch:
        """Return ``batch_size`` rows for the stream (seed, split)."""
        check_batch_size(self.name, batch_size)
        generator = split_generator(self.name, seed, split)
        b, hay_len, needle_len = batch_size, self.haystack_len, self._needle_len

        if self.variant == "repeat":
            # Seeded by a constant, not the stream: the pattern is part of the task definition.
            pattern_rng = torch.Generator().manual_seed(0)
            pattern = torch.randint(FIRST_WORD, self.vocab_size, (self.pattern_len,), generator=pattern_rng)
            haystack = pattern.repeat(-(-hay_len // self.pattern_len))[:hay_len].expand(b, -1)
        else:
            haystack = torch.randint(FIRST_WORD, self.vocab_size, (b, hay_len), generator=generator)

        keys = torch.randint(FIRST_WORD, self.vocab_size, (b, self.key_len), generator=generator)
        radix = 16 if self.variant == "uuid" else 10
        values = FIRST_DIGIT + torch.randint(radix, (b, self.value_len), generator=generator)
        if self.depth is None:
            starts = torch.randint(hay_len + 1, (b, 1), generator=generator)
        else:
            starts = torch.full((b, 1), round(self.depth * hay_len))

        def framed(head: int) -> torch.Tensor:
            column = torch.full((b, 1), head)
            return torch.cat([column, keys, torch.full((b, 1), SEP), values], dim=1)

        # Splice the needle into the haystack by index arithmetic instead of per-row loops.
        offsets = torch.arange(hay_len + needle_len).expand(b, -1)
        in_needle = (offsets >= starts) & (offsets < starts + needle_len)
        hay_index = torch.where(offsets < starts, offsets, offsets - needle_len).clamp(0, hay_len - 1)
        context = torch.gather(haystack, 1, hay_index)
        needle_index = (offsets - starts).clamp(0, needle_len - 1)
        context = torch.where(in_needle, torch.gather(framed(MARK), 1, needle_index), context)

        stream = torch.cat([context, framed(QUERY)], dim=1)
        targets = stream[:, 1:].clone()
        targets[:, : -self.value_len] = IGNORE_INDEX
        return TaskBatch(stream[:, :-1].contiguous(), targets)

    def describe(self) -> dict[str, Any]:
        """Return the config (with the resolved ``value_len``) as a JSON-able dict."""
        return describe_fields(self)
