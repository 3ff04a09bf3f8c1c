"""Public API behaviour: shapes, defaults, helpers, interop, import hygiene, the load law."""

import subprocess
import sys

import numpy as np
import pytest
from _garbage import garbage_of_ours

import gpu_phase_router as gpr
from gpu_phase_router import _keys, _reference
from gpu_phase_router.methods import available_methods


def test_defaults_are_the_seeds():
    out = gpr.route()
    assert out.shape == (1024, 4) and out.dtype == np.int32
    np.testing.assert_array_equal(out, gpr.route(np.ones(1024), np.ones(1024), 1024, 4, 42, 0.3))


def test_rectangular_tokens_by_experts():
    caps = np.r_[np.full(8, 4.0), np.ones(56)]
    out = gpr.route(np.ones(5000), caps, k=2, seed=3)
    assert out.shape == (5000, 2)
    assert out.min() >= -1 and out.max() < 64


def test_zero_weight_never_routes_and_zero_capacity_never_receives():
    w = np.ones(200)
    w[::7] = 0
    caps = np.ones(50)
    caps[::5] = 0
    out = gpr.route(w, caps, k=3, seed=8, density=0.8)
    assert (out[::7] == -1).all()
    assert not np.isin(out, np.flatnonzero(caps == 0)).any()


def test_list_inputs_give_numpy():
    out = gpr.route([1.0, 2.0, 3.0], [1, 1, 1, 1], k=2)
    assert isinstance(out, np.ndarray)


def test_auto_permutation_is_a_permutation():
    p = gpr.auto_permutation(1000, 5, 2)
    assert sorted(p.tolist()) == list(range(1000))
    assert p[:20].tolist() == [_keys.feistel(i, 1000, _keys.stream(5, 2)) for i in range(20)]


def test_left_aligned_bits_matches_the_seeds_loop():
    ones = np.array([0, 1, 63, 64, 65, 130, 7])
    n = 130
    got = gpr.left_aligned_bits(ones, n)
    nbw = (n + 63) // 64
    want = np.zeros((len(ones), nbw), dtype=np.uint64)
    for i, cnt in enumerate(ones):  # the crate's build_bits, bit by bit
        for b in range(cnt):
            want[i, b // 64] |= np.uint64(1) << np.uint64(b % 64)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(gpr.popcount_rows(got, n), ones)


def test_pack_bits_layout():
    rng = np.random.default_rng(0)
    dense = rng.random((5, 100)) < 0.4
    packed = gpr.pack_bits(dense)
    assert packed.shape == (5, 2) and packed.dtype == np.uint64
    for i in range(5):
        for b in range(100):
            assert bool((int(packed[i, b // 64]) >> (b % 64)) & 1) == dense[i, b]
    assert gpr.popcount_rows(packed, 100).tolist() == dense.sum(1).tolist()
    assert _reference.popcount_rows(packed.tolist(), 100) == dense.sum(1).tolist()


@pytest.mark.subprocess
def test_import_loads_no_heavy_modules():
    code = (
        "import sys, gpu_phase_router\n"
        "bad = [m for m in ('cupy', 'torch', 'numba', 'dask') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_law_large_case():
    """The crate's load law: per-target load tracks the encoded capacity count, every row is
    distinct and drawn from its candidate set (membership checked by the SPEC §4 formula)."""
    n, k, seed = 4096, 4, 11
    rng = np.random.default_rng(1)
    caps = np.ones(n)
    caps[rng.permutation(n)[: n // 10]] = 8.0
    d = _reference_counts(np.ones(n), 0.3, n)
    c = _reference_counts(caps, 0.3, n)
    out = gpr.route(None, caps, k=k, seed=seed)
    valid = out >= 0
    # rows distinct
    srt = np.sort(np.where(valid, out, -np.arange(1, k + 1)), axis=1)
    assert (np.diff(srt, axis=1) != 0).all()
    # membership in C_j by the fused rule
    perm_s = gpr.auto_permutation(n, seed, 1)
    perm_t = gpr.auto_permutation(n, seed, 2)
    off_s = (np.cumsum(d) - d) % n
    off_t = (np.cumsum(c) - c) % n
    rows, slots = np.nonzero(valid)
    cols = out[rows, slots]
    in_window = (perm_s[cols] - off_s[rows]) % n < d[rows]
    in_ring = (c[cols] >= n) | ((perm_t[rows] - off_t[cols]) % n < c[cols])
    assert in_window.all() and in_ring.all()
    loads = np.bincount(cols, minlength=n)
    assert np.corrcoef(loads, c)[0, 1] > 0.8  # a capacity-blind router gives about 0
    ratio = loads[caps == 8].mean() / loads[caps == 1].mean()
    assert 4.0 < ratio < 9.0  # big experts get several times the load of small ones


def _reference_counts(w, density, n_other):
    return np.array(_reference.weights_to_counts(w.tolist(), density, n_other))


@pytest.mark.torch
def test_torch_cpu_in_torch_out():
    torch = pytest.importorskip("torch", reason="torch not installed: interop with torch tensors not exercised")
    caps = torch.tensor([1.0, 2.0, 8.0, 1.0])
    out = gpr.route(None, caps, k=2, seed=1)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), gpr.route(None, caps.numpy(), k=2, seed=1))
    mixed = gpr.route(np.ones(4), caps, k=2, seed=1)  # host NumPy data joins the torch side
    assert isinstance(mixed, torch.Tensor)
    np.testing.assert_array_equal(mixed.numpy(), gpr.route(np.ones(4), caps.numpy(), k=2, seed=1))


def test_block_rows_is_the_former_name_of_rows_per_call():
    caps = np.arange(1.0, 9.0)
    want = gpr.route(np.ones(40), caps, k=2, seed=3, rows_per_call=7)
    np.testing.assert_array_equal(gpr.route(np.ones(40), caps, k=2, seed=3, block_rows=7), want)
    with pytest.raises(ValueError, match="block_rows"):
        gpr.route(np.ones(40), caps, k=2, seed=3, block_rows=0)
    with pytest.raises(TypeError, match="rows_per_call only"):
        gpr.route(np.ones(40), caps, k=2, seed=3, block_rows=7, rows_per_call=7)


@pytest.mark.parametrize("method", available_methods())
def test_a_route_leaves_no_reference_cycles(method):
    """Training loops that tune or disable the collector must not accumulate our garbage."""
    caps = np.r_[np.full(8, 4.0), np.ones(56)]

    def call():
        gpr.route(np.ones(4096), caps, k=2, seed=3, method=method)
        gpr.route(np.ones(300), np.ones(300), k=3, seed=3, method=method)  # square: not banded

    call()  # compiles or loads the kernels first
    assert garbage_of_ours(call) == []
