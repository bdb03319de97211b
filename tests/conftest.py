"""Shared pytest configuration: keep torch and ONNX Runtime to one thread each.

The suite runs on 2 cores in CI; one thread per library avoids oversubscription
when torch and onnxruntime run in the same process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
