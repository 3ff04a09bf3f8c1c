"""Per-step overhead of ``ExpertParallel`` on 2 gloo processes over the single-process layer.

Layer: ``plan = router(gate(x))`` (16 equal experts, ``k = 2``, capacity factor 1.25), GELU MLP
experts ``d -> hidden -> d`` on the packed layout (one matmul per expert), forward + backward.

* ``single``: one process, ``T`` tokens, all 16 experts (``plan.dispatch(x, "packed")``);
* ``ep2``: two processes (gloo, one machine), each with its own ``T`` tokens and 8 experts: each
  local expert sees both ranks' rows, so every rank does the same expert FLOPs as ``single``.

The overhead is ``ep2`` step time (the slower rank, median over steps) minus ``single``'s: the
two all-to-all exchanges each way, the row permutation, and waiting for the other rank. Every
process runs one torch thread.

    python benchmarks/bench_expert_parallel.py            # T = 4096, d = 256, hidden = 512
    python benchmarks/bench_expert_parallel.py --quick    # T = 1024

Prints a table and writes ``benchmarks/results/bench_expert_parallel.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
N_EXP, K = 16, 2


def _layer_steps(args: argparse.Namespace, world: int) -> list[float]:
    """Wall seconds of each timed step on this process (``world = 0``: no process group)."""
    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from gpu_phase_router.torch import ExpertParallel, MoERouter

    torch.set_num_threads(1)
    rank = 0
    ep = None
    if world:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        ep = ExpertParallel()
    router = MoERouter(N_EXP, K, method="systematic", capacity_factor=1.25, seed=rank)
    gen = torch.Generator().manual_seed(rank)
    d, hidden = args.d, args.hidden
    gate = torch.nn.Linear(d, N_EXP)
    experts = list(ep.local_experts(N_EXP)) if ep is not None else list(range(N_EXP))
    w1 = (torch.randn(len(experts), d, hidden, generator=gen) / d**0.5).requires_grad_()
    w2 = (torch.randn(len(experts), hidden, d, generator=gen) / hidden**0.5).requires_grad_()
    x = torch.randn(args.tokens, d, generator=gen).requires_grad_()
    target = torch.randn(args.tokens, d, generator=gen)
    gelu = torch.nn.functional.gelu

    def step() -> None:
        plan = router(gate(x))
        if ep is None:
            buf = plan.dispatch(x, layout="packed")
            rows = plan.expert_rows(buf)
        else:
            buf, handle = ep.dispatch(plan, x)
            rows = handle.expert_rows(buf)
        y = torch.cat([gelu(r @ a) @ b for r, a, b in zip(rows, w1.unbind(0), w2.unbind(0), strict=True)])
        out = plan.combine(y, layout="packed") if ep is None else ep.combine(handle, y)
        (out * target).sum().backward()

    times = []
    for i in range(args.repeats + 2):  # two warm-up steps
        if world:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if world:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, times)
        dist.destroy_process_group()
        if rank:
            return []
        times = [max(ts) for ts in zip(*everyone, strict=True)]  # a step ends when the slower rank ends
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: argparse.Namespace, world: int) -> list[float]:
    """Step times from ``world`` worker processes (0: one process without a group)."""
    port = _free_port()
    procs = []
    for rank in range(max(world, 1)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        argv = [sys.executable, __file__, "--worker", str(world), "--tokens", str(args.tokens), "--d", str(args.d)]
        argv += ["--hidden", str(args.hidden), "--repeats", str(args.repeats)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: return codes {[p.returncode for p in procs]}")
    return [float(v) for v in json.loads(outs[0].strip().splitlines()[-1])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="T = 1024, 5 steps")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_layer_steps(args, args.worker)))
        return 0
    if args.quick:
        args.tokens, args.repeats = 1024, 5
    load = os.getloadavg()
    single = _run(args, 0)
    ep2 = _run(args, 2)
    load_after = os.getloadavg()
    s_ms, e_ms = 1e3 * statistics.median(single), 1e3 * statistics.median(ep2)
    res = {
        "config": {
            "tokens_per_rank": args.tokens,
            "experts": N_EXP,
            "k": K,
            "d": args.d,
            "hidden": args.hidden,
            "steps": args.repeats,
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(load[0], 2), round(load_after[0], 2)],
        },
        "single_ms": [round(1e3 * t, 2) for t in single],
        "ep2_ms": [round(1e3 * t, 2) for t in ep2],
        "single_median_ms": round(s_ms, 2),
        "ep2_median_ms": round(e_ms, 2),
        "overhead_ms": round(e_ms - s_ms, 2),
        "overhead_ratio": round(e_ms / s_ms, 3),
    }
    print(
        f"MoE FFN layer, forward + backward, packed experts: T = {args.tokens} per rank, E = {N_EXP}, k = {K}, "
        f"d = {args.d}, hidden = {args.hidden}; 1 thread per process; {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} -> {load_after[0]:.1f}"
    )
    print()
    print("| layer | step ms (median) | overhead |")
    print("|---|---:|---:|")
    print(f"| single process, 16 experts | {s_ms:.1f} | |")
    over = f"{e_ms - s_ms:+.1f} ms ({100 * (e_ms / s_ms - 1):+.0f} %)"
    print(f"| 2 gloo processes, 8 experts each | {e_ms:.1f} | {over} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("bench_expert_parallel_quick.json" if args.quick else "bench_expert_parallel.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
