"""Cost of the default (learned, capacity-aware) MoE router's forward (SPEC §16) against plain top-k.

Times ``MoERouter(E, k, caps)`` (``method="topk"``, ``balance="bias"``, ``overflow="reroute"``,
its default rounds; training mode, so the bias update is included) beside the plain learned baseline
``torch.topk`` + the SPEC §15 plan with position-order drops, and beside ``torch.topk`` alone.
Capacities: half the experts at half capacity, ``capacity_factor`` 1.25. The variants run
interleaved, one call of each per repeat, so load on the machine hits them alike; the table gives
the median and the minimum over the repeats and the ratio to plain top-k.

Run from the repository root::

    python benchmarks/bench_learned_router.py                        # CPU, 16384 x 64, k = 2
    python benchmarks/bench_learned_router.py --device cuda --tokens 16384 --experts 256 --k 8

Writes ``--out`` (default ``benchmarks/results/learned_router_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpu_phase_router.torch import MoERouter, RoutingPlan

if str(Path(__file__).resolve().parent) not in sys.path:  # _args beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args  # noqa: E402


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=_args.positive_int, default=16384)
    parser.add_argument("--experts", type=_args.positive_int, default=64)
    parser.add_argument("--k", type=_args.positive_int, default=2)
    parser.add_argument("--repeats", type=_args.positive_int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=_args.nonnegative_int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.k > args.experts:
        parser.error(f"argument --k: at most --experts ({args.experts}); got {args.k}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_learned_router: --device cuda but torch sees no CUDA device")
    n_tok, n_exp, k = args.tokens, args.experts, args.k
    caps = [1.0] * (n_exp - n_exp // 2) + [0.5] * (n_exp // 2)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n_tok, n_exp, generator=gen).to(device)

    router = MoERouter(n_exp, k, caps)
    capacity = torch.from_numpy(router.hard_caps(n_tok)).to(device)
    buffer_size = int(capacity.max())

    def plain() -> RoutingPlan:
        experts = torch.topk(logits, k, dim=1).indices
        return RoutingPlan.from_experts(experts, capacity, logits, buffer_size=buffer_size)

    drop = MoERouter(n_exp, k, caps, balance=None, overflow="drop")
    evaluating = MoERouter(n_exp, k, caps).eval()
    variants: dict[str, Callable[[], object]] = {
        "torch.topk alone": lambda: torch.topk(logits, k, dim=1),
        "plain top-k with drops (baseline)": plain,
        f"default router (train: bias update + {router.reroute_rounds} reroute rounds)": lambda: router(logits),
        "default router (eval mode)": lambda: evaluating(logits),
        "top-k, balance=None, overflow='drop'": lambda: drop(logits),
    }
    timer = _timer(device)
    for fn in variants.values():  # warm-up: caches, allocator, kernels
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timer(fn))
    base = "plain top-k with drops (baseline)"
    rows = []
    for name, ts in times.items():
        rows.append(
            {
                "variant": name,
                "median_ms": statistics.median(ts) * 1e3,
                "min_ms": min(ts) * 1e3,
                "ratio_median": statistics.median(ts) / statistics.median(times[base]),
                "ratio_min": min(ts) / min(times[base]),
            }
        )
    served = 1.0 - float(router(logits).drop_rate())
    result = {
        "tokens": n_tok,
        "experts": n_exp,
        "k": k,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "loadavg": list(os.getloadavg()),
        "default_router_slots_served": served,
        "rows": rows,
    }
    print(f"# MoE router forward, {n_tok} tokens x {n_exp} experts, k = {k}, {device} ({result['device_name']})")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {result['loadavg']}")
    print("| variant | median ms | min ms | x baseline (median) | x baseline (min) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} | "
            f"{row['ratio_median']:.2f} | {row['ratio_min']:.2f} |"
        )
    print(f"default router: {100 * served:.2f} % of slots served on these logits")
    out = Path(args.out or f"benchmarks/results/learned_router_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
