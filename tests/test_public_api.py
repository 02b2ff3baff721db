"""The public surface of ``memforge`` is pinned: changing it must be a deliberate act."""

import memforge

PINNED = [
    "MEMORY_KINDS",
    "Attention",
    "Block",
    "BuildContext",
    "ChunkReader",
    "CompilesSteps",
    "ComposesAttention",
    "DecodesAttentionStatically",
    "DecodesMemoryStatically",
    "DecodesStatically",
    "FactorsThroughGram",
    "FeedForward",
    "DescribesRule",
    "Objective",
    "ObjectiveInputs",
    "Optimizer",
    "ProjectsWeights",
    "Retention",
    "RuleDescription",
    "StepGates",
    "TIERS",
    "TransformsUpdate",
    "Linear",
    "MemoryLayer",
    "MemoryNetwork",
    "Projection",
    "ReadsMemory",
    "ReadsMemoryStatically",
    "RetrievalRule",
    "StaticDecodeStart",
    "StaticDecoder",
    "capabilities",
    "interfaces",
    "nn",
    "ComponentChoice",
    "ComponentSpec",
    "InputError",
    "KINDS",
    "MemforgeError",
    "ModelOutput",
    "ModelSpec",
    "ModelState",
    "NonFiniteError",
    "PluginError",
    "PresetSpec",
    "SpecError",
    "UnknownNameError",
    "apply_overrides",
    "available",
    "build_model",
    "checks_values",
    "compile_model",
    "configure_plugins",
    "hookimpl",
    "load_model",
    "load_spec",
    "option",
    "override",
    "preset",
    "presets",
    "save_model",
    "save_spec",
    "sized_presets",
    "spec_id",
]


def test_all_is_pinned():
    assert sorted(memforge.__all__) == sorted(PINNED)


def test_every_public_name_exists():
    missing = [name for name in memforge.__all__ if not hasattr(memforge, name)]
    assert missing == []


def test_issue_api_signatures():
    """The calls the README documents work as documented."""
    spec = memforge.preset("baseline.transformer_tiny", dim=48)
    assert spec.dim == 48
    assert "baseline.transformer_tiny" in memforge.presets()
    assert "baseline.causal" in memforge.available("attention")
    assert set(memforge.available()) == set(memforge.KINDS)
    assert memforge.override(spec, ["num_layers=3"]).num_layers == 3


def test_what_the_plugin_guide_tells_authors_to_use_is_public():
    """docs/plugins.md builds plugins from these names only."""
    from memforge.nn import RMSNorm, RotaryEmbedding, SwiGLU, attend, causal_mask  # noqa: F401

    assert memforge.interfaces.MemoryLayer is memforge.MemoryLayer
    assert memforge.Linear(4, 4)(memforge.nn.RMSNorm(4)(__import__("torch").ones(1, 4))).shape == (1, 4)
    assert callable(memforge.capabilities.require)
