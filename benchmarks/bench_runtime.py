"""First-use and threading-layer costs of the CPU backend.

* cold: first ``route()`` in a fresh process with an empty ``NUMBA_CACHE_DIR`` (compiles), wall and
  CPU seconds; ``systematic`` afterwards in the same process;
* warm: first ``route()`` in a fresh process whose cache is filled (loads);
* the first ``MoERouter`` forward of 4096 tokens × 64 experts, ``k = 2``, in a fresh process, cold and
  warm cache (torch imported before the clock starts; skipped without torch): ``method="phase"`` (the
  banded phase router, Numba) in a bare process and in a training process (a ``torch.optim``
  optimizer made before the clock: it imports ``torch._dynamo``, about 1.5-2.5 s, which the router's
  custom op and compile hints would otherwise import), and the same two for the default router
  (learned top-k: torch operations only);
* per threading layer: one routing call (n=20000, k=4, density 0.3) alone, and 4 Python threads
  each routing it concurrently (``workqueue`` serialises them behind the backend's lock).

Usage: ``python benchmarks/bench_runtime.py [--repeat 3] [--out FILE]``; prints a table and writes
``benchmarks/results/runtime.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402
from bench_cpu import cpu_info  # noqa: E402

FIRST = """
import json, time
t0 = time.perf_counter(); c0 = time.process_time()
import gpu_phase_router as gpr
gpr.route(n=1024, k=4, backend="cpu")
t1 = time.perf_counter(); c1 = time.process_time()
gpr.route(n=1024, k=4, backend="cpu", method="systematic")
t2 = time.perf_counter(); c2 = time.process_time()
print(json.dumps({"first_s": t1 - t0, "first_cpu_s": c1 - c0, "systematic_s": t2 - t1, "systematic_cpu_s": c2 - c1}))
"""

FIRST_MOE = """
import json, time
import torch
if {training}:
    opt = torch.optim.AdamW(torch.nn.Linear(4, 4).parameters())
t0 = time.perf_counter(); c0 = time.process_time()
from gpu_phase_router.torch import MoERouter
router = MoERouter(64, 2, {args})
router(torch.randn(4096, 64))
print(json.dumps({{"first_s": time.perf_counter() - t0, "first_cpu_s": time.process_time() - c0}}))
"""

MOE_CASES = {  # name: (MoERouter arguments after (64, 2), an optimizer made before the clock); the default
    # router runs torch operations only (no Numba kernel, nothing to compile)
    "phase": ('method="phase"', False),
    "phase, training process": ('method="phase"', True),
    "default (learned)": ("[1.0] * 32 + [0.5] * 32", False),
    "default (learned), training process": ("[1.0] * 32 + [0.5] * 32", True),
}

LAYER = """
import json, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import gpu_phase_router as gpr
from numba.np.ufunc import parallel
caps = np.random.default_rng(0).random(20000) + 0.1
job = lambda i: gpr.route(caps, caps, k=4, seed=i, backend="cpu")
job(0)
best1 = min((lambda t: (job(1), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range({repeat}))
best4 = float("inf")
with ThreadPoolExecutor(4) as ex:
    for _ in range({repeat}):
        t = time.perf_counter(); list(ex.map(job, range(4))); best4 = min(best4, time.perf_counter() - t)
print(json.dumps({{"layer": parallel._threading_layer, "one_call_s": best1, "four_threads_s": best4}}))
"""


def child(code: str, env: dict[str, str]) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--repeat", type=_args.positive_int, default=3, help="timed runs per threading layer (the fastest counts)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime.json"))
    args = ap.parse_args()
    out: dict = {"cpus": os.cpu_count(), "cpu": cpu_info(), "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as cache:
        out["cold"] = child(FIRST, {"NUMBA_CACHE_DIR": cache})
        out["warm"] = child(FIRST, {"NUMBA_CACHE_DIR": cache})
    out["moe"] = {}
    for name, (router_args, training) in MOE_CASES.items():
        code = FIRST_MOE.format(training=training, args=router_args)
        with tempfile.TemporaryDirectory() as cache:
            try:
                out["moe"][name] = {"cold": child(code, {"NUMBA_CACHE_DIR": cache})}
                out["moe"][name]["warm"] = child(code, {"NUMBA_CACHE_DIR": cache})
            except subprocess.CalledProcessError:
                print("MoERouter: torch not available")
                break
    with tempfile.TemporaryDirectory() as cache:
        out["layers"] = []
        for layer in ("omp", "workqueue", "tbb"):
            try:
                r = child(LAYER.format(repeat=args.repeat), {"NUMBA_CACHE_DIR": cache, "NUMBA_THREADING_LAYER": layer})
                out["layers"].append({**r, "layer": r["layer"] or f"{layer} (pool unused)"})
            except subprocess.CalledProcessError:
                print(f"layer {layer}: not available")
    c = out["cpu"]
    print(f"# CPU: {c['model']} (LLVM: {c['llvm_cpu']}; {c['cores']} cores; AVX2 {c['avx2']}, AVX-512 {c['avx512f']})")
    print(f"# load avg at start {out['load_avg'][0]:.2f} (wall times grow with load; cpu s much less)\n")
    print(f"{'first route()':<16} {'wall s':>8} {'cpu s':>8} {'+systematic s':>14}")
    for name in ("cold", "warm"):
        r = out[name]
        print(f"{name:<16} {r['first_s']:>8.2f} {r['first_cpu_s']:>8.2f} {r['systematic_s']:>14.2f}")
    if out["moe"]:
        print(f"\n{'first MoERouter forward':<32} {'cold s':>8} {'warm s':>8}")
    for name, r in out["moe"].items():
        print(f"{name:<32} {r['cold']['first_s']:>8.2f} {r['warm']['first_s']:>8.2f}")
    print(f"\n{'layer':<12} {'1 call ms':>10} {'4 threads ms':>13}")
    for r in out["layers"]:
        print(f"{r['layer']:<12} {r['one_call_s'] * 1e3:>10.1f} {r['four_threads_s'] * 1e3:>13.1f}")
    dest = Path(args.out).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwritten: {dest}")


if __name__ == "__main__":
    main()
