#!/usr/bin/env python
"""Scale benchmark: n_src = 10^6 .. 10^8 sources x 1024 targets, k = 4, on one machine.

Configurations (each size x configuration runs in a fresh subprocess, so its peak RSS is its own):

* ``counts``      blocked single-process ``route_counts(d, c)`` (d int64, made from the weights)
* ``route``       blocked single-process ``route(w, caps)`` (method="phase")
* ``systematic``  blocked single-process ``route(ones, caps, method="systematic")``
* ``dask-threads`` ``gpu_phase_router.dask.route`` on the threaded scheduler (one Dask thread; the
  Numba kernel uses every core), stored into a preallocated NumPy output
* ``dask-1w`` / ``dask-2w`` the same on a ``distributed.LocalCluster`` with 1 / 2 worker processes
  (1 thread each; Numba threads = cores / workers). Weights are generated on the workers and
  persisted before timing; ``time`` is routing with the routes persisted on the workers,
  ``gather`` the extra time to copy them into one NumPy array in the client.

Weights are a deterministic function of the global row index, so every configuration routes the
same inputs; the table's ``sha`` column (first 12 hex digits of the SHA-256 of the routes) must
agree within a size, which checks that the blocked, Dask and ``route_counts`` paths are identical
(``route_counts`` is fed the degrees that ``route`` computes). The first call (JIT / cache load)
is made before timing; sizes up to 10^7 are timed ``--repeat`` times and the median is reported.

Peak memory: ``ru_maxrss`` of the subprocess for single-process runs; for Dask, the largest sum of
RSS over the subprocess and all its children (scheduler, nannies, workers) sampled every 50 ms with
psutil. ``budget`` = 1.25 x (caller's input arrays + int32 output).

Usage::

    python benchmarks/bench_scale.py                       # 1e6 1e7 1e8, all configurations
    python benchmarks/bench_scale.py --sizes 1e6 1e7 --configs route dask-2w --json out.json

The table goes to stdout, progress bars and logs to stderr, the records to ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # _args beside this file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402

CONFIGS = ["counts", "route", "systematic", "dask-threads", "dask-1w", "dask-2w"]
N_TGT, K, SEED, DENSITY = 1024, 4, 42, 0.3
GEN_BLOCK = 1 << 22


# --- inputs ------------------------------------------------------------------------------------


def weights_of_rows(idx: np.ndarray) -> np.ndarray:
    """Deterministic weights in [0.5, 1.5) from global row indices (uint64)."""
    z = (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(29)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(32)
    return 0.5 + (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def capacities() -> np.ndarray:
    return np.random.default_rng(0).random(N_TGT) + 0.5


def weights(n: int) -> np.ndarray:
    w = np.empty(n)
    for a in range(0, n, GEN_BLOCK):
        b = min(n, a + GEN_BLOCK)
        w[a:b] = weights_of_rows(np.arange(a, b, dtype=np.uint64))
    return w


def chunk_rows(n: int) -> int:
    """Dask chunk: at least 16 chunks, between 2^16 and 2^22 rows."""
    return int(min(1 << 22, max(1 << 16, -(-n // 16))))


# --- memory ------------------------------------------------------------------------------------


class TreeRss:
    """Peak of the summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        try:
            import psutil
        except ImportError:
            self.proc = None
            return
        self.proc = psutil.Process()
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # process ended between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._sample())


def self_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- one configuration (child process) ----------------------------------------------------------


def run_one(cfg: str, n: int, repeat: int, block_rows: int | None, progress: bool) -> dict:
    import gpu_phase_router as gpr
    from gpu_phase_router import blocks

    sampler = TreeRss()
    caps = capacities()
    rec: dict = {
        "config": cfg,
        "n_src": n,
        "n_tgt": N_TGT,
        "k": K,
        "density": DENSITY,
        "method": "systematic" if cfg == "systematic" else "phase",
    }
    times: list[float] = []
    gather = None
    out = None

    if cfg in ("counts", "route", "systematic", "dask-threads"):
        w = np.ones(n) if cfg == "systematic" else weights(n)
        inputs = w.nbytes + caps.nbytes
        if cfg == "counts":
            mean = blocks.weight_mean(w)
            d = np.empty(n, dtype=np.int64)
            for a in range(0, n, GEN_BLOCK):
                d[a : a + GEN_BLOCK] = blocks.source_degrees(
                    w[a : a + GEN_BLOCK], weight_mean=mean, n_tgt=N_TGT, density=DENSITY
                )
            c = np.asarray(blocks.source_degrees(caps, weight_mean=blocks.weight_mean(caps), n_tgt=n, density=DENSITY))
            del w
            inputs = d.nbytes + c.nbytes
            gpr.route_counts(d[:1000], np.minimum(c, 1000), k=K, seed=SEED)  # JIT / cache load

            def call():
                return gpr.route_counts(d, c, k=K, seed=SEED, block_rows=block_rows)
        elif cfg in ("route", "systematic"):
            method = "systematic" if cfg == "systematic" else "phase"
            gpr.route(w[:1000], caps, k=K, seed=SEED, method=method)

            def call():
                return gpr.route(w, caps, k=K, seed=SEED, density=DENSITY, method=method, block_rows=block_rows)
        else:
            import dask.array as da
            from dask.diagnostics import ProgressBar

            from gpu_phase_router import dask as gdask

            gdask.route(da.from_array(w[:1000], chunks=300), caps, k=K).compute(scheduler="sync")
            wd = da.from_array(w, chunks=chunk_rows(n))
            rec["chunks"] = len(wd.chunks[0])

            def call():
                res = np.empty((n, K), dtype=np.int32)
                r = gdask.route(wd, caps, k=K, seed=SEED, density=DENSITY, block_rows=block_rows)
                if progress:
                    with ProgressBar(out=sys.stdout, minimum=1.0):
                        da.store(r, res, lock=False, scheduler="threads", num_workers=1)
                else:
                    da.store(r, res, lock=False, scheduler="threads", num_workers=1)
                return res

        for _ in range(repeat):
            out = None
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
        peak = self_maxrss() if cfg != "dask-threads" else max(self_maxrss(), sampler.stop() or 0)
    else:
        import dask.array as da
        import distributed

        from gpu_phase_router import dask as gdask

        workers = int(cfg[len("dask-") : -1])
        env = {
            "NUMBA_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers)),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        with (
            distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                env=env,
            ) as cluster,
            distributed.Client(cluster) as cl,
        ):
            cl.compute(gdask.route(da.ones(2000, chunks=500), caps, k=K)).result()  # JIT / cache load on workers
            rows = chunk_rows(n)
            w = da.arange(n, chunks=rows, dtype=np.uint64).map_blocks(weights_of_rows, dtype=np.float64).persist()
            distributed.wait(w)
            rec["chunks"] = len(w.chunks[0])
            inputs = n * 8 + caps.nbytes
            starts = np.cumsum((0,) + w.chunks[0])
            gathers = []
            for _ in range(repeat):
                out = r = None
                t0 = time.perf_counter()
                r = gdask.route(w, caps, k=K, seed=SEED, density=DENSITY, block_rows=block_rows).persist()
                if progress:
                    distributed.progress(r)
                distributed.wait(r)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = np.empty((n, K), dtype=np.int32)
                futs = {f.key: f for f in distributed.futures_of(r)}
                for f in distributed.as_completed(list(futs.values())):
                    i = f.key[1]
                    out[starts[i] : starts[i + 1]] = f.result()
                gathers.append(time.perf_counter() - t0)
                cl.cancel(list(futs.values()))  # forget the routes, so a repeat recomputes them
                del futs, f
                r = None
                while sum(len(v) for v in cl.has_what().values()) > rec["chunks"]:
                    time.sleep(0.05)
            gather = statistics.median(gathers)
            peak = sampler.stop()
    t = statistics.median(times)
    rec.update(
        {
            "loadavg_1min_after": os.getloadavg()[0],
            "time_s": t,
            "times_s": times,
            "rows_per_s": n / t,
            "gather_s": gather,
            "peak_rss_bytes": peak,
            "input_bytes": inputs,
            "output_bytes": n * K * 4,
            "budget_bytes": 1.25 * (inputs + n * K * 4),
            "sha256": hashlib.sha256(memoryview(out).cast("B")).hexdigest(),
        }
    )
    return rec


# --- driver ------------------------------------------------------------------------------------


def machine() -> dict:
    import dask
    import distributed
    import numba

    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        ),
        "?",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_total": mem,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "platform": platform.platform(),
    }


def fmt_row(r: dict) -> str:
    gb = 1e9
    peak = r["peak_rss_bytes"]
    return (
        f"{r['n_src']:>11,d} {r['config']:<13} {r['time_s']:>8.2f} {r['rows_per_s'] / 1e6:>8.2f} "
        f"{'' if r['gather_s'] is None else format(r['gather_s'], '.2f'):>7} "
        f"{peak / gb:>8.2f} {r['budget_bytes'] / gb:>8.2f} {peak / r['budget_bytes'] * 1.25:>7.2f} "
        f"{r['sha256'][:12]}"
    )


HEADER = (
    f"{'n_src':>11} {'config':<13} {'time_s':>8} {'Mrows/s':>8} {'gather':>7} {'peak_GB':>8} "
    f"{'budgetGB':>8} {'peak/io':>7} sha"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sizes", nargs="+", type=_args.positive_count, default=[1e6, 1e7, 1e8], help="n_src values (e.g. 1e6)"
    )
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    ap.add_argument("--repeat", type=_args.positive_int, default=3, help="timed runs for n <= 1e7 (median); 1 above")
    ap.add_argument("--block-rows", type=_args.positive_int, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale_results.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=_args.positive_int, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        rec = run_one(args.one, args.n, args.repeat, args.block_rows, not args.no_progress)
        args.result.write_text(json.dumps(rec))
        return

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    info = machine()
    print(
        f"# {info['nproc']} x {info['cpu']}, {info['mem_total']}; numpy {info['numpy']}, numba {info['numba']}, "
        f"dask {info['dask']}, distributed {info['distributed']}; n_tgt={N_TGT}, k={K}, density={DENSITY}"
    )
    print(HEADER, flush=True)
    records = []
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n = int(size)
            for cfg in args.configs:
                res = Path(tmp) / f"{cfg}-{n}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    cfg,
                    "--n",
                    str(n),
                    "--result",
                    str(res),
                    "--repeat",
                    str(args.repeat if n <= 10**7 else 1),
                ]
                if args.block_rows:
                    cmd += ["--block-rows", str(args.block_rows)]
                if args.no_progress:
                    cmd.append("--no-progress")
                proc = subprocess.run(cmd, env=env, stdout=sys.stderr, check=False)
                if proc.returncode != 0 or not res.exists():
                    print(f"{n:>11,d} {cfg:<13} FAILED (exit {proc.returncode})", flush=True)
                    failed += 1
                    continue
                rec = json.loads(res.read_text())
                records.append(rec)
                print(fmt_row(rec), flush=True)
    shas: dict[int, set] = {}
    for r in records:
        if r["method"] == "phase":
            shas.setdefault(r["n_src"], set()).add(r["sha256"])
    agree = {n: len(s) == 1 for n, s in shas.items()}
    print("# phase routes identical across configurations:", ", ".join(f"{n:,d}: {ok}" for n, ok in agree.items()))
    args.json.write_text(json.dumps({"machine": info, "records": records, "identical": agree}, separators=(",", ":")))
    print(f"# wrote {args.json}")
    if failed:
        raise SystemExit(f"bench_scale: {failed} run(s) FAILED")


if __name__ == "__main__":
    main()
