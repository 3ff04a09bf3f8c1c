"""Cost model of the CPU phase router: time against density * n_src * n_tgt (a script, not a test).

A row's scan tests its ``d = density * n_tgt`` ring positions, so a call costs
``O(density * n_src * n_tgt)``. This script times, on one machine in one run:

* ours (``phase_router_auto`` on left-aligned rows of ``round(density * N)`` ones, square N) against
  N at density 0.3, and against density at fixed N;
* the crate's kernel (its ``route_timing`` example, ``--seed-binary``) against N. ``route_timing``
  builds the density-0.3 workload only, so the seed has no density sweep here;

fits ``t = a * density * N^2`` to each implementation (median of ``t / (density N^2)``) and draws
one log-log plot of time against ``density * N^2`` with both model lines. Each point is the
fastest of its calls (the steadiest figure on a shared machine), for ours and the seed alike.

    python benchmarks/bench_cost_model.py --seed-binary /path/to/route_timing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _args  # noqa: E402
from bench_cpu import cpu_info  # noqa: E402


def ours_ms(n: int, density: float, k: int, calls: int) -> float:
    import gpu_phase_router as gpr

    bits = gpr.left_aligned_bits(np.full(n, max(1, min(n, round(density * n)))), n).ravel()
    gpr.phase_router_auto(bits, bits, n, k, 42)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        gpr.phase_router_auto(bits, bits, n, k, 42)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def seed_ms(binary: str, n: int, k: int, calls: int, threads: int) -> float:
    env = dict(os.environ, ROUTE_TIMING_CALLS=str(calls), RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([binary, str(n), str(k)], env=env, capture_output=True, text=True, check=True).stdout
    return float(out.split()[3])  # fastest call (route_timing's min_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--seed-binary",
        type=_args.executable_file,
        help="the crate's route_timing example; without it only ours is timed",
    )
    ap.add_argument("--sizes", type=_args.positive_int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--densities", type=_args.fraction, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0])
    ap.add_argument("--density-n", type=_args.positive_int, default=8192, help="N of the density sweep")
    ap.add_argument("--k", type=_args.positive_int, default=2)
    ap.add_argument("--threads", type=_args.positive_int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/results/cost_model.json")
    ap.add_argument("--plot", default="benchmarks/results/cost_model.png")
    args = ap.parse_args()
    if args.k > min(*args.sizes, args.density_n):
        ap.error(f"argument --k: at most the smallest N ({min(*args.sizes, args.density_n)}); got {args.k}")
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)

    def calls(n: int) -> int:
        return max(3, min(101, int(4e8 / (n * n))))

    pts = []
    for n in args.sizes:
        pts.append(dict(impl="ours", sweep="N", n=n, density=0.3, ms=ours_ms(n, 0.3, args.k, calls(n))))
        if args.seed_binary:
            pts.append(
                dict(
                    impl="seed",
                    sweep="N",
                    n=n,
                    density=0.3,
                    ms=seed_ms(args.seed_binary, n, args.k, calls(n), args.threads),
                )
            )
    for dens in args.densities:
        n = args.density_n
        pts.append(dict(impl="ours", sweep="density", n=n, density=dens, ms=ours_ms(n, dens, args.k, calls(n))))
    for p in pts:
        p["work"] = p["density"] * p["n"] * p["n"]
    fit = {}
    for impl in sorted({p["impl"] for p in pts}):
        big = [p for p in pts if p["impl"] == impl and p["n"] >= 2048]  # fixed costs dominate small N
        if not big:
            print(f"# {impl}: no point with N >= 2048, no model fit")
            continue
        fit[impl] = statistics.median(p["ms"] / p["work"] for p in big) * 1e6  # ns per (density * N^2)
    cpu = cpu_info()
    flags = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in ("avx2", "avx512f"))
    print(
        f"# CPU: {cpu['model']} (LLVM: {cpu['llvm_cpu']}; {cpu['cores']} cores; {flags}); "
        f"{args.threads} threads; k = {args.k}"
    )
    print("| implementation | sweep | N | density | time | ns per density·N² |")
    print("|---|---|---:|---:|---:|---:|")
    for p in pts:
        print(
            f"| {p['impl']} | {p['sweep']} | {p['n']} | {p['density']:g} | {p['ms']:.3f} ms | "
            f"{p['ms'] / p['work'] * 1e6:.3f} |"
        )
    print("# model fit (N >= 2048): " + ", ".join(f"{i} {a:.3f} ns per density·N²" for i, a in fit.items()))
    if "seed" in fit and "ours" in fit:
        print(f"# seed/ours at the fitted slope: {fit['seed'] / fit['ours']:.1f}×")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(cpu=cpu, threads=args.threads, k=args.k, fit_ns_per_unit=fit, points=pts), f, separators=(",", ":")
        )
        f.write("\n")
    print(f"# wrote {args.out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = f"{min(args.sizes)}…{max(args.sizes)}"
    style = {
        ("ours", "N"): ("o", "C0", f"ours, density 0.3, N = {sizes}"),
        ("ours", "density"): (
            "s",
            "C2",
            f"ours, N = {args.density_n}, density {min(args.densities):g}…{max(args.densities):g}",
        ),
        ("seed", "N"): ("^", "C3", "seed (Rust), density 0.3"),
    }
    for key, (marker, color, label) in style.items():
        sel = [p for p in pts if (p["impl"], p["sweep"]) == key]
        if sel:
            ax.loglog([p["work"] for p in sel], [p["ms"] for p in sel], marker, color=color, label=label)
    seed_n = [p for p in pts if p["impl"] == "seed"]
    if seed_n:
        ax.loglog([], [], " ", label="(the crate's route_timing has no density option)")
    xs = np.logspace(np.log10(min(p["work"] for p in pts)), np.log10(max(p["work"] for p in pts)), 50)
    for impl, color in (("ours", "C0"), ("seed", "C3")):
        if impl in fit:
            ax.loglog(
                xs,
                fit[impl] * xs / 1e6,
                "--",
                color=color,
                lw=1,
                label=f"model {impl}: {fit[impl]:.2f} ns × density·N²",
            )
    ax.set_xlabel("density · n_src · n_tgt (ring positions tested)")
    ax.set_ylabel(f"time per call, ms (k = {args.k}, {args.threads} threads)")
    ax.set_title(
        f"{cpu['model']} ({cpu['llvm_cpu']}), {cpu['cores']} cores, AVX-512 {'yes' if cpu['avx512f'] else 'no'}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"# wrote {args.plot}")


if __name__ == "__main__":
    main()
