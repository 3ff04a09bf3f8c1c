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

Routers: ``nocaps``, the reference: learned top-k (``torch.topk`` of the logits, softmax gate
over the chosen experts) with no caps at all, every slot served and experts overloaded as the gate
likes. The rest are ``gpu_phase_router.torch.MoERouter`` with the capacity enforcement of SPEC
§15/§16: the package's content-blind ``phase``, ``systematic``, ``weighted_hash``, ``hash`` (their
routes ignore the input; the gate only weighs the chosen experts); capped learned top-k
``topk`` (``method="topk", balance=None, overflow="drop"``), also with the usual Switch
Transformer load-balancing loss towards *equal* loads (``topk_aux``: ``E * sum_e f_e P_e``,
coefficient 0.01); the capacity-aware options of ``method="topk"`` (SPEC §16): ``balance`` in
``bias`` / ``aux`` / ``None`` times ``overflow`` in ``reroute`` / ``drop`` (``bias_reroute`` is the
default ``MoERouter``; ``aux_*`` add ``0.01 * plan.aux_loss + 0.001 * plan.z_loss`` to the loss);
and ``expert_choice``. Routers this version of ``MoERouter`` lacks are skipped and listed.

Capacity profiles: ``half`` (8 experts, half at capacity 1, half at 0.5: "mixed GPU types") and
``strong`` (16 experts, ``capacity.strong_hetero_capacities(16, seed=0)``: 10 % at 8x, 20 % at 2x);
hard caps from ``capacity_factor`` (SPEC §15).

Also times the CPU ``MoERouter`` forward at 16384 tokens x 64 experts, k = 2 against the bare
routing call.

Run from the repository root::

    python benchmarks/bench_training.py            # both profiles (3 model seeds, 300 steps), then timing
    python benchmarks/bench_training.py --quick    # half profile, 1 seed, 150 steps, no timing
    python benchmarks/bench_training.py --profiles strong --no-timing
    python benchmarks/bench_training.py --plot-only
    python benchmarks/bench_training.py --timing-only  # rerun only the forward timing

Outputs (``--out``, default ``benchmarks/results``): ``training.json`` (compact), ``training_panel.png``
(half profile), ``training_panel_strong.png`` and the tables of ``benchmarks/TRAINING_RESULTS.md`` (``--md``).
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
for _p in (ROOT, ROOT / "benchmarks"):  # run from a source checkout; _args beside this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _args  # noqa: E402

from gpu_phase_router import capacity as _capacity  # noqa: E402
from gpu_phase_router.methods import route_uniform  # noqa: E402
from gpu_phase_router.torch import MoERouter, RoutingPlan, router_methods  # noqa: E402

ROUTERS = [
    "nocaps",
    "phase",
    "systematic",
    "weighted_hash",
    "hash",
    "topk",
    "topk_aux",
    "bias_reroute",
    "bias_drop",
    "aux_reroute",
    "aux_drop",
    "none_reroute",
    "expert_choice",
]
LABELS = {
    "nocaps": "learned top-k, no caps (reference)",
    "phase": "phase",
    "systematic": "systematic",
    "weighted_hash": "weighted hash",
    "hash": "hash (capacity-blind)",
    "topk": "capped top-k (drop)",
    "topk_aux": "capped top-k + Switch aux loss",
    "bias_reroute": "top-k, bias + reroute (default)",
    "bias_drop": "top-k, bias + drop",
    "aux_reroute": "top-k, capacity aux loss + reroute",
    "aux_drop": "top-k, capacity aux loss + drop",
    "none_reroute": "top-k, no balancing + reroute",
    "expert_choice": "expert choice",
}
COLORS = {
    "nocaps": "k",
    "phase": "C0",
    "systematic": "C2",
    "weighted_hash": "C1",
    "hash": "C7",
    "topk": "C4",
    "topk_aux": "C5",
    "bias_reroute": "C3",
    "bias_drop": "C9",
    "aux_reroute": "C6",
    "aux_drop": "C8",
    "none_reroute": "tab:olive",
    "expert_choice": "tab:brown",
}
# MoERouter options of each router (nocaps is built here: NoCapsTopK)
ROUTER_OPTIONS: dict[str, dict[str, Any]] = {
    "phase": {"method": "phase"},
    "systematic": {"method": "systematic"},
    "weighted_hash": {"method": "weighted_hash"},
    "hash": {"method": "hash"},
    "topk": {"method": "topk", "balance": None, "overflow": "drop"},
    "topk_aux": {"method": "topk", "balance": None, "overflow": "drop"},
    "bias_reroute": {"method": "topk", "balance": "bias", "overflow": "reroute"},
    "bias_drop": {"method": "topk", "balance": "bias", "overflow": "drop"},
    "aux_reroute": {"method": "topk", "balance": "aux", "overflow": "reroute"},
    "aux_drop": {"method": "topk", "balance": "aux", "overflow": "drop"},
    "none_reroute": {"method": "topk", "balance": None, "overflow": "reroute"},
    "expert_choice": {"method": "expert_choice"},
}
AUX_COEF = 0.01  # Switch loss (topk_aux) and plan.aux_loss (aux_*)
Z_COEF = 1e-3  # plan.z_loss (aux_*)
PROFILES = ["half", "strong"]
# the goals for the default router
GOAL_SERVED = 99.9  # % of slots, both profiles
GOAL_RATIO = {"half": 1.1, "strong": 2.5}  # final loss / no caps
GOAL_VS_CAPPED = 0.2  # strong profile: final loss / capped top-k


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
    profile: str = "half"

    def caps(self) -> np.ndarray:
        if self.capacities is not None:
            return np.asarray(self.capacities, dtype=np.float64)
        half = self.num_experts // 2
        return np.array([1.0] * half + [0.5] * (self.num_experts - half))


def profile_config(profile: str, base: Config | None = None) -> Config:
    """``base`` (default ``Config()``) at a capacity profile: ``half`` or ``strong``."""
    base = base or Config()
    if profile == "half":
        return replace(base, profile="half", num_experts=8, capacities=None)
    if profile == "strong":
        caps = _capacity.strong_hetero_capacities(16, seed=0)
        return replace(base, profile="strong", num_experts=16, capacities=caps.tolist())
    raise ValueError(f"profile must be one of {PROFILES}; got {profile!r}")


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


# --- routers -----------------------------------------------------------------------------------------------


class NoCapsTopK(nn.Module):
    """Learned top-k with no caps: each token's ``k`` largest logits, softmax gate over the chosen
    experts, every slot served. The plan's caps are the batch's actual loads (read on the host), so
    experts take whatever the gate sends them."""

    def __init__(self, num_experts: int, k: int) -> None:
        super().__init__()
        self.num_experts, self.k = num_experts, k

    def forward(self, logits: torch.Tensor) -> RoutingPlan:
        experts = torch.topk(logits.detach(), self.k, dim=1).indices
        loads = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        return RoutingPlan.from_experts(experts, loads, logits, buffer_size=max(1, int(loads.max())))


def router_options(name: str, options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The ``MoERouter`` options of router ``name`` in this version of ``MoERouter``; None if it lacks them.

    A ``MoERouter`` without the ``balance`` / ``overflow`` options (SPEC §15 only) still offers
    capped top-k as plain ``method="topk"``, which drops the slots over a cap by batch position.
    """
    import inspect

    opts = (options or ROUTER_OPTIONS)[name]
    if opts["method"] not in router_methods():
        return None
    params = inspect.signature(MoERouter.__init__).parameters
    if all(key in params for key in opts):
        return opts
    if opts.get("balance", "") is None and opts.get("overflow") == "drop" and "balance" not in params:
        return {"method": "topk"}
    return None


def make_router(name: str, cfg: Config, seed: int) -> nn.Module:
    """Router ``name`` for ``cfg``: ``NoCapsTopK`` for ``nocaps``, else a ``MoERouter``."""
    if name == "nocaps":
        return NoCapsTopK(cfg.num_experts, cfg.k)
    opts = router_options(name)
    if opts is None:
        raise ValueError(f"router {name!r} needs MoERouter options {ROUTER_OPTIONS[name]}")
    return MoERouter(cfg.num_experts, cfg.k, cfg.caps(), capacity_factor=cfg.capacity_factor, seed=seed, **opts)


def supported(names: list[str]) -> tuple[list[str], list[str]]:
    """``(offered, missing)``: the routers of ``names`` this ``MoERouter`` offers, and the others."""
    ok = [n for n in names if n == "nocaps" or router_options(n) is not None]
    return ok, [n for n in names if n not in ok]


def reference_caps(cfg: Config, num_tokens: int) -> np.ndarray:
    """int64 ``[E]`` training hard caps of ``cfg`` at ``num_tokens`` tokens (SPEC §15)."""
    ref = MoERouter(cfg.num_experts, cfg.k, cfg.caps(), method="systematic", capacity_factor=cfg.capacity_factor)
    return ref.hard_caps(num_tokens)


# --- training ---------------------------------------------------------------------------------------------


def served_share(plan: RoutingPlan, k: int) -> float:
    """Share of the ``T * k`` slots served: ``sum_t min(kept slots of t, k) / (T * k)``.

    For top-k routers this is kept slots over ``T * k``; with expert choice (experts pick tokens,
    a token can get 0 to ``E`` experts) a token counts at most its ``k`` slots.
    """
    per_token = plan.kept.sum(dim=1).clamp(max=k)
    return float(per_token.sum()) / (plan.num_tokens * k)


def _bias_router(router: nn.Module) -> bool:
    """Whether ``router`` keeps a capacity bias it updates (learned top-k with ``balance="bias"``)."""
    return isinstance(router, MoERouter) and router.method == "topk" and router.balance == "bias"


def train_one(cfg: Config, router_name: str, seed: int) -> dict[str, Any]:
    """Train one model; per-step loss and served share, loads against the caps, final losses.

    *Served*: :func:`served_share`. *Load / cap*: an expert's kept slots over its training hard
    cap; ``nocaps`` is measured against the caps the capped routers get.
    """
    torch.manual_seed(seed)
    router = make_router(router_name, cfg, seed)
    model = MoEModel(cfg, router)
    task = Task(cfg, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    caps = reference_caps(cfg, cfg.tokens)
    losses, served, no_expert, load_max = [], [], [], []
    routed = np.zeros(cfg.num_experts)
    kept = np.zeros(cfg.num_experts)
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        x, y = task.batch(cfg.tokens)
        pred, plan, logits = model(x)
        loss = torch.mean((pred - y) ** 2)
        total = loss
        if router_name == "topk_aux":
            total = loss + AUX_COEF * aux_loss(logits, plan.experts, cfg.num_experts)
        elif router_name.startswith("aux_"):
            total = loss + AUX_COEF * plan.aux_loss + Z_COEF * plan.z_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
        tpe = plan.tokens_per_expert.numpy()
        served.append(served_share(plan, cfg.k))
        no_expert.append(float((~plan.kept.any(dim=1)).float().mean()))
        load_max.append(float(np.max(tpe / np.maximum(caps, 1))))
        ex = plan.experts[plan.experts >= 0]
        routed += np.bincount(ex.numpy(), minlength=cfg.num_experts)
        kept += tpe
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        x, y = task.batch(cfg.eval_tokens, torch.Generator().manual_seed(30_000 + seed))
        pred, plan, _ = model(x)
        eval_loss = float(torch.mean((pred - y) ** 2))
        eval_served = served_share(plan, cfg.k)
    tail = max(1, cfg.steps // 10)
    return {
        "loss": losses,
        "drop": [1.0 - v for v in served],
        "no_expert": no_expert,
        "routed_per_step": (routed / cfg.steps).tolist(),
        "kept_per_step": (kept / cfg.steps).tolist(),
        "capacity": caps.tolist(),
        "final_loss": float(np.mean(losses[-tail:])),
        "eval_loss": eval_loss,
        "eval_drop": 1.0 - eval_served,
        "mean_drop": 1.0 - float(np.mean(served)),
        "served_min": float(np.min(served)),
        "served_mean": float(np.mean(served)),
        "load_max": float(np.max(load_max)),
        "mean_no_expert": float(np.mean(no_expert)),
        "ms_per_step": 1e3 * seconds / cfg.steps,
        # the capacity bias after the last step (balance="bias" only): how far it had to move
        "expert_bias": router.expert_bias.tolist() if _bias_router(router) else None,
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
    names, missing = supported(cfg.routers)
    if missing and log:
        log(f"not offered by this MoERouter, skipped: {missing}")
    out: dict[str, Any] = {"config": asdict(cfg), "capacities": cfg.caps().tolist(), "runs": {}, "missing": missing}
    for name in names:  # compile or load the CPU kernels before any step is timed
        make_router(name, cfg, 0)(torch.zeros(cfg.tokens, cfg.num_experts))
    for name in names:
        runs = [train_one(cfg, name, s) for s in cfg.seeds]
        out["runs"][name] = runs
        if log:
            log(
                f"{cfg.profile:<6} {name:<14} served {100 * np.mean([r['served_mean'] for r in runs]):6.2f} %  "
                f"final loss {np.mean([r['final_loss'] for r in runs]):.4f}  "
                f"eval loss {np.mean([r['eval_loss'] for r in runs]):.4f}  "
                f"{np.mean([r['ms_per_step'] for r in runs]):.1f} ms/step"
            )
    return out


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per router: means over seeds (and steps); ``ratio``: final loss over ``nocaps``'s."""
    caps = np.asarray(results["capacities"])
    big, small = caps == caps.max(), caps == caps.min()
    ref = results["runs"].get("nocaps")
    ref_loss = float(np.mean([r["final_loss"] for r in ref])) if ref else float("nan")
    rows = []
    for name, runs in results["runs"].items():
        cap = np.mean([r["capacity"] for r in runs], axis=0)
        routed = np.mean([r["routed_per_step"] for r in runs], axis=0)
        kept = np.mean([r["kept_per_step"] for r in runs], axis=0)

        def share(v: np.ndarray, m: np.ndarray, cap: np.ndarray = cap) -> float:
            return float(v[m].sum() / cap[m].sum()) if m.any() else float("nan")

        final = float(np.mean([r["final_loss"] for r in runs]))
        has_curves = name in results.get("curves", {}) or "drop" in runs[0]
        drop = curves(results, name)[1] if has_curves else np.array([np.nan])
        tail = max(1, len(drop) // 3)
        rows.append(
            {
                "router": name,
                "drop_pct": 100 * float(np.mean([r["mean_drop"] for r in runs])),
                "served_pct": 100 * float(np.mean([r.get("served_mean", 1 - r["mean_drop"]) for r in runs])),
                "served_min_pct": 100 * float(np.min([r.get("served_min", np.nan) for r in runs])),
                "served_tail_pct": 100 * (1 - float(np.mean(drop[-tail:]))),  # the last third of the steps
                "load_max": float(np.max([r.get("load_max", np.nan) for r in runs])),
                "no_expert_pct": 100 * float(np.mean([r["mean_no_expert"] for r in runs])),
                "routed_over_cap_big": share(routed, big),
                "routed_over_cap_small": share(routed, small),
                "kept_over_cap_big": share(kept, big),
                "kept_over_cap_small": share(kept, small),
                "final_loss": final,
                "final_loss_sd": float(np.std([r["final_loss"] for r in runs])),
                "ratio": final / ref_loss,
                "eval_loss": float(np.mean([r["eval_loss"] for r in runs])),
                "ms_per_step": float(np.mean([r["ms_per_step"] for r in runs])),
            }
        )
    return rows


def goals(profiles: dict[str, dict[str, Any]], router: str = "bias_reroute") -> list[dict[str, Any]]:
    """The issue's goals for ``router`` on each profile: measured value, goal, met."""
    out = []
    for prof, results in profiles.items():
        rows = {r["router"]: r for r in summary(results)}
        row = rows.get(router)
        if row is None:
            out.append({"profile": prof, "goal": f"{router} measured", "value": "missing", "met": False})
            continue
        out.append(
            {
                "profile": prof,
                "goal": f"slots served over training >= {GOAL_SERVED} % (mean over steps; worst step; last third)",
                "value": f"{row['served_pct']:.3f} % ({row['served_min_pct']:.2f} %; {row['served_tail_pct']:.3f} %)",
                "met": row["served_pct"] >= GOAL_SERVED,
            }
        )
        if prof == "half":
            out.append(
                {
                    "profile": prof,
                    "goal": "no expert above its cap in any step (max kept / cap <= 1)",
                    "value": f"{row['load_max']:.3f}",
                    "met": row["load_max"] <= 1.0,
                }
            )
        limit = GOAL_RATIO.get(prof)
        if limit is not None:
            out.append(
                {
                    "profile": prof,
                    "goal": f"final loss <= {limit}x no caps",
                    "value": f"{row['ratio']:.2f}x",
                    "met": row["ratio"] <= limit,
                }
            )
        if prof == "strong" and "topk" in rows:
            vs = row["final_loss"] / rows["topk"]["final_loss"]
            out.append(
                {
                    "profile": prof,
                    "goal": f"final loss <= {GOAL_VS_CAPPED}x capped top-k",
                    "value": f"{vs:.3f}x",
                    "met": vs <= GOAL_VS_CAPPED,
                }
            )
    return out


def goals_table(profiles: dict[str, dict[str, Any]]) -> str:
    lines = ["| profile | goal (default router) | measured | met |", "|---|---|---:|---|"]
    for g in goals(profiles):
        lines.append(f"| {g['profile']} | {g['goal']} | {g['value']} | {'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines)


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

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
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
    axes[2].set_xticks(range(n_exp), [f"{e}\n({c:g})" for e, c in enumerate(rel)], fontsize=7)
    axes[2].set(
        xlabel="expert (relative capacity)",
        ylabel="routed slots / hard cap (mean per step)",
        title="load vs capacity (above 1: drops)",
    )
    axes[0].legend(fontsize=7, ncol=2)
    cfg = results["config"]
    profile = {"half": "half at half capacity", "strong": "10 % at 8x, 20 % at 2x"}.get(cfg.get("profile", "half"))
    fig.suptitle(
        f"MoE training, {cfg['num_experts']} experts ({profile}), k={cfg['k']}, "
        f"{cfg['tokens']} tokens/step, capacity factor {cfg['capacity_factor']}, "
        f"{len(cfg['seeds'])} seed(s)",
        fontsize=10,
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def table(results: dict[str, Any]) -> str:
    """Markdown table of :func:`summary` (and the routers this ``MoERouter`` did not offer)."""
    lines = [
        "| router | slots served, mean (min step) | tokens with no expert | max kept / cap, any step | "
        "routed / cap, largest experts | routed / cap, smallest experts | final train loss | × no caps | "
        "eval loss | ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary(results):
        lines.append(
            f"| {LABELS.get(r['router'], r['router'])} | {r['served_pct']:.2f} % ({r['served_min_pct']:.2f} %) | "
            f"{r['no_expert_pct']:.1f} % | {r['load_max']:.2f} | "
            f"{r['routed_over_cap_big']:.2f} | {r['routed_over_cap_small']:.2f} | "
            f"{r['final_loss']:.4f} ± {r['final_loss_sd']:.4f} | {r['ratio']:.2f} | {r['eval_loss']:.4f} | "
            f"{r['ms_per_step']:.1f} |"
        )
    for name in results.get("missing", []):
        lines.append(f"| {LABELS.get(name, name)} | not offered by this `MoERouter` | | | | | | | | |")
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
    """CPU model, AVX2 / AVX-512, cores, load average, versions."""
    cpu, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.readlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "")
    except OSError:
        pass
    return {
        "cpu": cpu,
        "avx2": " avx2 " in f" {flags} ",
        "avx512": " avx512f " in f" {flags} ",
        "cores": os.cpu_count(),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
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
    ap.add_argument("--quick", action="store_true", help="half profile, 1 seed, 150 steps, no timing")
    ap.add_argument("--profiles", nargs="+", choices=PROFILES)
    ap.add_argument("--steps", type=_args.positive_int)
    ap.add_argument("--seeds", type=_args.positive_int, help="number of model seeds")
    ap.add_argument("--routers", nargs="+", choices=ROUTERS)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot and tables from the JSON")
    ap.add_argument("--timing-only", action="store_true", help="rerun only the forward timing (JSON kept otherwise)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "TRAINING_RESULTS.md"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    json_path = out / ("training_quick.json" if args.quick else "training.json")
    if (args.plot_only or args.timing_only) and not json_path.is_file():
        flag = "--plot-only" if args.plot_only else "--timing-only"
        ap.error(f"{flag}: no {json_path} to read (run without {flag} first)")
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only or args.timing_only:
        saved = json.loads(json_path.read_text())
        if args.timing_only:
            saved["timing"] = timing()
            json_path.write_text(json.dumps(saved, separators=(",", ":")))
    else:
        base = QUICK if args.quick else Config()
        if args.steps is not None:
            base = replace(base, steps=args.steps)
        if args.seeds is not None:
            base = replace(base, seeds=list(range(args.seeds)))
        if args.routers is not None:
            base = replace(base, routers=args.routers)
        profs = args.profiles or (["half"] if args.quick else PROFILES)
        saved = {"machine": machine(), "profiles": {}}
        t0 = time.perf_counter()
        for prof in profs:
            saved["profiles"][prof] = compact(run(profile_config(prof, base)))
        saved["train_seconds"] = time.perf_counter() - t0
        saved["load_end"] = [round(v, 2) for v in os.getloadavg()]
        if not (args.quick or args.no_timing):
            saved["timing"] = timing()
        json_path.write_text(json.dumps(saved, separators=(",", ":")))
    for prof, results in saved["profiles"].items():
        suffix = "_quick" if args.quick else ("" if prof == "half" else f"_{prof}")
        plot(results, out / f"training_panel{suffix}.png")
        print(f"\nprofile {prof}\n{table(results)}")
    print("\n" + goals_table(saved["profiles"]))
    if saved.get("timing"):
        print(timing_table(saved["timing"]))
    if not args.quick and args.md:
        write_md(saved, Path(args.md))


def write_md(saved: dict[str, Any], path: Path) -> None:
    """The tables of a run, with its configuration and machine; prose lives in the committed file."""
    m = saved.get("machine", {})
    first = next(iter(saved["profiles"].values()))
    cfg = first["config"]
    parts = [
        "<!-- generated by benchmarks/bench_training.py: tables between the markers are rewritten -->",
        f"Configuration: k = {cfg['k']}, {cfg['tokens']} tokens per step, {cfg['steps']} steps, capacity factor "
        f"{cfg['capacity_factor']}, Adam lr {cfg['lr']}, model seeds {cfg['seeds']}; machine: {m.get('cpu', '?')}, "
        f"{m.get('cores', '?')} cores, AVX2 {'yes' if m.get('avx2') else 'no'}, AVX-512 "
        f"{'yes' if m.get('avx512') else 'no'}, load average {m.get('load_avg', '?')} at the start and "
        f"{saved.get('load_end', '?')} at the end, torch {m.get('torch', '?')}; training single-threaded (torch "
        f"and Numba), {saved.get('train_seconds', float('nan')):.0f} s in all.",
    ]
    for prof, results in saved["profiles"].items():
        parts += [
            "",
            f"**Profile `{prof}`**: {results['config']['num_experts']} experts, relative capacities "
            f"{[float(f'{c:g}') for c in results['capacities']]}.",
            "",
            table(results),
        ]
    parts += ["", "Goals (the default router, `bias_reroute`):", "", goals_table(saved["profiles"])]
    if saved.get("timing"):
        parts += [
            "",
            "CPU router forward at 16384 tokens x 64 experts, k = 2 (half profile)"
            + (f" ({saved['timing_note']})" if saved.get("timing_note") else "")
            + ":",
            "",
            timing_table(saved["timing"]),
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
