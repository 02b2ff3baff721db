"""What the benchmark scripts share; they import it from their own folder (run as scripts, the
script's folder is first on ``sys.path``)."""

from __future__ import annotations

import os
import platform


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
