"""Every registered component builds and runs forward/backward at tiny size.

Parametrised over the registry itself (timm's habit), so a newly registered component is tested
without anyone writing a test for it.
"""

import pytest
import torch

import memforge
from memforge.plugins import load_plugins

REGISTRY = load_plugins(autoload=False)
#: The preset each kind is exercised in: memory parts in the LMM, attention parts in a Transformer.
BASE = {"attention": "baseline.transformer_tiny", "feedforward": "baseline.transformer_tiny"}


@pytest.mark.parametrize("component", REGISTRY.components(), ids=lambda c: c.name)
def test_component_builds_and_trains(component):
    base = memforge.preset(BASE.get(component.kind, "titans.lmm_tiny"))
    spec = memforge.override(base, [f"{component.kind}={component.name}"])
    model = memforge.build_model(spec)
    generator = torch.Generator().manual_seed(0)
    # Longer than the default chunk (64), so the memory's gates influence the loss too.
    tokens = torch.randint(0, spec.vocab_size, (2, 67), generator=generator)
    out = model(tokens)
    assert out.logits.shape == (2, 67, spec.vocab_size)
    assert torch.isfinite(out.logits).all()
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_every_kind_has_a_protocol_conforming_component():
    """Built components satisfy their kind's runtime-checkable Protocol."""
    from memforge import interfaces
    from memforge.builder import _context

    protocols = {"memory": interfaces.MemoryNetwork, "surprise": interfaces.SurpriseRule,
                 "forgetting": interfaces.ForgettingRule, "retrieval": interfaces.RetrievalRule,
                 "projection": interfaces.Projection, "attention": interfaces.Attention,
                 "feedforward": interfaces.FeedForward, "integration": interfaces.Block}
    for component in REGISTRY.components():
        base = memforge.preset(BASE.get(component.kind, "titans.lmm_tiny"))
        spec = memforge.override(base, [f"{component.kind}={component.name}"])
        module = _context(spec, REGISTRY, 0).build(component.kind)
        assert isinstance(module, protocols[component.kind]), component.name
