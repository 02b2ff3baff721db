"""Plugin discovery: entry points, broken plugins, blocking, misspelled hooks, real installs."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

import memforge
from memforge.errors import PluginError
from memforge.plugins import as_module, load_plugins


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint in discovery unit tests."""

    def __init__(self, name, value, load):
        self.name, self.value, self._load, self.dist = name, value, load, None

    def load(self):
        return self._load()


def _good_plugin():
    @memforge.hookimpl
    def memforge_register_presets():
        return [memforge.PresetSpec(name="good.tiny", summary="s",
                                    build=lambda: memforge.preset("baseline.transformer_tiny"))]

    return as_module("good", memforge_register_presets=memforge_register_presets)


def _patch_entry_points(monkeypatch, entry_points):
    def fake(group=None):
        return [ep for ep in entry_points] if group == "memforge.plugins" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def _broken():
    raise ImportError("no module named 'missing_dependency'")


def test_broken_plugin_warns_and_the_rest_works(monkeypatch):
    good = _good_plugin()
    _patch_entry_points(monkeypatch, [FakeEntryPoint("broken", "broken_mod", _broken),
                                      FakeEntryPoint("good", "good_mod", lambda: good)])
    with pytest.warns(RuntimeWarning, match="plugin 'broken'.*failed to import"):
        registry = load_plugins(autoload=True)
    assert "good.tiny" in registry.preset_names()
    assert "titans.mlp" in registry.names("memory")


def test_strict_mode_turns_broken_plugin_into_error(monkeypatch):
    _patch_entry_points(monkeypatch, [FakeEntryPoint("broken", "broken_mod", _broken)])
    monkeypatch.setenv("MEMFORGE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'broken'.*missing_dependency"):
        load_plugins(autoload=True)


def test_two_distributions_claiming_one_plugin_name_fail_naming_both(monkeypatch):
    good = _good_plugin()
    _patch_entry_points(monkeypatch, [FakeEntryPoint("good", "pkg_one", lambda: good),
                                      FakeEntryPoint("good", "pkg_two", lambda: good)])
    with pytest.raises(PluginError, match=r"'good' is claimed twice.*pkg_one.*pkg_two"):
        load_plugins(autoload=True)


def test_entry_point_cannot_take_a_builtin_name(monkeypatch):
    good = _good_plugin()
    _patch_entry_points(monkeypatch, [FakeEntryPoint("titans", "impostor", lambda: good)])
    with pytest.raises(PluginError, match=r"'titans' is claimed twice.*built in.*impostor"):
        load_plugins(autoload=True)


def test_duplicate_entry_points_load_once(monkeypatch):
    good = _good_plugin()
    _patch_entry_points(monkeypatch, [FakeEntryPoint("good", "good_mod", lambda: good)] * 2)
    assert "good.tiny" in load_plugins(autoload=True).preset_names()


def test_block_by_api_and_by_environment(monkeypatch):
    def titans(names: list[str]) -> list[str]:  # other plugins register memories too
        return [name for name in names if name.startswith("titans.")]

    assert titans(load_plugins(autoload=False).names("memory"))
    assert titans(load_plugins(block=["titans"], autoload=False).names("memory")) == []
    monkeypatch.setenv("MEMFORGE_BLOCK", "titans")
    assert titans(load_plugins(autoload=False).names("memory")) == []
    memforge.configure_plugins(block=["titans"], autoload=False)
    assert titans(memforge.available("memory")) == []
    assert "titans.lmm" not in memforge.presets()


def test_blocked_entry_point_is_not_loaded(monkeypatch):
    _patch_entry_points(monkeypatch, [FakeEntryPoint("broken", "broken_mod", _broken)])
    # Strict mode would raise if the broken plugin were imported; blocked, it never is.
    registry = load_plugins(autoload=True, block=["broken"], strict=True)
    assert "broken" not in registry.plugins
    assert not registry.pm.has_plugin("broken")


def test_essential_plugin_cannot_be_blocked():
    with pytest.raises(PluginError, match="essential"):
        load_plugins(block=["baseline"], autoload=False)


def test_misspelled_hook_is_reported_with_suggestion(monkeypatch):
    @memforge.hookimpl
    def memforge_register_component():
        return []

    plugin = as_module("typo", memforge_register_component=memforge_register_component)
    # An installed plugin with a typo is skipped with a warning; the others still load.
    _patch_entry_points(monkeypatch, [FakeEntryPoint("typo", "t", lambda: plugin)])
    with pytest.warns(RuntimeWarning, match="did you mean 'memforge_register_components'"):
        registry = load_plugins(autoload=True)
    assert "titans.mlp" in registry.names("memory")
    # The caller's own extra plugins are strict: the typo is an error.
    with pytest.raises(PluginError, match="unknown hook"):
        load_plugins(autoload=False, extra=[plugin])


def test_unmarked_hook_is_reported():
    def memforge_register_components():
        return []

    plugin = as_module("unmarked", memforge_register_components=memforge_register_components)
    with pytest.raises(PluginError, match="not marked with @memforge.hookimpl"):
        load_plugins(autoload=False, extra=[plugin])


def test_validate_hook_problems_are_collected():
    @memforge.hookimpl
    def memforge_validate_spec(spec):
        return [f"picky: dim {spec.dim} is not welcome"]

    plugin = as_module("picky", memforge_validate_spec=memforge_validate_spec)
    registry = load_plugins(autoload=False, extra=[plugin])
    spec = memforge.preset("baseline.transformer_tiny")
    with pytest.raises(memforge.SpecError, match="picky: dim 32"):
        memforge.build_model(spec, registry=registry)


def test_model_built_hook_sees_the_model():
    seen = []

    @memforge.hookimpl
    def memforge_model_built(model, spec):
        seen.append((type(model).__name__, spec.dim))

    watcher = as_module("watch", memforge_model_built=memforge_model_built)
    registry = load_plugins(autoload=False, extra=[watcher])
    memforge.build_model(memforge.preset("baseline.transformer_tiny"), registry=registry)
    assert seen == [("MemforgeModel", 32)]


def _memforge(target, *args, **extra_env: str):
    """``python -m memforge ARGS`` with ``target`` ahead on the path and only ``extra_env``'s
    MEMFORGE_ variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFORGE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "memforge", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_installed_plugin_is_discovered_by_entry_point(example_plugin_site):
    listing = _memforge(example_plugin_site, "list", "--kind", "memory_layer")
    assert listing.returncode == 0, listing.stderr
    assert "example.gla" in listing.stdout
    shown = _memforge(example_plugin_site, "show", "example.gla_lmm_tiny")
    assert shown.returncode == 0, shown.stderr
    assert 'impl = "example.gla"' in shown.stdout


@pytest.mark.slow
def test_installed_plugin_can_be_blocked(example_plugin_site):
    listing = _memforge(example_plugin_site, "show", "example.gla_lmm_tiny")
    assert listing.returncode == 0, listing.stderr
    blocked = _memforge(example_plugin_site, "show", "example.gla_lmm_tiny", MEMFORGE_BLOCK="example")
    assert blocked.returncode == 2
    assert "unknown preset 'example.gla_lmm_tiny'" in blocked.stderr
