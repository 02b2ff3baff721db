"""The memory layer is a kind: a plugin's memory layer goes into every Titans integration.

The layer here is what a third-party author writes from docs/plugins.md ("Writing a memory
layer"): a gated linear-attention memory ``S_t = g S_{t-1} + k_t^T v_t``, ``y_t = q_t S_t``,
token-recurrent (``chunk_size = 1``), with the ``ReadsMemory`` capability and no sub-kinds.
"""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memforge
from memforge.errors import InputError, SpecError
from memforge.plugins import as_module, load_plugins

DT = torch.float64


@attrs.frozen(kw_only=True)
class GatedConfig:
    """Settings of ``lab.gated``."""

    decay: float = memforge.option(0.9, gt=0, le=1, help="how much of the memory each token keeps")


class GatedMemory(nn.Module):
    """``forward(x [B, T, D], S | None) -> (y, S)`` with ``S`` ``[B, H, d, d]``."""

    chunk_size = 1

    def __init__(self, dim: int, heads: int, decay: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.decay = heads, dim // heads, decay
        self.qkv = memforge.Linear(dim, 3 * dim, bias=False)
        self.out = memforge.Linear(dim, dim, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _start(self, state: Tensor | None, batch: int) -> Tensor:
        if state is None:
            return self.out.weight.new_zeros(batch, self.heads, self.head_dim, self.head_dim)
        return state

    def read_state(self, state: Tensor | None, batch: int) -> Tensor:
        return self._start(state, batch)

    def read(self, queries: Tensor, snapshot: Tensor) -> Tensor:
        return queries @ snapshot

    def forward(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        k = F.normalize(k, dim=-1)
        memory = self._start(state, x.shape[0])
        outputs = []
        for t in range(x.shape[1]):
            memory = self.decay * memory + k[:, :, t, :, None] * v[:, :, t, None, :]
            outputs.append(q[:, :, t : t + 1] @ memory)
        y = torch.cat(outputs, dim=2).transpose(1, 2).flatten(2)
        return self.out(y), memory


class WriteOnlyMemory(GatedMemory):
    """The same layer without a way to read it without writing."""

    read_state = None  # type: ignore[assignment]
    read = None  # type: ignore[assignment]


def _registry(layer_cls: type = GatedMemory):
    def factory(config: GatedConfig, ctx: memforge.BuildContext) -> nn.Module:
        return layer_cls(ctx.dim, ctx.heads, config.decay)

    @memforge.hookimpl
    def memforge_register_components():
        return [memforge.ComponentSpec(kind="memory_layer", name="lab.gated", config_cls=GatedConfig,
                                       factory=factory, summary="gated linear-attention memory")]

    return load_plugins(autoload=False, extra=[as_module(
        "lab", memforge_register_components=memforge_register_components)])


REGISTRY = _registry()

#: The Titans memory layer's parts, which lab.gated does not use.
TITANS_PARTS = ("memory", "objective", "optimizer", "retention", "retrieval", "projection")


def _spec(preset: str, registry=REGISTRY) -> memforge.ModelSpec:
    return memforge.override(memforge.preset(preset),
                             ["memory_layer=lab.gated", *(f"{k}=none" for k in TITANS_PARTS)],
                             registry)


@pytest.mark.parametrize("preset", ["titans.lmm_tiny", "titans.mac_tiny", "titans.mag_tiny",
                                    "titans.mal_tiny"])
def test_a_plugin_memory_layer_goes_into_every_titans_integration(preset: str):
    spec = _spec(preset)
    torch.manual_seed(0)
    model = memforge.build_model(spec, registry=REGISTRY, dtype=DT)
    assert all(isinstance(block.memory, GatedMemory) for block in model.blocks)
    tokens = torch.randint(0, spec.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    whole = model(tokens)
    first = model(tokens[:, :8])
    rest = model(tokens[:, 8:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole.logits)
    whole.logits.sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].memory.parameters())


def test_mac_refuses_a_memory_layer_that_cannot_read_naming_the_capability():
    registry = _registry(WriteOnlyMemory)
    with pytest.raises(SpecError, match=r"titans.mac \(layer 0\) needs a ReadsMemory component "
                                         r"\(memforge.interfaces.ReadsMemory\); WriteOnlyMemory "
                                         r"has no read, read_state"):
        memforge.build_model(_spec("titans.mac_tiny", registry), registry=registry)
    memforge.build_model(_spec("titans.mag_tiny", registry), registry=registry)  # MAG never reads


def test_compiled_generation_says_what_the_layer_lacks():
    spec = _spec("titans.lmm_tiny")
    model = memforge.build_model(spec, registry=REGISTRY)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(InputError, match=r"DecodesMemoryStatically.*GatedMemory has no "
                                         r"static_decode_buffers.*compile=False"):
        model.generate(prompt, 2, compile=True)
    assert model.generate(prompt, 2, compile=False).shape == (1, 5)


def test_a_kind_the_memory_layer_ignores_is_refused_naming_both():
    with pytest.raises(SpecError, match=r"memory_layer 'lab.gated' uses no memory component, but "
                                        r"the spec sets \[memory\] 'titans.mlp', whose settings "
                                        r"would be ignored; remove that table \(--set memory=none\)"):
        memforge.override(memforge.preset("titans.lmm_tiny"),
                          ["memory_layer=lab.gated", *(f"{k}=none" for k in TITANS_PARTS[1:])],
                          REGISTRY)


def test_per_layer_memory_layers_mix_families_in_one_model():
    spec = memforge.override(memforge.preset("titans.lmm_tiny"),
                             ["num_layers=3", "layer.1.memory_layer=lab.gated"], REGISTRY)
    model = memforge.build_model(spec, registry=REGISTRY)
    assert [type(b.memory).__name__ for b in model.blocks] == [
        "StaticDecodingMemoryLayer", "GatedMemory", "StaticDecodingMemoryLayer"]
    rows = memforge.builder.layer_layout(spec, model, REGISTRY)
    assert [r["memory_layer"] for r in rows] == ["titans.neural_memory", "lab.gated",
                                                 "titans.neural_memory"]
    assert rows[1]["memory_parts"] == "" and "memory 'titans.mlp'" in rows[0]["memory_parts"]


class _ReadsAfterWrite(nn.Module):
    reads = ("at_chunk_start",)  # declares one read, calls another

    def forward(self, reader, queries: Tensor) -> Tensor:
        return reader.after_write(queries)


def test_a_retrieval_rule_is_held_to_the_reads_it_declares():
    from memforge.conformance import check_module

    with pytest.raises(SpecError, match=r"retrieval 'module'.*AttributeError.*after_write"):
        check_module("retrieval", _ReadsAfterWrite(), dim=8, heads=2)


def test_a_kernel_refuses_a_retrieval_needing_a_read_it_lacks():
    from memforge.capabilities import require_reads

    rule = _ReadsAfterWrite()
    require_reads(rule, ("at_chunk_start",), rule_name="lab.rule", layer_name="lab.layer")
    with pytest.raises(SpecError, match=r"retrieval 'lab.rule' reads at_chunk_start, which memory "
                                        r"layer 'lab.layer' does not offer \(it offers "
                                        r"after_write\); choose a retrieval that reads only those"):
        require_reads(rule, ("after_write",), rule_name="lab.rule", layer_name="lab.layer")


def test_a_capability_lists_its_own_members_and_those_it_extends():
    from memforge.capabilities import missing
    from memforge.interfaces import ChunkReader, InspectsMemory

    assert missing(object(), ChunkReader) == ["after_write", "at_chunk_start", "before_write"]
    assert missing(object(), InspectsMemory) == ["inspect_series", "set_memory_recorder"]
    assert missing(type("Reads", (), {"at_chunk_start": print, "after_write": print})(),
                   ChunkReader) == ["before_write"]
