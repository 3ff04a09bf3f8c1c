"""Crate-exact mode on the CPU beside the crate's own kernel, same machine, same run (a script, not a test).

The workload is the crate's ``route_timing`` example: square N, every S and T row with
``round(0.3 N)`` left-aligned ones, permutations as ``phase_router_auto(seed=42)`` draws them,
kernel seed 42. Ours is ``gpu_phase_router.compat.phase_router`` (the crate's signature,
bit-packed input, validation included) on the CPU backend; beside it, for reference, the default
SPEC-mode ``gpu_phase_router.phase_router`` (same call, SplitMix64 bottom-k, other routes).
Rounds alternate ours and the crate's binary so both see the same machine load; the first
round's routes are checked against the crate's checksum (FNV-1a of the routes, which
``route_timing`` prints to stderr), so the timed outputs are identical.

    python benchmarks/bench_seed_exact.py --seed-binary PATH/route_timing \\
        --out benchmarks/results/bench_seed_exact.json
    python benchmarks/bench_seed_exact.py --cuda --n 16384 --k 8   # on a GPU: crate-exact vs SPEC kernel
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # _args beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _args  # noqa: E402

GOAL = 1 / 3  # crate-exact time <= 1/3 of the crate's on the same workload


def fnv1a(routes: np.ndarray) -> str:
    h = 0xCBF29CE484222325
    for v in routes.reshape(-1).astype(np.int64).tolist():
        h ^= v & 0xFFFFFFFF
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def crate_round(binary: str, n: int, k: int, calls: int) -> tuple[list[float], str]:
    """One run of ``route_timing N k`` → (min, mean, median ms) and the routes' checksum."""
    env = dict(os.environ, ROUTE_TIMING_CALLS=str(calls))
    res = subprocess.run([binary, str(n), str(k)], env=env, check=True, capture_output=True, text=True)
    fields = res.stdout.split()
    checksum = re.search(r"routes_fnv1a=([0-9a-f]+)", res.stderr).group(1)
    return [float(fields[3]), float(fields[4]), float(fields[5])], checksum


def cuda_main(args: argparse.Namespace) -> None:
    """Crate-exact kernel vs the SPEC phase kernel on the GPU, same inputs on the device (goal: <= 3x)."""
    cupy, _ = _args.need_gpu("bench_seed_exact.py")

    import gpu_phase_router as gpr
    import gpu_phase_router.compat as prr

    def timed(fn, calls: int) -> float:
        fn()
        cupy.cuda.Device().synchronize()
        times = []
        for _ in range(calls):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop))
        return statistics.median(times)

    rows = []
    print(f"{'N':>6} {'k':>2} {'crate-exact ms':>14} {'SPEC ms':>8} {'ratio':>6}  same as CPU")
    for n in args.n:
        bits = cupy.asarray(prr.build_bits(np.full(n, int(round(0.3 * n))), n))
        nbw = (n + 63) // 64
        perm_s, perm_t = (cupy.asarray(p) for p in prr.auto_permutations(n, 42))
        for k in args.k:
            seed_call = functools.partial(prr.phase_router, bits, bits, n, nbw, k, perm_s, perm_t, 42, backend="cuda")
            spec_call = functools.partial(gpr.phase_router, bits, bits, n, nbw, k, perm_s, perm_t, 42, backend="cuda")
            same = bool(
                np.array_equal(
                    seed_call().get(),
                    prr.phase_router(bits.get(), bits.get(), n, nbw, k, perm_s.get(), perm_t.get(), 42, backend="cpu"),
                )
            )
            row = {
                "n": n,
                "k": k,
                "seed_exact_ms": timed(seed_call, args.calls),
                "spec_ms": timed(spec_call, args.calls),
            }
            row["ratio"] = row["seed_exact_ms"] / row["spec_ms"]
            row["same_as_cpu"] = same
            rows.append(row)
            print(f"{n:>6} {k:>2} {row['seed_exact_ms']:>14.3f} {row['spec_ms']:>8.3f} {row['ratio']:>6.2f}  {same}")
    print("# goal: ratio <= 3 at N = 16384, k = 8")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {"meta": {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}, "rows": rows},
                fh,
                separators=(",", ":"),
            )
            fh.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--seed-binary", type=_args.executable_file, help="the crate's route_timing binary (required without --cuda)"
    )
    ap.add_argument("--n", type=_args.positive_int_list, default="4096,16384", help="comma-separated N values")
    ap.add_argument("--k", type=_args.positive_int_list, default="2,8", help="comma-separated k values")
    ap.add_argument("--rounds", type=_args.positive_int, default=3)
    ap.add_argument("--calls", type=_args.positive_int, default=7, help="timed calls per round, each side")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cuda", action="store_true", help="only time crate-exact vs SPEC mode on the GPU (CuPy)")
    args = ap.parse_args()
    if max(args.k) > min(args.n):
        ap.error(f"argument --k: every k must be at most the smallest N ({min(args.n)}); got {max(args.k)}")
    if args.cuda:
        cuda_main(args)
        return
    if not args.seed_binary:
        ap.error("--seed-binary is required (the crate's route_timing)")

    import numba

    import gpu_phase_router as gpr
    import gpu_phase_router.compat as prr

    rows = []
    print(
        "# machine:",
        platform.processor() or platform.machine(),
        f"{os.cpu_count()} CPUs,",
        f"numba threads {numba.get_num_threads()}; timings on a shared machine are noisy",
    )
    print(
        f"{'N':>6} {'k':>2} {'crate min':>10} {'ours min':>9} {'ratio':>6} {'crate med':>10} {'ours med':>9} "
        f"{'ratio':>6}  same  spec med"
    )
    for n in args.n:
        ones = int(round(0.3 * n))
        bits = prr.build_bits(np.full(n, ones), n)
        nbw = (n + 63) // 64
        perm_s, perm_t = prr.auto_permutations(n, 42)
        for k in args.k:
            call = functools.partial(prr.phase_router, bits, bits, n, nbw, k, perm_s, perm_t, 42, backend="cpu")
            spec_call = functools.partial(gpr.phase_router, bits, bits, n, nbw, k, perm_s, perm_t, 42, backend="cpu")
            first = call()
            spec_call()
            spec: list[float] = []
            ours: list[float] = []
            crate: list[float] = []
            crate_mins: list[float] = []
            same = None
            for _ in range(args.rounds):
                for _ in range(args.calls):
                    t = time.perf_counter()
                    call()
                    ours.append((time.perf_counter() - t) * 1e3)
                    t = time.perf_counter()
                    spec_call()
                    spec.append((time.perf_counter() - t) * 1e3)
                stats, checksum = crate_round(args.seed_binary, n, k, args.calls)
                crate_mins.append(stats[0])
                crate.append(stats[2])
                if same is None:
                    same = checksum == fnv1a(first)
            row = {
                "n": n,
                "k": k,
                "calls_each": args.calls * args.rounds,
                "crate_min_ms": min(crate_mins),
                "ours_min_ms": min(ours),
                "crate_median_of_round_medians_ms": statistics.median(crate),
                "ours_median_ms": statistics.median(ours),
                "same_routes": bool(same),
                "spec_mode_median_ms": statistics.median(spec),
            }
            row["ratio_min"] = row["ours_min_ms"] / row["crate_min_ms"]
            row["ratio_median"] = row["ours_median_ms"] / row["crate_median_of_round_medians_ms"]
            rows.append(row)
            print(
                f"{n:>6} {k:>2} {row['crate_min_ms']:>10.2f} {row['ours_min_ms']:>9.2f} {row['ratio_min']:>6.2f} "
                f"{row['crate_median_of_round_medians_ms']:>10.2f} {row['ours_median_ms']:>9.2f} "
                f"{row['ratio_median']:>6.2f}  {same!s:>5} {row['spec_mode_median_ms']:>9.2f}"
            )
    print(f"# goal: ratio <= {GOAL:.2f}")
    if args.out:
        meta = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "numba_threads": numba.get_num_threads(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "goal_ratio": GOAL,
            "note": "same machine, same run, rounds interleaved; shared machine, so timings are noisy",
        }
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, separators=(",", ":"))
            fh.write("\n")


if __name__ == "__main__":
    main()
