"""Numba kernels of crate-exact mode (SPEC.md §14): the crate's per-row ChaCha8 reservoir.

Rows run in parallel (tasks of :data:`ROWS_PER_TASK` rows that the ``numba.prange`` threads claim one
at a time, buffers allocated once per kernel call). Per row ``j``: the row's ring positions are tested in
chunks, branch-free, and the candidates compacted in ring order; the first ``k`` fill the row, every
later one takes one accepted ``gen_range(0..=count)`` draw from the row's ChaCha8 keystream
(``seed + j``, wrapping).
The keystream is produced :data:`LANES` blocks at a time by :func:`_chacha8_blocks`, whose loop over
blocks has no dependency between iterations, so LLVM vectorises it (one block per SIMD lane); the
accept/reject walk then reads words from that buffer in keystream order.

:func:`shuffle_inplace` is the crate's ``SliceRandom::shuffle`` (the u32 ``gen_range`` path), used
on the host for ``phase_router_auto``'s two permutations: it is sequential by nature.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import _numba_runtime as _rt  # threading layer, cache dir, fork hooks: before any decoration
from ._numba_prims import M32 as _M32
from ._numba_prims import U1 as _U1
from ._numba_prims import U32 as _U32
from ._numba_prims import claim as _claim
from ._numba_prims import ctlz as _ctlz64

ROWS_PER_TASK = 32  # rows of one task: one thread claims and routes it (its buffers are reused within it)
SCAN_CHUNK = 2048  # ring positions tested before their candidates are walked
LANES = 16  # ChaCha8 blocks generated per refill (SIMD lanes of the block loop)


_PCG_MUL = np.uint64(6364136223846793005)
_PCG_INC = np.uint64(11634580027462260723)
_C0 = np.uint32(0x61707865)
_C1 = np.uint32(0x3320646E)
_C2 = np.uint32(0x79622D32)
_C3 = np.uint32(0x6B206574)


@nb.njit(inline="always", cache=True)
def _rotl(x, r):
    return np.uint32((x << np.uint32(r)) | (x >> np.uint32(32 - r)))


@nb.njit(inline="always", cache=True)
def _pcg32_key(seed, key):
    """``seed_from_u64``: PCG32 expansion of ``seed`` into the 8 key words."""
    state = seed
    for i in range(8):
        state = state * _PCG_MUL + _PCG_INC
        xs = np.uint32(((state >> np.uint64(18)) ^ state) >> np.uint64(27))
        rot = np.uint32(state >> np.uint64(59))
        key[i] = np.uint32((xs >> rot) | (xs << ((np.uint32(32) - rot) & np.uint32(31))))


@nb.njit(inline="always", cache=True)
def _double_round(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    """One ChaCha double round (column round, then diagonal round) on the 16 state words."""
    # columns
    x0 = np.uint32(x0 + x4)
    x12 = _rotl(x12 ^ x0, 16)
    x8 = np.uint32(x8 + x12)
    x4 = _rotl(x4 ^ x8, 12)
    x0 = np.uint32(x0 + x4)
    x12 = _rotl(x12 ^ x0, 8)
    x8 = np.uint32(x8 + x12)
    x4 = _rotl(x4 ^ x8, 7)
    x1 = np.uint32(x1 + x5)
    x13 = _rotl(x13 ^ x1, 16)
    x9 = np.uint32(x9 + x13)
    x5 = _rotl(x5 ^ x9, 12)
    x1 = np.uint32(x1 + x5)
    x13 = _rotl(x13 ^ x1, 8)
    x9 = np.uint32(x9 + x13)
    x5 = _rotl(x5 ^ x9, 7)
    x2 = np.uint32(x2 + x6)
    x14 = _rotl(x14 ^ x2, 16)
    x10 = np.uint32(x10 + x14)
    x6 = _rotl(x6 ^ x10, 12)
    x2 = np.uint32(x2 + x6)
    x14 = _rotl(x14 ^ x2, 8)
    x10 = np.uint32(x10 + x14)
    x6 = _rotl(x6 ^ x10, 7)
    x3 = np.uint32(x3 + x7)
    x15 = _rotl(x15 ^ x3, 16)
    x11 = np.uint32(x11 + x15)
    x7 = _rotl(x7 ^ x11, 12)
    x3 = np.uint32(x3 + x7)
    x15 = _rotl(x15 ^ x3, 8)
    x11 = np.uint32(x11 + x15)
    x7 = _rotl(x7 ^ x11, 7)
    # diagonals
    x0 = np.uint32(x0 + x5)
    x15 = _rotl(x15 ^ x0, 16)
    x10 = np.uint32(x10 + x15)
    x5 = _rotl(x5 ^ x10, 12)
    x0 = np.uint32(x0 + x5)
    x15 = _rotl(x15 ^ x0, 8)
    x10 = np.uint32(x10 + x15)
    x5 = _rotl(x5 ^ x10, 7)
    x1 = np.uint32(x1 + x6)
    x12 = _rotl(x12 ^ x1, 16)
    x11 = np.uint32(x11 + x12)
    x6 = _rotl(x6 ^ x11, 12)
    x1 = np.uint32(x1 + x6)
    x12 = _rotl(x12 ^ x1, 8)
    x11 = np.uint32(x11 + x12)
    x6 = _rotl(x6 ^ x11, 7)
    x2 = np.uint32(x2 + x7)
    x13 = _rotl(x13 ^ x2, 16)
    x8 = np.uint32(x8 + x13)
    x7 = _rotl(x7 ^ x8, 12)
    x2 = np.uint32(x2 + x7)
    x13 = _rotl(x13 ^ x2, 8)
    x8 = np.uint32(x8 + x13)
    x7 = _rotl(x7 ^ x8, 7)
    x3 = np.uint32(x3 + x4)
    x14 = _rotl(x14 ^ x3, 16)
    x9 = np.uint32(x9 + x14)
    x4 = _rotl(x4 ^ x9, 12)
    x3 = np.uint32(x3 + x4)
    x14 = _rotl(x14 ^ x3, 8)
    x9 = np.uint32(x9 + x14)
    x4 = _rotl(x4 ^ x9, 7)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@nb.njit(cache=True)
def _chacha8_blocks(key, block0, nblocks, out):
    """ChaCha8 blocks ``block0 .. block0 + nblocks - 1`` (stream 0) into ``out`` (uint32, word-major:
    word ``w`` of block ``block0 + b`` at ``out[w * LANES + b]``). The one ChaCha8 block function;
    ``nblocks <= LANES``."""
    k0, k1, k2, k3, k4, k5, k6, k7 = key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7]
    for b in range(nblocks):
        ctr = block0 + np.uint64(b)
        c12 = np.uint32(ctr & _M32)
        c13 = np.uint32(ctr >> _U32)
        x0, x1, x2, x3 = _C0, _C1, _C2, _C3
        x4, x5, x6, x7 = k0, k1, k2, k3
        x8, x9, x10, x11 = k4, k5, k6, k7
        x12, x13, x14, x15 = c12, c13, np.uint32(0), np.uint32(0)
        # 4 double rounds, written out: the block loop must be innermost for LLVM to vectorise it
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
        )
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
        )
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
        )
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
        )
        out[0 * LANES + b] = np.uint32(x0 + _C0)
        out[1 * LANES + b] = np.uint32(x1 + _C1)
        out[2 * LANES + b] = np.uint32(x2 + _C2)
        out[3 * LANES + b] = np.uint32(x3 + _C3)
        out[4 * LANES + b] = np.uint32(x4 + k0)
        out[5 * LANES + b] = np.uint32(x5 + k1)
        out[6 * LANES + b] = np.uint32(x6 + k2)
        out[7 * LANES + b] = np.uint32(x7 + k3)
        out[8 * LANES + b] = np.uint32(x8 + k4)
        out[9 * LANES + b] = np.uint32(x9 + k5)
        out[10 * LANES + b] = np.uint32(x10 + k6)
        out[11 * LANES + b] = np.uint32(x11 + k7)
        out[12 * LANES + b] = np.uint32(x12 + c12)
        out[13 * LANES + b] = np.uint32(x13 + c13)
        out[14 * LANES + b] = x14
        out[15 * LANES + b] = x15


@nb.njit(inline="always", cache=True)
def _word(buf, pos):
    """Word ``pos`` (keystream order) of the blocks in ``buf``."""
    return np.uint64(buf[(pos & 15) * LANES + (pos >> 4)])


@nb.njit(inline="always", cache=True)
def _mulhi(v, r):
    """High 64 bits of the 128-bit product ``v * r``."""
    if r <= _M32:
        lo_part = (v & _M32) * r
        return ((v >> _U32) * r + (lo_part >> _U32)) >> _U32
    v0 = v & _M32
    v1 = v >> _U32
    r0 = r & _M32
    r1 = r >> _U32
    t = v1 * r0 + ((v0 * r0) >> _U32)
    w1 = (t & _M32) + v0 * r1
    return v1 * r1 + (t >> _U32) + (w1 >> _U32)


@nb.njit(inline="always", cache=True)
def _draw(buf, d):
    """Draw ``d`` (``next_u64``: words ``2d`` and ``2d + 1``, low first) of the blocks in ``buf``.
    A row's stream is read only by ``next_u64`` from word 0, so a draw never spans two blocks."""
    b = d >> 3
    w = (d & 7) << 1
    return np.uint64(buf[w * LANES + b]) | (np.uint64(buf[(w + 1) * LANES + b]) << _U32)


@nb.njit(inline="always", cache=True)
def _walk(cbuf, cnt, ring_col, count, k, out_row, key, buf, block, nd, d, remaining_hint):
    """Reservoir steps for the candidates at the ring positions ``cbuf[:cnt]`` (ring order).

    The keystream cursor is ``(block, nd, d)``: ``buf`` holds the ``nd`` draws of blocks ending before
    ``block`` and ``d`` is the next one. One loop iteration consumes one ``next_u64`` draw; the
    candidate index advances only when the draw is accepted (no unpredictable branch: a rejection,
    up to half the draws, leaves ``q`` and ``count`` unchanged). Returns ``(count, block, nd, d)``.
    """
    q = 0
    while q < cnt and count < k:
        out_row[count] = ring_col[cbuf[q]]
        count += 1
        q += 1
    uk = np.uint64(k)
    while q < cnt:
        if d == nd:
            nblocks = min(LANES, max(1, (2 * (cnt - q) + remaining_hint) // 8 + 1))
            _chacha8_blocks(key, np.uint64(block), nblocks, buf)
            block += nblocks
            nd = 8 * nblocks
            d = 0
        while d + 1 < nd and q + 1 < cnt:  # the hot loop: two draws per iteration
            # The second draw belongs to candidate q + 1 if the first is accepted, else to q again:
            # both outcomes are evaluated, so the accept/reject chain advances two draws per step.
            v0 = _draw(buf, d)
            v1 = _draw(buf, d + 1)
            d += 2
            rng0 = np.uint64(count) + _U1
            rng1 = rng0 + _U1
            a0 = np.int64(v0 * rng0 <= (rng0 << _ctlz64(rng0)) - _U1)
            a_acc = np.int64(v1 * rng1 <= (rng1 << _ctlz64(rng1)) - _U1)
            a_rej = np.int64(v1 * rng0 <= (rng0 << _ctlz64(rng0)) - _U1)
            a1 = (a0 & a_acc) | ((1 - a0) & a_rej)  # arithmetic select: no branch on a 50/50 outcome
            rng_b = rng0 + np.uint64(a0)
            # hi(v * rng) >= hi32(v) * rng >> 32 (exact in 64 bits for rng < 2^32), so a slot hit
            # (hi < k) needs this cheap bound below k; larger ranges always take the exact test
            big = rng_b > _M32
            maybe0 = a0 & ((((v0 >> _U32) * rng0) >> _U32 < uk) | big)
            maybe1 = a1 & ((((v1 >> _U32) * rng_b) >> _U32 < uk) | big)
            if maybe0 | maybe1:  # rare once count >> k: exact test
                r0 = _mulhi(v0, rng0)
                r1 = _mulhi(v1, rng_b)
                if a0 & (r0 < uk):
                    out_row[r0] = ring_col[cbuf[q]]
                if a1 & (r1 < uk):
                    out_row[r1] = ring_col[cbuf[q + a0]]
            q += a0 + a1
            count += a0 + a1
        while d < nd and q < cnt:  # the tail: one draw per iteration
            v = _draw(buf, d)
            d += 1
            rng = np.uint64(count) + _U1
            zone = (rng << _ctlz64(rng)) - _U1
            acc = v * rng <= zone
            r = _mulhi(v, rng)
            if acc & (r < uk):
                out_row[r] = ring_col[cbuf[q]]
            q += acc
            count += acc
            if d + 1 < nd and q + 1 < cnt:
                break
    return count, block, nd, d


@nb.njit(inline="always", cache=True)
def _scan(p0, step, x, n, ring_start, ring_len, flags, cbuf):
    """Candidates among the ring positions ``[p0, p0 + step)`` (no wrap) → ``cbuf[:cnt]``, in order; return ``cnt``.

    A branch-free, vectorised test of every position into ``flags``, then a compaction pass.
    """
    starts = ring_start[p0 : p0 + step]
    lens = ring_len[p0 : p0 + step]
    for t in range(step):
        diff = x - starts[t]
        diff += (diff >> 63) & n
        flags[t] = np.uint8(diff < lens[t])
    cnt = 0
    for t in range(step):
        cbuf[cnt] = p0 + t
        cnt += flags[t]
    return cnt


@nb.njit(cache=True)
def _crate_rows(phase, off_s, deg, ring_start, ring_len, ring_col, n, k, row0, seed, out, counter):
    """Crate-exact rows in tasks of ``ROWS_PER_TASK`` rows, each claimed from ``counter`` (int64 ``[1]``,
    zero before the first call; :func:`~._numba_prims.claim`) until none is left: alone, every task in
    order; :func:`_crate_rows_par` runs it on every thread at once."""
    rows = phase.shape[0]
    n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    task = _claim(counter, n_tasks)
    if task < 0:  # every task is claimed already (a late prange iteration of _crate_rows_par)
        return
    # scratch for every task this call claims
    cbuf = np.empty(SCAN_CHUNK, dtype=np.int64)
    flags = np.empty(SCAN_CHUNK, dtype=np.uint8)
    buf = np.empty(16 * LANES, dtype=np.uint32)
    key = np.empty(8, dtype=np.uint32)
    for _ in range(n_tasks):
        for i in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            out_row = out[i]
            for q in range(k):
                out_row[q] = -1
            _pcg32_key(seed + np.uint64(row0 + i), key)
            block = 0
            nd = 0
            d = 0
            x = phase[i]
            p = off_s[i]
            left = deg[i]
            count = 0
            while left > 0:
                step = min(left, SCAN_CHUNK, n - p)
                cnt = _scan(p, step, x, n, ring_start, ring_len, flags, cbuf)
                left -= step
                p += step
                if p == n:
                    p = 0
                count, block, nd, d = _walk(
                    cbuf, cnt, ring_col, count, k, out_row, key, buf, block, nd, d, min(left, n) // 4
                )
        task = _claim(counter, n_tasks)
        if task < 0:
            break


@nb.njit(parallel=True, cache=True)
def _crate_rows_par(phase, off_s, deg, ring_start, ring_len, ring_col, n, k, row0, seed, out, counter):
    """:func:`_crate_rows` on every thread at once, each claiming tasks from the shared ``counter`` (a
    thread that starts late or runs slowly takes fewer of them)."""
    for _ in nb.prange((phase.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _crate_rows(phase, off_s, deg, ring_start, ring_len, ring_col, n, k, row0, seed, out, counter)


def crate_rows(
    phase: np.ndarray,
    off_s: np.ndarray,
    deg: np.ndarray,
    ring_start: np.ndarray,
    ring_len: np.ndarray,
    ring_col: np.ndarray,
    *,
    n: int,
    k: int,
    row0: int,
    seed: int,
) -> np.ndarray:
    """Crate-exact rows ``row0 .. row0 + len(phase) - 1`` → int32 ``(rows, k)`` (see ``CpuBackend.crate_rows``)."""
    out = np.empty((phase.shape[0], k), dtype=np.int32)

    def i64(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.int64)

    phase, off_s, deg = i64(phase), i64(off_s), i64(deg)
    ring = (i64(ring_start), i64(ring_len), i64(ring_col))
    scalars = (np.int64(n), np.int64(k))
    # chunks of bounded work (Ctrl-C between them), the process-wide runtime policy for each
    total = int(deg.sum()) + phase.shape[0] * (k + 16)
    for a, b, t in _rt.sized_chunks(phase.shape[0], deg + (k + 16), total=total, task_rows=ROWS_PER_TASK):
        _rt.run(
            _crate_rows_par,
            _crate_rows,
            phase[a:b],
            off_s[a:b],
            deg[a:b],
            *ring,
            *scalars,
            np.int64(row0 + a),
            np.uint64(seed),
            out[a:b],
            np.zeros(1, dtype=np.int64),  # the chunk's task counter
            n_threads=t,
        )
    return out


@nb.njit(cache=True)
def _shuffle_many(values_list_s, values_list_t, seed):
    """The two shuffles of ``phase_router_auto``: ``values_list_s`` then ``values_list_t`` (int64, in place),
    one ``ChaCha8Rng::seed_from_u64(seed)`` continuing from the first into the second."""
    key = np.empty(8, dtype=np.uint32)
    _pcg32_key(seed, key)
    buf = np.empty(16 * LANES, dtype=np.uint32)
    block = np.uint64(0)
    pos = 16 * LANES
    for arr in (values_list_s, values_list_t):
        for i in range(arr.shape[0] - 1, 0, -1):
            ub = np.uint64(i + 1)
            if ub <= _M32:
                zone = ((ub << (_ctlz64(ub) - _U32)) & _M32) - _U1
                while True:
                    if pos == 16 * LANES:
                        _chacha8_blocks(key, block, LANES, buf)
                        block += np.uint64(LANES)
                        pos = 0
                    prod = _word(buf, pos) * ub
                    pos += 1
                    if (prod & _M32) <= zone:
                        j = np.int64(prod >> _U32)
                        break
            else:
                zone = (ub << _ctlz64(ub)) - _U1
                while True:
                    if pos == 16 * LANES:
                        _chacha8_blocks(key, block, LANES, buf)
                        block += np.uint64(LANES)
                        pos = 0
                    low = _word(buf, pos)
                    pos += 1
                    if pos == 16 * LANES:
                        _chacha8_blocks(key, block, LANES, buf)
                        block += np.uint64(LANES)
                        pos = 0
                    v = low | (_word(buf, pos) << _U32)
                    pos += 1
                    if v * ub <= zone:
                        j = np.int64(_mulhi(v, ub))
                        break
            arr[i], arr[j] = arr[j], arr[i]


def auto_permutations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``(n,)`` ``col_perm_s`` and ``col_perm_t`` exactly as the crate's ``phase_router_auto`` draws them."""
    perm_s = np.arange(n, dtype=np.int64)
    perm_t = np.arange(n, dtype=np.int64)
    _shuffle_many(perm_s, perm_t, np.uint64(seed))
    return perm_s, perm_t
