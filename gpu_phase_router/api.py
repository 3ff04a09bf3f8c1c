"""Public API: the phase router (SPEC §1–§9) and the systematic router (SPEC §11).

Each entry point validates its inputs (SPEC §9) before any kernel runs, picks a backend
(``backend="auto"`` follows the data: NumPy → ``"cpu"``, CuPy / CUDA torch → ``"cuda"``),
runs the shared preparation of :mod:`gpu_phase_router._prep` and the backend's row kernel,
and returns an int32 ``(n_src, k)`` array in the caller's array library and device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from . import _prep
from ._arrays import common_library, from_backend_array, on_caller_stream, to_backend_array
from ._keys import stream as _stream
from ._validate import (
    as_vector,
    check_bits,
    check_density,
    check_int,
    check_int_vector,
    check_k,
    check_permutation,
    check_seed,
    check_uniform_weights,
    check_weights,
)
from .backends import Backend, BackendName, get_backend

Method = Literal["phase", "systematic"]
DEFAULT_N = 1024
DEFAULT_BLOCK_ROWS = 1 << 18  # rows per kernel call: bounds the O(rows) temporaries


def _resolve(backend: BackendName, named: dict[str, Any]) -> tuple[Backend, str, tuple[str, int]]:
    lib, dev = common_library(named)
    return get_backend(backend, data_on_device=dev[0] == "cuda"), lib, dev


def _check_block_rows(block_rows: Any) -> int:
    return DEFAULT_BLOCK_ROWS if block_rows is None else check_int("block_rows", block_rows, lo=1)


@on_caller_stream
def route_counts(
    source_degrees: Any,
    target_counts: Any,
    *,
    k: int,
    seed: int,
    perm_s: Any = None,
    perm_t: Any = None,
    backend: BackendName = "auto",
    block_rows: int | None = None,
) -> Any:
    """Phase router from count form (SPEC §2–§5): no bit matrix, O(n_src + n_tgt) memory.

    Args:
        source_degrees: integer ``[n_src]``, ``d[i]`` in ``[0, n_tgt]`` — ring positions source
            ``i`` covers on the target ring.
        target_counts: integer ``[n_tgt]``, ``c[t]`` in ``[0, n_src]`` — positions target ``t``
            covers on the source ring.
        k: targets per source, ``1 <= k <= n_tgt``.
        seed: integer in ``[0, 2^64)``.
        perm_s: optional permutation of ``range(n_tgt)`` (column → target-ring position).
        perm_t: optional permutation of ``range(n_src)`` (source → source-ring phase).
        backend: ``"auto"`` (follow the data), ``"cpu"`` or ``"cuda"``.
        block_rows: rows per kernel call (memory beyond input and output is O(block_rows)).

    Returns:
        routes: int32 ``[n_src, k]`` — ``k`` distinct targets per row in ascending key order,
        ``-1`` where a source has fewer than ``k`` candidates. Deterministic for a given seed,
        identical on every backend and thread count.
    """
    named = {"source_degrees": source_degrees, "target_counts": target_counts, "perm_s": perm_s, "perm_t": perm_t}
    be, lib, dev = _resolve(backend, named)
    xp = be.xp
    if source_degrees is None or target_counts is None:
        raise TypeError("source_degrees and target_counts are required")
    d = as_vector(xp, "source_degrees", to_backend_array(source_degrees, xp))
    c = as_vector(xp, "target_counts", to_backend_array(target_counts, xp))
    n_src, n_tgt = int(d.shape[0]), int(c.shape[0])
    if n_src < 1:
        raise ValueError("source_degrees must not be empty (n_src >= 1)")
    if n_tgt < 1:
        raise ValueError("target_counts must not be empty (n_tgt >= 1)")
    d = check_int_vector(xp, "source_degrees", d, lo=0, hi=n_tgt)
    c = check_int_vector(xp, "target_counts", c, lo=0, hi=n_src)
    k = check_k(k, n_tgt)
    seed = check_seed(seed)
    ps = None if perm_s is None else check_permutation(xp, "perm_s", to_backend_array(perm_s, xp), n_tgt)
    pt = None if perm_t is None else check_permutation(xp, "perm_t", to_backend_array(perm_t, xp), n_src)
    out = _prep.phase_rows_blocked(be, lambda a, b: d[a:b], c, n_src=n_src, row0=0, rows=n_src, degree_prefix=0,
                                   k=k, seed=seed, perm_s=ps, perm_t=pt, block_rows=_check_block_rows(block_rows))
    return from_backend_array(out, lib, dev)


def _route_phase(be: Backend, w: Any, caps: Any, *, k: int, seed: int, density: float, block_rows: int) -> Any:
    n_src = int(w.shape[0])
    mean = _prep.tree_sum(be.xp, w) / n_src  # once, over all weights; degrees are then made block by block
    return _prep.phase_rows_from_weights(be, w, caps, n_src=n_src, row0=0, degree_prefix=0, k=k, seed=seed,
                                         density=density, mean=mean, block_rows=block_rows)


def _route_systematic(be: Backend, w: Any, caps: Any, *, k: int, seed: int, density: float,
                      block_rows: int) -> Any:
    check_uniform_weights(be.xp, w)
    n_src = int(w.shape[0])
    return _prep.systematic_rows_blocked(be, caps, n_src=n_src, k=k, seed=seed, row0=0, rows=n_src,
                                         block_rows=block_rows)


RouteMethod = Callable[..., Any]
_METHODS: dict[str, RouteMethod] = {"phase": _route_phase, "systematic": _route_systematic}


def register_method(name: str, fn: RouteMethod) -> None:
    """Add a routing method to :func:`route`.

    ``fn(backend, w, caps, *, k, seed, density, block_rows)`` receives validated float64
    weights and capacities as arrays of ``backend.xp`` and returns int32 ``(n_src, k)``.
    """
    _METHODS[name] = fn


def available_methods() -> list[str]:
    """Names accepted by ``route(method=...)``."""
    return list(_METHODS)


@on_caller_stream
def route(
    source_weights: Any = None,
    target_capacities: Any = None,
    n: int | None = None,
    k: int = 4,
    seed: int = 42,
    density: float = 0.3,
    *,
    backend: BackendName = "auto",
    method: str = "phase",
    block_rows: int | None = None,
) -> Any:
    """Route sources to targets in proportion to target capacity (SPEC §7).

    The seed's signature and defaults; ``n_src = len(source_weights)`` and
    ``n_tgt = len(target_capacities)``, so rectangular routing (tokens x experts) works.

    Args:
        source_weights: ``[n_src]`` finite weights ``>= 0`` (0 = never routes), or ``None``
            for ``n_tgt`` sources of weight 1.
        target_capacities: ``[n_tgt]`` finite relative capacities ``>= 0`` (0 = never
            receives), or ``None`` for uniform capacities.
        n: size of the vectors left as ``None`` (default 1024 when neither is given); if given,
            every given vector must have length ``n``.
        k: targets per source, ``1 <= k <= n_tgt``.
        seed: integer in ``[0, 2^64)``.
        density: fraction of the other ring that an average source/target covers, in ``(0, 1]``
            (``method="phase"`` only).
        backend: ``"auto"`` (follow the data), ``"cpu"`` or ``"cuda"``.
        method: ``"phase"`` (the seed's router, SPEC §3–§7), ``"systematic"`` (SPEC §11), or a
            registered baseline (see :func:`available_methods`).
        block_rows: rows per kernel call.

    Returns:
        routes: int32 ``[n_src, k]``, targets or ``-1``, in the library and on the device of
        the inputs (NumPy for Python sequences).
    """
    named = {"source_weights": source_weights, "target_capacities": target_capacities}
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {available_methods()}; got {method!r}")
    be, lib, dev = _resolve(backend, named)
    xp = be.xp
    w = None if source_weights is None else check_weights(xp, "source_weights", to_backend_array(source_weights, xp))
    caps = None if target_capacities is None else check_weights(
        xp, "target_capacities", to_backend_array(target_capacities, xp))
    if n is not None:
        n = check_int("n", n, lo=1)
        for name, v in (("source_weights", w), ("target_capacities", caps)):
            if v is not None and v.shape[0] != n:
                raise ValueError(f"n={n} contradicts len({name})={v.shape[0]}; leave n out for rectangular routing")
    if caps is None:
        caps = xp.ones(n if n is not None else (w.shape[0] if w is not None else DEFAULT_N), dtype=xp.float64)
    if w is None:
        w = xp.ones(caps.shape[0], dtype=xp.float64)
    k = check_k(k, caps.shape[0])
    seed = check_seed(seed)
    density = check_density(density)
    out = _METHODS[method](be, w, caps, k=k, seed=seed, density=density, block_rows=_check_block_rows(block_rows))
    return from_backend_array(out, lib, dev)


@on_caller_stream
def route_bits(
    s_bits: Any,
    t_bits: Any,
    *,
    n_src: int,
    n_tgt: int,
    k: int,
    seed: int,
    perm_s: Any = None,
    perm_t: Any = None,
    backend: BackendName = "auto",
    block_rows: int | None = None,
) -> Any:
    """Phase router from bit-packed rows (SPEC §2), square or rectangular.

    Args:
        s_bits: uint64 ``[n_src, ceil(n_tgt/64)]`` (or flat) — row ``i`` has ``d[i]`` set bits.
        t_bits: uint64 ``[n_tgt, ceil(n_src/64)]`` (or flat) — row ``t`` has ``c[t]`` set bits.
        n_src, n_tgt: sizes (``>= 1``); bits at positions ``>= n_tgt`` / ``>= n_src`` must be clear.
        k, seed, perm_s, perm_t, backend, block_rows: as in :func:`route_counts`.

    Returns:
        routes: int32 ``[n_src, k]``.
    """
    named = {"s_bits": s_bits, "t_bits": t_bits, "perm_s": perm_s, "perm_t": perm_t}
    be, lib, dev = _resolve(backend, named)
    n_src = check_int("n_src", n_src, lo=1)
    n_tgt = check_int("n_tgt", n_tgt, lo=1)
    d = _popcounts(be, "s_bits", to_backend_array(s_bits, be.xp), n_src, n_tgt)
    c = _popcounts(be, "t_bits", to_backend_array(t_bits, be.xp), n_tgt, n_src)
    return from_backend_array(
        route_counts(d, c, k=k, seed=seed, perm_s=to_backend_array(perm_s, be.xp),
                     perm_t=to_backend_array(perm_t, be.xp), backend=be.name, block_rows=block_rows),
        lib, dev)


def _popcounts(be: Backend, name: str, words: Any, rows: int, nbits: int, nb_words: int | None = None) -> Any:
    words = check_bits(be.xp, name, words, rows, nbits, nb_words)
    counts, bad = be.popcount_rows(words, nbits)
    if bad:
        raise ValueError(f"{name} has {bad} row(s) with bits set at positions >= {nbits} (padding bits must be 0)")
    return counts


@on_caller_stream
def phase_router(s_bits: Any, t_bits: Any, n: int, nb_words: int, k: int, col_perm_s: Any, col_perm_t: Any,
                 seed: int, *, backend: BackendName = "auto") -> Any:
    """The seed's low-level square router with caller-given permutations.

    Args:
        s_bits, t_bits: uint64 ``n * nb_words`` words (flat or ``[n, nb_words]``).
        n: sources = targets; ``nb_words`` must be ``ceil(n / 64)``.
        k: targets per source; ``col_perm_s``, ``col_perm_t``: permutations of ``range(n)``.
        seed: integer in ``[0, 2^64)``.

    Returns:
        routes: int32 ``[n, k]``.
    """
    n = check_int("n", n, lo=1)
    nb_words = check_int("nb_words", nb_words, lo=1)
    if col_perm_s is None or col_perm_t is None:
        raise TypeError("col_perm_s and col_perm_t are required; use phase_router_auto to derive them from the seed")
    be, lib, dev = _resolve(backend, {"s_bits": s_bits, "t_bits": t_bits, "col_perm_s": col_perm_s,
                                      "col_perm_t": col_perm_t})
    xp = be.xp
    d = _popcounts(be, "s_bits", to_backend_array(s_bits, xp), n, n, nb_words)
    c = _popcounts(be, "t_bits", to_backend_array(t_bits, xp), n, n, nb_words)
    ps = check_permutation(xp, "col_perm_s", to_backend_array(col_perm_s, xp), n)
    pt = check_permutation(xp, "col_perm_t", to_backend_array(col_perm_t, xp), n)
    return from_backend_array(route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt, backend=be.name), lib, dev)


def phase_router_auto(s_bits: Any, t_bits: Any, n: int, k: int, seed: int, *,
                      backend: BackendName = "auto") -> Any:
    """The seed's square router with permutations derived from ``seed`` (SPEC §6).

    Returns:
        routes: int32 ``[n, k]``.
    """
    n = check_int("n", n, lo=1)
    return route_bits(s_bits, t_bits, n_src=n, n_tgt=n, k=k, seed=seed, backend=backend)


def auto_permutation(n: int, seed: int, stream: int, *, backend: BackendName = "cpu") -> Any:
    """The permutation ``[feistel(i, n, stream(seed, stream)) for i in range(n)]`` (SPEC §6).

    ``stream=1`` gives the derived ``perm_s`` (length ``n_tgt``), ``stream=2`` the derived
    ``perm_t`` (length ``n_src``). Returns int64 ``[n]`` of the backend's array library.
    """
    n = check_int("n", n, lo=1)
    seed = check_seed(seed)
    stream = check_int("stream", stream, lo=0, hi=(1 << 64) - 1)
    be = get_backend(backend)
    return be.feistel(0, n, n, _stream(seed, stream))


@on_caller_stream
def popcount_rows(words: Any, nbits: int, *, backend: BackendName = "auto") -> Any:
    """Set bits per row of bit-packed ``words`` (uint64 ``[rows, ceil(nbits/64)]``) → int64 ``[rows]``.

    Raises ``ValueError`` if a padding bit (position ``>= nbits``) is set.
    """
    be, lib, dev = _resolve(backend, {"words": words})
    nbits = check_int("nbits", nbits, lo=1)
    w = to_backend_array(words, be.xp)
    rows = w.shape[0] if getattr(w, "ndim", 0) == 2 else -1
    if rows < 0:
        raise ValueError(f"words must be 2-D [rows, ceil(nbits/64)]; got shape {getattr(w, 'shape', None)}")
    return from_backend_array(_popcounts(be, "words", w, rows, nbits), lib, dev)


def left_aligned_bits(ones_per_row: Any, nbits: int) -> np.ndarray:
    """Bit-packed rows whose first ``ones_per_row[i]`` bits are set (the seed's ``build_bits``).

    Vectorised: returns uint64 ``[len(ones_per_row), ceil(nbits / 64)]``.
    """
    nbits = check_int("nbits", nbits, lo=1)
    ones = check_int_vector(np, "ones_per_row", ones_per_row, lo=0, hi=nbits)
    nbw = (nbits + 63) // 64
    fill = np.clip(ones[:, None] - 64 * np.arange(nbw)[None, :], 0, 64).astype(np.uint64)
    full = np.uint64(0xFFFFFFFFFFFFFFFF)
    partial = (np.uint64(1) << (fill % np.uint64(64))) - np.uint64(1)
    return np.where(fill == 64, full, partial).astype(np.uint64)


def pack_bits(dense: Any) -> np.ndarray:
    """Pack a boolean ``[rows, nbits]`` matrix into uint64 ``[rows, ceil(nbits/64)]`` (SPEC §2)."""
    dense = np.asarray(dense)
    if dense.ndim != 2:
        raise ValueError(f"dense must be 2-D [rows, nbits]; got shape {dense.shape}")
    if dense.dtype != np.bool_:
        raise TypeError(f"dense must be a boolean matrix; got dtype {dense.dtype}")
    rows, nbits = dense.shape
    nbw = (nbits + 63) // 64
    padded = np.zeros((rows, nbw * 64), dtype=np.bool_)
    padded[:, :nbits] = dense
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False).reshape(rows, nbw)


__all__ = [
    "auto_permutation",
    "available_methods",
    "left_aligned_bits",
    "pack_bits",
    "phase_router",
    "phase_router_auto",
    "popcount_rows",
    "register_method",
    "route",
    "route_bits",
    "route_counts",
]
