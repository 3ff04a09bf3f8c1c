"""Numba CPU backend: row-parallel kernels, integer arithmetic only, bit-identical to SPEC.md.

Rows are split into fixed chunks handled by ``numba.prange`` (the phase router's threads claim
its tasks one at a time: :func:`~._numba_prims.claim`); each row is computed by one thread from
its own inputs, so the output depends neither on the number of threads nor on which ran a row. All key
arithmetic is uint64 (constants are ``np.uint64`` so Numba never promotes to float64). Square rows
with long windows are routed in phase order, their candidates found by a sweep along the source ring
(:func:`_rows_kernel`, :func:`_sweeps`).
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np
from numba.core import types
from numba.extending import overload

from .._keys import FEISTEL_ROUNDS, FILL_TRIES, feistel_params
from . import _numba_runtime as _rt  # threading layer, cache dir, fork hooks: before any decoration
from ._numba_prims import KEY_MAX as _KEY_MAX
from ._numba_prims import U0 as _ZERO
from ._numba_prims import U1 as _ONE
from ._numba_prims import U32 as _S32
from ._numba_prims import G as _G
from ._numba_prims import append_set_bits as _append_set_bits
from ._numba_prims import at as _at
from ._numba_prims import borrow as _borrow
from ._numba_prims import claim as _claim
from ._numba_prims import cttz as _cttz
from ._numba_prims import index_of as _index_of
from ._numba_prims import mix64 as _mix64
from ._numba_prims import popcount as _popcount
from ._numba_prims import ring_hits64 as _ring_hits64

ROWS_PER_TASK = 64  # rows of one task: one thread claims and routes it (its buffers are reused within it)
SCAN_CHUNK = 8192  # ring positions tested before their candidates are keyed: most rows in one chunk, so the
# provisional bound of the first chunk sees the whole row (about k + 4 candidates reach the bottom-k)
MASK_BITS = 64  # ring positions tested per hit mask (one uint64)
SMALL_K = 32  # up to this k the bottom-k is a sorted array; above it, a binary max-heap
RANK_MAX = 64  # a row's first bottom-k of at most this many marked candidates is ranked at once (_rank_marked)
SHORT_DEG = 64  # banded rows of at most this many ring positions are routed by _route_short
FEISTEL_TASK = 4096  # permutation values per prange task
SYSTEMATIC_TASK = 256  # systematic rows per prange task
POPCOUNT_TASK = 256  # bit-packed rows per prange task
POPCOUNT_WORK = 2  # work units per word (row_chunks): a memory-bound pass gains from a second thread early
RING16_LIMIT = 1 << 15  # n_src and n_tgt below this: int16 ring arrays (16-lane position tests on AVX2)
RING32_LIMIT = 1 << 31  # n_src and n_tgt below this: int32 ring arrays
_NO_MAP = np.empty(0, dtype=np.int64)  # col_map of the plain phase router (no bands)
_NO_MAP.setflags(write=False)  # maps are passed read-only, so both paths share one compiled kernel
_NO_ORDER = np.empty(0, dtype=np.int64)  # order, ev_off and ev_pos of rows routed without a sweep
SWEEP_MAX_TGT = 1 << 16  # a sweep keeps a bit per ring position per thread: at most 8 KiB
SWEEP_MIN_DEG = 1024  # mean work per row (about its degree) from which rows are swept: the SPEC-mode call at
# N = 4096, density 0.3 (degree 1229) took 0.89-0.92x the time of the row-by-row scan, at 2048 (614) 1.0x (Zen 3)


@nb.njit(inline="always", cache=True)
def _feistel_pass(y, key, hh, m, inverse):
    """One pass of the Feistel network (SPEC §6) on ``y < 2^(2h)``, without cycle walking."""
    left = y >> hh
    right = y & m
    if inverse:
        for rr in range(FEISTEL_ROUNDS):
            r = np.uint64(FEISTEL_ROUNDS - 1 - rr)
            left, right = right ^ (_at(key, (r << _S32) + left) & m), left
    else:
        for rr in range(FEISTEL_ROUNDS):
            r = np.uint64(rr)
            left, right = right, left ^ (_at(key, (r << _S32) + right) & m)
    return (left << hh) | right


@nb.njit(cache=True)
def _feistel_one(x, n, key, h, mask, inverse):
    if n == 1:
        return np.int64(0)
    hh = np.uint64(h)
    m = np.uint64(mask)
    y = np.uint64(x)
    nn = np.uint64(n)
    while True:
        y = _feistel_pass(y, key, hh, m, inverse)
        if y < nn:
            return np.int64(y)


@nb.njit(cache=True)
def _feistel_fill(start, n, key, h, mask, inverse, out):
    """``out[i] = feistel(start + i)`` (or its inverse), serially: first one pass for every value, a
    loop without branches that LLVM vectorises, then cycle walking for the values it left ``>= n``."""
    if n == 1:
        out[:] = 0
        return
    hh = np.uint64(h)
    m = np.uint64(mask)
    nn = np.uint64(n)
    base = np.uint64(start)
    for i in range(out.shape[0]):
        out[i] = np.int64(_feistel_pass(base + np.uint64(i), key, hh, m, inverse))
    for i in range(out.shape[0]):
        if np.uint64(out[i]) >= nn:
            out[i] = _feistel_one(out[i], n, key, h, mask, inverse)


@nb.njit(parallel=True, cache=True)
def _feistel_fill_par(start, n, key, h, mask, inverse, out):
    """:func:`_feistel_fill` split into tasks of ``FEISTEL_TASK`` values across threads."""
    count = out.shape[0]
    for task in nb.prange((count + FEISTEL_TASK - 1) // FEISTEL_TASK):
        a = task * FEISTEL_TASK
        b = min(count, a + FEISTEL_TASK)
        _feistel_fill(start + a, n, key, h, mask, inverse, out[a:b])


@nb.njit(inline="always", cache=True)
def _less(ka, ca, kb, cb):
    return ka < kb or (ka == kb and ca < cb)


@nb.njit(cache=True)
def _sift_down(keys, cols, size, i):
    """Restore the max-heap property of ``(keys, cols)[:size]`` below index ``i``."""
    while True:
        left = 2 * i + 1
        if left >= size:
            return
        big = left
        right = left + 1
        if right < size and _less(keys[left], cols[left], keys[right], cols[right]):
            big = right
        if not _less(keys[i], cols[i], keys[big], cols[big]):
            return
        keys[i], keys[big] = keys[big], keys[i]
        cols[i], cols[big] = cols[big], cols[i]
        i = big


@nb.njit(inline="always", cache=True)
def _offer(keys, cols, size, k, key, col):
    """Offer ``(key, col)`` to the bottom-k max-heap holding ``size`` entries; return new size."""
    if size < k:
        i = size
        keys[i] = key
        cols[i] = col
        while i > 0:  # sift up
            parent = (i - 1) // 2
            if not _less(keys[parent], cols[parent], keys[i], cols[i]):
                break
            keys[i], keys[parent] = keys[parent], keys[i]
            cols[i], cols[parent] = cols[parent], cols[i]
            i = parent
        return size + 1
    if _less(key, col, keys[0], cols[0]):
        keys[0] = key
        cols[0] = col
        _sift_down(keys, cols, size, 0)
    return size


@nb.njit(inline="always", cache=True)
def _offer_sorted(keys, cols, size, k, key, col):
    """Offer ``(key, col)`` to a bottom-k kept as an ascending array (fast for small ``k``)."""
    if size < k:
        pos = size
        size += 1
    elif _less(key, col, keys[k - 1], cols[k - 1]):
        pos = k - 1
    else:
        return size
    while pos > 0 and _less(key, col, keys[pos - 1], cols[pos - 1]):
        keys[pos] = keys[pos - 1]
        cols[pos] = cols[pos - 1]
        pos -= 1
    keys[pos] = key
    cols[pos] = col
    return size


@nb.njit(cache=True)
def _emit_sorted(keys, cols, size, out_row):
    """Heap-sort the bottom-k heap ascending into ``out_row`` and pad with -1."""
    for end in range(size - 1, 0, -1):
        keys[0], keys[end] = keys[end], keys[0]
        cols[0], cols[end] = cols[end], cols[0]
        _sift_down(keys, cols, end, 0)
    for q in range(size):
        out_row[q] = cols[q]
    for q in range(size, out_row.shape[0]):
        out_row[q] = -1


@nb.njit(inline="always", cache=True)
def _emit_ascending(cols, size, out_row):
    for q in range(size):
        out_row[q] = cols[q]
    for q in range(size, out_row.shape[0]):
        out_row[q] = -1


@nb.njit(inline="always", cache=True)
def _offer_one(key, col, keys, cols, size, k):
    """Offer ``(key, col)`` to the bottom-k (a sorted array up to ``SMALL_K``, else a max-heap)."""
    if k <= SMALL_K:
        if size < k or key <= keys[k - 1]:
            size = _offer_sorted(keys, cols, size, k, key, col)
    elif size < k or key <= keys[0]:
        size = _offer(keys, cols, size, k, key, col)
    return size


@nb.njit(cache=True)
def _offer_marked(masks, kbuf, pbuf, ring_col, keys, cols, size, k):
    """Offer the candidates ``q`` (keys ``kbuf[q]``, ring positions ``pbuf[q]``) whose bit is set in
    ``masks[q // 64]`` to the bottom-k, in ascending ``q``; return its size."""
    for blk in range(masks.shape[0]):
        m = masks[blk]
        while m:
            q = np.uint64(blk * MASK_BITS) + _cttz(m)
            size = _offer_one(kbuf[q], np.int64(ring_col[pbuf[q]]), keys, cols, size, k)
            m &= m - _ONE
    return size


@nb.njit(inline="always", cache=True)
def _rank_marked(masks, kbuf, pbuf, ring_col, cbuf, keys, cols, k):
    """The bottom-k of the candidates whose bit is set in ``masks`` (``h`` of them, ``k <= h <=
    RANK_MAX``) into ``keys``/``cols`` (empty before; ``k + 1`` entries each), ascending; returns ``k``.

    The same entries as offering the candidates one by one (:func:`_offer_marked`), without its
    data-dependent branches: a candidate's rank is the number of candidates with a smaller key
    (one vectorisable loop), and it is stored at that rank, or in the spare entry ``k``. The keys
    of a row are distinct (its ring positions, hence columns, are, and ``at(base, ·)`` is a
    bijection), so their order is the ``(key, col)`` order of SPEC §5. The candidates' keys are
    moved to the front of ``kbuf`` and their columns written to ``cbuf`` (``RANK_MAX`` entries).
    """
    h = 0
    for blk in range(masks.shape[0]):
        m = masks[blk]
        while m:
            q = np.uint64(blk * MASK_BITS) + _cttz(m)
            kbuf[h] = kbuf[q]  # h <= q: nothing still to be read is overwritten
            cbuf[h] = ring_col[pbuf[q]]
            h += 1
            m &= m - _ONE
    for i in range(h):
        key = kbuf[i]
        rank = 0
        for j in range(h):
            rank += np.int64(kbuf[j] < key)
        rank = min(rank, k)
        keys[rank] = key
        cols[rank] = cbuf[i]
    return k


@nb.njit(inline="always", cache=True)
def _holds(x, start, length, n_src):
    """``in_ring(x, start, length, n_src)`` (SPEC §4) for ``0 <= x, start < n_src``, branch-free."""
    diff = x - start
    diff += (diff >> 63) & n_src
    return diff < length


@nb.njit(inline="always", cache=True)
def _hits_scalar(ring_start, ring_len, p, w, x, n_src):
    """Bit ``j`` set iff ring position ``p + j`` (``j < w <= 64``) holds ``x``, one position at a time."""
    m = _ZERO
    for j in range(w):
        m |= np.uint64(_holds(x, ring_start[p + j], ring_len[p + j], n_src)) << np.uint64(j)
    return m


def _block_hits(ring_start, ring_len, p, x, n_src):
    """Bit ``i`` set iff ring position ``p + i`` (``i < 64``) holds ``x``; ``p + 64 <= n_tgt`` (Numba only)."""
    raise NotImplementedError("compiled by Numba only")


@overload(_block_hits, inline="always")
def _block_hits_numba(ring_start, ring_len, p, x, n_src):
    if ring_start.dtype in (types.int16, types.int32):  # the CPU ring of every n_src < 2^31: one vector expression
        return lambda ring_start, ring_len, p, x, n_src: _ring_hits64(ring_start, ring_len, p, x, n_src)

    return lambda ring_start, ring_len, p, x, n_src: _hits_scalar(ring_start, ring_len, p, MASK_BITS, x, n_src)


@nb.njit(cache=True)
def _compact(x, n_src, ring_start, ring_len, p0, p1, pbuf, cnt):
    """Append the ring positions in ``[p0, p1)`` whose interval holds ``x``, ascending, to ``pbuf[cnt:]``;
    return the new count.

    Positions are tested ``MASK_BITS`` at a time into a hit mask (:func:`_block_hits`: one vector
    expression on the int16 and int32 rings) whose set bits are appended branch-free (eight 8-lane stores per
    mask, so ``pbuf`` needs 8 entries to spare): no branch depends on which positions hit. Blocks
    that would read past the ring's end are tested one position at a time.
    """
    cnt = np.uint64(cnt)
    n_ring = ring_start.shape[0]
    for b in range(p0, p1, MASK_BITS):
        w = min(MASK_BITS, p1 - b)
        if b + MASK_BITS <= n_ring:
            m = _block_hits(ring_start, ring_len, b, x, n_src)
            if w < MASK_BITS:
                m &= (_ONE << np.uint64(w)) - _ONE
        else:
            m = _hits_scalar(ring_start, ring_len, b, w, x, n_src)
        cnt = _append_set_bits(pbuf, cnt, m, b)
    return np.int64(cnt)


@nb.njit(cache=True)
def _ring_events(ring_start, ring_len, n_src, ev_off, ev_pos):
    """The ring positions whose interval starts or stops holding ``x`` between ``x - 1`` and ``x``, by
    ``x`` (a counting sort): those of ``x`` are ``ev_pos[ev_off[x]:ev_off[x + 1]]`` (``ev_off``: ``n_src
    + 1`` entries; ``ev_pos``: ``2 n_tgt``); returns how many there are.

    An interval of length ``0 < len < n_src`` starts holding at ``x = start`` and stops at ``(start +
    len) mod n_src``, two different ``x``; one of length 0 or ``>= n_src`` never changes (SPEC §4). So
    the set of positions holding ``x`` is that of ``x - 1`` with the positions of ``x`` toggled.
    """
    n_tgt = ring_start.shape[0]
    ev_off[:] = 0
    for p in range(n_tgt):
        length = np.int64(ring_len[p])
        if 0 < length < n_src:
            start = np.int64(ring_start[p])
            stop = start + length
            ev_off[start + 1] += 1
            ev_off[(stop - n_src if stop >= n_src else stop) + 1] += 1
    for x in range(n_src):
        ev_off[x + 1] += ev_off[x]
    fill = ev_off[:n_src].copy()
    for p in range(n_tgt):
        length = np.int64(ring_len[p])
        if 0 < length < n_src:
            start = np.int64(ring_start[p])
            stop = start + length
            ev_pos[fill[start]] = p
            fill[start] += 1
            stop = stop - n_src if stop >= n_src else stop
            ev_pos[fill[stop]] = p
            fill[stop] += 1
    return ev_off[n_src]


@nb.njit(inline="always", cache=True)
def _holding_bits(x, n_src, ring_start, ring_len, bits):
    """Bit ``p % 64`` of ``bits[p // 64]`` set iff ring position ``p`` holds ``x`` (SPEC §4), for every
    position: the start of a sweep (:func:`_sweep_to`). Once per task of ``ROWS_PER_TASK`` rows, so
    position by position (the vector test of :func:`_compact` would compile the kernel longer)."""
    n_tgt = ring_start.shape[0]
    for w in range(bits.shape[0]):
        b = w * MASK_BITS
        bits[w] = _hits_scalar(ring_start, ring_len, b, min(MASK_BITS, n_tgt - b), x, n_src)


@nb.njit(inline="always", cache=True)
def _sweep_to(bits, x_from, x_to, ev_off, ev_pos):
    """Move ``bits`` (:func:`_holding_bits` of ``x_from``) to ``x_to >= x_from``: toggle the positions
    of every ``x`` in ``(x_from, x_to]`` (:func:`_ring_events`)."""
    for e in range(ev_off[x_from + 1], ev_off[x_to + 1]):
        p = np.uint64(ev_pos[e])
        bits[p >> np.uint64(6)] ^= _ONE << (p & np.uint64(63))


@nb.njit(inline="always", cache=True)
def _compact_bits(bits, p0, p1, pbuf, cnt):
    """:func:`_compact` from the positions' bits (:func:`_holding_bits`): append the set positions in
    ``[p0, p1)``, ascending, to ``pbuf[cnt:]``; return the new count."""
    cnt = np.uint64(cnt)
    for w in range(p0 // MASK_BITS, (p1 + MASK_BITS - 1) // MASK_BITS):
        b = w * MASK_BITS
        m = bits[w]
        if b < p0:
            m &= _KEY_MAX << np.uint64(p0 - b)
        if p1 - b < MASK_BITS:
            m &= (_ONE << np.uint64(p1 - b)) - _ONE
        cnt = _append_set_bits(pbuf, cnt, m, b)
    return np.int64(cnt)


@nb.njit(inline="always", cache=True)
def _mark_at_most(kbuf, cnt, bound, mbuf):
    """Bit ``j`` of ``mbuf[q // 64]`` set iff ``kbuf[q] <= bound``, for ``q < cnt``; returns how many are."""
    hits = _ZERO
    for blk in range((cnt + MASK_BITS - 1) // MASK_BITS):
        q0 = blk * MASK_BITS
        m = _ZERO
        for j in range(min(MASK_BITS, cnt - q0)):
            m |= np.uint64(kbuf[q0 + j] <= bound) << np.uint64(j)
        mbuf[blk] = m
        hits += _popcount(m)
    return hits


def _named(fn: Any, name: str) -> Any:
    """``fn`` renamed ``name``: Numba names a function's cache files after its qualified name, and the
    kinds made from one source would otherwise share one index file, which two processes compiling
    different kinds at once can leave pointing at the other kind's code."""
    fn.__name__ = fn.__qualname__ = name
    return fn


def _scan_row_kernel(name: str, swept: bool) -> Any:
    """A row's scan, named ``name``: ``swept`` (a constant of the compiled code) chooses how the
    positions holding ``x`` are found, so each kind compiles one way.

    The bottom-k of the candidates among ring positions ``lo, lo + 1, ...`` (``d`` of them, modulo
    ``n_tgt``) into ``keys``/``cols``; returns its size.

    Chunks of ``SCAN_CHUNK`` positions (the part of a row past the ring's end continues the same
    chunk from position 0) are compacted into ``pbuf`` (hit positions: :func:`_compact`, or
    :func:`_compact_bits` from the ``bits`` of a sweep, empty when not ``swept``);
    one loop gathers their ``ring_key``, and one vectorisable loop computes their keys and
    marks those at or below a bound: the current k-th smallest key once the bottom-k is full
    (nothing above it can enter), or, for the first chunk of a row holding many more candidates
    than ``k``, a provisional bound ``tau`` with about ``k + 4`` expected keys below it, raised
    fourfold (the keys marked again, :func:`_mark_at_most`) until at least ``k`` fall below it.
    Chunks with no key under the bound — most of a long row once the bottom-k is full — skip the
    update entirely; otherwise the set bits of the masks are walked and only those candidates
    reach the update: ranked at once (:func:`_rank_marked`) when they are a row's first (``k`` to
    ``RANK_MAX`` of them, ``k <= SMALL_K``), else offered one by one (:func:`_offer_marked`).
    """

    def scan_row(
        lo, d, x, n_src, ring_start, ring_len, ring_col, ring_key, bits, row_base, pbuf, kbuf, mbuf, cbuf, keys, cols, k
    ):
        n_tgt = ring_col.shape[0]
        want = k + 4  # k + 4 against 2k + 4: 2-4 % less kernel time at N = 4096, k = 2 and 8 (Zen 3)
        size = np.int64(0)  # np.int64, not a literal 0: each callee is compiled for one signature
        t0 = 0
        while t0 < d:
            a = lo + t0  # the chunk is ring positions [a, b) of the unrolled ring, b <= 2 n_tgt
            b = lo + min(d, t0 + SCAN_CHUNK)
            cnt = np.int64(0)
            if a < n_tgt:
                if swept:
                    cnt = _compact_bits(bits, a, min(b, n_tgt), pbuf, cnt)
                else:
                    cnt = _compact(x, n_src, ring_start, ring_len, a, min(b, n_tgt), pbuf, cnt)
            if b > n_tgt:
                if swept:
                    cnt = _compact_bits(bits, max(a, n_tgt) - n_tgt, b - n_tgt, pbuf, cnt)
                else:
                    cnt = _compact(x, n_src, ring_start, ring_len, max(a, n_tgt) - n_tgt, b - n_tgt, pbuf, cnt)
            if size >= k:
                bound = keys[0] if k > SMALL_K else keys[k - 1]
            elif size == 0 and cnt > 2 * want:
                bound = (_KEY_MAX // np.uint64(cnt)) * np.uint64(want)
            else:
                bound = _KEY_MAX
            for q in range(cnt):  # a gather, kept apart so that the keying loop below vectorises; the index is
                kbuf[q] = ring_key[np.uint64(pbuf[q])]  # unsigned: no negative-index wraparound (0.91x at N = 4096)
            n_blk = (cnt + MASK_BITS - 1) // MASK_BITS
            hits = _ZERO
            for blk in range(n_blk):  # keys, and a mask per 64 of those at or below the bound
                q0 = blk * MASK_BITS
                m = _ZERO
                for j in range(min(MASK_BITS, cnt - q0)):
                    kq = _mix64(row_base + kbuf[q0 + j])  # = at(row_base, col): ring_key[p] = G * (col + 1)
                    kbuf[q0 + j] = kq
                    m |= np.uint64(kq <= bound) << np.uint64(j)
                mbuf[blk] = m
                hits += _popcount(m)
            while size < k and hits < np.uint64(k) and bound < _KEY_MAX:  # the provisional bound was too low
                bound = bound << np.uint64(2) if bound < _KEY_MAX >> np.uint64(2) else _KEY_MAX
                hits = _mark_at_most(kbuf, cnt, bound, mbuf)
            if size == 0 and k <= SMALL_K and np.uint64(k) <= hits <= np.uint64(RANK_MAX):
                size = _rank_marked(mbuf[:n_blk], kbuf, pbuf, ring_col, cbuf, keys, cols, k)
            elif hits:
                size = _offer_marked(mbuf[:n_blk], kbuf, pbuf, ring_col, keys, cols, size, k)
            t0 += SCAN_CHUNK
        return size

    return nb.njit(cache=True)(_named(scan_row, name))


_scan_row = _scan_row_kernel("_scan_row", swept=False)
_swept_scan_row = _scan_row_kernel("_swept_scan_row", swept=True)


@nb.njit(inline="always", cache=True)
def _min_key_after(ukeys, n, last):
    """The smallest of ``ukeys[:n]`` above ``last`` (``KEY_MAX`` when none is), branch-free."""
    best = _KEY_MAX
    for q in range(n):
        kq = ukeys[q]
        best = min(best, kq if kq > last else _KEY_MAX)
    return best


@nb.njit(inline="always", cache=True)
def _gather_held(x, n_src, ring_start, ring_len, ring_key, p0, p1, kbuf, cnt):
    """Append ``ring_key[p]`` of the positions ``p`` in ``[p0, p1)`` whose interval holds ``x`` to
    ``kbuf[cnt:]``, branch-free (each is stored, and kept by advancing ``cnt``); return the new count.
    Unsigned indices: Numba tests a signed index for a negative value to wrap, which made this
    loop about 1.2x slower."""
    for p in range(np.uint64(p0), np.uint64(p1)):
        kbuf[np.uint64(cnt)] = ring_key[p]
        cnt += _holds(x, ring_start[p], ring_len[p], n_src)
    return cnt


@nb.njit(inline="always", cache=True)
def _route_short(lo, d, x, n_src, ring_start, ring_len, ring_key, row_base, k, col_map, kbuf, out_row):
    """A banded row of at most ``SHORT_DEG`` ring positions, routed into ``out_row`` (SPEC §13): the
    first ``len(out_row)`` distinct targets of its bottom-k columns in ascending key order, then -1.

    The ``ring_key`` of the positions ``lo, lo + 1, ...`` (``d`` of them, modulo ``n_tgt``) whose
    interval holds ``x`` are gathered branch-free into ``kbuf`` and keyed, the smallest key found in
    the same loop. The keys are distinct (``d <= n_tgt`` positions hold distinct columns, SPEC §4),
    so the next key of the bottom-k is the smallest above the last one (one branch-free
    min-reduction, where a sorted insertion mispredicts), and its column is the index the key is
    the key of (:func:`~._numba_prims.index_of`). Each column's target is listed as it is taken, and
    taking stops once ``len(out_row)`` targets are listed (the rest of the bottom-k cannot change
    them) or at ``k`` columns.
    """
    n_tgt = ring_key.shape[0]
    end = min(lo + d, n_tgt)  # positions lo .. end - 1, then 0 .. lo + d - end - 1 (a row that wraps the ring)
    cnt = _gather_held(x, n_src, ring_start, ring_len, ring_key, lo, end, kbuf, 0)
    cnt = _gather_held(x, n_src, ring_start, ring_len, ring_key, 0, lo + d - end, kbuf, cnt)
    key = _KEY_MAX  # the smallest key, found in the keying loop
    for q in range(cnt):
        kq = _mix64(row_base + kbuf[q])  # at(row_base, ring_col[pos])
        kbuf[q] = kq
        key = min(key, kq)
    k_out = out_row.shape[0]
    listed = 0
    for taken in range(min(k, cnt)):
        if taken > 0:
            key = _min_key_after(kbuf, cnt, key)
        e = col_map[_index_of(row_base, key)]
        if not _listed_before(out_row, listed, e):
            out_row[listed] = e
            listed += 1
            if listed == k_out:
                return
    for q in range(listed, k_out):
        out_row[q] = -1


@nb.njit(inline="always", cache=True)
def _listed_before(out_row, listed, e):
    """Whether target ``e`` is among the first ``listed`` entries of ``out_row``."""
    for r in range(listed):
        if out_row[r] == e:
            return True
    return False


@nb.njit(inline="always", cache=True)
def _emit_distinct(keys, cols, size, k, col_map, out_row):
    """SPEC §13: map the bottom-k columns, in ascending ``(key, col)`` order, through ``col_map`` and
    keep the first ``len(out_row)`` distinct targets; pad with -1."""
    if k > SMALL_K:  # the bottom-k is a max-heap: sort it ascending in place
        for end in range(size - 1, 0, -1):
            keys[0], keys[end] = keys[end], keys[0]
            cols[0], cols[end] = cols[end], cols[0]
            _sift_down(keys, cols, end, 0)
    k_out = out_row.shape[0]
    listed = 0
    for q in range(size):
        if listed == k_out:
            break
        e = col_map[cols[q]]
        if not _listed_before(out_row, listed, e):
            out_row[listed] = e
            listed += 1
    for q in range(listed, k_out):
        out_row[q] = -1


@nb.njit(cache=True)
def _complete_row(row_base, col_map, out_row):
    """SPEC §13 fill completion of a short row (one of a source of positive degree): capacity-weighted
    draws ``col_map[key(j, V + r) mod V]`` for ``r < FILL_TRIES``, then the targets of positive capacity
    in ascending order, cyclically from the band of the first draw, each appended when not yet listed."""
    k_out = out_row.shape[0]
    listed = 0
    while listed < k_out and out_row[listed] >= 0:
        listed += 1
    n_cols = np.uint64(col_map.shape[0])
    for r in range(FILL_TRIES):
        if listed == k_out:
            return
        e = col_map[_at(row_base, n_cols + np.uint64(r)) % n_cols]
        if not _listed_before(out_row, listed, e):
            out_row[listed] = e
            listed += 1
    first = col_map[_at(row_base, n_cols) % n_cols]
    e = first
    for _ in range(col_map.shape[0]):  # at most one step per band
        if listed == k_out:
            return
        if not _listed_before(out_row, listed, e):
            out_row[listed] = e
            listed += 1
        nxt = np.searchsorted(col_map, e, side="right")  # the next band (bands are contiguous, ascending)
        e = col_map[nxt if nxt < col_map.shape[0] else 0]
        if e == first:
            return


def _rows_kernel(name: str, banded: bool, short_only: bool, swept: bool = False) -> Any:
    """The serial phase-router rows kernel of one kind, named ``name``; the flags are constants of the
    compiled code:

    * ``banded=False``: square rows (an empty ``col_map``): the ``k`` selected columns are written as
      they are (``out`` has ``k`` columns);
    * ``banded=True``: SPEC §13 rows: the columns are mapped to targets by ``col_map`` and each row
      keeps its first ``out.shape[1]`` distinct ones, completed where it has fewer;
    * ``short_only=True`` (banded): every row is short (``deg <= SHORT_DEG``, ``k <= SMALL_K``, checked
      by the caller) and routed by :func:`_route_short`; the kernel has no ring scan;
    * ``swept=True`` (square): the rows are routed in the order ``order`` by a sweep (below).

    Numba prunes the branches these constants rule out before typing, so a kind compiles only what it
    runs: a square call never compiles the banded code, and a call of short banded rows (MoE shapes)
    never compiles the ring scan (on the 2-core Zen 3, a first ``route(n=1024)`` compiled in 5.5-6.1 s
    instead of 7.7-8.1 s, a first MoE-shape call in 3.4-3.6 s instead of 7.3-7.9 s). The short kind
    keeps the general kind's per-row test and drops only the scan branch: with the test removed as
    well it ran 3 % slower (LLVM laid the loop out differently).

    With a non-empty ``derive = (key, h, mask)`` the rows' phases are not read from ``phase`` but made
    per task: ``feistel(row0 + i, n_src, key)``. The rows are routed in tasks of ``ROWS_PER_TASK`` rows,
    each claimed from ``counter`` (int64 ``[1]``, zero before the first call;
    :func:`~._numba_prims.claim`) until none is left: alone, this routes every task in order;
    :func:`_rows_par_kernel` runs it on every thread at once.

    The swept kind routes the rows in the order ``order`` (ascending phase, :func:`_sweep_plan`; the
    phases given, ``derive`` empty), and a task finds the ring positions holding its first row's
    phase by testing every position (:func:`_holding_bits`), then those of each next row by toggling
    the positions whose interval starts or stops in between (:func:`_sweep_to`, from the events
    ``ev_off``/``ev_pos`` of :func:`_ring_events`). A row's scan then reads its window of those bits
    (:func:`_compact_bits`) instead of testing each position of it: the same candidate set, so the
    same row (SPEC §5 depends on the set only). The other kinds take ``order``, ``ev_off`` and
    ``ev_pos`` empty.

    The caller holds the array arguments until this returns, so they are used through borrowed views
    (:func:`_borrow`): the calls and row views below count no references to them (atomic operations,
    contended between threads that share the inputs).
    """

    scan_rows = not short_only  # a constant of the compiled code, like the flags

    def phase_rows(
        phase,
        off_s,
        deg,
        ring_start,
        ring_len,
        ring_col,
        ring_key,
        n_src,
        k,
        row0,
        row_key,
        derive,
        col_map,
        order,
        ev_off,
        ev_pos,
        out,
        counter,
    ):
        phase, off_s, deg, out = _borrow(phase), _borrow(off_s), _borrow(deg), _borrow(out)
        ring_start, ring_len = _borrow(ring_start), _borrow(ring_len)
        ring_col, ring_key, derive, col_map = _borrow(ring_col), _borrow(ring_key), _borrow(derive), _borrow(col_map)
        order, ev_off, ev_pos = _borrow(order), _borrow(ev_off), _borrow(ev_pos)
        rows = off_s.shape[0]
        derived = derive.shape[0] > 0
        n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        task = _claim(counter, n_tasks)
        if task < 0:  # every task is claimed already (a late prange iteration of the parallel kernel)
            return
        # scratch for every task this call claims
        keys = np.empty(k + 1, dtype=np.uint64)  # keys and cols: the bottom-k (and a spare entry, see _rank_marked)
        cols = np.empty(k + 1, dtype=np.int64)
        pbuf = np.empty(SCAN_CHUNK + 8, dtype=ring_col.dtype)  # 8 to spare: _append_set_bits stores 8 lanes
        kbuf = np.empty(SCAN_CHUNK, dtype=np.uint64)
        mbuf = np.empty(SCAN_CHUNK // MASK_BITS, dtype=np.uint64)
        cbuf = np.empty(RANK_MAX, dtype=np.int64)
        xs_all = np.empty(ROWS_PER_TASK if derived else 0, dtype=np.int64)  # a task's derived phases (SPEC §6)
        bits = np.empty((ring_col.shape[0] + MASK_BITS - 1) // MASK_BITS if swept else 0, dtype=np.uint64)
        for _ in range(n_tasks):
            a = task * ROWS_PER_TASK
            b = min(rows, a + ROWS_PER_TASK)
            xs = xs_all[: b - a if derived else 0]
            # inverse=False as the runtime bool ``not derived``: a literal False compiles a second signature
            if derived:
                _feistel_fill(row0 + a, n_src, derive[0], np.int64(derive[1]), np.int64(derive[2]), not derived, xs)
            x_prev = np.int64(-1)
            for t in range(a, b):
                i = order[t] if swept else t
                row_base = _at(row_key, row0 + i)
                x = xs[i - a] if derived else phase[i]
                if swept:  # the positions holding x: made at the task's first row, then swept along
                    if x_prev < 0:
                        _holding_bits(x, n_src, ring_start, ring_len, bits)
                    else:
                        _sweep_to(bits, x_prev, x, ev_off, ev_pos)
                    x_prev = x
                lo = off_s[i]
                if banded and deg[i] <= SHORT_DEG and k <= SMALL_K:
                    _route_short(
                        lo, deg[i], x, n_src, ring_start, ring_len, ring_key, row_base, k, col_map, kbuf, out[i]
                    )
                elif scan_rows:
                    scan = (lo, deg[i], x, n_src, ring_start, ring_len, ring_col, ring_key, bits, row_base)
                    if swept:
                        size = _swept_scan_row(*scan, pbuf, kbuf, mbuf, cbuf, keys, cols, k)
                    else:
                        size = _scan_row(*scan, pbuf, kbuf, mbuf, cbuf, keys, cols, k)
                    if banded:
                        _emit_distinct(keys, cols, size, k, col_map, out[i])
                    elif k <= SMALL_K:
                        _emit_ascending(cols, size, out[i])
                    else:
                        _emit_sorted(keys, cols, size, out[i])
                if banded and deg[i] > 0 and out[i, out.shape[1] - 1] < 0:  # a short row: SPEC §13 fill completion
                    _complete_row(row_base, col_map, out[i])
            task = _claim(counter, n_tasks)
            if task < 0:
                break

    return nb.njit(cache=True)(_named(phase_rows, name))


_phase_rows = _rows_kernel("_phase_rows", banded=False, short_only=False)  # square rows
_swept_rows = _rows_kernel("_swept_rows", banded=False, short_only=False, swept=True)  # square rows, by a sweep
_banded_rows = _rows_kernel("_banded_rows", banded=True, short_only=False)  # banded rows, short and long
_short_rows = _rows_kernel("_short_rows", banded=True, short_only=True)  # banded rows, every one short


def _rows_par_kernel(name: str, banded: bool, short_only: bool, swept: bool = False) -> Any:
    """The serial kernel :func:`_rows_kernel` ``(banded, short_only, swept)`` on every thread at once: each
    claims tasks from the shared ``counter`` until none is left, so a thread that starts late or runs
    slowly (a busy or virtualised CPU) takes fewer of them, where a fixed split of the tasks made the
    call wait for that thread's share.

    The serial kernel is compiled once and called per prange iteration (an iteration that finds
    every task claimed returns at once), so the parallel compile stays small.
    """

    def phase_rows_par(*args):  # the serial kernel's arguments, passed on as they are
        n_tasks = (args[1].shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK  # args[1]: off_s, one entry per row
        for _ in nb.prange(n_tasks):
            if short_only:
                _short_rows(*args)
            elif banded:
                _banded_rows(*args)
            elif swept:
                _swept_rows(*args)
            else:
                _phase_rows(*args)

    return nb.njit(parallel=True, cache=True)(_named(phase_rows_par, name))


_phase_rows_par = _rows_par_kernel("_phase_rows_par", banded=False, short_only=False)
_swept_rows_par = _rows_par_kernel("_swept_rows_par", banded=False, short_only=False, swept=True)
_banded_rows_par = _rows_par_kernel("_banded_rows_par", banded=True, short_only=False)
_short_rows_par = _rows_par_kernel("_short_rows_par", banded=True, short_only=True)


@nb.njit(cache=True)
def _systematic_rows(phase, cum, n_src, k, phi, out):
    rows = phase.shape[0]
    n_tgt = cum.shape[0] - 1
    big_u = cum[n_tgt]
    m = np.uint64(n_src) * np.uint64(k)
    nsrc = np.uint64(n_src)
    for i in nb.prange(rows):
        listed = 0
        last = -1
        for s in range(k):
            x = ((np.uint64(s) * nsrc + np.uint64(phase[i])) * big_u + phi) // m
            t = np.searchsorted(cum, x, side="right") - 1
            if t != last:
                out[i, listed] = t
                listed += 1
                last = t
        for q in range(listed, k):
            out[i, q] = -1


@nb.njit(parallel=True, cache=True)
def _systematic_rows_par(phase, cum, n_src, k, phi, out):
    """:func:`_systematic_rows` in tasks of ``SYSTEMATIC_TASK`` rows across threads."""
    rows = phase.shape[0]
    for task in nb.prange((rows + SYSTEMATIC_TASK - 1) // SYSTEMATIC_TASK):
        a = task * SYSTEMATIC_TASK
        b = min(rows, a + SYSTEMATIC_TASK)
        _systematic_rows(phase[a:b], cum, n_src, k, phi, out[a:b])


@nb.njit(cache=True)
def _popcount_rows(words, out):
    """``out[i]``: the set bits of row ``i`` of the uint64 matrix ``words``, in one pass (no temporary)."""
    for i in range(words.shape[0]):
        total = _ZERO
        for j in range(words.shape[1]):
            total += _popcount(words[i, j])
        out[i] = np.int64(total)


@nb.njit(parallel=True, cache=True)
def _popcount_rows_par(words, out):
    """:func:`_popcount_rows` in tasks of ``POPCOUNT_TASK`` rows across threads."""
    rows = words.shape[0]
    for task in nb.prange((rows + POPCOUNT_TASK - 1) // POPCOUNT_TASK):
        a = task * POPCOUNT_TASK
        b = min(rows, a + POPCOUNT_TASK)
        _popcount_rows(words[a:b], out[a:b])


def _sweeps(rows: int, work: int, n_src: int, n_tgt: int) -> bool:
    """Whether square rows of ``work`` units (the sum of their degrees, and ``k + 16`` a row) are routed
    by a sweep (:func:`_rows_kernel`): each task of ``ROWS_PER_TASK`` rows then tests every ring
    position once instead of each row testing its own window, and the host lays out ``O(n_src + n_tgt)``
    events. Worth it where the windows are long: against the ring (degrees above about ``n_tgt / 32``)
    and in themselves (``SWEEP_MIN_DEG``), as in the dense routers of SPEC mode. The events and the
    phase order take ``O(n_src)`` memory, so a call of few rows of many sources (a block of a larger
    result) is not swept: its memory stays ``O(rows + n_tgt)``."""
    n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    return (
        0 < n_tgt <= SWEEP_MAX_TGT
        and n_src <= 8 * (rows + n_tgt)
        and work >= rows * SWEEP_MIN_DEG
        and work >= 2 * n_tasks * n_tgt + n_src + 2 * n_tgt
    )


def _sweep_plan(phase: np.ndarray, n_src: int) -> np.ndarray:
    """int64 row indices in ascending ``phase`` (the phases are distinct, as a permutation's values are):
    a scatter over ``[0, n_src)`` where the rows cover a good part of it, else a sort."""
    rows = phase.shape[0]
    if 8 * rows >= n_src:
        slot = np.full(n_src, -1, dtype=np.int64)
        slot[phase] = np.arange(rows, dtype=np.int64)
        order = slot[slot >= 0]
        if order.shape[0] == rows:
            return order
    return np.argsort(phase, kind="stable").astype(np.int64, copy=False)


class CpuBackend:
    """Numba kernels on NumPy arrays."""

    name = "cpu"
    xp = np

    def popcount_rows(self, words: np.ndarray, nbits: int) -> tuple[np.ndarray, int]:
        words = np.ascontiguousarray(words, dtype=np.uint64)
        counts = np.empty(words.shape[0], dtype=np.int64)
        n_words = words.shape[1]
        for a, b, t in _rt.sized_chunks(
            words.shape[0], POPCOUNT_WORK * n_words, total=POPCOUNT_WORK * words.size, task_rows=POPCOUNT_TASK
        ):
            _rt.run(_popcount_rows_par, _popcount_rows, words[a:b], counts[a:b], n_threads=t)
        tail = nbits % 64
        bad = 0
        if tail and words.shape[0]:
            bad = int(np.count_nonzero(words[:, -1] >> np.uint64(tail)))
        return counts, bad

    def feistel(self, start: int, count: int, n: int, key: int, inverse: bool = False) -> np.ndarray:
        h, mask = feistel_params(n)
        out = np.empty(count, dtype=np.int64)
        args = (np.int64(n), np.uint64(key), np.int64(h), np.int64(mask), bool(inverse))
        work = 4 * FEISTEL_ROUNDS
        for a, b, t in _rt.sized_chunks(count, work, total=count * work, task_rows=FEISTEL_TASK):
            _rt.run(_feistel_fill_par, _feistel_fill, np.int64(start + a), *args, out[a:b], n_threads=t)
        return out

    def prepare_ring(self, ring_start, ring_len, ring_col, *, n_src):
        """``(ring_start, ring_len, ring_col, ring_key)``: int16 ring arrays (lengths clipped to ``n_src``,
        which changes no ``in_ring`` result) when ``n_src`` and ``n_tgt`` are below ``2^15``, int32 below
        ``2^31`` — the vectorised position test of :func:`_compact`; the narrower, the more positions per
        vector and the less memory a row's scan reads (0.90-0.93x the kernel time of int32 at N = 4096
        and 16384, Zen 3) — else int64; and uint64 ``ring_key[p] = G * (ring_col[p] + 1)``, so that a
        key costs two 64-bit products instead of three."""
        n_tgt = ring_col.shape[0]
        small = n_src < RING32_LIMIT and n_tgt < RING32_LIMIT
        dtype = (np.int16 if n_src < RING16_LIMIT and n_tgt < RING16_LIMIT else np.int32) if small else np.int64
        length = np.minimum(ring_len, n_src) if small else ring_len
        with np.errstate(over="ignore"):
            ring_key = (np.asarray(ring_col, dtype=np.uint64) + _ONE) * _G  # at(base, col) = mix64(base + ring_key)
        return (*(np.ascontiguousarray(a, dtype=dtype) for a in (ring_start, length, ring_col)), ring_key)

    def phase_rows(
        self, phase, off_s, deg, ring, *, n_src, k, row0, select_key, col_map=None, k_out=None, perm_key=None
    ):
        """Phase-router rows in chunks of bounded work (a row costs about ``deg + k`` units); with a
        ``col_map`` the ``k`` selected columns are mapped to targets, ``k_out`` distinct kept (SPEC §13).
        Derived phases (``phase=None``) are made by the kernel's tasks, on every thread it runs on, or,
        for rows routed by a sweep (taken in phase order), here before the kernel."""
        ring_start, ring_len, ring_col, ring_key = ring
        banded = col_map is not None
        cmap = _NO_MAP
        if banded:
            cmap = np.ascontiguousarray(col_map, dtype=np.int64).view()
            cmap.setflags(write=False)
        if phase is None and perm_key is None:
            raise ValueError("phase_rows: perm_key is required when phase is None (derived phases)")
        off_s, deg = (np.ascontiguousarray(a, dtype=np.int64) for a in (off_s, deg))
        rows = off_s.shape[0]
        out = np.empty((rows, k_out if banded else k), dtype=np.int32)
        scalars = (np.int64(n_src), np.int64(k))
        key = np.uint64(select_key)
        work = deg + (k + 16)
        total = int(deg.sum()) + rows * (k + 16)
        swept = not banded and _sweeps(rows, total, n_src, ring_col.shape[0])
        derive = np.empty(0, dtype=np.uint64)
        if phase is None and swept:
            phase = self.feistel(row0, rows, n_src, perm_key)
        elif phase is None:
            derive = np.array([perm_key, *feistel_params(n_src)], dtype=np.uint64)
            phase = np.empty(0, dtype=np.int64)
        events = (_NO_ORDER, _NO_ORDER)
        if swept:
            ev_off = np.empty(n_src + 1, dtype=np.int64)
            ev_pos = np.empty(2 * ring_col.shape[0], dtype=np.int64)
            _rt.run(_ring_events, _ring_events, ring_start, ring_len, np.int64(n_src), ev_off, ev_pos, n_threads=1)
            events = (ev_off, ev_pos)
        phase = np.ascontiguousarray(phase, dtype=np.int64)
        if swept:
            kernels = (_swept_rows_par, _swept_rows)
        elif cmap.shape[0] == 0:  # square rows (the kernels' test before they came in kinds)
            kernels = (_phase_rows_par, _phase_rows)
        elif k <= SMALL_K and (rows == 0 or int(deg.max()) <= SHORT_DEG):
            kernels = (_short_rows_par, _short_rows)  # compiles no ring scan
        else:
            kernels = (_banded_rows_par, _banded_rows)
        for a, b, t in _rt.sized_chunks(rows, work, total=total, task_rows=ROWS_PER_TASK):
            _rt.run(
                *kernels,
                phase[a:b],  # empty when the phases are derived
                off_s[a:b],
                deg[a:b],
                ring_start,
                ring_len,
                ring_col,
                ring_key,
                *scalars,
                np.int64(row0 + a),
                key,
                derive,
                cmap,
                _sweep_plan(phase[a:b], n_src) if swept else _NO_ORDER,
                *events,
                out[a:b],
                np.zeros(1, dtype=np.int64),  # the chunk's task counter
                n_threads=t,
            )
        return out

    def systematic_rows(self, phase, cum, *, n_src, k, phi):
        """Systematic-router rows in chunks of bounded work (a row costs ``k`` binary searches)."""
        phase = np.ascontiguousarray(phase, dtype=np.int64)
        cum = np.ascontiguousarray(cum, dtype=np.uint64)
        rows = phase.shape[0]
        out = np.empty((rows, k), dtype=np.int32)
        work = k * (int(cum.shape[0]).bit_length() + 4)
        for a, b, t in _rt.sized_chunks(rows, work, total=rows * work, task_rows=SYSTEMATIC_TASK):
            _rt.run(
                _systematic_rows_par,
                _systematic_rows,
                phase[a:b],
                cum,
                np.int64(n_src),
                np.int64(k),
                np.uint64(phi),
                out[a:b],
                n_threads=t,
            )
        return out

    def crate_rows(self, phase, off_s, deg, ring_start, ring_len, ring_col, *, n, k, row0, seed):
        """Crate-exact rows (SPEC §14), in ``backends/cpu_crate.py``."""
        from . import import_backend_module  # a fork meanwhile waits for the import

        crate_rows = import_backend_module("gpu_phase_router.backends.cpu_crate").crate_rows
        return crate_rows(phase, off_s, deg, ring_start, ring_len, ring_col, n=n, k=k, row0=row0, seed=seed)


def load() -> CpuBackend:
    """Entry point used by the backend registry."""
    return CpuBackend()
