"""Test grid helpers, in the manner of pytorch_scatter's ``testing.py``.

``XP_PARAMS``: the array libraries every cross-library test runs on — NumPy always, CuPy when
a usable CUDA device is present. The CuPy entries stay in the grid with a skip reason, so
``pytest -ra`` shows the missing GPU coverage instead of hiding it. ``assert_same`` compares
exactly (zero tolerance): every backend must give the same bits.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from gpu_phase_router import cuda_available
from gpu_phase_router._arrays import to_numpy

CUPY = importlib.import_module("cupy") if cuda_available() else None
NO_GPU = "no CuPy with a usable CUDA device (pip install 'gpu_phase_router[cuda12]' on a GPU machine)"

XP_PARAMS = [
    pytest.param(np, id="numpy"),
    pytest.param(CUPY, id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(CUPY is None, reason=NO_GPU)]),
]
DEVICES = ["cpu"] + (["cuda"] if CUPY is not None else [])


def to_host(x: Any) -> np.ndarray:
    """NumPy copy of a NumPy/CuPy array or torch tensor."""
    return to_numpy(x)


def assert_same(got: Any, want: Any) -> None:
    """Exact equality of values, shape and (for arrays) integer dtype kind; zero tolerance."""
    g, w = to_host(got), np.asarray(to_host(want))
    assert g.shape == w.shape, f"shape {g.shape} != {w.shape}"
    np.testing.assert_array_equal(g, w)
