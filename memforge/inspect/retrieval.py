"""Does the memory's read at a query retrieve the right value? (docs/inspect.md, "Retrieval")

A memory layer's read at the query position ``q`` is decoded through the rest of the model's
direct path into logits (:meth:`memforge.inspect.Trace.decoded`: the final norm with the scale
the model really applied there, then the unembedding; the logits of all residual branches sum to
the model's). The read **retrieves** when, among the query's candidate answers, the decoded read
ranks the right one first: for MQAR the ``n`` values in the context (chance ``1 / n``), for
S-NIAH the digit tokens (chance 1/10, or 1/16 for UUIDs). The same per head, from each head's
share of the read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def retrieval_checks(decoded: Tensor, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per query: ``{"position", "target", "best", "retrieved", "target_rank",
    "head_best", "head_retrieved", "chance"}``.

    Args:
        decoded: one sequence's decoded read shares ``[H, T, V]``.
        queries: ``{"position", "target", "candidates"}`` dicts (``candidates``: token ids).
    """
    rows = []
    for query in queries:
        position, target, candidates = query["position"], query["target"], query["candidates"]
        ids = torch.tensor(candidates)
        per_head = decoded[:, position, ids]                     # [H, candidates]
        together = per_head.sum(0)
        rank = int((together > together[candidates.index(target)]).sum())
        head_best = [candidates[int(i)] for i in per_head.argmax(-1)]
        best = candidates[int(together.argmax())]
        rows.append({
            "position": position, "target": target, "best": best, "retrieved": best == target,
            "target_rank": rank, "head_best": head_best,
            "head_retrieved": [b == target for b in head_best], "chance": 1 / len(candidates),
        })
    return rows


def mqar_queries(tokens: Tensor, targets: Tensor, num_pairs: int) -> list[dict[str, Any]]:
    """MQAR's query positions (scored targets): the pair's key and value positions as evidence,
    the context's ``num_pairs`` values as candidates."""
    keys = tokens[: 2 * num_pairs : 2].tolist()
    values = tokens[1 : 2 * num_pairs : 2].tolist()
    out = []
    for position in (targets != -100).nonzero().flatten().tolist():
        pair = keys.index(int(tokens[position]))
        out.append({"position": position, "evidence": [2 * pair, 2 * pair + 1],
                    "target": int(targets[position]), "candidates": values})
    return out


def needle_queries(tokens: Tensor, targets: Tensor, needle: tuple[int, int],
                   digits: list[int]) -> list[dict[str, Any]]:
    """S-NIAH's scored positions (the answer's digits): the needle as evidence, ``digits`` (the
    value alphabet's token ids) as candidates."""
    span = list(range(*needle))
    return [{"position": p, "evidence": span, "target": int(targets[p]), "candidates": digits}
            for p in (targets != -100).nonzero().flatten().tolist()]


def summary(rows: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """The share of queries whose read retrieves, and chance."""
    if not rows:
        return {"queries": 0, "retrieved": None, "chance": None}
    return {"queries": len(rows), "retrieved": sum(r["retrieved"] for r in rows) / len(rows),
            "chance": sum(r["chance"] for r in rows) / len(rows)}
