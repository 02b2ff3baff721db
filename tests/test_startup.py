"""Start-up: importing memforge and ``memforge list`` leave the compiler stack and the jobs alone,
and ``memforge list`` shows every name whole however narrow the terminal.

The time itself is measured in ``benchmarks/bench_startup.py``; these tests pin what is imported.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from rich.console import Console

from memforge.cli import main, print_names

HEAVY = ("torch._dynamo", "torch._inductor", "torchmetrics", "matplotlib", "scipy")


def _imported_after(code: str) -> dict[str, bool]:
    """Which of :data:`HEAVY` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(*[m in sys.modules for m in {HEAVY!r}])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return dict(zip(HEAVY, (word == "True" for word in out.stdout.split()), strict=True))


def test_importing_memforge_does_not_import_the_compiler() -> None:
    code = "import memforge, sys; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_memory_layers_make_their_compiled_scan_only_when_asked_to_compile() -> None:
    """``torch.compiler.disable`` imports the compiler stack, so the layer calls it lazily."""
    code = ("import torch, memforge\nfrom memforge.engine import layer\n"
            "model = memforge.build_model(memforge.preset('titans.mac_tiny'))\n"
            "model.generate(torch.zeros(1, 3, dtype=torch.long), 2)\n"
            "print(layer._hidden_scan is None)\n"
            "memforge.compile_model(model)\n"
            "print(layer._hidden_scan is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_memforge_list_imports_neither_the_compiler_nor_the_jobs() -> None:
    code = ("import contextlib, io\nfrom memforge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['list']) == 0")
    assert not any(_imported_after(code).values())


@pytest.mark.parametrize("width", [20, 60, 80, 120])
def test_names_are_never_cut(width: int) -> None:
    rows = [("integration", "someplugin.a_rather_long_integration_name", "someplugin",
             "a summary long enough that it has to wrap in a narrow terminal"),
            ("memory", "titans.mlp", "titans", "MLP memory")]
    console = Console(width=width, record=True, soft_wrap=True)
    print_names(console, "components", ("kind", "name", "plugin", "summary"), rows)
    lines = console.export_text().splitlines()
    for row in rows:
        line = next(line for line in lines if row[1] in line)  # the name whole, on one line
        assert row[0] in line and row[2] in line
    # a table when it fits
    assert any("┃ kind" in line for line in lines) == (width >= 95)


def test_memforge_list_in_a_narrow_terminal_shows_every_name(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import memforge

    monkeypatch.setenv("COLUMNS", "40")
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    names = [name for names in memforge.available().values() for name in names]
    assert all(name in printed for name in [*names, *memforge.presets()])
