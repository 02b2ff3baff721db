"""The jobs keep freed memory: large blocks freed and allocated again do not fault back in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from memforge.training.allocator import keep_freed_memory
applied = keep_freed_memory()

def step():  # a training step's pattern: large blocks over glibc's 32 MB mmap limit, then freed
    a = torch.ones(16 * 2**20)
    b = torch.ones(8 * 2**20)
    del a, b

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[bool, int]:
    """``(applied, page faults of a step after three like it)`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_kept_memory_is_reused_without_page_faults() -> None:
    applied, faults = _probe()
    assert applied and faults < 1000  # the pages are already there
    applied, faults = _probe(MEMFORGE_KEEP_FREED_MEMORY="0")
    assert not applied and faults > 20_000  # 96 MB mmapped afresh: a fault per 4 KiB page
