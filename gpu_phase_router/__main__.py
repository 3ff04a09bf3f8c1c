"""Command line: ``python -m gpu_phase_router demo`` (also the ``gpu-phase-router`` script).

The demo routes tokens to experts of strongly heterogeneous capacity (10% at 8×, 20% at 2×,
the rest 1×) with every routing method, prints load statistics and the survival after hard
capacity enforcement (SPEC §12), and writes two plots (needs the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._arrays import to_numpy

PLOT_HINT = "pip install 'gpu_phase_router[plot]'"


def _usable_cupy() -> Any:
    """CuPy if it imports and sees a working CUDA device, else ``None``."""
    from .backends import cuda_available

    return importlib.import_module("cupy") if cuda_available() else None


def _array_module(backend: str) -> tuple[Any, str]:
    if backend == "cpu":
        return np, "CPU (NumPy in, Numba kernels)"
    cupy = _usable_cupy()
    if cupy is not None:
        return cupy, "GPU (CuPy in, CUDA kernels)"
    if backend == "cuda":
        from .backends import CUDA_INSTALL_HINT

        raise SystemExit(f"--backend cuda needs CuPy and a usable CUDA device; {CUDA_INSTALL_HINT}")
    return np, "CPU (NumPy in, Numba kernels; no usable GPU found)"


def demo(args: argparse.Namespace) -> int:
    import gpu_phase_router as gpr

    xp, where = _array_module(args.backend)
    n_exp, n_tok, k = args.experts, args.tokens, args.k
    if not 1 <= k <= n_exp:
        raise SystemExit(f"--k must be between 1 and --experts={n_exp}; got {k}")
    caps = gpr.strong_hetero_capacities(n_exp, seed=args.seed)
    hard = gpr.make_hard_caps(caps, n_tok, k, args.headroom)
    weights = xp.ones(n_tok, dtype=xp.float64)
    caps_dev = xp.asarray(caps)
    print(
        f"gpu_phase_router demo: {n_tok} tokens -> {n_exp} experts, k={k}, seed={args.seed}, "
        f"headroom {args.headroom}x, on {where}"
    )
    per_level = ", ".join(f"{int((caps == c).sum())} at {c:g}x" for c in sorted(set(caps.tolist()), reverse=True))
    print(
        f"capacities: the strong profile (10% of experts at 8x, 20% at 2x, the rest 1x: {per_level}); "
        f"hard caps total {int(hard.sum())} slots for {n_tok * k} requested\n"
    )

    rows, loads = [], {}
    for method in gpr.available_methods():
        gpr.route(weights[:8], caps_dev, k=k, seed=args.seed, method=method, backend="auto")  # compile/warm up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            routes = gpr.route(weights, caps_dev, k=k, seed=args.seed, method=method, backend="auto")
            if xp is not np:
                xp.cuda.get_current_stream().synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = float(np.median(times))
        routes = to_numpy(routes)
        ld = gpr.compute_loads(routes, n_exp)
        st = gpr.load_stats(ld, caps)
        enforced = gpr.enforce_capacity(routes, hard)
        loads[method] = ld
        rows.append(
            (
                method,
                st["cv"],
                st["max_over_mean"],
                st["ratio_std"],
                st["corr"],
                gpr.survival_rate(routes),
                gpr.survival_rate(enforced),
                ms,
            )
        )

    head = (
        f"{'method':<14} {'load CV':>8} {'max/mean':>9} {'ratio sd':>9} {'corr':>6} "
        f"{'filled':>7} {'survival':>9} {'ms':>7}"
    )
    print(head)
    print("-" * len(head))
    for m, cv, mm, rsd, corr, filled, surv, ms in rows:
        corr_text = f"{corr:>6.3f}" if math.isfinite(corr) else f"{'n/a':>6}"  # NaN: equal capacities or loads
        print(f"{m:<14} {cv:>8.3f} {mm:>9.2f} {rsd:>9.3f} {corr_text} {filled:>7.1%} {surv:>9.1%} {ms:>7.2f}")
    print(
        "\nload CV, max/mean: spread of expert loads (capacity differs, so some spread is wanted);\n"
        "ratio sd: spread of load / fair share (fair = in proportion to capacity; 0 is perfect);\n"
        "corr: load-capacity correlation (n/a where every capacity or every load is equal);\n"
        "filled: slots holding an expert before enforcement (-1 padding counts as not served);\n"
        "survival: slots admitted under the hard caps;\n"
        f"ms: median routing time of {args.repeat} calls after a warm-up call (JIT compile excluded)."
    )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nmatplotlib is not installed, so no plots were written; for plots: {PLOT_HINT}")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = np.unique(caps)
    fair = n_tok * k * levels / caps.sum()
    paths = []
    for name, ylabel, transform in (
        ("capacity_vs_load.png", "slots per expert (mean ± sd over experts)", lambda v, lv: v),
        ("load_capacity_ratio.png", "load / fair share (1 = proportional)", lambda v, lv: v / lv),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method, ld in loads.items():
            per = [transform(ld[caps == c].astype(float), n_tok * k * c / caps.sum()) for c in levels]
            ax.errorbar(
                levels, [p.mean() for p in per], yerr=[p.std() for p in per], marker="o", capsize=3, label=method
            )
        if name == "capacity_vs_load.png":
            ax.plot(levels, fair, "k--", label="fair share (∝ capacity)")
        else:
            ax.axhline(1.0, color="k", ls="--", label="proportional")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [f"{c:g}x" for c in levels])
        ax.set_xlabel("expert capacity")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{n_tok} tokens, {n_exp} experts, k={k} (before enforcement)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    print(f"\nplots written to {out.resolve()}/: {', '.join(p.name for p in paths)}")
    return 0


def _number(parse: Callable[[str], Any], what: str, lo: float, hi: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse(text)`` within ``[lo, hi)`` (finite), else an error saying ``what``."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or value < lo or hi is not None and value >= hi:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text}")
        return value

    return convert


_positive_int = _number(int, "a whole number >= 1", 1)
_size = _number(int, "a whole number in [1, 2^27]", 1, (1 << 27) + 1)  # a demo: up to ~1 GB of arrays
_seed = _number(int, "a whole number in [0, 2^64)", 0, 1 << 64)
_headroom = _number(float, "a finite number >= 1", 1.0)


PLOT_FILES = ("capacity_vs_load.png", "load_capacity_ratio.png")


def _check_out_dir(ap: argparse.ArgumentParser, out: str) -> None:
    """``--out`` must be a folder we can create and write, and the plots' names free for files
    (checked before any routing)."""
    try:
        import matplotlib  # noqa: F401  (without it no plots are written, so --out is unused)
    except ImportError:
        return
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        ap.error(f"argument --out: cannot write plots to {out!r}: {exc.strerror or exc}")
    taken = [name for name in PLOT_FILES if (path / name).exists() and not (path / name).is_file()]
    if taken:
        ap.error(f"argument --out: {out!r} holds {', '.join(taken)}, which is not a file; choose another folder")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu-phase-router", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = ap.add_subparsers(dest="command")
    d = sub.add_parser(
        "demo",
        help="route tokens to heterogeneous experts with every method; print stats, write plots",
        description="Route tokens to experts with strongly heterogeneous capacities (10% at 8x, 20% at 2x) "
        "with every routing method (phase, systematic, hash, weighted_hash); print load statistics, "
        "load-capacity correlation and survival after hard capacity enforcement; write "
        "capacity_vs_load.png and load_capacity_ratio.png (needs matplotlib: "
        f"{PLOT_HINT}).",
    )
    d.add_argument("--experts", type=_size, default=512, help="number of experts (targets); default 512")
    d.add_argument("--tokens", type=_size, default=4096, help="number of tokens (sources); default 4096")
    d.add_argument("-k", "--k", type=_positive_int, default=4, help="experts per token; default 4")
    d.add_argument("--seed", type=_seed, default=42, help="routing and capacity-profile seed; default 42")
    d.add_argument(
        "--headroom",
        type=_headroom,
        default=1.2,
        help="hard cap = headroom x fair share of the slots (>= 1); default 1.2",
    )
    d.add_argument("--out", default="phase_router_demo", help="folder for the plots; default ./phase_router_demo/")
    d.add_argument("--repeat", type=_positive_int, default=5, help="timed calls per method (median shown); default 5")
    d.add_argument(
        "--backend",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: the GPU when CuPy and a CUDA device are usable, else the CPU; default auto",
    )
    d.set_defaults(parser=d)  # errors about several options print the demo's usage
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gpu_phase_router`` and the ``gpu-phase-router`` script."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "demo":
        sub = args.parser
        if args.k > args.experts:
            sub.error(f"argument --k: must be between 1 and --experts={args.experts}; got {args.k}")
        if not args.tokens * args.k * args.headroom < 2.0**62:
            sub.error(
                f"argument --headroom: {args.headroom:g} x {args.tokens} tokens x k={args.k} slots is too "
                "large for integer hard caps"
            )
        _check_out_dir(sub, args.out)
        return demo(args)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
