"""The test vectors of SPEC §10, checked on the reference and on every CPU entry point."""

import numpy as np
import pytest

import gpu_phase_router as gpr
from gpu_phase_router import _keys, _reference

ROUTE_DENSITY_1 = [
    [4, 0, 5, 6],
    [3, 2, 6, 4],
    [6, 3, 4, 0],
    [5, 7, 4, 1],
    [4, 2, 6, 3],
    [3, 7, 4, 5],
    [3, 4, 6, 0],
    [3, 7, 5, 4],
]
ROUTE_DENSITY_03 = [
    [4, 6, -1, -1],
    [-1, -1, -1, -1],
    [-1, -1, -1, -1],
    [3, -1, -1, -1],
    [-1, -1, -1, -1],
    [-1, -1, -1, -1],
    [5, -1, -1, -1],
    [3, 7, -1, -1],
]
SYSTEMATIC = [[2, 4, -1], [0, 4, -1], [2, 4, -1], [3, 4, -1], [2, 4, -1], [0, 4, -1]]
SYSTEMATIC_BOUNDARY = [[1], [0], [0]]  # caps [1, 2], n_src 3, k 1, seed 4: a slot point exactly on a boundary
CAPS = [1, 1, 1, 8, 8, 2, 2, 1]


def test_key_vectors():
    assert _keys.mix64(_keys.GOLDEN) == 0xE220A8397B1DCDAF
    assert _keys.at(0, 0) == 0xE220A8397B1DCDAF
    assert _keys.stream(42, 1) == 0xBDD732262FEB6E95
    assert _keys.at(_keys.stream(42, 3), 0) == 0x0018A66858653D4B


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_feistel_vectors(backend):
    def perm(n, seed, s):
        if backend == "reference":
            return [_keys.feistel(i, n, _keys.stream(seed, s)) for i in range(n)]
        return gpr.auto_permutation(n, seed, s).tolist()

    assert perm(10, 42, 1) == [9, 5, 3, 7, 8, 4, 1, 6, 0, 2]
    assert perm(16, 7, 2) == [0, 13, 9, 15, 11, 3, 12, 10, 6, 1, 5, 8, 7, 14, 4, 2]
    assert _keys.feistel(123456, 1000000, _keys.stream(42, 2)) == 417975
    got = gpr.get_backend("cpu").feistel(123456, 1, 1000000, _keys.stream(42, 2))
    assert got.tolist() == [417975]


@pytest.mark.parametrize("density, expected", [(1.0, ROUTE_DENSITY_1), (0.3, ROUTE_DENSITY_03)])
def test_route_vectors(density, expected):
    assert _reference.route(CAPS, k=4, seed=42, density=density).tolist() == expected
    out = gpr.route(target_capacities=CAPS, k=4, seed=42, density=density)
    assert out.dtype == np.int32 and out.shape == (8, 4)
    assert out.tolist() == expected


def test_systematic_vector():
    caps = [1, 0, 3, 0.5, 10]
    assert _reference.route_systematic(caps, 6, 3, 1).tolist() == SYSTEMATIC
    out = gpr.route(source_weights=[1] * 6, target_capacities=caps, k=3, seed=1, method="systematic")
    assert out.tolist() == SYSTEMATIC


def test_systematic_vector_on_a_capacity_boundary():
    assert _reference.route_systematic([1, 2], 3, 1, 4).tolist() == SYSTEMATIC_BOUNDARY
    out = gpr.route(source_weights=[1] * 3, target_capacities=[1, 2], k=1, seed=4, method="systematic")
    assert out.tolist() == SYSTEMATIC_BOUNDARY


def test_route_vector_through_bits():
    """The same vector through the crate's bit-packed low-level entry point."""
    d = _reference.weights_to_counts([1.0] * 8, 1.0, 8)
    c = _reference.weights_to_counts([float(v) for v in CAPS], 1.0, 8)
    s_bits = gpr.left_aligned_bits(d, 8).ravel()
    t_bits = gpr.left_aligned_bits(c, 8).ravel()
    assert gpr.phase_router_auto(s_bits, t_bits, 8, 4, 42).tolist() == ROUTE_DENSITY_1
    ps = gpr.auto_permutation(8, 42, 1)
    pt = gpr.auto_permutation(8, 42, 2)
    assert gpr.phase_router(s_bits, t_bits, 8, 1, 4, ps, pt, 42).tolist() == ROUTE_DENSITY_1
