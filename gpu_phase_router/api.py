"""The crate-compatible face: ``route``, ``route_counts`` and the crate's bit-packed calls.

``route`` and ``route_counts`` are :func:`~gpu_phase_router.route_block` and
:func:`~gpu_phase_router.route_counts_block` of all rows (``row0=0``); those are the one front
door (:mod:`gpu_phase_router.blocks`): resolve the backend from the data, validate (SPEC §9),
run one entry of the method table (:mod:`gpu_phase_router.methods`), and return an int32
``(n_src, k)`` array in the caller's array library and device.
"""

from __future__ import annotations

import numpy as np

from ._arrays import Array, on_caller_stream, to_backend_array
from ._keys import stream as _stream
from ._validate import (
    check_bits,
    check_int,
    check_int_vector,
    check_k,
    check_permutation,
    check_seed,
    check_size,
    vector_length,
)
from .backends import Backend, BackendName, get_backend, resolve
from .blocks import counts_rows, route_block, route_counts_block
from .methods import RowRange

DEFAULT_N = 1024


def route_counts(
    source_degrees: Array,
    target_counts: Array,
    *,
    k: int,
    seed: int,
    perm_s: Array = None,
    perm_t: Array = None,
    backend: BackendName = "auto",
    rows_per_call: int | None = None,
    block_rows: int | None = None,
) -> Array:
    """Phase router from count form (SPEC §2–§5): no bit matrix, O(n_src + n_tgt) memory.

    :func:`~gpu_phase_router.route_counts_block` of all rows (``row0=0``).

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
        rows_per_call: rows per kernel call (memory beyond input and output is O(rows_per_call));
            ``block_rows`` is its former name.

    Returns:
        routes: int32 ``[n_src, k]`` — ``k`` distinct targets per row in ascending key order,
        ``-1`` where a source has fewer than ``k`` candidates. Deterministic for a given seed,
        identical on every backend and thread count.
    """
    if source_degrees is None or target_counts is None:
        raise TypeError("source_degrees and target_counts are required")
    n_src = vector_length("source_degrees", source_degrees)
    if n_src < 1:
        raise ValueError("source_degrees must not be empty (n_src >= 1)")
    return route_counts_block(
        source_degrees,
        target_counts,
        n_src=n_src,
        row0=0,
        degree_prefix=0,
        k=k,
        seed=seed,
        perm_s=perm_s,
        perm_t=perm_t,
        backend=backend,
        rows_per_call=rows_per_call,
        block_rows=block_rows,
    )


def route(
    source_weights: Array = None,
    target_capacities: Array = None,
    n: int | None = None,
    k: int = 4,
    seed: int = 42,
    density: float = 0.3,
    *,
    backend: BackendName = "auto",
    method: str = "phase",
    rows_per_call: int | None = None,
    block_rows: int | None = None,
) -> Array:
    """Route sources to targets in proportion to target capacity (SPEC §7).

    The crate's signature and defaults; ``n_src = len(source_weights)`` and
    ``n_tgt = len(target_capacities)``, so rectangular routing (tokens x experts) works.
    :func:`~gpu_phase_router.route_block` of all rows (``row0=0``).

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
        method: ``"phase"`` (the crate's router, SPEC §3–§7), ``"systematic"`` (SPEC §11), or
            another method of the table (see :func:`~gpu_phase_router.available_methods`).
        rows_per_call: rows per kernel call; ``block_rows`` is its former name.

    Returns:
        routes: int32 ``[n_src, k]``, targets or ``-1``, in the library and on the device of
        the inputs (NumPy for Python sequences).

    With fewer targets than sources (tokens × experts), ``method="phase"`` is the banded phase
    router of SPEC §13, with load in proportion to capacity: every source of positive weight gets
    ``min(k, P)`` distinct targets, ``P`` the number of targets of positive capacity (fill
    completion, SPEC §13 amendment 1), so a row ends in ``-1`` only when ``P < k`` or its weight
    is 0. With ``n_tgt >= n_src`` a row can also end in ``-1`` when a source's weight is far below
    the mean (its degree, hence its candidate count, scales with its weight).
    ``method="systematic"`` fills all ``k`` slots of every source whenever no target holds more
    than ``1/k`` of all capacity.
    """
    n_w = None if source_weights is None else vector_length("source_weights", source_weights)
    if n is not None:
        n = check_size("n", n)
        n_c = None if target_capacities is None else vector_length("target_capacities", target_capacities)
        for name, length in (("source_weights", n_w), ("target_capacities", n_c)):
            if length is not None and length != n:
                raise ValueError(
                    f"n={n} contradicts len({name})={length}; leave n out for rectangular routing (n is the "
                    f"third positional argument: for {n} targets per source pass k={n})"
                )
    if target_capacities is None:
        target_capacities = np.ones(n if n is not None else (n_w if n_w is not None else DEFAULT_N))
    n_src = n_w if n_w is not None else vector_length("target_capacities", target_capacities)
    if n_src < 1:
        raise ValueError(f"{'source_weights' if n_w is not None else 'target_capacities'} must not be empty")
    return route_block(
        source_weights,
        target_capacities,
        n_src=n_src,
        row0=0,
        k=k,
        seed=seed,
        density=density,
        method=method,
        backend=backend,
        rows_per_call=rows_per_call,
        block_rows=block_rows,
    )


@on_caller_stream
def route_bits(
    s_bits: Array,
    t_bits: Array,
    *,
    n_src: int,
    n_tgt: int,
    k: int,
    seed: int,
    perm_s: Array = None,
    perm_t: Array = None,
    backend: BackendName = "auto",
    rows_per_call: int | None = None,
    block_rows: int | None = None,
) -> Array:
    """Phase router from bit-packed rows (SPEC §2), square or rectangular.

    Args:
        s_bits: uint64 ``[n_src, ceil(n_tgt/64)]`` (or flat) — row ``i`` has ``d[i]`` set bits.
        t_bits: uint64 ``[n_tgt, ceil(n_src/64)]`` (or flat) — row ``t`` has ``c[t]`` set bits.
        n_src, n_tgt: sizes (``>= 1``); bits at positions ``>= n_tgt`` / ``>= n_src`` must be clear.
        k, seed, perm_s, perm_t, backend, rows_per_call: as in :func:`route_counts`.

    Returns:
        routes: int32 ``[n_src, k]``.
    """
    be, ns = resolve(backend, s_bits=s_bits, t_bits=t_bits, perm_s=perm_s, perm_t=perm_t)
    n_src = check_size("n_src", n_src)
    n_tgt = check_size("n_tgt", n_tgt)
    d = _popcounts(be, "s_bits", to_backend_array(s_bits, be.xp), n_src, n_tgt)
    c = _popcounts(be, "t_bits", to_backend_array(t_bits, be.xp), n_tgt, n_src)
    return ns.wrap(
        route_counts(
            d,
            c,
            k=k,
            seed=seed,
            perm_s=to_backend_array(perm_s, be.xp),
            perm_t=to_backend_array(perm_t, be.xp),
            backend=be.name,
            rows_per_call=rows_per_call,
            block_rows=block_rows,
        )
    )


def _popcounts(be: Backend, name: str, words: Array, rows: int, nbits: int, nb_words: int | None = None) -> Array:
    words = check_bits(be.xp, name, words, rows, nbits, nb_words)
    counts, bad = be.popcount_rows(words, nbits)
    if bad:
        raise ValueError(f"{name} has {bad} row(s) with bits set at positions >= {nbits} (padding bits must be 0)")
    return counts


@on_caller_stream
def phase_router(
    s_bits: Array,
    t_bits: Array,
    n: int,
    nb_words: int,
    k: int,
    col_perm_s: Array,
    col_perm_t: Array,
    seed: int,
    *,
    backend: BackendName = "auto",
) -> Array:
    """The crate's low-level square router with caller-given permutations.

    Args:
        s_bits, t_bits: uint64 ``n * nb_words`` words (flat or ``[n, nb_words]``).
        n: sources = targets; ``nb_words`` must be ``ceil(n / 64)``.
        k: targets per source; ``col_perm_s``, ``col_perm_t``: permutations of ``range(n)``.
        seed: integer in ``[0, 2^64)``.

    Returns:
        routes: int32 ``[n, k]``.
    """
    n = check_size("n", n)
    nb_words = check_int("nb_words", nb_words, lo=1)
    if col_perm_s is None or col_perm_t is None:
        raise TypeError("col_perm_s and col_perm_t are required; use phase_router_auto to derive them from the seed")
    be, ns = resolve(backend, s_bits=s_bits, t_bits=t_bits, col_perm_s=col_perm_s, col_perm_t=col_perm_t)
    xp = be.xp
    d = _popcounts(be, "s_bits", to_backend_array(s_bits, xp), n, n, nb_words)
    c = _popcounts(be, "t_bits", to_backend_array(t_bits, xp), n, n, nb_words)
    ps = check_permutation(xp, "col_perm_s", to_backend_array(col_perm_s, xp), n)
    pt = check_permutation(xp, "col_perm_t", to_backend_array(col_perm_t, xp), n)
    rr = RowRange(None, n, 0, n, check_k(k, n), check_seed(seed))  # counts and permutations are valid here
    return ns.wrap(counts_rows(be, d, c, rr, perm_s=ps, perm_t=pt))


def phase_router_auto(
    s_bits: Array, t_bits: Array, n: int, k: int, seed: int, *, backend: BackendName = "auto"
) -> Array:
    """The crate's square router with permutations derived from ``seed`` (SPEC §6).

    Returns:
        routes: int32 ``[n, k]``.
    """
    n = check_size("n", n)
    return route_bits(s_bits, t_bits, n_src=n, n_tgt=n, k=k, seed=seed, backend=backend)


def auto_permutation(n: int, seed: int, stream: int, *, backend: BackendName = "cpu") -> Array:
    """The permutation ``[feistel(i, n, stream(seed, stream)) for i in range(n)]`` (SPEC §6).

    ``stream=1`` gives the derived ``perm_s`` (length ``n_tgt``), ``stream=2`` the derived
    ``perm_t`` (length ``n_src``). Returns int64 ``[n]`` of the backend's array library.
    """
    n = check_size("n", n)
    seed = check_seed(seed)
    stream = check_int("stream", stream, lo=0, hi=(1 << 64) - 1)
    be = get_backend(backend)
    return be.feistel(0, n, n, _stream(seed, stream))


@on_caller_stream
def popcount_rows(words: Array, nbits: int, *, backend: BackendName = "auto") -> Array:
    """Set bits per row of bit-packed ``words`` (uint64 ``[rows, ceil(nbits/64)]``) → int64 ``[rows]``.

    Raises ``ValueError`` if a padding bit (position ``>= nbits``) is set.
    """
    be, ns = resolve(backend, words=words)
    nbits = check_int("nbits", nbits, lo=1)
    w = to_backend_array(words, be.xp)
    rows = w.shape[0] if getattr(w, "ndim", 0) == 2 else -1
    if rows < 0:
        raise ValueError(f"words must be 2-D [rows, ceil(nbits/64)]; got shape {getattr(w, 'shape', None)}")
    return ns.wrap(_popcounts(be, "words", w, rows, nbits))


def hash_route(n: int, k: int, seed: int = 0) -> np.ndarray:
    """The crate's helper: ``n`` sources to ``n`` targets by the uniform hash → int32 ``[n, k]``.

    Same as ``route(n=n, k=k, seed=seed, method="hash")`` (``k`` independent uniform targets
    per source, duplicates possible; the values differ from the crate's NumPy generator).
    """
    return route(n=n, k=k, seed=seed, method="hash", backend="cpu")


def left_aligned_bits(ones_per_row: Array, nbits: int) -> np.ndarray:
    """Bit-packed rows whose first ``ones_per_row[i]`` bits are set (the crate's ``build_bits``).

    Vectorised: returns uint64 ``[len(ones_per_row), ceil(nbits / 64)]``.
    """
    nbits = check_int("nbits", nbits, lo=1)
    ones = check_int_vector(np, "ones_per_row", ones_per_row, lo=0, hi=nbits)
    nbw = (nbits + 63) // 64
    fill = np.clip(ones[:, None] - 64 * np.arange(nbw)[None, :], 0, 64).astype(np.uint64)
    full = np.uint64(0xFFFFFFFFFFFFFFFF)
    partial = (np.uint64(1) << (fill % np.uint64(64))) - np.uint64(1)
    return np.where(fill == 64, full, partial).astype(np.uint64)


def pack_bits(dense: Array) -> np.ndarray:
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
    "hash_route",
    "left_aligned_bits",
    "pack_bits",
    "phase_router",
    "phase_router_auto",
    "popcount_rows",
    "route",
    "route_bits",
    "route_counts",
]
