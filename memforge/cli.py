"""The ``memforge`` command line: ``list``, ``show`` (and the jobs: ``train``, ``eval``, ...).

Every user mistake ends in one line on stderr (``memforge: error: ...``) and exit status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memforge.errors import MemforgeError

Command = Callable[[argparse.Namespace, Console], int]
Configure = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Configure, Command]] = {}

#: Modules whose import registers more sub-commands (the jobs), imported when the parser is made.
COMMAND_MODULES = ("memforge.training.commands",)


def command(name: str, help: str, configure: Configure) -> Callable[[Command], Command]:
    """Register ``function`` as sub-command ``name``; ``configure`` adds its arguments."""

    def register(function: Command) -> Command:
        _COMMANDS[name] = (help, configure, function)
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


def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", help="only this kind of component")


@command("list", "components by kind, and presets", _configure_list)
def _list(args: argparse.Namespace, console: Console) -> int:
    from memforge.interfaces import KINDS
    from memforge.plugins import default_registry

    registry = default_registry()
    if args.kind:
        registry.names(args.kind)  # an unknown kind fails here, with close matches
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


def _configure_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="NAME|FILE", help="preset name or .toml/.json spec file")
    add_set_argument(p)
    p.add_argument("--format", choices=("toml", "json"), default="toml")


def add_set_argument(p: argparse.ArgumentParser) -> None:
    """The repeatable ``--set KEY=VALUE`` spec override option."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. memory.depth=3 (repeatable)")


@command("show", "a preset or spec file: resolved spec, parameters, layout", _configure_show)
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
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    for name, (help_text, configure, _) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True)
    try:
        return _COMMANDS[args.command][2](args, console)
    except MemforgeError as exc:
        print(f"memforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
