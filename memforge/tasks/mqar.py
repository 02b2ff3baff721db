"""MQAR, multi-query associative recall, following Zoology's ``multiquery_ar`` (arXiv 2312.04927).

Layout of one row of ``seq_len`` tokens (``n = num_pairs``)::

    k1 v1 k2 v2 ... kn vn | query region of seq_len - 2n tokens

Keys are distinct tokens from ``[1, V/2)``, values distinct tokens from ``[V/2, V)``; token 0 is the
filler. Each key is queried once in the query region, at offset ``2 * gap`` where the gaps are drawn
without replacement from the power law ``p(g) ∝ a * g**(a - 1)`` (Zoology's ``power_a``), so most
queries come soon after the pairs. The target at a query position is the key's value; every other
target is -100. With ``random_non_queries`` the filler tokens of the query region become uniform
random tokens from ``[0, V)``, as in Zoology; as there, the value is *not* written after the query.

``min_query_distance`` (a memforge addition) pushes every query at least that many positions after
its key, e.g. beyond a sliding-window attention's window. It shifts the power law's support: gaps are
drawn from ``[g0, space)`` instead of ``[0, space)`` with ``g0 = ceil((D - 2) / 2)``; as the last key
sits at ``2n - 2`` and the earliest possible query at ``2n + 2 * g0``, every distance is then >= D.

Departures from Zoology: it also asserts ``V > seq_len``, which the task does not need (only enough
distinct keys and values), so CPU-sized vocabularies can go with longer sequences.
"""

from __future__ import annotations

import math
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
    is_bool,
    require,
    split_generator,
)

#: Natural logarithm of a margin inside float64's range (its largest finite number is e**709.78).
_LOG_FLOAT64_LIMIT = 700.0


@attrs.frozen(kw_only=True)
class MQAR:
    """Multi-query associative recall (Zoology procedure; see the module docstring).

    Attributes:
        vocab_size: ``V``; keys come from ``[1, V/2)``, values from ``[V/2, V)``, 0 is filler.
        seq_len: ``L``, tokens per row; even, and at least ``4 * num_pairs``.
        num_pairs: ``n``, key-value pairs per row, each queried once (``n`` scored positions).
        power_a: exponent ``a`` of the gap power law; 0.01 (Zoology) favours short gaps, 1 is
            uniform.
        random_non_queries: fill non-query positions of the query region with random tokens.
        min_query_distance: every query is at least this many positions after its key.
    """

    name: ClassVar[str] = "mqar"

    vocab_size: int = attrs.field(default=256, validator=int_range(4))
    seq_len: int = attrs.field(default=128, validator=int_range(4))
    num_pairs: int = attrs.field(default=8, validator=int_range(1))
    power_a: float = attrs.field(default=0.01, validator=float_range(0.0, math.inf, exclusive=True))
    random_non_queries: bool = attrs.field(default=True, validator=is_bool)
    min_query_distance: int = attrs.field(default=0, validator=int_range(0))

    def __attrs_post_init__(self) -> None:
        n, length, vocab = self.num_pairs, self.seq_len, self.vocab_size
        require(length % 2 == 0, f"mqar: seq_len={length} must be even (queries sit at even offsets)")
        require(
            4 * n <= length,
            f"mqar: num_pairs={n} needs 4*num_pairs <= seq_len={length}; lower num_pairs or raise seq_len",
        )
        require(
            n <= vocab // 2 - 1,
            f"mqar: num_pairs={n} needs num_pairs <= vocab_size//2 - 1 = {vocab // 2 - 1} distinct "
            f"keys (vocab_size={vocab}); lower num_pairs or raise vocab_size",
        )
        largest = 2 * (self._space - n) + 2
        require(
            self.min_query_distance <= largest,
            f"mqar: min_query_distance={self.min_query_distance} is impossible with "
            f"seq_len={length} and num_pairs={n} (largest possible: {largest}); "
            "lower min_query_distance or num_pairs, or raise seq_len",
        )
        # The gap weights a * g**(a - 1) are float64: their logarithms must stay inside its range
        # (about +-709) at both ends of the support, or sampling meets inf or all-zero weights.
        a, ranks = self.power_a, max(1, self._space - self._first_gap)
        exponent = (a - 1) * math.log(ranks)
        high, low = math.log(a) + max(0.0, exponent), math.log(a) + min(0.0, exponent)
        ceiling = 1 + _LOG_FLOAT64_LIMIT / math.log(ranks) if ranks > 1 else math.inf
        require(
            high < _LOG_FLOAT64_LIMIT and low > -_LOG_FLOAT64_LIMIT,
            f"mqar: power_a={a:g} makes the gap weights a * g**(a - 1) leave float64's range for "
            f"gaps up to {ranks}; use a power_a nearer 1 (at most {ceiling:.3g} here; 0.01 "
            f"favours short gaps, 1 is uniform)",
        )

    @property
    def _space(self) -> int:
        """Number of query slots (even offsets) in the query region."""
        return (self.seq_len - 2 * self.num_pairs) // 2

    @property
    def _first_gap(self) -> int:
        """Smallest allowed gap ``g0`` that keeps every query ``min_query_distance`` away."""
        return max(0, -(-(self.min_query_distance - 2) // 2))

    def batch(self, batch_size: int, *, seed: int, split: str = "train") -> TaskBatch:
        """Return ``batch_size`` MQAR rows for the stream (seed, split)."""
        check_batch_size(self.name, batch_size)
        generator = split_generator(self.name, seed, split)
        b, n, vocab = batch_size, self.num_pairs, self.vocab_size
        half = vocab // 2

        # Uniform weights without replacement = distinct keys (and values) inside each row.
        keys = torch.multinomial(torch.ones(b, half - 1), n, generator=generator) + 1
        values = torch.multinomial(torch.ones(b, vocab - half), n, generator=generator) + half

        g0 = self._first_gap
        ranks = torch.arange(1, self._space - g0 + 1, dtype=torch.float64)
        weights = self.power_a * ranks ** (self.power_a - 1)
        gaps = torch.multinomial(weights.expand(b, -1), n, generator=generator) + g0
        query_pos = 2 * n + 2 * gaps  # query of key j (position 2j) sits at query_pos[:, j]

        inputs = torch.zeros(b, self.seq_len, dtype=torch.long)
        inputs[:, 0 : 2 * n : 2] = keys
        inputs[:, 1 : 2 * n : 2] = values
        inputs.scatter_(1, query_pos, keys)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets.scatter_(1, query_pos, values)

        if self.random_non_queries:
            noise = torch.randint(0, vocab, inputs.shape, generator=generator)
            filler = torch.zeros_like(inputs, dtype=torch.bool)
            filler[:, 2 * n :] = True
            filler.scatter_(1, query_pos, False)
            inputs = torch.where(filler, noise, inputs)
        return TaskBatch(inputs, targets)

    def describe(self) -> dict[str, Any]:
        """Return the config as a JSON-able dict."""
        return describe_fields(self)
