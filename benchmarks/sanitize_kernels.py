"""Launch every CUDA kernel of ``gpu_phase_router/kernels/*.cu`` through the package, on small shapes.

Meant to run under ``compute-sanitizer`` (memcheck, racecheck, synccheck; see ``gpu_check.sh``),
and useful on its own: it checks every result against the CPU backend and exits 1 when a
result differs or when a kernel found in the sources was never launched.

Kernels are discovered from the sources (``extern "C" __global__`` functions, including those
stamped out by a ``#define NAME(K)`` macro), so kernels added in new ``.cu`` files are covered as
long as some public entry point reaches them. Launches are recorded by wrapping
``cupy.RawModule`` before the package compiles its module.

    python benchmarks/sanitize_kernels.py            # prints launched / missing kernels
    python benchmarks/sanitize_kernels.py --list     # only the discovered kernel names (no GPU needed)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # _args beside this file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402

_GLOBAL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')
_MACRO = re.compile(r"#define\s+(\w+)\((\w+)\)((?:[^\n]*\\\n)*[^\n]*)")


def discover_kernels(kernel_dir: Path) -> list[str]:
    """Names of all ``extern "C" __global__`` kernels in ``kernel_dir/*.cu``, macro instances expanded."""
    names: set[str] = set()
    for path in sorted(kernel_dir.glob("*.cu")):
        src = path.read_text()
        for m in _MACRO.finditer(src):
            macro, param, body = m.groups()
            if "__global__" not in body:
                continue
            stem = re.search(r"(\w+)##" + param, body)
            if stem is None:
                continue
            for inst in re.finditer(r"^\s*" + macro + r"\((\w+)\)", src, re.MULTILINE):
                names.add(stem.group(1) + inst.group(1))
        body_free = _MACRO.sub("", src)
        names.update(_GLOBAL.findall(body_free))
    return sorted(names)


def install_recorder(cupy, launched: Counter) -> None:
    """Make every ``cupy.RawModule`` record the kernels launched from it in ``launched``."""
    base = cupy.RawModule

    class _Recorded:
        def __init__(self, fn, name):
            self._fn, self._name = fn, name

        def __call__(self, *args, **kwargs):
            launched[self._name] += 1
            return self._fn(*args, **kwargs)

        def __getattr__(self, attr):
            return getattr(self._fn, attr)

    class RecordingRawModule(base):
        def get_function(self, name):
            return _Recorded(super().get_function(name), name)

    cupy.RawModule = RecordingRawModule


def exercise(cupy, failures: list[str]) -> None:
    """Every public entry point with the cuda backend on small shapes, each checked against the CPU."""
    import gpu_phase_router as gpr

    rng = np.random.default_rng(0)
    cp = cupy.asarray

    def check(label, on_gpu, on_cpu):
        """Run ``on_gpu`` and ``on_cpu`` (partials), compare; report and go on when either fails."""
        try:
            got, want = on_gpu(), on_cpu()
        except Exception as exc:  # every kernel should still be reached
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            return
        if not np.array_equal(cupy.asnumpy(got), np.asarray(want)):
            failures.append(f"{label}: cuda result differs from cpu")

    for n_src, n_tgt in ((300, 300), (1000, 64), (200, 1000)):
        d = rng.integers(0, n_tgt + 1, n_src)
        c = rng.integers(0, n_src + 1, n_tgt)
        for k in (1, 2, 3, 8, 16, 40):
            if k <= n_tgt:
                check(
                    f"route_counts {n_src}x{n_tgt} k={k}",
                    partial(gpr.route_counts, cp(d), cp(c), k=k, seed=3, backend="cuda"),
                    partial(gpr.route_counts, d, c, k=k, seed=3, backend="cpu"),
                )
        w, caps = rng.random(n_src), rng.random(n_tgt)
        for method in gpr.available_methods():
            src = np.ones(n_src) if method == "systematic" else w
            check(
                f"route(method={method!r}) {n_src}x{n_tgt}",
                partial(gpr.route, cp(src), cp(caps), k=4, seed=1, method=method, backend="cuda"),
                partial(gpr.route, src, caps, k=4, seed=1, method=method, backend="cpu"),
            )
    n, k = 257, 4
    bits = gpr.left_aligned_bits(rng.integers(0, n + 1, n), n).ravel()
    ps, pt = rng.permutation(n), rng.permutation(n)
    nb = (n + 63) // 64
    check(
        "phase_router",
        partial(gpr.phase_router, cp(bits), cp(bits), n, nb, k, cp(ps), cp(pt), 7),
        partial(gpr.phase_router, bits, bits, n, nb, k, ps, pt, 7),
    )
    check(
        "phase_router_auto",
        partial(gpr.phase_router_auto, cp(bits), cp(bits), n, k, 7),
        partial(gpr.phase_router_auto, bits, bits, n, k, 7),
    )
    words = bits.reshape(n, nb)
    check("popcount_rows", partial(gpr.popcount_rows, cp(words), n), partial(gpr.popcount_rows, words, n))
    check(
        "auto_permutation",
        partial(gpr.auto_permutation, 1000, 5, 1, backend="cuda"),
        partial(gpr.auto_permutation, 1000, 5, 1, backend="cpu"),
    )
    try:
        from gpu_phase_router import compat  # crate-exact mode, where present
    except ImportError:
        return
    check(
        "compat.phase_router",
        partial(compat.phase_router, cp(bits), cp(bits), n, nb, k, cp(ps), cp(pt), 7, backend="cuda"),
        partial(compat.phase_router, bits, bits, n, nb, k, ps, pt, 7, backend="cpu"),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the discovered kernels and exit")
    args = ap.parse_args()
    kernels = discover_kernels(ROOT / "gpu_phase_router" / "kernels")
    if args.list:
        print("\n".join(kernels))
        return 0
    cupy, _ = _args.need_gpu("sanitize_kernels.py", "nothing launched")

    launched: Counter = Counter()
    install_recorder(cupy, launched)
    failures: list[str] = []
    exercise(cupy, failures)
    cupy.cuda.Device().synchronize()
    missing = [name for name in kernels if name not in launched]
    for name in kernels:
        print(f"{'launched' if name in launched else 'NOT LAUNCHED':>12} {launched.get(name, 0):5d}x  {name}")
    for name in sorted(set(launched) - set(kernels)):
        print(f"{'(other)':>12} {launched[name]:5d}x  {name}")
    for f in failures:
        print(f"FAILED {f}")
    print(f"# {len(kernels) - len(missing)}/{len(kernels)} kernels launched; {len(failures)} failure(s)")
    return 1 if missing or failures else 0


if __name__ == "__main__":
    sys.exit(main())
