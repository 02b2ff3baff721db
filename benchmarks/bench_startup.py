"""Benchmark: how long memforge takes to start, against ``import torch`` (the floor it builds on).

Each case is a fresh Python process, started ``--repeats`` times; the cases take turns (one run of
each, then the next round), so a busy spell of a shared machine falls on all of them alike. The
figure is the median wall time from start to exit; the spread is (max - min) / median. The
processes cache bytecode as an installed package does (in a temporary ``PYTHONPYCACHEPREFIX``,
filled by an untimed first round), even where ``PYTHONDONTWRITEBYTECODE`` is set.

Cases: an empty interpreter, ``import torch``, ``import memforge``, ``memforge list`` (plugins
loaded, tables printed), ``memforge show titans.lmm_tiny`` (a model built) and ``memforge
--help`` (every job module imported: training, evaluation, generation). The target of issue 16:
``memforge list`` within 1.3x of ``import torch``. To see where the time goes, run
``python -X importtime -m memforge list 2>&1 >/dev/null | sort -t'|' -k2 -n | tail``.

Usage: ``python benchmarks/bench_startup.py [--repeats 9]``. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _common import cpu_name

#: (name, arguments after the interpreter), in table order.
CASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python", ("-c", "pass")),
    ("import torch", ("-c", "import torch")),
    ("import memforge", ("-c", "import memforge")),
    ("memforge list", ("-m", "memforge", "list")),
    ("memforge show", ("-m", "memforge", "show", "titans.lmm_tiny")),
    ("memforge --help", ("-m", "memforge", "--help")),
)
TARGET = 1.3


def time_once(arguments: tuple[str, ...], env: dict[str, str]) -> float:
    """Seconds from starting ``python arguments`` to its exit; a failure stops the benchmark."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *arguments], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"python {' '.join(arguments)} failed:\n{result.stderr.decode()}")
    return elapsed


def measure(repeats: int) -> dict[str, list[float]]:
    """Wall times of every case, ``repeats`` rounds, after one untimed round (warm caches)."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as cache:
        env = {key: value for key, value in os.environ.items()
               if key != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        for _, arguments in CASES:
            time_once(arguments, env)
        times: dict[str, list[float]] = {name: [] for name, _ in CASES}
        for _ in range(repeats):
            for name, arguments in CASES:
                times[name].append(time_once(arguments, env))
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, spread and ratio to ``import torch`` per case."""
    torch_median = statistics.median(times["import torch"])
    summary = {}
    for name, values in times.items():
        median = statistics.median(values)
        summary[name] = {"median_s": round(median, 4),
                         "spread": round((max(values) - min(values)) / median, 3),
                         "vs_import_torch": round(median / torch_median, 3)}
    return summary


def print_table(summary: dict[str, dict[str, float]], repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"start-up on {cpu_name()}: median of {repeats} fresh processes",
                  title_justify="left")
    for column in ("case", "median s", "spread", "x import torch"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for name, row in summary.items():
        table.add_row(name, f"{row['median_s']:.3f}", f"{row['spread']:.0%}",
                      f"{row['vs_import_torch']:.2f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default: 9)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    times = measure(args.repeats)
    summary = summarise(times)
    print_table(summary, args.repeats)
    ratio = summary["memforge list"]["vs_import_torch"]
    print(f"memforge list / import torch = {ratio:.2f} (target <= {TARGET})")
    import torch

    print(json.dumps({"bench": "startup", "cpu": cpu_name(), "python": platform.python_version(),
                      "torch": torch.__version__, "repeats": args.repeats,
                      "load_average": [round(x, 2) for x in os.getloadavg()],
                      "cases": summary, "list_within_target": ratio <= TARGET}))


if __name__ == "__main__":
    main()
