"""Capacity tools (SPEC §12) against the plain reference and direct counting; systematic router
share guarantees (SPEC §11)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from _grid import XP_PARAMS, to_host
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu_phase_router as gpr
from gpu_phase_router import _reference as ref
from gpu_phase_router.capacity import CAPACITY_PROFILES

# ── strategies ────────────────────────────────────────────────────────────────────────────────

caps_strategy = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)),
    min_size=1,
    max_size=40,
).filter(lambda c: any(v > 0 for v in c))


@st.composite
def routes_and_caps(draw):
    n_tgt = draw(st.integers(1, 12))
    n_src = draw(st.integers(0, 30))
    k = draw(st.integers(1, 5))
    vals = draw(st.lists(st.integers(-1, n_tgt - 1), min_size=n_src * k, max_size=n_src * k))
    hard = draw(st.lists(st.integers(0, 6), min_size=n_tgt, max_size=n_tgt))
    return np.array(vals, dtype=np.int32).reshape(n_src, k), hard


def enforce_by_loop(routes, hard):
    """Independent row-major admission with a dict (not the reference's code)."""
    out = [list(map(int, row)) for row in routes]
    used: dict[int, int] = {}
    for row in out:
        for s, t in enumerate(row):
            if t == -1:
                continue
            if used.get(t, 0) < hard[t]:
                used[t] = used.get(t, 0) + 1
            else:
                row[s] = -1
    return out


# ── make_hard_caps ────────────────────────────────────────────────────────────────────────────


@settings(max_examples=200, deadline=None)
@given(
    caps=caps_strategy,
    n_src=st.integers(1, 5000),
    k=st.integers(1, 16),
    headroom=st.floats(min_value=1.0, max_value=4.0),
)
def test_make_hard_caps_matches_reference(caps, n_src, k, headroom):
    got = gpr.make_hard_caps(np.array(caps), n_src, k, headroom)
    assert got.dtype == np.int64
    assert got.tolist() == ref.hard_caps(caps, n_src, k, headroom)


def test_make_hard_caps_by_hand():
    # sum = 8; shares 1/8, 0, 3/8, 4/8 of 10 * 2 * 1.5 = 30 slots -> 3.75, 0, 11.25, 15
    assert gpr.make_hard_caps([1.0, 0.0, 3.0, 4.0], 10, 2, 1.5).tolist() == [4, 0, 12, 15]
    # a tiny positive capacity still gets one slot
    assert gpr.make_hard_caps([1e-9, 1.0], 4, 1, 1.0).tolist() == [1, 4]


@pytest.mark.parametrize(
    "bad, exc",
    [(0.99, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("2", TypeError), (True, TypeError)],
)
def test_make_hard_caps_rejects_bad_headroom(bad, exc):
    with pytest.raises(exc, match="headroom"):
        gpr.make_hard_caps([1.0, 2.0], 4, 2, bad)


@pytest.mark.parametrize("caps", [[-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_make_hard_caps_rejects_bad_caps(caps):
    with pytest.raises(ValueError, match="rel_caps"):
        gpr.make_hard_caps(caps, 4, 2)


# ── enforce_capacity ──────────────────────────────────────────────────────────────────────────


@settings(max_examples=300, deadline=None)
@given(data=routes_and_caps())
def test_enforce_capacity_matches_reference(data):
    routes, hard = data
    got = gpr.enforce_capacity(routes, np.array(hard, dtype=np.int64))
    expected = ref.enforce_capacity(routes, hard)
    np.testing.assert_array_equal(got, expected)
    assert got.tolist() == enforce_by_loop(routes, hard)
    assert got.dtype == routes.dtype and got.shape == routes.shape


@pytest.mark.parametrize("xp", XP_PARAMS)
def test_enforce_capacity_large_random(xp):
    rng = np.random.default_rng(3)
    n_tgt, n_src, k = 97, 3000, 4
    routes = rng.integers(-1, n_tgt, size=(n_src, k)).astype(np.int32)
    hard = rng.integers(0, 200, size=n_tgt)
    hard[::10] = 0
    got = gpr.enforce_capacity(xp.asarray(routes), xp.asarray(hard))
    assert type(got) is type(xp.asarray(routes))
    np.testing.assert_array_equal(to_host(got), ref.enforce_capacity(routes, hard.tolist()))


@pytest.mark.parametrize("xp", XP_PARAMS)
def test_caps_loads_survival_on_each_library(xp):
    caps = gpr.extreme_hetero_capacities(300, seed=1)
    caps[5] = 0.0
    hard = gpr.make_hard_caps(xp.asarray(caps), 2000, 3, 1.3)
    assert type(hard) is type(xp.asarray(caps))
    assert to_host(hard).tolist() == ref.hard_caps(caps.tolist(), 2000, 3, 1.3)
    routes = np.random.default_rng(0).integers(-1, 300, size=(2000, 3)).astype(np.int32)
    loads = gpr.compute_loads(xp.asarray(routes), 300)
    np.testing.assert_array_equal(to_host(loads), np.bincount(routes[routes >= 0], minlength=300))
    assert gpr.survival_rate(xp.asarray(routes)) == float((routes >= 0).mean())


def test_enforce_capacity_by_hand_and_no_mutation():
    routes = np.array([[0, 1], [0, -1], [0, 1], [2, 0]], dtype=np.int32)
    before = routes.copy()
    got = gpr.enforce_capacity(routes, [2, 1, 0])
    assert got.tolist() == [[0, 1], [0, -1], [-1, -1], [-1, -1]]
    np.testing.assert_array_equal(routes, before)


def test_enforce_capacity_keeps_int64():
    routes = np.array([[1, 1, 1]], dtype=np.int64)
    got = gpr.enforce_capacity(routes, np.array([0, 2]))
    assert got.dtype == np.int64 and got.tolist() == [[1, 1, -1]]


@pytest.mark.parametrize(
    "routes, caps, exc, match",
    [
        (np.array([[0, 3]]), [1, 1, 1], ValueError, r"targets < len\(hard_caps\)=3"),
        (np.array([[0, -2]]), [1, 1, 1], ValueError, "-1"),
        (np.array([0, 1]), [1, 1], ValueError, "2-D"),
        (np.array([[0.0, 1.0]]), [1, 1], TypeError, "integers"),
        (np.array([[0, 1]]), [1, -1], ValueError, ">= 0"),
        (np.array([[0, 1]]), [1.0, 1.0], TypeError, "integers"),
    ],
)
def test_enforce_capacity_rejects_bad_input(routes, caps, exc, match):
    with pytest.raises(exc, match=match):
        gpr.enforce_capacity(routes, caps)


def test_enforce_capacity_unsigned_routes_name_the_argument():
    """Dropped slots become -1, which an unsigned array cannot hold."""
    with pytest.raises(TypeError, match="routes.*signed"):
        gpr.enforce_capacity(np.array([[0, 1]], dtype=np.uint8), np.array([0, 1]))


def test_enforce_capacity_caps_beyond_int64_admit_every_slot():
    routes = np.array([[0, 1], [1, 0], [0, 1]], dtype=np.int32)
    got = gpr.enforce_capacity(routes, np.array([2**63, 2**64 - 1], dtype=np.uint64))
    assert got.tolist() == routes.tolist()
    got = gpr.enforce_capacity(routes, np.array([2**63, 1], dtype=np.uint64))
    assert got.tolist() == [[0, 1], [-1, 0], [0, -1]]


def test_capacity_helpers_reject_overflowing_sums_and_bad_loads():
    """SPEC §7/§9: a sum that overflows float64 is invalid input (the shares would silently be 0)."""
    with pytest.raises(ValueError, match="rel_caps.*overflows"):
        gpr.make_hard_caps([1e308, 1e308], 10, 2)
    with pytest.raises(ValueError, match="capacities.*overflows"):
        gpr.load_stats([1, 2], [1e308, 1e308])
    for bad, exc in [([-1.0, 2.0], ValueError), ([np.nan, 2.0], ValueError), (["a", "b"], TypeError)]:
        with pytest.raises(exc, match="loads"):
            gpr.load_stats(bad)
    with pytest.raises(TypeError, match="n_tgt"):
        gpr.survival_rate(np.array([[0, 1]]), 4.0)


# ── loads, survival, stats ────────────────────────────────────────────────────────────────────


@settings(max_examples=100, deadline=None)
@given(data=routes_and_caps())
def test_loads_and_survival_by_counting(data):
    routes, hard = data
    n_tgt = len(hard)
    loads = gpr.compute_loads(routes, n_tgt)
    flat = [int(v) for v in routes.ravel()]
    assert loads.tolist() == [flat.count(t) for t in range(n_tgt)]
    if flat:
        served = sum(1 for v in flat if v != -1)
        assert gpr.survival_rate(routes) == served / len(flat)
        assert gpr.survival_rate(routes, n_tgt) == served / len(flat)


def test_survival_counts_padding_as_not_served():
    routes = np.array([[3, -1], [-1, -1]], dtype=np.int32)
    assert gpr.survival_rate(routes) == 0.25
    with pytest.raises(ValueError, match="n_tgt=2"):
        gpr.survival_rate(routes, 2)


def test_load_stats_by_hand():
    loads = np.array([2, 0, 4, 6])
    caps = np.array([1.0, 0.0, 2.0, 1.0])
    s = gpr.load_stats(loads, caps)
    mean = 3.0
    std = math.sqrt(((2 - 3) ** 2 + 9 + 1 + 9) / 4)
    assert s["mean"] == mean and s["min"] == 0 and s["max"] == 6
    assert s["std"] == pytest.approx(std) and s["cv"] == pytest.approx(std / mean)
    assert s["max_over_mean"] == pytest.approx(2.0)
    # fair loads over positive-capacity targets: 12 * [1/4, 2/4, 1/4] = [3, 6, 3]
    ratios = [2 / 3, 4 / 6, 6 / 3]
    r_mean = sum(ratios) / 3
    r_std = math.sqrt(sum((r - r_mean) ** 2 for r in ratios) / 3)
    assert s["ratio_mean"] == pytest.approx(r_mean) and s["ratio_std"] == pytest.approx(r_std)
    assert s["ratio_min"] == pytest.approx(2 / 3) and s["ratio_max"] == pytest.approx(2.0)
    cm, lm = caps.mean(), loads.mean()
    cov = sum((c - cm) * (x - lm) for c, x in zip(caps, loads, strict=True))
    corr = cov / math.sqrt(sum((c - cm) ** 2 for c in caps) * sum((x - lm) ** 2 for x in loads))
    assert s["corr"] == pytest.approx(corr)


def test_load_stats_degenerate():
    s = gpr.load_stats(np.zeros(4), np.ones(4))
    assert s["cv"] == 0.0 and s["max_over_mean"] == 0.0 and math.isnan(s["corr"])
    assert "corr" not in gpr.load_stats(np.ones(3))


# ── capacity profiles ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "name, levels",
    [
        ("uniform", {1.0: 1.0}),
        ("mild", {3.0: 0.2, 1.0: 0.8}),
        ("strong", {8.0: 0.1, 2.0: 0.2, 1.0: 0.7}),
        ("extreme", {16.0: 0.05, 1.0: 0.95}),
    ],
)
@pytest.mark.parametrize("n", [100, 1000])
def test_profiles(name, levels, n):
    fn = CAPACITY_PROFILES[name]
    caps = fn(n, seed=5)
    assert caps.dtype == np.float64 and caps.shape == (n,)
    values, counts = np.unique(caps, return_counts=True)
    assert dict(zip(values.tolist(), (counts / n).tolist(), strict=True)) == pytest.approx(levels, abs=1.5 / n)
    np.testing.assert_array_equal(caps, fn(n, seed=5))
    if name != "uniform":
        assert not np.array_equal(caps, fn(n, seed=6))


def test_profile_names_exported():
    assert gpr.strong_hetero_capacities is CAPACITY_PROFILES["strong"]
    assert gpr.extreme_hetero_capacities(10).max() == 16.0  # at least one big target even when 5% < 1


# ── systematic router: exact shares (SPEC §11) ────────────────────────────────────────────────


def systematic_slots(caps, n_src, k, seed):
    """SPEC §11 slots before duplicate removal, with Python integers (independent of the kernels)."""
    total = ref.tree_sum(caps)
    units = [0 if v == 0 else max(1, int(np.rint(v / total * 2.0**31))) for v in caps]
    cum = np.concatenate([[0], np.cumsum(units)]).astype(object)
    big_u, m = int(cum[-1]), n_src * k
    _, perm_t = ref.derived_permutations(n_src, len(caps), seed)
    phi = gpr._keys.at(gpr._keys.stream(seed, 4), 0) % m
    slots = [
        [
            int(np.searchsorted(cum.astype(np.int64), ((s * n_src + perm_t[j]) * big_u + phi) // m, side="right")) - 1
            for s in range(k)
        ]
        for j in range(n_src)
    ]
    return slots, units, big_u


def dedup(row, k):
    out = []
    for t in row:
        if t not in out:
            out.append(t)
    return out + [-1] * (k - len(out))


@pytest.mark.parametrize("profile", list(CAPACITY_PROFILES))
@pytest.mark.parametrize("n, k", [(64, 1), (200, 3), (256, 8), (130, 16)])
def test_systematic_exact_shares(profile, n, k):
    caps = CAPACITY_PROFILES[profile](n, seed=1)
    caps[[3, 7]] = 0.0  # drained targets
    seed = 11
    slots, units, big_u = systematic_slots(caps.tolist(), n, k, seed)
    counts = np.bincount(np.ravel(slots), minlength=n)
    m = n * k
    for t in range(n):
        share = Fraction(m * units[t], big_u)
        assert counts[t] in (math.floor(share), math.ceil(share)), (t, counts[t], share)
    assert counts[3] == counts[7] == 0
    got = gpr.route(target_capacities=caps, k=k, seed=seed, method="systematic")
    assert got.tolist() == [dedup(row, k) for row in slots]


@pytest.mark.parametrize("profile", list(CAPACITY_PROFILES))
@pytest.mark.parametrize("n, k", [(256, 1), (512, 2), (1024, 2), (1024, 4), (1000, 8)])
def test_systematic_full_survival_at_headroom_one(profile, n, k):
    caps = CAPACITY_PROFILES[profile](n, seed=2)
    assert caps.max() / caps.sum() <= 1 / k
    for seed in (0, 1, 2):
        r = gpr.route(target_capacities=caps, k=k, seed=seed, method="systematic")
        assert (r >= 0).all()
        enforced = gpr.enforce_capacity(r, gpr.make_hard_caps(caps, n, k, 1.0))
        assert gpr.survival_rate(enforced) == 1.0


def test_systematic_dedups_only_big_targets():
    caps = np.ones(64)
    caps[0] = 64.0  # half of all capacity: above 1/k for k = 4
    r = gpr.route(target_capacities=caps, k=4, seed=3, method="systematic")
    assert ((r == -1).sum(axis=1) > 0).any()
    rows_with_pad = np.flatnonzero((r == -1).any(axis=1))
    assert (r[rows_with_pad] == 0).any(axis=1).all()
