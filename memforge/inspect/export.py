"""The JSON trace of one inspected sequence (docs/inspect.md, "The trace file").

Shape (``TRACE_SCHEMA`` is the JSON Schema a test validates against)::

    {"schema": "memforge.inspect/1", "source": ..., "task": {...}, "sample": 0, "length": T,
     "tokens": [T ints], "marks": {"queries": [...], "evidence_spans": [[start, end), ...]},
     "series_info": {name: what it is},
     "layers": [{"module": "blocks.0.memory", "block": 0, "component": "titans.neural_memory",
                 "heads": H, "series": {name: [H lists of T numbers]},
                 "retrieval": {"summary": {...}, "queries": [one row per query]}}],
     "predictions": [{"position", "target", "predicted", "correct"}]}

Series are indexed ``[head][token]``. The vector series ``read_output`` is used for the derived
series and the retrieval check, and left out of the file.
"""

from __future__ import annotations

from typing import Any

import torch

from memforge.inspect.recorder import Trace
from memforge.inspect.retrieval import retrieval_checks, summary
from memforge.interfaces import INSPECT_SERIES

SCHEMA_VERSION = "memforge.inspect/1"

#: Derived series (from the recorded ones and the block hooks) and what they are.
DERIVED_SERIES: dict[str, str] = {
    "read_norm": "norm of the head's share of the layer's output at the token",
    "read_contribution": "read_norm over the norm of the block's output at the token",
}

_NUMBERS = {"type": "array", "items": {"type": ["number", "null"]}}
_QUERY_ROW = {
    "type": "object",
    "required": ["position", "target", "best", "retrieved", "target_rank", "head_best",
                 "head_retrieved", "chance"],
    "properties": {
        "position": {"type": "integer", "minimum": 0},
        "target": {"type": "integer", "minimum": 0},
        "best": {"type": "integer", "minimum": 0},
        "retrieved": {"type": "boolean"},
        "target_rank": {"type": "integer", "minimum": 0},
        "head_best": {"type": "array", "items": {"type": "integer"}},
        "head_retrieved": {"type": "array", "items": {"type": "boolean"}},
        "chance": {"type": "number", "minimum": 0, "maximum": 1},
    },
}

#: JSON Schema (draft 2020-12) of a trace file.
TRACE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "source", "task", "sample", "length", "tokens", "marks", "series_info",
                 "layers", "predictions"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "source": {"type": "string"},
        "task": {"type": "object"},
        "sample": {"type": "integer", "minimum": 0},
        "length": {"type": "integer", "minimum": 1},
        "tokens": {"type": "array", "items": {"type": "integer"}},
        "marks": {
            "type": "object",
            "required": ["queries", "evidence_spans"],
            "properties": {
                "queries": {"type": "array", "items": {"type": "integer"}},
                "evidence_spans": {"type": "array", "items": {
                    "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
            },
        },
        "series_info": {"type": "object", "additionalProperties": {"type": "string"}},
        "layers": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["module", "block", "component", "heads", "series"],
            "properties": {
                "module": {"type": "string"},
                "block": {"type": ["integer", "null"]},
                "component": {"type": "string"},
                "heads": {"type": "integer", "minimum": 1},
                "series": {"type": "object", "additionalProperties": {
                    "type": "array", "items": _NUMBERS}},
                "retrieval": {"type": "object", "required": ["summary", "queries"], "properties": {
                    "summary": {"type": "object"},
                    "queries": {"type": "array", "items": _QUERY_ROW}}},
            },
        }},
        "predictions": {"type": "array", "items": {
            "type": "object", "required": ["position", "target", "predicted", "correct"]}},
    },
}

#: Series that are vectors per token: used for derived series and the retrieval check, not
#: written out.
VECTOR_SERIES = ("read_output",)


def _rounded(values: torch.Tensor) -> list[list[float | None]]:
    """``[H, T]`` as nested lists, 6 significant digits (``None`` for non-finite values)."""
    return [[float(f"{v:.6g}") if v == v and abs(v) != float("inf") else None for v in row]
            for row in values.tolist()]


def trace_json(trace: Trace, *, sample: int, tokens: torch.Tensor, source: str,
               task: dict[str, Any], queries: list[dict[str, Any]] | None = None,
               components: dict[int, str] | None = None,
               logits: torch.Tensor | None = None, targets: torch.Tensor | None = None
               ) -> dict[str, Any]:
    """The trace file's content for sequence ``sample`` of the recorded batch.

    Args:
        trace: what :func:`memforge.inspect.recording` recorded.
        sample: which sequence of the batch.
        tokens: that sequence's tokens ``[T]``.
        source: the run or preset inspected.
        task: the task's description (or ``{"text": path}``).
        queries: ``{"position", "evidence", "target", "candidates"}`` per query, for the
            retrieval check (:mod:`memforge.inspect.retrieval`).
        components: registry names of the memory layers by block (else the module's class).
        logits, targets: ``[T, V]`` and ``[T]`` of that sequence, for the model's own predictions.
    """
    queries = queries or []
    layers = []
    for layer in trace.layers:
        names = [n for n in trace.names(layer) if n not in VECTOR_SERIES]
        series = {name: _rounded(trace.series(layer, name)[sample]) for name in names}
        entry: dict[str, Any] = {
            "module": layer.name, "block": layer.block,
            "component": (components or {}).get(layer.block, type(layer.layer).__name__),
            "heads": len(next(iter(series.values()))), "series": series,
        }
        if queries and "read_output" in layer.calls and trace.can_decode:
            rows = retrieval_checks(trace.decoded(layer)[sample], queries)
            entry["retrieval"] = {"summary": summary(rows), "queries": rows}
        layers.append(entry)
    predictions = []
    if logits is not None and targets is not None:
        predicted = logits.argmax(-1)
        for query in queries:
            p = query["position"]
            predictions.append({"position": p, "target": int(targets[p]),
                                "predicted": int(predicted[p]),
                                "correct": bool(predicted[p] == targets[p])})
    spans = sorted({(min(q["evidence"]), max(q["evidence"]) + 1) for q in queries})
    return {
        "schema": SCHEMA_VERSION, "source": source, "task": task, "sample": sample,
        "length": trace.length, "tokens": [int(t) for t in tokens],
        "marks": {"queries": [q["position"] for q in queries],
                  "evidence_spans": [list(s) for s in spans]},
        "series_info": {**INSPECT_SERIES, **DERIVED_SERIES},
        "layers": layers, "predictions": predictions,
    }
