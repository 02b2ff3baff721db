"""Building blocks every plugin composes: norms, rotary embeddings, SwiGLU, attention helpers,
the projections' short causal convolution.

One place in the core, so that plugins share them instead of importing each other's modules
(docs/plugins.md, "What a plugin may import")::

    from memforge.nn import RMSNorm, RotaryEmbedding, SwiGLU, attend, causal_depthwise_conv, causal_mask

Each is a plain ``torch.nn.Module`` or function with plain arguments; none sees a config object.
"""

from __future__ import annotations

from memforge.nn.attention import (
    attend,
    attend_visible,
    batch_persistent_kv,
    causal_mask,
    static_attention_buffers,
)
from memforge.nn.convolution import causal_depthwise_conv
from memforge.nn.feedforward import SwiGLU
from memforge.nn.norms import RMSNorm
from memforge.nn.rotary import RotaryEmbedding, apply_rotary, rotary_angles, rotate

__all__ = [
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary",
    "attend",
    "attend_visible",
    "batch_persistent_kv",
    "causal_depthwise_conv",
    "causal_mask",
    "rotary_angles",
    "rotate",
    "static_attention_buffers",
]
