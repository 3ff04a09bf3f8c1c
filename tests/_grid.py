"""Test grid helpers, in the manner of pytorch_scatter's ``testing.py``.

The one device grid of the suite. ``XP_PARAMS``: the array libraries every cross-library test
runs on — NumPy always, CuPy when a usable CUDA device is present; ``BACKEND_PARAMS``: the same
as ``backend=`` names; ``CUDA_KINDS``: the CUDA backend's host code on the SIMT emulator and on a
real GPU. The CuPy entries stay in the grid with a skip reason, so
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

# Backend names for tests of the public API: the CPU always, the CUDA backend with a skip reason.
BACKEND_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(CUPY is None, reason=NO_GPU)]),
]

# The CUDA backend's host code: on the SIMT emulator always (tests/simt), on a real GPU when present.
EMULATED = "cuda-emulated"
CUDA_KINDS = [
    pytest.param(EMULATED, id=EMULATED),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(CUPY is None, reason=NO_GPU)]),
]


def xp_of(backend: str) -> Any:
    """The array module of a backend of :data:`BACKEND_PARAMS`: NumPy for ``"cpu"``, CuPy for ``"cuda"``."""
    return np if backend == "cpu" else CUPY


def to_host(x: Any) -> np.ndarray:
    """NumPy copy of a NumPy/CuPy array or torch tensor."""
    return to_numpy(x)


def assert_same(got: Any, want: Any) -> None:
    """Exact equality of values, shape and (for arrays) integer dtype kind; zero tolerance."""
    g, w = to_host(got), np.asarray(to_host(want))
    assert g.shape == w.shape, f"shape {g.shape} != {w.shape}"
    np.testing.assert_array_equal(g, w)
