"""Threads that fit the machine, and the MoE-shape call (a script, not a test).

Part 1, MoE shape on an otherwise idle machine: ``route(ones(16384), ones(64), k=2)`` (the banded
phase router, SPEC §13) beside the uniform hash and ``systematic`` at the same shape, default
settings, in one process; the goal is banded ≤ 1.5 ms on 2 idle cores and ≤ 5× the hash.

Part 2, the thread policy: ``route(ones(rows), ones(64), k=2)`` for rows 10^3 … 10^6 under four
conditions, each with default settings:

* ``idle``: nothing else running (as far as this script controls);
* ``busy``: one CPU-bound process (a Python busy loop) per core beside the call;
* ``torch``: the call made inside a torch training step (forward, the call, backward and an
  optimiser step of a small MLP, torch's default intra-op threads), timing only the call;
* ``blas``: the call right after a NumPy matrix product (300 × 300) in the same process, timing
  only the call: NumPy's BLAS threads go on spinning for a while after their work (OpenBLAS:
  about 0.1 s on the 2-core Zen 3), on the cores the call would use.

Variants, each in its own persistent worker process: ``default`` (the per-call policy of
``backends/_numba_runtime.threads_for``), ``one`` (``NUMBA_NUM_THREADS=1``) and ``all``
(every call on all Numba threads, the behaviour before the policy). Points are interleaved and
repeated ``--rounds`` times; a time is the median over rounds of the per-round median of the
calls (and the fastest call of all). The goal: ``default`` never slower than ``one`` beside
busy cores. Prints tables with the CPU model, ISA and load average; writes
``benchmarks/results/threads.json``.

    python benchmarks/bench_threads.py            # ~2-4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402
from bench_cpu import cpu_info  # noqa: E402

N_EXPERTS, K = 64, 2
CONDITIONS = ["idle", "busy", "torch", "blas"]


def worker(variant: str) -> None:
    """Serve ``condition rows calls`` requests; answer with the per-call seconds."""
    import numpy as np

    import gpu_phase_router as gpr
    from gpu_phase_router.backends import _numba_runtime as rt

    if variant == "all":  # every call on all threads: no work floor, other processes ignored
        rt.PAR_MIN_WORK = 1
        rt._others_running = lambda: 0
    caps = np.ones(N_EXPERTS)
    step = None
    print(json.dumps(dict(ready=True)), flush=True)
    for line in sys.stdin:
        cond, rows_s, calls_s = line.split()
        rows, calls = int(rows_s), int(calls_s)
        w = np.ones(rows)
        if cond == "moe":
            times: dict[str, list[float]] = {}
            for method in ("phase", "hash", "systematic"):
                gpr.route(w, caps, k=K, method=method)
                ts = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    gpr.route(w, caps, k=K, method=method)
                    ts.append(time.perf_counter() - t0)
                times[method] = ts
            print(json.dumps(times), flush=True)
            continue
        if cond == "torch" and step is None:
            import torch

            model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            x = torch.randn(512, 256)

            def step(call, model=model, opt=opt, x=x):  # forward, the call (timed), backward, optimiser step
                loss = model(x).pow(2).mean()
                t0 = time.perf_counter()
                call()
                dt = time.perf_counter() - t0
                opt.zero_grad()
                loss.backward()
                opt.step()
                return dt

        gpr.route(w, caps, k=K)  # compile / load outside the timing
        mat = np.random.default_rng(0).random((300, 300))
        ts = []
        for _ in range(calls):
            if cond == "blas":
                mat @ mat  # NumPy's BLAS threads, then the call beside them
            if cond == "torch":
                ts.append(step(lambda w=w: gpr.route(w, caps, k=K)))
            else:
                t0 = time.perf_counter()
                gpr.route(w, caps, k=K)
                ts.append(time.perf_counter() - t0)
        print(json.dumps(dict(times=ts)), flush=True)


class Worker:
    def __init__(self, variant: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
        if variant == "one":
            env["NUMBA_NUM_THREADS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker", variant],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        json.loads(self.p.stdout.readline())

    def ask(self, cond: str, rows: int, calls: int) -> dict:
        self.p.stdin.write(f"{cond} {rows} {calls}\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def calls_for(rows: int) -> int:
    return max(3, min(60, 3_000_000 // rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=_args.positive_int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=CONDITIONS)
    ap.add_argument("--rounds", type=_args.positive_int, default=3, help="interleaved repeats of every point")
    ap.add_argument("--moe-calls", type=_args.positive_int, default=200, help="calls per round at the MoE shape")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "threads.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    cpu = cpu_info()
    variants = ["default", "one", "all"]
    workers = {v: Worker(v) for v in variants}
    ms = lambda ts: (statistics.median(ts) * 1e3, min(ts) * 1e3)  # noqa: E731

    # part 1: the MoE shape, idle
    load_moe = os.getloadavg()[0]
    moe: dict[str, list[list[float]]] = {}
    for _ in range(args.rounds):
        res = workers["default"].ask("moe", 16384, args.moe_calls)
        for method, ts in res.items():
            moe.setdefault(method, []).append(ts)
    moe_ms = {m: (statistics.median(ms(ts)[0] for ts in r), min(ms(ts)[1] for ts in r)) for m, r in moe.items()}

    # part 2: the thread policy
    samples: dict[tuple[str, int, str], list[list[float]]] = {}
    loads: dict[str, float] = {}
    for cond in args.conditions:
        procs = busy_loops(os.cpu_count() or 1) if cond == "busy" else []
        try:
            if procs:
                time.sleep(1.0)
            loads[cond] = os.getloadavg()[0]
            for _ in range(args.rounds):
                for rows in args.rows:
                    for v in variants:
                        ts = workers[v].ask(cond, rows, calls_for(rows))["times"]
                        samples.setdefault((cond, rows, v), []).append(ts)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    for w in workers.values():
        w.close()

    flags = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in ("avx2", "avx512f"))
    print(f"# CPU: {cpu['model']} (LLVM: {cpu['llvm_cpu']}; {cpu['cores']} cores; {flags})")
    print(f"# {args.rounds} interleaved rounds; median of per-round medians (min = fastest call)\n")
    print(f"MoE shape route(ones(16384), ones({N_EXPERTS}), k={K}), default settings, load avg {load_moe:.2f}:\n")
    print("| method | median ms | min ms | / hash (median) |")
    print("|---|---:|---:|---:|")
    for m, (med, best) in moe_ms.items():
        print(f"| {m} | {med:.3f} | {best:.3f} | {med / moe_ms['hash'][0]:.1f}× |")
    rows_out = []
    print(f"\nroute(ones(rows), ones({N_EXPERTS}), k={K}) per condition, ms (median / min):\n")
    print("| condition | load avg | rows | default | one thread | all threads | default / one |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cond in args.conditions:
        for rows in args.rows:
            r = {
                v: (
                    statistics.median(ms(ts)[0] for ts in samples[(cond, rows, v)]),
                    min(ms(ts)[1] for ts in samples[(cond, rows, v)]),
                )
                for v in variants
            }
            ratio = r["default"][0] / r["one"][0]
            rows_out.append(dict(condition=cond, rows=rows, ms={v: r[v] for v in variants}, default_over_one=ratio))
            cells = " | ".join(f"{r[v][0]:.2f} / {r[v][1]:.2f}" for v in variants)
            print(f"| {cond} | {loads[cond]:.2f} | {rows} | {cells} | {ratio:.2f} |")
    out = dict(
        cpu=cpu,
        python=platform.python_version(),
        rounds=args.rounds,
        moe=dict(load_avg=load_moe, ms={m: dict(median=v[0], min=v[1]) for m, v in moe_ms.items()}),
        threads=rows_out,
        loads=loads,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n# wrote {args.out}")


if __name__ == "__main__":
    main()
