"""Crate-exact mode (SPEC §14): the crate's own outputs, on the oracle, the CPU and the CUDA kernel.

``tests/data/crate_vectors/`` holds 586 exact outputs of the crate ``phase_router_rs`` (MIT). Every
vector is checked on the plain-Python oracle (:mod:`gpu_phase_router._crate_reference`, the large
ones marked ``slow``), through :mod:`gpu_phase_router.compat` on the CPU backend, and on the CUDA
backend's host code with ``kernels/crate_router.cu`` run by the SIMT emulator (``big.jsonl`` there
is ``slow``); the real GPU runs them too where one exists. Randomized cases (Hypothesis) check
oracle == CPU == emulated CUDA beyond the vectors, including set bits beyond column ``n``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simt import build, emulated_backend

import gpu_phase_router.compat as prr
from gpu_phase_router import _crate_reference as ref
from gpu_phase_router import get_backend, register_backend, route_bits

DATA = Path(__file__).resolve().parent / "data" / "crate_vectors"
EMULATED = "cuda-emulated"
FILES = ("kernel", "auto", "uniform_dispatch", "big")
REF_FAST_N = 300  # the oracle runs larger vectors only in the slow suite


def _load(name: str) -> list[dict]:
    with open(DATA / f"{name}.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


VECTORS = {name: _load(name) for name in FILES}


def _params(name: str, slow_if=lambda c: False):
    return [pytest.param(c, id=c["id"], marks=[pytest.mark.slow] if slow_if(c) else []) for c in VECTORS[name]]


def _bits(ones: list[int], n: int) -> np.ndarray:
    """Row ``i`` with bits ``0 .. ones[i] - 1`` set (the vectors' bit matrices), written independently of compat."""
    nbw = (n + 63) // 64
    words = np.zeros((n, nbw), dtype=np.uint64)
    for i, o in enumerate(ones):
        for w in range(nbw):
            lo, hi = 64 * w, min(64 * w + 64, o)
            if hi > lo:
                words[i, w] = np.uint64((1 << (hi - lo)) - 1)
    return words.reshape(-1)


def _expected(c: dict) -> np.ndarray:
    rows = c["n_tokens"] if c["kind"] == "uniform_dispatch" else c["n"]
    return np.asarray(c["routes"], dtype=np.int32).reshape(rows, c["k"])


def _run(c: dict, backend: str) -> np.ndarray:
    """The vector's call through the compat module on ``backend``."""
    if c["kind"] == "uniform_dispatch":
        return prr.phase_router_uniform_dispatch(
            c["n_tokens"], c["n_experts"], c["k"], c["base_density"], c["seed"], c["oversample"], backend=backend
        )
    n = c["n"]
    if c.get("flow") == "route":
        a = c["route_args"]
        return prr.route(
            a["source_weights"], a["target_capacities"], a["n"], a["k"], a["seed"], a["density"], backend=backend
        )
    s_bits, t_bits = _bits(c["ones_s"], n), _bits(c["ones_t"], n)
    if c["kind"] == "auto":
        return prr.phase_router_auto(s_bits, t_bits, n, c["k"], c["seed"], backend=backend)
    return prr.phase_router(
        s_bits, t_bits, n, (n + 63) // 64, c["k"], c["col_perm_s"], c["col_perm_t"], c["seed"], backend=backend
    )


def _check(c: dict, got) -> None:
    got = np.asarray(got)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _expected(c), err_msg=c["id"])


@pytest.fixture(scope="module")
def emulated() -> str:
    try:
        emulated_backend.library()
    except build.CompilerMissing as exc:
        pytest.skip(str(exc))
    register_backend(EMULATED, "simt.emulated_backend")
    return EMULATED


# -- the data ----------------------------------------------------------------------------------


def test_manifest_and_counts():
    for line in (DATA / "MANIFEST").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name
    assert {name: len(v) for name, v in VECTORS.items()} == {
        "kernel": 300,
        "auto": 250,
        "uniform_dispatch": 30,
        "big": 6,
    }


# -- the oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "c", _params("kernel") + _params("auto", lambda c: c["n"] > REF_FAST_N) + _params("big", lambda c: True)
)
def test_reference_routes(c):
    n = c["n"]
    if c["kind"] == "auto":
        perm_s, perm_t = ref.auto_permutations(n, c["seed"])
        assert perm_s == c["col_perm_s"] and perm_t == c["col_perm_t"]
    else:
        perm_s, perm_t = c["col_perm_s"], c["col_perm_t"]
    if c.get("flow") == "route":
        a = c["route_args"]
        w = np.ones(a["n"]) if a["source_weights"] is None else np.asarray(a["source_weights"], dtype=np.float64)
        cap = np.ones(n) if a["target_capacities"] is None else np.asarray(a["target_capacities"], dtype=np.float64)
        d = a["density"]
        assert list(np.round((w / np.mean(w)) * d * n).clip(1, n).astype(int)) == c["ones_s"]
        assert list(np.round((cap / np.mean(cap)) * d * n).clip(1, n).astype(int)) == c["ones_t"]
    got = ref.phase_router(
        _bits(c["ones_s"], n), _bits(c["ones_t"], n), n, (n + 63) // 64, c["k"], perm_s, perm_t, c["seed"]
    )
    _check(c, got)


@pytest.mark.parametrize("c", _params("uniform_dispatch", lambda c: c["n_tokens"] > 1024))
def test_reference_uniform_dispatch(c):
    got = ref.phase_router_uniform_dispatch(
        c["n_tokens"], c["n_experts"], c["k"], c["base_density"], c["seed"], c["oversample"]
    )
    _check(c, got)


# -- the backends --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_cpu_all_vectors(name):
    for c in VECTORS[name]:
        _check(c, _run(c, "cpu"))


@pytest.mark.parametrize("name", ["kernel", "auto", "uniform_dispatch", pytest.param("big", marks=pytest.mark.slow)])
def test_emulated_cuda_all_vectors(name, emulated):
    for c in VECTORS[name]:
        _check(c, _run(c, emulated))


@pytest.mark.gpu
@pytest.mark.parametrize("name", FILES)
def test_real_cuda_all_vectors(name):
    try:
        get_backend("cuda")
    except ValueError as exc:
        pytest.skip(f"real GPU run skipped: {exc}")
    for c in VECTORS[name]:
        _check(c, _run(c, "cuda"))


# -- randomized: oracle == CPU == emulated CUDA ----------------------------------------------------


@st.composite
def cases(draw):
    n = draw(st.integers(1, 150))
    k = draw(st.integers(1, n + 3))
    nbw = (n + 63) // 64
    full = st.integers(0, n)
    ones_s = draw(st.lists(st.one_of(full, st.sampled_from([0, n, n // 2])), min_size=n, max_size=n))
    ones_t = draw(st.lists(st.one_of(full, st.sampled_from([0, n, 1])), min_size=n, max_size=n))
    s_bits = _bits(ones_s, n).reshape(n, nbw)
    t_bits = _bits(ones_t, n).reshape(n, nbw)
    if n % 64 and draw(st.booleans()):  # set bits beyond column n: they count, as in the crate
        rows = draw(st.lists(st.integers(0, n - 1), max_size=4))
        for r in rows:
            s_bits[r, -1] |= np.uint64(1) << np.uint64(63)
            t_bits[(r * 7) % n, -1] |= np.uint64(1) << np.uint64(n % 64)
    perm_s = draw(st.permutations(range(n)))
    perm_t = draw(st.permutations(range(n)))
    seed = draw(st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from([0, 42, (1 << 64) - 1, (1 << 64) - 3])))
    return n, k, s_bits, t_bits, perm_s, perm_t, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_random_reference_cpu_emulated(case, emulated):
    n, k, s_bits, t_bits, perm_s, perm_t, seed = case
    nbw = (n + 63) // 64
    want = ref.phase_router(s_bits, t_bits, n, nbw, k, perm_s, perm_t, seed)
    for backend in ("cpu", emulated):
        got = prr.phase_router(
            s_bits.reshape(-1), t_bits, n, nbw, k, np.asarray(perm_s, dtype=np.int16), perm_t, seed, backend=backend
        )
        np.testing.assert_array_equal(got, want, err_msg=backend)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 400), seed=st.integers(0, (1 << 64) - 1))
def test_random_auto_permutations(n, seed):
    perm_s, perm_t = prr.auto_permutations(n, seed)
    want_s, want_t = ref.auto_permutations(n, seed)
    assert perm_s.tolist() == want_s and perm_t.tolist() == want_t


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_tokens=st.integers(1, 200),
    n_experts=st.integers(1, 40),
    k=st.integers(1, 6),
    density=st.sampled_from([0.0, 0.05, 0.3, 0.5, 1.0, 1.7]),
    oversample=st.integers(0, 5),
    seed=st.integers(0, (1 << 64) - 1),
)
def test_random_uniform_dispatch(n_tokens, n_experts, k, density, oversample, seed, emulated):
    want = ref.phase_router_uniform_dispatch(n_tokens, n_experts, k, density, seed, oversample)
    for backend in ("cpu", emulated):
        got = prr.phase_router_uniform_dispatch(n_tokens, n_experts, k, density, seed, oversample, backend=backend)
        np.testing.assert_array_equal(got, want, err_msg=backend)


def test_emulated_schedules_agree(emulated):
    """The seed kernel's warp collectives give one result under every emulated thread schedule."""
    c = VECTORS["auto"][40]
    want = _expected(c)
    from gpu_phase_router import _crate

    n = c["n"]
    for schedule in (1, 2):
        be = emulated_backend.make_backend(schedule=schedule, seed=7)
        got = _crate.route_counts(
            be,
            np.asarray(c["ones_s"], dtype=np.int64),
            np.asarray(c["ones_t"], dtype=np.int64),
            np.asarray(c["col_perm_s"]),
            np.asarray(c["col_perm_t"]),
            c["k"],
            c["seed"],
        )
        np.testing.assert_array_equal(got.reshape(n, -1), want)


def test_stray_bits_count_fixed_case(emulated):
    """SPEC §14: set bits beyond column n count towards a row's popcount (the crate's rule), in S and
    in T; a fixed case where they change the routes, on the oracle, the CPU and emulated CUDA."""
    n, k, seed = 70, 3, 12345  # two words per row, the second holds columns 64..69 and 58 stray bits
    nbw = 2
    rng = np.random.default_rng(70)
    s_bits = _bits(rng.integers(0, 20, n).tolist(), n).reshape(n, nbw)
    t_bits = _bits(rng.integers(0, 40, n).tolist(), n).reshape(n, nbw)
    clean_s, clean_t = s_bits.copy(), t_bits.copy()
    for r in range(0, n, 3):
        s_bits[r, 1] |= np.uint64(0xFFFF) << np.uint64(40)  # 16 stray bits: columns 104..119
        t_bits[(r * 7) % n, 1] |= np.uint64(1) << np.uint64(63)
    perm_s = rng.permutation(n).tolist()
    perm_t = rng.permutation(n).tolist()
    want = ref.phase_router(s_bits.reshape(-1), t_bits.reshape(-1), n, nbw, k, perm_s, perm_t, seed)
    clean = ref.phase_router(clean_s.reshape(-1), clean_t.reshape(-1), n, nbw, k, perm_s, perm_t, seed)
    assert (want != clean).any(axis=1).sum() >= 10  # the stray bits matter in this case
    auto_want = ref.phase_router_auto(s_bits.reshape(-1), t_bits.reshape(-1), n, k, seed)
    for backend in ("cpu", emulated):
        got = prr.phase_router(s_bits.reshape(-1), t_bits, n, nbw, k, perm_s, perm_t, seed, backend=backend)
        np.testing.assert_array_equal(got, want, err_msg=backend)
        got = prr.phase_router_auto(s_bits.reshape(-1), t_bits.reshape(-1), n, k, seed, backend=backend)
        np.testing.assert_array_equal(got, auto_want, err_msg=backend)
    with pytest.raises(ValueError, match="padding"):  # the SPEC §2 form rejects them
        route_bits(s_bits, t_bits, n_src=n, n_tgt=n, k=k, seed=seed)
