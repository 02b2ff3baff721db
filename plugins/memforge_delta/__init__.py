"""memforge_delta: DeltaNet and Gated DeltaNet, token-exact through the WY chunked kernel.

Functional ops (docs/delta.md)::

    from memforge_delta.ops import delta_rule, gated_delta_rule
    outputs, state = gated_delta_rule(q, k, v, beta, g)            # [B, H, T, d_v], [B, H, d_k, d_v]
    more, state = gated_delta_rule(q2, k2, v2, beta2, g2, state)    # continue the same sequences

``memforge_delta.reference`` holds the slow references they are tested against.
"""

from __future__ import annotations

from memforge_delta.ops import delta_rule, gated_delta_rule

__all__ = ["delta_rule", "gated_delta_rule"]
