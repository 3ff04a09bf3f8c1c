"""MoE routing benchmark: token survival after hard capacity enforcement (SPEC §12).

Reproduces the crate's four experiments for every routing method — survival vs headroom (the
hero figure), vs fan-out k, vs number of experts N, and vs capacity heterogeneity — over several
seeds (mean ± std), and writes JSON, CSV and plots (the plots are drawn from the JSON).

Setup per point (as in the seed): square routing (``n_src = n_tgt = N`` tokens and experts),
uniform token weights, ``route()`` defaults (density 0.3); expert capacities from a profile
shuffled by the run's seed; hard caps ``max(1, ceil(cap / sum(cap) * N * k * headroom))``;
slots admitted in row-major order; survival = admitted slots / (N * k), so the phase router's
``-1`` row padding counts as not served.

Run from the repository root::

    python benchmarks/bench_moe.py                 # full run, 20 seeds
    python benchmarks/bench_moe.py --seeds 3       # quicker
    python benchmarks/bench_moe.py --plot-only     # redraw plots/tables from the JSON

Outputs (``--out``, default ``benchmarks/results``): ``moe_survival.json``, ``moe_survival.csv``,
``moe_table.md``, ``survival_vs_headroom.png``, ``survival_vs_k.png``, ``survival_vs_n.png``,
``survival_vs_heterogeneity.png``, ``moe_panel.png`` (those four as a 2×2 panel) and, beyond
the crate's experiments, ``survival_vs_density.png`` (the phase router's density, extreme profile).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import gpu_phase_router as gpr
from gpu_phase_router.capacity import CAPACITY_PROFILES

if str(Path(__file__).resolve().parent) not in sys.path:  # _args beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args  # noqa: E402

METHODS = ["phase", "systematic", "hash", "weighted_hash"]
LABELS = {
    "phase": "phase router",
    "systematic": "systematic",
    "hash": "hash (capacity-blind)",
    "weighted_hash": "weighted hash",
}
STYLES = {"phase": ("o", "C0"), "systematic": ("D", "C2"), "hash": ("s", "C3"), "weighted_hash": ("^", "C1")}

# Defaults of the crate's experiments: strong profile, N = 1024, k = 2, headroom 1.2, density 0.3.
BASE = {"profile": "strong", "n": 1024, "k": 2, "headroom": 1.2, "density": 0.3}
EXPERIMENTS = {
    "headroom": {
        "param": "headroom",
        "values": [1.0, 1.1, 1.2, 1.5, 2.0],
        "xlabel": "headroom (hard cap / fair share)",
    },
    "k": {"param": "k", "values": [1, 2, 4, 8, 16], "xlabel": "k (experts per token)"},
    "n": {"param": "n", "values": [256, 512, 1024, 2048, 4096], "xlabel": "N (tokens = experts)"},
    "heterogeneity": {
        "param": "profile",
        "values": ["uniform", "mild", "strong", "extreme"],
        "xlabel": "capacity profile",
    },
    # Not in the seed: the phase router's density (the other methods ignore it), extreme profile.
    "density": {
        "param": "density",
        "values": [0.05, 0.1, 0.2, 0.3, 0.5],
        "fixed": {"profile": "extreme"},
        "xlabel": "density (phase router only)",
    },
}
SEED_EXPERIMENTS = ["headroom", "k", "n", "heterogeneity"]

# The crate's published survival (%) for its phase router and capacity-blind hash.
SEED_PUBLISHED = {
    "headroom": {"phase": [87.9, 89.1, 89.8, 92.4, 97.8], "hash": [79.2, 79.2, 79.2, 80.9, 92.5]},
    "k": {"phase": [85.4, 89.8, 91.4, 95.9, 96.6], "hash": [70.6, 79.2, 74.6, 78.9, 77.6]},
    "n": {"phase": [91.6, 92.1, 89.8, 90.1, 91.1], "hash": [77.7, 80.6, 79.2, 78.7, 79.0]},
    "heterogeneity": {"phase": [89.4, 87.5, 89.8, 83.0], "hash": [89.2, 78.8, 79.2, 74.8]},
}


def config(name: str, value) -> dict:
    """The full setting of one point of experiment ``name``."""
    exp = EXPERIMENTS[name]
    return dict(BASE, **exp.get("fixed", {}), **{exp["param"]: value})


def run_point(method: str, profile: str, n: int, k: int, headroom: float, seed: int, density: float = 0.3) -> dict:
    """One routing + enforcement; returns survival, pre-enforcement fill, load terms, time."""
    caps = CAPACITY_PROFILES[profile](n, seed=seed)
    t0 = time.perf_counter()
    routes = gpr.route(target_capacities=caps, k=k, seed=seed, density=density, method=method, backend="cpu")
    elapsed = time.perf_counter() - t0
    hard = gpr.make_hard_caps(caps, n, k, headroom)
    enforced = gpr.enforce_capacity(routes, hard)
    stats = gpr.load_stats(gpr.compute_loads(routes, n), caps)
    return {
        "survival": gpr.survival_rate(enforced),
        "filled": gpr.survival_rate(routes),  # slots holding a target before enforcement
        "load_cv": stats["cv"],
        "ratio_std": stats["ratio_std"],
        "corr": stats["corr"],
        "route_s": elapsed,
    }


def run(seeds: list[int], progress: bool = True) -> dict:
    from tqdm import tqdm

    jobs = [(name, v, m, s) for name, e in EXPERIMENTS.items() for v in e["values"] for m in METHODS for s in seeds]
    # warm up the JIT so no timing includes compilation
    for m in METHODS:
        gpr.route(n=64, k=2, method=m, backend="cpu")
    raw: dict = {}
    t_start = time.perf_counter()
    for name, value, method, seed in tqdm(jobs, desc="bench_moe", unit="run", disable=not progress):
        cfg = config(name, value)
        res = run_point(method, cfg["profile"], cfg["n"], cfg["k"], cfg["headroom"], seed, cfg["density"])
        res = {key: None if val != val else round(val, 7) for key, val in res.items()}  # small JSON, no NaN
        raw.setdefault(name, {}).setdefault(str(value), {}).setdefault(method, []).append(res)
    total_s = time.perf_counter() - t_start
    summary: dict = {}
    for name, by_value in raw.items():
        for value, by_method in by_value.items():
            for method, runs in by_method.items():
                row = {}
                for key in runs[0]:
                    vals = np.array([np.nan if r[key] is None else r[key] for r in runs], dtype=np.float64)
                    row[key] = {
                        "mean": float(np.nanmean(vals)) if not np.isnan(vals).all() else None,
                        "std": float(np.nanstd(vals)) if not np.isnan(vals).all() else None,
                    }
                summary.setdefault(name, {}).setdefault(value, {})[method] = row
    return {
        "meta": {
            "description": "token survival after hard capacity enforcement (SPEC §12); square routing, "
            "uniform token weights, route() defaults (density 0.3)",
            "base": BASE,
            "experiments": EXPERIMENTS,
            "methods": METHODS,
            "seeds": seeds,
            "runtime_s": total_s,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpu_count": os.cpu_count(),
                "python": sys.version.split()[0],
            },
            "versions": _versions(),
        },
        "seed_published": SEED_PUBLISHED,
        "summary": summary,
        "raw": raw,
    }


def _versions() -> dict:
    import numba

    return {"gpu_phase_router": gpr.__version__, "numpy": np.__version__, "numba": numba.__version__}


def write_csv(result: dict, path: Path) -> None:
    keys = ["survival", "filled", "load_cv", "ratio_std", "corr", "route_s"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["experiment", "param", "value", "method", "seeds"]
            + [f"{k}_{s}" for k in keys for s in ("mean", "std")]
            + ["seed_published_survival"]
        )
        for name, by_value in result["summary"].items():
            exp = result["meta"]["experiments"][name]
            for i, value in enumerate(map(str, exp["values"])):
                for method in result["meta"]["methods"]:
                    row = by_value[value][method]
                    pub = result["seed_published"].get(name, {}).get(method)
                    w.writerow(
                        [name, exp["param"], value, method, len(result["meta"]["seeds"])]
                        + [_fmt(row[k][s]) for k in keys for s in ("mean", "std")]
                        + ["" if pub is None else pub[i]]
                    )


def _fmt(x):
    return "" if x is None else f"{x:.6g}"


def markdown_table(result: dict) -> str:
    """Survival (%) mean ± std per experiment, with the crate's published numbers beside ours."""
    seeds = len(result["meta"]["seeds"])
    lines = [
        f"Survival after enforcement, % (mean ± std over {seeds} seeds); *seed* = the crate's published numbers.",
        "",
    ]
    for name, by_value in result["summary"].items():
        exp = result["meta"]["experiments"][name]
        pub = result["seed_published"].get(name, {})
        header = ["method"] + [str(v) for v in exp["values"]]
        lines.append(f"**vs {exp['param']}** ({_fixed(name)})")
        lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for method in result["meta"]["methods"]:
            cells = []
            for v in map(str, exp["values"]):
                s = by_value[v][method]["survival"]
                cells.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
            if method in pub:
                lines.append(f"| *seed {method}* | " + " | ".join(f"*{p:.1f}*" for p in pub[method]) + " |")
        lines.append("")
    return "\n".join(lines)


def _fixed(name: str) -> str:
    exp = EXPERIMENTS[name]
    cfg = dict(BASE, **exp.get("fixed", {}))
    parts = []
    for key, label in (
        ("profile", "profile"),
        ("n", "N"),
        ("k", "k"),
        ("headroom", "headroom"),
        ("density", "density"),
    ):
        if key != exp["param"]:
            parts.append(f"{label} = {cfg[key]}")
    return ", ".join(parts)


def plot(result: dict, out: Path, dpi: int = 100) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, name):
        exp = result["meta"]["experiments"][name]
        values = [str(v) for v in exp["values"]]
        categorical = exp["param"] in ("profile", "n", "k", "density")
        x = np.arange(len(values)) if categorical else np.array(exp["values"], float)
        for method in result["meta"]["methods"]:
            mean = np.array([result["summary"][name][v][method]["survival"]["mean"] for v in values]) * 100
            std = np.array([result["summary"][name][v][method]["survival"]["std"] for v in values]) * 100
            marker, color = STYLES[method]
            ax.errorbar(x, mean, yerr=std, marker=marker, color=color, label=LABELS[method], capsize=3, lw=1.8)
            pub = result["seed_published"].get(name, {}).get(method)
            if pub is not None:
                ax.plot(
                    x,
                    pub,
                    ls=":",
                    marker=marker,
                    mfc="none",
                    color=color,
                    alpha=0.8,
                    label=f"seed's {LABELS[method]} (published)",
                )
        if categorical:
            ax.set_xticks(x, values)
        ax.set_xlabel(exp["xlabel"])
        ax.set_ylabel("token survival after enforcement (%)")
        ax.set_title(f"survival vs {exp['param']} ({_fixed(name)})", fontsize=9)
        ax.grid(alpha=0.3)

    paths = []
    for name in result["summary"]:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        draw(ax, name)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        p = out / f"survival_vs_{name}.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        paths.append(p)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for ax, name in zip(axes.ravel(), SEED_EXPERIMENTS, strict=True):
        draw(ax, name)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    p = out / "moe_panel.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=_args.positive_int, default=20, help="number of seeds (0 .. seeds-1); default 20")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="output folder (default benchmarks/results)",
    )
    ap.add_argument("--plot-only", action="store_true", help="redraw plots and table from the existing JSON")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    json_path = args.out / "moe_survival.json"
    if args.plot_only and not json_path.is_file():
        ap.error(f"--plot-only: no {json_path} to redraw from (run without --plot-only first)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        result = json.loads(json_path.read_text())
    else:
        result = run(list(range(args.seeds)), progress=not args.no_progress)
        json_path.write_text(json.dumps(result, separators=(",", ":"), allow_nan=False))
        write_csv(result, args.out / "moe_survival.csv")
    table = markdown_table(result)
    (args.out / "moe_table.md").write_text(table + "\n")
    print(table)
    for p in plot(result, args.out):
        print(f"wrote {p}")
    print(f"wrote {json_path} (benchmark runtime {result['meta']['runtime_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
