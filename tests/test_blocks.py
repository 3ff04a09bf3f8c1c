"""Block routing (gpu_phase_router.blocks): any block of rows equals that slice of the full result."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from _grid import BACKEND_PARAMS, xp_of

import gpu_phase_router as gpr
from gpu_phase_router import _reference, _tree, blocks


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _cuts(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Random block boundaries over [0, n), always with an empty block and (n > 1) a one-row block."""
    inner = rng.integers(0, n + 1, size=int(rng.integers(1, 8))).tolist()
    one = int(rng.integers(0, n))
    cuts = sorted([0, n, *inner, one, one + 1, one + 1])  # the repeated cut makes an empty block
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _problem(rng: np.random.Generator, n_src: int, n_tgt: int):
    w = rng.random(n_src) * (rng.random(n_src) > 0.25) * 10.0 ** rng.integers(-3, 4, n_src)
    w[rng.integers(0, n_src)] += 0.5
    caps = rng.random(n_tgt) * (rng.random(n_tgt) > 0.2)
    caps[rng.integers(0, n_tgt)] += 0.5
    return w, caps


# --- summation tree -------------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(20))
def test_tree_sum_matches_reference_and_any_chunking(trial, monkeypatch):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 5000))
    v = rng.random(n) * 10.0 ** rng.integers(-8, 8, n)
    ref = _reference.tree_sum(v.tolist())
    monkeypatch.setattr(_tree, "TREE_EVAL_BLOCK", 1 << int(rng.integers(1, 8)))
    monkeypatch.setattr(_tree, "TREE_EVAL_ROWS", int(rng.integers(1, 5)))
    assert _tree.tree_sum(np, v) == ref
    parts = []
    for a, b in _cuts(rng, n):
        parts += blocks.sum_partials(v[a:b], a)
    rng.shuffle(parts)
    assert blocks.sum_from_partials(parts, n) == ref


def test_tree_sum_order_is_adjacent_pairs():
    e = 2.0**-53
    v = [e, 1.0, e, 0.0]  # adjacent pairs: (e + 1) + (e + 0) = 1.0; halves: (e + e) + (1 + 0) = 1 + 2^-52
    assert _reference.tree_sum(v) == 1.0
    assert _tree.tree_sum(np, np.array(v)) == 1.0
    assert (
        blocks.sum_from_partials(blocks.sum_partials(np.array(v[:1])) + blocks.sum_partials(np.array(v[1:]), 1), 4)
        == 1.0
    )


def test_sum_from_partials_rejects_gaps_and_overlaps():
    v = np.arange(1.0, 11.0)
    parts = blocks.sum_partials(v[:4], 0) + blocks.sum_partials(v[5:], 5)
    with pytest.raises(ValueError, match="cover"):
        blocks.sum_from_partials(parts, 10)
    with pytest.raises(ValueError, match="cover"):
        blocks.sum_from_partials(parts + blocks.sum_partials(v[3:5], 3), 10)
    with pytest.raises(TypeError, match="partials"):
        blocks.sum_from_partials([1.0, 2.0], 10)


# --- block routing == slice of the full result ------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("trial", range(12))
def test_route_block_phase_equals_full(trial, backend):
    xp = xp_of(backend)
    rng = np.random.default_rng(100 + trial)
    n_src, n_tgt = int(rng.integers(1, 400)), int(rng.integers(1, 70))
    k = int(rng.integers(1, n_tgt + 1))
    density = float(rng.choice([0.05, 0.3, 1.0]))
    w, caps = _problem(rng, n_src, n_tgt)
    full = gpr.route(w, caps, k=k, seed=trial, density=density, backend="cpu")
    if n_src <= 150:
        np.testing.assert_array_equal(full, _reference.route(caps, w, k=k, seed=trial, density=density))
    wx, cx = xp.asarray(w), xp.asarray(caps)
    parts = []
    for a, b in _cuts(rng, n_src):
        parts += blocks.sum_partials(wx[a:b], a)
    mean = blocks.sum_from_partials(parts, n_src) / n_src
    assert mean == blocks.weight_mean(w)
    prefix = 0
    got = []
    n_ring = blocks.ring_size(cx, n_src=n_src, k=k, density=density)  # V (SPEC §13) when n_tgt < n_src
    assert (n_ring == n_tgt) == (n_tgt >= n_src)
    for a, b in _cuts(rng, n_src):
        prefix = int(_host(blocks.source_degrees(wx[:a], weight_mean=mean, n_tgt=n_ring, density=density)).sum())
        r = gpr.route_block(
            wx[a:b],
            cx,
            n_src=n_src,
            row0=a,
            k=k,
            seed=trial,
            density=density,
            weight_mean=mean,
            degree_prefix=prefix,
            rows_per_call=int(rng.integers(1, 50)),
        )
        assert type(r) is type(wx) and r.dtype == np.int32 and r.shape == (b - a, k)
        np.testing.assert_array_equal(_host(r), full[a:b])
        got.append(_host(r))
    np.testing.assert_array_equal(np.concatenate(got), full)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("trial", range(8))
def test_route_block_systematic_equals_full(trial, backend):
    xp = xp_of(backend)
    rng = np.random.default_rng(200 + trial)
    n_src, n_tgt = int(rng.integers(1, 500)), int(rng.integers(1, 40))
    k = int(rng.integers(1, n_tgt + 1))
    _, caps = _problem(rng, n_src, n_tgt)
    full = gpr.route(np.full(n_src, 2.5), caps, k=k, seed=trial, method="systematic", backend="cpu")
    if n_src <= 150:
        np.testing.assert_array_equal(full, _reference.route_systematic(caps, n_src, k, trial))
    for a, b in _cuts(rng, n_src):
        r = gpr.route_block(
            xp.full(b - a, 2.5),
            xp.asarray(caps),
            n_src=n_src,
            row0=a,
            k=k,
            seed=trial,
            method="systematic",
            rows_per_call=int(rng.integers(1, 60)),
        )
        np.testing.assert_array_equal(_host(r), full[a:b])


def test_route_block_default_square_weights():
    """route(source_weights=None) is n_tgt sources of weight 1: ones, n_src = n_tgt, mean 1.0."""
    caps = [1, 1, 1, 8, 8, 2, 2, 1]
    full = gpr.route(target_capacities=caps, k=4, seed=42, density=1.0)
    rows = [
        gpr.route_block(
            np.ones(b - a), caps, n_src=8, row0=a, k=4, seed=42, density=1.0, weight_mean=1.0, degree_prefix=a * 8
        )
        for a, b in [(0, 3), (3, 3), (3, 4), (4, 8)]
    ]
    np.testing.assert_array_equal(np.concatenate(rows), full)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("given_perms", [False, True])
@pytest.mark.parametrize("trial", range(8))
def test_route_counts_block_equals_full(trial, given_perms, backend):
    xp = xp_of(backend)
    rng = np.random.default_rng(300 + trial)
    n_src, n_tgt = int(rng.integers(1, 400)), int(rng.integers(1, 90))
    k = int(rng.integers(1, n_tgt + 1))
    d = rng.integers(0, n_tgt + 1, n_src)
    c = rng.integers(0, n_src + 1, n_tgt)
    ps = rng.permutation(n_tgt) if given_perms else None
    pt = rng.permutation(n_src).astype(np.int32) if given_perms else None
    full = gpr.route_counts(d, c, k=k, seed=trial, perm_s=ps, perm_t=pt, backend="cpu")
    if n_src <= 120:
        np.testing.assert_array_equal(full, _reference.route_counts(d, c, k, trial, ps, pt))
    dx, cx = xp.asarray(d), xp.asarray(c)
    for a, b in _cuts(rng, n_src):
        r = gpr.route_counts_block(
            dx[a:b],
            cx,
            n_src=n_src,
            row0=a,
            degree_prefix=int(d[:a].sum()),
            k=k,
            seed=trial,
            perm_s=None if ps is None else xp.asarray(ps),
            perm_t=None if pt is None else xp.asarray(pt[a:b]),
            rows_per_call=int(rng.integers(1, 50)),
        )
        np.testing.assert_array_equal(_host(r), full[a:b])


def test_block_result_depends_on_global_inputs():
    """Guards against a block that silently ignores row0 / degree_prefix / n_src / weight_mean."""
    rng = np.random.default_rng(5)
    w, caps = _problem(rng, 300, 50)
    full = gpr.route(w, caps, k=4, seed=3)
    mean = blocks.weight_mean(w)
    prefix = int(blocks.source_degrees(w[:100], weight_mean=mean, n_tgt=blocks.ring_size(caps, n_src=300, k=4)).sum())
    kw = dict(n_src=300, row0=100, k=4, seed=3, weight_mean=mean, degree_prefix=prefix)
    np.testing.assert_array_equal(gpr.route_block(w[100:200], caps, **kw), full[100:200])
    for change in (dict(row0=99), dict(degree_prefix=prefix + 1), dict(n_src=301), dict(weight_mean=mean * 1.5)):
        assert not np.array_equal(gpr.route_block(w[100:200], caps, **{**kw, **change}), full[100:200]), change


# --- validation -------------------------------------------------------------------------------


def _ok_phase(**over):
    kw = dict(n_src=10, row0=2, k=2, seed=1, weight_mean=1.0, degree_prefix=3)
    kw.update(over)
    src = kw.pop("w", np.ones(3))
    caps = kw.pop("caps", np.ones(4))
    return gpr.route_block(src, caps, **kw)


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        (dict(n_src=0), ValueError, "n_src"),
        (dict(n_src=1.5), TypeError, "n_src"),
        (dict(row0=-1), ValueError, "row0"),
        (dict(row0=8), ValueError, r"row0 \+ len\(source_weights\)"),
        (dict(degree_prefix=None), TypeError, "degree_prefix"),
        (dict(degree_prefix=-1), ValueError, "degree_prefix"),
        # above row0 * (ring length): the ring is SPEC §13's virtual ring here (4 targets < 10 sources)
        (dict(degree_prefix=2 * blocks.ring_size(np.ones(4), n_src=10, k=2) + 1), ValueError, "degree_prefix"),
        (dict(weight_mean=None), TypeError, "weight_mean"),
        (dict(weight_mean=0.0), ValueError, "weight_mean"),
        (dict(weight_mean=float("nan")), ValueError, "weight_mean"),
        (dict(weight_mean="1"), TypeError, "weight_mean"),
        (dict(w=np.array([1.0, -1.0, 1.0])), ValueError, "source_weights"),
        (dict(w=np.array([1.0, np.inf, 1.0])), ValueError, "source_weights"),
        (dict(w=np.ones((3, 1))), ValueError, "source_weights"),
        (dict(w=np.array(["a"])), TypeError, "source_weights"),
        (dict(caps=np.zeros(4)), ValueError, "target_capacities"),
        (dict(caps=None), TypeError, "target_capacities"),
        (dict(k=5), ValueError, "k"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(density=0.0), ValueError, "density"),
        (dict(method="nope"), ValueError, "method"),
        (dict(rows_per_call=0), ValueError, "rows_per_call"),
        (dict(backend="tpu"), ValueError, "backend"),
    ],
)
def test_route_block_validation(over, exc, match):
    with pytest.raises(exc, match=match):
        _ok_phase(**over)


def test_ring_size_checks_n_src_like_route_block():
    with pytest.raises(ValueError, match="n_src"):
        blocks.ring_size(np.ones(4), n_src=2**70, k=2)  # was OverflowError from a C long
    assert blocks.ring_size(np.ones(4), n_src=2**63 - 1, k=2) >= 4


def test_route_block_systematic_validation():
    with pytest.raises(ValueError, match="uniform"):
        gpr.route_block(np.array([1.0, 2.0]), np.ones(4), n_src=10, row0=0, k=2, method="systematic")
    with pytest.raises(ValueError, match="uniform and positive"):
        gpr.route_block(np.zeros(2), np.ones(4), n_src=10, row0=0, k=2, method="systematic")
    with pytest.raises(ValueError, match="2\\^31"):
        gpr.route_block(np.ones(2), np.ones(4), n_src=1 << 30, row0=0, k=4, method="systematic")
    # phase-only arguments are not needed
    assert gpr.route_block(np.ones(2), np.ones(4), n_src=10, row0=8, k=2, method="systematic").shape == (2, 2)


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        (dict(d=np.array([0, 5, 1])), ValueError, "source_degrees"),
        (dict(d=np.array([0.0, 1.0, 1.0])), TypeError, "source_degrees"),
        (dict(c=np.array([0, 11, 1, 1])), ValueError, "target_counts"),
        (dict(c=np.zeros(0, dtype=np.int64)), ValueError, "target_counts"),
        (dict(row0=9), ValueError, "row0"),
        (dict(degree_prefix=-2), ValueError, "degree_prefix"),
        (dict(perm_s=np.array([0, 0, 1, 2])), ValueError, "perm_s"),
        (dict(perm_t=np.array([1, 2])), ValueError, "perm_t"),
        (dict(perm_t=np.array([1, 2, 10])), ValueError, "perm_t"),
        (dict(perm_t=np.array([1, 2, 1])), ValueError, "perm_t"),
        (dict(k=0), ValueError, "k"),
    ],
)
def test_route_counts_block_validation(over, exc, match):
    kw = dict(n_src=10, row0=2, degree_prefix=3, k=2, seed=1)
    d = over.pop("d", np.array([0, 4, 1]))
    c = over.pop("c", np.array([3, 3, 2, 2]))
    kw.update(over)
    with pytest.raises(exc, match=match):
        gpr.route_counts_block(d, c, **kw)


def test_empty_block():
    r = gpr.route_counts_block(np.zeros(0, np.int64), [1, 2, 3], n_src=5, row0=5, degree_prefix=7, k=2, seed=0)
    assert r.shape == (0, 2) and r.dtype == np.int32
    r = gpr.route_block(np.zeros(0), [1, 2, 3], n_src=5, row0=0, k=2, weight_mean=1.0, degree_prefix=0)
    assert r.shape == (0, 2)


# --- memory: O(block) beyond input and output --------------------------------------------------


@pytest.mark.parametrize("method", ["phase", "systematic", "counts"])
def test_whole_vector_routing_keeps_temporaries_small(method, monkeypatch):
    from gpu_phase_router.backends import _numba_runtime

    # the warm-up and the measured calls choose their threads alike whatever else runs (another test
    # process): with one thread chosen for the warm-up and two for the measured call, the parallel
    # kernel would be compiled or loaded from the cache inside the measurement
    monkeypatch.setattr(_numba_runtime, "_others_running", lambda: 0)
    n, n_tgt, k, block = 1 << 20, 64, 4, 1 << 14
    rng = np.random.default_rng(0)
    w = rng.random(n) + 0.5 if method == "phase" else np.ones(n)
    caps = rng.random(n_tgt) + 0.1
    d = rng.integers(0, n_tgt + 1, n)
    c = rng.integers(0, n + 1, n_tgt)
    # compile first, at a size past 2^15 sources: the same ring width (int32) as the measured call
    warm = 40_000
    gpr.route(w[:warm], caps, k=k, method="systematic" if method == "systematic" else "phase")
    gpr.route_counts(d[:warm], np.minimum(c, warm), k=k, seed=1)
    tracemalloc.start()
    try:
        if method == "counts":
            out = gpr.route_counts(d, c, k=k, seed=1, rows_per_call=block)
        else:
            out = gpr.route(w, caps, k=k, seed=1, method=method, rows_per_call=block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    extra = peak - out.nbytes
    # whole-size int64/float64 temporaries would cost 8 MiB each; validation's bool masks cost 1 MiB
    assert extra < 2 * n, f"{method}: {extra / 2**20:.1f} MiB beyond the output"


@pytest.mark.parametrize("method", ["phase", "systematic", "hash", "weighted_hash"])
def test_route_block_uniform_sources_without_weights(method):
    """source_weights=None routes rows [row0, n_src) of sources of weight 1, needing no globals."""
    caps = np.array([1.0, 3.0, 0.0, 2.0, 5.0, 1.0])
    full = gpr.route(np.ones(40), caps, k=3, seed=8, method=method)
    for row0 in (0, 13, 39):
        got = blocks.route_block(None, caps, n_src=40, row0=row0, k=3, seed=8, method=method)
        np.testing.assert_array_equal(got, full[row0:])
