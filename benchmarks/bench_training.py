"""MoE training comparison: the same small model trained with each router at unequal expert capacities.

Task (synthetic, "mixture of regressions"): an input ``x`` in ``R^d_in`` is drawn around one of
``M`` cluster centres, and its target is that cluster's own linear map, ``y = A_c x``. A model
that sends every cluster to "its" expert solves it with tiny experts; a model whose experts each
see every cluster must fit all ``M`` maps in each expert. The best expert for a token therefore
depends on the input.

Model: ``h = embed(x)``; ``out = head(h + moe(h))``; the MoE layer has a linear gate, ``E``
two-layer MLP experts run as batched matrix products on the ``[E, C, d]`` buffers of
``RoutingPlan.dispatch``, and ``RoutingPlan.combine``. A dropped slot contributes nothing, so a
token with no kept slot is predicted from the residual path alone. Loss: mean squared error.

Routers (``gpu_phase_router.torch.MoERouter``, same capacity enforcement for all): the package's
``phase``, ``systematic``, ``weighted_hash``, ``hash`` (their routes ignore the input; the gate
only weighs the chosen experts) and the learned baseline ``topk`` (softmax + ``torch.topk``),
without and with the usual load-balancing auxiliary loss (Switch Transformer:
``E * sum_e f_e P_e``, coefficient 0.01). Capacities: half the experts at capacity 1, half at 0.5
("mixed GPU types"); hard caps from ``capacity_factor`` (SPEC §15).

Also times the CPU ``MoERouter`` forward at 16384 tokens x 64 experts, k = 2 against the bare
routing call.

Run from the repository root::

    python benchmarks/bench_training.py            # full run (3 model seeds, 300 steps), then timing
    python benchmarks/bench_training.py --quick    # 1 seed, 150 steps, no timing
    python benchmarks/bench_training.py --plot-only
    python benchmarks/bench_training.py --timing-only  # rerun only the forward timing

Outputs (``--out``, default ``benchmarks/results``): ``training.json`` (compact), ``training_panel.png``
and ``benchmarks/TRAINING_RESULTS.md`` (``--md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout
    sys.path.insert(0, str(ROOT))

from gpu_phase_router.methods import route_uniform  # noqa: E402
from gpu_phase_router.torch import MoERouter  # noqa: E402

ROUTERS = ["phase", "systematic", "weighted_hash", "hash", "topk", "topk_aux"]
LABELS = {
    "phase": "phase",
    "systematic": "systematic",
    "weighted_hash": "weighted hash",
    "hash": "hash (capacity-blind)",
    "topk": "learned top-k",
    "topk_aux": "learned top-k + aux loss",
}
COLORS = {"phase": "C0", "systematic": "C2", "weighted_hash": "C1", "hash": "C3", "topk": "C4", "topk_aux": "C5"}
AUX_COEF = 0.01


@dataclass
class Config:
    """One comparison. ``capacities``: relative expert capacities (default half 1, half 0.5)."""

    num_experts: int = 8
    k: int = 2
    tokens: int = 1024
    steps: int = 300
    d_in: int = 16
    d_out: int = 8
    d_model: int = 32
    hidden: int = 32
    clusters: int = 8
    capacity_factor: float = 1.25
    lr: float = 3e-3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    routers: list[str] = field(default_factory=lambda: list(ROUTERS))
    capacities: list[float] | None = None
    eval_tokens: int = 4096

    def caps(self) -> np.ndarray:
        if self.capacities is not None:
            return np.asarray(self.capacities, dtype=np.float64)
        half = self.num_experts // 2
        return np.array([1.0] * half + [0.5] * (self.num_experts - half))


QUICK = Config(steps=150, seeds=[0])


# --- task and model -------------------------------------------------------------------------------


class Task:
    """Mixture of regressions: cluster centres and one linear map per cluster."""

    def __init__(self, cfg: Config, seed: int) -> None:
        g = torch.Generator().manual_seed(10_000 + seed)
        self.centres = 2.0 * torch.randn(cfg.clusters, cfg.d_in, generator=g)
        self.maps = torch.randn(cfg.clusters, cfg.d_in, cfg.d_out, generator=g) / cfg.d_in**0.5
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(20_000 + seed)

    def batch(self, n: int, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = gen or self.gen
        c = torch.randint(0, self.cfg.clusters, (n,), generator=g)
        x = self.centres[c] + torch.randn(n, self.cfg.d_in, generator=g)
        y = torch.einsum("ni,nio->no", x, self.maps[c])
        return x, y


class MoEModel(nn.Module):
    def __init__(self, cfg: Config, router: MoERouter) -> None:
        super().__init__()
        e, d, h = cfg.num_experts, cfg.d_model, cfg.hidden
        self.embed = nn.Linear(cfg.d_in, d)
        self.gate = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.randn(e, d, h) / d**0.5)
        self.b1 = nn.Parameter(torch.zeros(e, 1, h))
        self.w2 = nn.Parameter(torch.randn(e, h, d) / h**0.5)
        self.b2 = nn.Parameter(torch.zeros(e, 1, d))
        self.head = nn.Linear(d, cfg.d_out)
        self.router = router

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        h = self.embed(x)
        logits = self.gate(h)
        plan = self.router(logits)
        buf = plan.dispatch(h)  # [E, C, d]
        out = torch.relu(buf @ self.w1 + self.b1) @ self.w2 + self.b2
        return self.head(h + plan.combine(out)), plan, logits


def aux_loss(logits: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e P_e`` (f: routed share, P: mean prob)."""
    f = torch.bincount(experts.reshape(-1), minlength=num_experts).to(logits.dtype) / experts.numel()
    p = torch.softmax(logits, dim=1).mean(dim=0)
    return num_experts * (f * p).sum()


# --- training ---------------------------------------------------------------------------------------------


def train_one(cfg: Config, router_name: str, seed: int) -> dict[str, Any]:
    """Train one model; per-step loss and drop rate, mean loads, final losses."""
    torch.manual_seed(seed)
    method = "topk" if router_name.startswith("topk") else router_name
    caps = cfg.caps()
    router = MoERouter(cfg.num_experts, cfg.k, caps, method=method, capacity_factor=cfg.capacity_factor, seed=seed)
    model = MoEModel(cfg, router)
    task = Task(cfg, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses, drops, no_expert = [], [], []
    routed = np.zeros(cfg.num_experts)
    kept = np.zeros(cfg.num_experts)
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        x, y = task.batch(cfg.tokens)
        pred, plan, logits = model(x)
        loss = torch.mean((pred - y) ** 2)
        total = loss + AUX_COEF * aux_loss(logits, plan.experts, cfg.num_experts) if router_name == "topk_aux" else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
        drops.append(float(plan.drop_rate()))
        no_expert.append(float((~plan.kept.any(dim=1)).float().mean()))
        ex = plan.experts[plan.experts >= 0]
        routed += np.bincount(ex.numpy(), minlength=cfg.num_experts)
        kept += plan.tokens_per_expert.numpy()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        x, y = task.batch(cfg.eval_tokens, torch.Generator().manual_seed(30_000 + seed))
        pred, plan, _ = model(x)
        eval_loss = float(torch.mean((pred - y) ** 2))
        eval_drop = float(plan.drop_rate())
    tail = max(1, cfg.steps // 10)
    return {
        "loss": losses,
        "drop": drops,
        "no_expert": no_expert,
        "routed_per_step": (routed / cfg.steps).tolist(),
        "kept_per_step": (kept / cfg.steps).tolist(),
        "capacity": router.hard_caps(cfg.tokens).tolist(),
        "final_loss": float(np.mean(losses[-tail:])),
        "eval_loss": eval_loss,
        "eval_drop": eval_drop,
        "mean_drop": float(np.mean(drops)),
        "mean_no_expert": float(np.mean(no_expert)),
        "ms_per_step": 1e3 * seconds / cfg.steps,
    }


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
    """Train every router of ``cfg`` for every seed; returns the JSON-ready results.

    The CPU routing kernels and torch run single-threaded here: a batch of about a thousand tokens
    routes in about 0.1 ms and the model is tiny, and on a busy machine a parallel region can wait
    milliseconds for a descheduled thread, which would time the machine's load, not the router.
    """
    import numba

    threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        return _run(cfg, log)
    finally:
        numba.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])


def _run(cfg: Config, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"config": asdict(cfg), "capacities": cfg.caps().tolist(), "runs": {}}
    for name in cfg.routers:
        runs = [train_one(cfg, name, s) for s in cfg.seeds]
        out["runs"][name] = runs
        if log:
            log(
                f"{name:<14} drop {100 * np.mean([r['mean_drop'] for r in runs]):5.1f} %  "
                f"final loss {np.mean([r['final_loss'] for r in runs]):.4f}  "
                f"eval loss {np.mean([r['eval_loss'] for r in runs]):.4f}  "
                f"{np.mean([r['ms_per_step'] for r in runs]):.1f} ms/step"
            )
    return out


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per router: means over seeds (and steps)."""
    caps = np.asarray(results["capacities"])
    big, small = caps == caps.max(), caps < caps.max()
    rows = []
    for name, runs in results["runs"].items():
        cap = np.mean([r["capacity"] for r in runs], axis=0)
        routed = np.mean([r["routed_per_step"] for r in runs], axis=0)
        kept = np.mean([r["kept_per_step"] for r in runs], axis=0)

        def share(v: np.ndarray, m: np.ndarray, cap: np.ndarray = cap) -> float:
            return float(v[m].sum() / cap[m].sum()) if m.any() else float("nan")

        rows.append(
            {
                "router": name,
                "drop_pct": 100 * float(np.mean([r["mean_drop"] for r in runs])),
                "no_expert_pct": 100 * float(np.mean([r["mean_no_expert"] for r in runs])),
                "routed_over_cap_big": share(routed, big),
                "routed_over_cap_small": share(routed, small),
                "kept_over_cap_big": share(kept, big),
                "kept_over_cap_small": share(kept, small),
                "final_loss": float(np.mean([r["final_loss"] for r in runs])),
                "final_loss_sd": float(np.std([r["final_loss"] for r in runs])),
                "eval_loss": float(np.mean([r["eval_loss"] for r in runs])),
                "ms_per_step": float(np.mean([r["ms_per_step"] for r in runs])),
            }
        )
    return rows


# --- router forward timing --------------------------------------------------------------------------------


def timing(
    tokens: int = 16384,
    experts: int = 64,
    k: int = 2,
    repeats: int = 40,
    methods: tuple[str, ...] = ("phase", "systematic", "weighted_hash", "hash"),
    threads: tuple[int, ...] | None = None,
) -> list[dict[str, Any]]:
    """CPU ``MoERouter`` forward (with logits) vs the bare routing call, min and median ms.

    The bare call is ``methods.route_uniform`` (what ``route(np.ones(T), caps, ...)`` runs, minus
    the weight checks); the forward adds hard caps, slots, loads, gate weights and buffer positions.
    The two are measured alternately, call by call, so load from other processes hits both alike.
    Each thread count (default: 1 and all cores) applies to torch and Numba alike: on a machine
    shared with other work, every parallel region of a multi-threaded run can wait a scheduler
    slice for a descheduled thread, so the single-threaded rows are the steadier ones there.
    """
    import numba

    if threads is None:
        threads = tuple(sorted({1, os.cpu_count() or 1}))
    saved = numba.get_num_threads(), torch.get_num_threads()
    caps = np.array([1.0] * (experts // 2) + [0.5] * (experts - experts // 2))
    logits = torch.randn(tokens, experts)
    rows = []
    try:
        for n_threads in threads:
            numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
            torch.set_num_threads(n_threads)
            for m in methods:
                rows.append(_time_method(m, tokens, experts, k, caps, logits, repeats) | {"threads": n_threads})
    finally:
        numba.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])
    return rows


def _time_method(
    m: str, tokens: int, experts: int, k: int, caps: np.ndarray, logits: torch.Tensor, repeats: int
) -> dict[str, Any]:
    router = MoERouter(experts, k, caps, method=m)

    def bare() -> Any:
        return route_uniform(m, "cpu", tokens, caps, k=k, seed=router.seed + router.step)

    bare()
    router(logits)
    tb, tf = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        bare()
        tb.append(time.perf_counter() - t)
        t = time.perf_counter()
        router(logits)
        tf.append(time.perf_counter() - t)
    return {
        "method": m,
        "tokens": tokens,
        "experts": experts,
        "k": k,
        "route_ms_min": 1e3 * min(tb),
        "route_ms_median": 1e3 * float(np.median(tb)),
        "forward_ms_min": 1e3 * min(tf),
        "forward_ms_median": 1e3 * float(np.median(tf)),
        "ratio_min": min(tf) / min(tb),
        "ratio_median": float(np.median(tf) / np.median(tb)),
    }


# --- output ------------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: str | Path | None = None) -> Any:
    """Loss curve, drop rate per step and load vs capacity per expert; saved to ``path`` if given."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    win = max(1, results["config"]["steps"] // 40)
    kernel = np.ones(win) / win
    for name in results["runs"]:
        loss, drop = curves(results, name)
        drop = 100 * drop
        steps = np.arange(len(loss))[win - 1 :]
        axes[0].plot(steps, np.convolve(loss, kernel, "valid"), color=COLORS.get(name), label=LABELS.get(name, name))
        axes[1].plot(steps, np.convolve(drop, kernel, "valid"), color=COLORS.get(name), label=LABELS.get(name, name))
    axes[0].set_yscale("log")
    axes[0].set(xlabel="step", ylabel=f"training loss (MSE, mean of {win} steps)", title="loss")
    axes[1].set(xlabel="step", ylabel="dropped or unrouted slots (%)", title="slots not served, per step")
    names = list(results["runs"])
    caps = np.mean([r["capacity"] for r in next(iter(results["runs"].values()))], axis=0)
    n_exp = len(caps)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        routed = np.mean([r["routed_per_step"] for r in results["runs"][name]], axis=0)
        axes[2].bar(
            np.arange(n_exp) + (i - len(names) / 2 + 0.5) * width,
            routed / caps,
            width,
            color=COLORS.get(name),
            label=LABELS.get(name, name),
        )
    axes[2].axhline(1.0, color="k", ls="--", lw=1)
    rel = results["capacities"]
    axes[2].set_xticks(range(n_exp), [f"{e}\n({c:g})" for e, c in enumerate(rel)])
    axes[2].set(
        xlabel="expert (relative capacity)",
        ylabel="routed slots / hard cap (mean per step)",
        title="load vs capacity (above 1: drops)",
    )
    axes[0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"MoE training, {cfg['num_experts']} experts (half at half capacity), k={cfg['k']}, "
        f"{cfg['tokens']} tokens/step, capacity factor {cfg['capacity_factor']}, "
        f"{len(cfg['seeds'])} seed(s)",
        fontsize=10,
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def table(results: dict[str, Any]) -> str:
    """Markdown table of :func:`summary`."""
    lines = [
        "| router | slots not served | tokens with no expert | routed / cap, 1x experts | "
        "routed / cap, 0.5x experts | final train loss | eval loss | ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary(results):
        lines.append(
            f"| {LABELS.get(r['router'], r['router'])} | {r['drop_pct']:.1f} % | {r['no_expert_pct']:.1f} % | "
            f"{r['routed_over_cap_big']:.2f} | {r['routed_over_cap_small']:.2f} | "
            f"{r['final_loss']:.4f} ± {r['final_loss_sd']:.4f} | {r['eval_loss']:.4f} | "
            f"{r['ms_per_step']:.1f} |"
        )
    return "\n".join(lines)


def timing_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | threads | bare routing, ms (min / median) | MoERouter forward, ms (min / median) | "
        "forward / routing (min / median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r.get('threads', '?')} | {r['route_ms_min']:.2f} / {r['route_ms_median']:.2f} | "
            f"{r['forward_ms_min']:.2f} / {r['forward_ms_median']:.2f} | "
            f"{r['ratio_min']:.2f} / {r['ratio_median']:.2f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def curves(results: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-step loss and drop rate of router ``name``, mean over seeds."""
    if "curves" in results:
        c = results["curves"][name]
        return np.asarray(c["loss"]), np.asarray(c["drop"])
    runs = results["runs"][name]
    return np.mean([r["loss"] for r in runs], axis=0), np.mean([r["drop"] for r in runs], axis=0)


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """The committed JSON: per-step curves as means over seeds, 4 significant digits."""
    out = json.loads(json.dumps(results))
    out["curves"] = {}
    for name, runs in out["runs"].items():
        loss, drop = curves(results, name)
        out["curves"][name] = {"loss": [float(f"{v:.4g}") for v in loss], "drop": [float(f"{v:.4g}") for v in drop]}
        for r in runs:
            for key in ("loss", "drop", "no_expert"):
                r.pop(key, None)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 150 steps, no timing")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seeds", type=int, help="number of model seeds")
    ap.add_argument("--routers", nargs="+", choices=ROUTERS)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot and tables from the JSON")
    ap.add_argument("--timing-only", action="store_true", help="rerun only the forward timing (JSON kept otherwise)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "TRAINING_RESULTS.md"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "training.json"
    if args.plot_only or args.timing_only:
        results = json.loads(json_path.read_text())
        if args.timing_only:
            results["timing"] = timing()
            json_path.write_text(json.dumps(results, separators=(",", ":")))
    else:
        cfg = QUICK if args.quick else Config()
        if args.steps:
            cfg = replace(cfg, steps=args.steps)
        if args.seeds:
            cfg = replace(cfg, seeds=list(range(args.seeds)))
        if args.routers:
            cfg = replace(cfg, routers=args.routers)
        t0 = time.perf_counter()
        results = run(cfg)
        results["train_seconds"] = time.perf_counter() - t0
        results["machine"] = machine()
        if not (args.quick or args.no_timing):
            results["timing"] = timing()
        json_path.write_text(json.dumps(compact(results), separators=(",", ":")))
    plot(results, out / "training_panel.png")
    print(table(results))
    if results.get("timing"):
        print(timing_table(results["timing"]))
    if (args.timing_only or not args.plot_only) and args.md:
        write_md(results, Path(args.md))


def write_md(results: dict[str, Any], path: Path) -> None:
    """The tables of a run, with its configuration and machine; prose lives in the committed file."""
    cfg = results["config"]
    m = results.get("machine", {})
    parts = [
        "<!-- generated by benchmarks/bench_training.py: tables between the markers are rewritten -->",
        f"Configuration: {cfg['num_experts']} experts (relative capacities {results['capacities']}), k = {cfg['k']}, "
        f"{cfg['tokens']} tokens per step, {cfg['steps']} steps, capacity factor {cfg['capacity_factor']}, "
        f"Adam lr {cfg['lr']}, model seeds {cfg['seeds']}; machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"torch {m.get('torch', '?')}; training single-threaded (torch and Numba), "
        f"{results.get('train_seconds', float('nan')):.0f} s in all.",
        "",
        table(results),
    ]
    if results.get("timing"):
        parts += [
            "",
            "CPU router forward at 16384 tokens x 64 experts, k = 2 (same capacities profile):",
            "",
            timing_table(results["timing"]),
        ]
    block = "\n".join(parts)
    start, end = "<!-- tables:start -->", "<!-- tables:end -->"
    text = path.read_text() if path.exists() else f"# MoE training comparison\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{block}\n{end}{tail}")


if __name__ == "__main__":
    main()
