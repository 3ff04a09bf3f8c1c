"""Host side of crate-exact mode (SPEC.md §14): the O(n) arrays, then one backend kernel call.

Written once against the backend's array module, like :mod:`gpu_phase_router._prep`; the per-row
work is ``backend.crate_rows`` (Numba in ``backends/cpu_crate.py``, CUDA in
``kernels/crate_router.cu``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._prep import exclusive_cumsum_mod, inverse_permutation


def crate_ring(xp: Any, ones_t: Any, perm_s: Any, n: int) -> tuple[Any, Any, Any]:
    """int64 ``(ring_start, ring_len, ring_col)``: ring position ``p`` holds column ``inv_s[p]``, whose
    interval on the source ring starts at ``off_t[inv_s[p]]`` and covers ``ones_t[inv_s[p]]`` phases."""
    inv_s = inverse_permutation(xp, perm_s)
    off_t = exclusive_cumsum_mod(xp, ones_t, n)
    return off_t[inv_s], ones_t[inv_s].astype(xp.int64), inv_s


def route_counts(backend: Any, ones_s: Any, ones_t: Any, perm_s: Any, perm_t: Any, k: int, seed: int) -> Any:
    """The crate's ``phase_router`` from row popcounts (validated int64 vectors of the backend's ``xp``,
    all of length ``n``) → int32 ``(n, k)`` on the backend."""
    xp = backend.xp
    n = int(ones_s.shape[0])
    ring = crate_ring(xp, ones_t, perm_s, n)
    off_s = exclusive_cumsum_mod(xp, ones_s, n)
    return backend.crate_rows(
        xp.ascontiguousarray(perm_t, dtype=xp.int64), off_s, ones_s.astype(xp.int64), *ring, n=n, k=k, row0=0, seed=seed
    )


def auto_permutations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 NumPy ``(col_perm_s, col_perm_t)`` of the crate's ``phase_router_auto`` (drawn on the host CPU)."""
    from .backends import import_backend_module

    return import_backend_module("gpu_phase_router.backends.cpu_crate").auto_permutations(n, seed)
