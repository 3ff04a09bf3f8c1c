"""Array-library grid for tests: NumPy always, CuPy when a usable CUDA device is present.

The CuPy entries stay in the grid with a skip reason, so ``pytest -ra`` shows the missing
GPU coverage instead of hiding it.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest


def _usable_cupy():
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        cupy.zeros(1).sum()
        return cupy
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return None


CUPY = _usable_cupy()

XP_PARAMS = [
    pytest.param(np, id="numpy"),
    pytest.param(CUPY, id="cupy", marks=pytest.mark.skipif(CUPY is None, reason="no CuPy with a usable CUDA device")),
]


def to_host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)
