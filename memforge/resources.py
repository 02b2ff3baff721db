"""How much memory a device has free, so that jobs can refuse work that cannot fit before starting.

Used by the size checks of :func:`memforge.builder.check_size` and ``memforge eval``: a request
that needs more memory than the machine has is refused with the figure and the fix, instead of
swapping for minutes or being killed by the kernel's out-of-memory killer.
"""

from __future__ import annotations

import os

import torch

_MEMINFO = "/proc/meminfo"


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that ``device`` (default the CPU) can still allocate, or ``None`` if unknown.

    CPU: Linux's ``MemAvailable`` (free memory plus caches the kernel can drop), else the free
    physical pages. CUDA: the driver's free memory on that device.
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open(_MEMINFO, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KB"``: a byte count in binary units, three significant digits."""
    units = ("B", "KB", "MB", "GB", "TB", "PB", "EB")
    index = 0
    while abs(count) >= 1024 and index < len(units) - 1:
        count /= 1024
        index += 1
    return f"{int(count)} B" if index == 0 else f"{count:.3g} {units[index]}"


def format_count(count: float) -> str:
    """``1234567`` -> ``"1.23M"``: a count in thousands/millions/billions, three digits."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:.0f}"
