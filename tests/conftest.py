"""Shared pytest configuration: keep torch and ONNX Runtime to one thread each.

The suite runs on 2 cores in CI; one thread per library avoids oversubscription
when torch and onnxruntime run in the same process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The test folders mirror the packages (tests/runtime, tests/train, ...); the shared helpers
# (runtime_helpers.py) live here, beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # a runtime-only install runs the runtime tests alone
        pass


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A size-limited file system (tmpfs, 300 KB) mounted for the test: the "nearly full disk" of
    issue 17. Yields (folder, resize) where resize("4m") remounts it larger ("space freed").
    Skipped with the reason where the machine does not allow it (not root, no mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)

    try:
        yield folder, resize
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
