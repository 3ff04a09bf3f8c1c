"""Dask integration: route sources held in a chunked ``dask.array``, lazily, chunk by chunk.

Needs the ``dask`` extra (``pip install 'gpu_phase_router[dask]'``); ``import gpu_phase_router``
does not import Dask. The result equals the single-process :func:`gpu_phase_router.route` /
:func:`gpu_phase_router.route_counts` on the gathered inputs bit for bit, for any chunking,
scheduler and backend, because every chunk is routed by :mod:`gpu_phase_router.blocks` with the
global quantities computed once in the graph:

* what the method's entry in :mod:`gpu_phase_router.methods` says it needs: for
  ``method="phase"`` the weight mean (each chunk contributes the node sums of the package's
  fixed summation tree, :func:`~gpu_phase_router.blocks.sum_partials`, combined by
  :func:`~gpu_phase_router.blocks.sum_from_partials` into the very float ``route`` uses), then
  each chunk's degree sum and their exclusive prefix; for ``method="systematic"`` only a global
  check that the weights are uniform; the hash baselines need nothing global;
* :func:`route_counts`: each chunk's degree sum and their exclusive prefix.

The graph has three passes over the source chunks (reductions, degree sums, routing), a few
tasks per chunk; the small reductions are single tasks. Each source chunk is computed once and
kept until its last pass reads it; the target vector is one task of the graph, not a copy in
every chunk's task. Chunks may be NumPy or CuPy arrays (``backend="auto"`` then
routes each chunk where it lives); the small target vector is copied to each chunk's device.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gpu_phase_router.dask needs Dask: pip install 'gpu_phase_router[dask]' (dask[array] and distributed)"
    ) from exc

from . import blocks
from ._arrays import CUPY, array_namespace, library_of, to_numpy
from ._tree import tree_combine, tree_partials
from ._validate import (
    as_vector,
    check_density,
    check_int_vector,
    check_k,
    check_nonnegative_weights,
    check_permutation,
    check_rows_per_call,
    check_seed,
    check_weights,
)
from .backends import BackendName, check_backend_name
from .methods import Method, RowRange, get_method


def _check_rows_array(name: str, x: Any) -> tuple[int, tuple[int, ...]]:
    """A 1-D dask array chunked along its only axis, with known chunk sizes → (n, chunks)."""
    if not isinstance(x, da.Array):
        raise TypeError(
            f"{name} must be a dask.array.Array (e.g. dask.array.from_array(x, chunks=...)); "
            f"got {type(x).__name__}. For in-memory arrays use gpu_phase_router.route directly."
        )
    if x.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D dask array with one entry per source, chunked along that axis "
            f"only; got shape {x.shape} with chunks {x.chunks}"
        )
    chunks = x.chunks[0]
    if any(isinstance(c, float) and math.isnan(c) for c in chunks):
        raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes() first")
    n = int(sum(chunks))
    if n < 1:
        raise ValueError(f"{name} must not be empty (n_src >= 1)")
    meta_lib = library_of(x._meta) or "numpy"
    if meta_lib not in ("numpy", CUPY):
        raise TypeError(f"{name} chunks must be NumPy or CuPy arrays; got {type(x._meta).__name__}")
    return n, tuple(int(c) for c in chunks)


def _check_target(name: str, x: Any) -> np.ndarray:
    if isinstance(x, da.Array):
        raise TypeError(
            f"{name} must be a NumPy or CuPy array (it is small and goes to every chunk); got a "
            f"dask array: pass {name}.compute()"
        )
    if x is None:
        raise TypeError(f"{name} is required")
    return to_numpy(x)


def _routes_array(block_fn: Any, sources: Any, chunks: tuple[int, ...], k: int, token: str, **kwargs: Any) -> Any:
    """The lazy int32 ``[n_src, k]`` routes: ``block_fn`` on every chunk of the 1-D ``sources``
    (see :func:`_route_chunk`)."""
    xp = array_namespace(chunk_meta=sources._meta).xp
    return da.map_blocks(
        _route_chunk,
        sources,
        block_fn=block_fn,
        k=k,
        **kwargs,
        dtype=np.int32,
        chunks=(chunks, (k,)),
        new_axis=1,
        meta=xp.empty((0, 0), dtype=xp.int32),
        token=token,
    )


def _reduce_chunks(name: str, sources: Any, per_chunk: Any, refs: tuple, combine: Any) -> Any:
    """Delayed ``combine([per_chunk(chunk_i, start_i, *refs) for every chunk i])`` (``start_i``:
    the global index of the chunk's first row; ``refs``: ``dask.delayed`` values).

    One task per chunk that reads the chunk's own key, so a chunk is computed once whatever else
    reads it, and one combining task: the graph grows linearly with the chunks. The ``refs`` go
    in by key: each is one task of the graph, not a copy inside every chunk's task."""
    token = tokenize(sources, per_chunk, [r.key for r in refs], combine)
    part, out = f"{name}-chunk-{token}", f"{name}-{token}"
    starts = _exclusive_prefix(list(sources.chunks[0]))
    keys = tuple(r.key for r in refs)
    layer: dict[Any, Any] = {(part, i): (per_chunk, (sources.name, i), a, *keys) for i, a in enumerate(starts)}
    layer[out] = (combine, [(part, i) for i in range(len(starts))])
    return Delayed(out, HighLevelGraph.from_collections(out, layer, dependencies=[sources, *refs]))


def _rows(a: int, b: int) -> str:
    return f" (in source rows [{a}, {b}))"


# --- tasks ---------------------------------------------------------------------------------------


def _weight_stats(w: Any, a: int, want_partials: bool) -> tuple[list, bool, float, float]:
    """Validate one chunk of weights; its tree partials, any-positive, min and max."""
    xp = array_namespace(source_weights=w).xp
    try:
        v = check_nonnegative_weights(xp, "source_weights", w)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc}{_rows(a, a + w.shape[0])}") from None
    if v.shape[0] == 0:
        return [], False, math.inf, -math.inf
    parts = tree_partials(xp, v, a) if want_partials else []
    return parts, bool((v > 0).any()), float(v.min()), float(v.max())


def _weight_mean(stats: list, *, n_src: int, method: Method) -> float | None:
    if not any(s[1] for s in stats):
        raise ValueError("source_weights must have at least one positive entry; got all zeros")
    if method.uniform_sources:
        lo, hi = min(s[2] for s in stats), max(s[3] for s in stats)
        if lo != hi:
            raise ValueError(
                f"method={method.name!r} gives every source exactly k slots, so source_weights must be uniform; "
                f"got values from {lo} to {hi}; use method='phase' for weighted sources"
            )
    if not method.uses_weight_mean:
        return None
    return tree_combine([p for s in stats for p in s[0]], n_src) / n_src


def _weight_degree_sum(
    w: Any, a: int, mean: float, caps: np.ndarray, *, n_src: int, k: int, density: float, method: Method
) -> int:
    xp = array_namespace(source_weights=w).xp
    assert method.degrees is not None
    rr = RowRange(caps, n_src, 0, int(w.shape[0]), k, 0, density=density, weight_mean=mean)
    return int(method.degrees(xp, w.astype(xp.float64, copy=False), rr).sum())


def _count_degree_sum(d: Any, a: int, *, n_tgt: int) -> int:
    xp = array_namespace(source_degrees=d).xp
    try:
        d = check_int_vector(xp, "source_degrees", d, lo=0, hi=n_tgt)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc}{_rows(a, a + d.shape[0])}") from None
    return int(d.sum())


def _exclusive_prefix(sums: list[int]) -> list[int]:
    out, total = [], 0
    for s in sums:
        out.append(total)
        total += s
    return out


def _route_chunk(
    x: Any, target: Any, *, block_fn: Any, prefixes: list[int] | None, block_info: Any = None, **options: Any
) -> Any:
    """One chunk's rows: ``block_fn`` (``route_block`` or ``route_counts_block``) with the chunk's
    ``row0`` and degree prefix (``None`` where the method needs none)."""
    loc = block_info[None]
    i, row0 = loc["chunk-location"][0], loc["array-location"][0][0]
    return block_fn(x, target, row0=row0, degree_prefix=None if prefixes is None else prefixes[i], **options)


# --- public API ----------------------------------------------------------------------------------


def _weight_reductions(w: Any, n_src: int, method: Method) -> Any:
    """One delayed value that validates all chunks of the weights (a task per chunk), checks
    uniformity where the method needs it, and is the global mean (``None`` for methods that do
    not use it)."""
    stats = functools.partial(_weight_stats, want_partials=method.uses_weight_mean)
    return _reduce_chunks(
        "gpu-phase-weight-mean", w, stats, (), functools.partial(_weight_mean, n_src=n_src, method=method)
    )


def weight_mean(source_weights: Any) -> Any:
    """Lazy mean of a chunked 1-D ``dask.array`` of source weights → ``dask.delayed`` float.

    Computed from per-chunk partial sums of the package's summation tree, so ``.compute()`` is
    exactly :func:`gpu_phase_router.blocks.weight_mean` of the gathered weights (the mean that
    ``route`` uses), whatever the chunking.
    """
    n_src, chunks = _check_rows_array("source_weights", source_weights)
    if source_weights.dtype.kind not in "biuf":
        raise TypeError(f"source_weights must hold real numbers; got dtype {source_weights.dtype}")
    return _weight_reductions(source_weights, n_src, get_method("phase"))


def route(
    source_weights: Any,
    target_capacities: Any,
    *,
    k: int = 4,
    seed: int = 42,
    density: float = 0.3,
    method: str = "phase",
    backend: BackendName = "auto",
    rows_per_call: int | None = None,
    block_rows: int | None = None,
) -> Any:
    """Lazy :func:`gpu_phase_router.route` of a chunked ``dask.array`` of source weights.

    Args:
        source_weights: 1-D ``dask.array`` ``[n_src]`` of finite weights ``>= 0`` (NumPy or CuPy
            chunks, any chunk sizes, known). Value errors (negative, NaN, all zero, non-uniform
            for ``"systematic"``) are raised when the result is computed.
        target_capacities: ``[n_tgt]`` NumPy/CuPy array or sequence (validated now).
        k, seed, density: as in :func:`gpu_phase_router.route`.
        method: any method of :func:`gpu_phase_router.available_methods`.
        backend: per chunk; ``"auto"`` follows the chunk's array library. The name is checked now,
            whether ``"cuda"`` can run when the chunks are computed.
        rows_per_call: rows per kernel call inside a chunk (``block_rows``: its former name).

    Returns:
        routes: lazy int32 ``dask.array`` ``[n_src, k]`` with chunks ``(source_weights.chunks[0], (k,))``
        and chunks of the weights' array library; ``.compute()`` equals ``gpu_phase_router.route(
        source_weights.compute(), target_capacities, ...)`` bit for bit.
    """
    m = get_method(method)
    n_src, chunks = _check_rows_array("source_weights", source_weights)
    if source_weights.dtype.kind not in "biuf":
        raise TypeError(f"source_weights must hold real numbers; got dtype {source_weights.dtype}")
    caps = check_weights(np, "target_capacities", _check_target("target_capacities", target_capacities))
    n_tgt = int(caps.shape[0])
    k = check_k(k, n_tgt)
    seed = check_seed(seed)
    density = check_density(density)
    per_call = check_rows_per_call(rows_per_call, block_rows)
    backend = check_backend_name(backend)  # whether "cuda" runs is up to the workers
    if m.check is not None:
        m.check(RowRange(caps, n_src, 0, n_src, k, seed, density=density, rows_per_call=per_call))

    mean = _weight_reductions(source_weights, n_src, m)
    caps_key = dask.delayed(caps, pure=True)  # one task of the graph, not a copy in every chunk's
    prefixes = None
    if m.uses_degree_prefix:
        sums = functools.partial(_weight_degree_sum, n_src=n_src, k=k, density=density, method=m)
        prefixes = _reduce_chunks("gpu-phase-degree-prefix", source_weights, sums, (mean, caps_key), _exclusive_prefix)
    return _routes_array(
        blocks.route_block,
        source_weights,
        chunks,
        k,
        "gpu-phase-route",
        target=caps_key,
        weight_mean=mean,
        prefixes=prefixes,
        n_src=n_src,
        seed=seed,
        density=density,
        method=method,
        backend=backend,
        rows_per_call=per_call,
    )


def route_counts(
    source_degrees: Any,
    target_counts: Any,
    *,
    k: int,
    seed: int,
    perm_s: Any = None,
    backend: BackendName = "auto",
    rows_per_call: int | None = None,
    block_rows: int | None = None,
) -> Any:
    """Lazy :func:`gpu_phase_router.route_counts` of a chunked ``dask.array`` of source degrees.

    Args:
        source_degrees: 1-D integer ``dask.array`` ``[n_src]``, values in ``[0, n_tgt]`` (checked
            when computed).
        target_counts: integer ``[n_tgt]`` NumPy/CuPy array or sequence, values in ``[0, n_src]``.
        k, seed, perm_s, backend, rows_per_call: as in :func:`gpu_phase_router.route_counts`
            (``perm_t`` is derived from the seed).

    Returns:
        routes: lazy int32 ``dask.array`` ``[n_src, k]``, chunks ``(source_degrees.chunks[0], (k,))``.
    """
    n_src, chunks = _check_rows_array("source_degrees", source_degrees)
    if source_degrees.dtype.kind not in "iu":
        raise TypeError(f"source_degrees must have an integer dtype; got {source_degrees.dtype}")
    c = _check_target("target_counts", target_counts)
    c = as_vector(np, "target_counts", c)
    if c.shape[0] < 1:
        raise ValueError("target_counts must not be empty (n_tgt >= 1)")
    c = check_int_vector(np, "target_counts", c, lo=0, hi=n_src)
    n_tgt = int(c.shape[0])
    k = check_k(k, n_tgt)
    seed = check_seed(seed)
    if perm_s is not None:
        perm_s = check_permutation(np, "perm_s", _check_target("perm_s", perm_s), n_tgt)
    per_call = check_rows_per_call(rows_per_call, block_rows)
    backend = check_backend_name(backend)  # whether "cuda" runs is up to the workers
    sums = functools.partial(_count_degree_sum, n_tgt=n_tgt)
    prefixes = _reduce_chunks("gpu-phase-count-prefix", source_degrees, sums, (), _exclusive_prefix)
    return _routes_array(
        blocks.route_counts_block,
        source_degrees,
        chunks,
        k,
        "gpu-phase-route-counts",
        target=dask.delayed(c, pure=True),  # one task of the graph, not a copy in every chunk's
        prefixes=prefixes,
        n_src=n_src,
        seed=seed,
        perm_s=None if perm_s is None else dask.delayed(perm_s, pure=True),
        backend=backend,
        rows_per_call=per_call,
    )


__all__ = ["route", "route_counts", "weight_mean"]
