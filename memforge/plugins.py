"""Plugin discovery and the process-wide default registry.

Assembly, in order (after pytest's ``get_config``):

1. A ``pluggy.PluginManager("memforge")`` with the specs of :mod:`memforge.hookspecs`.
2. Blocked names from the ``block`` argument and from ``MEMFORGE_BLOCK=a,b`` (pytest's
   ``-p no:NAME``). The essential plugin ``baseline`` cannot be blocked.
3. The built-in plugins, imported from a fixed list (not through entry points, so a source
   checkout works and their order is fixed).
4. Unless ``MEMFORGE_DISABLE_PLUGIN_AUTOLOAD`` is set, third-party plugins from the entry-point
   group ``memforge.plugins``: deduplicated by (name, value), each loaded inside ``try``. A plugin
   that fails to import is skipped with a warning naming it (``MEMFORGE_STRICT_PLUGINS=1`` turns
   that into an error).
5. Extra modules from ``MEMFORGE_PLUGINS=mod1,mod2`` and the ``extra`` argument.
6. ``memforge_``-prefixed functions that match no hook are reported as misspelled hooks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import types
import warnings
from collections.abc import Iterable

import pluggy

from memforge import hookspecs
from memforge.errors import PluginError, close_matches
from memforge.registry import ComponentRegistry

ENTRY_POINT_GROUP = "memforge.plugins"

#: (plugin name, module) of the built-in plugins, registered in this order.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("baseline", "memforge_baselines"),
    ("titans", "memforge_titans"),
    ("delta", "memforge_delta"),
    ("lact", "memforge_lact"),
    ("atlas", "memforge_atlas"),
    ("miras", "memforge_miras"),
    ("ttt", "memforge_ttt"),
)
#: Plugins that cannot be blocked: every spec falls back on their components.
ESSENTIAL_PLUGINS: frozenset[str] = frozenset({"baseline"})

ENV_BLOCK = "MEMFORGE_BLOCK"
ENV_DISABLE_AUTOLOAD = "MEMFORGE_DISABLE_PLUGIN_AUTOLOAD"
ENV_STRICT = "MEMFORGE_STRICT_PLUGINS"
ENV_PLUGINS = "MEMFORGE_PLUGINS"

_HOOK_NAMES = tuple(name for name in dir(hookspecs) if name.startswith("memforge_"))


def _env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _report(message: str, strict: bool) -> None:
    if strict:
        raise PluginError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _misspelled_hooks(plugin: object) -> list[str]:
    names = [n for n in dir(plugin) if n.startswith("memforge_") and callable(getattr(plugin, n))]
    return [n for n in names if n not in _HOOK_NAMES]


def _unmarked_hooks(plugin: object) -> list[str]:
    return [n for n in _HOOK_NAMES
            if callable(getattr(plugin, n, None)) and not hasattr(getattr(plugin, n), "memforge_impl")]


def _register(
    pm: pluggy.PluginManager, plugin: object, name: str, origin: str, strict: bool
) -> bool:
    unmarked = _unmarked_hooks(plugin)
    if unmarked:
        _report(f"plugin {name!r}{origin}: {', '.join(unmarked)} not marked with "
                f"@memforge.hookimpl; it was not loaded", strict)
        return False
    misspelled = _misspelled_hooks(plugin)
    if misspelled:
        hints = {m: close_matches(m, _HOOK_NAMES, n=1) for m in misspelled}
        detail = ", ".join(
            f"{m!r}" + (f" (did you mean {hints[m][0]!r}?)" if hints[m] else "") for m in misspelled
        )
        _report(f"plugin {name!r}{origin} implements unknown hook(s) {detail}; it was not loaded",
                strict)
        return False
    pm.register(plugin, name=name)
    return True


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        # lib64 symlinks and editable installs can list one entry point twice.
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            unique.append(ep)
    return unique


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f" (from {dist.name} {dist.version})" if dist is not None else f" ({ep.value})"


def _check_blocked(blocked: set[str], extra: list[object]) -> None:
    """Refuse a blocked name that no plugin has: a typo would silently block nothing."""
    if not blocked:
        return
    known = {name for name, _ in BUILTIN_PLUGINS} | {ep.name for ep in _entry_points()}
    known |= set(_env_list(ENV_PLUGINS))
    known |= {str(getattr(p, "memforge_name", getattr(p, "__name__", ""))) for p in extra}
    unknown = sorted(name for name in blocked if name not in known)
    if unknown:
        hints = [hint for name in unknown for hint in close_matches(name, known, n=1)]
        raise PluginError(
            f"cannot block {', '.join(map(repr, unknown))}: no plugin has that name"
            + (f"; did you mean {' or '.join(map(repr, hints))}?" if hints else "")
            + f" (plugins: {', '.join(sorted(known))}); fix the name in {ENV_BLOCK} or block=")


def build_plugin_manager(
    *,
    block: Iterable[str] = (),
    extra: Iterable[object] = (),
    autoload: bool | None = None,
    strict: bool | None = None,
) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """Assemble a plugin manager; returns it and ``{plugin: origin text}`` for messages.

    Args:
        block: plugin names not to load (added to ``MEMFORGE_BLOCK``).
        extra: plugin modules/objects to register too (named by ``__name__`` or ``memforge_name``).
        autoload: load entry-point plugins (default: unless ``MEMFORGE_DISABLE_PLUGIN_AUTOLOAD``).
        strict: raise instead of warning on broken plugins (default: ``MEMFORGE_STRICT_PLUGINS``).
    """
    strict = _env_flag(ENV_STRICT) if strict is None else strict
    autoload = (not _env_flag(ENV_DISABLE_AUTOLOAD)) if autoload is None else autoload
    for name, value in (("block", block), ("extra", extra)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise PluginError(f"{name} must be a list, got {type(value).__name__} {value!r}; "
                              f"e.g. {name}=[{value!r}]")
    blocked = set(block) | set(_env_list(ENV_BLOCK))
    extra = list(extra)
    _check_blocked(blocked, extra)
    essential = blocked & ESSENTIAL_PLUGINS
    if essential:
        raise PluginError(
            f"plugin(s) {sorted(essential)} are essential and cannot be blocked; "
            f"remove them from the block list / {ENV_BLOCK}"
        )
    pm = pluggy.PluginManager("memforge")
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    origins: dict[str, str] = {}

    for name, module_name in BUILTIN_PLUGINS:
        if name not in blocked:
            _register(pm, importlib.import_module(module_name), name, " (built in)", strict=True)
            origins[name] = " (built in)"

    if autoload:
        for ep in _entry_points():
            if ep.name in blocked:
                continue
            if pm.has_plugin(ep.name):
                # Two distributions claiming one plugin name would claim the same component names.
                raise PluginError(
                    f"plugin name {ep.name!r} is claimed twice: {origins[ep.name].strip()} and "
                    f"{_origin(ep).strip()}; uninstall one of them"
                )
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take memforge down
                _report(f"plugin {ep.name!r}{_origin(ep)} failed to import and was skipped: "
                        f"{type(exc).__name__}: {exc}", strict)
                continue
            if _register(pm, plugin, ep.name, _origin(ep), strict):
                origins[ep.name] = _origin(ep)

    for module_name in _env_list(ENV_PLUGINS):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            _report(f"plugin module {module_name!r} from {ENV_PLUGINS} failed to import: "
                    f"{type(exc).__name__}: {exc}", strict)
            continue
        name = getattr(module, "memforge_name", module_name)
        if name not in blocked and not pm.has_plugin(name):
            _register(pm, module, name, f" ({ENV_PLUGINS})", strict)
            origins[name] = f" ({ENV_PLUGINS})"

    for plugin in extra:
        name = getattr(plugin, "memforge_name", getattr(plugin, "__name__", None))
        if not isinstance(name, str):
            raise PluginError(f"extra plugin {plugin!r} needs a 'memforge_name' attribute")
        if name in blocked:
            continue
        if pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered; rename the extra one")
        _register(pm, plugin, name, " (extra)", strict=True)
        origins[name] = " (extra)"
    return pm, origins


def registry_from_plugin_manager(
    pm: pluggy.PluginManager, origins: dict[str, str] | None = None
) -> ComponentRegistry:
    """Call the registration hooks plugin by plugin and merge their results into a registry."""
    components: dict[str, list] = {}
    presets: dict[str, list] = {}
    # Each implementation is called on its own so every result keeps its plugin's name.
    for impl in pm.hook.memforge_register_components.get_hookimpls():
        components.setdefault(impl.plugin_name, []).extend(impl.function() or ())
    for impl in pm.hook.memforge_register_presets.get_hookimpls():
        presets.setdefault(impl.plugin_name, []).extend(impl.function() or ())
    return ComponentRegistry(components, presets, origins, pm)


def load_plugins(
    *,
    block: Iterable[str] = (),
    extra: Iterable[object] = (),
    autoload: bool | None = None,
    strict: bool | None = None,
) -> ComponentRegistry:
    """Assemble plugins and their registry (see :func:`build_plugin_manager` for the arguments)."""
    pm, origins = build_plugin_manager(block=block, extra=extra, autoload=autoload, strict=strict)
    return registry_from_plugin_manager(pm, origins)


_default: ComponentRegistry | None = None


def default_registry() -> ComponentRegistry:
    """The process-wide registry, assembled from the plugins on first use (reads the environment)."""
    global _default
    if _default is None:
        _default = load_plugins()
    return _default


def configure_plugins(
    *,
    block: Iterable[str] = (),
    extra: Iterable[object] = (),
    autoload: bool | None = None,
    strict: bool | None = None,
) -> ComponentRegistry:
    """Replace the process-wide registry, e.g. to block plugins for an ablation.

    ``memforge.configure_plugins(block=["titans"])`` makes every later ``preset``/``build_model``
    call see the baseline components only.
    """
    global _default
    _default = load_plugins(block=block, extra=extra, autoload=autoload, strict=strict)
    return _default


def reset_plugins() -> None:
    """Forget the process-wide registry; the next use re-reads the environment."""
    global _default
    _default = None


def as_module(name: str, **hooks: object) -> types.ModuleType:
    """Make a throwaway plugin module named ``name`` holding ``hooks`` (for notebooks and tests).

    The functions in ``hooks`` must already carry ``@memforge.hookimpl``.
    """
    module = types.ModuleType(name)
    module.memforge_name = name
    for hook_name, function in hooks.items():
        setattr(module, hook_name, function)
    return module
