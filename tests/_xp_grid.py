"""Array-library grid for tests: NumPy always, CuPy when a usable CUDA device is present.

The CuPy entries stay in the grid with a skip reason, so ``pytest -ra`` shows the missing
GPU coverage instead of hiding it.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from gpu_phase_router import cuda_available

CUPY = importlib.import_module("cupy") if cuda_available() else None

XP_PARAMS = [
    pytest.param(np, id="numpy"),
    pytest.param(CUPY, id="cupy", marks=pytest.mark.skipif(CUPY is None, reason="no CuPy with a usable CUDA device")),
]


def to_host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)
