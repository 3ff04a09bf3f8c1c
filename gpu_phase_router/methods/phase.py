"""The phase router (SPEC §3–§7) and its banded form (SPEC §13): ring layout, bands, rows, ring size.

Everything the phase router does on the host lives here; the row kernels are the backends'
``phase_rows`` (:mod:`gpu_phase_router.backends`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from .._arrays import Array
from .._keys import STREAM_PERM_S, STREAM_PERM_T, STREAM_SELECT, stream
from .._prep import (
    block_phases,
    call_ranges,
    exclusive_cumsum_mod,
    inverse_permutation,
    on_backend,
    weights_to_counts,
)
from .._tree import tree_sum
from .._validate import check_sum
from ._row_range import RowRange


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
    off_s = exclusive_cumsum_mod(xp, d, prepared_ring_size(ring), degree_prefix)
    phase = None if perm_t is None else block_phases(backend, n_src, row0, d.shape[0], seed, perm_t)
    return backend.phase_rows(
        phase,  # None: the backend derives the phases (SPEC §6)
        off_s,
        d,
        ring,
        n_src=n_src,
        k=k,
        row0=row0,
        select_key=stream(seed, STREAM_SELECT),
        col_map=col_map,
        k_out=k_out,
        perm_key=stream(seed, STREAM_PERM_T),
    )


def prepared_ring_size(ring: Any) -> int:
    """Ring size (positions) of a prepared ring (every backend's ends with one entry per position)."""
    return int(ring[-1].shape[0])


def uniform_degree(density: float, n_tgt: int) -> int:
    """SPEC §7 degree of a source of weight 1 among sources of mean weight 1 (host arithmetic,
    the same float operations as :func:`weights_to_counts`)."""
    scaled = float(np.rint(np.float64(1.0) / np.float64(1.0) * np.float64(density) * np.float64(n_tgt)))
    return int(min(max(scaled, 1.0), float(n_tgt)))


def phase_rows(
    backend: Any,
    c: Any,
    rr: RowRange,
    *,
    k: int,
    d: Any = None,
    perm_s: Any = None,
    perm_t: Any = None,
    col_map: Any = None,
) -> Any:
    """Phase-router rows of ``rr`` (SPEC §3–§7), ``rr.rows_per_call`` rows per kernel call.

    ``c`` holds the int capacity counts of the ring (host or device), ``k`` the columns selected
    per row. The rows' degrees come from exactly one of: ``d`` (int degrees of these rows),
    ``rr.w`` (float64 weights of these rows, with ``rr.weight_mean`` and ``rr.density``), or
    neither (every source has weight 1 and mean 1: a constant degree, and no value is read back
    from the device). ``rr.degree_prefix`` is the sum of all degrees before ``rr.row0``;
    ``perm_t``, if given, holds these rows' phases. The ring is laid out and prepared once.
    Memory beyond the output is O(rows_per_call + n_tgt). With ``col_map`` (SPEC §13, host or
    device) each row keeps its first ``rr.k`` distinct targets: see :func:`phase_block`.
    """
    xp = backend.xp
    n_src, row0, rows, seed = rr.n_src, rr.row0, rr.rows, rr.seed
    n_tgt = int(c.shape[0])
    ring = backend.prepare_ring(*ring_layout(backend, c, n_src, seed, perm_s), n_src=n_src)
    k_out = None if col_map is None else rr.k
    out = xp.empty((rows, k if col_map is None else k_out), dtype=xp.int32)
    prefix = rr.degree_prefix % n_tgt  # only the start modulo n_tgt matters (SPEC §3)
    w = rr.w if d is None else None
    uniform = None if d is not None or w is not None else uniform_degree(rr.density, n_tgt)
    for a, b in call_ranges(rows, rr.rows_per_call):
        if d is not None:
            db = d[a:b]
        elif w is not None:
            db = weights_to_counts(xp, w[a:b], rr.density, n_tgt, mean=rr.weight_mean, name="source_weights")
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

BAND_OVERSAMPLE = 4  # virtual columns drawn per output slot (the crate's oversampling)
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
        col_map32: the same as int32 (the CUDA kernels' column type), made once with the layout.
        key: the arguments the layout was made from (it names the layout's device copies).
    """

    n_cols: int
    k_draw: int
    k: int
    widths: np.ndarray
    col_counts: np.ndarray
    col_map: np.ndarray
    col_map32: np.ndarray
    key: tuple[Any, ...]

    def on(self, backend: Any) -> tuple[Any, ...]:
        """``(col_counts, col_map)`` as arrays of ``backend.xp``: the host arrays on a NumPy
        backend; on a device int64 counts and an int32 map (the kernels' column type), uploaded
        once per layout and device (:func:`~gpu_phase_router._prep.on_backend`)."""
        if backend.xp is np:
            return self.col_counts, self.col_map
        return on_backend(backend, ("band_layout", *self.key), self.col_counts, self.col_map32)


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


def _clip_to_count(x: np.ndarray, n: int) -> np.ndarray:
    """int64 ``clip(x, 1, n)`` of whole floats ``x``, compared with the integer ``n`` exactly (as
    Python compares a float with an int): near 2^63 ``float(n)`` rounds, and a float cast past
    int64 wraps."""
    fn = float(n)
    at_top = x > fn if int(fn) < n else x >= fn  # x >= n exactly: no float lies between n and float(n)
    return np.where(at_top, n, np.maximum(1, np.where(at_top, 1.0, x).astype(np.int64)))


SCALED_TO_ZERO = (
    "target_capacities: positive capacities this far below the largest become 0 once scaled by 2^-m (SPEC §13: "
    "n_src * k * max(cap) overflows float64), so their water-filled shares are undefined; raise them, or set them to 0"
)


def water_filled_shares(caps: np.ndarray, n_src: int, k: int) -> np.ndarray:
    """SPEC §13: float64 ``pi[e] = fair[e] / n_src`` with the fair shares ``n_src * k * cap / sum(cap)``
    water-filled so that none exceeds ``n_src`` (one slot per source).

    Where ``n_src * k * max(cap)`` overflows, the capacities are first multiplied by ``2^-m``
    (``m``: the binary exponent of the largest), which is exact for them and leaves every share
    as it is at any smaller scale; unscaled, every share would be ``inf``. Raises ``ValueError``
    naming ``target_capacities`` when the capacities left to share the remaining slots all scale
    to 0 (far below the largest: their shares would be 0 / 0)."""
    pi = np.zeros(caps.shape[0], dtype=np.float64)
    free = caps > 0
    total = float(n_src * k)
    top = float(caps.max(initial=0.0))
    if math.isinf(total * top):  # capacities near the float64 limit: scaled by 2^-m first, exactly
        caps = np.ldexp(caps, -math.frexp(top)[1])
    while free.any():
        s = tree_sum(np, np.where(free, caps, 0.0))
        if s == 0:  # every free capacity scaled to 0: the shares would be 0 / 0 (SPEC §9, §13)
            raise ValueError(SCALED_TO_ZERO)
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
    check_sum(np, "target_capacities", caps)
    weights = band_weights(caps, n_src, k)
    q = weights / tree_sum(np, weights) * v0
    widths = np.where(weights == 0, 0, np.maximum(1, np.ceil(q))).astype(np.int64)
    per_col = np.rint(q / np.maximum(widths, 1) * n_src)
    counts = np.where(weights == 0, 0, _clip_to_count(per_col, n_src))
    col_map = np.repeat(np.arange(n_tgt, dtype=np.int64), widths)
    col_counts = counts[col_map]
    col_map32 = col_map.astype(np.int32)
    n_cols = int(col_map.shape[0])
    for a in (widths, col_counts, col_map, col_map32):
        a.setflags(write=False)
    key = (caps_bytes, n_src, k, density)
    return BandLayout(n_cols, min(k * BAND_OVERSAMPLE, n_cols), k, widths, col_counts, col_map, col_map32, key)


def ring_size(rr: RowRange) -> int:
    """Ring size of the phase router from weights: ``V`` with bands (SPEC §13), else ``n_tgt``.
    Degrees (and so ``degree_prefix``) are counted on this ring. Host only."""
    assert rr.caps is not None
    if bands_apply(rr.n_src, rr.n_tgt):
        return band_layout(rr.caps, rr.n_src, rr.k, rr.density).n_cols
    return rr.n_tgt


# -- the method-table entry -------------------------------------------------------------------


def rows(be: Any, rr: RowRange) -> Array:
    """The ``rows`` function of ``method="phase"`` (see :mod:`gpu_phase_router.methods`)."""
    caps = rr.caps
    assert caps is not None
    if bands_apply(rr.n_src, int(caps.shape[0])):  # SPEC §13: virtual ring, first k distinct targets
        lay = band_layout(caps, rr.n_src, rr.k, rr.density)  # host arithmetic only, cached
        counts, col_map = lay.on(be)  # device copies made once per layout and device
        return phase_rows(be, counts, rr, k=lay.k_draw, col_map=col_map)
    counts = weights_to_counts(np, caps, rr.density, rr.n_src, name="target_capacities")
    return phase_rows(be, counts, rr, k=rr.k)


def degrees(xp: Any, w: Array, rr: RowRange) -> Array:
    """int64 degrees of weights ``w`` on the method's ring (:func:`ring_size`)."""
    return weights_to_counts(xp, w, rr.density, ring_size(rr), mean=rr.weight_mean, name="source_weights")
