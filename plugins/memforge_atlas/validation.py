"""Spec checks of the ``atlas`` plugin, run before anything is built (``memforge_validate_spec``).

Each problem is one line naming the field, the value it would reach and the fix:

* ``atlas.omega``'s window against the memory layer's chunk: every chunk re-evaluates the ``c - 1``
  pairs carried from before it at its own start weights, so the window may reach back at most
  ``max(chunk_size, MIN_REACH)`` pairs: at most one chunk's worth for large chunks (re-evaluation
  then costs at most the chunk's own gradients again), and up to ``MIN_REACH`` pairs for small ones
  (so ATLAS' windows ``c <= 16`` run at every chunk size, token-exact at chunk size 1).
* ``atlas.poly_mlp``'s feature width ``C(head width + degree, degree)`` against ``max_width``.
* ``atlas.muon`` on a memory with a width-1 fast-weight matrix (a bias, or ``d_in == 1``):
  Newton-Schulz of a vector is only its direction, so Muon would take a full-size step on it.
"""

from __future__ import annotations

import torch

from memforge.builder import build_layer_component
from memforge.errors import MemforgeError
from memforge.registry import ComponentRegistry
from memforge.spec import ModelSpec, used_kinds
from memforge_atlas.configs import OmegaConfig, PolyMLPConfig
from memforge_atlas.features import feature_width

#: Pairs a window may reach back at any chunk size (ATLAS sweeps c up to 16).
MIN_REACH = 16


def window_problem(window: int, chunk_size: int) -> str | None:
    """Why ``window`` does not fit ``chunk_size``, or ``None``."""
    reach = max(chunk_size, MIN_REACH)
    if window - 1 <= reach:
        return None
    return (f"atlas.omega's 'objective.window'={window} reaches back {window - 1} pairs, more "
            f"than memory_layer.chunk_size={chunk_size} allows (max(chunk_size, {MIN_REACH}) = "
            f"{reach}: each chunk re-evaluates them all); set objective.window <= {reach + 1} or "
            f"memory_layer.chunk_size >= {window - 1}")


def width_problem(head_dim: int, config: PolyMLPConfig) -> str | None:
    """Why ``config``'s feature width at ``head_dim`` is too large, or ``None``."""
    width = feature_width(head_dim, config.degree)
    if width <= config.max_width:
        return None
    fits = max((p for p in range(1, config.degree) if feature_width(head_dim, p) <= config.max_width),
               default=None)
    fix = f"set memory.degree <= {fits}" if fits else "use more heads (a smaller head width)"
    return (f"atlas.poly_mlp's 'memory.degree'={config.degree} at head width {head_dim} (dim / "
            f"heads) gives keys of width {width}, over 'memory.max_width'={config.max_width}; "
            f"{fix} or raise memory.max_width")


def matrix_problem(shapes: list[tuple[int, int]], memory: str) -> str | None:
    """Why Muon cannot orthogonalise a memory with fast weights of ``shapes``, or ``None``."""
    for index, (rows, cols) in enumerate(shapes):
        if min(rows, cols) == 1:
            return (f"atlas.muon orthogonalises every fast-weight matrix, but memory {memory!r} "
                    f"has a {rows} x {cols} weight (matrix {index}, a vector: Newton-Schulz "
                    f"would only normalise it); set optimizer=atlas.gd or use a memory without "
                    f"width-1 weights (no biases, head width > 1)")
    return None


def _memory_shapes(spec: ModelSpec, layer: int, registry: ComponentRegistry
                   ) -> list[tuple[int, int]] | None:
    """The ``(d_in, d_out)`` of every fast weight of the layer's memory, built on the ``meta``
    device (no memory allocated); ``None`` when it cannot be built (another check says why)."""
    try:
        with torch.device("meta"):
            network = build_layer_component(spec, "memory", layer, registry)
        return [tuple(w.shape[1:]) for w in network.initial_weights()]
    except (MemforgeError, ValueError, TypeError, RuntimeError, NotImplementedError):
        return None


def spec_problems(spec: ModelSpec, registry: ComponentRegistry) -> list[str]:
    """Every atlas problem of ``spec``, each once."""
    problems: list[str] = []
    head_dim = spec.dim // spec.heads
    for layer in range(spec.num_layers):
        used = used_kinds(spec, registry, layer)
        choice = {kind: spec.choice(kind, layer) for kind in ("objective", "memory", "optimizer",
                                                               "memory_layer")}
        objective, memory = choice["objective"], choice["memory"]
        chunk = getattr(getattr(choice["memory_layer"], "config", None), "chunk_size", None)
        if ("objective" in used and objective.impl == "atlas.omega"
                and isinstance(objective.config, OmegaConfig) and isinstance(chunk, int)):
            problems.append(window_problem(objective.config.window, chunk))
        width = None
        if ("memory" in used and memory.impl == "atlas.poly_mlp"
                and isinstance(memory.config, PolyMLPConfig)):
            width = width_problem(head_dim, memory.config)
            problems.append(width)
        if "optimizer" in used and choice["optimizer"].impl == "atlas.muon" and width is None:
            shapes = _memory_shapes(spec, layer, registry)
            if shapes is not None:
                problems.append(matrix_problem(shapes, memory.impl))
    return list(dict.fromkeys(p for p in problems if p is not None))
