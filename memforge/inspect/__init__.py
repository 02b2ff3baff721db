"""A look inside a model's memory while it reads (docs/inspect.md).

::

    import memforge.inspect

    with memforge.inspect.recording(model) as trace:
        model(tokens)
    layer = trace.layers[0]
    trace.series(layer, "surprise")          # [B, H, T]: per sequence, head and token

Memory layers take part through the capability :class:`memforge.interfaces.InspectsMemory`
(``titans.neural_memory``, the delta layers and the example plugin's ``example.gla`` do); the
series they emit are listed in :data:`memforge.interfaces.INSPECT_SERIES`. ``memforge inspect``
writes a JSON trace and plots for one task sample or text file.
"""

from __future__ import annotations

from memforge.inspect.export import SCHEMA_VERSION, TRACE_SCHEMA, trace_json
from memforge.inspect.recorder import LayerRecorder, Trace, recording
from memforge.inspect.retrieval import retrieval_checks

__all__ = ["SCHEMA_VERSION", "TRACE_SCHEMA", "LayerRecorder", "Trace", "recording",
           "retrieval_checks", "trace_json"]
