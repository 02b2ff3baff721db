"""What the benchmark scripts share; they import it from their own folder (run as scripts, the
script's folder is first on ``sys.path``)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Hashable


def cpu_name() -> str:
    """The processor's model name (from ``/proc/cpuinfo`` on Linux) and the cores Python sees."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def timed(cases: dict[Hashable, Callable[[], None]], repeats: int) -> dict[Hashable, list[float]]:
    """Seconds per call of every case, the cases taking turns within each repeat (a busy machine
    slows them alike), after one warm-up call each."""
    for case in cases.values():
        case()
    times: dict[Hashable, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
    return times
