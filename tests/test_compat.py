"""gpu_phase_router.compat: the crate's Python helpers' semantics, and clear errors where the crate has none.

The expected values here are the crate's ``python/phase_router.py`` formulas, written out in the
tests (NumPy one-liners), not taken from the module under test.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import gpu_phase_router.compat as prr
from gpu_phase_router import _crate_reference as ref


def _crate_build_bits(ones, n):
    nbw = (n + 63) // 64
    bits = np.zeros(n * nbw, dtype=np.uint64)
    for i in range(n):
        for b in range(int(min(ones[i], n))):
            bits[i * nbw + b // 64] |= np.uint64(1) << np.uint64(b % 64)
    return bits


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 130])
def test_build_bits(n):
    ones = np.random.default_rng(n).integers(0, n + 3, size=n)
    got = prr.build_bits(ones, n)
    assert got.dtype == np.uint64 and got.shape == (n * ((n + 63) // 64),)
    np.testing.assert_array_equal(got, _crate_build_bits(ones, n))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0])
def test_build_bits_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="ones_per_row"):
        prr.build_bits([3, bad, 2], 3)
    with pytest.raises(ValueError, match="ones_per_row"):
        prr.build_bits(np.array([3.0, bad, 2.0]), 3)


def test_build_bits_negative_int_and_float_counts():
    with pytest.raises(ValueError, match="ones_per_row"):
        prr.build_bits(np.array([3, -2, 2], dtype=np.int64), 3)
    np.testing.assert_array_equal(prr.build_bits([2.7, 1e300, 0.0], 3), [3, 7, 0])  # truncated, clipped to n
    np.testing.assert_array_equal(prr.build_bits([1, 2, 3, np.nan], 3), [1, 3, 7])  # entries past n unread


def test_build_bits_masked():
    masked = np.ma.masked_array([1, 2, 1], mask=[0, 1, 0])
    with pytest.raises(ValueError, match="ones_per_row"):
        prr.build_bits(masked, 3)
    plain = np.ma.masked_array([1, 2, 1], mask=[0, 0, 0])  # nothing masked: plain data
    np.testing.assert_array_equal(prr.build_bits(plain, 3), [1, 3, 1])


def test_build_bits_memory_is_that_of_its_output():
    """A dense [n, words, 64] mask took 2.4 GB at n = 16384 for a 33 MB result."""
    import tracemalloc

    n = 4096
    tracemalloc.start()
    try:
        got = prr.build_bits(np.full(n, int(0.3 * n)), n)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * got.nbytes  # the 64x mask would be 64 * 8 = 512 bytes per output byte
    row = [2**64 - 1] * 19 + [2**12 - 1] + [0] * 44  # 1228 = 19 * 64 + 12 ones, left-aligned
    assert (got.reshape(n, 64) == np.array(row, dtype=np.uint64)).all()


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: prr.make_hard_caps([1.0, 2.0], 10, 2, 1e300), "headroom"),
        (lambda: prr.make_hard_caps([1e308, 1e308], 10, 2), "rel_caps"),
        (lambda: prr.hash_route(8, 2, -1), "seed"),
        (lambda: prr.hash_route(8, 2, 2**64), "seed"),
    ],
)
def test_invalid_input_the_crate_would_take_raises(call, name):
    """The crate wraps such caps to negative numbers or sets every cap to 1; SPEC §9 raises."""
    with pytest.raises(ValueError, match=name):
        call()


def test_hash_route_is_the_crates_generator():
    np.testing.assert_array_equal(
        prr.hash_route(50, 3, seed=9), np.random.default_rng(9).integers(0, 50, size=(50, 3), dtype=np.int32)
    )


def test_make_hard_caps_crate_semantics():
    rel = np.array([0.0, 1.0, 2.0, 8.0, 1.0])
    want = np.ceil((rel / rel.sum()) * 5 * 4 * 1.2).clip(1).astype(int)
    got = prr.make_hard_caps(rel, 5, 4)
    np.testing.assert_array_equal(got, want)
    assert got[0] == 1  # a zero capacity still gets one slot, as in the crate


def test_load_stats_and_loads():
    routes = np.array([[0, 1], [1, -1], [1, 2]], dtype=np.int32)
    loads = prr.compute_loads(routes, 4)
    np.testing.assert_array_equal(loads, [1, 3, 1, 0])
    stats = prr.load_stats(loads)
    assert stats["max"] == 3 and isinstance(stats["max"], int) and isinstance(stats["min"], int)
    assert stats["mean"] == pytest.approx(1.25) and stats["std"] == pytest.approx(np.std([1, 3, 1, 0]))
    assert stats["cv"] == pytest.approx(np.std([1, 3, 1, 0]) / 1.25)
    assert prr.survival_rate(routes, 4) == pytest.approx(5 / 6)


def test_enforce_capacity_row_major():
    routes = np.array([[0, 1], [0, 0], [1, 0]], dtype=np.int32)
    np.testing.assert_array_equal(prr.enforce_capacity(routes, np.array([2, 1])), [[0, 1], [0, -1], [-1, -1]])


@pytest.mark.parametrize("n", [10, 99, 1000])
def test_capacity_profiles(n):
    g = np.random.default_rng(3)
    caps = np.ones(n)
    caps[: int(n * 0.1)] = 8.0
    caps[int(n * 0.1) : int(n * 0.1) + int(n * 0.2)] = 2.0
    g.shuffle(caps)
    np.testing.assert_array_equal(prr.strong_hetero_capacities(n, seed=3), caps)
    g = np.random.default_rng(0)
    caps = np.ones(n)
    caps[: max(int(n * 0.05), 1)] = 16.0
    g.shuffle(caps)
    np.testing.assert_array_equal(prr.extreme_hetero_capacities(n), caps)
    np.testing.assert_array_equal(prr.uniform_capacities(n), np.ones(n))


def test_route_zero_weight_still_routes():
    w = np.ones(40)
    w[3] = 0.0
    got = prr.route(w, None, k=3, seed=5, density=0.3)
    ones = np.round((w / w.mean()) * 0.3 * 40).clip(1, 40).astype(int)
    perm_s, perm_t = ref.auto_permutations(40, 5)
    want = ref.phase_router_counts(list(ones), [12] * 40, 40, 3, perm_s, perm_t, 5)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (40, 3) and got.dtype == np.int32


def test_two_dimensional_bits_and_any_integer_permutation():
    n, k, seed = 70, 4, 11
    rng = np.random.default_rng(0)
    ones_s, ones_t = rng.integers(0, n + 1, size=n), rng.integers(0, n + 1, size=n)
    ps, pt = rng.permutation(n), rng.permutation(n)
    flat = prr.phase_router(_crate_build_bits(ones_s, n), _crate_build_bits(ones_t, n), n, 2, k, ps, pt, seed)
    two_d = prr.phase_router(
        _crate_build_bits(ones_s, n).reshape(n, 2),
        _crate_build_bits(ones_t, n).reshape(n, 2),
        n,
        2,
        k,
        ps.astype(np.uint8),
        list(pt),
        np.uint64(seed),
    )
    np.testing.assert_array_equal(flat, two_d)


# -- validation: the one deliberate difference ------------------------------------------------------


def _args(n=8, k=2):
    bits = _crate_build_bits([3] * n, n)
    return [bits, bits.copy(), n, 1, k, np.arange(n), np.arange(n), 0]


@pytest.mark.parametrize(
    "index, value, exc, word",
    [
        (4, 0, ValueError, "k"),
        (4, 2.0, TypeError, "k"),
        (5, np.array([0, 1, 2, 3, 4, 5, 6, 6]), ValueError, "col_perm_s"),
        (6, np.arange(1, 9), ValueError, "col_perm_t"),
        (6, np.arange(7), ValueError, "col_perm_t"),
        (5, np.arange(8.0), TypeError, "col_perm_s"),
        (3, 2, ValueError, "nb_words"),
        (0, np.zeros(8, dtype=np.int64), TypeError, "s_bits"),
        (1, np.zeros(7, dtype=np.uint64), ValueError, "t_bits"),
        (7, -1, ValueError, "seed"),
        (7, 1 << 64, ValueError, "seed"),
        (2, 0, ValueError, "n"),
    ],
)
def test_phase_router_validation(index, value, exc, word):
    args = _args()
    args[index] = value
    with pytest.raises(exc, match=word):
        prr.phase_router(*args)


def test_other_entry_points_validate():
    with pytest.raises(ValueError, match="k"):
        prr.phase_router_auto(*_args()[:3], 0, 1)
    with pytest.raises(ValueError, match="n_experts"):
        prr.phase_router_uniform_dispatch(16, 0, 2, 0.3, 1)
    with pytest.raises(ValueError, match="base_density"):
        prr.phase_router_uniform_dispatch(16, 4, 2, float("nan"), 1)
    with pytest.raises(ValueError, match="source_weights"):
        prr.route(np.zeros(10))
    with pytest.raises(ValueError, match="target_capacities"):
        prr.route(np.ones(10), np.ones(9))
    with pytest.raises(ValueError, match="density"):
        prr.route(n=10, density=0.0)
    with pytest.raises(ValueError, match="backend"):
        prr.route(n=10, backend="tpu")


def test_readme_migration_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Migrating from phase_router_rs", 1)[1]
    (code,) = re.findall(r"```py\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    exec(compile(code, "README.md", "exec"), {})
