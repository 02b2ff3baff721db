"""The ``memforge`` command line: ``list``, ``show`` (and the jobs: ``train``, ``eval``, ...).

Every user mistake ends in one line on stderr (``memforge: error: ...``) and exit status 2;
no traceback.

The jobs live in :data:`COMMAND_MODULES`, imported only when the command asked for is not one of
this module's own: ``memforge list`` and ``show`` then start without the training stack
(``benchmarks/bench_startup.py`` measures it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from memforge.errors import MemforgeError

Command = Callable[[argparse.Namespace, Console], int]
Configure = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Configure, Command]] = {}

#: Modules whose import registers more sub-commands (the jobs), imported when the parser is made
#: for any command but this module's own.
COMMAND_MODULES = ("memforge.training.commands", "memforge.training.generate_command",
                   "memforge.ablate.commands", "memforge.inspect.command")


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


def name_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """A table whose columns but the last (a free-text summary) never wrap or cut their text.

    Rich fits a table to the terminal by cutting or folding cells; a name cut to ``titans.ada…``
    cannot be typed back. Here only the last column gives way.
    """
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns[:-1]):
        widest = max((len(row[index]) for row in rows), default=0)
        table.add_column(column, no_wrap=True, min_width=max(widest, len(column)))
    table.add_column(columns[-1], min_width=20)
    for row in rows:
        table.add_row(*row)
    return table


def print_names(console: Console, title: str, columns: Sequence[str],
                rows: Sequence[Sequence[str]]) -> None:
    """:func:`name_table`, or where the terminal is too narrow for it, one plain line per row."""
    table = name_table(title, columns, rows)
    if Measurement.get(console, console.options.update_width(1 << 16), table).minimum <= console.width:
        console.print(table)
        return
    console.print(title, markup=False, highlight=False)
    widths = [max((len(row[index]) for row in rows), default=0) for index in range(len(columns) - 1)]
    for row in rows:
        names = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        console.print(f"  {names}  {row[-1]}", markup=False, highlight=False)


@command("list", "components by kind, and presets", _configure_list)
def _list(args: argparse.Namespace, console: Console) -> int:
    from memforge.interfaces import KINDS
    from memforge.plugins import default_registry

    registry = default_registry()
    if args.kind:
        registry.names(args.kind)  # an unknown kind fails here, with close matches
    rows = [(kind, name, registry.component(kind, name).plugin,
             registry.component(kind, name).summary)
            for kind in KINDS if not args.kind or kind == args.kind
            for name in registry.names(kind)]
    print_names(console, "components", ("kind", "name", "plugin", "summary"), rows)
    if not args.kind:
        presets = [(p.name, p.plugin, p.summary) for p in registry.presets()]
        print_names(console, "presets", ("name", "plugin", "summary"), presets)
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
    rows = layer_layout(spec, model)
    print_names(console, f"layout: {parameter_count(model):,} parameters",
                ("layer", "integration", "memory layer", "module", "parameters"),
                [(str(row["layer"]), row["integration"], row["memory_layer"] or "-", row["module"],
                  f"{row['parameters']:,}") for row in rows])
    built_from: dict[tuple[str, str, Any], list[str]] = {}
    for row in rows:
        if row["memory_parts"] or row["rule"] is not None:
            key = (row["memory_layer"], row["memory_parts"], row["rule"])
            built_from.setdefault(key, []).append(str(row["layer"]))
    for (layer, parts, rule), layers in built_from.items():
        line = f"layer{'s' if len(layers) > 1 else ''} {', '.join(layers)}: {layer}"
        if parts:
            line += f" built from {parts}"
        if rule is not None:
            # Parts already name the objective, optimizer and retention; a layer without them
            # (its own rule) describes them here.
            words = ("" if parts else f"objective {rule.objective}, optimizer {rule.optimizer}, "
                                      f"retention {rule.retention}, ")
            line += f"; rule: {words}{rule.schedule}; tier {rule.tier}; executor {rule.executor}"
        console.print(line, markup=False, highlight=False)
    return 0


def make_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``memforge`` command.

    With ``argv`` naming a command already registered (this module's own: ``list``, ``show``),
    the :data:`COMMAND_MODULES` are not imported, and the parser knows only the commands so far.
    """
    parser = argparse.ArgumentParser(
        prog="memforge", description="Build, train and ablate memory-augmented sequence models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if not argv or argv[0] not in _COMMANDS:
        for module in COMMAND_MODULES:
            importlib.import_module(module)
    for name, (help_text, configure, _) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(argv)
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
