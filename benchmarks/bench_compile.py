"""torch.compile vs eager: training step time of the MoE model of ``bench_training.py``.

The model, task and shape are the training benchmark's (8 experts, half at capacity 1 and half
at 0.5, k = 2, 1024 tokens, d_model = hidden = 32, capacity factor 1.25). One step = forward,
mean squared error, backward and an Adam update; the model is compiled (``torch.compile``, the
default Inductor backend unless ``--backend``), the optimizer runs eagerly. Reported: milliseconds
per step (median of ``--repeats`` timed blocks of ``--steps`` steps, after ``--warmup`` steps that
include the compilation), the compile time, and whether the compiled run's routes and losses
equal the eager run's.

Run from the repository root::

    python benchmarks/bench_compile.py                     # phase and topk on CPU
    python benchmarks/bench_compile.py --methods phase systematic weighted_hash hash topk
    python benchmarks/bench_compile.py --device cuda       # on a GPU (gpu_check.sh)

Output: a table on stdout and JSON (``--out``, default ``benchmarks/results/compile.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):  # run from a source checkout
    if path not in sys.path:
        sys.path.insert(0, path)

import _args  # noqa: E402
from bench_cpu import cpu_info  # noqa: E402
from bench_training import Config, MoEModel, Task  # noqa: E402

from gpu_phase_router.torch import MoERouter  # noqa: E402


class Predict(nn.Module):
    """The training benchmark's model returning ``(prediction, experts)`` only (tensors)."""

    def __init__(self, model: MoEModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred, plan, _ = self.model(x)
        return pred, plan.experts


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Trainer:
    """One model (eager or compiled) with its optimizer and batches; ``block()`` times steps."""

    def __init__(self, method: str, compiled: bool, args: argparse.Namespace) -> None:
        cfg = Config()
        torch.manual_seed(0)
        router = MoERouter(
            cfg.num_experts, cfg.k, cfg.caps(), method=method, capacity_factor=cfg.capacity_factor, seed=0
        )
        self.model = Predict(MoEModel(cfg, router)).to(args.device)
        task = Task(cfg, 0)
        n = args.warmup + args.steps
        self.batches = [tuple(t.to(args.device) for t in task.batch(cfg.tokens)) for _ in range(n)]
        self.fn = torch.compile(self.model, backend=args.backend) if compiled else self.model
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.args = args
        self.calls = 0
        self.losses: list[float] = []
        self.routes: list[torch.Tensor] = []

    def step(self, record: bool) -> None:
        x, y = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        pred, experts = self.fn(x)
        loss = torch.mean((pred - y) ** 2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if record:
            self.losses.append(float(loss.detach()))
            self.routes.append(experts.detach().cpu())

    def warmup(self) -> float:
        """Seconds for the untimed first steps (the compiled model compiles here)."""
        t0 = time.perf_counter()
        for _ in range(self.args.warmup):
            self.step(record=True)
        _sync(self.args.device)
        return time.perf_counter() - t0

    def block(self) -> float:
        """Milliseconds per step over ``--steps`` steps."""
        _sync(self.args.device)
        t0 = time.perf_counter()
        for _ in range(self.args.steps):
            self.step(record=False)
        _sync(self.args.device)
        return 1e3 * (time.perf_counter() - t0) / self.args.steps


def run(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Eager and compiled trainers, warmed up, then timed in alternating blocks (the machine's
    load drifts; alternating exposes both to the same drift)."""
    eager, comp = Trainer(method, False, args), Trainer(method, True, args)
    eager.warmup()
    compile_s = comp.warmup()
    eager_ms, comp_ms = [], []
    for _ in range(args.repeats):
        eager_ms.append(eager.block())
        comp_ms.append(comp.block())
    same_routes = all(torch.equal(a, b) for a, b in zip(eager.routes, comp.routes, strict=True))
    close = all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(eager.losses, comp.losses, strict=True))
    return {
        "method": method,
        "eager_ms_per_step": statistics.median(eager_ms),
        "compiled_ms_per_step": statistics.median(comp_ms),
        "ratio": statistics.median(comp_ms) / statistics.median(eager_ms),
        "eager_blocks_ms": eager_ms,
        "compiled_blocks_ms": comp_ms,
        "compile_and_warmup_s": compile_s,
        "same_routes": same_routes,
        "losses_close": close,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["phase", "topk"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=_args.positive_int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=_args.positive_int, default=5, help="timed blocks (the median is reported)")
    parser.add_argument("--warmup", type=_args.positive_int, default=3, help="untimed steps first (they compile)")
    parser.add_argument(
        "--threads",
        type=_args.nonnegative_int,
        default=1,
        help="torch threads (1, as bench_training.py trains; 0: torch's default)",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "compile.json"))
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_compile: no CUDA device; nothing to time")
        return 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    print(
        f"# torch {torch.__version__}, {cpu_info()}, "
        f"torch threads {torch.get_num_threads()}, device {args.device}, backend {args.backend}, load {load}"
    )
    head = f"| method | eager ms/step | compiled ms/step | compiled / eager | compile + {args.warmup} steps s |"
    print(head + " same routes, losses |")
    print("|---|---:|---:|---:|---:|---|")
    for method in args.methods:
        torch._dynamo.reset()
        row = run(method, args)
        rows.append(row)
        print(
            f"| {method} | {row['eager_ms_per_step']:.2f} | {row['compiled_ms_per_step']:.2f} | {row['ratio']:.2f} | "
            f"{row['compile_and_warmup_s']:.1f} | {row['same_routes']}, {row['losses_close']} |",
            flush=True,
        )
    result = {
        "config": {
            "shape": "bench_training Config(): E=8, k=2, tokens=1024, d_model=32, hidden=32, caps half 1 / half 0.5",
            "device": args.device,
            "backend": args.backend,
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_info(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": load,
            "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    # the compiled run must route and train as the eager one (topk on a GPU may break near-ties differently)
    bad = [r["method"] for r in rows if not r["losses_close"] or not r["same_routes"] and r["method"] != "topk"]
    if bad:
        print(f"bench_compile: compiled and eager runs differ for {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
