"""Block routing: rows ``[row0, row0 + rows)`` of a routing result, computed on their own.

Sources are independent once a few global quantities are known (SPEC §1), so any contiguous
block of rows can be routed by itself — by another thread, process, GPU or machine — and the
blocks concatenated give the full result bit for bit. A block needs, besides its own inputs:

* ``n_src``: the global number of sources (it fixes the source ring and the permutations);
* ``row0``: the global index of its first row;
* for ``method="phase"``: ``degree_prefix``, the sum of the degrees ``d[0] + ... + d[row0 - 1]``
  of all earlier rows (it fixes where each source starts on the target ring; with fewer targets
  than sources that is the virtual ring of SPEC §13, of :func:`ring_size` positions), and, when
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
    n_ring = blocks.ring_size(caps, n_src=len(w), k=4, density=0.3)  # len(caps) unless len(caps) < len(w)
    prefix = int(blocks.source_degrees(w[:a], weight_mean=mean, n_tgt=n_ring, density=0.3).sum())
    rows = blocks.route_block(w[a:b], caps, n_src=len(w), row0=a, k=4, seed=7,
                              weight_mean=mean, degree_prefix=prefix)
    assert (rows == route(w, caps, k=4, seed=7)[a:b]).all()
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._arrays import Array, array_namespace, on_caller_stream, to_backend_array, to_numpy
from ._prep import weights_to_counts
from ._tree import tree_combine, tree_partials, tree_sum
from ._validate import (
    as_vector,
    check_density,
    check_int,
    check_int_vector,
    check_k,
    check_nonnegative_weights,
    check_permutation,
    check_real,
    check_route_options,
    check_rows_per_call,
    check_seed,
    check_size,
    check_uniform_weights,
    check_weights,
)
from .backends import Backend, BackendName, resolve
from .methods import RowRange, get_method
from .methods.phase import phase_rows

Partial = tuple[int, int, float]


def _row0(row0: Any, rows: int, n_src: int, what: str) -> int:
    row0 = check_int("row0", row0, lo=0, hi=n_src)
    if row0 + rows > n_src:
        raise ValueError(f"row0 + len({what}) must be <= n_src={n_src}; got {row0} + {rows} = {row0 + rows}")
    return row0


def _degree_prefix(degree_prefix: Any, row0: int, n_tgt: int, method: str) -> int:
    if degree_prefix is None:
        if row0 == 0:
            return 0
        raise TypeError(
            f"degree_prefix is required for method={method!r} when row0 > 0: the sum of the degrees of rows [0, row0)"
        )
    return check_int("degree_prefix", degree_prefix, lo=0, hi=row0 * n_tgt)


def _mean(weight_mean: Any, method: str) -> float:
    if weight_mean is None:
        raise TypeError(
            f"weight_mean is required for method={method!r} when the rows are not all n_src sources: "
            "the mean of all n_src source weights (gpu_phase_router.blocks.weight_mean or "
            "sum_from_partials(...) / n_src)"
        )
    return check_real("weight_mean", weight_mean, lo=0.0, lo_open=True)


def _block_perm_t(xp: Any, perm_t: Array, rows: int, n_src: int) -> Array:
    """The rows' slice of ``perm_t``: length ``rows``, values in ``[0, n_src)``, no repeats.

    For all ``n_src`` rows that makes it a permutation; that the slices of several row ranges
    together form one cannot be checked here."""
    if rows == n_src:
        return check_permutation(xp, "perm_t", perm_t, n_src)
    pt = check_int_vector(xp, "perm_t", perm_t, length=rows, lo=0, hi=n_src - 1)
    if rows and int(xp.unique(pt).shape[0]) != rows:
        raise ValueError(
            "perm_t (the slice perm_t[row0:row0 + rows]) repeats a value, "
            f"so it is not part of a permutation of range({n_src})"
        )
    return pt


@on_caller_stream
def route_counts_block(
    source_degrees: Array,
    target_counts: Array,
    *,
    n_src: int,
    row0: int,
    degree_prefix: int | None = None,
    k: int,
    seed: int,
    perm_s: Array = None,
    perm_t: Array = None,
    backend: BackendName = "auto",
    rows_per_call: int | None = None,
    block_rows: int | None = None,
) -> Array:
    """Rows ``row0 .. row0 + len(source_degrees) - 1`` of :func:`~gpu_phase_router.route_counts`.

    ``route_counts_block(d[a:b], c, n_src=len(d), row0=a, degree_prefix=int(d[:a].sum()), ...)``
    equals ``route_counts(d, c, ...)[a:b]`` bit for bit, on every backend; ``route_counts`` is
    this function with ``row0=0``.

    Args:
        source_degrees: integer ``[rows]`` — the degrees ``d[row0 : row0 + rows]``, each in
            ``[0, n_tgt]`` (``rows`` may be 0).
        target_counts: integer ``[n_tgt]`` — *all* capacity counts, each in ``[0, n_src]``.
        n_src: the global number of sources (``>= 1``).
        row0: global index of the first row; ``row0 + rows <= n_src``.
        degree_prefix: ``d[0] + ... + d[row0 - 1]`` (so ``0 <= degree_prefix <= row0 * n_tgt``);
            may be left out when ``row0 == 0``.
        k: targets per source, ``1 <= k <= n_tgt``.
        seed: integer in ``[0, 2^64)``.
        perm_s: optional full permutation of ``range(n_tgt)`` (column → target-ring position).
        perm_t: optional — the slice ``perm_t[row0 : row0 + rows]`` of a permutation of
            ``range(n_src)`` (source → source-ring phase). For all rows it must be a permutation;
            for a part only the slice's own checks are possible (length, range, no repeats).
        backend: ``"auto"`` (follow the data), ``"cpu"`` or ``"cuda"``.
        rows_per_call: rows per kernel call (memory beyond the output is O(rows_per_call + n_tgt));
            ``block_rows`` is its former name.

    Returns:
        routes: int32 ``[rows, k]`` in the library and on the device of the inputs — ``k``
        distinct targets per row in ascending key order, ``-1`` where a source has fewer than
        ``k`` candidates. Deterministic for a given seed, identical on every backend.
    """
    if source_degrees is None or target_counts is None:
        raise TypeError("source_degrees and target_counts are required")
    be, ns = resolve(backend, source_degrees=source_degrees, target_counts=target_counts, perm_s=perm_s, perm_t=perm_t)
    xp = be.xp
    n_src = check_size("n_src", n_src)
    c = as_vector(np, "target_counts", to_numpy(target_counts))
    n_tgt = int(c.shape[0])
    if n_tgt < 1:
        raise ValueError("target_counts must not be empty (n_tgt >= 1)")
    c = check_int_vector(np, "target_counts", c, lo=0, hi=n_src)
    d = check_int_vector(xp, "source_degrees", to_backend_array(source_degrees, xp), lo=0, hi=n_tgt)
    rows = int(d.shape[0])
    row0 = _row0(row0, rows, n_src, "source_degrees")
    prefix = _degree_prefix(degree_prefix, row0, n_tgt, "phase")
    k = check_k(k, n_tgt)
    seed = check_seed(seed)
    ps = None if perm_s is None else check_permutation(xp, "perm_s", to_backend_array(perm_s, xp), n_tgt)
    pt = None if perm_t is None else _block_perm_t(xp, to_backend_array(perm_t, xp), rows, n_src)
    per_call = check_rows_per_call(rows_per_call, block_rows)
    rr = RowRange(None, n_src, row0, rows, k, seed, degree_prefix=prefix, rows_per_call=per_call)
    return ns.wrap(counts_rows(be, d, c, rr, perm_s=ps, perm_t=pt))


def counts_rows(be: Backend, d: Array, c: Any, rr: RowRange, *, perm_s: Array = None, perm_t: Array = None) -> Array:
    """The phase router from validated counts (SPEC §2–§5): int64 degrees ``d`` of the rows of ``rr``
    (arrays of ``be.xp``), all capacity counts ``c`` (host or device) and the optional validated
    permutations (``perm_t``: the rows' slice) → int32 ``(rr.rows, rr.k)`` of ``be.xp``."""
    return phase_rows(be, c, rr, k=rr.k, d=d, perm_s=perm_s, perm_t=perm_t)


@on_caller_stream
def route_block(
    source_weights: Array,
    target_capacities: Array,
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
    rows_per_call: int | None = None,
    block_rows: int | None = None,
) -> Array:
    """Rows ``row0 .. row0 + rows - 1`` of :func:`~gpu_phase_router.route`, for every method.

    Equal bit for bit to ``route(w, target_capacities, k=k, seed=seed, density=density,
    method=method)[row0 : row0 + rows]`` when ``source_weights = w[row0 : row0 + rows]``,
    ``n_src = len(w)`` and, for the methods that need them (``method="phase"``: see
    :func:`gpu_phase_router.methods.get_method`), ``weight_mean = weight_mean(w)`` and
    ``degree_prefix = source_degrees(w[:row0], ...).sum()`` (see the module docstring).
    ``route`` is this function with ``row0=0`` and all rows.

    Args:
        source_weights: ``[rows]`` finite weights ``>= 0`` of the rows' sources (``rows`` may be
            0; the rows may be all zeros as long as the whole vector is not), or ``None`` for
            sources of weight 1 (rows ``[row0, n_src)``; the mean is then 1).
        target_capacities: ``[n_tgt]`` *all* target capacities (finite, ``>= 0``, one positive).
        n_src: the global number of sources (``>= 1``).
        row0: global index of the first row; ``row0 + rows <= n_src``.
        k, seed, density: as in ``route``.
        method: a name from :func:`~gpu_phase_router.available_methods`. For a method with
            uniform sources (``"systematic"``) every weight must be the same positive value; a
            part of the rows can only check its own.
        weight_mean: the mean of all ``n_src`` weights in the package's summation order —
            :func:`weight_mean`, or ``sum_from_partials(partials, n_src) / n_src``. Needed by
            ``"phase"`` unless the rows are all ``n_src`` sources or the weights are ``None``;
            ignored by the other methods.
        degree_prefix: the sum of the degrees of rows ``[0, row0)``, e.g.
            ``int(source_degrees(w[:row0], ...).sum())``. Needed by ``"phase"`` when ``row0 > 0``
            and the weights are given; ignored by the other methods.
        backend: ``"auto"`` (follow the data), ``"cpu"`` or ``"cuda"``.
        rows_per_call: rows per kernel call (memory beyond the output is O(rows_per_call + n_tgt));
            ``block_rows`` is its former name.

    Returns:
        routes: int32 ``[rows, k]`` in the library and on the device of the inputs.
    """
    m = get_method(method)
    if target_capacities is None:
        raise TypeError("target_capacities is required: all n_tgt capacities (use ones for uniform targets)")
    be, ns = resolve(backend, source_weights=source_weights, target_capacities=target_capacities)
    xp = be.xp
    n_src = check_size("n_src", n_src)
    caps = check_weights(np, "target_capacities", to_numpy(target_capacities))
    n_tgt = int(caps.shape[0])
    w = (
        None
        if source_weights is None
        else check_nonnegative_weights(xp, "source_weights", to_backend_array(source_weights, xp))
    )
    rows = n_src - check_int("row0", row0, lo=0, hi=n_src) if w is None else int(w.shape[0])
    row0 = _row0(row0, rows, n_src, "source_weights")
    whole = rows == n_src
    if whole and w is not None and not bool((w > 0).any()):
        raise ValueError("source_weights must have at least one positive entry; got all zeros")
    k, seed, density, per_call = check_route_options(k, n_tgt, seed, density, rows_per_call, block_rows)
    if m.uniform_sources and w is not None:
        check_uniform_weights(xp, w)
        w = None  # every source gets k slots: the value of the weight does not matter
    mean = 1.0
    if m.uses_weight_mean and w is not None:
        mean = tree_sum(xp, w) / n_src if whole and weight_mean is None else _mean(weight_mean, m.name)
        if not math.isfinite(mean):
            raise ValueError("source_weights: the sum of the weights overflows float64 (rescale the values)")
    prefix = 0
    if m.degrees is not None:
        if w is None and degree_prefix is None:  # sources of weight 1 all have the same degree
            one = m.degrees(np, np.ones(1), RowRange(caps, n_src, row0, rows, k, seed, density=density))
            prefix = row0 * int(one[0])
        elif degree_prefix is None:  # 0 for the first row, else the error naming degree_prefix
            prefix = _degree_prefix(None, row0, 0, m.name)
        else:  # degrees live on the method's ring: n_tgt, or V of SPEC §13 for a banded phase router
            ring = m.ring_size(RowRange(caps, n_src, row0, rows, k, seed, density=density))
            prefix = _degree_prefix(degree_prefix, row0, ring, m.name)
    rr = RowRange(caps, n_src, row0, rows, k, seed, density, w, mean, prefix, per_call)
    if m.check is not None:
        m.check(rr)
    return ns.wrap(m.rows(be, rr))


def sum_partials(values: Any, start: int = 0) -> list[Partial]:
    """Partial sums of a chunk ``values = v[start : start + len(values)]`` of a float vector ``v``.

    Returns ``(level, index, value)`` node sums of the package's summation tree (at most about
    ``2 * log2(len)`` of them; ``(level, index)`` covers ``v[index * 2^level : (index + 1) * 2^level]``).
    Chunks may have any sizes and be computed anywhere (CPU or GPU give the same floats).

    Args:
        values: float ``[len]`` (NumPy or CuPy), finite and ``>= 0`` (source weights).
        start: global index of ``values[0]``.
    """
    ns = array_namespace(values=values)
    v = check_nonnegative_weights(ns.xp, "values", ns.asarray(values))
    start = check_int("start", start, lo=0)
    return tree_partials(ns.xp, v, start)


def sum_from_partials(partials: Any, n: int) -> float:
    """The sum of ``v`` (length ``n``) from the :func:`sum_partials` of chunks covering ``[0, n)`` exactly
    once (in any order) — the same float as the single-process sum used by ``route``."""
    n = check_int("n", n, lo=1)
    try:
        parts = [(int(lv), int(ix), float(val)) for lv, ix, val in partials]
    except (TypeError, ValueError):
        raise TypeError("partials must be (level, index, value) triples from sum_partials") from None
    return tree_combine(parts, n)


def weight_mean(source_weights: Array) -> float:
    """Mean of all source weights exactly as ``route`` computes it (the ``weight_mean`` of a block)."""
    ns = array_namespace(source_weights=source_weights)
    w = check_weights(ns.xp, "source_weights", ns.asarray(source_weights))
    return tree_sum(ns.xp, w) / w.shape[0]


def ring_size(target_capacities: Any, *, n_src: int, k: int = 4, density: float = 0.3, method: str = "phase") -> int:
    """Length of the target ring on which ``method``'s degrees are counted: for ``"phase"``, ``V``
    of SPEC §13 when ``n_tgt < n_src`` (the banded phase router), else ``n_tgt``. Pass it as
    ``n_tgt`` to :func:`source_degrees` to get a block's ``degree_prefix``::

        n_ring = blocks.ring_size(caps, n_src=len(w), k=k, density=density)
        prefix = int(blocks.source_degrees(w[:row0], weight_mean=mean, n_tgt=n_ring, density=density).sum())

    Host arithmetic on the capacities (a device array is copied once); the layout is cached.
    """
    m = get_method(method)
    if target_capacities is None:
        raise TypeError("target_capacities is required: all n_tgt capacities")
    caps = check_weights(np, "target_capacities", to_numpy(target_capacities))
    n_src = check_size("n_src", n_src)
    k = check_k(k, int(caps.shape[0]))
    rr = RowRange(caps, n_src, 0, 0, k, 0, density=check_density(density))
    return m.ring_size(rr)


def source_degrees(source_weights: Array, *, weight_mean: float, n_tgt: int, density: float = 0.3) -> Array:
    """Degrees ``d`` (SPEC §7) of a block of sources, given the mean of all weights → int64 ``[rows]``.

    Their sum over all earlier blocks is the ``degree_prefix`` of a block. ``n_tgt`` is the length
    of the ring the degrees are counted on: :func:`ring_size` (``V`` of SPEC §13 for the banded
    phase router, when there are fewer targets than sources).
    """
    ns = array_namespace(source_weights=source_weights)
    w = check_nonnegative_weights(ns.xp, "source_weights", ns.asarray(source_weights))
    mean = _mean(weight_mean, "phase")
    n_tgt = check_size("n_tgt", n_tgt)
    density = check_density(density)
    return ns.wrap(weights_to_counts(ns.xp, w, density, n_tgt, mean=mean))


__all__ = [
    "ring_size",
    "route_block",
    "route_counts_block",
    "source_degrees",
    "sum_from_partials",
    "sum_partials",
    "weight_mean",
]
