"""CUDA backend == CPU backend == reference, exactly.

Every test runs twice: on ``"cuda-emulated"`` (the CUDA backend's host code on NumPy, with the exact
``phase_router.cu`` executed by the CPU SIMT emulator in tests/simt) and on the real ``"cuda"``
backend, which is skipped with a visible reason where CuPy or a GPU is missing.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from _grid import CUDA_KINDS, EMULATED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simt import build, emulated_backend
from test_spec_vectors import CAPS, ROUTE_DENSITY_03, ROUTE_DENSITY_1, SYSTEMATIC, SYSTEMATIC_BOUNDARY

from gpu_phase_router import _prep, _reference, api, get_backend, register_backend, route, route_bits, route_counts
from gpu_phase_router._keys import STREAM_PERM_S, STREAM_PERM_T, feistel, feistel_inverse, stream
from gpu_phase_router.backends.cuda import CudaBackend, phase_shape, phase_width
from gpu_phase_router.methods import RowRange, phase, systematic

TOP = (1 << 64) - 1
SEEDS = [0, 42, TOP, TOP - (1 << 32) + 5]
# Launch shapes (warps per row, rows per block, max register width) beyond the default heuristic.
CONFIGS = [
    dict(warps_per_row=1, rows_per_cta=1),
    dict(warps_per_row=1, rows_per_cta=8),
    dict(warps_per_row=2, rows_per_cta=2),
    dict(warps_per_row=4, rows_per_cta=1),
    dict(warps_per_row=8, rows_per_cta=1),
    dict(warps_per_row=1, rows_per_cta=4, max_width=2),
    dict(warps_per_row=8, rows_per_cta=1, max_width=1),
    dict(warps_per_row=2, rows_per_cta=4, max_width=4),
]


# -- backends ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu")


def _emulator_or_skip() -> None:
    try:
        emulated_backend.library()
    except build.CompilerMissing as exc:
        pytest.skip(str(exc))


def _cuda_or_skip():
    try:
        return get_backend("cuda")
    except ValueError as exc:
        pytest.skip(f"real GPU run skipped: {exc}")


@pytest.fixture(params=CUDA_KINDS)
def kind(request) -> str:
    """Backend name for the public API, registering the emulated backend on first use."""
    if request.param == EMULATED:
        _emulator_or_skip()
        register_backend(EMULATED, "simt.emulated_backend")
    else:
        _cuda_or_skip()
    return request.param


def make_backend(kind: str, schedule: int = 0, seed: int = 0, **options) -> CudaBackend:
    """A CUDA backend with launch-shape ``options``: emulated, or on the real GPU."""
    if kind == EMULATED:
        return emulated_backend.make_backend(schedule=schedule, seed=seed, **options)
    real = _cuda_or_skip()
    return CudaBackend(real.xp, real._launch, **options)


def host(x) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


def run_phase(
    be, d, c, k, seed, perm_s=None, perm_t=None, rows_per_call=1 << 18, col_map=None, k_out=None
) -> np.ndarray:
    """All rows of the phase router on backend object ``be`` (the shared call loop and preparation);
    with ``col_map`` the in-kernel column map and first-``k_out``-distinct step (SPEC §13)."""
    xp = be.xp

    def to(a):
        return None if a is None else xp.asarray(np.asarray(a, dtype=np.int64))

    return host(
        phase.phase_rows(
            be,
            np.asarray(c, dtype=np.int64),
            RowRange(None, len(d), 0, len(d), k_out or k, seed, rows_per_call=rows_per_call),
            k=k,
            d=to(d),
            perm_s=to(perm_s),
            perm_t=to(perm_t),
            col_map=None if col_map is None else np.asarray(col_map),
        )
    )


# -- inputs ------------------------------------------------------------------------------------


def make_counts(n_src: int, n_tgt: int, pattern: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Degrees and capacity counts with zero rows, full rows (d = n_tgt) and full targets (c = n_src)."""
    if pattern == "full":
        return np.full(n_src, n_tgt), np.full(n_tgt, n_src)
    if pattern == "sparse":
        d = rng.integers(0, max(1, n_tgt // 8) + 1, n_src)
        c = rng.integers(0, max(1, n_src // 8) + 1, n_tgt)
        return d, c
    d = rng.integers(0, n_tgt + 1, n_src)
    c = rng.integers(0, n_src + 1, n_tgt)
    d[rng.random(n_src) < 0.15] = 0
    d[rng.random(n_src) < 0.15] = n_tgt
    c[rng.random(n_tgt) < 0.15] = 0
    c[rng.random(n_tgt) < 0.15] = n_src
    if n_src > 1:
        d[0], d[-1] = 0, n_tgt
    return d, c


def ks_for(n_tgt: int) -> list[int]:
    """k values that hit every register width, the multi-pass path and k = n_tgt."""
    return sorted({k for k in (1, 2, 3, 8, 9, 16, 17, 40, n_tgt // 2, n_tgt) if 1 <= k <= n_tgt})


SHAPES = [(1, 1), (1, 5), (6, 1), (2, 3), (7, 7), (31, 33), (64, 64), (100, 37), (37, 100), (129, 65), (200, 200)]
PATTERNS = ["mixed", "full", "sparse"]
GRID = [(ns, nt, k, pat) for (ns, nt), pat in itertools.product(SHAPES, PATTERNS) for k in ks_for(nt)]


def _case_rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# -- phase router ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_src,n_tgt,k,pattern", GRID)
def test_phase_grid(kind, cpu, n_src, n_tgt, k, pattern):
    rng = _case_rng(n_src, n_tgt, k, pattern)
    d, c = make_counts(n_src, n_tgt, pattern, rng)
    seed = SEEDS[(n_src + k) % len(SEEDS)]
    given_perms = (n_src * 7 + k) % 2 == 1
    ps = rng.permutation(n_tgt) if given_perms else None
    pt = rng.permutation(n_src) if given_perms else None
    want = _reference.route_counts(d.tolist(), c.tolist(), k, seed, perm_s=ps, perm_t=pt)
    got_cpu = route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt, backend="cpu")
    got = route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt, backend=kind)
    assert np.array_equal(got_cpu, want)
    assert got.dtype == np.int32 and got.shape == (n_src, k)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("perms", ["derived", "given"])
def test_phase_seeds_and_permutations(kind, seed, perms):
    rng = np.random.default_rng(seed % 1000)
    n_src, n_tgt, k = 90, 70, 6
    d, c = make_counts(n_src, n_tgt, "mixed", rng)
    ps = rng.permutation(n_tgt) if perms == "given" else None
    pt = rng.permutation(n_src) if perms == "given" else None
    want = _reference.route_counts(d.tolist(), c.tolist(), k, seed, perm_s=ps, perm_t=pt)
    assert np.array_equal(route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt, backend=kind), want)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize(
    "n_src,n_tgt,k,pattern",
    [
        (1, 1, 1, "full"),
        (9, 200, 1, "mixed"),
        (9, 200, 5, "full"),
        (40, 200, 16, "mixed"),
        (40, 200, 17, "full"),
        (33, 150, 150, "full"),
        (70, 120, 33, "mixed"),
        (50, 64, 8, "sparse"),
        (13, 300, 300, "mixed"),
    ],
)
def test_phase_launch_shapes(kind, cpu, config, n_src, n_tgt, k, pattern):
    """Multi-warp rows (shared-memory merge), several rows per block (inactive rows in the last
    block) and small register widths (many threshold passes) all give the same rows."""
    be = make_backend(kind, **config)
    rng = _case_rng(n_src, n_tgt, k, pattern, "shapes")
    d, c = make_counts(n_src, n_tgt, pattern, rng)
    seed = 12345
    want = route_counts(d, c, k=k, seed=seed, backend="cpu")
    assert np.array_equal(run_phase(be, d, c, k, seed), want)


@pytest.mark.parametrize("schedule,sched_seed", [(1, 0), (2, 11), (2, 12)])
@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[4], CONFIGS[7]], ids=["w2r2", "w8", "w2r4k4"])
def test_phase_thread_schedules(cpu, config, schedule, sched_seed):
    """Descending and random thread orders in the emulator: a missing barrier would change rows."""
    _emulator_or_skip()
    be = make_backend(EMULATED, schedule=schedule, seed=sched_seed, **config)
    rng = np.random.default_rng(sched_seed + 5)
    for n_src, n_tgt, k in [(24, 120, 7), (16, 90, 30)]:
        d, c = make_counts(n_src, n_tgt, "mixed", rng)
        want = route_counts(d, c, k=k, seed=sched_seed, backend="cpu")
        assert np.array_equal(run_phase(be, d, c, k, sched_seed), want)


@pytest.mark.parametrize("rows_per_call", [1, 3, 7, 64])
@pytest.mark.parametrize("perms", ["derived", "given"])
def test_phase_blocks_of_rows(kind, rows_per_call, perms):
    """Blocks with row0 > 0 and degree_prefix > 0, through the api's block loop."""
    rng = np.random.default_rng(rows_per_call)
    n_src, n_tgt, k = 61, 47, 5
    d, c = make_counts(n_src, n_tgt, "mixed", rng)
    seed = TOP - 3
    ps = rng.permutation(n_tgt) if perms == "given" else None
    pt = rng.permutation(n_src) if perms == "given" else None
    want = _reference.route_counts(d.tolist(), c.tolist(), k, seed, perm_s=ps, perm_t=pt)
    got = route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt, backend=kind, rows_per_call=rows_per_call)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("row0", [1, 17, 40])
def test_phase_block_direct(kind, cpu, row0):
    """phase.phase_block on one block (as a distributed worker would call it) == that block of the full route."""
    be = make_backend(kind)
    rng = np.random.default_rng(row0)
    n_src, n_tgt, k = 55, 80, 9
    d, c = make_counts(n_src, n_tgt, "mixed", rng)
    seed = 99
    full = _reference.route_counts(d.tolist(), c.tolist(), k, seed)
    rows = min(13, n_src - row0)
    xp = be.xp
    ring = be.prepare_ring(*phase.ring_layout(be, xp.asarray(c), n_src, seed), n_src=n_src)
    got = phase.phase_block(
        be,
        xp.asarray(d[row0 : row0 + rows]),
        ring,
        n_src=n_src,
        k=k,
        seed=seed,
        row0=row0,
        degree_prefix=int(d[:row0].sum()),
    )
    assert np.array_equal(host(got), full[row0 : row0 + rows])
    ring_cpu = cpu.prepare_ring(*phase.ring_layout(cpu, c, n_src, seed), n_src=n_src)
    got_cpu = phase.phase_block(
        cpu, d[row0 : row0 + rows], ring_cpu, n_src=n_src, k=k, seed=seed, row0=row0, degree_prefix=int(d[:row0].sum())
    )
    assert np.array_equal(got_cpu, full[row0 : row0 + rows])


def test_phase_default_multiwarp_heuristic(kind):
    """Few rows on a long ring take several warps per row with the default launch shape."""
    assert phase_shape(16384, 256) == (1, 4) and phase_shape(16384, 16384) == (2, 2)
    assert phase_shape(65536, 65536) == (8, 1) and phase_shape(12, 2100) == (4, 1) and phase_shape(12, 300) == (1, 4)
    rng = np.random.default_rng(8)
    n_src, n_tgt, k = 12, 2100, 12
    d, c = make_counts(n_src, n_tgt, "mixed", rng)
    want = _reference.route_counts(d.tolist(), c.tolist(), k, 5)
    assert np.array_equal(route_counts(d, c, k=k, seed=5, backend=kind), want)


def test_phase_kernel_choice():
    assert [phase_width(k) for k in (1, 2, 3, 5, 8, 9, 16, 17, 1000)] == [1, 2, 4, 8, 8, 16, 16, 16, 16]
    assert phase_width(7, max_width=2) == 2


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_phase_hypothesis(data):
    _emulator_or_skip()
    n_src = data.draw(st.integers(1, 70), label="n_src")
    n_tgt = data.draw(st.integers(1, 70), label="n_tgt")
    k = data.draw(st.integers(1, n_tgt), label="k")
    d = data.draw(st.lists(st.integers(0, n_tgt), min_size=n_src, max_size=n_src), label="d")
    c = data.draw(st.lists(st.integers(0, n_src), min_size=n_tgt, max_size=n_tgt), label="c")
    seed = data.draw(st.integers(0, TOP), label="seed")
    perms = data.draw(st.booleans(), label="given_perms")
    ps = data.draw(st.permutations(range(n_tgt))) if perms else None
    pt = data.draw(st.permutations(range(n_src))) if perms else None
    config = data.draw(st.sampled_from([{}, *CONFIGS]), label="config")
    rows_per_call = data.draw(st.integers(1, n_src), label="rows_per_call")
    want = _reference.route_counts(d, c, k, seed, perm_s=ps, perm_t=pt)
    be = make_backend(EMULATED, **config)
    assert np.array_equal(run_phase(be, d, c, k, seed, ps, pt, rows_per_call=rows_per_call), want)
    assert np.array_equal(route_counts(d, c, k=k, seed=seed, perm_s=ps, perm_t=pt, backend="cpu"), want)


def test_spec_vectors(kind):
    """SPEC §10's route vectors (kept once, in test_spec_vectors.py) on the CUDA kernels."""
    assert route(target_capacities=CAPS, k=4, seed=42, density=1.0, backend=kind).tolist() == ROUTE_DENSITY_1
    assert route(target_capacities=CAPS, k=4, seed=42, density=0.3, backend=kind).tolist() == ROUTE_DENSITY_03
    got = route(
        source_weights=[1] * 6, target_capacities=[1, 0, 3, 0.5, 10], k=3, seed=1, method="systematic", backend=kind
    )
    assert got.tolist() == SYSTEMATIC
    got = route(source_weights=[1] * 3, target_capacities=[1, 2], k=1, seed=4, method="systematic", backend=kind)
    assert got.tolist() == SYSTEMATIC_BOUNDARY


@pytest.mark.parametrize("n_src,n_tgt,density", [(50, 40, 0.3), (120, 8, 1.0), (8, 120, 0.05)])
def test_route_weights(kind, n_src, n_tgt, density):
    rng = np.random.default_rng(n_src)
    w = rng.random(n_src) * 3
    w[::7] = 0
    caps = rng.random(n_tgt) * 10
    caps[1::5] = 0
    k = min(4, n_tgt)
    want = _reference.route(caps.tolist(), w.tolist(), k=k, seed=7, density=density)
    got = route(w, caps, k=k, seed=7, density=density, backend=kind)
    assert np.array_equal(got, want)
    assert np.array_equal(route(w, caps, k=k, seed=7, density=density, backend="cpu"), want)


# -- bit-packed input and popcounts --------------------------------------------------------------


def random_bits(rows: int, nbits: int, rng: np.random.Generator) -> np.ndarray:
    dense = rng.random((rows, nbits)) < rng.random((rows, 1))
    return api.pack_bits(dense)


@pytest.mark.parametrize("nbits", [1, 2, 63, 64, 65, 127, 128, 200, 3000])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_popcount_rows(kind, cpu, rows, nbits):
    rng = np.random.default_rng(rows * 1000 + nbits)
    words = random_bits(rows, nbits, rng)
    be = make_backend(kind)
    counts, bad = be.popcount_rows(be.xp.asarray(words), nbits)
    want = np.array([sum(bin(int(w)).count("1") for w in row) for row in words])
    assert bad == 0 and np.array_equal(host(counts), want)
    want_cpu, bad_cpu = cpu.popcount_rows(words, nbits)
    assert bad_cpu == 0 and np.array_equal(want_cpu, want)
    if nbits % 64:
        dirty = words.copy()
        dirty[rows // 2, -1] |= np.uint64(1) << np.uint64(63)
        dirty[0, -1] |= np.uint64(1) << np.uint64(nbits % 64)
        _, bad = be.popcount_rows(be.xp.asarray(dirty), nbits)
        assert bad == cpu.popcount_rows(dirty, nbits)[1] == len({0, rows // 2})
        with pytest.raises(ValueError, match="padding"):
            api.popcount_rows(dirty, nbits, backend=kind)


def test_popcount_rows_past_int32(kind):
    """A row with 2^31 set bits (2^25 full words, 256 MiB) counts 2^31: the sum over the warp's
    lanes must not wrap in 32 bits."""
    be = make_backend(kind)
    nbw = 1 << 25
    words = be.xp.full((1, nbw), np.uint64((1 << 64) - 1), dtype=be.xp.uint64)
    counts, bad = be.popcount_rows(words, 64 * nbw)
    assert bad == 0 and host(counts).tolist() == [64 * nbw]


def test_empty_ring_and_rows(kind):
    """An empty ring packs to empty arrays and zero rows write nothing: no launch of an empty grid
    (a CUDA error), as on the CPU backend."""
    be = make_backend(kind)
    xp = be.xp
    none = xp.zeros(0, dtype=xp.int64)
    ring_sl, ring_col32 = be.pack_ring(none, none, none)
    assert host(ring_sl).shape == (0, 2) and host(ring_col32).shape == (0,)
    ring = be.pack_ring(xp.zeros(3, dtype=xp.int64), xp.ones(3, dtype=xp.int64), xp.arange(3, dtype=xp.int64))
    out = xp.zeros((0, 2), dtype=xp.int32)
    be.launch_phase(none, none, none, *ring, out, n_src=3, k=2, row0=0, select_key=1)
    assert host(out).shape == (0, 2)


def test_popcount_rows_empty(kind):
    be = make_backend(kind)
    counts, bad = be.popcount_rows(be.xp.zeros((0, 2), dtype=be.xp.uint64), 100)
    assert host(counts).shape == (0,) and bad == 0


@pytest.mark.parametrize("n_src,n_tgt,k", [(1, 1, 1), (20, 20, 4), (40, 130, 9), (130, 40, 40)])
def test_route_bits(kind, n_src, n_tgt, k):
    rng = np.random.default_rng(n_src + n_tgt)
    s_bits = random_bits(n_src, n_tgt, rng)
    t_bits = random_bits(n_tgt, n_src, rng)
    want = route_bits(s_bits, t_bits, n_src=n_src, n_tgt=n_tgt, k=k, seed=3, backend="cpu")
    d = [sum(bin(int(w)).count("1") for w in row) for row in s_bits]
    c = [sum(bin(int(w)).count("1") for w in row) for row in t_bits]
    assert np.array_equal(want, _reference.route_counts(d, c, k, 3))
    assert np.array_equal(route_bits(s_bits, t_bits, n_src=n_src, n_tgt=n_tgt, k=k, seed=3, backend=kind), want)


# -- Feistel permutations ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 10, 16, 17, 31, 32, 33, 64, 100, 255, 256, 1000, 1024, 4097])
@pytest.mark.parametrize("seed", [7, TOP])
def test_feistel_range(kind, cpu, n, seed):
    be = make_backend(kind)
    key = stream(seed, STREAM_PERM_S)
    fwd = host(be.feistel(0, n, n, key))
    inv = host(be.feistel(0, n, n, key, inverse=True))
    assert fwd.dtype == np.int64
    assert np.array_equal(fwd, cpu.feistel(0, n, n, key))
    assert np.array_equal(inv, cpu.feistel(0, n, n, key, inverse=True))
    assert np.array_equal(np.sort(fwd), np.arange(n))
    assert np.array_equal(inv[fwd], np.arange(n))
    sample = sorted({0, n // 3, n - 1})
    assert [int(fwd[x]) for x in sample] == [feistel(x, n, key) for x in sample]
    assert [int(inv[x]) for x in sample] == [feistel_inverse(x, n, key) for x in sample]


@pytest.mark.parametrize(
    "start,count,n",
    [(5, 10, 100), (0, 0, 10), (999_990, 10, 1_000_000), (1 << 40, 3, 1 << 41), ((1 << 61) + 5, 4, 1 << 62)],
)
def test_feistel_offsets_and_large_n(kind, cpu, start, count, n):
    be = make_backend(kind)
    key = stream(12, STREAM_PERM_T)
    for inverse in (False, True):
        got = host(be.feistel(start, count, n, key, inverse=inverse))
        ref = feistel_inverse if inverse else feistel
        assert got.tolist() == [ref(start + i, n, key) for i in range(count)]
        assert np.array_equal(got, cpu.feistel(start, count, n, key, inverse=inverse))


def test_feistel_spec_vectors(kind):
    be = make_backend(kind)
    assert host(be.feistel(0, 10, 10, stream(42, 1))).tolist() == [9, 5, 3, 7, 8, 4, 1, 6, 0, 2]
    assert host(be.feistel(0, 16, 16, stream(7, 2))).tolist() == [0, 13, 9, 15, 11, 3, 12, 10, 6, 1, 5, 8, 7, 14, 4, 2]
    assert host(be.feistel(123456, 1, 1000000, stream(42, 2))).tolist() == [417975]


@pytest.mark.slow
def test_feistel_many_blocks(kind, cpu):
    """More values than one launch of 2^16 blocks covers in one pass of its grid-stride loop."""
    be = make_backend(kind)
    n = (1 << 16) * 256 + 1000
    key = stream(1, STREAM_PERM_T)
    got = host(be.feistel(0, n, n, key))
    assert np.array_equal(got, cpu.feistel(0, n, n, key))


# -- systematic router -------------------------------------------------------------------------


SYS_CAPS = {
    "uniform": lambda n: np.ones(n),
    "zeros": lambda n: np.where(np.arange(n) % 3 == 1, 0.0, 1.0 + np.arange(n) % 5),
    "dominant": lambda n: np.where(np.arange(n) == n // 2, 100.0 * n, 1.0),
    "single": lambda n: np.where(np.arange(n) == 0, 1.0, 0.0),
}


@pytest.mark.parametrize("caps_kind", list(SYS_CAPS))
@pytest.mark.parametrize("n_src,n_tgt", [(1, 1), (1, 6), (5, 3), (64, 64), (200, 17), (17, 200)])
def test_systematic_grid(kind, caps_kind, n_src, n_tgt):
    caps = SYS_CAPS[caps_kind](n_tgt)
    for k in sorted({1, 2, 3, 8, n_tgt} & set(range(1, n_tgt + 1))):
        for seed in (1, TOP):
            want = _reference.route_systematic(caps.tolist(), n_src, k, seed)
            w = np.ones(n_src)
            assert np.array_equal(route(w, caps, k=k, seed=seed, method="systematic", backend="cpu"), want)
            assert np.array_equal(route(w, caps, k=k, seed=seed, method="systematic", backend=kind), want)


@pytest.mark.parametrize("row0,rows", [(0, 30), (11, 9), (29, 1)])
def test_systematic_block_given_perm(kind, cpu, row0, rows):
    n_src, k = 30, 4
    caps = np.array([1.0, 0.0, 5.0, 2.5, 0.5, 9.0])
    pt = np.random.default_rng(4).permutation(n_src)
    want = _reference.route_systematic(caps.tolist(), n_src, k, 77, perm_t=pt.tolist())[row0 : row0 + rows]
    be = make_backend(kind)
    cum = _prep.capacity_cum(be.xp, be.xp.asarray(caps))
    got = systematic.systematic_block(
        be, cum, n_src=n_src, k=k, seed=77, row0=row0, perm_t=be.xp.asarray(pt[row0 : row0 + rows])
    )
    assert np.array_equal(host(got), want)
    got_cpu = systematic.systematic_block(
        cpu, _prep.capacity_cum(np, caps), n_src=n_src, k=k, seed=77, row0=row0, perm_t=pt[row0 : row0 + rows]
    )
    assert np.array_equal(got_cpu, want)


def test_systematic_rows_per_call(kind):
    caps = np.arange(1.0, 12.0)
    want = _reference.route_systematic(caps.tolist(), 50, 5, 9)
    got = route(np.ones(50), caps, k=5, seed=9, method="systematic", backend=kind, rows_per_call=7)
    assert np.array_equal(got, want)


# -- launch bookkeeping ------------------------------------------------------------------------


def test_launch_bookkeeping():
    """Kernels receive contiguous arrays and exact scalar types (checked by the emulator), and the
    phase kernel runs once per call's share of rows while the ring is packed once per routing call."""
    _emulator_or_skip()
    be = emulated_backend.make_backend()
    d, c = make_counts(30, 20, "mixed", np.random.default_rng(0))
    run_phase(be, d, c, 3, 1, rows_per_call=8)
    names = [name for name, _, _ in be._launch.launches]
    assert names.count("gpr_phase_rows_k4") == 4
    assert names.count("gpr_pack_ring") == 1
    assert names.count("gpr_feistel_range") == 1 + 4  # inv_s once, perm_t per block


def test_int32_limits():
    be = CudaBackend(np, lambda *a: None)
    with pytest.raises(ValueError, match="n_src"):
        be.phase_rows(
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            (np.zeros((1, 2), np.int32), np.zeros(1, np.int32)),
            n_src=1 << 31,
            k=1,
            row0=0,
            select_key=0,
        )


def test_derived_phases_need_perm_key():
    be = CudaBackend(np, lambda *a: None)
    with pytest.raises(ValueError, match="perm_key"):
        be.phase_rows(
            None,
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            (np.zeros((1, 2), np.int32), np.zeros(1, np.int32)),
            n_src=4,
            k=1,
            row0=0,
            select_key=0,
        )


# -- banded phase router (SPEC §13) ------------------------------------------------------------


def run_phase_mapped(be, d, c, k, k_out, col_map, seed, block_rows=1 << 18) -> np.ndarray:
    """All rows of the phase router with the in-kernel column map and first-k_out-distinct step."""
    return run_phase(be, d, c, k, seed, rows_per_call=block_rows, col_map=col_map, k_out=k_out)


def mapped_reference(d, c, k, k_out, col_map, seed) -> np.ndarray:
    """First k_out distinct targets of each row's k drawn columns, short rows of positive degree then
    completed (SPEC §13; ``col_map`` ascending, as a band layout's)."""
    draws = _reference.route_counts(list(d), list(c), k, seed)
    cm = [int(v) for v in col_map]
    rows = [_reference.first_distinct([int(v) for v in row], cm, k_out) for row in draws]
    rows = [_reference.complete_row(row, cm, j, seed) if d[j] > 0 else row for j, row in enumerate(rows)]
    return np.array(rows, dtype=np.int32).reshape(len(d), k_out)


@pytest.mark.parametrize("config", [{}, *CONFIGS], ids=lambda c: "-".join(f"{v}" for v in c.values()) or "default")
@pytest.mark.parametrize(
    "n_src,n_cols,n_tgt,k,k_out",
    [
        (30, 40, 5, 8, 2),
        (25, 64, 9, 17, 4),
        (12, 100, 3, 40, 3),
        (40, 33, 33, 33, 33),
        (9, 20, 1, 4, 1),
    ],
)
def test_mapped_emission_launch_shapes(kind, cpu, config, n_src, n_cols, n_tgt, k, k_out):
    """Any ascending column map (bands of any width, absent targets), every register width and
    multi-pass selection: the kernel's first-k_out-distinct and completion steps == the CPU kernel's
    == the reference."""
    be = make_backend(kind, **config)
    rng = _case_rng(n_src, n_cols, n_tgt, k, k_out, "mapped")
    d, c = make_counts(n_src, n_cols, "mixed", rng)
    col_map = np.sort(rng.integers(0, n_tgt, n_cols))
    seed = int(rng.integers(1 << 62))
    want = mapped_reference(d, c, k, k_out, col_map, seed)
    assert np.array_equal(run_phase_mapped(cpu, d, c, k, k_out, col_map, seed), want)
    assert np.array_equal(run_phase_mapped(be, d, c, k, k_out, col_map, seed, block_rows=7), want)


@pytest.mark.parametrize("schedule,sched_seed", [(1, 0), (2, 21)])
def test_mapped_emission_thread_schedules(cpu, schedule, sched_seed):
    _emulator_or_skip()
    rng = np.random.default_rng(sched_seed)
    d, c = make_counts(20, 90, "mixed", rng)
    col_map = np.sort(rng.integers(0, 12, 90))
    for config in (CONFIGS[2], CONFIGS[4], CONFIGS[7]):
        be = make_backend(EMULATED, schedule=schedule, seed=sched_seed, **config)
        want = run_phase_mapped(cpu, d, c, 24, 5, col_map, 3)
        assert np.array_equal(run_phase_mapped(be, d, c, 24, 5, col_map, 3), want)


BANDED_CAPS = {
    "uniform": lambda n, rng: np.ones(n),
    "strong": lambda n, rng: np.where(np.arange(n) % 10 == 0, 8.0, np.where(np.arange(n) % 5 == 1, 2.0, 1.0)),
    "zeros": lambda n, rng: np.where(rng.random(n) < 0.3, 0.0, rng.random(n) * 3 + 0.1),
    "dominant": lambda n, rng: np.where(np.arange(n) == 1, 40.0 * n, 1.0),
}


@pytest.mark.parametrize("caps_kind", list(BANDED_CAPS))
@pytest.mark.parametrize(
    "n_src,n_tgt,k,density",
    [
        (50, 4, 2, 0.5),
        (200, 8, 2, 0.3),
        (120, 16, 4, 0.6),
        (300, 40, 8, 0.9),
        (64, 63, 3, 0.3),
        (90, 12, 9, 0.5),  # k >= 9: k_draw = 36 spans three passes of K = 16 and the last is partial
        (70, 20, 12, 0.8),
    ],
)
def test_banded_route(kind, cpu, caps_kind, n_src, n_tgt, k, density):
    """route(method="phase") with n_tgt < n_src on the CUDA backend == CPU == reference (SPEC §13)."""
    rng = _case_rng(n_src, n_tgt, k, caps_kind, "banded")
    caps = BANDED_CAPS[caps_kind](n_tgt, rng)
    w = np.ones(n_src) if n_src % 2 == 0 else rng.random(n_src) * (rng.random(n_src) > 0.2) + 0.0
    w[0] = 1.0
    seed = SEEDS[(n_src + k) % len(SEEDS)]
    want = _reference.route(caps.tolist(), w.tolist(), k=k, seed=seed, density=density)
    assert np.array_equal(route(w, caps, k=k, seed=seed, density=density, backend="cpu"), want)
    got = route(w, caps, k=k, seed=seed, density=density, backend=kind, block_rows=37)
    assert got.dtype == np.int32 and got.shape == (n_src, k)
    assert np.array_equal(got, want)


def test_banded_spec_vector(kind):
    assert route(np.ones(12), [1, 0, 2, 1], k=2, seed=42, density=1.0, backend=kind).tolist() == [
        [2, 0],
        [2, 0],
        [2, 0],
        [2, 3],
        [2, 0],
        [3, 2],
        [3, 2],
        [2, 0],
        [2, 3],
        [2, 3],
        [3, 2],
        [2, 0],
    ]


def test_banded_fill_vectors(kind):
    """SPEC §13 fill-completion vectors (amendment 1): short rows completed by draws and by the walk."""
    from test_banded import CAPS_FILL, ROUTE_FILL, ROUTE_FILL_P2, W_FILL

    got = route(np.array(W_FILL), CAPS_FILL, k=3, seed=2, density=0.5, backend=kind, block_rows=5)
    assert got.tolist() == ROUTE_FILL
    assert route(np.ones(6), [3, 0, 1], k=3, seed=1, density=0.3, backend=kind).tolist() == ROUTE_FILL_P2


@pytest.mark.parametrize("caps", [[8, 2, 2, 1, 1, 1, 1, 1], [7] + [1] * 7, [1e6, 1, 1e-6, 1e-6, 1e-6]])
def test_banded_fill_guarantee(kind, cpu, caps):
    """Dominant capacities (many short rows before completion): CUDA == CPU == reference, all filled."""
    caps = np.array(caps, dtype=np.float64)
    w = np.ones(160)
    w[::9] = 0.0
    for k, seed in ((2, 0), (3, TOP)):
        want = _reference.route(caps.tolist(), w.tolist(), k=k, seed=seed, density=0.3)
        got = route(w, caps, k=k, seed=seed, density=0.3, backend=kind, block_rows=41)
        assert np.array_equal(got, want)
        assert ((got >= 0).sum(axis=1) == np.where(w > 0, min(k, int((caps > 0).sum())), 0)).all()


def test_banded_launch_bookkeeping():
    """One phase kernel per block of rows, the mapped variant (k_out > 0), no extra kernel or pass."""
    _emulator_or_skip()
    be = emulated_backend.make_backend()
    lay = phase.band_layout(np.ones(4), 30, 2, 0.5)
    d = np.full(30, int(np.rint(0.5 * lay.n_cols)))
    run_phase_mapped(be, d, lay.col_counts, lay.k_draw, 2, lay.col_map, 1, block_rows=8)
    names = [name for name, _, _ in be._launch.launches]
    assert names.count("gpr_phase_rows_k8") == 4 and len(names) == 4 + 1 + 1 + 4  # phase, pack, inv_s, perm_t


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mapped_emission_hypothesis(data):
    """Random counts, ascending column maps, k and k_out at every launch shape: emulated CUDA == reference."""
    _emulator_or_skip()
    n_src = data.draw(st.integers(1, 40), label="n_src")
    n_cols = data.draw(st.integers(1, 60), label="n_cols")
    n_tgt = data.draw(st.integers(1, n_cols), label="n_tgt")
    k = data.draw(st.integers(1, n_cols), label="k")
    k_out = data.draw(st.integers(1, k), label="k_out")
    d = data.draw(st.lists(st.integers(0, n_cols), min_size=n_src, max_size=n_src), label="d")
    c = data.draw(st.lists(st.integers(0, n_src), min_size=n_cols, max_size=n_cols), label="c")
    col_map = sorted(data.draw(st.lists(st.integers(0, n_tgt - 1), min_size=n_cols, max_size=n_cols), label="col_map"))
    seed = data.draw(st.integers(0, TOP), label="seed")
    config = data.draw(st.sampled_from([{}, *CONFIGS]), label="config")
    want = mapped_reference(d, c, k, k_out, col_map, seed)
    be = make_backend(EMULATED, **config)
    assert np.array_equal(run_phase_mapped(be, d, c, k, k_out, col_map, seed, block_rows=max(1, n_src // 3)), want)


@pytest.mark.parametrize("n_src,n_tgt,k", [(96, 96, 3), (96, 8, 2), (200, 16, 3), (50, 70, 4)])
def test_bench_cuda_kernel_alone_matches_the_whole_call(n_src, n_tgt, k):
    """benchmarks/bench_cuda.py times the phase kernel alone on the inputs route() prepares and stops
    when the two outputs differ; at MoE shapes (fewer targets than sources) that is the banded kernel."""
    _emulator_or_skip()
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import bench_cuda

    kernel, out, _ = bench_cuda.phase_kernel(np, emulated_backend.make_backend(), n_src, n_tgt, k, 0.3, 42)
    kernel()
    want = route(np.ones(n_src), np.ones(n_tgt), k=k, seed=42, density=0.3, backend="cpu")
    assert np.array_equal(out, want)


def test_sizes_past_the_int32_rings_name_the_argument(kind):
    """README "Sizes": the CUDA phase-router kernels take n_src and n_tgt below 2^31 - 2^16; a block
    of the last rows just below the bound routes, at the bound it raises a ValueError naming n_src.
    The other methods index no ring and route past it."""
    from gpu_phase_router import route_block
    from gpu_phase_router.backends.cuda import INT32_LIMIT

    assert INT32_LIMIT == 2**31 - 2**16
    caps = np.ones(4)
    ok = route_block(None, caps, n_src=INT32_LIMIT - 1, row0=INT32_LIMIT - 5, k=1, backend=kind)
    assert ok.shape == (4, 1)
    with pytest.raises(ValueError, match=f"n_src < {INT32_LIMIT}"):
        route_block(None, caps, n_src=INT32_LIMIT, row0=INT32_LIMIT - 4, k=1, backend=kind)
    for method in ("systematic", "hash", "weighted_hash"):
        got = route_block(None, caps, n_src=INT32_LIMIT + 10, row0=INT32_LIMIT + 6, k=1, method=method, backend=kind)
        want = route_block(None, caps, n_src=INT32_LIMIT + 10, row0=INT32_LIMIT + 6, k=1, method=method, backend="cpu")
        np.testing.assert_array_equal(host(got), want)
