"""Hash baselines: exact agreement with a plain-Python oracle, determinism, distinctness,
zero capacities, proportionality (statistically), block independence, no torch import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _grid import XP_PARAMS, to_host
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu_phase_router as gpr
from gpu_phase_router import _reference as ref
from gpu_phase_router._keys import at, stream

HASH_STREAM, WEIGHTED_STREAM = 5, 6  # documented in gpu_phase_router.baselines


# ── plain-Python oracles (Python integers, no xp code) ───────────────────────────────────────


def oracle_hash(n_src, n_tgt, k, seed, weights=None, caps=None):
    """Slot s of source j: the (key mod P)-th target of positive capacity, P of them (all if caps is None)."""
    positive = list(range(n_tgt)) if caps is None else [t for t in range(n_tgt) if caps[t] > 0]
    rows = []
    for j in range(n_src):
        if weights is not None and weights[j] == 0:
            rows.append([-1] * k)
            continue
        base = at(stream(seed, HASH_STREAM), j)
        rows.append([positive[at(base, s) % len(positive)] for s in range(k)])
    return rows


def oracle_weighted_hash(caps, n_src, k, seed, weights=None):
    units = ref.capacity_units(caps)
    rows = []
    for j in range(n_src):
        row = [-1] * k
        if weights is None or weights[j] != 0:
            base = at(stream(seed, WEIGHTED_STREAM), j)
            left_units = list(units)  # drawn targets get 0 units
            for s in range(min(k, sum(1 for u in units if u))):
                x = at(base, s) % sum(left_units)
                t, acc = 0, left_units[0]  # linear inverse-CDF over what is left
                while x >= acc:
                    t += 1
                    acc += left_units[t]
                row[s] = t
                left_units[t] = 0
        rows.append(row)
    return rows


# ── exact agreement ──────────────────────────────────────────────────────────────────────────


def test_hash_never_sends_to_zero_capacity():
    r = gpr.route(np.ones(1000), [0, 0, 1, 1], k=2, method="hash")
    assert set(np.unique(r).tolist()) == {2, 3}  # the case: 954 of 2000 slots went to 0 and 1
    caps = [0.0, 3.0, 0.0, 1.0, 1.0, 0.0, 7.0]
    w = [1.0, 0.0, 2.0] * 20
    got = gpr.route(w, caps, k=3, seed=5, method="hash")
    assert got.tolist() == oracle_hash(60, 7, 3, 5, w, caps)
    counts = np.bincount(gpr.route(np.ones(4000), caps, k=2, seed=6, method="hash").ravel(), minlength=7)
    assert counts[[0, 2, 5]].sum() == 0 and counts[[1, 3, 4, 6]].min() > 1700  # uniform over the positive ones


@settings(max_examples=60, deadline=None)
@given(
    n_src=st.integers(1, 40),
    n_tgt=st.integers(1, 40),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_hash_with_zero_capacities_matches_oracle(n_src, n_tgt, k, seed, data):
    k = min(k, n_tgt)
    caps = data.draw(st.lists(st.sampled_from([0.0, 1.0, 4.0]), min_size=n_tgt, max_size=n_tgt).filter(any))
    got = gpr.route(np.ones(n_src), caps, k=k, seed=seed, method="hash")
    assert got.tolist() == oracle_hash(n_src, n_tgt, k, seed, caps=caps)


@settings(max_examples=60, deadline=None)
@given(
    n_src=st.integers(1, 40),
    n_tgt=st.integers(1, 40),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_hash_matches_oracle(n_src, n_tgt, k, seed, data):
    k = min(k, n_tgt)
    w = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=n_src, max_size=n_src).filter(any))
    got = gpr.route(w, np.ones(n_tgt), k=k, seed=seed, method="hash")
    assert got.dtype == np.int32 and got.shape == (n_src, k)
    assert got.tolist() == oracle_hash(n_src, n_tgt, k, seed, w)


@settings(max_examples=60, deadline=None)
@given(
    caps=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 100.0]), min_size=1, max_size=30).filter(any),
    n_src=st.integers(1, 30),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**64 - 1),
)
def test_weighted_hash_matches_oracle(caps, n_src, k, seed):
    k = min(k, len(caps))
    got = gpr.route(np.ones(n_src), np.array(caps), k=k, seed=seed, method="weighted_hash")
    assert got.tolist() == oracle_weighted_hash(caps, n_src, k, seed)


def test_weighted_hash_zero_weight_rows():
    w = [1.0, 0.0, 2.0, 0.0]
    caps = [1.0, 2.0, 0.0, 4.0, 1.0]
    got = gpr.route(w, caps, k=3, seed=9, method="weighted_hash")
    assert got.tolist() == oracle_weighted_hash(caps, 4, 3, 9, w)
    assert (got[[1, 3]] == -1).all()


@pytest.mark.parametrize("method", ["hash", "weighted_hash"])
@pytest.mark.parametrize("xp", XP_PARAMS)
def test_xp_paths_and_blocks_agree(method, xp):
    caps = gpr.strong_hetero_capacities(300, seed=4)
    expected = gpr.route(np.ones(1000), caps, k=4, seed=17, method=method, backend="cpu")
    got = gpr.route(xp.ones(1000), xp.asarray(caps), k=4, seed=17, method=method, backend="auto", rows_per_call=97)
    assert type(got) is type(xp.ones(1))
    np.testing.assert_array_equal(to_host(got), expected)


# ── determinism, distinctness, zero capacity ─────────────────────────────────────────────────


@pytest.mark.parametrize("method", ["hash", "weighted_hash"])
def test_deterministic_per_seed(method):
    caps = gpr.mild_hetero_capacities(256, seed=0)
    a = gpr.route(target_capacities=caps, k=4, seed=5, method=method)
    b = gpr.route(target_capacities=caps, k=4, seed=5, method=method)
    c = gpr.route(target_capacities=caps, k=4, seed=6, method=method)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5


def test_hash_route_helper():
    r = gpr.hash_route(128, 3, seed=2)
    np.testing.assert_array_equal(r, gpr.route(n=128, k=3, seed=2, method="hash"))
    assert r.tolist() == oracle_hash(128, 128, 3, 2)


def test_hash_is_blind_to_positive_capacities_and_may_repeat():
    n, k = 64, 16
    a = gpr.route(target_capacities=np.ones(n), k=k, seed=1, method="hash")
    b = gpr.route(target_capacities=gpr.extreme_hetero_capacities(n), k=k, seed=1, method="hash")
    np.testing.assert_array_equal(a, b)
    # with replacement, like the seed: 64 rows of 16 draws from 64 targets repeat somewhere
    assert any(len(set(row)) < k for row in a.tolist())


@pytest.mark.parametrize("k", [1, 4, 16, 40])
def test_weighted_hash_distinct_and_never_zero_capacity(k):
    caps = gpr.extreme_hetero_capacities(64, seed=3)
    caps[::5] = 0.0
    r = gpr.route(np.ones(500), caps, k=k, seed=8, method="weighted_hash")
    n_pos = int((caps > 0).sum())
    assert (r >= 0).all() if k <= n_pos else True
    for row in r.tolist():
        vals = [t for t in row if t >= 0]
        assert len(vals) == len(set(vals)) == min(k, n_pos)
        assert all(caps[t] > 0 for t in vals)


def test_weighted_hash_fewer_positive_targets_than_k():
    caps = [0.0, 5.0, 0.0, 1.0, 0.0]
    r = gpr.route(np.ones(50), caps, k=4, seed=0, method="weighted_hash")
    assert (r[:, 2:] == -1).all()
    assert all(sorted(row[:2]) == [1, 3] for row in r.tolist())


# ── proportionality (statistical: loose, but able to fail) ───────────────────────────────────


def test_weighted_hash_k1_is_proportional():
    caps = np.array([1.0, 2.0, 4.0, 8.0, 0.0, 1.0])
    n_src = 60_000
    r = gpr.route(np.ones(n_src), caps, k=1, seed=21, method="weighted_hash")
    loads = gpr.compute_loads(r, len(caps))
    expected = n_src * caps / caps.sum()
    assert loads[4] == 0
    pos = caps > 0
    chi2 = float((((loads - expected) ** 2)[pos] / expected[pos]).sum())
    assert chi2 < 25.0  # 5 degrees of freedom: p < 2e-4 for a correct sampler
    assert gpr.load_stats(loads, caps)["corr"] > 0.999


def test_weighted_hash_k2_matches_successive_sampling():
    caps = np.array([1.0, 2.0, 3.0, 4.0])
    p = caps / caps.sum()
    # inclusion probability of t in a 2-draw successive sample: p_t + sum_{u != t} p_u p_t / (1 - p_u)
    incl = np.array([p[t] + sum(p[u] * p[t] / (1 - p[u]) for u in range(4) if u != t) for t in range(4)])
    n_src = 40_000
    r = gpr.route(np.ones(n_src), caps, k=2, seed=22, method="weighted_hash")
    freq = gpr.compute_loads(r, 4) / n_src
    sd = np.sqrt(incl * (1 - incl) / n_src)
    assert np.all(np.abs(freq - incl) < 5 * sd)


def test_uniform_hash_is_uniform():
    n_tgt, n_src, k = 10, 20_000, 3
    r = gpr.route(np.ones(n_src), np.ones(n_tgt), k=k, seed=4, method="hash")
    loads = gpr.compute_loads(r, n_tgt)
    expected = n_src * k / n_tgt
    chi2 = float(((loads - expected) ** 2 / expected).sum())
    assert chi2 < 33.7  # 9 degrees of freedom: p < 1e-4


def test_capacity_aware_baseline_tracks_capacity_better_than_blind():
    caps = gpr.strong_hetero_capacities(1024, seed=0)
    stats = {
        m: gpr.load_stats(gpr.compute_loads(gpr.route(target_capacities=caps, k=2, method=m), 1024), caps)
        for m in ("hash", "weighted_hash")
    }
    assert stats["weighted_hash"]["corr"] > 0.7 > 0.2 > stats["hash"]["corr"]


# ── misc ─────────────────────────────────────────────────────────────────────────────────────


def test_methods_registered():
    assert {"hash", "weighted_hash"} <= set(gpr.available_methods())


@pytest.mark.subprocess
def test_no_torch_or_cupy_import():
    code = (
        "import sys, numpy as np, gpu_phase_router as g;"
        "g.route(n=32, k=2, method='hash'); g.route(n=32, k=2, method='weighted_hash');"
        "g.enforce_capacity(g.hash_route(32, 2), g.make_hard_caps(np.ones(32), 32, 2));"
        "print('torch' in sys.modules, 'cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
