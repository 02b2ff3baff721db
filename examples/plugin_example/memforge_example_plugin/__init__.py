"""An example third-party memforge plugin: gated linear attention as a memory layer.

memforge does not ship this memory family. The package adds the memory layer ``example.gla``
(:mod:`memforge_example_plugin.gla`) and puts it into every Titans integration:
``example.gla_lmm_tiny``, ``example.gla_mac_tiny``, ``example.gla_mag_tiny`` and
``example.gla_mal_tiny``. It imports only memforge's public API (docs/plugins.md, "What a
plugin may import").

Install it (``pip install examples/plugin_example``) and memforge finds it through the entry point
``memforge.plugins``: ``memforge list`` shows ``example.gla``, ``memforge train --preset
example.gla_mag_tiny`` trains one.
"""

from __future__ import annotations

import attrs

import memforge

#: The plugin's name (its entry point's), for registering the module directly in a script or test.
memforge_name = "example"

#: The Titans memory layer's parts, which example.gla does not use.
TITANS_PARTS = ("memory", "objective", "optimizer", "retention", "retrieval", "projection")


@attrs.frozen(kw_only=True)
class GLAConfig:
    """Settings of ``example.gla``."""

    chunk_size: int = memforge.option(16, ge=1, help="tokens per step of the chunked form (exact "
                                                     "at any size)")
    temperature: float = memforge.option(16.0, gt=0, help="divides the log decay: larger keeps "
                                                          "memory longer")


def _gla(config: GLAConfig, ctx: memforge.BuildContext):
    from memforge_example_plugin.gla import GatedLinearAttention  # torch work only when built

    return GatedLinearAttention(ctx.dim, ctx.heads, chunk_size=config.chunk_size,
                                temperature=config.temperature)


@memforge.hookimpl
def memforge_register_components():
    return [memforge.ComponentSpec(
        kind="memory_layer", name="example.gla", config_cls=GLAConfig, factory=_gla,
        summary="gated linear attention: S_t = a_t S_{t-1} + k_t v_t^T, chunked, exact",
        paper="Yang, Wang, Shen, Panda, Kim 2024, Gated Linear Attention Transformers")]


def _preset(integration: str):
    def build() -> memforge.ModelSpec:
        spec = memforge.preset(f"titans.{integration}_tiny")
        return attrs.evolve(spec, memory_layer=memforge.ComponentChoice("example.gla", GLAConfig()),
                            **dict.fromkeys(TITANS_PARTS))

    return memforge.PresetSpec(name=f"example.gla_{integration}_tiny", build=build,
                               summary=f"titans.{integration}_tiny with example.gla as its memory")


@memforge.hookimpl
def memforge_register_presets():
    return [_preset(integration) for integration in ("lmm", "mac", "mag", "mal")]
