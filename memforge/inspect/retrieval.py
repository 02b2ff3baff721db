"""Does the memory's read at a query retrieve the right value? (docs/inspect.md, "Retrieval")

The criterion compares, per memory layer, the raw read at the query position ``q`` (the
``read`` series, heads concatenated) with every value the layer wrote before it (the
``written_value`` series at positions ``t < q``) by cosine similarity. The read *retrieves* when
the best-matching written value sits in the query's evidence: for MQAR, the key and value tokens
of the queried pair (positions ``2j`` and ``2j + 1``); for S-NIAH, the needle. A fast-weight
memory trained on ``||M(k) - v||^2`` returns, for a query that matches a stored key, a read near
that key's value, so the match says which write the read came from. Chance is the evidence's
share of the candidates (``2 / q`` for an MQAR pair).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor


def best_matches(read: Tensor, written: Tensor, query: int) -> tuple[int, list[int]]:
    """The position ``t < query`` whose written value matches the read at ``query`` best, with
    all heads together and per head. ``read`` and ``written`` are ``[H, T, d]`` (one sequence)."""
    heads = F.cosine_similarity(read[:, query, None, :], written[:, :query, :], dim=-1)  # [H, q]
    together = F.cosine_similarity(read[:, query].flatten()[None, :],
                                   written[:, :query].transpose(0, 1).flatten(1), dim=-1)  # [q]
    return int(together.argmax()), [int(h) for h in heads.argmax(-1)]


def retrieval_checks(read: Tensor, written: Tensor, queries: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """One row per query: ``{"position", "evidence", "best_match", "retrieved", "head_matches",
    "head_retrieved", "chance"}``; ``queries`` holds ``{"position", "evidence"}`` dicts."""
    rows = []
    for query in queries:
        position, evidence = query["position"], set(query["evidence"])
        if position == 0:
            continue
        best, per_head = best_matches(read, written, position)
        rows.append({
            "position": position,
            "evidence": sorted(evidence),
            "best_match": best,
            "retrieved": best in evidence,
            "head_matches": per_head,
            "head_retrieved": [h in evidence for h in per_head],
            "chance": len([e for e in evidence if e < position]) / position,
        })
    return rows


def mqar_queries(tokens: Tensor, targets: Tensor, num_pairs: int) -> list[dict[str, Any]]:
    """MQAR's query positions (scored targets) with their pair's key and value positions."""
    keys = tokens[: 2 * num_pairs : 2].tolist()
    out = []
    for position in (targets != -100).nonzero().flatten().tolist():
        pair = keys.index(int(tokens[position]))
        out.append({"position": position, "evidence": [2 * pair, 2 * pair + 1],
                    "target": int(targets[position])})
    return out


def needle_queries(tokens: Tensor, targets: Tensor, needle: tuple[int, int]
                   ) -> list[dict[str, Any]]:
    """S-NIAH's scored positions (the answer's digits), each with the needle span as evidence."""
    span = list(range(*needle))
    return [{"position": p, "evidence": span, "target": int(targets[p])}
            for p in (targets != -100).nonzero().flatten().tolist()]


def summary(rows: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """How many queries a layer retrieves, and chance."""
    if not rows:
        return {"queries": 0, "retrieved": None, "chance": None}
    hits = sum(r["retrieved"] for r in rows)
    return {"queries": len(rows), "retrieved": hits / len(rows),
            "chance": sum(r["chance"] for r in rows) / len(rows)}
