"""Block routing: rows ``[row0, row0 + rows)`` of a routing result, computed on their own.

Sources are independent once a few global quantities are known (SPEC §1), so any contiguous
block of rows can be routed by itself — by another thread, process, GPU or machine — and the
blocks concatenated give the full result bit for bit. A block needs, besides its own inputs:

* ``n_src``: the global number of sources (it fixes the source ring and the permutations);
* ``row0``: the global index of its first row;
* for ``method="phase"``: ``degree_prefix``, the sum of the degrees ``d[0] + ... + d[row0 - 1]``
  of all earlier rows (it fixes where each source starts on the target ring; with fewer targets
  than sources the ring is the virtual ring of SPEC §13, of :func:`ring_size` positions), and, when
  starting from weights, ``weight_mean``, the mean of *all* source weights (SPEC §7).

The mean is a float, so it must be computed in one fixed order to be reproducible. The package
uses one summation tree everywhere (``route``, ``route_block``, the Dask path, CPU and CUDA): the
weights are padded with zeros to a power of two and adjacent pairs are added level by level.
Every aligned power-of-two run of weights is a node of that tree, so :func:`sum_partials` of
each chunk (a handful of ``(level, index, value)`` node sums) and :func:`sum_from_partials`
rebuild exactly the same float as the single-process sum, for *any* chunking — no exactly
rounded or order-free summation is needed. :func:`weight_mean` does it for a vector in memory.

Example — rows ``[a, b)`` of ``route(w, caps, k=4, seed=7)``::

    mean = blocks.weight_mean(w)                                  # or sum_from_partials(...) / n_src
    n_ring = blocks.ring_size(caps, n_src=len(w), k=4, density=0.3)    # len(caps) unless len(caps) < len(w)
    prefix = int(blocks.source_degrees(w[:a], weight_mean=mean, n_tgt=n_ring, density=0.3).sum())
    rows = blocks.route_block(w[a:b], caps, n_src=len(w), row0=a, k=4, seed=7,
                              weight_mean=mean, degree_prefix=prefix)
    assert (rows == route(w, caps, k=4, seed=7)[a:b]).all()
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _prep
from ._arrays import common_library, from_backend_array, to_backend_array, to_numpy
from ._validate import (
    as_vector,
    check_density,
    check_int,
    check_int_vector,
    check_k,
    check_permutation,
    check_seed,
    check_uniform_weights,
    check_weights,
)
from .api import DEFAULT_BLOCK_ROWS
from .backends import Backend, BackendName, get_backend

Partial = tuple[int, int, float]
BLOCK_METHODS = ("phase", "systematic")


def _resolve(backend: BackendName, named: dict[str, Any]) -> tuple[Backend, str, tuple[str, int]]:
    lib, dev = common_library(named)
    return get_backend(backend, data_on_device=dev[0] == "cuda"), lib, dev


def _block_rows(block_rows: Any) -> int:
    return DEFAULT_BLOCK_ROWS if block_rows is None else check_int("block_rows", block_rows, lo=1)


def _block_weights(xp: Any, name: str, x: Any) -> Any:
    """Finite, non-negative weights of one block → float64 (may be empty or all zero)."""
    if x is None:
        raise TypeError(f"{name} is required: the weights of the block's rows (use ones for uniform sources)")
    x = as_vector(xp, name, x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers; got dtype {x.dtype}")
    x = x.astype(xp.float64, copy=False)
    if x.shape[0]:
        if not bool(xp.isfinite(x).all()):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
        if bool((x < 0).any()):
            raise ValueError(f"{name} must be >= 0; got minimum {float(x.min())}")
    return x


def _row0(row0: Any, rows: int, n_src: int, what: str) -> int:
    row0 = check_int("row0", row0, lo=0, hi=n_src)
    if row0 + rows > n_src:
        raise ValueError(f"row0 + len({what}) must be <= n_src={n_src}; got {row0} + {rows} = {row0 + rows}")
    return row0


def _degree_prefix(degree_prefix: Any, row0: int, n_tgt: int) -> int:
    if degree_prefix is None:
        raise TypeError("degree_prefix is required for method='phase': the sum of the degrees of rows [0, row0)")
    return check_int("degree_prefix", degree_prefix, lo=0, hi=row0 * n_tgt)


def _mean(weight_mean: Any) -> float:
    if weight_mean is None:
        raise TypeError("weight_mean is required for method='phase': the mean of all n_src source weights "
                        "(gpu_phase_router.blocks.weight_mean or sum_from_partials(...) / n_src)")
    if isinstance(weight_mean, bool) or not isinstance(weight_mean, numbers.Real):
        raise TypeError(f"weight_mean must be a real number; got {type(weight_mean).__name__}")
    weight_mean = float(weight_mean)
    if not (math.isfinite(weight_mean) and weight_mean > 0):
        raise ValueError(f"weight_mean must be finite and > 0; got {weight_mean}")
    return weight_mean


def _block_perm_t(xp: Any, perm_t: Any, rows: int, n_src: int) -> Any:
    """The block's slice of ``perm_t``: length ``rows``, values in ``[0, n_src)``, no repeats.

    That the slices of all blocks together form a permutation cannot be checked here."""
    pt = check_int_vector(xp, "perm_t", to_backend_array(perm_t, xp), length=rows, lo=0, hi=n_src - 1)
    if rows and int(xp.unique(pt).shape[0]) != rows:
        raise ValueError("perm_t (the block's slice perm_t[row0:row0 + rows]) repeats a value, "
                         f"so it is not part of a permutation of range({n_src})")
    return pt


def route_counts_block(
    source_degrees: Any,
    target_counts: Any,
    *,
    n_src: int,
    row0: int,
    degree_prefix: int,
    k: int,
    seed: int,
    perm_s: Any = None,
    perm_t: Any = None,
    backend: BackendName = "auto",
    block_rows: int | None = None,
) -> Any:
    """Rows ``[row0, row0 + len(source_degrees))`` of :func:`~gpu_phase_router.route_counts`.

    ``route_counts_block(d[a:b], c, n_src=len(d), row0=a, degree_prefix=int(d[:a].sum()), ...)``
    equals ``route_counts(d, c, ...)[a:b]`` bit for bit, on every backend.

    Args:
        source_degrees: integer ``[rows]`` — the block's degrees ``d[row0 : row0 + rows]``, each
            in ``[0, n_tgt]`` (``rows`` may be 0).
        target_counts: integer ``[n_tgt]`` — *all* capacity counts, each in ``[0, n_src]``.
        n_src: the global number of sources (``>= 1``).
        row0: global index of the block's first row; ``row0 + rows <= n_src``.
        degree_prefix: ``d[0] + ... + d[row0 - 1]`` (so ``0 <= degree_prefix <= row0 * n_tgt``).
        k, seed: as in ``route_counts``.
        perm_s: optional full permutation of ``range(n_tgt)``.
        perm_t: optional — the block's slice ``perm_t[row0 : row0 + rows]`` of a permutation of
            ``range(n_src)``. Only block-local checks are possible (length, range, no repeats).
        backend: ``"auto"`` (follow the data), ``"cpu"`` or ``"cuda"``.
        block_rows: rows per kernel call (memory beyond the output is O(block_rows + n_tgt)).

    Returns:
        routes: int32 ``[rows, k]`` in the library and on the device of the inputs.
    """
    named = {"source_degrees": source_degrees, "target_counts": target_counts, "perm_s": perm_s, "perm_t": perm_t}
    be, lib, dev = _resolve(backend, named)
    xp = be.xp
    if source_degrees is None or target_counts is None:
        raise TypeError("source_degrees and target_counts are required")
    n_src = check_int("n_src", n_src, lo=1)
    c = as_vector(xp, "target_counts", to_backend_array(target_counts, xp))
    n_tgt = int(c.shape[0])
    if n_tgt < 1:
        raise ValueError("target_counts must not be empty (n_tgt >= 1)")
    c = check_int_vector(xp, "target_counts", c, lo=0, hi=n_src)
    d = check_int_vector(xp, "source_degrees", to_backend_array(source_degrees, xp), lo=0, hi=n_tgt)
    rows = int(d.shape[0])
    row0 = _row0(row0, rows, n_src, "source_degrees")
    prefix = _degree_prefix(degree_prefix, row0, n_tgt)
    k = check_k(k, n_tgt)
    seed = check_seed(seed)
    ps = None if perm_s is None else check_permutation(xp, "perm_s", to_backend_array(perm_s, xp), n_tgt)
    pt = None if perm_t is None else _block_perm_t(xp, perm_t, rows, n_src)
    out = _prep.phase_rows_blocked(be, lambda a, b: d[a:b], c, rows=rows, n_src=n_src, row0=row0,
                                   degree_prefix=prefix, k=k, seed=seed, perm_s=ps, perm_t=pt,
                                   block_rows=_block_rows(block_rows))
    return from_backend_array(out, lib, dev)


def route_block(
    source_weights: Any,
    target_capacities: Any,
    *,
    n_src: int,
    row0: int,
    k: int = 4,
    seed: int = 42,
    density: float = 0.3,
    method: str = "phase",
    weight_mean: float | None = None,
    degree_prefix: int | None = None,
    backend: BackendName = "auto",
    block_rows: int | None = None,
) -> Any:
    """Rows ``[row0, row0 + len(source_weights))`` of :func:`~gpu_phase_router.route`.

    Equal bit for bit to ``route(w, target_capacities, k=k, seed=seed, density=density,
    method=method)[row0 : row0 + rows]`` when ``source_weights = w[row0 : row0 + rows]``,
    ``n_src = len(w)`` and, for ``method="phase"``, ``weight_mean = weight_mean(w)`` and
    ``degree_prefix = source_degrees(w[:row0], ...).sum()`` (see the module docstring). For
    ``route(source_weights=None, ...)`` pass ones and ``n_src = n_tgt`` (the mean is then 1.0).

    Args:
        source_weights: ``[rows]`` finite weights ``>= 0`` of the block's sources (``rows`` may
            be 0; a block may be all zeros as long as the whole vector is not).
        target_capacities: ``[n_tgt]`` *all* target capacities (finite, ``>= 0``, one positive).
        n_src: the global number of sources (``>= 1``).
        row0: global index of the block's first row; ``row0 + rows <= n_src``.
        k, seed, density: as in ``route``.
        method: ``"phase"`` or ``"systematic"``. For ``"systematic"`` every weight of the whole
            vector must be the same positive value; a block can only check its own rows.
        weight_mean: ``method="phase"`` only (ignored otherwise): the mean of all ``n_src``
            weights in the package's summation order — :func:`weight_mean`, or
            ``sum_from_partials(partials, n_src) / n_src``.
        degree_prefix: ``method="phase"`` only (ignored otherwise): the sum of the degrees of
            rows ``[0, row0)``, e.g. ``int(source_degrees(w[:row0], ...).sum())`` or the
            running sum of earlier blocks' degrees.
        backend: ``"auto"`` (follow the data), ``"cpu"`` or ``"cuda"``.
        block_rows: rows per kernel call (memory beyond the output is O(block_rows + n_tgt)).

    Returns:
        routes: int32 ``[rows, k]`` in the library and on the device of the inputs.
    """
    if not isinstance(method, str) or method not in BLOCK_METHODS:
        raise ValueError(f"method must be one of {list(BLOCK_METHODS)} for block routing; got {method!r}")
    be, lib, dev = _resolve(backend, {"source_weights": source_weights, "target_capacities": target_capacities})
    xp = be.xp
    w = _block_weights(xp, "source_weights", to_backend_array(source_weights, xp))
    if target_capacities is None:
        raise TypeError("target_capacities is required: all n_tgt capacities (use ones for uniform targets)")
    caps = check_weights(xp, "target_capacities", to_backend_array(target_capacities, xp))
    n_src = check_int("n_src", n_src, lo=1)
    n_tgt = int(caps.shape[0])
    rows = int(w.shape[0])
    row0 = _row0(row0, rows, n_src, "source_weights")
    k = check_k(k, n_tgt)
    seed = check_seed(seed)
    density = check_density(density)
    br = _block_rows(block_rows)
    if method == "systematic":
        check_uniform_weights(xp, w)
        out = _prep.systematic_rows_blocked(be, caps, n_src=n_src, k=k, seed=seed, row0=row0, rows=rows,
                                            block_rows=br)
        return from_backend_array(out, lib, dev)
    mean = _mean(weight_mean)
    caps_host = to_numpy(caps)
    prefix = _degree_prefix(degree_prefix, row0, _prep.phase_ring_size(caps_host, n_src=n_src, k=k, density=density))
    out = _prep.phase_rows_from_weights(be, w, caps, n_src=n_src, row0=row0, degree_prefix=prefix, k=k, seed=seed,
                                        density=density, mean=mean, block_rows=br, caps_host=caps_host)
    return from_backend_array(out, lib, dev)


def ring_size(target_capacities: Any, *, n_src: int, k: int = 4, density: float = 0.3) -> int:
    """Length of the target ring that ``route(method="phase")`` uses: ``V`` (SPEC §13) when
    ``n_tgt < n_src``, else ``n_tgt``. A block's ``degree_prefix`` counts degrees on this ring::

        n_ring = blocks.ring_size(caps, n_src=len(w), k=k, density=density)
        prefix = int(blocks.source_degrees(w[:row0], weight_mean=mean, n_tgt=n_ring, density=density).sum())

    Computed on the host from the capacities (a device array is copied once; the result is cached).
    """
    if target_capacities is None:
        raise TypeError("target_capacities is required: all n_tgt capacities")
    caps = check_weights(np, "target_capacities", to_numpy(target_capacities))
    n_src = check_int("n_src", n_src, lo=1)
    k = check_k(k, int(caps.shape[0]))
    density = check_density(density)
    return _prep.phase_ring_size(caps, n_src=n_src, k=k, density=density)


def sum_partials(values: Any, start: int = 0) -> list[Partial]:
    """Partial sums of a chunk ``values = v[start : start + len(values)]`` of a float vector ``v``.

    Returns ``(level, index, value)`` node sums of the package's summation tree (at most about
    ``2 * log2(len)`` of them; ``(level, index)`` covers ``v[index * 2^level : (index + 1) * 2^level]``).
    Chunks may have any sizes and be computed anywhere (CPU or GPU give the same floats).

    Args:
        values: float ``[len]`` (NumPy or CuPy), finite and ``>= 0`` (source weights).
        start: global index of ``values[0]``.
    """
    xp, _lib, _dev = _xp_of({"values": values})
    v = _block_weights(xp, "values", to_backend_array(values, xp))
    start = check_int("start", start, lo=0)
    return _prep.tree_partials(xp, v, start)


def sum_from_partials(partials: Any, n: int) -> float:
    """The sum of ``v`` (length ``n``) from the :func:`sum_partials` of chunks covering ``[0, n)`` exactly
    once (in any order) — the same float as the single-process sum used by ``route``."""
    n = check_int("n", n, lo=1)
    try:
        parts = [(int(lv), int(ix), float(val)) for lv, ix, val in partials]
    except (TypeError, ValueError):
        raise TypeError("partials must be (level, index, value) triples from sum_partials") from None
    return _prep.tree_combine(parts, n)


def weight_mean(source_weights: Any) -> float:
    """Mean of all source weights exactly as ``route`` computes it (the ``weight_mean`` of a block)."""
    xp, _lib, _dev = _xp_of({"source_weights": source_weights})
    w = check_weights(xp, "source_weights", to_backend_array(source_weights, xp))
    return _prep.tree_sum(xp, w) / w.shape[0]


def source_degrees(source_weights: Any, *, weight_mean: float, n_tgt: int, density: float = 0.3) -> Any:
    """Degrees ``d`` (SPEC §7) of a block of sources, given the mean of all weights → int64 ``[rows]``.

    Their sum over all earlier blocks is the ``degree_prefix`` of a block.
    """
    xp, lib, dev = _xp_of({"source_weights": source_weights})
    w = _block_weights(xp, "source_weights", to_backend_array(source_weights, xp))
    mean = _mean(weight_mean)
    n_tgt = check_int("n_tgt", n_tgt, lo=1)
    density = check_density(density)
    return from_backend_array(_prep.weights_to_counts(xp, w, density, n_tgt, mean=mean), lib, dev)


def _xp_of(named: dict[str, Any]) -> tuple[Any, str, tuple[str, int]]:
    """Array module for the elementwise helpers: CuPy for device data, NumPy otherwise."""
    lib, dev = common_library(named)
    if dev[0] == "cuda":
        import cupy

        return cupy, lib, dev
    return np, lib, dev


__all__ = [
    "ring_size",
    "route_block",
    "route_counts_block",
    "source_degrees",
    "sum_from_partials",
    "sum_partials",
    "weight_mean",
]
