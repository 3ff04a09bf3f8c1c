"""Layout checks of one warm ``route()``: module crossings, import graph, time (issue: one room per method).

For each source tree given (default: this checkout), in a fresh process with that tree first on
``sys.path``:

* **crossings**: calls from one module of the package into another during one warm
  ``route(ones(16384), ones(64), k=2)``, counted with ``sys.setprofile`` (a generator's resumes
  are not counted; its first call is);
* **time**: the median and fastest of 300 warm calls of the same route (one Numba thread unless
  ``--threads``, so the trees' thread policies do not enter the comparison);

and for this checkout the import graph of ``gpu_phase_router`` (module-level imports): cycles and
upward imports (a module importing the package's front door, ``api`` or ``blocks``, from below).

    python benchmarks/bench_layout.py                      # this checkout
    python benchmarks/bench_layout.py --trees /path/to/old # beside another checkout, same run

Writes ``benchmarks/results/layout.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # _args beside this file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402

PKG = "gpu_phase_router"

_CHILD = r"""
import inspect, json, sys, time
import numpy as np
import gpu_phase_router as g

w, c = np.ones(16384), np.ones(64)
for _ in range(3):
    g.route(w, c, k=2, seed=1)
calls, resumes = [], 0
GEN = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR

def prof(frame, event, arg):
    global resumes
    if event != "call":
        return
    mod = frame.f_globals.get("__name__", "")
    back = frame.f_back
    caller = back.f_globals.get("__name__", "") if back is not None else ""
    if not (mod.startswith("gpu_phase_router") and caller.startswith("gpu_phase_router")) or mod == caller:
        return
    if frame.f_code.co_flags & GEN and frame.f_lasti > 0:
        resumes += 1
        return
    calls.append([caller, mod, frame.f_code.co_name])

sys.setprofile(prof)
g.route(w, c, k=2, seed=1)
sys.setprofile(None)
times = []
for _ in range(300):
    t0 = time.perf_counter()
    g.route(w, c, k=2, seed=1)
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"file": g.__file__, "crossings": len(calls), "resumes": resumes,
                  "modules": len({m for c in calls for m in c[:2]}), "calls": calls,
                  "median_ms": times[len(times) // 2] * 1e3, "min_ms": times[0] * 1e3}))
"""


def measure(tree: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    if threads:
        env["NUMBA_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"bench_layout: the timed process in {tree} failed (exit {out.returncode}):\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """Module → package modules it imports at module level (relative and absolute imports)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir.parent).with_suffix("")
        parts = list(rel.parts)
        is_init = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_init else parts)
        base = parts[:-1] if is_init else parts[:-1]
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - node.level + 1]
                    mod = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
                else:
                    mod = node.module or ""
                if mod.startswith(PKG):
                    deps.add(mod)
                    deps.update(f"{mod}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith(PKG))
        graph[name] = deps
    return {m: {d for d in ds if d in graph and d != m} for m, ds in graph.items()}


FRONT = ("api", "blocks", "dask", "torch", "__main__", "compat", "capacity", "baselines")  # faces users import


def _is_front(m: str) -> bool:
    return m == PKG or m.split(".")[1] in FRONT


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (strongly connected components of more than one module), not counting a
    package's ``__init__`` importing its own submodules (a re-export, not a loop of code)."""
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            strong(m)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a front-door module (``api``, ``blocks``, ``dask``, ``torch``, …) by a module
    below them (methods, backends, preparation, validation)."""
    return sorted((m, d) for m, ds in graph.items() for d in ds if not _is_front(m) and _is_front(d))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--trees", nargs="*", type=_args.existing_dir, default=[], help="other checkouts to measure in the same run"
    )
    ap.add_argument(
        "--threads", type=_args.nonnegative_int, default=1, help="NUMBA_NUM_THREADS of the timed processes (0: default)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    avx512 = "avx512f" in open("/proc/cpuinfo").read()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, AVX-512 {'yes' if avx512 else 'no'}; load {os.getloadavg()}")
    rows = []
    for tree in [ROOT, *map(Path, args.trees)]:
        r = measure(tree.resolve(), args.threads)
        r["tree"] = str(tree)
        rows.append(r)
        print(
            f"{str(tree):40s} crossings {r['crossings']:3d} (modules {r['modules']}, resumes {r['resumes']}); "
            f"warm route median {r['median_ms']:.2f} ms, fastest {r['min_ms']:.2f} ms"
        )
    graph = import_graph(ROOT / PKG)
    loops = cycles(graph)
    upward = upward_imports(graph)
    print(f"import graph: {len(graph)} modules, cycles {loops or 'none'}, upward imports {upward or 'none'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"cpu": cpu, "avx512": avx512, "cpus": os.cpu_count(), "python": platform.python_version()},
        "load": os.getloadavg(),
        "numba_threads": args.threads or "default",
        "trees": rows,
        "import_cycles": loops,
        "upward_imports": upward,
    }
    Path(args.out, "layout.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
