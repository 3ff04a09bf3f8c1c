"""Per-step overhead of ``ExpertParallel`` on 2 gloo processes over the single-process layer.

Layer: ``plan = router(gate(x))`` (16 equal experts, ``k = 2``, capacity factor 1.25), GELU MLP
experts ``d -> hidden -> d`` on the packed layout (one matmul per expert), forward + backward.

* ``single``: one process, ``T`` tokens, all 16 experts (``plan.dispatch(x, "packed")``);
* ``ep2``: two processes (gloo, one machine), each with its own ``T`` tokens and 8 experts: each
  local expert sees both ranks' rows, so every rank does the same expert FLOPs as ``single``.

The overhead is ``ep2`` step time (the slower rank, median over steps) minus ``single``'s: the
all-to-all exchanges (two forward, two backward), the row permutation, and waiting for the other
rank. Also reported: CPU time per rank (``time.process_time``; waiting does not count), which a
busy machine disturbs less. Every process runs one thread (torch and Numba).

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
if str(ROOT / "benchmarks") not in sys.path:  # _args beside this file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import _args  # noqa: E402

N_EXP, K = 16, 2


def _layer_steps(args: argparse.Namespace, world: int) -> list[list[float]]:
    """[wall, CPU] seconds of each timed step (``world = 0``: one process, no group); with a group,
    on rank 0, the slower rank's wall time and the mean CPU time of the ranks."""
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
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= 2:
            times.append([time.perf_counter() - t0, time.process_time() - c0])
    if world:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, times)
        dist.destroy_process_group()
        if rank:
            return []
        # a step ends when the slower rank ends; CPU time: the ranks' mean
        times = [[max(t[0] for t in ts), sum(t[1] for t in ts) / world] for ts in zip(*everyone, strict=True)]
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: argparse.Namespace, world: int) -> list[list[float]]:
    """Step times from ``world`` worker processes (0: one process without a group)."""
    port = _free_port()
    procs = []
    for rank in range(max(world, 1)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}  # Numba and torch share OpenMP
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        argv = [sys.executable, __file__, "--worker", str(world), "--tokens", str(args.tokens), "--d", str(args.d)]
        argv += ["--hidden", str(args.hidden), "--repeats", str(args.repeats)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: return codes {[p.returncode for p in procs]}")
    return [[float(a), float(b)] for a, b in json.loads(outs[0].strip().splitlines()[-1])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=_args.positive_int, help="tokens per rank (default 4096; --quick: 1024)")
    ap.add_argument("--d", type=_args.positive_int, default=256)
    ap.add_argument("--hidden", type=_args.positive_int, default=512)
    ap.add_argument("--repeats", type=_args.positive_int, help="timed steps (default 10; --quick: 5)")
    ap.add_argument("--quick", action="store_true", help="T = 1024, 5 steps (unless --tokens / --repeats say)")
    ap.add_argument("--worker", type=_args.nonnegative_int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 1024 if args.quick else 4096
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10
    if args.worker is not None:
        print(json.dumps(_layer_steps(args, args.worker)))
        return 0
    load = os.getloadavg()
    single = _run(args, 0)
    ep2 = _run(args, 2)
    load_after = os.getloadavg()
    s_ms, e_ms = (1e3 * statistics.median(t[0] for t in ts) for ts in (single, ep2))
    s_cpu, e_cpu = (1e3 * statistics.median(t[1] for t in ts) for ts in (single, ep2))
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
        "single_wall_cpu_ms": [[round(1e3 * a, 2), round(1e3 * b, 2)] for a, b in single],
        "ep2_wall_cpu_ms": [[round(1e3 * a, 2), round(1e3 * b, 2)] for a, b in ep2],
        "single_median_ms": round(s_ms, 2),
        "ep2_median_ms": round(e_ms, 2),
        "overhead_ms": round(e_ms - s_ms, 2),
        "overhead_ratio": round(e_ms / s_ms, 3),
        "single_median_cpu_ms": round(s_cpu, 2),
        "ep2_median_cpu_ms": round(e_cpu, 2),
        "overhead_cpu_ms": round(e_cpu - s_cpu, 2),
        "overhead_cpu_ratio": round(e_cpu / s_cpu, 3),
    }
    print(
        f"MoE FFN layer, forward + backward, packed experts: T = {args.tokens} per rank, E = {N_EXP}, k = {K}, "
        f"d = {args.d}, hidden = {args.hidden}; 1 thread per process; {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} -> {load_after[0]:.1f}"
    )
    print()
    print("| layer | step wall ms | overhead | step CPU ms per rank | overhead |")
    print("|---|---:|---:|---:|---:|")
    print(f"| single process, 16 experts | {s_ms:.1f} | | {s_cpu:.1f} | |")
    over = f"{e_ms - s_ms:+.1f} ms ({100 * (e_ms / s_ms - 1):+.0f} %)"
    over_cpu = f"{e_cpu - s_cpu:+.1f} ms ({100 * (e_cpu / s_cpu - 1):+.0f} %)"
    print(f"| 2 gloo processes, 8 experts each | {e_ms:.1f} | {over} | {e_cpu:.1f} | {over_cpu} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("bench_expert_parallel_quick.json" if args.quick else "bench_expert_parallel.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
