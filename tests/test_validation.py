"""SPEC §9: every invalid input raises ValueError/TypeError naming the argument, before any kernel."""

import numpy as np
import pytest

import gpu_phase_router as gpr

N = 16
D = np.full(N, 5)
C = np.full(N, 5)
BITS = gpr.left_aligned_bits(D, N)
PERM = np.arange(N)


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(source_degrees=D.astype(float)), TypeError, "source_degrees.*integer dtype"),
        (dict(source_degrees=D.reshape(4, 4)), ValueError, "source_degrees must be 1-D"),
        (dict(source_degrees=np.full(N, N + 1)), ValueError, r"source_degrees values must lie in \[0, 16\]"),
        (dict(source_degrees=np.full(N, -1)), ValueError, "source_degrees values"),
        (dict(source_degrees=np.array([], dtype=np.int64)), ValueError, "source_degrees must not be empty"),
        (dict(target_counts=np.array([], dtype=np.int64)), ValueError, "target_counts must not be empty"),
        (dict(target_counts=np.full(N, N + 1)), ValueError, "target_counts values"),
        (dict(target_counts="abc"), TypeError, "target_counts"),
        (dict(k=0), ValueError, "k must be between 1 and 16; got 0"),
        (dict(k=17), ValueError, "k must be between 1 and 16; got 17"),
        (dict(k=2.0), TypeError, "k must be an integer"),
        (dict(k=True), TypeError, "k must be an integer"),
        (dict(seed=-1), ValueError, "seed must be between 0 and"),
        (dict(seed=2**64), ValueError, "seed must be between 0 and"),
        (dict(seed=1.5), TypeError, "seed must be an integer"),
        (dict(seed="42"), TypeError, "seed must be an integer"),
        (dict(perm_s=np.arange(N - 1)), ValueError, "perm_s must have length 16"),
        (dict(perm_s=np.zeros(N, dtype=np.int64)), ValueError, "perm_s must be a permutation"),
        (dict(perm_s=np.arange(N) + 1), ValueError, r"perm_s values must lie in \[0, 15\]"),
        (dict(perm_t=np.arange(N, dtype=float)), TypeError, "perm_t must have an integer dtype"),
        (dict(perm_t=np.r_[np.arange(N - 1), 3]), ValueError, "perm_t must be a permutation"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(backend=3), TypeError, "backend must be a string"),
        (dict(rows_per_call=0), ValueError, "rows_per_call must be"),
    ],
)
def test_route_counts_rejects(kwargs, exc, match):
    args = dict(source_degrees=D, target_counts=C, k=2, seed=1)
    args.update(kwargs)
    raises(exc, match, gpr.route_counts, args.pop("source_degrees"), args.pop("target_counts"), **args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(target_capacities=[1.0, -1.0]), ValueError, "target_capacities must be >= 0"),
        (dict(target_capacities=[1.0, np.nan]), ValueError, "target_capacities must be finite"),
        (dict(target_capacities=[1.0, np.inf]), ValueError, "target_capacities must be finite"),
        (dict(target_capacities=[0.0, 0.0]), ValueError, "target_capacities must have at least one positive"),
        (dict(target_capacities=[]), ValueError, "target_capacities must not be empty"),
        (dict(target_capacities=[[1.0, 2.0]]), ValueError, "target_capacities must be 1-D"),
        (dict(target_capacities=["a", "b"]), TypeError, "target_capacities must be a 1-D array of numbers"),
        (dict(target_capacities=[1 + 2j]), TypeError, "target_capacities must hold real numbers"),
        (dict(source_weights=[0.0, 0.0], target_capacities=[1.0]), ValueError, "source_weights must have at least"),
        (dict(source_weights=[1.0, -2.0], target_capacities=[1.0]), ValueError, "source_weights must be >= 0"),
        (dict(source_weights=5, target_capacities=[1.0]), ValueError, "source_weights must be 1-D"),
        (dict(target_capacities=[1.0] * 4, n=5), ValueError, "n=5 contradicts len\\(target_capacities\\)=4"),
        (dict(n=0), ValueError, "n must be >= 1"),
        (dict(density=0.0), ValueError, r"density must be in \(0, 1\]"),
        (dict(density=1.5), ValueError, r"density must be in \(0, 1\]"),
        (dict(density=float("nan")), ValueError, "density"),
        (dict(density="x"), TypeError, "density must be a real number"),
        (dict(target_capacities=[1.0] * 4, k=5), ValueError, "k must be between 1 and 4; got 5"),
        (dict(method="bogus"), ValueError, "method must be one of"),
        (
            dict(source_weights=[1.0, 2.0], target_capacities=[1.0, 1.0], method="systematic"),
            ValueError,
            "source_weights must be\\s+uniform",
        ),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(target_capacities=[1e308, 1e308]), ValueError, "target_capacities: the mean weight must be finite"),
        (dict(target_capacities=[1e308, 1e308], method="systematic"), ValueError, "target_capacities: the sum"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_route_rejects(kwargs, exc, match):
    args = dict(n=None, k=2, seed=1)
    args.update(kwargs)
    raises(exc, match, gpr.route, **args)


def test_k_passed_positionally_is_named_in_the_error():
    """``route(w, caps, 2)`` passes 2 as ``n`` (the crate's argument order: weights, capacities, n,
    k, seed); the error says so and how to pass ``k``."""
    with pytest.raises(ValueError, match=r"n=2 contradicts len\(source_weights\)=16.*third.*k=2"):
        gpr.route(np.ones(16), np.ones(8), 2)


def test_bits_rejections():
    ok = dict(n_src=N, n_tgt=N, k=2, seed=1)
    raises(TypeError, "s_bits must have dtype uint64", gpr.route_bits, BITS.astype(np.int64), BITS, **ok)
    raises(ValueError, r"t_bits must have shape \(16, 1\)", gpr.route_bits, BITS, BITS[:3], **ok)
    raises(ValueError, "s_bits must hold 16 rows x 1 words", gpr.route_bits, BITS.ravel()[:5], BITS, **ok)
    raises(ValueError, "n_src must be >= 1", gpr.route_bits, BITS, BITS, n_src=0, n_tgt=N, k=2, seed=1)
    padded = BITS.copy()
    padded[3, 0] |= np.uint64(1) << np.uint64(20)  # bit 20 >= n=16 is padding
    raises(ValueError, "s_bits has 1 row.*padding", gpr.route_bits, padded, BITS, **ok)
    raises(ValueError, "nb_words must be ceil", gpr.phase_router, BITS, BITS, N, 2, 2, PERM, PERM, 1)
    raises(ValueError, "col_perm_s must be a permutation", gpr.phase_router, BITS, BITS, N, 1, 2, PERM * 0, PERM, 1)
    raises(TypeError, "col_perm_s and col_perm_t are required", gpr.phase_router, BITS, BITS, N, 1, 2, None, PERM, 1)
    raises(ValueError, "words must be 2-D", gpr.popcount_rows, BITS.ravel(), N)


def test_non_contiguous_inputs_are_used_correctly():
    d = np.repeat(D, 2)[::2]
    c = np.repeat(C, 2)[::2]
    assert not d.flags.c_contiguous
    np.testing.assert_array_equal(gpr.route_counts(d, c, k=3, seed=4), gpr.route_counts(D, C, k=3, seed=4))
    wide = np.zeros((N, 2), dtype=np.uint64)
    wide[:, 0] = BITS[:, 0]
    np.testing.assert_array_equal(
        gpr.route_bits(wide[:, :1], wide[:, :1], n_src=N, n_tgt=N, k=2, seed=1),
        gpr.route_bits(BITS, BITS, n_src=N, n_tgt=N, k=2, seed=1),
    )


def test_cuda_backend_without_cupy_names_the_install_command():
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here; this checks the message shown without it")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"pip install 'gpu_phase_router\[cuda12\]'"):
        gpr.route(target_capacities=[1.0, 2.0], k=1, backend="cuda")


def test_systematic_needs_slot_points_within_the_capacity_units():
    """SPEC §11 with M = n_src * k > U would put the last slot point at x >= U, past every
    target; six equal capacities round to U = 6 * 357913941 = 2^31 - 2 units."""
    caps = np.ones(6)
    with pytest.raises(ValueError, match=r"n_src \* k <= U = 2147483646"):
        gpr.route_block(np.ones(4), caps, n_src=2**29, row0=0, k=4, method="systematic")
    with pytest.raises(ValueError, match=r"n_src \* k <= 2\^31"):
        gpr.route_block(np.ones(4), caps, n_src=2**29 + 1, row0=0, k=4, method="systematic")
    assert gpr.route_block(np.ones(4), caps, n_src=2**29 - 1, row0=0, k=4, method="systematic").shape == (4, 4)


def test_overflowing_sums_are_invalid_where_the_method_uses_the_sizes():
    """SPEC §9: a weight or capacity vector whose tree_sum overflows is invalid for the methods that
    use its sizes; the capacity-blind hash reads only which capacities are positive, and the hashes
    and systematic only which weights are, so they route it (as they route the same signs scaled)."""
    huge = [1.7e308, 1.7e308]
    for method in ("phase", "weighted_hash", "systematic"):
        with pytest.raises(ValueError, match="target_capacities.*overflows"):
            gpr.route(np.ones(4), huge, k=1, method=method)
    with pytest.raises(ValueError, match="source_weights.*overflows"):
        gpr.route(np.full(4, 1.7e308), [1.0, 2.0], k=1, method="phase")
    want = gpr.route(np.ones(4), [1.0, 1.0], k=1, method="hash")
    np.testing.assert_array_equal(gpr.route(np.ones(4), huge, k=1, method="hash"), want)
    for method in ("hash", "weighted_hash", "systematic"):
        want = gpr.route(np.ones(4), [1.0, 2.0], k=1, method=method)
        np.testing.assert_array_equal(gpr.route(np.full(4, 1.7e308), [1.0, 2.0], k=1, method=method), want)
