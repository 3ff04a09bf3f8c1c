"""MoE shapes: the default router at training shapes (many tokens × few experts), SPEC §13.

For every T ∈ {4096, 16384} tokens, E ∈ {8, 16, 64, 256} experts, k ∈ {1, 2, 4, 8} (k <= E/2) and
capacity profile (uniform; strong = ``capacity.strong_hetero_capacities``; half = half the experts
at half capacity; dom30 / dom50 / dom90 / dom9999 = expert 0 holding 30 / 50 / 90 / 99.99 % of all
capacity, the others equal; top8 = ``[8, 2, 2, 1, 1, …]``), routes uniform tokens with
``route(np.ones(T), caps, k=k, seed=s, method=m)`` for m in phase / weighted_hash / systematic and reports, per method:

* **fill**: % of the ``T·k`` slots holding an expert (goal for phase: >= 99.99);
* **load**: fair shares ``T·k·cap/Σcap`` water-filled so that no expert gets more than ``T``
  (one slot per token); the goal holds when every capacity class whose fair share is at most
  ``T/2`` has a mean load within 5 % of its fair share, and no expert is above
  ``1.2·fair + 3·√fair``; ``dev`` is the worst class deviation (%) over those classes;
* **survival** at 1.2× headroom (SPEC §12 hard caps, row-major admission), mean over the seeds;
  the goal for phase is at most 1 point below ``weighted_hash``.

It also times ``route`` at 16384 × 64, k=2 on the CPU backend (best, 10th percentile and median of
200 calls after a warm-up; goal <= 2 ms on 2 cores) and re-checks the crate's square survival table
(``bench_moe.py``: square shapes do not use bands, so the phase router's numbers must stay within
2.5 points of ``results/moe_survival.json``).

Run from the repository root::

    python benchmarks/bench_moe_shapes.py              # 2 seeds per point, ~1-2 minutes on 2 cores
    python benchmarks/bench_moe_shapes.py --seeds 1 --quick
    python benchmarks/bench_moe_shapes.py --profiles dom90 top8 --no-extras   # writes *_partial.json

Writes ``benchmarks/results/moe_shapes.json`` (compact) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import gpu_phase_router as gpr  # noqa: E402
from gpu_phase_router import capacity, methods  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # _args beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args  # noqa: E402

METHODS = ["phase", "weighted_hash", "systematic"]
TOKENS = [4096, 16384]
EXPERTS = [8, 16, 64, 256]
KS = [1, 2, 4, 8]
PROFILES = ["uniform", "strong", "half", "dom30", "dom50", "dom90", "dom9999", "top8"]
HEADROOM = 1.2
FILL_GOAL = 99.99
LOAD_TOL = 0.05
SURVIVAL_GAP = 1.0  # points below weighted_hash
TIME_GOAL_MS = 2.0
SQUARE_TOL = 2.5  # points


DOMINANT = {"dom30": 0.3, "dom50": 0.5, "dom90": 0.9, "dom9999": 0.9999}  # one expert's share of all capacity


def profile_caps(profile: str, n: int, seed: int) -> np.ndarray:
    if profile == "uniform":
        return np.ones(n)
    if profile == "strong":
        return capacity.strong_hetero_capacities(n, seed=seed)
    if profile in DOMINANT:  # expert 0 holds the given share, the others 1 each
        share = DOMINANT[profile]
        return np.concatenate([[share / (1.0 - share) * (n - 1)], np.ones(n - 1)])
    if profile == "top8":  # [8, 2, 2, 1, 1, ...]: one expert at 8x, two at 2x
        return np.concatenate([[8.0, 2.0, 2.0], np.ones(n - 3)])
    caps = np.ones(n)
    caps[np.random.default_rng(seed).permutation(n)[: n // 2]] = 0.5
    return caps


def water_filled_fair(caps: np.ndarray, n_tokens: int, k: int) -> np.ndarray:
    """Fair shares ``T·k·cap/Σcap``, capped at ``T`` with the excess spread over the others in
    proportion to capacity (repeated until no share exceeds ``T``)."""
    fair = np.zeros(caps.shape[0])
    free = caps > 0
    total = float(n_tokens * k)
    while True:
        share = np.where(free, total * caps / caps[free].sum(), 0.0)
        over = free & (share > n_tokens)
        if not over.any():
            fair[free] = share[free]
            return fair
        fair[over] = n_tokens
        free &= ~over
        total -= n_tokens * int(over.sum())


def load_check(routes: np.ndarray, caps: np.ndarray, k: int) -> tuple[bool, float]:
    """(goal met, worst class deviation) of the load rule in the module docstring."""
    n_tokens = routes.shape[0]
    loads = np.bincount(routes[routes >= 0], minlength=caps.shape[0]).astype(np.float64)
    fair = water_filled_fair(caps, n_tokens, k)
    worst = 0.0
    for value in np.unique(caps[caps > 0]):
        cls = caps == value
        if fair[cls][0] <= n_tokens / 2:
            worst = max(worst, abs(loads[cls].mean() / fair[cls].mean() - 1.0))
    pos = caps > 0
    under_max = bool((loads[pos] <= 1.2 * fair[pos] + 3.0 * np.sqrt(fair[pos])).all())
    return worst <= LOAD_TOL and under_max, worst


def run_shape(n_tokens: int, n_exp: int, k: int, profile: str, seeds: list[int]) -> dict:
    out: dict = {}
    for m in METHODS:
        fill, surv, ok, dev = [], [], [], []
        for s in seeds:
            caps = profile_caps(profile, n_exp, s)
            r = gpr.route(np.ones(n_tokens), caps, k=k, seed=s, method=m, backend="cpu")
            fill.append(float((r >= 0).mean()) * 100)
            hard = gpr.make_hard_caps(caps, n_tokens, k, HEADROOM)
            surv.append(gpr.survival_rate(gpr.enforce_capacity(r, hard)) * 100)
            good, worst = load_check(r, caps, k)
            ok.append(good)
            dev.append(worst * 100)
        out[m] = {
            "fill": round(min(fill), 3),
            "survival": round(float(np.mean(surv)), 2),
            "load_ok": all(ok),
            "dev": round(max(dev), 2),
        }
    return out


def time_route(reps: int) -> dict:
    caps = np.ones(64)
    w = np.ones(16384)
    for _ in range(3):
        gpr.route(w, caps, k=2, seed=0, backend="cpu")
        methods.route_uniform("phase", "cpu", 16384, caps, k=2, seed=0)
    res = {}
    for name, fn in (
        ("route", lambda s: gpr.route(w, caps, k=2, seed=s, backend="cpu")),
        ("route_uniform", lambda s: methods.route_uniform("phase", "cpu", 16384, caps, k=2, seed=s)),
    ):
        times = []
        for s in range(reps):
            t0 = time.perf_counter()
            fn(s)
            times.append(time.perf_counter() - t0)
        res[name] = {
            "best_ms": round(min(times) * 1e3, 3),
            "p10_ms": round(float(np.percentile(times, 10)) * 1e3, 3),
            "median_ms": round(float(np.median(times)) * 1e3, 3),
        }
    lay = gpr.methods.phase.band_layout(caps, 16384, 2, 0.3)
    res["ring"] = {"V": lay.n_cols, "k_draw": lay.k_draw}
    return res


def square_check(seeds: list[int]) -> dict:
    """The phase router's points of the crate's four experiments vs the stored bench_moe results."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_moe

    stored = json.loads((Path(__file__).resolve().parent / "results" / "moe_survival.json").read_text())["summary"]
    rows = []
    for name in bench_moe.SEED_EXPERIMENTS:
        for value in bench_moe.EXPERIMENTS[name]["values"]:
            cfg = bench_moe.config(name, value)
            surv = [
                bench_moe.run_point("phase", cfg["profile"], cfg["n"], cfg["k"], cfg["headroom"], s, cfg["density"])[
                    "survival"
                ]
                for s in seeds
            ]
            was = stored[name][str(value)]["phase"]["survival"]["mean"] * 100
            rows.append(
                {
                    "experiment": name,
                    "value": value,
                    "now": round(float(np.mean(surv)) * 100, 2),
                    "stored": round(was, 2),
                }
            )
    worst = max(abs(r["now"] - r["stored"]) for r in rows)
    return {"seeds": seeds, "points": rows, "max_diff_points": round(worst, 2), "ok": worst <= SQUARE_TOL}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=_args.positive_int, default=2, help="number of seeds (0 .. seeds-1)")
    ap.add_argument("--quick", action="store_true", help="T = 4096 only, fewer timing calls")
    ap.add_argument("--profiles", nargs="+", choices=PROFILES, default=PROFILES, help="capacity profiles to run")
    ap.add_argument("--no-extras", action="store_true", help="skip the timing and the square-table check")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    seeds = list(range(args.seeds))
    gpr.route(np.ones(64), np.ones(8), k=2, backend="cpu")  # compile outside the measurements
    shapes = [
        (t, e, k, p)
        for t in (TOKENS[:1] if args.quick else TOKENS)
        for p in args.profiles
        for e in EXPERTS
        for k in KS
        if k <= e // 2
    ]
    t0 = time.perf_counter()
    results = []
    print(f"{'T':>6} {'E':>4} {'k':>2} {'profile':>8} | " + " | ".join(f"{m:^27}" for m in METHODS))
    print(f"{'':>24}| " + " | ".join(f"{'fill%':>7} {'load':>4} {'dev%':>5} {'surv%':>6}" for _ in METHODS))
    for t, e, k, p in shapes:
        r = run_shape(t, e, k, p, seeds)
        results.append({"T": t, "E": e, "k": k, "profile": p, **r})
        cells = [
            f"{r[m]['fill']:7.2f} {'ok' if r[m]['load_ok'] else 'NO':>4} {r[m]['dev']:5.1f} {r[m]['survival']:6.2f}"
            for m in METHODS
        ]
        print(f"{t:>6} {e:>4} {k:>2} {p:>8} | " + " | ".join(cells), flush=True)
    sweep_s = time.perf_counter() - t0
    timing = None if args.no_extras else time_route(50 if args.quick else 200)
    square = None if args.no_extras else square_check(seeds=list(range(3)))
    goals = {}
    for m in METHODS:
        goals[m] = {
            "fill_ok": sum(r[m]["fill"] >= FILL_GOAL for r in results),
            "load_ok": sum(r[m]["load_ok"] for r in results),
            "survival_ok": sum(r[m]["survival"] >= r["weighted_hash"]["survival"] - SURVIVAL_GAP for r in results),
            "shapes": len(results),
        }
    print(f"\nshapes meeting each goal (of {len(results)}):")
    for m in METHODS:
        g = goals[m]
        print(
            f"  {m:>14}: fill >= {FILL_GOAL}%: {g['fill_ok']}, load: {g['load_ok']}, "
            f"survival within {SURVIVAL_GAP} pt of weighted_hash: {g['survival_ok']}"
        )
    if timing is not None and square is not None:
        _print_extras(timing, square)
    out = {
        "meta": {
            "headroom": HEADROOM,
            "seeds": seeds,
            "profiles": args.profiles,
            "sweep_s": round(sweep_s, 1),
            "load_average": os.getloadavg(),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
            "note": "timings on a shared, noisy 2-core machine",
        },
        "goals": goals,
        "timing": timing,
        "square_check": square,
        "shapes": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "moe_shapes_quick.json" if args.quick else "moe_shapes.json"
    if args.profiles != PROFILES or args.no_extras:
        name = name.replace(".json", "_partial.json")
    path = args.out / name
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path}")
    return 0


def _print_extras(timing: dict, square: dict) -> None:
    print(
        f"route 16384 x 64, k=2 (CPU, {os.cpu_count()} cores, noisy shared machine): "
        f"best {timing['route']['best_ms']} ms, median {timing['route']['median_ms']} ms; "
        f"route_uniform best {timing['route_uniform']['best_ms']} ms (goal {TIME_GOAL_MS} ms); "
        f"V = {timing['ring']['V']}"
    )
    print(
        f"square survival table: max |now - stored| = {square['max_diff_points']} points "
        f"({'ok' if square['ok'] else 'CHANGED'}, tolerance {SQUARE_TOL})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
