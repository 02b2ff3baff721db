"""The third-party story: the example plugin (examples/plugin_example, gated linear attention),
really installed with pip, found through its entry point, every preset built, its layer checked
by the conformance kit and each preset trained a few steps."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch

import memforge
from memforge.plugins import load_plugins
from memforge.testing.conformance import check_memory_layer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin_example"
PRESETS = ["example.gla_lmm_tiny", "example.gla_mac_tiny", "example.gla_mag_tiny",
           "example.gla_mal_tiny"]


@pytest.fixture(scope="module")
def installed(example_plugin_site: Path):
    """The registry with the example plugin pip-installed into a private folder on ``sys.path``
    and found through its entry point."""
    stale = [name for name in sys.modules if name.startswith("memforge_example_plugin")]
    saved = {name: sys.modules.pop(name) for name in stale}
    sys.path.insert(0, str(example_plugin_site))
    importlib.invalidate_caches()
    try:
        registry = load_plugins(autoload=True, strict=True)
        yield registry
    finally:
        sys.path.remove(str(example_plugin_site))
        for name in [n for n in sys.modules if n.startswith("memforge_example_plugin")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.slow
def test_the_installed_plugin_is_found_by_its_entry_point(installed):
    assert installed.names("memory_layer") == sorted(
        ["example.gla", *load_plugins(autoload=False).names("memory_layer")])
    assert installed.preset_names("example.*") == PRESETS
    # imported from the pip-installed copy, not the source tree
    assert Path(sys.modules["memforge_example_plugin"].__file__).parts[-3] == "site"


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_conforms_and_trains(installed, preset: str):
    assert check_memory_layer(preset, installed)  # the kit on the layer as the preset builds it
    spec = installed.preset(preset).build()
    torch.manual_seed(0)
    model = memforge.build_model(spec, registry=installed)
    assert all(type(block.memory).__name__ == "GatedLinearAttention" for block in model.blocks)
    # token-exact at any kernel chunk: the framework's cycle is one token (memforge.MemoryLayer)
    kernel = spec.choice("memory_layer", 0).config.chunk_size
    assert all((b.memory.chunk_size, b.memory.kernel_chunk) == (1, kernel) for b in model.blocks)
    tokens = torch.randint(0, spec.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def _code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines()
               if line.strip() and not line.strip().startswith("#"))


#: The memforge modules a plugin may import (docs/plugins.md, "What a plugin may import").
PUBLIC = {"memforge", "memforge.errors", "memforge.interfaces", "memforge.capabilities",
          "memforge.nn", "memforge.spec", "memforge.linear", "memforge.registry", "memforge.plugins",
          "memforge.builder", "memforge.engine", "memforge.engine.layer",
          "memforge.engine.executors", "memforge.engine.rules", "memforge.engine.projection",
          "memforge.engine.networks", "memforge.engine.static_chunk", "memforge.engine.wy"}


def _check_public_imports(package: Path) -> None:
    """Every ``memforge*`` import in ``package`` is public API or the package's own module."""
    own = package.name
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memforge"):
                assert node.module in PUBLIC or node.module.split(".")[0] == own, (
                    f"{own}/{path.name} imports {node.module}")
            if isinstance(node, ast.Import):
                assert all(a.name in PUBLIC or a.name.split(".")[0] == own
                           or not a.name.startswith("memforge") for a in node.names), (
                    f"{own}/{path.name} imports {[a.name for a in node.names]}")


def test_the_example_is_small_and_imports_only_the_public_api():
    files = sorted((PACKAGE / "memforge_example_plugin").glob("*.py"))
    assert sum(_code_lines(f) for f in files) <= 300
    _check_public_imports(PACKAGE / "memforge_example_plugin")


@pytest.mark.parametrize("package", ["delta", "ttt", "miras", "atlas", "lact", "titans", "baselines"])
def test_every_built_in_plugin_imports_only_the_public_api(package: str):
    _check_public_imports(ROOT / "plugins" / f"memforge_{package}")
