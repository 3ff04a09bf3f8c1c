"""CPU benchmark, side by side with the crate's Rust kernel on the same machine (a script, not a test).

Workload: the crate's ``route()`` defaults — square N, every S and T row has ``round(0.3 N)``
left-aligned ones, seed 42 — with the permutations the crate's ``phase_router_auto(seed=42)``
draws (ChaCha8; obtained from the crate's ``dump_routes`` example with an ``auto`` case), so both
sides route identical bits with identical permutations. Timed per point:

* ``seed``: the crate's ``route_timing`` example (``router::phase_router`` only, rayon);
* ``spec``: our ``phase_router(s_bits, t_bits, n, nb_words, k, perm_s, perm_t, 42)`` (SPEC
  mode: SplitMix64 bottom-k selection), Numba code generated for this CPU;
* ``spec-avx2`` (``--znver3``): the same with ``NUMBA_CPU_NAME=znver3`` and ``NUMBA_CPU_FEATURES`` set
  to this CPU's features with every ``avx512*`` turned off, so AVX2 and AVX-512 code generation are
  compared on one machine in one run. (``NUMBA_CPU_NAME`` alone keeps the host's feature list, and
  with it AVX-512 code, on an AVX-512 machine.)
* ``compat`` (when ``gpu_phase_router.compat`` exists): the crate-exact mode
  ``gpu_phase_router.compat.phase_router``, same call as the crate's.

Every variant runs in its own process (ours in persistent worker processes, the seed as a fresh
``route_timing`` per point); points are interleaved, repeated ``--rounds`` times, and each
reported time is the median over rounds of the per-round median of ``--calls`` calls. Ratios are
seed time / our time in the same run. The printed table is the one to paste into RESULTS.md.

    python benchmarks/bench_cpu.py --seed-binary /path/to/route_timing --znver3
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

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # _args beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _args  # noqa: E402

DENSITY = 0.3
SEED = 42

FIRST_CALL = r"""
import time
t0 = time.perf_counter()
import gpu_phase_router as gpr
t1 = time.perf_counter()
out = gpr.route(target_capacities=[1.0, 2.0, 8.0, 1.0] * 64, k=2, seed=1)
t2 = time.perf_counter()
print(f"{t1 - t0:.6f} {t2 - t1:.6f}")
"""


def cpu_info() -> dict[str, object]:
    """CPU model, the SIMD flags that matter here, and core count."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import llvmlite.binding as ll

        llvm_cpu = ll.get_host_cpu_name()  # e.g. znver5, when /proc/cpuinfo only says "AMD EPYC"
    except ImportError:
        llvm_cpu = "unknown"
    return dict(
        model=model or platform.processor() or "unknown",
        llvm_cpu=llvm_cpu,
        avx2="avx2" in flags,
        avx512f="avx512f" in flags,
        cores=os.cpu_count(),
    )


def seed_permutations(dump_binary: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``col_perm_s`` and ``col_perm_t`` exactly as the crate's ``phase_router_auto(seed=42)`` draws them."""
    ones = [max(1, min(n, round(DENSITY * n)))] * n
    case = dict(id="perm", kind="auto", n=n, k=1, seed=SEED, ones_s=ones, ones_t=ones)
    out = subprocess.run([dump_binary], input=json.dumps(case) + "\n", capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    return np.asarray(res["col_perm_s"], dtype=np.int64), np.asarray(res["col_perm_t"], dtype=np.int64)


def avx2_features() -> str:
    """This CPU's LLVM feature string with every ``avx512*`` feature disabled (for ``NUMBA_CPU_FEATURES``)."""
    import llvmlite.binding as ll

    feats = ll.get_host_cpu_features().flatten().split(",")
    return ",".join("-" + f[1:] if f.startswith("+avx512") else f for f in feats if f)


def fnv1a(routes: np.ndarray) -> str:
    """The crate's ``route_timing`` checksum: FNV-1a over the routes as u32 values."""
    h = 0xCBF29CE484222325
    for v in routes.astype(np.int64).ravel().tolist():
        h = ((h ^ (v & 0xFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


# ── worker: one process per (mode, Numba target), driven over stdin/stdout ──────────────────
def worker(perm_file: str) -> None:
    """Serve ``n k calls mode`` requests: time ``calls`` calls, answer with the per-call times (s)."""
    import gpu_phase_router as gpr

    try:
        from gpu_phase_router import compat  # crate-exact mode (optional)
    except ImportError:
        compat = None
    perms = np.load(perm_file)
    bits_cache: dict[int, np.ndarray] = {}
    print(json.dumps(dict(ready=True, compat=compat is not None)), flush=True)
    for line in sys.stdin:
        n, k, calls, mode = line.split()
        n, k, calls = int(n), int(k), int(calls)
        if n not in bits_cache:  # S and T as two arrays, as route_timing builds them (one array read twice
            # would come from cache the second time: 2-3 % of a call at N = 4096)
            bits_cache[n] = gpr.left_aligned_bits(np.full(n, max(1, min(n, round(DENSITY * n)))), n).ravel()
        s_bits, t_bits = bits_cache[n], bits_cache[n].copy()
        ps, pt = perms[f"s{n}"], perms[f"t{n}"]
        nb = (n + 63) // 64
        fn = compat.phase_router if mode == "compat" else gpr.phase_router
        out = fn(s_bits, t_bits, n, nb, k, ps, pt, SEED)  # warm-up (and JIT on first use)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(s_bits, t_bits, n, nb, k, ps, pt, SEED)
            times.append(time.perf_counter() - t0)
        print(json.dumps(dict(times=times, fnv=fnv1a(np.asarray(out)))), flush=True)


class Worker:
    def __init__(self, perm_file: str, env: dict[str, str]) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # run from the source tree
        env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])))
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", perm_file],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = json.loads(self.p.stdout.readline())

    def time(self, n: int, k: int, calls: int, mode: str) -> tuple[tuple[float, float], str]:
        self.p.stdin.write(f"{n} {k} {calls} {mode}\n")
        self.p.stdin.flush()
        res = json.loads(self.p.stdout.readline())
        return (statistics.median(res["times"]) * 1e3, min(res["times"]) * 1e3), res["fnv"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def seed_time(binary: str, n: int, k: int, calls: int, threads: int) -> tuple[tuple[float, float], str]:
    """(median, min) ms of the crate's ``route_timing`` for one point, and its routes checksum."""
    env = dict(os.environ, ROUTE_TIMING_CALLS=str(calls), RAYON_NUM_THREADS=str(threads))
    p = subprocess.run([binary, str(n), str(k)], env=env, capture_output=True, text=True, check=True)
    fields = p.stdout.split()
    fnv = p.stderr.split("routes_fnv1a=")[1].split()[0]
    return (float(fields[5]), float(fields[3])), fnv


def first_call_times(threads: int) -> dict[str, float]:
    """Import time and first ``route()`` time in fresh processes, cold then warm Numba cache."""
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS=str(threads))
        for label in ("cold", "warm"):
            out = subprocess.run(
                [sys.executable, "-c", FIRST_CALL], env=env, check=True, capture_output=True, text=True
            ).stdout.split()
            res[f"import_s_{label}"] = float(out[0])
            res[f"first_route_s_{label}_cache"] = float(out[1])
    return res


def default_calls(n: int) -> int:
    return 101 if n <= 1024 else 21 if n <= 4096 else 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--seed-binary", type=_args.executable_file, help="the crate's route_timing example (release build)"
    )
    ap.add_argument(
        "--dump-binary",
        type=_args.executable_file,
        help="the crate's dump_routes example (default: next to --seed-binary)",
    )
    ap.add_argument("--sizes", type=_args.positive_int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--ks", type=_args.positive_int, nargs="+", default=[2, 8])
    ap.add_argument("--rounds", type=_args.positive_int, default=3, help="interleaved repeats of every point")
    ap.add_argument("--calls", type=_args.positive_int, default=None, help="calls per point and round (default by N)")
    ap.add_argument("--threads", type=_args.positive_int, default=os.cpu_count(), help="Numba and rayon threads")
    ap.add_argument(
        "--znver3",
        "--avx2",
        dest="znver3",
        action="store_true",
        help="also run ours with AVX2 code generation (NUMBA_CPU_NAME=znver3, avx512* features off)",
    )
    ap.add_argument("--no-compat", action="store_true", help="skip the crate-exact mode even if present")
    ap.add_argument("--first-call", action="store_true", help="also time import and first route() (fresh processes)")
    ap.add_argument("--out", default="benchmarks/results/bench_cpu.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not args.seed_binary:
        ap.error("--seed-binary PATH is required (the crate's route_timing example)")
    dump = args.dump_binary or os.path.join(os.path.dirname(args.seed_binary), "dump_routes")
    if not (os.path.isfile(dump) and os.access(dump, os.X_OK)):  # --seed-binary and --dump-binary: checked by type
        ap.error(f"argument --dump-binary: no executable dump_routes at {dump} (default: next to --seed-binary)")
    if max(args.ks) > min(args.sizes):
        ap.error(f"argument --ks: every k must be at most the smallest N ({min(args.sizes)}); got {max(args.ks)}")

    cpu = cpu_info()
    base_env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads))
    native_target = os.environ.get("NUMBA_CPU_NAME") or "host"
    if os.environ.get("NUMBA_CPU_FEATURES"):
        native_target += " (NUMBA_CPU_FEATURES set)"
    variants = {"spec": base_env}
    if args.znver3:
        variants["spec-avx2"] = dict(base_env, NUMBA_CPU_NAME="znver3", NUMBA_CPU_FEATURES=avx2_features())

    with tempfile.TemporaryDirectory() as tmp:
        perm_file = os.path.join(tmp, "perms.npz")
        perms = {}
        for n in args.sizes:
            perms[f"s{n}"], perms[f"t{n}"] = seed_permutations(dump, n)
        np.savez(perm_file, **perms)
        workers = {name: Worker(perm_file, env) for name, env in variants.items()}
        has_compat = workers["spec"].info["compat"] and not args.no_compat
        modes = [(name, "spec") for name in variants]
        if has_compat:
            modes.append(("spec", "compat"))  # the compat column runs in the native worker
        points = [(n, k) for n in args.sizes for k in args.ks]
        samples: dict[tuple[int, int], dict[str, list[float]]] = {p: {} for p in points}
        checks: dict[tuple[int, int], dict[str, str]] = {p: {} for p in points}
        for _ in range(args.rounds):
            for n, k in points:
                calls = args.calls or default_calls(n)
                ms, fnv = seed_time(args.seed_binary, n, k, calls, args.threads)
                samples[(n, k)].setdefault("seed", []).append(ms)
                checks[(n, k)]["seed"] = fnv
                for wname, mode in modes:
                    col = "compat" if mode == "compat" else wname
                    ms, fnv = workers[wname].time(n, k, calls, mode)
                    samples[(n, k)].setdefault(col, []).append(ms)
                    checks[(n, k)][col] = fnv
        for w in workers.values():
            w.close()

    import numba

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_phase_router as gpr

    cols = ["seed"] + list(variants) + (["compat"] if has_compat else [])
    rows = []
    for n, k in points:
        med = {c: statistics.median(s[0] for s in samples[(n, k)][c]) for c in cols}
        best = {c: min(s[1] for s in samples[(n, k)][c]) for c in cols}
        row = dict(
            n=n,
            k=k,
            calls=args.calls or default_calls(n),
            rounds=args.rounds,
            ms={c: round(v, 4) for c, v in med.items()},
            ratio={c: round(med["seed"] / med[c], 2) for c in cols if c != "seed"},
            min_ms={c: round(v, 4) for c, v in best.items()},
            min_ratio={c: round(best["seed"] / best[c], 2) for c in cols if c != "seed"},
        )
        if has_compat:
            row["compat_matches_seed"] = checks[(n, k)]["compat"] == checks[(n, k)]["seed"]
        rows.append(row)
    meta = dict(
        cpu=cpu,
        numba_target=native_target,
        threads=args.threads,
        machine=platform.machine(),
        python=platform.python_version(),
        numpy=np.__version__,
        numba=numba.__version__,
        gpu_phase_router=gpr.__version__,
        load_avg=os.getloadavg(),
        workload=f"square N, round({DENSITY} N) left-aligned ones per S and T row, seed {SEED}, "
        "permutations of the crate's phase_router_auto(seed=42)",
        timing="ms/ratio: median over rounds of the per-round median of `calls` calls; min_ms/min_ratio: "
        "fastest call of all rounds; seed = route_timing",
    )
    first = first_call_times(args.threads) if args.first_call else None

    flags = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in ("avx2", "avx512f"))
    print(
        f"# CPU: {cpu['model']} (LLVM: {cpu['llvm_cpu']}; {cpu['cores']} cores; {flags}); "
        f"Numba target {native_target}; {args.threads} threads (Numba and rayon); load avg {meta['load_avg'][0]:.2f}"
    )
    print(
        f"# Numba {numba.__version__}, NumPy {np.__version__}, Python {platform.python_version()}; "
        f"{args.rounds} interleaved rounds, ratio = seed time / ours, same run"
    )
    tables = (
        ("median call", "ms", "ratio"),
        ("fastest call of all rounds (steadier on a shared machine)", "min_ms", "min_ratio"),
    )
    for title, ms_key, ratio_key in tables:
        print(f"\n{title}:\n")
        print("| N | k | seed (Rust) |" + "".join(f" {c} | seed/{c} |" for c in cols[1:]))
        print("|---:|---:|---:|" + "---:|---:|" * (len(cols) - 1))
        for r in rows:
            print(
                f"| {r['n']} | {r['k']} | {r[ms_key]['seed']:.3f} ms |"
                + "".join(f" {r[ms_key][c]:.3f} ms | {r[ratio_key][c]:.1f}× |" for c in cols[1:])
            )
    print()
    if has_compat:
        print(
            "# compat routes equal the crate's (FNV-1a checksum): "
            + (
                "all points"
                if all(r["compat_matches_seed"] for r in rows)
                else ", ".join(f"N={r['n']} k={r['k']}: {r['compat_matches_seed']}" for r in rows)
            )
        )
    if first:
        print(
            f"# import {first['import_s_cold']:.3f} s; first route(): cold cache "
            f"{first['first_route_s_cold_cache']:.2f} s, warm cache {first['first_route_s_warm_cache']:.2f} s"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, first_call=first, rows=rows), f, separators=(",", ":"))
        f.write("\n")
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
