"""Host preparation shared by several methods: the O(n) arrays of SPEC §3, §7 and §11.

Written once against an array module ``xp`` (NumPy or CuPy) so the CPU and CUDA paths run the
same code on their own device; only elementwise IEEE operations and integer scans are used,
so both give the same bits. Each method's own preparation lives in :mod:`gpu_phase_router.methods`;
the summation tree in :mod:`gpu_phase_router._tree`.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ._keys import STREAM_PERM_T, stream
from ._tree import tree_sum
from ._validate import check_sum


def weights_to_counts(
    xp: Any, weights: Any, density: float, n_other: int, mean: float | None = None, name: str = "weights"
) -> Any:
    """SPEC §7: int64 counts ``clip(rint(w / mean(w) * density * n_other), 1, n_other)``, 0 for 0.

    ``mean`` may be passed in when ``weights`` is one block of a longer vector. Raises
    ``ValueError`` naming ``name`` when the sum of the weights overflows float64.
    """
    w = xp.asarray(weights, dtype=xp.float64)
    if mean is None:
        mean = tree_sum(xp, w) / w.shape[0]
    if not math.isfinite(mean) or mean <= 0:
        raise ValueError(f"{name}: the mean weight must be finite and positive; got {mean} (rescale the values)")
    scaled = w / mean  # then * density, then * n_other: the same float operations, in place
    scaled *= density
    scaled *= n_other
    xp.rint(scaled, out=scaled)
    xp.maximum(scaled, 1, out=scaled)  # clip to [1, n_other] (no NaN here: the weights are finite)
    xp.minimum(scaled, n_other, out=scaled)
    counts = scaled.astype(xp.int64)
    counts[w == 0] = 0
    return counts


def capacity_cum(xp: Any, caps: Any) -> Any:
    """SPEC §11: uint64 ``cum`` (length ``n_tgt + 1``) of the capacity units ``u[t]``."""
    c = xp.asarray(caps, dtype=xp.float64)
    total = check_sum(xp, "target_capacities", c)
    units = xp.maximum(1, xp.rint(c / total * 2.0**31)).astype(xp.uint64)
    units = xp.where(c == 0, xp.uint64(0), units)
    cum = xp.zeros(c.shape[0] + 1, dtype=xp.uint64)
    cum[1:] = xp.cumsum(units, dtype=xp.uint64)
    return cum


@functools.lru_cache(maxsize=64)
def _host_capacity_cum(caps_bytes: bytes) -> np.ndarray:
    return capacity_cum(np, np.frombuffer(caps_bytes, dtype=np.float64))


def host_capacity_cum(caps: Any) -> tuple[bytes, np.ndarray]:
    """``(key, cum)``: :func:`capacity_cum` of host capacities, computed once per capacities (the
    systematic router's entry check and its rows, and the weighted hash, use it at every call;
    shared, so callers must not write to it), and the capacities' float64 bytes it is cached by,
    the key of its device copies (:func:`on_backend`)."""
    key = np.ascontiguousarray(caps, dtype=np.float64).tobytes()
    return key, _host_capacity_cum(key)


def exclusive_cumsum_mod(xp: Any, v: Any, m: int, start: int = 0) -> Any:
    """int64 ``(start + v[0] + ... + v[i-1]) mod m`` for every ``i``, exact for any sizes.

    ``v`` holds non-negative integers ``<= m``. Accumulates in int64 when the total cannot pass
    2^63 (always, unless ``len(v) * m`` does); otherwise reduces modulo ``m`` step by step in
    Python integers on the host (SPEC §3: prefix sums must not overflow).
    """
    n = v.shape[0]
    out = xp.empty(n, dtype=xp.int64)
    if not n:
        return out
    start %= m
    if start + n * m < 1 << 63:
        out[0] = start
        rest = out[1:]
        xp.cumsum(v[:-1], dtype=xp.int64, out=rest)
        rest += start
        rest -= (rest // m) * m  # rest % m (an integer division by a scalar is the faster of the two here)
        return out
    acc, host = start, []
    for x in (v.get() if hasattr(v, "get") else np.asarray(v)).tolist():
        host.append(acc)
        acc = (acc + x) % m
    out[:] = xp.asarray(np.array(host, dtype=np.int64))
    return out


def inverse_permutation(xp: Any, perm: Any) -> Any:
    """int64 inverse of a (validated) permutation."""
    inv = xp.empty(perm.shape[0], dtype=xp.int64)
    inv[perm] = xp.arange(perm.shape[0], dtype=xp.int64)
    return inv


def call_ranges(rows: int, rows_per_call: int) -> list[tuple[int, int]]:
    """Consecutive local row ranges ``(a, b)`` of at most ``rows_per_call`` rows, one per kernel call."""
    return [(a, min(rows, a + rows_per_call)) for a in range(0, rows, rows_per_call)]


def block_phases(backend: Any, n_src: int, row0: int, rows: int, seed: int, perm_t: Any = None) -> Any:
    """int64 ``perm_t[row0 : row0 + rows]``, derived (SPEC §6) when ``perm_t`` is ``None``.

    A caller-given ``perm_t`` is the rows' own slice already."""
    if perm_t is not None:
        return perm_t.astype(backend.xp.int64, copy=False)
    return backend.feistel(row0, rows, n_src, stream(seed, STREAM_PERM_T))


_UPLOADS: OrderedDict[tuple[Any, ...], tuple[Any, ...]] = OrderedDict()
_UPLOADS_MAX = 64
_UPLOADS_LOCK = threading.Lock()


def on_backend(backend: Any, key: tuple[Any, ...], *host: np.ndarray) -> tuple[Any, ...]:
    """Host-derived constant arrays as arrays of ``backend.xp``, uploaded once per key and device.

    ``host`` are the NumPy arrays; ``key`` must determine them (e.g. the capacities' bytes and
    the sizes). On a NumPy backend the host arrays are returned as they are; on a
    device the uploaded copies are kept (the last 64 keys), so a training loop that routes with
    the same capacities uploads them once, not on every call. Thread-safe.
    """
    xp = backend.xp
    if xp is np:
        return host
    cuda = getattr(xp, "cuda", None)
    full = (backend.name, id(xp), cuda.Device().id if cuda is not None else None, *key)
    with _UPLOADS_LOCK:
        hit = _UPLOADS.get(full)
        if hit is not None:
            _UPLOADS.move_to_end(full)
            return hit
    hit = tuple(xp.asarray(a) for a in host)
    with _UPLOADS_LOCK:
        _UPLOADS[full] = hit
        while len(_UPLOADS) > _UPLOADS_MAX:
            _UPLOADS.popitem(last=False)
    return hit
