"""The Numba key primitives against the plain-integer SplitMix64 of SPEC §5 (``_keys``)."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest

from gpu_phase_router import _keys
from gpu_phase_router.backends import _numba_prims as prims

EDGE = [0, 1, 2, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, _keys.MASK64 - 1, _keys.MASK64]


@nb.njit
def _unmix_all(z):
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        out[i] = prims.unmix64(z[i])
    return out


@nb.njit
def _index_all(base, key):
    out = np.empty_like(key)
    for i in range(key.shape[0]):
        out[i] = prims.index_of(base[i], key[i])
    return out


def _values(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return EDGE + [int(v) for v in rng.integers(0, 1 << 64, size=n, dtype=np.uint64)]


def test_unmix64_inverts_mix64():
    z = _values(1, 2000)
    mixed = np.array([_keys.mix64(v) for v in z], dtype=np.uint64)
    assert _unmix_all(mixed).tolist() == z


@pytest.mark.parametrize("seed", [2, 3])
def test_index_of_names_the_index_of_a_key(seed):
    bases = _values(seed, 2000)
    idx = _values(seed + 10, 2000)
    keys = np.array([_keys.at(b, i) for b, i in zip(bases, idx, strict=True)], dtype=np.uint64)
    got = _index_all(np.array(bases, dtype=np.uint64), keys)
    assert got.tolist() == idx


@nb.njit
def _double_through_view(a):
    v = prims.borrow(a)
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            v[i, j] *= 2
    return v.shape[0], v.shape[1], v.strides[0], v.strides[1]


def test_borrow_is_a_view_of_the_same_memory():
    base = np.arange(24, dtype=np.int64).reshape(4, 6)
    a = base[::2, 1::2]  # non-contiguous: shape and strides must be kept, not recomputed
    want = base.copy()
    want[::2, 1::2] *= 2
    assert _double_through_view(a) == (2, 3, a.strides[0], a.strides[1])
    np.testing.assert_array_equal(base, want)


@nb.njit
def _fetch_add_at(arr, idx, val):
    return prims.fetch_add(arr, idx, val)


def test_fetch_add_returns_the_old_value_and_adds():
    arr = np.array([5, 7, -3], dtype=np.int64)
    assert _fetch_add_at(arr, 1, 3) == 7
    assert _fetch_add_at(arr, 1, -12) == 10
    assert _fetch_add_at(arr, 2, 1 << 40) == -3
    assert arr.tolist() == [5, -2, (1 << 40) - 3]


@nb.njit(parallel=True)
def _claim_all(n_tasks, spin):
    """Each prange iteration claims tasks until none is left; task t records how often it was claimed
    and does ``spin[t]`` units of busy work (uneven tasks)."""
    claimed = np.zeros(n_tasks, dtype=np.int64)
    work = np.zeros(n_tasks, dtype=np.int64)
    counter = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(n_tasks):
        task = prims.claim(counter, n_tasks)
        while task >= 0:
            claimed[task] += 1
            acc = 0
            for j in range(spin[task]):
                acc += j & 3
            work[task] = acc
            task = prims.claim(counter, n_tasks)
    return claimed, work, counter  # the array: Numba may move a read of counter[0] here ahead of the loop


@pytest.mark.parametrize("threads", [1, 2])
def test_claim_hands_out_every_task_once(threads):
    spin = np.random.default_rng(0).integers(0, 20000, size=97)
    before = nb.get_num_threads()
    nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
    try:
        for _ in range(20):
            claimed, work, counter = _claim_all(97, spin)
            assert claimed.tolist() == [1] * 97
            assert work.tolist() == [sum(j & 3 for j in range(s)) for s in spin.tolist()]
            # one claim per task, and one failed claim per prange iteration (each stops at its first -1)
            assert counter.tolist() == [97 + 97]
    finally:
        nb.set_num_threads(before)
    assert _claim_all(0, spin[:0])[2].tolist() == [0]  # no iteration, no claim


@nb.njit
def _ring_hits_all(ring_start, ring_len, xs, n_src):
    out = np.empty((xs.shape[0], ring_start.shape[0] // 64), dtype=np.uint64)
    for i in range(xs.shape[0]):
        for b in range(out.shape[1]):
            out[i, b] = prims.ring_hits64(ring_start, ring_len, b * 64, xs[i], n_src)
    return out


@pytest.mark.parametrize(
    ("dtype", "n_src"), [(np.int16, 2**15 - 1), (np.int16, 1000), (np.int32, 2**31 - 1), (np.int32, 70)]
)
def test_ring_hits64_is_in_ring_of_spec(dtype, n_src):
    """Bit ``i`` of block ``b`` is SPEC §4's ``(x - start) mod n_src < len`` for position ``64 b + i``, in
    16- and 32-bit lanes up to the largest ``n_src`` each takes: starts and phases at 0 and n_src - 1,
    lengths 0, 1, n_src - 1 and n_src, intervals that wrap the ring."""
    rng = np.random.default_rng(n_src)
    n_pos = 4 * 64
    start = rng.integers(0, n_src, n_pos)
    length = rng.integers(0, n_src + 1, n_pos)
    start[:8] = [0, n_src - 1, n_src - 1, 0, n_src // 2, n_src - 1, 1, 0]
    length[:8] = [n_src, n_src, 1, 0, n_src - 1, 2, n_src - 1, 1]
    xs = np.concatenate([[0, 1, n_src - 1, n_src - 2, n_src // 2], rng.integers(0, n_src, 40)]).astype(np.int64)
    got = _ring_hits_all(start.astype(dtype), length.astype(dtype), xs, n_src)
    for i, x in enumerate(xs.tolist()):
        for b in range(n_pos // 64):
            want = sum(1 << j for j in range(64) if (x - int(start[64 * b + j])) % n_src < int(length[64 * b + j]))
            assert int(got[i, b]) == want, (x, b)
