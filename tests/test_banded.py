"""SPEC §13 (banded phase router): the reference against the SPEC vectors and a hand derivation,
and the CPU backend against the reference."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

import gpu_phase_router as gpr
from gpu_phase_router import _prep, _reference
from gpu_phase_router._keys import at, stream

LAYOUT_1 = dict(n_cols=16, k_draw=8, widths=[4, 0, 8, 4], counts=[12, 0, 12, 12],
                col_map=[0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3])
ROUTE_1 = [[2, 3], [0, 2], [2, 0], [2, 0], [2, 0], [3, 2], [3, 2], [0, 2], [2, 0], [2, 3], [3, 2], [2, 0]]
CAPS_2 = [3, 1, 0, 1.5, 0.2]
ROUTE_2 = [[3, 0], [0, 3], [4, 3], [0, 4], [0, 3], [1, 4]]
ROUTE_3 = [[3, 0, 1], [-1, -1, -1], [1, 3, 0], [0, 3, 1]]


def test_spec_layout_vectors():
    assert _reference.band_layout([1, 0, 2, 1], 12, 2, 1.0) == LAYOUT_1
    lay = _reference.band_layout(CAPS_2, 40, 1, 0.6)
    got = (lay["n_cols"], lay["k_draw"], lay["widths"], lay["counts"])
    assert got == (23, 4, [12, 4, 0, 6, 1], [24, 24, 0, 24, 19])


def test_spec_route_vectors_reference():
    assert _reference.route([1, 0, 2, 1], [1] * 12, k=2, seed=42, density=1.0).tolist() == ROUTE_1
    assert _reference.route(CAPS_2, [1] * 40, k=2, seed=7, density=0.6).tolist()[:6] == ROUTE_2
    assert _reference.route(CAPS_2, [1, 0, 2, 0.5] * 10, k=3, seed=7, density=0.6).tolist()[:4] == ROUTE_3


def test_hand_derivation_density_one():
    """With density 1 every virtual column is a candidate: R_j is the k_draw smallest keys over all V
    columns, written here from SPEC §5 and §13 directly (no ring machinery)."""
    col_map = LAYOUT_1["col_map"]
    for j in range(12):
        base = at(stream(42, 3), j)
        drawn = sorted(range(16), key=lambda v: (at(base, v), v))[:8]
        row: list[int] = []
        for v in drawn:
            if col_map[v] not in row:
                row.append(col_map[v])
        assert row[:2] == ROUTE_1[j]


def test_first_distinct():
    cm = [0, 0, 1, 2, 2]
    assert _reference.first_distinct([0, 1, 3, 2], cm, 2) == [0, 2]
    assert _reference.first_distinct([0, 1, -1, -1], cm, 2) == [0, -1]
    assert _reference.first_distinct([4, 3, 2, 0], cm, 3) == [2, 1, 0]


@pytest.mark.parametrize("backend", ["cpu"])
def test_spec_route_vectors_backend(backend):
    assert gpr.route(np.ones(12), [1, 0, 2, 1], k=2, seed=42, density=1.0, backend=backend).tolist() == ROUTE_1
    assert gpr.route(np.ones(40), CAPS_2, k=2, seed=7, density=0.6, backend=backend).tolist()[:6] == ROUTE_2
    got = gpr.route(np.array([1, 0, 2, 0.5] * 10), CAPS_2, k=3, seed=7, density=0.6, backend=backend)
    assert got.tolist()[:4] == ROUTE_3


def test_host_layout_matches_reference():
    for caps, n_src, k, density in [([1, 0, 2, 1], 12, 2, 1.0), (CAPS_2, 40, 1, 0.6), ([5.0] * 7, 1000, 3, 0.3),
                                    ([1e-3, 1, 1e3], 50, 2, 0.05), ([0, 0, 1], 10, 1, 0.9)]:
        want = _reference.band_layout([float(c) for c in caps], n_src, k, density)
        lay = _prep.band_layout(np.asarray(caps, dtype=np.float64), n_src, k, density)
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


CPU_GRID = [(n_src, n_tgt, k, kind, density)
            for (n_src, n_tgt), kind, density in itertools.product(
                [(9, 2), (40, 5), (300, 8), (257, 16), (1200, 64), (3000, 300)],
                ["uniform", "zeros", "strong", "dominant"], [0.3, 0.7])
            for k in sorted({1, 2, 3, 8} & set(range(1, n_tgt + 1)))
            if n_src * n_tgt * k <= 2_000_000]  # the reference is plain Python


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
