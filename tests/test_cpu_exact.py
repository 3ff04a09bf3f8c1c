"""CPU backend == reference, exactly, on a product grid and on Hypothesis-generated cases."""

import itertools

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpu_phase_router as gpr
from gpu_phase_router import _reference

SHAPES = [(1, 1), (1, 5), (5, 1), (17, 17), (64, 64), (65, 130), (200, 37), (37, 200), (257, 257)]
DEGREES = ["random", "zero", "full", "mixed"]
COUNTS = ["random", "saturated", "mixed"]
SEEDS = [0, 2**64 - 1, 2**64 - 2, 0x1234_5678_9ABC_DEF0]


def make_counts(rng, pattern, length, limit):
    if pattern == "random":
        return rng.integers(0, limit + 1, length)
    if pattern == "zero":
        return np.zeros(length, dtype=np.int64)
    if pattern == "full":
        return np.full(length, limit, dtype=np.int64)
    if pattern == "saturated":  # capacity counts >= n_src cover the whole ring
        return np.full(length, limit, dtype=np.int64)
    return rng.choice(np.array([0, 1, limit, limit // 2], dtype=np.int64), length)


def ks_for(n_tgt):
    return sorted({1, min(2, n_tgt), max(1, n_tgt // 3), n_tgt})


@pytest.mark.parametrize("shape, degrees, counts", list(itertools.product(SHAPES, DEGREES, COUNTS)))
def test_grid_counts(shape, degrees, counts):
    n_src, n_tgt = shape
    rng = np.random.default_rng(n_src * 7919 + n_tgt * 31 + DEGREES.index(degrees) * 5 + COUNTS.index(counts))
    d = make_counts(rng, degrees, n_src, n_tgt)
    c = make_counts(rng, counts, n_tgt, n_src)
    for k, seed, given_perms in itertools.product(ks_for(n_tgt), SEEDS[:2], [False, True]):
        ps = rng.permutation(n_tgt) if given_perms else None
        pt = rng.permutation(n_src).astype(np.int32) if given_perms else None
        want = _reference.route_counts(d.tolist(), c.tolist(), k, seed, perm_s=ps, perm_t=pt)
        got = gpr.route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt)
        assert got.dtype == np.int32 and got.shape == (n_src, k)
        np.testing.assert_array_equal(got, want, err_msg=f"k={k} seed={seed} perms={given_perms}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_grid_weights(shape, seed):
    n_src, n_tgt = shape
    rng = np.random.default_rng(seed % 1000 + n_src)
    w = rng.choice([0.0, 0.5, 1.0, 3.0, 10.0], n_src)
    w[0] = 1.0
    caps = rng.choice([0.0, 1.0, 2.0, 8.0], n_tgt)
    caps[-1] = 8.0
    for k, density in itertools.product(sorted({1, n_tgt}), [0.05, 0.3, 1.0]):
        want = _reference.route(caps.tolist(), w.tolist(), k=k, seed=seed, density=density)
        got = gpr.route(w, caps, k=k, seed=seed, density=density)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", ["random", "left"])
def test_grid_bits(shape, pattern):
    """Bit-packed input (random or left-aligned rows) gives the count-form result."""
    n_src, n_tgt = shape
    rng = np.random.default_rng(n_src + 3 * n_tgt)
    if pattern == "random":
        s_dense = rng.random((n_src, n_tgt)) < rng.random((n_src, 1))
        t_dense = rng.random((n_tgt, n_src)) < rng.random((n_tgt, 1))
        s_bits, t_bits = gpr.pack_bits(s_dense), gpr.pack_bits(t_dense)
        d, c = s_dense.sum(1), t_dense.sum(1)
    else:
        d = rng.integers(0, n_tgt + 1, n_src)
        c = rng.integers(0, n_src + 1, n_tgt)
        s_bits, t_bits = gpr.left_aligned_bits(d, n_tgt), gpr.left_aligned_bits(c, n_src)
    for k in ks_for(n_tgt):
        want = _reference.route_counts(d.tolist(), c.tolist(), k, 42)
        got = gpr.route_bits(s_bits, t_bits, n_src=n_src, n_tgt=n_tgt, k=k, seed=42)
        np.testing.assert_array_equal(got, want)
        if n_src == n_tgt:
            np.testing.assert_array_equal(gpr.phase_router_auto(s_bits.ravel(), t_bits.ravel(), n_src, k, 42), want)


@given(
    n_src=st.integers(1, 80),
    n_tgt=st.integers(1, 80),
    data=st.data(),
    seed=st.integers(0, 2**64 - 1),
    rows_per_call=st.integers(1, 100),
)
def test_hypothesis_counts(n_src, n_tgt, data, seed, rows_per_call):
    d = data.draw(st.lists(st.integers(0, n_tgt), min_size=n_src, max_size=n_src))
    c = data.draw(st.lists(st.integers(0, n_src), min_size=n_tgt, max_size=n_tgt))
    k = data.draw(st.integers(1, n_tgt))
    given_perms = data.draw(st.booleans())
    ps = data.draw(st.permutations(range(n_tgt))) if given_perms else None
    pt = data.draw(st.permutations(range(n_src))) if given_perms else None
    want = _reference.route_counts(d, c, k, seed, perm_s=ps, perm_t=pt)
    got = gpr.route_counts(
        np.array(d),
        np.array(c),
        k=k,
        seed=seed,
        perm_s=None if ps is None else np.array(ps),
        perm_t=None if pt is None else np.array(pt),
        rows_per_call=rows_per_call,
    )
    np.testing.assert_array_equal(got, want)


@given(
    n_src=st.integers(1, 60),
    caps=st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0, 7.5, 100.0]), min_size=1, max_size=40).filter(any),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**64 - 1),
)
def test_hypothesis_systematic(n_src, caps, k, seed):
    k = min(k, len(caps))
    want = _reference.route_systematic(caps, n_src, k, seed)
    got = gpr.route(np.ones(n_src), np.array(caps), k=k, seed=seed, method="systematic", rows_per_call=7)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 63, 64, 65, 1000, 4097])
def test_feistel_backend_matches_reference(n):
    from gpu_phase_router import _keys

    be = gpr.get_backend("cpu")
    for stream in (1, 2):
        key = _keys.stream(9, stream)
        fwd = be.feistel(0, n, n, key)
        assert fwd.tolist() == [_keys.feistel(x, n, key) for x in range(n)]
        inv = be.feistel(0, n, n, key, inverse=True)
        np.testing.assert_array_equal(inv[fwd], np.arange(n))


def test_thread_count_does_not_change_output():
    rng = np.random.default_rng(3)
    n_src, n_tgt = 3000, 700
    d = rng.integers(0, n_tgt + 1, n_src)
    c = rng.integers(0, n_src + 1, n_tgt)
    caps = rng.random(n_tgt)
    before = numba.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            outs.append(gpr.route_counts(d, c, k=40, seed=5))  # k > 32 uses the heap path
            outs.append(gpr.route_counts(d, c, k=4, seed=5))
            outs.append(gpr.route(np.ones(n_src), caps, k=3, seed=1, method="systematic"))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(outs[:3], outs[3:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_large_rows_match_reference_on_sampled_rows():
    """A size where rows span several scan chunks and both bottom-k paths; check sampled rows."""
    n = 3000
    d = np.full(n, 900)
    c = np.random.default_rng(0).integers(0, n + 1, n)
    for k in (8, 64):
        got = gpr.route_counts(d, c, k=k, seed=77)
        sets = _reference.candidate_sets(d.tolist(), c.tolist(), *_reference.derived_permutations(n, n, 77))
        for j in range(0, n, 97):
            assert got[j].tolist() == _reference.select(sets[j], j, k, 77)


def _np_mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@pytest.mark.parametrize(("n_src", "n_tgt", "ks"), [(60000, 13, (1, 5, 13)), (20000, 200, (1, 3, 8))])
def test_full_candidate_rows_against_vectorised_keys(n_src, n_tgt, ks):
    """Every column is a candidate (full rows, saturated counts), so row j holds the k smallest
    (key, col) over all columns. Many rows also exercise the CPU kernel's raised bound: its
    provisional key bound for a row's ``cnt`` candidates, ``KEY_MAX // cnt * (k + 4)``, admits
    fewer than k keys there (with 200 candidates the bound is raised fourfold at least once
    before it saturates; with 13 it saturates at once)."""
    from gpu_phase_router import _keys

    seed = 2024
    g = np.uint64(_keys.GOLDEN)
    with np.errstate(over="ignore"):
        row_base = _np_mix64(np.uint64(_keys.stream(seed, 3)) + g * (np.arange(n_src, dtype=np.uint64) + np.uint64(1)))
        keys = _np_mix64(row_base[:, None] + g * (np.arange(n_tgt, dtype=np.uint64)[None, :] + np.uint64(1)))
    order = np.argsort(keys, axis=1, kind="stable")  # keys are distinct within a row here
    assert (np.diff(np.sort(keys, axis=1), axis=1) > 0).all()
    d = np.full(n_src, n_tgt)
    c = np.full(n_tgt, n_src)
    for k in ks:
        np.testing.assert_array_equal(gpr.route_counts(d, c, k=k, seed=seed), order[:, :k])
        if n_tgt > 2 * (k + 4):  # the kernel's first chunk takes a provisional bound
            tau = np.uint64((2**64 - 1) // n_tgt * (k + 4))
            assert ((keys <= tau).sum(axis=1) < k).sum() > 0  # rows where it admits fewer than k keys


@pytest.mark.parametrize("path", ["scan", "sweep"])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_row_paths_equal_reference(path, shape, monkeypatch):
    """The square rows kernel finds a row's candidates either by testing each position of its window
    or, for long windows, from a sweep over the rows in phase order (``cpu._sweeps`` chooses). Each way
    forced, on every degree/count pattern (empty and saturated intervals, windows wrapping the ring),
    with given and derived permutations and with calls split into several kernel calls."""
    from gpu_phase_router.backends import cpu

    plans = []
    plan = cpu._sweep_plan
    monkeypatch.setattr(cpu, "_sweeps", lambda *args: path == "sweep")
    monkeypatch.setattr(cpu, "_sweep_plan", lambda *args: plans.append(1) or plan(*args))
    n_src, n_tgt = shape
    for degrees, counts in itertools.product(DEGREES, COUNTS):
        rng = np.random.default_rng(n_src * 7919 + n_tgt * 31 + DEGREES.index(degrees) * 5 + COUNTS.index(counts))
        d = make_counts(rng, degrees, n_src, n_tgt)
        c = make_counts(rng, counts, n_tgt, n_src)
        for k, seed, given_perms in itertools.product(ks_for(n_tgt), SEEDS[:2], [False, True]):
            ps = rng.permutation(n_tgt) if given_perms else None
            pt = rng.permutation(n_src) if given_perms else None
            want = _reference.route_counts(d.tolist(), c.tolist(), k, seed, perm_s=ps, perm_t=pt)
            for rows_per_call in (None, 7):
                got = gpr.route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt, rows_per_call=rows_per_call)
                np.testing.assert_array_equal(
                    got, want, err_msg=f"{degrees}/{counts} k={k} seed={seed} perms={given_perms} {rows_per_call}"
                )
    assert bool(plans) == (path == "sweep")


def test_sweep_on_an_int32_ring_equals_reference(monkeypatch):
    """A sweep over a ring of more than 2^15 sources (int32 ring arrays), rows sampled."""
    from gpu_phase_router.backends import cpu

    monkeypatch.setattr(cpu, "_sweeps", lambda *args: True)
    n_src, n_tgt, seed = (1 << 15) + 5, 50, 9
    rng = np.random.default_rng(5)
    d = rng.integers(0, n_tgt + 1, n_src)
    c = rng.choice(np.array([0, 1, n_src // 3, n_src - 1, n_src]), n_tgt)
    ps, pt = _reference.derived_permutations(n_src, n_tgt, seed)
    got = gpr.route_counts(d, c, k=3, seed=seed)
    rows = range(0, n_src, 331)
    sets = _reference.candidate_sets(d.tolist(), c.tolist(), ps, pt, rows=rows)
    for j in rows:
        assert got[j].tolist() == _reference.select(sets[j], j, 3, seed)


def test_dense_spec_mode_rows_are_swept():
    """The SPEC-mode workload of ``benchmarks/bench_cpu.py`` (N = 4096, degree 0.3 N) takes the sweep,
    ``route(n=1024)`` (degree 307) the scan, and both give the reference's rows (sampled)."""
    from gpu_phase_router.backends import cpu

    work = lambda n, deg: n * (deg + 2 + 16)  # noqa: E731  (the backend's units, k = 2)
    assert cpu._sweeps(4096, work(4096, 1229), 4096, 4096)
    assert not cpu._sweeps(1024, work(1024, 307), 1024, 1024)
    assert not cpu._sweeps(4096, work(4096, 1229), 4096, cpu.SWEEP_MAX_TGT + 1)
    assert not cpu._sweeps(4096, work(4096, 1229), 10**6, 4096)  # a block of a larger result: O(rows + n_tgt)
    n, seed = 4096, 42
    d = np.full(n, 1229)
    got = gpr.route_counts(d, d, k=2, seed=seed)
    ps, pt = _reference.derived_permutations(n, n, seed)
    rows = range(0, n, 257)
    sets = _reference.candidate_sets(d.tolist(), d.tolist(), ps, pt, rows=rows)
    for j in rows:
        assert got[j].tolist() == _reference.select(sets[j], j, 2, seed)


@pytest.mark.parametrize("n_src", [1, 2, 7, 64, 300])
def test_ring_events_step_the_holding_sets_from_x_to_x_plus_one(n_src):
    """SPEC §4 read along the ring: the positions holding ``x`` are those holding ``x - 1`` with the
    positions listed for ``x`` by ``cpu._ring_events`` toggled, for every ``x``; intervals empty,
    saturated (``len >= n_src``), wrapping past ``n_src`` and not."""
    from gpu_phase_router.backends import cpu

    rng = np.random.default_rng(n_src)
    n_tgt = 40
    start = rng.integers(0, n_src, n_tgt)
    length = rng.choice(np.array([0, 1, max(0, n_src - 1), n_src, n_src + 3, n_src // 2]), n_tgt)
    length[:5] = rng.integers(0, n_src + 1, 5)
    ev_off = np.empty(n_src + 1, dtype=np.int64)
    ev_pos = np.empty(2 * n_tgt, dtype=np.int64)
    n_events = cpu._ring_events(start, length, np.int64(n_src), ev_off, ev_pos)
    holding = lambda x: {p for p in range(n_tgt) if _reference.in_ring(x, int(start[p]), int(length[p]), n_src)}  # noqa: E731
    assert ev_off[0] == 0 and n_events == ev_off[n_src] == 2 * int(((length > 0) & (length < n_src)).sum())
    held = holding(0)
    for x in range(n_src):
        toggled = ev_pos[ev_off[x] : ev_off[x + 1]].tolist()
        assert len(set(toggled)) == len(toggled)
        if x > 0:
            held ^= set(toggled)
            assert held == holding(x), x
        else:  # x = 0 is reached from x = n_src - 1 round the ring
            assert holding(n_src - 1) ^ set(toggled) == holding(0)


def test_sweep_plan_orders_rows_by_phase():
    from gpu_phase_router.backends import cpu

    rng = np.random.default_rng(3)
    dense = rng.permutation(1000)[:900]  # the scatter
    sparse = rng.permutation(10**6)[:50]  # the sort
    for phase, n_src in ((dense, 1000), (sparse, 10**6), (np.array([], dtype=np.int64), 10)):
        order = cpu._sweep_plan(phase, n_src)
        assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(phase.shape[0]))
        assert (np.diff(phase[order]) > 0).all()
