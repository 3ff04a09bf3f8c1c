"""Chunked kernel calls and the serial (fork-safe) path give exactly the reference's rows."""

import numpy as np
import pytest

import gpu_phase_router as gpr
from gpu_phase_router import _reference
from gpu_phase_router._keys import STREAM_PERM_T, feistel, stream
from gpu_phase_router.backends import _numba_runtime as rt
from gpu_phase_router.backends import get_backend


@pytest.fixture(params=["parallel", "serial"])
def tiny_chunks(request, monkeypatch):
    """Chunks of a few hundred work units (dozens of kernel calls per route), parallel or serial."""
    monkeypatch.setattr(rt, "CHUNK_WORK", 97)
    monkeypatch.setattr(rt, "_serial_only", request.param == "serial")
    return request.param


def test_row_chunks_cover_rows_in_order(monkeypatch):
    monkeypatch.setattr(rt, "CHUNK_WORK", 50)
    rng = np.random.default_rng(1)
    for rows, min_rows in [(1, 1), (10, 1), (1000, 7), (333, 64)]:
        work = rng.integers(0, 200, rows)
        chunks = list(rt.row_chunks(rows, work, min_rows=min_rows))
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(chunks, chunks[1:], strict=False))
        assert all(b - a >= min(min_rows, rows - a) for a, b in chunks)
        assert len(chunks) > 1 or rows < 20
        chunks = list(rt.row_chunks(rows, 30, min_rows=min_rows))
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
    assert list(rt.row_chunks(0, 5)) == []


def test_phase_rows_chunked_equal_reference(tiny_chunks):
    rng = np.random.default_rng(5)
    n_src, n_tgt = 300, 90
    d = rng.integers(0, n_tgt + 1, n_src)
    c = rng.integers(0, n_src + 1, n_tgt)
    for k in (1, 3, 40):
        want = _reference.route_counts(d.tolist(), c.tolist(), k, 11)
        np.testing.assert_array_equal(gpr.route_counts(d, c, k=k, seed=11, backend="cpu"), want)


def test_systematic_chunked_equal_reference(tiny_chunks):
    caps = [1, 0, 3, 0.5, 10, 2, 2]
    want = _reference.route_systematic(caps, 500, 3, 8)
    np.testing.assert_array_equal(gpr.route(np.ones(500), caps, k=3, seed=8, method="systematic", backend="cpu"), want)


def test_feistel_chunked_equal_reference(tiny_chunks):
    key = stream(3, STREAM_PERM_T)
    be = get_backend("cpu")
    got = be.feistel(5, 20000, 30011, key)
    want = [feistel(5 + i, 30011, key) for i in range(20000)]
    np.testing.assert_array_equal(got, want)


def _seed_bits(ones: np.ndarray, n: int) -> np.ndarray:
    """Flat uint64 rows with bits ``0 .. ones[i] - 1`` set (written here, not taken from compat)."""
    nbw = (n + 63) // 64
    words = np.zeros((n, nbw), dtype=np.uint64)
    for i, o in enumerate(ones.tolist()):
        for w in range(nbw):
            lo, hi = 64 * w, min(64 * w + 64, o)
            if hi > lo:
                words[i, w] = np.uint64((1 << (hi - lo)) - 1)
    return words.reshape(-1)


def test_crate_exact_chunked_equal_oracle(tiny_chunks):
    """Crate-exact mode (SPEC §14): every chunk seeds row j's ChaCha stream with seed + j, so tiny chunks
    give the oracle's rows (a chunk that passed its first row's offset for every row would not)."""
    import gpu_phase_router.compat as prr
    from gpu_phase_router import _crate_reference as ref

    rng = np.random.default_rng(23)
    n = 300
    s_bits = _seed_bits(rng.integers(0, 40, n), n)
    t_bits = _seed_bits(rng.integers(0, 120, n), n)
    want = ref.phase_router_auto(s_bits, t_bits, n, 3, 77)
    assert (want >= 0).sum() > 300  # rows hold candidates, so a wrong stream changes them
    np.testing.assert_array_equal(prr.phase_router_auto(s_bits, t_bits, n, 3, 77, backend="cpu"), want)
