"""SPEC §13 (banded phase router): the reference against the SPEC vectors and a hand derivation,
and the CPU backend against the reference."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu_phase_router as gpr
from gpu_phase_router import _reference
from gpu_phase_router._keys import at, stream
from gpu_phase_router.methods import RowRange, phase

LAYOUT_1 = dict(
    n_cols=8,
    k_draw=4,
    weights=[1.0, 0.0, 2.0, 1.0],
    widths=[2, 0, 4, 2],
    counts=[12, 0, 12, 12],
    col_map=[0, 0, 2, 2, 2, 2, 3, 3],
)
ROUTE_1 = [[2], [2], [3], [2], [0], [3], [2], [2], [2], [2], [2], [3]]
ROUTE_1K2 = [[2, 0], [2, 0], [2, 0], [2, 3], [2, 0], [3, 2], [3, 2], [2, 0], [2, 3], [2, 3], [3, 2], [2, 0]]
CAPS_2 = [3, 1, 0, 1.5, 0.2]
ROUTE_2 = [[4, 0], [0, 1], [0, 3], [3, 0], [0, 4], [3, 0]]
ROUTE_3 = [[3, 0, 1], [-1, -1, -1], [1, 3, 4], [3, 1, 0]]


def test_spec_layout_vectors():
    assert _reference.band_layout([1, 0, 2, 1], 12, 1, 1.0) == LAYOUT_1
    assert _reference.water_filled_shares([1, 0, 2, 1], 12, 2) == [0.5, 0.0, 1.0, 0.5]
    lay = _reference.band_layout([1, 0, 2, 1], 12, 2, 1.0)
    assert lay["weights"] == [2977044472, 0, 11908177887, 2977044472]
    assert (lay["n_cols"], lay["k_draw"], lay["widths"], lay["counts"]) == (17, 8, [3, 0, 11, 3], [11, 0, 12, 11])
    lay = _reference.band_layout(CAPS_2, 40, 2, 0.6)
    assert (lay["n_cols"], lay["widths"], lay["counts"]) == (30, [19, 4, 0, 6, 1], [38, 30, 0, 35, 20])
    lay = _reference.band_layout(CAPS_2, 40, 1, 0.6)
    got = (lay["n_cols"], lay["k_draw"], lay["widths"], lay["counts"])
    assert got == (16, 4, [8, 3, 0, 4, 1], [37, 33, 0, 37, 20])


def test_spec_route_vectors_reference():
    assert _reference.route([1, 0, 2, 1], [1] * 12, k=1, seed=42, density=1.0).tolist() == ROUTE_1
    assert _reference.route([1, 0, 2, 1], [1] * 12, k=2, seed=42, density=1.0).tolist() == ROUTE_1K2
    assert _reference.route(CAPS_2, [1] * 40, k=2, seed=7, density=0.6).tolist()[:6] == ROUTE_2
    assert _reference.route(CAPS_2, [1, 0, 2, 0.5] * 10, k=3, seed=7, density=0.6).tolist()[:4] == ROUTE_3


@pytest.mark.parametrize("scale", [2.0**1016, 2.0**1019, 1.5 * 2.0**1018])
def test_capacities_near_the_float64_limit_route_as_scaled_down(scale):
    """SPEC §13: where n_src * k * max(cap) overflows, the shares are those of the capacities scaled
    by 2^-m, so they route as the same capacities at any finite smaller power-of-two scale."""
    caps = [4.0, 3.0, 1.0, 0.0, 1.0, 1.0]
    big = [c * scale for c in caps]
    assert not np.isinf(sum(big)) and np.isinf(1000 * 2 * max(big))  # the case: the sum is finite
    small = [c * scale / 2.0**1020 for c in caps]  # exact: a power of two
    assert _reference.water_filled_shares(big, 1000, 2) == _reference.water_filled_shares(small, 1000, 2)
    assert phase.water_filled_shares(np.array(big), 1000, 2).tolist() == _reference.water_filled_shares(small, 1000, 2)
    want = _reference.route(small, [1] * 300, k=2, seed=1)
    assert _reference.route(big, [1] * 300, k=2, seed=1).tolist() == want.tolist()
    got = gpr.route(np.ones(300), big, k=2, seed=1, backend="cpu")
    assert got.tolist() == want.tolist()
    assert np.bincount(got[got >= 0], minlength=6)[0] > 2 * np.bincount(got[got >= 0], minlength=6)[2]


@pytest.mark.parametrize(
    ("caps", "n_src", "row0"),
    [([2.0**1023, 1e-20], 16, 0), ([1e-300, 2.0**1023, 0.0], 100, 0), ([1e300, 1e-300], 2**40, 2**40 - 4)],
)
def test_capacities_that_scale_to_zero_raise_naming_them(caps, n_src, row0):
    """SPEC §13, §9: with the 2^-m scaling, positive capacities below 2^-1074 * 2^m become 0; once
    every target that could take the remaining shares is such a one, the water-filling divides 0 by
    0 (a NaN share, whose band width cast to int64 is garbage). That is invalid input: ValueError
    naming target_capacities, from the backend, the block and ring-size entry points and the reference."""
    assert np.isinf(n_src * 2 * max(caps))  # the scaled case
    assert all(c == 0 or c * 2.0 ** -np.frexp(max(caps))[1] == 0 for c in caps if c != max(caps))
    with pytest.raises(ValueError, match="target_capacities"):
        gpr.blocks.route_block(None, caps, n_src=n_src, row0=row0, k=2, seed=1, backend="cpu")
    with pytest.raises(ValueError, match="target_capacities"):
        gpr.blocks.ring_size(caps, n_src=n_src, k=2)
    with pytest.raises(ValueError, match="target_capacities"):
        _reference.water_filled_shares(caps, n_src, 2)
    # k = 1 uses the capacities themselves (no water-filling): the same input routes
    assert gpr.blocks.route_block(None, caps, n_src=n_src, row0=row0, k=1, seed=1, backend="cpu").shape == (
        n_src - row0,
        1,
    )


@pytest.mark.parametrize("n_src", [12, 2**53 + 1, 2**62 + 3, 2**63 - 1])
def test_band_column_counts_near_int64_limit_match_the_reference(n_src):
    """SPEC §13 ``cv = clip(rint(q / b * n_src), 1, n_src)`` with n_src near 2^63: exactly n_src at
    the top (float(n_src) rounds up to 2^63 there, which cast to int64 wrapped to -2^63)."""
    lay = phase.band_layout(np.array([1.0, 1.0, 2.0]), n_src, 1, 1.0)
    want = _reference.band_layout([1.0, 1.0, 2.0], n_src, 1, 1.0)["counts"]
    assert np.unique(lay.col_counts).tolist() == sorted(set(want))
    assert min(want) >= 1


def test_spec_vector_capacities_near_the_float64_limit():
    caps = np.array([4.0, 3.0, 1.0, 1.0, 1.0])
    got = gpr.route(np.ones(1000), caps * 2.0**1016, k=2, seed=1, backend="cpu")
    assert np.array_equal(got, gpr.route(np.ones(1000), caps, k=2, seed=1, backend="cpu"))


def test_hand_derivation_density_one():
    """With density 1 and full column intervals every virtual column is a candidate: R_j is the k_draw
    smallest keys over all V columns, written here from SPEC §5 and §13 directly (no ring machinery)."""
    col_map = LAYOUT_1["col_map"]
    for j in range(12):
        base = at(stream(42, 3), j)
        drawn = sorted(range(8), key=lambda v: (at(base, v), v))[:4]
        row: list[int] = []
        for v in drawn:
            if col_map[v] not in row:
                row.append(col_map[v])
        assert row[:1] == ROUTE_1[j]


def test_first_distinct():
    cm = [0, 0, 1, 2, 2]
    assert _reference.first_distinct([0, 1, 3, 2], cm, 2) == [0, 2]
    assert _reference.first_distinct([0, 1, -1, -1], cm, 2) == [0, -1]
    assert _reference.first_distinct([4, 3, 2, 0], cm, 3) == [2, 1, 0]


@pytest.mark.parametrize("backend", ["cpu"])
def test_spec_route_vectors_backend(backend):
    assert gpr.route(np.ones(12), [1, 0, 2, 1], k=1, seed=42, density=1.0, backend=backend).tolist() == ROUTE_1
    assert gpr.route(np.ones(12), [1, 0, 2, 1], k=2, seed=42, density=1.0, backend=backend).tolist() == ROUTE_1K2
    assert gpr.route(np.ones(40), CAPS_2, k=2, seed=7, density=0.6, backend=backend).tolist()[:6] == ROUTE_2
    got = gpr.route(np.array([1, 0, 2, 0.5] * 10), CAPS_2, k=3, seed=7, density=0.6, backend=backend)
    assert got.tolist()[:4] == ROUTE_3


def test_host_layout_matches_reference():
    for caps, n_src, k, density in [
        ([1, 0, 2, 1], 12, 2, 1.0),
        (CAPS_2, 40, 1, 0.6),
        ([5.0] * 7, 1000, 3, 0.3),
        ([1e-3, 1, 1e3], 50, 2, 0.05),
        ([0, 0, 1], 10, 1, 0.9),
    ]:
        want = _reference.band_layout([float(c) for c in caps], n_src, k, density)
        lay = phase.band_layout(np.asarray(caps, dtype=np.float64), n_src, k, density)
        assert lay.n_cols == want["n_cols"] and lay.k_draw == want["k_draw"]
        assert lay.widths.tolist() == want["widths"]
        assert lay.col_map.tolist() == want["col_map"]
        assert lay.col_counts.tolist() == [want["counts"][e] for e in want["col_map"]]


def _caps(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return np.ones(n)
    if kind == "zeros":
        c = rng.random(n) * 4
        c[rng.random(n) < 0.3] = 0
        c[rng.integers(n)] = 1.0
        return c
    if kind == "strong":
        return gpr.capacity.strong_hetero_capacities(n, int(rng.integers(100)))
    return np.where(np.arange(n) == 0, 50.0 * n, 1.0)  # dominant


CPU_GRID = [
    (n_src, n_tgt, k, kind, density)
    for (n_src, n_tgt), kind, density in itertools.product(
        [(9, 2), (40, 5), (300, 8), (257, 16), (1200, 64), (3000, 300)],
        ["uniform", "zeros", "strong", "dominant"],
        [0.3, 0.7],
    )
    for k in sorted({1, 2, 3, 8, 9, 12} & set(range(1, n_tgt + 1)))
    if n_src * n_tgt * k <= 2_000_000 and (k < 9 or n_src <= 300)
]  # the reference is plain Python; k >= 9 (k_draw > 32) takes the kernel's heap-sorted bottom-k


@pytest.mark.parametrize("n_src,n_tgt,k,kind,density", CPU_GRID)
def test_cpu_equals_reference(n_src, n_tgt, k, kind, density):
    rng = np.random.default_rng(zlib.crc32(repr((n_src, n_tgt, k, kind, density)).encode()))
    caps = _caps(kind, n_tgt, rng)
    w = np.ones(n_src) if (n_src + k) % 3 else rng.random(n_src) * (rng.random(n_src) > 0.1)
    w[0] = 1.0
    seed = int(rng.integers(1 << 63)) * 2 + 1
    want = _reference.route(caps.tolist(), w.tolist(), k=k, seed=seed, density=density)
    got = gpr.route(w, caps, k=k, seed=seed, density=density, backend="cpu")
    assert got.dtype == np.int32 and got.shape == (n_src, k)
    np.testing.assert_array_equal(got, want)
    assert ((got >= 0) <= (caps[np.maximum(got, 0)] > 0)).all()  # zero capacity never receives


# -- no device-to-host reads on the CUDA path (methods.route_uniform, what a training step calls) --


class DeviceOnly(np.ndarray):
    """A NumPy array standing in for device memory: any read of a value back to the host raises."""

    def _read_back(self, *args, **kwargs):
        raise AssertionError("a device value was read back to the host")

    __int__ = __float__ = __bool__ = __index__ = _read_back
    item = tolist = get = _read_back


class DeviceXp:
    """``numpy`` whose array results are :class:`DeviceOnly` (host NumPy inputs are uploads)."""

    def __getattr__(self, name):
        obj = getattr(np, name)
        if not callable(obj) or isinstance(obj, type):
            return obj

        def call(*args, **kwargs):
            out = obj(*args, **kwargs)
            return out.view(DeviceOnly) if isinstance(out, np.ndarray) else out

        return call


def _device_only_backend():
    simt = pytest.importorskip("simt.emulated_backend")
    try:
        simt.library()
    except Exception as exc:  # no C++ compiler: the emulator cannot be built
        pytest.skip(f"SIMT emulator unavailable: {exc}")
    from gpu_phase_router.backends.cuda import CudaBackend

    return CudaBackend(DeviceXp(), simt.EmulatedLauncher(), name="cuda-device-only")


def test_device_only_guard_can_fail():
    """The guard catches the read-back that the block loop makes for given degrees over several calls."""
    be = _device_only_backend()
    d = be.xp.full(20, 3, dtype=np.int64)
    with pytest.raises(AssertionError, match="read back"):
        phase.phase_rows(be, np.full(8, 10, dtype=np.int64), RowRange(None, 20, 0, 20, 2, 1, rows_per_call=7), k=2, d=d)


@pytest.mark.parametrize(
    "n_src,caps,k",
    [
        (300, np.ones(8), 2),
        (257, gpr.capacity.strong_hetero_capacities(16, 1), 4),
        (100, np.array([1.0, 0.0, 3.0, 0.5]), 1),
    ],
)
def test_route_uniform_banded_reads_nothing_back(n_src, caps, k):
    from gpu_phase_router import methods

    be = _device_only_backend()
    want = _reference.route(caps.tolist(), [1.0] * n_src, k=k, seed=9, density=0.3)
    got = methods.get_method("phase").rows(be, RowRange(caps, n_src, 0, n_src, k, 9, density=0.3, rows_per_call=64))
    assert isinstance(got, DeviceOnly)
    np.testing.assert_array_equal(got.view(np.ndarray), want)
    cpu = methods.route_uniform("phase", "cpu", n_src, caps, k=k, seed=9, density=0.3, rows_per_call=50)
    np.testing.assert_array_equal(cpu, want)


# -- blocks and Dask at banded shapes -----------------------------------------------------------


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("n_src,n_tgt,k,density", [(1000, 16, 2, 0.3), (777, 64, 8, 0.5), (300, 5, 3, 0.2)])
def test_blocks_equal_whole(uniform, n_src, n_tgt, k, density):
    rng = np.random.default_rng(n_src + k)
    caps = gpr.capacity.strong_hetero_capacities(n_tgt, 3)
    caps[1] = 0.0
    w = np.ones(n_src) if uniform else rng.random(n_src) * (rng.random(n_src) > 0.1)
    whole = gpr.route(w, caps, k=k, seed=11, density=density)
    assert not (whole == 1).any()  # zero capacity never receives
    assert (whole[w == 0] == -1).all() and (not uniform or (whole >= 0).mean() > 0.98)
    n_ring = gpr.blocks.ring_size(caps, n_src=n_src, k=k, density=density)
    assert n_ring == phase.band_layout(caps, n_src, k, density).n_cols > n_tgt
    mean = gpr.blocks.weight_mean(w)
    cuts = sorted({0, n_src, *rng.integers(0, n_src, 5).tolist()})
    parts = []
    for a, b in itertools.pairwise(cuts):
        prefix = int(gpr.blocks.source_degrees(w[:a], weight_mean=mean, n_tgt=n_ring, density=density).sum())
        parts.append(
            gpr.route_block(
                w[a:b],
                caps,
                n_src=n_src,
                row0=a,
                k=k,
                seed=11,
                density=density,
                weight_mean=mean,
                degree_prefix=prefix,
                rows_per_call=97,
            )
        )
        if uniform:  # sources of weight 1 need neither the mean nor the prefix
            np.testing.assert_array_equal(
                gpr.route_block(None, caps, n_src=n_src, row0=a, k=k, seed=11, density=density)[: b - a], parts[-1]
            )
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    wrong = int(gpr.blocks.source_degrees(w[: cuts[1]], weight_mean=mean, n_tgt=n_tgt, density=density).sum())
    if cuts[1] > 0 and wrong % n_ring:
        got = gpr.route_block(
            w[cuts[1] :],
            caps,
            n_src=n_src,
            row0=cuts[1],
            k=k,
            seed=11,
            density=density,
            weight_mean=mean,
            degree_prefix=wrong,
        )
        assert not np.array_equal(got, whole[cuts[1] :])  # degrees on the n_tgt ring are the wrong prefix


@pytest.mark.parametrize("chunks", [(250, 250, 500), (1, 998, 1), (333, 333, 334)])
def test_dask_equals_whole(chunks):
    da = pytest.importorskip("dask.array")
    gdask = pytest.importorskip("gpu_phase_router.dask")
    rng = np.random.default_rng(len(chunks))
    caps = np.where(np.arange(16) < 8, 0.5, 1.0)
    w = rng.random(1000) + 0.5
    for weights in (w, np.ones(1000)):
        whole = gpr.route(weights, caps, k=2, seed=5)
        lazy = gdask.route(da.from_array(weights, chunks=(chunks,)), caps, k=2, seed=5)
        np.testing.assert_array_equal(lazy.compute(scheduler="synchronous"), whole)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hypothesis_cpu_equals_reference(data):
    """Random banded shapes: capacities with zeros and wide spreads, any k, density and weights."""
    n_tgt = data.draw(st.integers(1, 12), label="n_tgt")
    n_src = data.draw(st.integers(n_tgt + 1, 80), label="n_src")
    caps = data.draw(st.lists(st.sampled_from([0.0, 0.01, 0.5, 1.0, 3.0, 100.0]), min_size=n_tgt, max_size=n_tgt))
    if not any(caps):
        caps[0] = 1.0
    k = data.draw(st.integers(1, n_tgt), label="k")
    density = data.draw(st.sampled_from([0.05, 0.3, 0.77, 1.0]), label="density")
    w = data.draw(st.lists(st.sampled_from([0.0, 0.2, 1.0, 5.0]), min_size=n_src, max_size=n_src))
    if not any(w):
        w[0] = 1.0
    seed = data.draw(st.integers(0, (1 << 64) - 1), label="seed")
    want = _reference.route(caps, w, k=k, seed=seed, density=density)
    got = gpr.route(np.array(w), np.array(caps), k=k, seed=seed, density=density, backend="cpu")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", ["phase", "systematic", "hash", "weighted_hash"])
def test_warm_device_route_uploads_nothing(method):
    """A warm device route of host capacities uploads nothing: the arrays made from the
    capacities (band layout, capacity units, positive targets) are uploaded once per
    capacities and device (``_prep.on_backend``), as a training loop's forwards need."""
    from gpu_phase_router import methods

    be = _device_only_backend()
    xp = be.xp
    uploads = []

    class Counting:
        def __getattr__(self, name):
            obj = getattr(xp, name)
            if name in ("asarray", "array", "ascontiguousarray"):

                def call(a, *args, **kwargs):
                    if isinstance(a, np.ndarray) and not isinstance(a, DeviceOnly):
                        uploads.append(name)
                    return obj(a, *args, **kwargs)

                return call
            return obj

    be.xp = Counting()
    caps = np.array([3.0, 1.0, 0.0, 2.0, 1.0, 1.0, 0.5, 4.0]) * (1.0 + 1e-9 * len(method))  # fresh per method
    m = methods.get_method(method)
    m.rows(be, RowRange(caps, 300, 0, 300, 2, 1, density=0.3))  # cold: the constants go to the device once
    assert uploads, "the cold call uploads the capacities' arrays"
    uploads.clear()
    got = m.rows(be, RowRange(caps, 300, 0, 300, 2, 2, density=0.3))
    assert uploads == []
    want = gpr.route(np.ones(300), caps, k=2, seed=2, density=0.3, method=method, backend="cpu")
    np.testing.assert_array_equal(got.view(np.ndarray), want)


# -- fill completion (SPEC §13, amendment 1) ----------------------------------------------------

ROUTE_FILL_P2 = [[0, 2, -1]] * 6
W_FILL = [1.0] * 5 + [0.0] + [1.0] * 10
CAPS_FILL = [30, 0, 1, 1, 2]
ROUTE_FILL = [
    [4, 0, 3],
    [0, 4, 3],
    [4, 2, 0],
    [0, 2, 3],
    [4, 0, 2],
    [-1, -1, -1],
    [0, 3, 4],
    [0, 3, 4],
    [2, 0, 4],
    [4, 3, 0],
    [4, 0, 2],
    [0, 2, 3],
    [4, 0, 3],
    [0, 3, 4],
    [0, 4, 3],
    [0, 4, 3],
]


def _complete_oracle(row: list[int], col_map: list[int], j: int, seed: int) -> list[int]:
    """SPEC §13 fill completion written independently of ``_reference.complete_row``: the draws, then
    a walk over the virtual columns one at a time from the first draw's column (cyclic), which meets
    the bands in the same cyclic ascending order as the SPEC's walk over targets."""
    k = len(row)
    out = [e for e in row if e >= 0]
    n_cols = len(col_map)
    base = at(stream(seed, 3), j)
    draws = [at(base, n_cols + r) % n_cols for r in range(16)]
    for v in draws:
        if len(out) < k and col_map[v] not in out:
            out.append(col_map[v])
    for step in range(n_cols):
        e = col_map[(draws[0] + step) % n_cols]
        if len(out) < k and e not in out:
            out.append(e)
    return out + [-1] * (k - len(out))


def _drawn_rows(caps, w, k, seed, density):
    """The rows before completion (SPEC §13 without amendment 1), from the reference's parts."""
    n_src = len(w)
    lay = _reference.band_layout([float(c) for c in caps], n_src, k, density)
    d = _reference.weights_to_counts([float(x) for x in w], density, lay["n_cols"])
    c = [cnt for e, b in enumerate(lay["widths"]) for cnt in [lay["counts"][e]] * b]
    draws = _reference.route_counts(d, c, lay["k_draw"], seed)
    return [_reference.first_distinct([int(v) for v in r], lay["col_map"], k) for r in draws], d, lay


def test_complete_row_hand_vector():
    """SPEC §13 vector: the 16 draws of row 5 (seed 0) all land in band 0 of [0] * 30 + [1, 2]."""
    col_map = [0] * 30 + [1, 2]
    base = at(stream(0, 3), 5)
    draws = [at(base, 32 + r) % 32 for r in range(16)]
    assert draws == [15, 28, 20, 19, 5, 19, 11, 24, 20, 21, 5, 7, 13, 8, 8, 11]
    assert _reference.complete_row([0, -1, -1], col_map, 5, 0) == [0, 1, 2]
    assert _reference.complete_row([2, -1, -1], col_map, 5, 0) == [2, 0, 1]
    assert _reference.complete_row([1, 0, 2], col_map, 5, 0) == [1, 0, 2]  # a full row is unchanged
    assert _reference.complete_row([2, -1, -1, -1], col_map, 5, 0) == [2, 0, 1, -1]  # P = 3 < k


def test_complete_row_equals_oracle():
    rng = np.random.default_rng(17)
    for case in range(300):
        n_cols = int(rng.integers(1, 60))
        col_map = sorted(rng.integers(0, int(rng.integers(1, 9)), n_cols).tolist())
        present = sorted(set(col_map))
        k = int(rng.integers(1, 9))
        row = [int(e) for e in rng.permutation(present)[: int(rng.integers(0, min(k, len(present)) + 1))]]
        row += [-1] * (k - len(row))
        j, seed = int(rng.integers(1000)), int(rng.integers(1 << 64, dtype=np.uint64))
        want = _complete_oracle(row, col_map, j, seed)
        assert _reference.complete_row(row, col_map, j, seed) == want, case
        assert sum(e >= 0 for e in want) == min(k, len(present))


def test_spec_fill_vectors():
    drawn, d, lay = _drawn_rows(CAPS_FILL, W_FILL, 3, 2, 0.5)
    assert (lay["n_cols"], lay["widths"]) == (50, [20, 0, 5, 5, 20])
    assert [j for j in range(16) if drawn[j][-1] < 0] == [0, 5, 10]  # rows 0, 10 short; row 5 weight 0
    assert drawn[0] == drawn[10] == [4, 0, -1]
    want = [_complete_oracle(r, lay["col_map"], j, 2) if d[j] > 0 else r for j, r in enumerate(drawn)]
    assert want == ROUTE_FILL
    assert _reference.route(CAPS_FILL, W_FILL, k=3, seed=2, density=0.5).tolist() == ROUTE_FILL
    assert _reference.route([3, 0, 1], [1] * 6, k=3, seed=1, density=0.3).tolist() == ROUTE_FILL_P2
    for kw in ({}, {"rows_per_call": 3}):
        got = gpr.route(np.array(W_FILL), CAPS_FILL, k=3, seed=2, density=0.5, backend="cpu", **kw)
        assert got.tolist() == ROUTE_FILL
    assert gpr.route(np.ones(6), [3, 0, 1], k=3, seed=1, density=0.3).tolist() == ROUTE_FILL_P2


FILL_CAPS = {
    "top8": [8, 2, 2, 1, 1, 1, 1, 1],
    "dom50": [7] + [1] * 7,
    "dom9999": [0.9999 / 0.0001 * 15] + [1] * 15,
    "zeros": [5, 0, 0, 1, 0, 2, 0.01, 0],
    "tiny": [1e6, 1, 1e-6, 1e-6, 1e-6],
}


@pytest.mark.parametrize("name", list(FILL_CAPS))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_fill_guarantee_equals_reference(name, k):
    """Dominant and sparse capacities where many rows are short before completion: CPU == reference,
    and every row of positive weight lists min(k, P) distinct targets of positive capacity."""
    caps = np.array(FILL_CAPS[name], dtype=np.float64)
    if k > caps.shape[0]:
        pytest.skip("k > n_tgt")
    n_pos = int((caps > 0).sum())
    w = np.ones(300)
    w[::11] = 0.0
    w[1::7] = 3.0
    for seed, density in ((0, 0.3), (5, 0.05), (9, 1.0)):
        want = _reference.route(caps.tolist(), w.tolist(), k=k, seed=seed, density=density)
        got = gpr.route(w, caps, k=k, seed=seed, density=density, backend="cpu", rows_per_call=77)
        np.testing.assert_array_equal(got, want)
        assert (got[w == 0] == -1).all()
        for row in got[w > 0]:
            listed = row[row >= 0]
            assert len(listed) == min(k, n_pos) == len(set(listed.tolist())) and (caps[listed] > 0).all()


def test_fill_guarantee_is_exercised():
    """The shapes above do have short rows before completion (so the test can fail)."""
    drawn, d, _ = _drawn_rows(FILL_CAPS["dom50"], [1.0] * 300, 2, 0, 0.3)
    assert sum(r[-1] < 0 for r in drawn) >= 5


def test_fill_blocks_and_dask_equal_whole():
    caps = np.array(FILL_CAPS["top8"])
    w = np.ones(2000)
    w[::13] = 0.0
    whole = gpr.route(w, caps, k=2, seed=3)
    assert ((whole >= 0).sum(axis=1) == np.where(w > 0, 2, 0)).all()
    n_ring = gpr.blocks.ring_size(caps, n_src=2000, k=2)
    mean = gpr.blocks.weight_mean(w)
    parts = []
    for a, b in ((0, 1), (1, 700), (700, 2000)):
        prefix = int(gpr.blocks.source_degrees(w[:a], weight_mean=mean, n_tgt=n_ring, density=0.3).sum())
        parts.append(
            gpr.route_block(w[a:b], caps, n_src=2000, row0=a, k=2, seed=3, weight_mean=mean, degree_prefix=prefix)
        )
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    da = pytest.importorskip("dask.array")
    gdask = pytest.importorskip("gpu_phase_router.dask")
    lazy = gdask.route(da.from_array(w, chunks=((1, 999, 1000),)), caps, k=2, seed=3)
    np.testing.assert_array_equal(lazy.compute(scheduler="synchronous"), whole)


def test_subnormal_density():
    """density = 1e-320: FILL * k_draw / density overflows to inf and SPEC §13 gives V0 = V_MAX."""
    caps = np.ones(16)
    assert gpr.blocks.ring_size(caps, n_src=500, k=2, density=1e-320) == 1 << 20
    assert phase.band_layout(caps, 500, 2, 1e-320).n_cols == 1 << 20
    assert _reference.band_layout([1.0] * 16, 500, 2, 1e-320)["n_cols"] == 1 << 20
    got = gpr.route(np.ones(500), caps, k=2, density=1e-320)
    assert ((got >= 0).sum(axis=1) == 2).all()  # V = 2^20 columns, one scanned per row: completed
    w = np.ones(40)
    w[3] = 0
    got = gpr.route(w, np.ones(3), k=2, seed=1, density=5e-324)
    assert ((got >= 0).sum(axis=1) == np.where(w > 0, 2, 0)).all()


@pytest.mark.parametrize("n,k", [(8, 2), (16, 4), (40, 9)])
def test_square_shape_is_not_banded(n, k):
    """n_tgt == n_src is SPEC §7 unchanged (§13 applies only when n_tgt < n_src): the routes are §3–§5 on
    the §7 counts, written out here, and the degree ring is n_tgt."""
    rng = np.random.default_rng(n)
    caps = rng.random(n) * 4 + 0.1
    caps[1] = 0.0
    w = rng.random(n) + 0.5
    w[2] = 0.0
    d = _reference.weights_to_counts(w.tolist(), 0.6, n)
    c = _reference.weights_to_counts(caps.tolist(), 0.6, n)
    want = _reference.route_counts(d, c, k, 21)
    assert (want < 0).any()  # the plain router leaves short rows; the banded one would complete them
    np.testing.assert_array_equal(gpr.route(w, caps, k=k, seed=21, density=0.6, backend="cpu"), want)
    np.testing.assert_array_equal(gpr.route(w, caps, k=k, seed=21, density=0.6, rows_per_call=3), want)
    assert gpr.blocks.ring_size(caps, n_src=n, k=k, density=0.6) == n
    assert not phase.bands_apply(n, n) and phase.bands_apply(n + 1, n) and not phase.bands_apply(n, n + 1)
