"""BABILong qa1 analogue: bAbI "single supporting fact" facts hidden in filler (arXiv 2406.10149).

One row is the first ``seq_len`` tokens of the stream::

    filler sentences with 2..10 facts between them ... WHERE IS person QMARK location

where a fact is the 5 tokens ``person verb TO location PERIOD`` ("Mary journeyed to the kitchen.")
and filler sentences are random filler words ending in PERIOD, with geometric lengths of mean
``sentence_len`` (standing in for PG19 text). Facts go in at sentence boundaries, in order. The
person asked about is drawn uniformly from those the row's facts mention; the one scored target is
that person's location in their *last* fact, predicted after QMARK. Token ids:

* 0 pad (unused), 1 PERIOD, 2 WHERE, 3 IS, 4 QMARK, 5 TO ("to the");
* then ``num_people`` people, ``num_verbs`` verbs ("moved", "went", ...), ``num_locations``
  locations;
* the remaining ids up to ``vocab_size`` are filler words.
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
    int_range,
    require,
    split_generator,
)

PERIOD, WHERE, IS, QMARK, TO = 1, 2, 3, 4, 5
#: Token id of the first person; verbs, locations and filler words follow (see the docstring).
FIRST_PERSON = 6
FACT_LEN = 5
QUESTION_LEN = 4


@attrs.frozen(kw_only=True)
class BabilongQA1:
    """qa1-style fact retrieval in filler text (see the module docstring for the token layout).

    Attributes:
        vocab_size: total vocabulary; ids past the people, verbs and locations are filler words.
        seq_len: tokens per row.
        min_facts, max_facts: facts per row are drawn uniformly from ``[min_facts, max_facts]``
            (qa1: 2-10).
        num_people, num_verbs, num_locations: sizes of the fact vocabularies (bAbI qa1: 4, 4, 6).
        sentence_len: mean filler sentence length in tokens, PERIOD included.
    """

    name: ClassVar[str] = "babilong-qa1"

    vocab_size: int = attrs.field(default=256, validator=int_range(FIRST_PERSON + 4))
    seq_len: int = attrs.field(default=256, validator=int_range(FACT_LEN + QUESTION_LEN))
    min_facts: int = attrs.field(default=2, validator=int_range(1))
    max_facts: int = attrs.field(default=10, validator=int_range(1))
    num_people: int = attrs.field(default=4, validator=int_range(1))
    num_verbs: int = attrs.field(default=4, validator=int_range(1))
    num_locations: int = attrs.field(default=6, validator=int_range(2))
    sentence_len: int = attrs.field(default=8, validator=int_range(2))

    def __attrs_post_init__(self) -> None:
        require(
            self.min_facts <= self.max_facts,
            f"babilong-qa1: min_facts={self.min_facts} must be <= max_facts={self.max_facts}",
        )
        need = FACT_LEN * self.max_facts + QUESTION_LEN
        require(
            self.seq_len >= need,
            f"babilong-qa1: seq_len={self.seq_len} cannot hold max_facts={self.max_facts} facts "
            f"and the question: needs 5*max_facts+4={need}; raise seq_len or lower max_facts",
        )
        require(
            self._first_filler < self.vocab_size,
            f"babilong-qa1: vocab_size={self.vocab_size} leaves no filler words after "
            f"{self._first_filler} special/people/verb/location tokens; raise vocab_size",
        )

    @property
    def _first_verb(self) -> int:
        return FIRST_PERSON + self.num_people

    @property
    def _first_location(self) -> int:
        return self._first_verb + self.num_verbs

    @property
    def _first_filler(self) -> int:
        return self._first_location + self.num_locations

    def batch(self, batch_size: int, *, seed: int, split: str = "train") -> TaskBatch:
        """Return ``batch_size`` rows for the stream (seed, split)."""
        check_batch_size(self.name, batch_size)
        generator = split_generator(self.name, seed, split)
        rows = [self._row(generator) for _ in range(batch_size)]
        stream = torch.stack(rows)
        targets = torch.full_like(stream[:, 1:], IGNORE_INDEX)
        targets[:, -1] = stream[:, -1]
        return TaskBatch(stream[:, :-1].contiguous(), targets)

    def _row(self, generator: torch.Generator) -> torch.Tensor:
        """One stream of ``seq_len + 1`` tokens: context, question and answer."""
        rand = lambda high, size: torch.randint(high, size, generator=generator)
        num_facts = self.min_facts + int(rand(self.max_facts - self.min_facts + 1, ()))
        people = FIRST_PERSON + rand(self.num_people, (num_facts,))
        locations = self._first_location + rand(self.num_locations, (num_facts,))
        facts = torch.stack(
            [
                people,
                self._first_verb + rand(self.num_verbs, (num_facts,)),
                torch.full((num_facts,), TO),
                locations,
                torch.full((num_facts,), PERIOD),
            ],
            dim=1,
        )

        filler_len = self.seq_len + 1 - QUESTION_LEN - 1 - FACT_LEN * num_facts
        filler = torch.randint(self._first_filler, self.vocab_size, (filler_len,), generator=generator)
        ends = torch.rand(filler_len, generator=generator) < 1 / self.sentence_len
        if filler_len:
            ends[-1] = True  # the question starts a sentence of its own
        filler[ends] = PERIOD
        boundaries = torch.cat([torch.zeros(1, dtype=torch.long), ends.nonzero()[:, 0] + 1])
        # Sorted draws with replacement keep the facts in order; equal draws put facts back to back.
        inserts = boundaries[rand(len(boundaries), (num_facts,))].sort().values
        fact_starts = inserts + FACT_LEN * torch.arange(num_facts)

        context = torch.empty(filler_len + FACT_LEN * num_facts, dtype=torch.long)
        is_fact = torch.zeros_like(context, dtype=torch.bool)
        is_fact[(fact_starts[:, None] + torch.arange(FACT_LEN)).flatten()] = True
        context[is_fact] = facts.flatten()
        context[~is_fact] = filler

        mentioned = people.unique()
        person = mentioned[rand(len(mentioned), ())]
        answer = locations[(people == person).nonzero()[-1, 0]]
        question = torch.tensor([WHERE, IS, int(person), QMARK, int(answer)])
        return torch.cat([context, question])

    def describe(self) -> dict[str, Any]:
        """Return the config as a JSON-able dict."""
        return describe_fields(self)
