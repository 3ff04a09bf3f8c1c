"""Preparation shared by every backend: the O(n) arrays of SPEC §3, §7 and §11.

Written once against an array module ``xp`` (NumPy or CuPy) so the CPU and CUDA paths run the
same code on their own device; only elementwise IEEE operations and integer scans are used,
so both give the same bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ._keys import STREAM_PERM_S, STREAM_PERM_T, STREAM_SELECT, STREAM_SYSTEMATIC, at, stream

TREE_EVAL_BLOCK = 1 << 14  # leaves per row when evaluating big nodes; any power of two gives the same bits
TREE_EVAL_ROWS = 64  # rows of TREE_EVAL_BLOCK leaves per step: temporaries stay below 4 MiB


def _node_sum(xp: Any, v: Any) -> float:
    """Value of the tree node over ``v`` (float64, length a power of two): adjacent pairs are added,
    level by level. Evaluated in aligned rows of ``TREE_EVAL_BLOCK`` leaves so temporaries stay small;
    every row is itself a node of the same tree, so the bits do not depend on the row size."""
    n = v.shape[0]
    if n > TREE_EVAL_BLOCK:
        step = TREE_EVAL_BLOCK * TREE_EVAL_ROWS
        rows = []
        for a in range(0, n, step):
            x = v[a : a + step].reshape(-1, TREE_EVAL_BLOCK)
            while x.shape[1] > 1:
                x = x[:, 0::2] + x[:, 1::2]
            rows.append(x[:, 0])
        v = xp.concatenate(rows) if len(rows) > 1 else rows[0]
    while v.shape[0] > 1:
        v = v[0::2] + v[1::2]
    return float(v[0])


def tree_partials(xp: Any, values: Any, start: int = 0) -> list[tuple[int, int, float]]:
    """Node values of :func:`tree_sum`'s tree for the elements ``start .. start + len(values) - 1``.

    The elements are split into the maximal aligned power-of-two runs (``(level, index)`` covers
    ``[index * 2^level, (index + 1) * 2^level)``), and each run's node value is returned as
    ``(level, index, value)``. :func:`tree_combine` joins the partials of consecutive chunks
    (any chunking) into exactly the float that :func:`tree_sum` gives for the whole vector.
    """
    v = xp.asarray(values, dtype=xp.float64)
    out = []
    pos, end = start, start + v.shape[0]
    while pos < end:
        level = (pos & -pos).bit_length() - 1 if pos else 64
        while pos + (1 << level) > end:
            level -= 1
        out.append((level, pos >> level, _node_sum(xp, v[pos - start : pos - start + (1 << level)])))
        pos += 1 << level
    return out


def tree_combine(partials: Any, n: int) -> float:
    """The tree sum of ``n`` elements from the :func:`tree_partials` of chunks covering ``[0, n)``."""
    nodes = {(int(lv), int(ix)): float(val) for lv, ix, val in partials}
    if sum(1 << lv for lv, _ in nodes) != n:
        raise ValueError(f"partial sums cover {sum(1 << lv for lv, _ in nodes)} elements; expected {n}")

    def value(level: int, index: int) -> float:
        if (level, index) in nodes:
            return nodes[(level, index)]
        if index << level >= n:
            return 0.0  # all padding
        if level == 0:
            raise ValueError(f"partial sums do not cover element {index}")
        return value(level - 1, 2 * index) + value(level - 1, 2 * index + 1)

    return value(max(0, (n - 1).bit_length()), 0)


def tree_sum(xp: Any, values: Any) -> float:
    """Float64 sum in a fixed pairwise order, identical on every array library and any chunking.

    SPEC §7 and §11 divide by ``mean``/``sum`` of a float vector but leave the summation order
    open; library reductions (NumPy's pairwise blocks, CuPy's tree) round differently. Here the
    vector is padded with zeros to a power of two and adjacent pairs are added level by level
    (``v = v[0::2] + v[1::2]`` until one value is left). Every aligned power-of-two run is a node
    of that tree, so the sum composes over chunks: :func:`tree_partials` per chunk and
    :func:`tree_combine` give the same bits as this function (which is computed that way).
    """
    v = xp.asarray(values, dtype=xp.float64)
    with np.errstate(over="ignore"):  # an overflow to inf is reported by the callers
        return tree_combine(tree_partials(xp, v), v.shape[0])


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
    scaled = xp.rint(w / mean * density * n_other)
    counts = xp.clip(scaled, 1, n_other).astype(xp.int64)
    return xp.where(w == 0, 0, counts)


def capacity_cum(xp: Any, caps: Any) -> Any:
    """SPEC §11: uint64 ``cum`` (length ``n_tgt + 1``) of the capacity units ``u[t]``."""
    c = xp.asarray(caps, dtype=xp.float64)
    total = tree_sum(xp, c)
    if not math.isfinite(total):
        raise ValueError("target_capacities: the sum of capacities overflows float64 (rescale the values)")
    units = xp.maximum(1, xp.rint(c / total * 2.0**31)).astype(xp.uint64)
    units = xp.where(c == 0, xp.uint64(0), units)
    cum = xp.zeros(c.shape[0] + 1, dtype=xp.uint64)
    cum[1:] = xp.cumsum(units, dtype=xp.uint64)
    return cum


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
        out[1:] = (start + xp.cumsum(v[:-1], dtype=xp.int64)) % m
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


def call_ranges(rows: int, rows_per_call: int) -> Iterator[tuple[int, int]]:
    """Consecutive local row ranges ``(a, b)`` of at most ``rows_per_call`` rows, one per kernel call."""
    for a in range(0, rows, rows_per_call):
        yield a, min(rows, a + rows_per_call)


def ring_layout(backend: Any, c: Any, n_src: int, seed: int, perm_s: Any = None) -> tuple[Any, Any, Any]:
    """Target intervals laid out in target-ring position order (SPEC §3–§4).

    Returns int64 ``(ring_start, ring_len, ring_col)`` of length ``n_tgt``, arrays of
    ``backend.xp``: position ``p`` of the target ring holds column ``inv_s[p]``, whose interval
    on the source ring starts at ``off_t[inv_s[p]]`` and has length ``c[inv_s[p]]``. A row's scan
    then reads contiguously. ``c`` may be a host array; it is moved to the backend once.
    """
    xp = backend.xp
    c = xp.asarray(c, dtype=xp.int64)
    n_tgt = c.shape[0]
    if perm_s is None:
        inv_s = backend.feistel(0, n_tgt, n_tgt, stream(seed, STREAM_PERM_S), inverse=True)
    else:
        inv_s = inverse_permutation(xp, perm_s)
    off_t = exclusive_cumsum_mod(xp, c, n_src)
    return off_t[inv_s], c[inv_s], inv_s


def block_phases(backend: Any, n_src: int, row0: int, rows: int, seed: int, perm_t: Any = None) -> Any:
    """int64 ``perm_t[row0 : row0 + rows]``, derived (SPEC §6) when ``perm_t`` is ``None``.

    A caller-given ``perm_t`` is the rows' own slice already."""
    if perm_t is not None:
        return perm_t.astype(backend.xp.int64, copy=False)
    return backend.feistel(row0, rows, n_src, stream(seed, STREAM_PERM_T))


def phase_block(
    backend: Any,
    d: Any,
    ring: Any,
    *,
    n_src: int,
    k: int,
    seed: int,
    row0: int = 0,
    degree_prefix: int = 0,
    perm_t: Any = None,
    col_map: Any = None,
    k_out: int | None = None,
) -> Any:
    """Rows ``row0 .. row0 + len(d) - 1`` of the phase router (SPEC §3–§5) → int32 ``(rows, k)``.

    One kernel call. ``d`` holds those rows' degrees and ``degree_prefix`` the sum of all
    degrees before ``row0``; ``ring`` is ``backend.prepare_ring(*ring_layout(...))`` of the
    full target vector. With ``col_map`` (SPEC §13: virtual column → target) the kernel maps the
    ``k`` selected columns and keeps each row's first ``k_out`` distinct targets → ``(rows, k_out)``.
    """
    xp = backend.xp
    d = d.astype(xp.int64, copy=False)
    off_s = exclusive_cumsum_mod(xp, d, ring_size(ring), degree_prefix)
    phase = block_phases(backend, n_src, row0, d.shape[0], seed, perm_t)
    if col_map is None:
        return backend.phase_rows(
            phase, off_s, d, ring, n_src=n_src, k=k, row0=row0, select_key=stream(seed, STREAM_SELECT)
        )
    return backend.phase_rows(
        phase,
        off_s,
        d,
        ring,
        n_src=n_src,
        k=k,
        row0=row0,
        select_key=stream(seed, STREAM_SELECT),
        col_map=col_map,
        k_out=k_out,
    )


def ring_size(ring: Any) -> int:
    """``n_tgt`` of a prepared ring (every backend keeps the column array last)."""
    return int(ring[-1].shape[0])


def uniform_degree(density: float, n_tgt: int) -> int:
    """SPEC §7 degree of a source of weight 1 among sources of mean weight 1 (host arithmetic,
    the same float operations as :func:`weights_to_counts`)."""
    scaled = float(np.rint(np.float64(1.0) / np.float64(1.0) * np.float64(density) * np.float64(n_tgt)))
    return int(min(max(scaled, 1.0), float(n_tgt)))


def phase_rows(
    backend: Any,
    c: Any,
    *,
    n_src: int,
    row0: int,
    rows: int,
    k: int,
    seed: int,
    degree_prefix: int,
    rows_per_call: int,
    d: Any = None,
    w: Any = None,
    weight_mean: float = 1.0,
    density: float | None = None,
    perm_s: Any = None,
    perm_t: Any = None,
    col_map: Any = None,
    k_out: int | None = None,
) -> Any:
    """Phase-router rows ``row0 .. row0 + rows - 1`` (SPEC §3–§7), ``rows_per_call`` rows per kernel call.

    The rows' degrees come from exactly one of: ``d`` (int degrees of these rows), ``w`` (float64
    weights of these rows, with the mean ``weight_mean`` of all weights and ``density``), or
    neither (every source has weight 1 and mean 1: a constant degree, and no value is read back
    from the device). ``degree_prefix`` is the sum of all degrees before ``row0``; ``perm_t``, if
    given, holds these rows' phases. The ring is laid out and prepared once. Memory beyond the
    output is O(rows_per_call + n_tgt). ``col_map`` and ``k_out``: see :func:`phase_block` (the
    map is moved to the backend once).
    """
    xp = backend.xp
    n_tgt = int(c.shape[0])
    ring = backend.prepare_ring(*ring_layout(backend, c, n_src, seed, perm_s))
    if col_map is not None:
        col_map = xp.asarray(col_map)
    out = xp.empty((rows, k if col_map is None else k_out), dtype=xp.int32)
    prefix = degree_prefix % n_tgt  # only the start modulo n_tgt matters (SPEC §3)
    dens = 0.0
    if d is None:
        if density is None:
            raise TypeError("phase_rows needs density unless degrees d are given")
        dens = density
    uniform = None if d is not None or w is not None else uniform_degree(dens, n_tgt)
    for a, b in call_ranges(rows, rows_per_call):
        if d is not None:
            db = d[a:b]
        elif w is not None:
            db = weights_to_counts(xp, w[a:b], dens, n_tgt, mean=weight_mean, name="source_weights")
        else:
            db = xp.full(b - a, uniform, dtype=xp.int64)
        out[a:b] = phase_block(
            backend,
            db,
            ring,
            n_src=n_src,
            k=k,
            seed=seed,
            row0=row0 + a,
            degree_prefix=prefix,
            perm_t=None if perm_t is None else perm_t[a:b],
            col_map=col_map,
            k_out=k_out,
        )
        if b < rows:  # the next call's start: uniform degrees need no read-back from the device
            prefix = (prefix + (uniform * (b - a) if uniform is not None else int(db.sum()))) % n_tgt
    return out


# -- SPEC §13: banded phase router ------------------------------------------------------------

BAND_OVERSAMPLE = 4  # virtual columns drawn per output slot (the seed's oversampling)
BAND_FILL = 2  # expected candidates per source, in units of k_draw
BAND_MAX_COLUMNS = 1 << 20  # cap on the virtual ring (reached only for tiny densities)


class BandLayout(NamedTuple):
    """The virtual target ring of SPEC §13 (host NumPy arrays, read-only).

    Attributes:
        n_cols: ``V``, the number of virtual columns.
        k_draw: virtual columns selected per source, ``min(k * 4, V)``.
        k: targets kept per source.
        widths: int64 ``[n_tgt]`` band widths ``b[e]``.
        col_counts: int64 ``[V]`` capacity count of each virtual column.
        col_map: int64 ``[V]`` target owning each virtual column.
    """

    n_cols: int
    k_draw: int
    k: int
    widths: np.ndarray
    col_counts: np.ndarray
    col_map: np.ndarray


def bands_apply(n_src: int, n_tgt: int) -> bool:
    """SPEC §13: the weights form of the phase router uses bands exactly when ``n_tgt < n_src``."""
    return n_tgt < n_src


def band_layout(caps: np.ndarray, n_src: int, k: int, density: float) -> BandLayout:
    """SPEC §13 band layout from host capacities (float64 NumPy ``[n_tgt]``, validated).

    Pure host arithmetic: the result never depends on device data, so a CUDA caller that keeps
    its capacities on the host routes without any device-to-host copy. Cached per arguments.
    """
    caps = np.ascontiguousarray(caps, dtype=np.float64)
    return _band_layout_cached(caps.tobytes(), int(n_src), int(k), float(density))


def water_filled_shares(caps: np.ndarray, n_src: int, k: int) -> np.ndarray:
    """SPEC §13: float64 ``pi[e] = fair[e] / n_src`` with the fair shares ``n_src * k * cap / sum(cap)``
    water-filled so that none exceeds ``n_src`` (one slot per source)."""
    pi = np.zeros(caps.shape[0], dtype=np.float64)
    free = caps > 0
    total = float(n_src * k)
    while free.any():
        s = tree_sum(np, np.where(free, caps, 0.0))
        share = total * caps / s
        over = free & (share > n_src)
        if not over.any():
            pi[free] = share[free] / n_src
            break
        pi[over] = 1.0
        free &= ~over
        total -= n_src * int(over.sum())
    return pi


def band_weights(caps: np.ndarray, n_src: int, k: int) -> np.ndarray:
    """SPEC §13: the float64 weights band widths are proportional to.

    ``k == 1``: the capacities. Otherwise ``rint(-log1p(-min(pi, 1 - 1/(2 k_draw))) * 2^32)`` (at
    least 1, 0 for a zero capacity), ``pi`` from :func:`water_filled_shares`: a row keeps its first
    ``k`` *distinct* targets, which compresses large shares like sampling without replacement;
    these weights undo that to first order (a target drawn at rate ``u`` among the row's draws is
    kept with probability about ``1 - exp(-u)``). Quantised to integers so the layout does not
    depend on the last bit of ``log1p``.
    """
    if k == 1:
        return caps.astype(np.float64, copy=True)
    top = 1.0 - 1.0 / (2 * k * BAND_OVERSAMPLE)
    logs = -np.log1p(-np.minimum(water_filled_shares(caps, n_src, k), top))
    return np.where(caps == 0, 0.0, np.maximum(1.0, np.rint(logs * 2.0**32)))


@functools.lru_cache(maxsize=64)
def _band_layout_cached(caps_bytes: bytes, n_src: int, k: int, density: float) -> BandLayout:
    caps = np.frombuffer(caps_bytes, dtype=np.float64)
    n_tgt = caps.shape[0]
    want = BAND_FILL * (k * BAND_OVERSAMPLE) / density  # inf for a subnormal density: V0 = V_MAX
    v0 = max(n_tgt, BAND_MAX_COLUMNS if want >= BAND_MAX_COLUMNS else math.ceil(want))
    if not math.isfinite(tree_sum(np, caps)):
        raise ValueError("target_capacities: the sum of capacities overflows float64 (rescale the values)")
    weights = band_weights(caps, n_src, k)
    q = weights / tree_sum(np, weights) * v0
    widths = np.where(weights == 0, 0, np.maximum(1, np.ceil(q))).astype(np.int64)
    per_col = np.rint(q / np.maximum(widths, 1) * n_src)
    counts = np.where(weights == 0, 0, np.clip(per_col, 1, n_src)).astype(np.int64)
    col_map = np.repeat(np.arange(n_tgt, dtype=np.int64), widths)
    col_counts = counts[col_map]
    n_cols = int(col_map.shape[0])
    for a in (widths, col_counts, col_map):
        a.setflags(write=False)
    return BandLayout(n_cols, min(k * BAND_OVERSAMPLE, n_cols), k, widths, col_counts, col_map)


def phase_ring_size(caps: np.ndarray, *, n_src: int, k: int, density: float) -> int:
    """Length of the target ring the phase router uses from weights: ``V`` with bands (SPEC §13),
    else ``n_tgt``. Degrees (and so ``degree_prefix``) are counted on this ring. Host only."""
    n_tgt = int(np.asarray(caps).shape[0])
    if bands_apply(n_src, n_tgt):
        return band_layout(np.asarray(caps, dtype=np.float64), n_src, k, density).n_cols
    return n_tgt


def systematic_phi(seed: int, n_src: int, k: int) -> int:
    """SPEC §11: the common offset ``phi`` in ``[0, n_src * k)``."""
    return at(stream(seed, STREAM_SYSTEMATIC), 0) % (n_src * k)


def systematic_block(
    backend: Any, cum: Any, *, n_src: int, k: int, seed: int, row0: int = 0, rows: int | None = None, perm_t: Any = None
) -> Any:
    """Rows ``row0 .. row0 + rows - 1`` of the systematic router (SPEC §11) → int32 ``(rows, k)``."""
    if rows is None:
        rows = n_src - row0 if perm_t is None else perm_t.shape[0]
    phase = block_phases(backend, n_src, row0, rows, seed, perm_t)
    return backend.systematic_rows(phase, cum, n_src=n_src, k=k, phi=systematic_phi(seed, n_src, k))


def check_systematic_slots(n_src: int, k: int, units_total: int | None = None) -> None:
    """SPEC §11 needs ``M = n_src * k <= 2^31``, and ``M <= U`` so that every slot point
    ``x < U`` lands on a target (``U``, the total capacity units, can fall a little below 2^31
    through rounding; with ``M > U`` the last point could reach ``U``)."""
    m = n_src * k
    if m > 1 << 31:
        raise ValueError(f"method='systematic' needs n_src * k <= 2^31; got {n_src} * {k} = {m}")
    if units_total is not None and m > units_total:
        raise ValueError(
            f"method='systematic' needs n_src * k <= U = {units_total} (the total capacity units); "
            f"got {n_src} * {k} = {m}"
        )


def systematic_rows(
    backend: Any,
    caps: Any,
    *,
    n_src: int,
    k: int,
    seed: int,
    row0: int,
    rows: int,
    rows_per_call: int,
    perm_t: Any = None,
) -> Any:
    """Rows ``row0 .. row0 + rows - 1`` of the systematic router, ``rows_per_call`` rows per kernel call.

    ``caps`` are host (NumPy) capacities: the units ``cum`` are made on the host and moved to the
    backend once, so nothing is read back from the device."""
    xp = backend.xp
    check_systematic_slots(n_src, k)
    cum = capacity_cum(np, caps)
    check_systematic_slots(n_src, k, int(cum[-1]))
    cum = xp.asarray(cum)
    out = xp.empty((rows, k), dtype=xp.int32)
    for a, b in call_ranges(rows, rows_per_call):
        out[a:b] = systematic_block(
            backend,
            cum,
            n_src=n_src,
            k=k,
            seed=seed,
            row0=row0 + a,
            rows=b - a,
            perm_t=None if perm_t is None else perm_t[a:b],
        )
    return out
