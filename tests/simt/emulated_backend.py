"""The CUDA backend's host code, unchanged, on NumPy arrays, with its kernels run by the SIMT emulator.

``load()`` (the registry entry point) returns :class:`gpu_phase_router.backends.cuda.CudaBackend`
with ``xp = numpy`` and a launcher that executes the exact ``.cu`` source on the CPU. Arguments
are checked against the kernel's parameter types, which CuPy would not do.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from gpu_phase_router.backends.cuda import CudaBackend, kernel_paths, kernel_prelude

from . import build

_SCALARS = {
    np.dtype(np.int32): ("i", ctypes.c_int32),
    np.dtype(np.uint32): ("I", ctypes.c_uint32),
    np.dtype(np.int64): ("l", ctypes.c_int64),
    np.dtype(np.uint64): ("L", ctypes.c_uint64),
}
_LIB: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The emulator library for the package's kernel sources (built once per process)."""
    global _LIB
    if _LIB is None:
        _LIB = build.load(kernel_paths(), prelude=kernel_prelude())
    return _LIB


class EmulatorError(RuntimeError):
    """A kernel broke a rule the emulator checks (divergent collective, deadlock, bad arguments)."""


class EmulatedLauncher:
    """``launch(name, grid, block, args)`` on NumPy buffers.

    Args:
        schedule: 0 runs threads in ascending order between collectives, 1 descending, 2 random.
        seed: seed of the random schedule.
        workers: OS threads running blocks (default: ``$GPR_SIMT_WORKERS`` or the CPU count).
        lib: an emulator library from :func:`simt.build.load` (default: the package's kernels).
    """

    def __init__(
        self, schedule: int = 0, seed: int = 0, workers: int | None = None, lib: ctypes.CDLL | None = None
    ) -> None:
        self.lib = library() if lib is None else lib
        self.schedule = schedule
        self.seed = seed
        self.workers = workers or int(os.environ.get("GPR_SIMT_WORKERS", "0")) or (os.cpu_count() or 1)
        self.launches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def __call__(
        self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple[Any, ...]
    ) -> None:
        sig = []
        values = []
        for a in args:
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise EmulatorError(f"{name}: array arguments must be C-contiguous")
                sig.append("p")
                values.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.generic) and a.dtype in _SCALARS:
                code, ctype = _SCALARS[a.dtype]
                sig.append(code)
                values.append(ctype(a.item()))
            else:
                raise EmulatorError(f"{name}: pass arrays or NumPy scalars of an exact type, not {type(a).__name__}")
        ptrs = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        g = (ctypes.c_uint * 3)(*[int(v) for v in grid])
        b = (ctypes.c_uint * 3)(*[int(v) for v in block])
        err = ctypes.create_string_buffer(1024)
        self.launches.append((name, tuple(grid), tuple(block)))
        rc = self.lib.simt_launch(
            name.encode(), g, b, ptrs, "".join(sig).encode(), self.schedule, self.seed, self.workers, err, len(err)
        )
        if rc != 0:
            raise EmulatorError(err.value.decode())


def make_backend(*, schedule: int = 0, seed: int = 0, name: str = "cuda-emulated", **options: Any) -> CudaBackend:
    """A :class:`CudaBackend` on NumPy whose kernels run in the emulator; ``options`` go to the backend
    (``warps_per_row``, ``rows_per_cta``, ``max_width``)."""
    return CudaBackend(np, EmulatedLauncher(schedule=schedule, seed=seed), name=name, **options)


def load() -> CudaBackend:
    """Entry point for ``register_backend("cuda-emulated", "simt.emulated_backend")``."""
    return make_backend()
