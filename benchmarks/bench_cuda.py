"""Benchmark of the CUDA backend (CuPy): first call, steady-state kernel and whole-call times.

Usage:
    python benchmarks/bench_cuda.py [--out results.json] [--repeat 200] [--density 0.3] [--quick]

For every shape it reports, with CUDA-event timing (``cupyx.profiler.benchmark``, medians):

* ``kernel``: the phase-router kernel alone (packed ring arrays and per-row inputs prepared);
* ``call``: the whole ``route(...)`` call on CuPy inputs (validation, preparation, kernels), GPU
  time between events and host wall time;
* floors measured in the same run: an empty kernel launch and a kernel that only writes the
  ``n_src x k`` int32 output.

The first call is timed in fresh subprocesses: with an empty CuPy kernel cache (NVRTC compile)
and again with the cache warm (module load only). Results are checked against the CPU backend
first. Square shapes N in {1024, 4096, 16384, 65536}, k = 8; MoE shapes n_src in {4096, 16384,
65536} x n_tgt in {64, 256}, k in {2, 8}; all at the same density. Goals (H100): N = 16384,
k = 8 kernel <= 150 us; 16384 x 256, k = 8 kernel <= 20 us.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SQUARE = [1024, 4096, 16384, 65536]
MOE_SRC = [4096, 16384, 65536]
MOE_TGT = [64, 256]
MOE_K = [2, 8]
GOALS_US = {("square", 16384, 16384, 8): 150.0, ("moe", 16384, 256, 8): 20.0}

FLOOR_SOURCE = r"""
extern "C" __global__ void bench_empty() {}
extern "C" __global__ void bench_write(int* out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = -1;
}
"""


def need_gpu():
    """Import CuPy and the cuda backend, or exit with a clear message."""
    try:
        import cupy
        import cupyx.profiler  # noqa: F401

        from gpu_phase_router import get_backend

        backend = get_backend("cuda")
    except (ImportError, ValueError) as exc:
        sys.exit(f"bench_cuda.py needs CuPy and a CUDA GPU: {exc}")
    return cupy, backend


def machine_info(cupy) -> dict:
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {
        "gpu": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "sm_count": props["multiProcessorCount"],
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "platform": platform.platform(),
    }


def median_us(result) -> tuple[float, float]:
    """(GPU median, CPU median) in microseconds of a cupyx.profiler.benchmark result."""
    return float(np.median(result.gpu_times[0]) * 1e6), float(np.median(result.cpu_times) * 1e6)


def first_call_probe() -> None:
    """Subprocess body: time the first route() call (compile or cache load) and the second one."""
    cupy, _ = need_gpu()
    from gpu_phase_router import route

    w = cupy.ones(4096, dtype=cupy.float64)
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = route(w, w, k=8, seed=1, density=0.3, backend="cuda")
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - t0)
    assert out.shape == (4096, 8)
    print(json.dumps({"first_s": times[0], "second_s": times[1]}))


def first_call(cache_dir: str) -> dict:
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir, PYTHONPATH=path)
    res = subprocess.run([sys.executable, __file__, "--probe-first-call"], capture_output=True, text=True, env=env,
                         check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_against_cpu(cupy) -> None:
    from gpu_phase_router import route, route_counts

    rng = np.random.default_rng(0)
    for n_src, n_tgt, k in [(1024, 1024, 8), (4096, 4096, 8), (4096, 64, 2), (2000, 3000, 40), (300, 5000, 16)]:
        d = rng.integers(0, n_tgt + 1, n_src)
        c = rng.integers(0, n_src + 1, n_tgt)
        want = route_counts(d, c, k=k, seed=5, backend="cpu")
        got = route_counts(cupy.asarray(d), cupy.asarray(c), k=k, seed=5, backend="cuda")
        if not np.array_equal(cupy.asnumpy(got), want):
            sys.exit(f"MISMATCH cuda vs cpu at n_src={n_src} n_tgt={n_tgt} k={k}: not benchmarking a wrong kernel")
        caps = rng.random(n_tgt)
        for method, src in (("phase", rng.random(n_src)), ("systematic", np.ones(n_src))):
            want = route(src, caps, k=k, seed=3, method=method, backend="cpu")
            got = route(cupy.asarray(src), cupy.asarray(caps), k=k, seed=3, method=method, backend="cuda")
            if not np.array_equal(cupy.asnumpy(got), want):
                sys.exit(f"MISMATCH cuda vs cpu for route(method={method!r}) at {n_src}x{n_tgt} k={k}")


def bench_shape(cupy, backend, floors, kind: str, n_src: int, n_tgt: int, k: int, density: float, repeat: int) -> dict:
    from cupyx.profiler import benchmark

    from gpu_phase_router import _prep, route
    from gpu_phase_router._keys import STREAM_SELECT, stream

    seed = 42
    w = cupy.ones(n_src, dtype=cupy.float64)
    caps = cupy.ones(n_tgt, dtype=cupy.float64)
    # Kernel-only inputs, prepared exactly as route() prepares them.
    d = _prep.weights_to_counts(cupy, w, density, n_tgt)
    c = _prep.weights_to_counts(cupy, caps, density, n_src)
    ring = _prep.ring_layout(backend, c, n_src, seed)
    off_s = _prep.exclusive_cumsum_mod(cupy, d, n_tgt)
    phase = _prep.block_phases(backend, n_src, 0, n_src, seed)
    ring_sl, ring_col = backend.pack_ring(*ring)
    out = cupy.empty((n_src, k), dtype=cupy.int32)
    select_key = stream(seed, STREAM_SELECT)

    def kernel():
        backend.launch_phase(phase, off_s, d, ring_sl, ring_col, out, n_src=n_src, k=k, row0=0, select_key=select_key)

    def call():
        return route(w, caps, k=k, seed=seed, density=density, backend="cuda")

    empty, write = floors
    n_out = n_src * k

    def floor_empty():
        empty((1,), (32,), ())

    def floor_write():
        write((min((n_out + 255) // 256, 1 << 16),), (256,), (out, np.int64(n_out)))

    kernel()
    if not cupy.array_equal(out, call()):
        sys.exit(f"kernel-only and whole-call outputs differ at {n_src}x{n_tgt} k={k}")
    candidates = float(cupy.count_nonzero(out >= 0)) / n_src
    row = {"kind": kind, "n_src": n_src, "n_tgt": n_tgt, "k": k, "density": density,
           "mean_degree": float(d.mean()), "mean_outputs_per_row": candidates}
    row["kernel_us"], _ = median_us(benchmark(kernel, n_repeat=repeat, n_warmup=10))
    row["call_gpu_us"], row["call_cpu_us"] = median_us(benchmark(call, n_repeat=max(10, repeat // 4), n_warmup=3))
    row["floor_empty_us"], _ = median_us(benchmark(floor_empty, n_repeat=repeat, n_warmup=10))
    row["floor_write_us"], _ = median_us(benchmark(floor_write, n_repeat=repeat, n_warmup=10))
    goal = GOALS_US.get((kind, n_src, n_tgt, k))
    if goal is not None:
        row["goal_kernel_us"] = goal
        row["meets_goal"] = row["kernel_us"] <= goal
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--repeat", type=int, default=200, help="timed repetitions per measurement")
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--quick", action="store_true", help="only the two goal shapes")
    parser.add_argument("--probe-first-call", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_first_call:
        first_call_probe()
        return

    cupy, backend = need_gpu()
    info = machine_info(cupy)
    print(f"# {info['gpu']} (cc {info['compute_capability']}), CuPy {info['cupy']}, "
          f"CUDA runtime {info['cuda_runtime']}, driver {info['cuda_driver']}")
    check_against_cpu(cupy)
    print("# cuda == cpu on the check shapes")

    with tempfile.TemporaryDirectory() as cache:
        cold = first_call(cache)
        warm = first_call(cache)
    print(f"# first call, empty kernel cache (NVRTC compile): {cold}")
    print(f"# first call, warm kernel cache (module load):    {warm}")

    floor_module = cupy.RawModule(code=FLOOR_SOURCE)
    floors = (floor_module.get_function("bench_empty"), floor_module.get_function("bench_write"))

    shapes = [("square", n, n, 8) for n in SQUARE]
    shapes += [("moe", s, t, k) for s in MOE_SRC for t in MOE_TGT for k in MOE_K]
    if args.quick:
        shapes = [s for s in shapes if s in {("square", 16384, 16384, 8), ("moe", 16384, 256, 8)}]
    rows = []
    header = (f"{'kind':6} {'n_src':>6} {'n_tgt':>6} {'k':>2} {'deg':>7} {'out/row':>7} {'kernel_us':>10} "
              f"{'call_gpu_us':>11} {'call_cpu_us':>11} {'empty_us':>8} {'write_us':>8}  goal")
    print(header)
    print("-" * len(header))
    for kind, n_src, n_tgt, k in shapes:
        r = bench_shape(cupy, backend, floors, kind, n_src, n_tgt, k, args.density, args.repeat)
        rows.append(r)
        goal = ""
        if "goal_kernel_us" in r:
            goal = f"<= {r['goal_kernel_us']:.0f} {'ok' if r['meets_goal'] else 'MISSED'}"
        print(f"{kind:6} {n_src:6d} {n_tgt:6d} {k:2d} {r['mean_degree']:7.1f} {r['mean_outputs_per_row']:7.2f} "
              f"{r['kernel_us']:10.1f} {r['call_gpu_us']:11.1f} {r['call_cpu_us']:11.1f} {r['floor_empty_us']:8.1f} "
              f"{r['floor_write_us']:8.1f}  {goal}", flush=True)

    result = {"machine": info, "first_call": {"cold_cache": cold, "warm_cache": warm}, "density": args.density,
              "repeat": args.repeat, "timing": "CUDA events via cupyx.profiler.benchmark, medians in microseconds",
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, separators=(",", ":")))
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
