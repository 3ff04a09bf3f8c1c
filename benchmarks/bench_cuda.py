"""Benchmark of the CUDA backend (CuPy): first call, steady-state kernel and whole-call times.

Usage:
    python benchmarks/bench_cuda.py [--out results.json] [--md table.md] [--repeat 200] [--density 0.3]
                                    [--quick | --all]

Without CuPy or a CUDA device it prints one line and exits 0.

For every shape it reports, with CUDA-event timing (``cupyx.profiler.benchmark``, medians):

* ``kernel``: the phase-router kernel alone (packed ring arrays and per-row inputs prepared as
  ``route`` prepares them: at MoE shapes, fewer targets than sources, the banded kernel of SPEC §13);
* ``call``: the whole ``route(...)`` call on CuPy inputs (validation, preparation, kernels), GPU
  time between events and host wall time;
* floors measured in the same run: an empty kernel launch and a kernel that only writes the
  ``n_src x k`` int32 output.

The first call is timed in fresh subprocesses: with an empty CuPy kernel cache (NVRTC compile)
and again with the cache warm (module load only). Results are checked against the CPU backend
first. Default shapes: square N = 16384 and 16384 tokens x 64 and x 256 experts, k in {2, 8}
(``--all`` adds N in {1024, 4096, 65536} and n_src in {4096, 65536}); all at the same density.
For the same shapes, the whole call of ``method="hash"``, ``"weighted_hash"`` and ``"systematic"``
is timed in the same run, so the phase router's cost is also a ratio to a hash router's. When
torch with CUDA is importable, the whole call on CUDA torch tensors issued on a non-default torch
stream is timed with torch events (and checked against the CuPy result). Goals (H100/H200):
N = 16384, k = 8 kernel <= 150 us; 16384 x 256, k = 8 kernel <= 20 us and whole call <= 100 us;
cold first call < 2 s; at MoE shapes the whole call within 2x of the hash router's.
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
if str(ROOT / "benchmarks") not in sys.path:  # _args beside this file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402

SQUARE = [16384]
SQUARE_ALL = [1024, 4096, 16384, 65536]
MOE_SRC = [16384]
MOE_SRC_ALL = [4096, 16384, 65536]
MOE_TGT = [64, 256]
KS = [2, 8]
BASELINES = ("hash", "weighted_hash", "systematic")
GOALS_US = {("square", 16384, 16384, 8): 150.0, ("moe", 16384, 256, 8): 20.0}
GOALS_CALL_US = {("moe", 16384, 256, 8): 100.0}

FLOOR_SOURCE = r"""
extern "C" __global__ void bench_empty() {}
extern "C" __global__ void bench_write(int* out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = -1;
}
"""


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
    cupy, _ = _args.need_gpu("bench_cuda.py")
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
    res = subprocess.run(
        [sys.executable, __file__, "--probe-first-call"], capture_output=True, text=True, env=env, check=False
    )
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


def phase_kernel(xp, backend, n_src: int, n_tgt: int, k: int, density: float, seed: int):
    """``(kernel, out, d)``: the phase-router kernel launch alone on the inputs ``route(ones(n_src),
    ones(n_tgt), k=k, seed=seed, density=density)`` prepares, writing ``out`` (int32 ``[n_src, k]``),
    and the rows' degrees ``d``. With fewer targets than sources that is the banded kernel (SPEC §13:
    the virtual ring, ``k_draw`` columns mapped to the first ``k`` distinct targets), as in route()."""
    from gpu_phase_router import _prep
    from gpu_phase_router._keys import STREAM_SELECT, stream
    from gpu_phase_router.methods import phase as phase_method

    w = xp.ones(n_src, dtype=xp.float64)
    caps = np.ones(n_tgt, dtype=np.float64)
    col_map32, k_draw = None, k
    if phase_method.bands_apply(n_src, n_tgt):
        lay = phase_method.band_layout(caps, n_src, k, density)
        c, col_map32, k_draw = xp.asarray(lay.col_counts), xp.asarray(lay.col_map32), lay.k_draw
    else:
        c = _prep.weights_to_counts(xp, xp.asarray(caps), density, n_src)
    ring_n = int(c.shape[0])
    d = _prep.weights_to_counts(xp, w, density, ring_n)
    ring = phase_method.ring_layout(backend, c, n_src, seed)
    off_s = _prep.exclusive_cumsum_mod(xp, d, ring_n)
    phase = _prep.block_phases(backend, n_src, 0, n_src, seed)
    ring_sl, ring_col = backend.pack_ring(*ring)
    out = xp.empty((n_src, k), dtype=xp.int32)
    select_key = stream(seed, STREAM_SELECT)

    def kernel():
        backend.launch_phase(
            phase,
            off_s,
            d,
            ring_sl,
            ring_col,
            out,
            n_src=n_src,
            k=k_draw,
            row0=0,
            select_key=select_key,
            col_map32=col_map32,
            k_out=0 if col_map32 is None else k,
        )

    return kernel, out, d


def bench_shape(cupy, backend, floors, kind: str, n_src: int, n_tgt: int, k: int, density: float, repeat: int) -> dict:
    from cupyx.profiler import benchmark

    from gpu_phase_router import route

    seed = 42
    w = cupy.ones(n_src, dtype=cupy.float64)
    caps = cupy.ones(n_tgt, dtype=cupy.float64)
    kernel, out, d = phase_kernel(cupy, backend, n_src, n_tgt, k, density, seed)

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
    row = {
        "kind": kind,
        "n_src": n_src,
        "n_tgt": n_tgt,
        "k": k,
        "density": density,
        "mean_degree": float(d.mean()),
        "mean_outputs_per_row": candidates,
    }
    row["kernel_us"], _ = median_us(benchmark(kernel, n_repeat=repeat, n_warmup=10))
    row["call_gpu_us"], row["call_cpu_us"] = median_us(benchmark(call, n_repeat=max(10, repeat // 4), n_warmup=3))
    row["floor_empty_us"], _ = median_us(benchmark(floor_empty, n_repeat=repeat, n_warmup=10))
    row["floor_write_us"], _ = median_us(benchmark(floor_write, n_repeat=repeat, n_warmup=10))
    src_uniform = cupy.ones(n_src, dtype=cupy.float64)
    caps_varied = cupy.asarray(np.random.default_rng(0).random(n_tgt) + 0.5)
    for method in BASELINES:

        def base_call(method=method):
            return route(src_uniform, caps_varied, k=k, seed=seed, density=density, method=method, backend="cuda")

        try:
            gpu_us, cpu_us = median_us(benchmark(base_call, n_repeat=max(10, repeat // 4), n_warmup=3))
        except Exception as exc:  # a method that refuses this shape is reported, not fatal
            row[f"{method}_error"] = f"{type(exc).__name__}: {exc}"
            continue
        row[f"{method}_call_gpu_us"], row[f"{method}_call_cpu_us"] = gpu_us, cpu_us
    if "hash_call_cpu_us" in row:
        row["phase_over_hash_call"] = row["call_cpu_us"] / row["hash_call_cpu_us"]
    goal = GOALS_US.get((kind, n_src, n_tgt, k))
    if goal is not None:
        row["goal_kernel_us"] = goal
        row["meets_goal"] = row["kernel_us"] <= goal
    goal = GOALS_CALL_US.get((kind, n_src, n_tgt, k))
    if goal is not None:
        row["goal_call_us"] = goal
        row["meets_call_goal"] = row["call_cpu_us"] <= goal
    return row


def bench_torch(cupy, n_src: int, n_tgt: int, k: int, density: float, repeat: int) -> dict:
    """Whole call on CUDA torch tensors, issued on a non-default torch stream, timed with torch events."""
    try:
        import torch
    except ImportError as exc:
        return {"skipped": f"torch not importable: {exc}"}
    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA"}
    from gpu_phase_router import route

    w = torch.ones(n_src, dtype=torch.float64, device="cuda")
    caps = torch.ones(n_tgt, dtype=torch.float64, device="cuda")
    want = cupy.asnumpy(route(cupy.ones(n_src), cupy.ones(n_tgt), k=k, seed=42, density=density, backend="cuda"))
    stream = torch.cuda.Stream()
    times = []
    with torch.cuda.stream(stream):
        out = route(w, caps, k=k, seed=42, density=density)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = route(w, caps, k=k, seed=42, density=density)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    res = {
        "n_src": n_src,
        "n_tgt": n_tgt,
        "k": k,
        "torch": torch.__version__,
        "call_stream_us": float(np.median(times)),
        "device": str(out.device),
        "equal_to_cupy": bool(np.array_equal(out.cpu().numpy(), want)),
    }
    return res


def markdown(info: dict, cold: dict, warm: dict, rows: list[dict], torch_row: dict) -> str:
    """The results as a markdown table (what RESULTS.md shows)."""
    lines = [
        f"GPU: {info['gpu']} (cc {info['compute_capability']}, {info['sm_count']} SMs), CuPy {info['cupy']}, "
        f"CUDA runtime {info['cuda_runtime']}, driver {info['cuda_driver']}.",
        f"First call (fresh process): empty kernel cache {cold.get('first_s', float('nan')):.2f} s, "
        f"warm cache {warm.get('first_s', float('nan')):.2f} s.",
        "",
        "| shape | k | kernel µs | call µs (GPU / host) | empty launch µs | hash call µs | weighted_hash µs "
        "| systematic µs | phase / hash | goals |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        goals = []
        if "goal_kernel_us" in r:
            goals.append(f"kernel ≤ {r['goal_kernel_us']:.0f} {'ok' if r['meets_goal'] else 'MISSED'}")
        if "goal_call_us" in r:
            goals.append(f"call ≤ {r['goal_call_us']:.0f} {'ok' if r['meets_call_goal'] else 'MISSED'}")
        if r["kind"] == "moe" and "phase_over_hash_call" in r:
            goals.append(f"≤ 2× hash {'ok' if r['phase_over_hash_call'] <= 2 else 'MISSED'}")

        def us(key, r=r):
            return f"{r[key]:.1f}" if key in r else "–"

        lines.append(
            f"| {r['kind']} {r['n_src']}×{r['n_tgt']} | {r['k']} | {r['kernel_us']:.1f} | "
            f"{r['call_gpu_us']:.1f} / {r['call_cpu_us']:.1f} | {r['floor_empty_us']:.1f} | "
            f"{us('hash_call_cpu_us')} | {us('weighted_hash_call_cpu_us')} | {us('systematic_call_cpu_us')} | "
            f"{r.get('phase_over_hash_call', float('nan')):.2f}× | {'; '.join(goals)} |"
        )
    lines.append("")
    if "skipped" in torch_row:
        lines.append(f"torch stream path: skipped ({torch_row['skipped']}).")
    else:
        lines.append(
            f"torch stream path ({torch_row['n_src']}×{torch_row['n_tgt']}, k = {torch_row['k']}, "
            f"torch {torch_row['torch']}): whole call {torch_row['call_stream_us']:.1f} µs on a non-default "
            f"stream, result equal to CuPy's: {torch_row['equal_to_cupy']}."
        )
    lines.append(
        "Call times of the baselines are host wall times (like the phase call's second figure); "
        "phase / hash divides host wall times."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--repeat", type=_args.positive_int, default=200, help="timed repetitions per measurement")
    parser.add_argument("--density", type=_args.fraction, default=0.3, help="in (0, 1]")
    parser.add_argument("--md", type=Path, help="write the results as a markdown table to this path")
    parser.add_argument("--quick", action="store_true", help="only the two goal shapes")
    parser.add_argument("--all", action="store_true", help="also N in {1024, 4096, 65536}, n_src in {4096, 65536}")
    parser.add_argument("--probe-first-call", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_first_call:
        first_call_probe()
        return

    cupy, backend = _args.need_gpu("bench_cuda.py")
    import cupyx.profiler  # noqa: F401

    info = machine_info(cupy)
    print(
        f"# {info['gpu']} (cc {info['compute_capability']}), CuPy {info['cupy']}, "
        f"CUDA runtime {info['cuda_runtime']}, driver {info['cuda_driver']}"
    )
    check_against_cpu(cupy)
    print("# cuda == cpu on the check shapes")

    with tempfile.TemporaryDirectory() as cache:
        cold = first_call(cache)
        warm = first_call(cache)
    print(f"# first call, empty kernel cache (NVRTC compile): {cold}")
    print(f"# first call, warm kernel cache (module load):    {warm}")

    floor_module = cupy.RawModule(code=FLOOR_SOURCE)
    floors = (floor_module.get_function("bench_empty"), floor_module.get_function("bench_write"))

    square, moe_src = (SQUARE_ALL, MOE_SRC_ALL) if args.all else (SQUARE, MOE_SRC)
    shapes = [("square", n, n, k) for n in square for k in KS]
    shapes += [("moe", s, t, k) for s in moe_src for t in MOE_TGT for k in KS]
    if args.quick:
        shapes = [s for s in shapes if s in {("square", 16384, 16384, 8), ("moe", 16384, 256, 8)}]
    rows = []
    header = (
        f"{'kind':6} {'n_src':>6} {'n_tgt':>6} {'k':>2} {'deg':>7} {'out/row':>7} {'kernel_us':>10} "
        f"{'call_gpu_us':>11} {'call_cpu_us':>11} {'empty_us':>8} {'write_us':>8}  goal"
    )
    print(header)
    print("-" * len(header))
    for kind, n_src, n_tgt, k in shapes:
        r = bench_shape(cupy, backend, floors, kind, n_src, n_tgt, k, args.density, args.repeat)
        rows.append(r)
        goal = ""
        if "goal_kernel_us" in r:
            goal = f"<= {r['goal_kernel_us']:.0f} {'ok' if r['meets_goal'] else 'MISSED'}"
        print(
            f"{kind:6} {n_src:6d} {n_tgt:6d} {k:2d} {r['mean_degree']:7.1f} {r['mean_outputs_per_row']:7.2f} "
            f"{r['kernel_us']:10.1f} {r['call_gpu_us']:11.1f} {r['call_cpu_us']:11.1f} {r['floor_empty_us']:8.1f} "
            f"{r['floor_write_us']:8.1f}  {goal}",
            flush=True,
        )

    torch_row = bench_torch(cupy, 16384, 256, 8, args.density, max(20, args.repeat // 4))
    print(f"# torch stream path: {torch_row}")
    result = {
        "machine": info,
        "first_call": {"cold_cache": cold, "warm_cache": warm},
        "density": args.density,
        "repeat": args.repeat,
        "timing": "CUDA events via cupyx.profiler.benchmark, medians in microseconds",
        "rows": rows,
        "torch": torch_row,
    }
    table = markdown(info, cold, warm, rows, torch_row)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
        print(f"# wrote {args.out}")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
        print(f"# wrote {args.md}")


if __name__ == "__main__":
    main()
