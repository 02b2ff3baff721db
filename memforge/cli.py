"""The ``memforge`` command line: ``list``, ``show`` (and the jobs: ``train``, ``eval``, ...).

Every user mistake ends in one line on stderr (``memforge: error: ...``) and exit status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memforge.errors import MemforgeError

Command = Callable[[argparse.Namespace, Console], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register ``function`` as the handler of sub-command ``name``."""

    def register(function: Command) -> Command:
        _COMMANDS[name] = function
        return function

    return register


def resolve_spec(name_or_file: str, assignments: Sequence[str] = ()):
    """A preset name or a spec file path, with ``--set`` overrides applied."""
    import memforge

    path = Path(name_or_file)
    if path.suffix.lower() in (".toml", ".json") or path.exists():
        spec = memforge.load_spec(path)
    else:
        spec = memforge.preset(name_or_file)
    return memforge.override(spec, assignments) if assignments else spec


@command("list")
def _list(args: argparse.Namespace, console: Console) -> int:
    from memforge.interfaces import KINDS
    from memforge.plugins import default_registry

    registry = default_registry()
    table = Table(title="components", title_justify="left")
    for column in ("kind", "name", "plugin", "summary"):
        table.add_column(column)
    for kind in KINDS:
        if args.kind and kind != args.kind:
            continue
        for name in registry.names(kind):
            component = registry.component(kind, name)
            table.add_row(kind, name, component.plugin, component.summary)
    console.print(table)
    if not args.kind:
        presets = Table(title="presets", title_justify="left")
        for column in ("name", "plugin", "summary"):
            presets.add_column(column)
        for preset in registry.presets():
            presets.add_row(preset.name, preset.plugin, preset.summary)
        console.print(presets)
    return 0


@command("show")
def _show(args: argparse.Namespace, console: Console) -> int:
    from memforge.builder import build_model, layer_layout, parameter_count
    from memforge.io import dumps_spec
    from memforge.spec import spec_id

    spec = resolve_spec(args.spec, args.set)
    model = build_model(spec)
    console.print(f"# spec_id = {spec_id(spec)}", markup=False, highlight=False)
    console.print(dumps_spec(spec, args.format), markup=False, highlight=False)
    table = Table(title=f"layout: {parameter_count(model):,} parameters", title_justify="left")
    for column in ("layer", "integration", "module", "parameters"):
        table.add_column(column)
    for row in layer_layout(spec, model):
        table.add_row(str(row["layer"]), row["integration"], row["module"],
                      f"{row['parameters']:,}")
    console.print(table)
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``memforge`` command."""
    parser = argparse.ArgumentParser(
        prog="memforge", description="Build, train and ablate memory-augmented sequence models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="components by kind, and presets")
    p.add_argument("--kind", help="only this kind of component")

    p = sub.add_parser("show", help="a preset or spec file: resolved spec, parameters, layout")
    p.add_argument("spec", metavar="NAME|FILE", help="preset name or .toml/.json spec file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. memory.depth=3 (repeatable)")
    p.add_argument("--format", choices=("toml", "json"), default="toml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True)
    try:
        return _COMMANDS[args.command](args, console)
    except MemforgeError as exc:
        print(f"memforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
