"""Shared test set-up: hypothesis profiles and an isolated plugin environment.

Profiles: ``dev`` (default, quick), ``ci`` (derandomised, for reproducible CI runs) and ``nightly``
(many examples); pick one with ``HYPOTHESIS_PROFILE`` (``ci`` is the default when ``CI`` is
set). Every profile has ``deadline=None``: torch's
first calls are slow and would trip hypothesis' per-example deadline.

Installed third-party plugins must not leak into core tests, so entry-point autoload is off for
the test process (tests of real discovery run memforge in a subprocess, or put the
``example_plugin_site`` folder on ``sys.path`` themselves).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ["MEMFORGE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
# The jobs tell glibc to keep freed memory (memforge.training.allocator); a job run in this
# process would set that for every later test, and one long process that never hands memory back
# grew past 20 GB (the sequential executor's many mid-sized per-token tensors fragment the heap).
# tests/test_allocator.py checks the setting in subprocesses of its own.
os.environ["MEMFORGE_KEEP_FREED_MEMORY"] = "0"
os.environ.pop("MEMFORGE_BLOCK", None)
os.environ.pop("MEMFORGE_PLUGINS", None)
os.environ.pop("MEMFORGE_STRICT_PLUGINS", None)

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("ci", max_examples=20, derandomize=True, **_common)
settings.register_profile("nightly", max_examples=300, **_common)
# CI runs are derandomised so a red run can be reproduced exactly.
settings.load_profile(os.getenv("HYPOTHESIS_PROFILE", "ci" if os.getenv("CI") else "dev"))


EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin_example"


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the example plugin really installed (pip, entry points and all).

    A copy of its sources is built, so no build files land in the repository.
    """
    work = tmp_path_factory.mktemp("example-plugin")
    shutil.copytree(EXAMPLE_PLUGIN, work / "src", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(work / "site"), str(work / "src")],
                   check=True, capture_output=True)
    return work / "site"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    as many as the CLI children running with OMP_NUM_THREADS=1, so runs agree bit for bit, and
    the fastest for tiny models on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    """``snapshot(directory)``: every file under it with its bytes, to show that nothing changed."""
    return _snapshot


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """Every test starts from the default built-in plugin set."""
    from memforge.plugins import reset_plugins

    reset_plugins()
    yield
    reset_plugins()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
