"""The fast-weight memory engine: one memory layer that hosts every test-time learning rule.

A rule is a memory network (the function class), an objective, a retention and an optimiser, run
on a schedule of chunks (docs/memory.md). The engine's layer builds the per-token inputs, then
dispatches the scan to an executor that can run the rule: the token-exact WY kernel of the delta
rule (:mod:`memforge.engine.wy`, :mod:`memforge.engine.wy_executor`), the closed-form chunk kernel
(:mod:`memforge.engine.chunked`) and its fixed-shape decoding step
(:mod:`memforge.engine.static_chunk`), with float64 token-by-token references beside them
(:mod:`memforge.engine.reference`). Plugins build on these modules; nothing here names a plugin.
"""

#: The kinds the engine's layer is built from (``FastWeightMemoryLayer.from_context``): what a
#: ``memory_layer`` component built on the engine declares in its ``requires``.
LAYER_PARTS: tuple[str, ...] = ("projection", "memory", "objective", "optimizer", "retention",
                                "retrieval")
