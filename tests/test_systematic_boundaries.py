"""The systematic router (SPEC §11) where slot points fall exactly on, or one unit below, a
capacity boundary: the cases an off-by-one in the slot point or the search changes.

Capacities here sum to small integers, so the units ``u[t]`` and ``U`` are exact and slot points
``x = ((s * n_src + perm_t[j]) * U + phi) // M`` land exactly on ``cum[t]`` for some slots; the
expected rows come from the plain formula below (Python integers), on the reference, the CPU
backend, the emulated CUDA kernel and (where present) a real GPU.
"""

from __future__ import annotations

import bisect

import numpy as np
import pytest

from gpu_phase_router import _reference, register_backend, route
from gpu_phase_router._keys import STREAM_PERM_T, STREAM_SYSTEMATIC, at, feistel, stream
from gpu_phase_router.backends import get_backend

CASES = [
    (caps, n, k, seed)
    for caps, shapes in [
        ([1, 2], [(3, 1), (6, 1), (3, 2)]),
        ([1, 1, 1, 1], [(4, 1), (4, 2), (8, 2), (6, 1)]),
        ([1, 0, 2, 0, 1], [(4, 1), (8, 2)]),
        ([1, 1, 2, 4], [(4, 2), (3, 2), (6, 1)]),
    ]
    for n, k in shapes
    for seed in range(12)
]


def plan(caps, n_src, k, seed):
    """SPEC §11 in Python integers: rows, and how many slot points sit exactly on a boundary
    (``x == cum[t]``) or one unit below one (``x + 1 == cum[t]`` with the remainder ``M - 1``)."""
    total = sum(caps)
    units = [0 if c == 0 else max(1, round(c / total * 2**31)) for c in caps]
    cum = [0]
    for u in units:
        cum.append(cum[-1] + u)
    big_u, m = cum[-1], n_src * k
    phi = at(stream(seed, STREAM_SYSTEMATIC), 0) % m
    key = stream(seed, STREAM_PERM_T)
    rows, on, below = [], 0, 0
    for j in range(n_src):
        p = feistel(j, n_src, key)
        row = []
        for s in range(k):
            num = (s * n_src + p) * big_u + phi
            x = num // m
            on += x in cum[1:-1]
            below += (x + 1) in cum[1:-1] and num % m == m - 1
            t = bisect.bisect_right(cum, x) - 1
            if t not in row:
                row.append(t)
        rows.append(row + [-1] * (k - len(row)))
    return rows, on, below


def test_cases_reach_the_boundaries():
    on = sum(plan(*case)[1] for case in CASES)
    below = sum(plan(*case)[2] for case in CASES)
    assert on >= 100 and below >= 8, (on, below)


def test_spec_vector_on_a_boundary():
    """SPEC §10: caps [1, 2], n_src 3, k 1, seed 4 — U = 2^31 exactly, phi = 0, and source 2's slot
    point is one unit below cum[1]."""
    rows, on, below = plan([1, 2], 3, 1, 4)
    assert rows == [[1], [0], [0]] and below == 1
    assert _reference.route_systematic([1, 2], 3, 1, 4).tolist() == [[1], [0], [0]]


@pytest.fixture(params=["reference", "cpu", "cuda-emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def kind(request):
    if request.param == "cuda-emulated":
        from simt import build, emulated_backend

        try:
            emulated_backend.library()
        except build.CompilerMissing as exc:
            pytest.skip(str(exc))
        register_backend("cuda-emulated", "simt.emulated_backend")
    elif request.param == "cuda":
        try:
            get_backend("cuda")
        except ValueError as exc:
            pytest.skip(f"real GPU run skipped: {exc}")
    return request.param


def test_boundary_cases_on_every_backend(kind):
    for caps, n_src, k, seed in CASES:
        want, _, _ = plan(caps, n_src, k, seed)
        if kind == "reference":
            got = _reference.route_systematic(caps, n_src, k, seed)
        else:
            got = route(np.ones(n_src), caps, k=k, seed=seed, method="systematic", backend=kind)
        got = got.get() if hasattr(got, "get") else np.asarray(got)
        assert got.tolist() == want, (caps, n_src, k, seed)
