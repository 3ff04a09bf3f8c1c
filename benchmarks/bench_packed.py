"""Padded vs packed expert buffers (SPEC §15): step time and expert FLOPs of an MoE FFN layer.

Layer: ``plan = router(gate(x))``; the experts are two-layer GELU MLPs ``d -> hidden -> d``; the
step is forward + backward of ``(combine(experts(dispatch(x))) * target).sum()``. Variants:

* ``padded``: ``[E, C, d]`` buffers through two ``torch.bmm`` (every expert padded to ``C``);
* ``packed_loop``: ``[sum(capacity), d]``, one matmul per expert on its rows (``plan.expert_rows``,
  the weights split with ``unbind``);
* ``packed_grouped``: the packed buffer through ``torch._grouped_mm`` (where torch has it).

Capacity profiles (16 experts): ``uniform`` (all equal), ``half`` (8 at capacity 1, 8 at 0.5),
``strong`` (``capacity.strong_hetero_capacities``: 10 % at 8x, 20 % at 2x). Expert FLOPs count
the two matmuls of the forward pass (``2 * rows * d * hidden`` each); the backward does twice that.

    python benchmarks/bench_packed.py                 # T = 4096, d = 256, hidden = 512, k = 2
    python benchmarks/bench_packed.py --quick         # T = 1024, two repeats

Prints a table and writes ``benchmarks/results/bench_packed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout
    sys.path.insert(0, str(ROOT))

from gpu_phase_router.capacity import strong_hetero_capacities  # noqa: E402
from gpu_phase_router.torch import MoERouter  # noqa: E402

if str(ROOT / "benchmarks") not in sys.path:  # _args beside this file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402
from bench_cpu import cpu_info  # noqa: E402

N_EXP = 16
PROFILES = {
    "uniform": np.ones(N_EXP),
    "half": np.array([1.0] * (N_EXP // 2) + [0.5] * (N_EXP // 2)),
    "strong": strong_hetero_capacities(N_EXP, seed=0),
}
VARIANTS = ["padded", "packed_loop", "packed_grouped"]


def grouped_mm_works() -> bool:
    """``torch._grouped_mm`` exists and runs forward and backward on CPU float32."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(6, 8, requires_grad=True)
        out = torch._grouped_mm(a, torch.randn(2, 8, 8), offs=torch.tensor([2, 6], dtype=torch.int32))
        out.backward(torch.ones_like(out))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def layer_step(variant: str, router: MoERouter, gate: torch.nn.Linear, w1, w2, x, target) -> None:
    """One forward + backward of the MoE FFN layer in ``variant``."""
    plan = router(gate(x))
    gelu = torch.nn.functional.gelu
    if variant == "padded":
        out = plan.combine(torch.bmm(gelu(torch.bmm(plan.dispatch(x), w1)), w2))
    elif variant == "packed_loop":
        rows = plan.expert_rows(plan.dispatch(x, layout="packed"))
        # unbind, not w1[e]: the backward of w1[e] writes a zero gradient of all of w1 per expert
        y = torch.cat([gelu(r @ a) @ b for r, a, b in zip(rows, w1.unbind(0), w2.unbind(0), strict=True)])
        out = plan.combine(y, layout="packed")
    else:
        offs = plan.offsets_tensor[1:].to(torch.int32)
        buf = plan.dispatch(x, layout="packed")
        y = torch._grouped_mm(gelu(torch._grouped_mm(buf, w1, offs=offs)), w2, offs=offs)
        out = plan.combine(y, layout="packed")
    (out * target).sum().backward()


def measure(profile: str, n_tok: int, d: int, hidden: int, k: int, repeats: int, grouped: bool) -> dict[str, Any]:
    caps = PROFILES[profile]
    router = MoERouter(N_EXP, k, caps, method="systematic", capacity_factor=1.25, seed=0)
    hard = router.hard_caps(n_tok)
    gen = torch.Generator().manual_seed(0)
    gate = torch.nn.Linear(d, N_EXP)
    w1 = (torch.randn(N_EXP, d, hidden, generator=gen) / d**0.5).requires_grad_()
    w2 = (torch.randn(N_EXP, hidden, d, generator=gen) / hidden**0.5).requires_grad_()
    x = torch.randn(n_tok, d, generator=gen).requires_grad_()
    target = torch.randn(n_tok, d, generator=gen)
    kept = int(router(gate(x)).tokens_per_expert.sum())
    rows = {"kept": kept, "packed": int(hard.sum()), "padded": N_EXP * int(hard.max())}
    res: dict[str, Any] = {
        "profile": profile,
        "hard_caps": hard.tolist(),
        "rows": rows,
        "expert_gflop_forward": {v: round(2 * 2 * rows[v] * d * hidden / 1e9, 3) for v in ("kept", "packed", "padded")},
        "padding_share": round(1 - rows["packed"] / rows["padded"], 4),
        "step_ms": {},
    }
    variants = [v for v in VARIANTS if v != "packed_grouped" or grouped]
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # one variant at a time, as a training run would call it (a warm-up step first)
        layer_step(v, router, gate, w1, w2, x, target)
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            layer_step(v, router, gate, w1, w2, x, target)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    res["cpu_ms"] = {}
    for v in variants:
        res["step_ms"][v] = round(1e3 * statistics.median(wall[v]), 2)
        res["cpu_ms"][v] = round(1e3 * statistics.median(cpu[v]), 2)
    for key, name in (("packed_loop", "packed"), ("packed_grouped", "grouped")):
        if key in variants:
            res[f"{name}_over_padded"] = round(res["step_ms"][key] / res["step_ms"]["padded"], 3)
            res[f"{name}_over_padded_cpu"] = round(res["cpu_ms"][key] / res["cpu_ms"]["padded"], 3)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=_args.positive_int, help="tokens (default 4096; --quick: 1024)")
    ap.add_argument("--d", type=_args.positive_int, default=256)
    ap.add_argument("--hidden", type=_args.positive_int, default=512)
    ap.add_argument("--k", type=_args.int_range(1, N_EXP), default=2, help=f"slots per token (1 .. {N_EXP})")
    ap.add_argument("--repeats", type=_args.positive_int, help="timed steps (default 5; --quick: 2)")
    ap.add_argument(
        "--threads", type=_args.positive_int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    ap.add_argument("--quick", action="store_true", help="T = 1024, two repeats (unless --tokens / --repeats say)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 1024 if args.quick else 4096
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # Numba's OpenMP layer
    torch.set_num_threads(args.threads)  # shares the thread count with torch: set both
    grouped = grouped_mm_works()
    load = os.getloadavg()
    rows = [measure(p, args.tokens, args.d, args.hidden, args.k, args.repeats, grouped) for p in PROFILES]
    load_after = os.getloadavg()
    print(
        f"MoE FFN layer, forward + backward: T = {args.tokens}, E = {N_EXP}, k = {args.k}, d = {args.d}, "
        f"hidden = {args.hidden}, capacity factor 1.25; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{cpu_info()}, load average {load[0]:.1f} -> {load_after[0]:.1f}"
    )
    print(f"torch._grouped_mm on CPU: {'yes' if grouped else 'no'}; step time: wall ms (CPU ms), median")
    print()
    head = "| profile | padding | expert GFLOP fwd: kept / packed / padded | padded | packed loop |"
    head += " grouped_mm | packed / padded | grouped / padded |" if grouped else " packed / padded |"
    print(head)
    print("|---|---:|---|---:|---:|" + ("---:|---:|---:|" if grouped else "---:|"))
    for r in rows:
        g, ms, cp = r["expert_gflop_forward"], r["step_ms"], r["cpu_ms"]
        line = (
            f"| {r['profile']} | {100 * r['padding_share']:.0f} % | {g['kept']} / {g['packed']} / {g['padded']} "
            f"| {ms['padded']:.0f} ({cp['padded']:.0f}) | {ms['packed_loop']:.0f} ({cp['packed_loop']:.0f}) |"
        )
        if grouped:
            line += f" {ms['packed_grouped']:.0f} ({cp['packed_grouped']:.0f}) |"
        line += f" {r['packed_over_padded']} ({r['packed_over_padded_cpu']}) |"
        if grouped:
            line += f" {r['grouped_over_padded']} ({r['grouped_over_padded_cpu']}) |"
        print(line)
    out = {
        "config": {
            "tokens": args.tokens,
            "experts": N_EXP,
            "k": args.k,
            "d": args.d,
            "hidden": args.hidden,
            "capacity_factor": 1.25,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": cpu_info(),
            "load_average": [round(load[0], 2), round(load_after[0], 2)],
            "grouped_mm_cpu": grouped,
        },
        "profiles": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("bench_packed_quick.json" if args.quick else "bench_packed.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
