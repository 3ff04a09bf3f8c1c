"""Dask integration: lazy, chunk-respecting, equal to single-process routing on any scheduler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import gpu_phase_router as gpr  # noqa: E402
from gpu_phase_router import dask as gdask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_SRC, N_TGT = 3000, 48
CHUNKINGS = [(N_SRC,), 1000, 299, (1, 0, 1500, 0, 1498, 1)]


def _weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.random(N_SRC) * (rng.random(N_SRC) > 0.3) * 10.0 ** rng.integers(-6, 6, N_SRC)
    w[7] = 1.0
    caps = rng.random(N_TGT) * (rng.random(N_TGT) > 0.2)
    caps[3] += 0.5
    return w, caps


@pytest.fixture(scope="module")
def client():
    """One small two-process cluster on loopback for the whole module."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "NUMBA_NUM_THREADS": "1"}
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None, env=env
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.mark.subprocess
def test_import_does_not_import_dask():
    code = "import sys, gpu_phase_router; assert not any(m == 'dask' or m.startswith('dask.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("method", gpr.available_methods())
def test_threaded_equals_single_process(method, chunks):
    w, caps = _weights(1)
    if method == "systematic":
        w = np.full(N_SRC, 3.0)
    full = gpr.route(w, caps, k=5, seed=11, method=method)
    wd = da.from_array(w, chunks=chunks)
    r = gdask.route(wd, caps, k=5, seed=11, method=method, rows_per_call=128)
    assert isinstance(r, da.Array) and r.dtype == np.int32 and r.shape == (N_SRC, 5)
    assert r.chunks == (wd.chunks[0], (5,))
    got = r.compute(scheduler="threads")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, full)


@pytest.mark.parametrize("chunks", CHUNKINGS[1:])
def test_route_counts_threaded_equals_single_process(chunks):
    rng = np.random.default_rng(2)
    d = rng.integers(0, N_TGT + 1, N_SRC).astype(np.int32)
    c = rng.integers(0, N_SRC + 1, N_TGT)
    ps = rng.permutation(N_TGT)
    full = gpr.route_counts(d, c, k=3, seed=5, perm_s=ps)
    r = gdask.route_counts(da.from_array(d, chunks=chunks), c, k=3, seed=5, perm_s=ps)
    np.testing.assert_array_equal(r.compute(scheduler="threads"), full)


@pytest.mark.parametrize("chunks", [1000, (1, 0, 1500, 0, 1498, 1), 97])
@pytest.mark.parametrize("method", ["phase", "systematic"])
def test_distributed_equals_single_process(client, method, chunks):
    w, caps = _weights(3)
    if method == "systematic":
        w = np.full(N_SRC, 0.25)
    full = gpr.route(w, caps, k=4, seed=2**64 - 1, density=0.5, method=method)
    r = gdask.route(da.from_array(w, chunks=chunks), caps, k=4, seed=2**64 - 1, density=0.5, method=method)
    np.testing.assert_array_equal(client.compute(r).result(), full)


def test_distributed_route_counts(client):
    rng = np.random.default_rng(4)
    d = rng.integers(0, N_TGT + 1, N_SRC)
    c = rng.integers(0, N_SRC + 1, N_TGT)
    full = gpr.route_counts(d, c, k=2, seed=9)
    np.testing.assert_array_equal(
        client.compute(gdask.route_counts(da.from_array(d, chunks=700), c, k=2, seed=9)).result(), full
    )


def test_weights_computed_on_workers_and_default_square(client):
    """Weights made lazily by a Dask computation (never in the client) — the usual large-data case."""
    w = da.ones(1024, chunks=100) * 2.0
    full = gpr.route(target_capacities=np.ones(1024), k=4, seed=42)
    np.testing.assert_array_equal(client.compute(gdask.route(w, np.ones(1024), k=4, seed=42)).result(), full)


@pytest.mark.parametrize("chunks", [37, 1000, 4097, (5000, 1, 4999, 3, 0, 1)])
def test_weight_mean_is_the_single_process_mean(chunks):
    """Values whose sum depends on the order: only the package's tree order gives route's mean."""
    rng = np.random.default_rng(8)
    w = np.where(rng.random(10004) < 0.01, 2.0**53, 1.0) + rng.random(10004)
    ref = gpr.blocks.weight_mean(w)
    assert ref != float(np.sum(w)) / w.shape[0] or ref != sum(w.tolist()) / w.shape[0]  # order matters here
    assert gdask.weight_mean(da.from_array(w, chunks=chunks)).compute(scheduler="threads") == ref


def test_is_lazy():
    calls = []

    def make(block, block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.ones(block.shape)

    w = da.zeros(500, chunks=100).map_blocks(make, dtype=np.float64)
    r = gdask.route(w, [1.0, 2.0, 3.0], k=2)
    assert calls == []
    r.compute(scheduler="sync")
    assert calls  # computed only now


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "caps", "kw", "exc", "match"),
    [
        (np.ones(10), [1.0, 2.0], {}, TypeError, "dask.array.Array"),
        (da.ones((10, 2), chunks=(5, 1)), [1.0, 2.0], {}, ValueError, "1-D"),
        (da.ones((10, 1), chunks=(5, 1)), [1.0, 2.0], {}, ValueError, "1-D"),
        (da.ones(0, chunks=5), [1.0, 2.0], {}, ValueError, "empty"),
        (
            da.ones(10, chunks=5).astype(bool)[da.ones(10, chunks=5) > 0],
            [1.0, 2.0],
            {},
            ValueError,
            "unknown chunk sizes",
        ),
        (da.from_array(np.array(["a"] * 4), chunks=2), [1.0, 2.0], {}, TypeError, "source_weights"),
        (da.ones(10, chunks=5), da.ones(2, chunks=1), {}, TypeError, "target_capacities"),
        (da.ones(10, chunks=5), [1.0, -2.0], {}, ValueError, "target_capacities"),
        (da.ones(10, chunks=5), [1.0, 2.0], {"k": 3}, ValueError, "k must"),
        (da.ones(10, chunks=5), [1.0, 2.0], {"k": 2, "seed": 2**64}, ValueError, "seed"),
        (da.ones(10, chunks=5), [1.0, 2.0], {"k": 2, "density": 2.0}, ValueError, "density"),
        (da.ones(10, chunks=5), [1.0, 2.0], {"k": 2, "method": "greedy"}, ValueError, "method"),
        (da.ones(10, chunks=5), [1.0, 2.0], {"k": 2, "rows_per_call": 0}, ValueError, "rows_per_call"),
        (da.ones(2**30, chunks=2**28), [1.0] * 8, {"k": 4, "method": "systematic"}, ValueError, "2\\^31"),
        # SPEC §11: seven equal capacities round to U = 2^31 - 2 units < n_src * k = 2^31
        (da.ones(2**30, chunks=2**28), [1.0] * 7, {"k": 2, "method": "systematic"}, ValueError, "<= U ="),
    ],
)
def test_structural_errors_raise_at_construction(weights, caps, kw, exc, match):
    with pytest.raises(exc, match=match):
        gdask.route(weights, caps, **kw)


@pytest.mark.parametrize(
    ("values", "method", "match"),
    [
        (np.r_[np.ones(50), -1.0, np.ones(49)], "phase", r"source_weights must be >= 0.*rows \[50, 60\)"),
        (np.r_[np.ones(50), np.nan, np.ones(49)], "phase", r"finite.*rows \[50, 60\)"),
        (np.zeros(100), "phase", "at least one positive"),
        (np.r_[np.ones(50), np.full(50, 2.0)], "systematic", "uniform"),
    ],
)
def test_value_errors_raise_at_compute(values, method, match):
    r = gdask.route(da.from_array(values, chunks=10), [1.0, 2.0, 3.0], k=2, method=method)
    with pytest.raises(ValueError, match=match):
        r.compute(scheduler="threads")


def test_route_counts_errors():
    with pytest.raises(TypeError, match="integer dtype"):
        gdask.route_counts(da.ones(10, chunks=5), [1, 2], k=1, seed=0)
    with pytest.raises(ValueError, match="target_counts"):
        gdask.route_counts(da.ones(10, chunks=5, dtype=np.int64), [1, 11], k=1, seed=0)
    with pytest.raises(ValueError, match="perm_s"):
        gdask.route_counts(da.ones(10, chunks=5, dtype=np.int64), [1, 2], k=1, seed=0, perm_s=[0, 0])
    r = gdask.route_counts(da.from_array(np.r_[np.ones(5, int), 3], chunks=3), [1, 2], k=1, seed=0)
    with pytest.raises(ValueError, match=r"source_degrees.*rows \[3, 6\)"):
        r.compute(scheduler="threads")


@pytest.mark.gpu
def test_cupy_chunks_match_numpy():
    cupy = pytest.importorskip("cupy", reason="CuPy not installed: CUDA chunks untested")
    try:
        gpr.get_backend("cuda")
    except Exception as exc:
        pytest.skip(f"CUDA backend not usable here: {exc}")
    w, caps = _weights(6)
    full = gpr.route(w, caps, k=4, seed=1)
    r = gdask.route(da.from_array(cupy.asarray(w), chunks=700), cupy.asarray(caps), k=4, seed=1)
    got = r.compute(scheduler="threads")
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_array_equal(got.get(), full)


# --- graph shape ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["phase", "systematic", "counts"])
def test_graph_grows_linearly_with_the_chunks(method):
    """A few tasks per chunk: building the graph of 10^4 chunks must not take minutes."""
    n_chunks = 300
    if method == "counts":
        r = gdask.route_counts(da.ones(n_chunks * 4, chunks=4, dtype=np.int64), np.full(8, 3), k=2, seed=1)
    else:
        r = gdask.route(da.ones(n_chunks * 4, chunks=4), np.ones(8), k=2, method=method)
    assert len(r.dask) <= 5 * n_chunks + 20
    assert sum(len(layer) for layer in r.dask.layers.values()) <= 5 * n_chunks + 20


@pytest.mark.parametrize("method", ["phase", "counts"])
def test_target_vector_is_in_the_graph_once(method):
    """The capacities (and perm_s) go to the workers once, not inside every chunk's task."""
    import pickle

    n_tgt, n_chunks = 50_000, 20
    rng = np.random.default_rng(5)
    if method == "counts":
        small = rng.integers(0, 2, n_tgt)
        r = gdask.route_counts(
            da.ones(n_chunks * 50, chunks=50, dtype=np.int64), small, k=2, seed=1, perm_s=rng.permutation(n_tgt)
        )
        vectors = small.nbytes + n_tgt * 8
    else:
        caps = rng.random(n_tgt) + 0.5
        r = gdask.route(da.ones(n_chunks * 50, chunks=50), caps, k=2)
        vectors = caps.nbytes
    tasks = dict(r.__dask_graph__())
    # each task pickled on its own, as a scheduler sends it to a worker
    assert sum(len(pickle.dumps(t)) for t in tasks.values()) < 2 * vectors + 3000 * len(tasks)


@pytest.mark.parametrize("method", ["phase", "systematic", "counts"])
def test_each_source_chunk_is_computed_once(method):
    """Weights made by an expensive computation (a file read) are made once, not once per pass."""
    calls = []

    def make(block, block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.ones(block.shape, dtype=block.dtype)

    if method == "counts":
        d = da.zeros(500, chunks=100, dtype=np.int64).map_blocks(make, dtype=np.int64)
        r = gdask.route_counts(d, [100, 200, 300], k=2, seed=0)
        full = gpr.route_counts(np.ones(500, dtype=np.int64), [100, 200, 300], k=2, seed=0)
    else:
        r = gdask.route(
            da.zeros(500, chunks=100).map_blocks(make, dtype=np.float64), [1.0, 2.0, 3.0], k=2, method=method
        )
        full = gpr.route(np.ones(500), [1.0, 2.0, 3.0], k=2, method=method)
    np.testing.assert_array_equal(r.compute(scheduler="sync"), full)
    assert sorted(calls) == [(i,) for i in range(5)]


def test_backend_name_checked_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        gdask.route(da.ones(10, chunks=5), [1.0, 2.0], k=2, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        gdask.route_counts(da.ones(10, chunks=5, dtype=np.int64), [1, 2], k=1, seed=0, backend="cupy")
    with pytest.raises(TypeError, match="backend must be a string"):
        gdask.route(da.ones(10, chunks=5), [1.0, 2.0], k=2, backend=None)
