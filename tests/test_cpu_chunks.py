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
    """Chunks of a few hundred work units (dozens of kernel calls per route), parallel or serial.

    "parallel" forces the parallel kernels even for these small calls (the thread policy would
    otherwise run them on one thread) and on two threads where Numba has them."""
    monkeypatch.setattr(rt, "CHUNK_WORK", 97)
    monkeypatch.setattr(rt, "_serial_only", request.param == "serial")
    monkeypatch.setattr(rt, "PAR_MIN_WORK", 1)
    monkeypatch.setattr(rt, "_others_running", lambda: 0)
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


@pytest.mark.parametrize("given_perms", [False, True])
def test_swept_rows_chunked_equal_reference(tiny_chunks, given_perms, monkeypatch):
    """Square rows by a sweep (forced) in dozens of chunks: each chunk's rows in their own phase
    order, phases derived on the host or given."""
    from gpu_phase_router.backends import cpu

    monkeypatch.setattr(cpu, "_sweeps", lambda *args: True)
    rng = np.random.default_rng(6)
    n_src, n_tgt = 300, 90
    d = rng.integers(0, n_tgt + 1, n_src)
    c = rng.integers(0, n_src + 1, n_tgt)
    ps = rng.permutation(n_tgt) if given_perms else None
    pt = rng.permutation(n_src) if given_perms else None
    for k in (1, 3, 40):
        want = _reference.route_counts(d.tolist(), c.tolist(), k, 11, perm_s=ps, perm_t=pt)
        got = gpr.route_counts(d, c, k=k, seed=11, perm_s=ps, perm_t=pt, backend="cpu")
        np.testing.assert_array_equal(got, want)


def test_banded_chunked_equal_reference(tiny_chunks):
    """Short banded rows (the direct selection) and long ones (the chunked scan), with repeated targets."""
    rng = np.random.default_rng(9)
    for n_src, caps, k, density in [(400, [8, 2, 2, 1, 1, 1, 1, 1], 2, 0.3), (300, rng.random(12) + 0.05, 3, 1.0)]:
        w = rng.random(n_src) + 0.5
        want = _reference.route(list(map(float, caps)), w.tolist(), k=k, seed=4, density=density)
        got = gpr.route(w, np.asarray(caps, dtype=float), k=k, seed=4, density=density, backend="cpu")
        np.testing.assert_array_equal(got, want)


def test_threads_for_sizes_calls(monkeypatch):
    monkeypatch.setattr(rt, "_serial_only", False)
    monkeypatch.setattr(rt, "_configured_threads", lambda: 8)
    monkeypatch.setattr(rt, "_usable_cpus", lambda: 8)
    monkeypatch.setattr(rt, "_others_running", lambda: 0)
    assert rt.threads_for(0) == 1
    assert rt.threads_for(rt.PAR_MIN_WORK - 1) == 1  # a small call stays on one thread
    assert rt.threads_for(3 * rt.PAR_MIN_WORK) == 3
    assert rt.threads_for(100 * rt.PAR_MIN_WORK) == 8  # never above the configured threads
    short = rt.LONG_WORK - 1  # work for every thread, but shorter than LONG_WORK
    assert rt.threads_for(short) == 8
    monkeypatch.setattr(rt, "_others_running", lambda: 6)
    assert rt.threads_for(short) == 2  # a short call: only the CPUs other processes leave free
    assert rt.threads_for(rt.LONG_WORK) == 8  # a long call keeps its threads beside them
    monkeypatch.setattr(rt, "_others_running", lambda: 12)
    assert rt.threads_for(short) == 1
    assert rt.threads_for(rt.LONG_WORK) == 8
    monkeypatch.setattr(rt, "_serial_only", True)
    monkeypatch.setattr(rt, "_others_running", lambda: 0)
    assert rt.threads_for(100 * rt.PAR_MIN_WORK) == 1


def test_others_running_subtracts_this_process_running_threads(monkeypatch):
    """/proc/loadavg's runnable count less this process's threads in state R (at least the caller)."""
    files = {
        "/proc/loadavg": b"0.52 0.58 0.59 5/312 40123\n",
        "/proc/self/task/10/stat": b"10 (python (x) y) R 1 10 10 0 -1",
        "/proc/self/task/11/stat": b"11 (numba) S 1 10 10 0 -1",
        "/proc/self/task/12/stat": b"12 (omp) R 1 10 10 0 -1",
    }
    tasks = ["10", "11", "12", "13"]  # 13 ended between the listing and its read: skipped

    def read(path):
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    monkeypatch.setattr(rt, "_read_proc", read)
    monkeypatch.setattr(rt.os, "listdir", lambda path: tasks if path == "/proc/self/task" else [])
    assert rt._read_others_running() == 3  # 5 runnable, two of them this process's
    files["/proc/self/task/12/stat"] = b"12 (omp) S 1 10 10 0 -1"
    assert rt._read_others_running() == 4
    tasks[:] = []  # no thread read as running: the caller itself still counts
    assert rt._read_others_running() == 4
    files["/proc/loadavg"] = b"garbled"
    assert rt._read_others_running() == 0  # unreadable: no other process assumed


def test_read_proc_reads_a_real_file():
    import os

    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc on this system")
    assert rt._read_proc("/proc/loadavg").count(b"/") == 1
    assert rt._read_others_running() >= 0


def test_configured_threads_follow_numba_and_torch(monkeypatch):
    import sys
    import types

    import numba

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert rt._configured_threads() == 1  # numba.set_num_threads in this thread
        numba.set_num_threads(before)
        fake = types.SimpleNamespace(get_num_threads=lambda: 1)
        monkeypatch.setitem(sys.modules, "torch", fake)
        assert rt._configured_threads() == 1  # torch's intra-op threads cap ours
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3])
def test_sized_chunks_equal_row_chunks(monkeypatch, threads):
    """The one-chunk shortcut of sized_chunks yields what row_chunks does, at, below and above the
    budget, for per-row work arrays and a constant work."""
    monkeypatch.setattr(rt, "CHUNK_WORK", 1000)
    monkeypatch.setattr(rt, "threads_for", lambda total: threads)
    rng = np.random.default_rng(5)
    budget = threads * 1000
    for rows in (0, 1, 7, 300):
        work = rng.integers(1, 40, size=rows)
        for scale in (0.5, 1.0, 1.01, 3.0):  # the work summed to these multiples of the budget
            w = np.maximum(1, np.round(work * (scale * budget / max(1, int(work.sum()))))).astype(np.int64)
            want = [(a, b, threads) for a, b in rt.row_chunks(rows, w, min_rows=4 * threads, n_threads=threads)]
            assert list(rt.sized_chunks(rows, w, total=int(w.sum()), task_rows=4)) == want
        for each in (1, budget // max(1, rows) if rows else 1, budget):
            want = [(a, b, threads) for a, b in rt.row_chunks(rows, each, min_rows=4 * threads, n_threads=threads)]
            assert list(rt.sized_chunks(rows, each, total=rows * each, task_rows=4)) == want


def test_pool_threads_reads_what_numba_get_num_threads_says(monkeypatch):
    """The C getter read by ``_pool_threads`` agrees with ``numba.get_num_threads()`` in the calling
    Python thread (a per-thread setting) and in a second one; without the getter the public one is used."""
    import sys
    import threading
    import types

    import numba

    monkeypatch.delitem(sys.modules, "torch", raising=False)  # no torch cap on the counts compared here
    numba.get_num_threads()  # the pool runs from here on
    par = sys.modules["numba.np.ufunc.parallel"]
    before = numba.get_num_threads()
    seen = {}

    def other():
        seen["other"] = (rt._pool_threads(par), numba.get_num_threads(), rt._configured_threads())

    try:
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            assert rt._pool_threads(par) == numba.get_num_threads() == n
            assert rt._configured_threads() == n
            t = threading.Thread(target=other)
            t.start()
            t.join()
            assert seen["other"][0] == seen["other"][1] == seen["other"][2]
    finally:
        numba.set_num_threads(before)
    public_only = types.SimpleNamespace(get_num_threads=lambda: 3)
    assert rt._pool_threads(public_only) == 3


def test_others_running_skips_the_thread_listing_when_only_the_caller_runs(monkeypatch):
    def listdir(path):
        raise AssertionError("listed this process's threads with one runnable thread in the system")

    monkeypatch.setattr(rt, "_read_proc", lambda path: b"0.52 0.58 0.59 1/312 40123\n")
    monkeypatch.setattr(rt.os, "listdir", listdir)
    assert rt._read_others_running() == 0


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


def test_kernel_derived_phases_equal_spec_phases(tiny_chunks):
    """``phase_rows(phase=None, perm_key=K)`` (phases made by the kernel's tasks) equals the same rows
    given the phases ``feistel(row0 + i, n_src, K)`` of SPEC §6 in Python integers, at a row offset
    and over many tasks and chunks."""
    from gpu_phase_router.methods.phase import ring_layout

    be = get_backend("cpu")
    rng = np.random.default_rng(5)
    n_src, n_tgt, rows, row0, k = 1000, 48, 300, 417, 3
    c = rng.integers(0, n_src // 4, n_tgt)
    d = rng.integers(0, n_tgt + 1, rows)
    off_s = (np.cumsum(d) - d) % n_tgt
    ring = be.prepare_ring(*ring_layout(be, c, n_src, 9), n_src=n_src)
    key = stream(9, STREAM_PERM_T)
    phases = np.array([feistel(row0 + i, n_src, key) for i in range(rows)], dtype=np.int64)
    args = dict(n_src=n_src, k=k, row0=row0, select_key=stream(9, 3))
    got = be.phase_rows(None, off_s, d, ring, perm_key=key, **args)
    np.testing.assert_array_equal(got, be.phase_rows(phases, off_s, d, ring, **args))
    with pytest.raises(ValueError, match="perm_key"):
        be.phase_rows(None, off_s, d, ring, **args)


def _bit_rows(ones: np.ndarray, n: int) -> np.ndarray:
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
    s_bits = _bit_rows(rng.integers(0, 40, n), n)
    t_bits = _bit_rows(rng.integers(0, 120, n), n)
    want = ref.phase_router_auto(s_bits, t_bits, n, 3, 77)
    assert (want >= 0).sum() > 300  # rows hold candidates, so a wrong stream changes them
    np.testing.assert_array_equal(prr.phase_router_auto(s_bits, t_bits, n, 3, 77, backend="cpu"), want)


def test_crate_exact_chunked_equal_crate_vectors(tiny_chunks):
    """Crate-exact mode (SPEC §14) in many small chunks, parallel or serial: the crate's own outputs."""
    from test_crate_vectors import VECTORS, _check, _run

    cases = [c for c in VECTORS["kernel"] if c["n"] >= 100][:12] + VECTORS["big"][:1]
    assert len(cases) == 13
    for c in cases:
        _check(c, _run(c, "cpu"))
