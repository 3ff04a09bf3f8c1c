"""Integer overflow: results stay exact (Python-int arithmetic where int64 would wrap) or a
ValueError names the argument; never a wrong result or a raw OverflowError."""

import numpy as np
import pytest

import gpu_phase_router as gpr
from gpu_phase_router import _reference
from gpu_phase_router._keys import STREAM_SELECT, at, stream
from gpu_phase_router.blocks import route_block, route_counts_block


def test_make_hard_caps_huge_headroom_raises():
    with pytest.raises(ValueError, match="headroom"):
        gpr.make_hard_caps(np.ones(4), 1000, 2, headroom=1e300)
    with pytest.raises(ValueError, match="headroom"):
        gpr.make_hard_caps(np.array([1.0, 1e-300]), 2**40, 2**20, headroom=2.0**10)


def test_make_hard_caps_largest_exact_values():
    # 2^62 slots in total, shared equally: exactly representable, no overflow
    hard = gpr.make_hard_caps(np.ones(2), 2**61, 2, headroom=1.0)
    assert hard.tolist() == [2**61, 2**61]
    assert hard.tolist() == _reference.hard_caps([1.0, 1.0], 2**61, 2, 1.0)


def expected_block_rows(d, c, *, n_src, row0, degree_prefix, k, seed, perm_s, perm_t):
    """SPEC §3–§5 for the rows of one block, in Python integers (no int64 anywhere)."""
    n_tgt = len(c)
    inv_s = [0] * n_tgt
    for col, pos in enumerate(perm_s):
        inv_s[pos] = col
    off_t = [sum(c[:t]) % n_src for t in range(n_tgt)]
    rows = []
    start = degree_prefix
    for i, deg in enumerate(d):
        off_s = start % n_tgt
        cands = [inv_s[(off_s + q) % n_tgt] for q in range(deg)]
        cands = [col for col in cands if _reference.in_ring(perm_t[i], off_t[col], c[col], n_src)]
        row_base = at(stream(seed, STREAM_SELECT), row0 + i)
        ranked = sorted((at(row_base, col), col) for col in cands)[:k]
        rows.append([col for _, col in ranked] + [-1] * (k - len(ranked)))
        start += deg
    return rows


def test_route_counts_block_prefix_sum_past_2_63_is_exact():
    n_src = 3 * 2**61
    c = [n_src - 1, n_src - 2, 2**61 + 5, 7, 0, n_src, 3 * 2**60, 12345]  # sums past 2^63
    assert sum(c) > 2**63
    n_tgt = len(c)
    rng = np.random.default_rng(3)
    d = rng.integers(0, n_tgt + 1, 40)
    perm_s = rng.permutation(n_tgt)
    row0 = n_src - 1000
    perm_t = [int(v) for v in rng.choice(2**62, 40, replace=False)] + []
    perm_t = [v % n_src for v in perm_t]
    kw = {"n_src": n_src, "row0": row0, "degree_prefix": row0 * 3, "k": 3, "seed": 17}
    got = route_counts_block(d, np.array(c, dtype=np.int64), perm_s=perm_s, perm_t=np.array(perm_t), **kw)
    want = expected_block_rows(d.tolist(), c, perm_s=perm_s.tolist(), perm_t=perm_t, **kw)
    np.testing.assert_array_equal(got, np.array(want, dtype=np.int32))


@pytest.mark.parametrize("n_src", [2**63, 2**64, 10**30])
def test_sizes_past_int64_raise_value_error(n_src):
    with pytest.raises(ValueError, match="n_src"):
        route_counts_block([1], [1, 1], n_src=n_src, row0=0, degree_prefix=0, k=1, seed=0)
    with pytest.raises(ValueError, match="n_src"):
        route_block([1.0], [1.0, 1.0], n_src=n_src, row0=0, k=1, seed=0, weight_mean=1.0, degree_prefix=0)
    with pytest.raises(ValueError, match="n_src"):
        gpr.make_hard_caps([1.0, 1.0], n_src, 1)


def test_largest_n_src_routes():
    n_src = 2**63 - 1
    got = route_counts_block([2, 1], [n_src, 2**62], n_src=n_src, row0=n_src - 2, degree_prefix=5, k=2, seed=1)
    assert got.shape == (2, 2) and got.dtype == np.int32


@pytest.mark.parametrize(
    ("n_tgt", "n_src", "dtype"),
    [(300, 2**15 - 1, np.int16), (300, 2**15, np.int32), (2**15 - 1, 500, np.int16), (2**15, 500, np.int32)]
    + [(300, 2**31 - 1, np.int32), (300, 2**31, np.int64)],
)
def test_cpu_ring_dtype_follows_the_sizes(n_tgt, n_src, dtype):
    """The CPU ring's integer width, on which the boundary tests below rely: int16 while n_src and
    n_tgt are below 2^15, int32 below 2^31, else int64; the keys are uint64 at every width."""
    from gpu_phase_router.backends import get_backend
    from gpu_phase_router.methods.phase import ring_layout

    be = get_backend("cpu")
    c = np.full(n_tgt, min(n_src, 7), dtype=np.int64)
    ring = be.prepare_ring(*ring_layout(be, c, n_src, 3, np.arange(n_tgt)), n_src=n_src)
    assert [a.dtype for a in ring] == [dtype, dtype, dtype, np.uint64]


@pytest.mark.parametrize("n_src", [2**15 - 1, 2**15, 2**31 - 1, 2**31])
def test_ring_width_boundary_matches_spec(n_src):
    """The CPU ring is int16 below n_src = 2^15 and int32 below 2^31 (vectorised position test, 16 and
    32 bits a lane) and int64 from there: at each side of both boundaries, phases and interval starts
    next to 0 and n_src - 1, phases at the last position inside and the first outside an interval,
    lengths 0, 1, n_src - 1 and n_src, rows that wrap the target ring and rows shorter than one
    64-position block; k = n_tgt shows every candidate."""
    n_tgt = 300
    rng = np.random.default_rng(11)
    c = rng.integers(0, n_src + 1, n_tgt)
    c[:8] = [0, 1, n_src - 1, n_src, 2, n_src - 2, 0, n_src]
    d = np.concatenate([rng.integers(0, n_tgt + 1, 24), [n_tgt, n_tgt, 1, 63, 64, 65, 129, 0]])
    perm_s = rng.permutation(n_tgt)
    off_t = np.concatenate([[0], np.cumsum(c)[:-1]]) % n_src
    ends = [
        int(off_t[t] + c[t] + delta) % n_src for t in (2, 9, 40, 77) for delta in (-1, 0)
    ]  # last inside, first outside
    edge = list(
        dict.fromkeys([0, 1, n_src - 1, n_src - 2, n_src // 2, int(off_t[9]), int(off_t[9] - 1) % n_src, *ends])
    )
    perm_t = [int(v) for v in rng.integers(0, n_src, d.shape[0] - len(edge))] + edge
    d[-len(edge) :] = n_tgt  # the edge phases see every target
    kw = {"n_src": n_src, "row0": 5, "degree_prefix": 5 * n_tgt - 40, "k": n_tgt, "seed": 2024}  # every candidate shows
    got = route_counts_block(d, c, perm_s=perm_s, perm_t=np.array(perm_t), **kw)
    want = expected_block_rows(d.tolist(), c.tolist(), perm_s=perm_s.tolist(), perm_t=perm_t, **kw)
    np.testing.assert_array_equal(got, np.array(want, dtype=np.int32))


@pytest.mark.parametrize("n_tgt", [2**15 - 1, 2**15])
def test_ring_positions_next_to_the_int16_boundary_match_spec(n_tgt):
    """Target rings of 2^15 - 1 positions (int16 ring, positions up to 32766) and 2^15 (int32): rows
    that run through the ring's last positions and wrap to 0, the last 64-position block partly past
    the end, and full rows; the phases are drawn so that intervals hold them at both ends."""
    n_src = 997
    rng = np.random.default_rng(29)
    c = rng.integers(0, n_src + 1, n_tgt)
    c[-70:] = n_src  # the last positions' columns hold every phase (perm_s below is the identity there)
    perm_s = np.concatenate([rng.permutation(n_tgt - 70), np.arange(n_tgt - 70, n_tgt)])
    d = np.array([30, 64, 65, 1, n_tgt, 200, 3000, 0])
    perm_t = [int(v) for v in rng.integers(0, n_src, d.shape[0])]
    # row 0 covers positions n - 70 .. n - 41, row 1 n - 40 .. n + 23 (wrapping to 0), the rest follow on
    kw = {"n_src": n_src, "row0": 2, "degree_prefix": n_tgt - 70, "k": 6, "seed": 31}
    got = route_counts_block(d, c, perm_s=perm_s, perm_t=np.array(perm_t), **kw)
    want = expected_block_rows(d.tolist(), c.tolist(), perm_s=perm_s.tolist(), perm_t=perm_t, **kw)
    assert all(v >= n_tgt - 70 for v in want[0]) and any(v >= n_tgt - 70 for v in want[1])  # the ring's end is routed
    np.testing.assert_array_equal(got, np.array(want, dtype=np.int32))


@pytest.mark.parametrize("k", [3, 40])
def test_rows_longer_than_one_scan_chunk_match_spec(k):
    """Rows of more ring positions than the CPU kernel keys at once (``SCAN_CHUNK``), wrapping the
    ring inside and across chunks: later chunks are filtered by the bottom-k of the earlier ones
    (a sorted array for k = 3, a max-heap for k = 40)."""
    from gpu_phase_router.backends.cpu import SCAN_CHUNK

    n_src, n_tgt = 50_000, 2 * SCAN_CHUNK + 3000
    rng = np.random.default_rng(5)
    c = rng.integers(0, n_src + 1, n_tgt)
    d = np.array([n_tgt, n_tgt - 1, SCAN_CHUNK, SCAN_CHUNK + 1, 2 * SCAN_CHUNK + 1, 3 * SCAN_CHUNK // 2, 70, 0])
    perm_s = rng.permutation(n_tgt)
    perm_t = [int(v) for v in rng.choice(n_src, d.shape[0], replace=False)]
    kw = {"n_src": n_src, "row0": 9, "degree_prefix": 9 * n_tgt - SCAN_CHUNK // 3, "k": k, "seed": 77}
    got = route_counts_block(d, c, perm_s=perm_s, perm_t=np.array(perm_t), **kw)
    want = expected_block_rows(d.tolist(), c.tolist(), perm_s=perm_s.tolist(), perm_t=perm_t, **kw)
    np.testing.assert_array_equal(got, np.array(want, dtype=np.int32))
