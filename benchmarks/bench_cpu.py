"""CPU benchmark on the seed's ``route()`` workload (a script, not a test).

Square, uniform weights, left-aligned rows of ``round(0.3 N)`` ones; N in {256, 1024, 4096,
16384}, k in {2, 8}. For each size it times the seed's low-level call
(``phase_router_auto`` on bit-packed rows, as the seed's ``route()`` issues it) and the
high-level ``route()``, steady-state median over repeats, beside a hash-routing baseline
(the seed's ``rng.integers`` baseline) in the same run. First-call times (import, Numba JIT
with a cold cache, and with a warm cache) are measured in fresh subprocesses.

    python benchmarks/bench_cpu.py --out benchmarks/results/bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np

# The seed's Rust kernel (rayon, 2 threads) on a 2-core machine of our kind, ms (k=2 and 8 alike).
SEED_RUST_MS = {1024: 1.45, 4096: 25.4, 16384: 417.0}
GOAL_FRACTION = 0.2

FIRST_CALL = r"""
import time
t0 = time.perf_counter()
import gpu_phase_router as gpr
t1 = time.perf_counter()
out = gpr.route(target_capacities=[1.0, 2.0, 8.0, 1.0] * 64, k=2, seed=1)
t2 = time.perf_counter()
print(f"{t1 - t0:.6f} {t2 - t1:.6f}")
"""


def first_call_times(threads: int) -> dict[str, float]:
    """Import time and first ``route()`` time in fresh processes, cold then warm Numba cache."""
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS=str(threads))
        for label in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            res[f"import_s_{label}"] = float(out[0])
            res[f"first_route_s_{label}_cache"] = float(out[1])
    return res


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def seed_hash_route(n: int, k: int, seed: int) -> np.ndarray:
    """The seed's capacity-blind baseline: ``k`` uniform draws per source."""
    return np.random.default_rng(seed).integers(0, n, size=(n, k), dtype=np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--out", default="benchmarks/results/bench_cpu.json")
    args = ap.parse_args()

    import numba

    import gpu_phase_router as gpr

    threads = numba.get_num_threads()
    first = first_call_times(threads)
    rows = []
    for n in args.sizes:
        ones = np.full(n, round(0.3 * n))
        bits = gpr.left_aligned_bits(ones, n).ravel()
        for k in args.ks:
            repeats = max(10, min(1000, int(2e8 / (n * n))))
            t_low = median_ms(partial(gpr.phase_router_auto, bits, bits, n, k, 42), repeats)
            t_route = median_ms(partial(gpr.route, None, None, n, k, 42, 0.3), repeats)
            t_hash = median_ms(partial(seed_hash_route, n, k, 42), repeats)
            seed_ms = SEED_RUST_MS.get(n)
            rows.append(dict(n=n, k=k, phase_router_auto_ms=t_low, route_ms=t_route, hash_ms=t_hash,
                             seed_rust_ms=seed_ms, goal_ms=None if seed_ms is None else seed_ms * GOAL_FRACTION,
                             speedup_vs_seed=None if seed_ms is None else seed_ms / t_low))
    meta = dict(machine=platform.machine(), processor=_cpu_model(), cores=os.cpu_count(), numba_threads=threads,
                python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
                gpu_phase_router=gpr.__version__)
    print(f"# {meta['processor']}, {meta['cores']} cores, Numba {meta['numba']} with {threads} threads")
    print(f"# import {first['import_s_cold']:.3f} s; first route(): "
          f"cold cache {first['first_route_s_cold_cache']:.2f} s, warm cache {first['first_route_s_warm_cache']:.2f} s")
    print(f"{'N':>6} {'k':>2} {'phase_router_auto':>18} {'route()':>10} {'hash':>9} {'seed Rust':>10} "
          f"{'goal':>8} {'seed/ours':>9}")
    for r in rows:
        seed_s = "-" if r["seed_rust_ms"] is None else f"{r['seed_rust_ms']:.2f}"
        goal_s = "-" if r["goal_ms"] is None else f"{r['goal_ms']:.2f}"
        sp = "-" if r["speedup_vs_seed"] is None else f"{r['speedup_vs_seed']:.1f}x"
        print(f"{r['n']:>6} {r['k']:>2} {r['phase_router_auto_ms']:>15.3f} ms {r['route_ms']:>7.3f} ms "
              f"{r['hash_ms']:>6.3f} ms {seed_s:>7} ms {goal_s:>5} ms {sp:>9}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, first_call=first, rows=rows), f, separators=(",", ":"))
    print(f"# wrote {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
