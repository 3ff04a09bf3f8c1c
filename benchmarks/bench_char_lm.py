"""Character-level language model with an MoE feed-forward layer, trained on the Python standard library's source.

Real text that needs no download: the ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), in sorted path order, without ``test``/``tests``/``idle_test``
folders, ``site-packages``, the generated codec tables of ``encodings/`` and the one-string module
``pydoc_data/``. Characters: the 95 printable ASCII characters, newline and tab get their own ids,
every other character one shared id (98 ids).

Splits (the same trained model is scored on both):

* **random** — the training text is cut into blocks of ``block`` characters; a fixed random
  ``holdout`` share of the blocks is held out (never trained on) and validation windows are taken
  from them: same distribution as training.
* **topic** — all files of one package about one subject (default ``email/``: MIME, headers,
  RFC 2822 parsing) are excluded from the training text; validation windows are spread evenly over
  that package's text. The frozen routing state (e.g. the capacity bias of ``method="topk"``) was
  fitted to the training text's expert loads, not to these.

Model: token and position embeddings, ``layers`` pre-LayerNorm blocks (causal multi-head attention,
then an MoE feed-forward layer: linear gate, ``E`` two-layer MLP experts run as batched matrix
products on the ``[E, C, d]`` buffers of ``RoutingPlan.dispatch``, ``RoutingPlan.combine``
back), LayerNorm, linear head. Each MoE layer has its own router. Loss: cross-entropy on every
position; Adam.

Routers:

* ``nocaps`` — the reference: learned top-k (``torch.topk`` of the logits, softmax gate over the
  chosen experts) with **no caps at all**: every slot is served, experts take whatever they get
  (the plan's caps are the step's actual loads, so experts are overloaded against their capacity).
* ``topk_drop`` — capped top-k: ``MoERouter(method="topk", balance=None, overflow="drop")``.
* ``default`` — ``MoERouter(method="topk", balance="bias", overflow="reroute")``: capacity bias and
  room-aware rerouting (SPEC §16).
* ``systematic`` — the package's content-blind systematic router (the gate only weighs the two
  chosen experts).
* ``expert_choice`` — ``MoERouter(method="expert_choice")``: expert ``e`` takes its ``capacity[e]``
  best tokens of the batch. It reads the whole batch, so in a causal model a token's expert depends
  on later tokens of the batch (it leaks across an autoregressive sequence): its bits/char are not
  those of a model that could generate text.

Capacity profiles: ``half`` (8 experts, 4 at relative capacity 1, 4 at 0.5) and ``strong`` (16
experts, ``capacity.strong_hetero_capacities(16, seed=0)``: 10 % at 8x, 20 % at 2x). ``k = 2``,
capacity factor 1.25. Evaluation in ``eval()`` mode with the training capacity factor, with
``eval_capacity_factor=2.0`` and with ``eval_capacity_factor=inf`` (no caps in eval mode).

Run from the repository root::

    python benchmarks/bench_char_lm.py              # full run: 2 profiles x 5 routers x 3 seeds
    python benchmarks/bench_char_lm.py --quick      # 1 profile, 1 seed, 60 steps, small model
    python benchmarks/bench_char_lm.py --jobs 2     # two training processes at once
    python benchmarks/bench_char_lm.py --plot-only  # redraw the plot and tables from the JSON
    python benchmarks/bench_char_lm.py --routers nocaps default --bias-rate 1e-3 --tag rate1e-3  # a variant
    python benchmarks/bench_char_lm.py --routers nocaps default --seeds 12 --jobs 2 --tag seeds12  # more seeds
    python benchmarks/bench_char_lm.py --plot-only --tag rate3e-2_seeds12 \
        --reference benchmarks/results/char_lm_seeds12.json  # tables of a variant's run, paired with seeds12

Where no-caps runs are at hand (this run's, or ``--reference``'s), a seed table follows the others
(:func:`seeds_table`): each seed's Δ bits/char against the same seed's no-caps run, the mean, a
bootstrap interval and the means per 3 seeds.

Outputs (``--out``, default ``benchmarks/results``): ``char_lm.json``, ``char_lm_panel.png``, and
the tables between the ``charlm`` markers of ``benchmarks/TRAINING_RESULTS.md`` (``--md``); a run
with ``--tag`` or ``--quick`` writes ``char_lm[_quick][_<tag>].json`` / ``.png`` and no tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):  # run from a source checkout; bench_training beside this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _args  # noqa: E402
from bench_training import NoCapsTopK, machine, router_options, served_share  # noqa: E402

from gpu_phase_router import capacity as _capacity  # noqa: E402
from gpu_phase_router.torch import MoERouter  # noqa: E402

ROUTERS = ["nocaps", "topk_drop", "default", "systematic", "expert_choice"]
LABELS = {
    "nocaps": "learned top-k, no caps (reference)",
    "topk_drop": "capped top-k (drop)",
    "default": "top-k + capacity bias + reroute (default)",
    "systematic": "systematic (content-blind)",
    "expert_choice": "expert choice",
}
COLORS = {"nocaps": "k", "topk_drop": "C4", "default": "C3", "systematic": "C2", "expert_choice": "C1"}
# MoERouter options of each router (nocaps is built by this benchmark)
ROUTER_OPTIONS: dict[str, dict[str, Any]] = {
    "topk_drop": {"method": "topk", "balance": None, "overflow": "drop"},
    "default": {"method": "topk", "balance": "bias", "overflow": "reroute"},
    "systematic": {"method": "systematic"},
    "expert_choice": {"method": "expert_choice"},
}
PROFILES = ["half", "strong"]
EVAL_FACTORS: list[float | None] = [None, 2.0, math.inf]  # None: the training capacity factor
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
TOPIC = "email"
BITS = 1.0 / math.log(2.0)
GOAL_BITS = 0.02  # bits/char above the no-caps reference
GOAL_SERVED = 99.9  # % of slots


@dataclass
class Config:
    """One comparison (one capacity profile)."""

    profile: str = "half"
    k: int = 2
    capacity_factor: float = 1.25
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    hidden: int = 128
    context: int = 64
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    routers: list[str] = field(default_factory=lambda: list(ROUTERS))
    eval_factors: list[float | None] = field(default_factory=lambda: list(EVAL_FACTORS))
    eval_windows: int = 256
    bias_rate: float | None = None  # MoERouter's bias_rate for balance="bias" (None: its default)
    block: int = 1024
    holdout: float = 0.05
    topic: str = TOPIC

    def caps(self) -> np.ndarray:
        return profile_caps(self.profile)

    @property
    def num_experts(self) -> int:
        return int(self.caps().shape[0])


QUICK = Config(steps=60, seeds=[0], d_model=32, hidden=64, context=32, batch=8, eval_windows=32)


def profile_caps(profile: str) -> np.ndarray:
    """Relative expert capacities of a profile: ``half`` (8 experts, 4 at 0.5) or ``strong`` (16)."""
    if profile == "half":
        return np.array([1.0] * 4 + [0.5] * 4)
    if profile == "strong":
        return _capacity.strong_hetero_capacities(16, seed=0)
    raise ValueError(f"profile must be one of {PROFILES}; got {profile!r}")


# --- the text ------------------------------------------------------------------------------------------------

VOCAB = 98  # 0: any other character, 1..95: printable ASCII 32..126, 96: newline, 97: tab
_LUT = np.zeros(128, dtype=np.uint8)
_LUT[32:127] = np.arange(1, 96, dtype=np.uint8)
_LUT[10], _LUT[9] = 96, 97


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of the corpus's ``.py`` files.

    Folders named in ``SKIP_DIRS`` and ``config-*`` are left out, at any depth.
    """
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise ValueError(f"root must be a folder; got {base}")
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        found += [Path(dirpath, f).relative_to(base).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def encode(text: str) -> np.ndarray:
    """uint8 ``[len(text)]`` character ids (see ``VOCAB``)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, _LUT[np.minimum(codes, 127)], 0).astype(np.uint8)


def in_topic(path: str, topic: str) -> bool:
    """Whether a corpus path lies in the held-out package ``topic``."""
    return path.startswith(topic.rstrip("/") + "/")


@dataclass(frozen=True)
class Corpus:
    """The encoded training text, its held-out blocks, and the held-out topic text.

    Attributes:
        train: uint8 ``[N]`` ids of every non-topic file, files joined by a newline.
        blocks: int64 ``[B]`` start offsets of the training blocks (``block`` characters each).
        heldout: int64 ``[H]`` start offsets of the held-out blocks (random split).
        topic: uint8 ``[M]`` ids of the topic files.
        train_files, topic_files: the files of each part, in order.
    """

    train: np.ndarray
    blocks: np.ndarray
    heldout: np.ndarray
    topic: np.ndarray
    train_files: tuple[str, ...]
    topic_files: tuple[str, ...]
    block: int


def _read(root: Path, files: list[str]) -> np.ndarray:
    parts = [(root / f).read_bytes().decode("utf-8", "replace") for f in files]
    return encode("\n".join(parts))


@lru_cache(maxsize=4)
def load_corpus(
    root: str | None = None, topic: str = TOPIC, block: int = 1024, holdout: float = 0.05, seed: int = 0
) -> Corpus:
    """Read and split the corpus (deterministic given the folder's files and the arguments).

    Args:
        root: the library folder (default: the running interpreter's standard library).
        topic: the package held out whole for the topic split (``email``, ``asyncio``, ...).
        block: characters per block of the random split.
        holdout: share of the training blocks held out for the random split, in ``(0, 1)``.
        seed: seed of the choice of held-out blocks.
    """
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must lie in (0, 1); got {holdout}")
    if block < 2:
        raise ValueError(f"block must be >= 2; got {block}")
    base = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(base)
    topic_files = [f for f in files if in_topic(f, topic)]
    train_files = [f for f in files if not in_topic(f, topic)]
    if not topic_files:
        raise ValueError(f"topic {topic!r} has no files under {base}")
    train = _read(base, train_files)
    n_blocks = train.shape[0] // block
    if n_blocks < 2:
        raise ValueError(f"the training text has fewer than 2 blocks of {block} characters")
    perm = np.random.default_rng(seed).permutation(n_blocks)
    n_held = max(1, round(holdout * n_blocks))
    starts = np.arange(n_blocks, dtype=np.int64) * block
    return Corpus(
        train=train,
        blocks=np.sort(starts[perm[n_held:]]),
        heldout=np.sort(starts[perm[:n_held]]),
        topic=_read(base, topic_files),
        train_files=tuple(train_files),
        topic_files=tuple(topic_files),
        block=block,
    )


def train_starts(corpus: Corpus, batch: int, context: int, rng: np.random.Generator) -> np.ndarray:
    """int64 ``[batch]`` start offsets of training windows of ``context + 1`` characters, each
    inside one random training block (never a held-out one)."""
    if context + 1 > corpus.block:
        raise ValueError(f"context + 1 = {context + 1} exceeds the block size {corpus.block}")
    start = corpus.blocks[rng.integers(0, corpus.blocks.shape[0], batch)]
    return start + rng.integers(0, corpus.block - context, batch)


def train_batch(corpus: Corpus, batch: int, context: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """``(x, y)`` int64 ``[batch, context]`` at :func:`train_starts`, ``y`` shifted by one."""
    return _windows(corpus.train, train_starts(corpus, batch, context, rng), context)


def eval_windows(corpus: Corpus, split: str, n: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed validation windows of a split: ``random`` (the first window of ``n`` held-out blocks,
    evenly spread over them) or ``topic`` (``n`` windows evenly spread over the topic text)."""
    if split == "random":
        pick = np.linspace(0, corpus.heldout.shape[0] - 1, min(n, corpus.heldout.shape[0])).round().astype(np.int64)
        return _windows(corpus.train, corpus.heldout[pick], context)
    if split == "topic":
        start = np.linspace(0, corpus.topic.shape[0] - context - 1, n).round().astype(np.int64)
        return _windows(corpus.topic, start, context)
    raise ValueError(f"split must be 'random' or 'topic'; got {split!r}")


def _windows(text: np.ndarray, start: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = start[:, None] + np.arange(context + 1)[None, :]
    win = torch.from_numpy(text[idx].astype(np.int64))
    return win[:, :-1], win[:, 1:]


# --- routers ---------------------------------------------------------------------------------------------------


def router_supported(name: str) -> bool:
    """Whether this version of ``MoERouter`` offers the router ``name``."""
    return name == "nocaps" or router_options(name, ROUTER_OPTIONS) is not None


def make_router(name: str, cfg: Config, seed: int) -> nn.Module:
    """The router ``name`` for ``cfg`` (``ValueError`` if this ``MoERouter`` lacks it)."""
    if name == "nocaps":
        return NoCapsTopK(cfg.num_experts, cfg.k)
    opts = router_options(name, ROUTER_OPTIONS)
    if opts is None:
        raise ValueError(f"router {name!r} needs MoERouter options {ROUTER_OPTIONS[name]}")
    if cfg.bias_rate is not None and opts.get("balance") == "bias":
        opts = opts | {"bias_rate": cfg.bias_rate}
    return MoERouter(cfg.num_experts, cfg.k, cfg.caps(), capacity_factor=cfg.capacity_factor, seed=seed, **opts)


def set_eval_factor(router: nn.Module, factor: float | None) -> bool:
    """Set a router's eval-mode capacity factor; False where the router has no such option."""
    if isinstance(router, NoCapsTopK):
        return True
    if not hasattr(router, "eval_capacity_factor"):
        return factor is None
    if factor is not None and math.isinf(factor) and getattr(router, "method", None) == "expert_choice":
        return False  # every token to every expert
    router.eval_capacity_factor = factor
    return True


# --- the model -------------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """What one MoE layer's routing did in one forward (host values)."""

    served: float  # share of the T * k slots served (bench_training.served_share)
    no_expert: float  # share of tokens with no kept slot
    load: np.ndarray  # float64 [E] kept slots / reference hard cap
    demand: np.ndarray  # float64 [E] slots routed to each expert (kept or not) / reference hard cap
    seconds: float  # time of the router call


class MoEFeedForward(nn.Module):
    """Gate, router, ``E`` two-layer MLP experts on the plan's ``[E, C, d]`` buffers."""

    def __init__(self, d: int, hidden: int, num_experts: int, k: int, router: nn.Module, ref_caps: np.ndarray):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d, hidden) / d**0.5)
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, d) / hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, d))
        self.router = router
        self.ref_caps = ref_caps  # int64 [E]: the capped routers' training hard caps at this T
        self.last: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        t0 = time.perf_counter()
        plan = self.router(logits)
        seconds = time.perf_counter() - t0
        buf = plan.dispatch(x)
        out = torch.relu(buf @ self.w1 + self.b1) @ self.w2 + self.b2
        with torch.no_grad():
            kept = plan.tokens_per_expert.double().numpy()
            routed = plan.experts[plan.experts >= 0]
            demand = np.bincount(routed.numpy(), minlength=len(kept)).astype(np.float64)
            caps = np.maximum(self.ref_caps, 1).astype(np.float64)
            self.last = Routing(
                served=served_share(plan, self.k),
                no_expert=float((~plan.kept.any(dim=1)).double().mean()),
                load=kept / caps,
                demand=demand / caps,
                seconds=seconds,
            )
        return plan.combine(out)


class Block(nn.Module):
    def __init__(self, cfg: Config, router: nn.Module, ref_caps: np.ndarray) -> None:
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.moe = MoEFeedForward(d, cfg.hidden, cfg.num_experts, cfg.k, router, ref_caps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.moe(self.ln2(x).reshape(b * n, d)).view(b, n, d)


class CharLM(nn.Module):
    """Token + position embeddings, ``layers`` blocks with MoE feed-forward layers, LayerNorm, head."""

    def __init__(self, cfg: Config, routers: list[nn.Module]) -> None:
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"d_model={cfg.d_model} must be a multiple of heads={cfg.heads}")
        ref = MoERouter(cfg.num_experts, cfg.k, cfg.caps(), method="systematic", capacity_factor=cfg.capacity_factor)
        ref_caps = ref.hard_caps(cfg.batch * cfg.context)
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg, r, ref_caps) for r in routers)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))

    def routing(self) -> list[Routing]:
        return [blk.moe.last for blk in self.blocks if blk.moe.last is not None]

    def routers(self) -> list[nn.Module]:
        return [blk.moe.router for blk in self.blocks]


# --- training and evaluation ------------------------------------------------------------------------------------


def train_one(cfg: Config, name: str, seed: int, corpus: Corpus | None = None) -> dict[str, Any]:
    """Train one model with router ``name``; per-step loss and routing, then validation on both splits."""
    corpus = corpus or load_corpus(topic=cfg.topic, block=cfg.block, holdout=cfg.holdout)
    torch.manual_seed(seed)
    model = CharLM(cfg, [make_router(name, cfg, seed + 1000 * i) for i in range(cfg.layers)])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(seed)  # same batches for every router at this seed
    losses, served, no_expert, route_ms = [], [], [], []
    load_sum = np.zeros((cfg.layers, cfg.num_experts))
    demand_sum = np.zeros_like(load_sum)
    load_max = np.zeros_like(load_sum)
    model.train()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        x, y = train_batch(corpus, cfg.batch, cfg.context, rng)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item() * BITS)
        info = model.routing()
        served.append(min(r.served for r in info))
        no_expert.append(max(r.no_expert for r in info))
        route_ms.append(1e3 * sum(r.seconds for r in info) / len(info))
        for i, r in enumerate(info):
            load_sum[i] += r.load
            demand_sum[i] += r.demand
            load_max[i] = np.maximum(load_max[i], r.load)
    seconds = time.perf_counter() - t0
    tail = max(1, cfg.steps // 10)
    out: dict[str, Any] = {
        "seed": seed,
        "loss": losses,
        "served": served,
        "final_train_bits": float(np.mean(losses[-tail:])),
        "served_min": float(np.min(served)),
        "served_mean": float(np.mean(served)),
        "no_expert_mean": float(np.mean(no_expert)),
        "load_mean": (load_sum / cfg.steps).tolist(),
        "demand_mean": (demand_sum / cfg.steps).tolist(),
        "load_max": load_max.tolist(),
        "route_ms": float(np.mean(route_ms)),
        "ms_per_step": 1e3 * seconds / cfg.steps,
        "eval": evaluate(model, cfg, corpus),
    }
    out["bias"] = [r.expert_bias.tolist() for r in model.routers() if hasattr(r, "expert_bias")]
    return out


@torch.no_grad()
def evaluate(model: CharLM, cfg: Config, corpus: Corpus) -> dict[str, Any]:
    """Validation bits/char and routing on both splits, in eval mode, for every eval capacity factor.

    Windows are scored ``cfg.batch`` at a time, so an eval forward has the training ``T``.
    """
    model.eval()
    results: dict[str, Any] = {}
    for factor in cfg.eval_factors:
        label = factor_label(factor)
        if not all(set_eval_factor(r, factor) for r in model.routers()):
            results[label] = None
            continue
        res: dict[str, Any] = {}
        for split in ("random", "topic"):
            x, y = eval_windows(corpus, split, cfg.eval_windows, cfg.context)
            nll, served, no_expert, load_max = 0.0, [], [], 0.0
            for lo in range(0, x.shape[0] - cfg.batch + 1, cfg.batch):
                logits = model(x[lo : lo + cfg.batch])
                target = y[lo : lo + cfg.batch].reshape(-1)
                nll += float(F.cross_entropy(logits.reshape(-1, VOCAB), target, reduction="sum"))
                info = model.routing()
                served.append(min(r.served for r in info))
                no_expert.append(max(r.no_expert for r in info))
                load_max = max(load_max, max(float(r.load.max()) for r in info))
            n_chars = (x.shape[0] // cfg.batch) * cfg.batch * cfg.context
            res[split] = {
                "bits": BITS * nll / n_chars,
                "served_min": float(np.min(served)),
                "served_mean": float(np.mean(served)),
                "no_expert_mean": float(np.mean(no_expert)),
                "load_max": load_max,
            }
        results[label] = res
    for r in model.routers():
        set_eval_factor(r, None)
    model.train()
    return results


def factor_label(factor: float | None) -> str:
    return "train" if factor is None else ("inf" if math.isinf(factor) else f"{factor:g}")


def _job(args: tuple[Config, str, int]) -> tuple[str, int, dict[str, Any]]:
    import numba

    cfg, name, seed = args
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    return name, seed, train_one(cfg, name, seed)


def run(cfg: Config, jobs: int = 1, log: Any = print) -> dict[str, Any]:
    """Train every supported router of ``cfg`` for every seed; the JSON-ready results.

    Torch and the Numba kernels run single-threaded in each training process (the model is small;
    on a shared machine a parallel region can wait for a descheduled thread). ``jobs > 1`` trains
    in that many processes.
    """
    names = [n for n in cfg.routers if router_supported(n)]
    missing = [n for n in cfg.routers if n not in names]
    if missing and log:
        log(f"not offered by this MoERouter, skipped: {missing}")
    corpus = load_corpus(topic=cfg.topic, block=cfg.block, holdout=cfg.holdout)
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "capacities": cfg.caps().tolist(),
        "corpus": corpus_info(corpus),
        "missing": missing,
        "runs": {n: [] for n in names},
    }
    for name in names:  # compile or load the CPU kernels before any step is timed
        make_router(name, cfg, 0)(torch.zeros(cfg.batch * cfg.context, cfg.num_experts))
    tasks = [(cfg, n, s) for n in names for s in cfg.seeds]
    import numba

    saved = torch.get_num_threads(), numba.get_num_threads()
    t0 = time.perf_counter()
    try:
        if jobs > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(jobs) as pool:
                done = pool.imap(_job, tasks)
                for name, seed, res in done:
                    out["runs"][name].append(res)
                    _log_run(log, cfg, name, seed, res)
        else:
            torch.set_num_threads(1)
            for task in tasks:
                name, seed, res = _job(task)
                out["runs"][name].append(res)
                _log_run(log, cfg, name, seed, res)
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])
    out["train_seconds"] = time.perf_counter() - t0
    return out


def _log_run(log: Any, cfg: Config, name: str, seed: int, res: dict[str, Any]) -> None:
    if not log:
        return
    ev = res["eval"]["train"]
    log(
        f"{cfg.profile:<6} {name:<14} seed {seed}: served min {100 * res['served_min']:6.2f} %  "
        f"val bits/char random {ev['random']['bits']:.3f} topic {ev['topic']['bits']:.3f}  "
        f"{res['ms_per_step']:.0f} ms/step"
    )


def corpus_info(corpus: Corpus) -> dict[str, Any]:
    return {
        "root": str(stdlib_root()),
        "python": platform.python_version(),
        "train_files": len(corpus.train_files),
        "train_chars": int(corpus.train.shape[0]),
        "heldout_blocks": int(corpus.heldout.shape[0]),
        "topic_files": len(corpus.topic_files),
        "topic_chars": int(corpus.topic.shape[0]),
    }


# --- summaries, tables, plot ----------------------------------------------------------------------------------


def _ms(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def summary(result: dict[str, Any], factor: str = "train") -> list[dict[str, Any]]:
    """One row per router of one profile: means over seeds, eval at capacity factor ``factor``."""
    runs = result["runs"]
    ref = runs.get("nocaps")
    rows = []
    for name, rs in runs.items():
        if not rs:
            continue
        row: dict[str, Any] = {
            "router": name,
            "served_min": 100 * min(r["served_min"] for r in rs),
            "served_mean": 100 * float(np.mean([r["served_mean"] for r in rs])),
            "no_expert": 100 * float(np.mean([r["no_expert_mean"] for r in rs])),
            "load_max": max(float(np.max(r["load_max"])) for r in rs),
            "train_bits": _ms([r["final_train_bits"] for r in rs]),
            "route_ms": float(np.mean([r["route_ms"] for r in rs])),
            "ms_per_step": float(np.mean([r["ms_per_step"] for r in rs])),
        }
        for split in ("random", "topic"):
            evs = [r["eval"].get(factor) for r in rs]
            if any(e is None for e in evs):
                row[split] = None
                continue
            bits = [e[split]["bits"] for e in evs]
            entry = {
                "bits": _ms(bits),
                "served_min": 100 * min(e[split]["served_min"] for e in evs),
                "served_mean": 100 * float(np.mean([e[split]["served_mean"] for e in evs])),
                "load_max": max(e[split]["load_max"] for e in evs),
            }
            if ref and all(r["eval"]["train"] for r in ref):
                entry["delta"] = float(np.mean(bits) - np.mean([r["eval"]["train"][split]["bits"] for r in ref]))
            row[split] = entry
        rows.append(row)
    return rows


def _pm(v: tuple[float, float], digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _split_cell(e: dict[str, Any] | None) -> str:
    if e is None:
        return "—"
    delta = f" ({e['delta']:+.3f})" if "delta" in e else ""
    return f"{_pm(e['bits'])}{delta}"


def table(result: dict[str, Any]) -> str:
    """Markdown table of one profile (eval with the training capacity factor)."""
    lines = [
        "| router | train slots served, min / mean | tokens w/o expert | max load / cap | "
        "val bits/char, random split (Δ no caps) | val bits/char, topic split (Δ no caps) | "
        "eval served min, random / topic | routing ms / call | ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary(result):
        served_eval = (
            f"{r['random']['served_min']:.2f} / {r['topic']['served_min']:.2f} %" if r["random"] and r["topic"] else "—"
        )
        lines.append(
            f"| {LABELS.get(r['router'], r['router'])} | {r['served_min']:.2f} / {r['served_mean']:.2f} % | "
            f"{r['no_expert']:.2f} % | {r['load_max']:.2f} | {_split_cell(r['random'])} | {_split_cell(r['topic'])} | "
            f"{served_eval} | {r['route_ms']:.2f} | {r['ms_per_step']:.0f} |"
        )
    for name in result.get("missing", []):
        lines.append(f"| {LABELS.get(name, name)} | not offered by this version of `MoERouter` | | | | | | | |")
    return "\n".join(lines)


def eval_table(result: dict[str, Any]) -> str:
    """Markdown table: each capped router's validation at every eval capacity factor."""
    factors = [factor_label(f) for f in result["config"]["eval_factors"]]
    lines = [
        "| router | eval capacity factor | random: bits/char (Δ no caps) | random: served min / mean | "
        "topic: bits/char (Δ no caps) | topic: served min / mean | max load / train cap |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for fac in factors:
        for r in summary(result, fac):
            if r["router"] == "nocaps" and fac != "train":
                continue
            label = "(no caps)" if r["router"] == "nocaps" else ("training (1.25)" if fac == "train" else fac)
            if r["random"] is None:
                lines.append(f"| {LABELS.get(r['router'], r['router'])} | {label} | n/a | | | | |")
                continue
            ra, to = r["random"], r["topic"]
            lines.append(
                f"| {LABELS.get(r['router'], r['router'])} | {label} | {_split_cell(ra)} | "
                f"{ra['served_min']:.2f} / {ra['served_mean']:.2f} % | {_split_cell(to)} | "
                f"{to['served_min']:.2f} / {to['served_mean']:.2f} % | {max(ra['load_max'], to['load_max']):.2f} |"
            )
    return "\n".join(lines)


def goals_table(results: dict[str, Any], router: str = "default") -> str:
    """The issue's char-LM goals for ``router`` at every eval factor: Δ bits/char ≤ 0.02 and ≥ 99.9 %
    of the slots served (means over steps / eval batches; the worst one in brackets)."""
    lines = [
        "| profile | eval capacity factor | split | Δ bits/char vs no caps (goal ≤ 0.02) | "
        "eval slots served, mean (worst batch) | train slots served, mean (worst step) | met |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for prof, result in results.items():
        if router not in result["runs"]:
            lines.append(f"| {prof} | — | — | router not measured | | | no |")
            continue
        for fac in [factor_label(f) for f in result["config"]["eval_factors"]]:
            row = next((r for r in summary(result, fac) if r["router"] == router), None)
            if row is None:
                continue
            for split in ("random", "topic"):
                e = row[split]
                if e is None or "delta" not in e:
                    continue
                ok = e["delta"] <= GOAL_BITS and min(e["served_mean"], row["served_mean"]) >= GOAL_SERVED
                lines.append(
                    f"| {prof} | {fac} | {split} | {e['delta']:+.3f} | {e['served_mean']:.2f} % "
                    f"({e['served_min']:.2f} %) | {row['served_mean']:.2f} % ({row['served_min']:.2f} %) | "
                    f"{'yes' if ok else '**no**'} |"
                )
    return "\n".join(lines)


SEED_GROUP = 3  # seeds per group in seeds_table (the goals are means over 3 seeds)
BOOTSTRAP = 10_000  # resamples of the seeds for seeds_table's interval


def seeds_table(
    results: dict[str, Any], reference: dict[str, Any] | None = None, reference_name: str = "nocaps"
) -> str:
    """How Δ bits/char vs no caps spreads over the model seeds, per profile, router, eval factor and split.

    Each seed's Δ pairs a router's run with the reference run of the same seed (``reference_name``,
    scored with the training capacity factor: it has no caps). The reference runs come from
    ``results``, or from ``reference`` (the results of another run of the same configuration) where
    ``results`` has none. Columns: the mean Δ over the seeds, a 90 % bootstrap interval of that mean
    (``BOOTSTRAP`` resamples of the seeds, generator seed 0), the mean Δ of each group of
    ``SEED_GROUP`` consecutive seeds (what one 3-seed run would have reported), and the smallest and
    largest Δ of one seed.
    """
    lines = [
        "| profile | router | eval capacity factor | split | seeds | mean Δ bits/char | 90 % interval | "
        f"per {SEED_GROUP} seeds | one seed, min / max |",
        "|---|---|---|---|---:|---:|---|---|---|",
    ]
    for prof, result in results.items():
        other = (reference or {}).get(prof, {}).get("runs", {})
        ref_runs = result["runs"].get(reference_name) or other.get(reference_name)
        if not ref_runs:
            continue
        ref_bits = {r["seed"]: r["eval"]["train"] for r in ref_runs}
        factors = [factor_label(f) for f in result["config"]["eval_factors"]]
        for name, rs in result["runs"].items():
            paired = [r for r in rs if r["seed"] in ref_bits]
            if name == reference_name or not paired:
                continue
            for fac in factors:
                if any(r["eval"].get(fac) is None for r in paired):
                    continue  # a router not scored with this factor (expert choice has no uncapped eval)
                for split in ("random", "topic"):
                    delta = np.array(
                        [r["eval"][fac][split]["bits"] - ref_bits[r["seed"]][split]["bits"] for r in paired]
                    )
                    lines.append(f"| {prof} | {name} | {fac} | {split} | {_seed_cells(delta)} |")
    return "\n".join(lines)


def _seed_cells(delta: np.ndarray) -> str:
    """seeds_table's cells for one row of per-seed Δ: count, mean, interval, groups, extremes."""
    rng = np.random.default_rng(0)
    means = delta[rng.integers(0, delta.size, size=(BOOTSTRAP, delta.size))].mean(axis=1)
    lo, hi = np.percentile(means, [5, 95])
    starts = range(0, delta.size - SEED_GROUP + 1, SEED_GROUP)
    groups = " / ".join(f"{delta[i : i + SEED_GROUP].mean():+.3f}" for i in starts)
    return (
        f"{delta.size} | {delta.mean():+.4f} | {lo:+.3f} to {hi:+.3f} | {groups} | "
        f"{delta.min():+.3f} / {delta.max():+.3f}"
    )


def plot(results: dict[str, Any], path: str | Path | None = None) -> Any:
    """Per profile: training curves, validation bits/char per split and eval mode, load / cap per expert."""
    import matplotlib.pyplot as plt

    profs = list(results)
    fig, axes = plt.subplots(len(profs), 3, figsize=(17, 4.4 * len(profs)), squeeze=False)
    for row, prof in enumerate(profs):
        result = results[prof]
        cfg = result["config"]
        ax = axes[row]
        win = max(1, cfg["steps"] // 20)
        kernel = np.ones(win) / win
        for name, rs in result["runs"].items():
            if not rs:
                continue
            loss = np.mean([r["loss"] for r in rs], axis=0)
            smooth = np.convolve(loss, kernel, "valid")
            ax[0].plot(np.arange(len(loss))[win - 1 :], smooth, color=COLORS.get(name), label=LABELS[name])
        ax[0].set(xlabel="step", ylabel=f"train bits/char (mean of {win} steps)", title=f"{prof}: training")
        lo = min(np.mean([r["final_train_bits"] for r in rs]) for rs in result["runs"].values() if rs)
        ax[0].set_ylim(lo - 0.3, lo + 1.5)
        ax[0].legend(fontsize=7)
        # validation bits/char: groups = (split, eval factor), bars = routers
        factors = [factor_label(f) for f in cfg["eval_factors"]]
        groups = [(s, f) for s in ("random", "topic") for f in factors]
        names = [n for n, rs in result["runs"].items() if rs]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            vals, errs = [], []
            for split, fac in groups:
                fac_used = "train" if name == "nocaps" else fac
                evs = [r["eval"].get(fac_used) for r in result["runs"][name]]
                if any(e is None for e in evs):
                    vals.append(np.nan)
                    errs.append(0.0)
                else:
                    b = [e[split]["bits"] for e in evs]
                    vals.append(float(np.mean(b)))
                    errs.append(float(np.std(b)))
            ax[1].bar(
                np.arange(len(groups)) + (i - len(names) / 2 + 0.5) * width,
                vals,
                width,
                yerr=errs,
                color=COLORS.get(name),
                label=LABELS[name],
            )
        evals = [e for rs in result["runs"].values() for r in rs for e in r["eval"].values() if e]
        allv = [e[s]["bits"] for e in evals for s in ("random", "topic")]
        ax[1].set_ylim(min(allv) - 0.1, max(allv) + 0.05)
        ax[1].set_xticks(range(len(groups)), [f"{s}\neval cf {f}" for s, f in groups], fontsize=8)
        ax[1].set(ylabel="validation bits/char", title=f"{prof}: validation (eval capacity factor)")
        # load / cap per expert (training, mean over steps and layers): kept and demanded
        caps = np.asarray(result["capacities"])
        for i, name in enumerate(names):
            demand = np.mean([np.mean(r["demand_mean"], axis=0) for r in result["runs"][name]], axis=0)
            xs = np.arange(len(caps)) + (i - len(names) / 2 + 0.5) * width
            ax[2].bar(xs, demand, width, color=COLORS.get(name), label=LABELS[name])
        ax[2].axhline(1.0, color="k", ls="--", lw=1)
        ax[2].set_xticks(range(len(caps)), [f"{e}\n{c:g}" for e, c in enumerate(caps)], fontsize=7)
        ax[2].set(
            xlabel="expert / relative capacity",
            ylabel="slots routed / training hard cap (mean)",
            title=f"{prof}: load per expert (above 1: dropped or overloaded)",
        )
    fig.suptitle(
        "Character LM on the Python standard library, MoE feed-forward, k = 2, capacity factor 1.25, "
        f"{len(next(iter(results.values()))['config']['seeds'])} seed(s)",
        fontsize=10,
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """The committed JSON: per-step curves as means over seeds (4 significant digits)."""
    out = json.loads(json.dumps(results))
    for result in out.values():
        result["curves"] = {}
        for name, rs in result["runs"].items():
            if not rs:
                continue
            result["curves"][name] = {
                key: [float(f"{v:.4g}") for v in np.mean([r[key] for r in rs], axis=0)] for key in ("loss", "served")
            }
            for r in rs:
                r.pop("loss", None)
                r.pop("served", None)
    return out


def _restore_curves(results: dict[str, Any]) -> None:
    """Give each run of a compact JSON the mean curves back (for the plot)."""
    for result in results.values():
        for name, rs in result["runs"].items():
            curves = result.get("curves", {}).get(name)
            for r in rs:
                if curves and "loss" not in r:
                    r["loss"], r["served"] = curves["loss"], curves["served"]


def write_md(results: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """The tables of a run between the ``charlm`` markers of ``path``; prose stays as written."""
    m = meta.get("machine", {})
    first = next(iter(results.values()))
    cfg, corpus = first["config"], first["corpus"]
    parts = [
        "<!-- generated by benchmarks/bench_char_lm.py: tables between the markers are rewritten -->",
        f"Configuration: {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads, expert hidden "
        f"{cfg['hidden']}, context {cfg['context']}, batch {cfg['batch']} ({cfg['batch'] * cfg['context']} tokens "
        f"per MoE call), {cfg['steps']} steps, Adam lr {cfg['lr']}, k = {cfg['k']}, capacity factor "
        f"{cfg['capacity_factor']}, seeds {cfg['seeds']}. Corpus: Python {corpus['python']} standard library, "
        f"{corpus['train_files']} files / {corpus['train_chars']:,} characters for training (less "
        f"{corpus['heldout_blocks']} held-out blocks of {cfg['block']}), topic split `{cfg['topic']}/` "
        f"({corpus['topic_files']} files, {corpus['topic_chars']:,} characters); {cfg['eval_windows']} validation "
        f"windows per split. Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, AVX2 "
        f"{'yes' if m.get('avx2') else 'no'}, AVX-512 {'yes' if m.get('avx512') else 'no'}, load average "
        f"{m.get('load_avg', '?')} at the start and {meta.get('load_end', '?')} at the end, "
        f"torch {m.get('torch', '?')}, "
        f"single-threaded training processes, {meta.get('jobs', 1)} at a time; "
        f"{meta.get('seconds', float('nan')):.0f} s in all.",
    ]
    for prof, result in results.items():
        caps = result["capacities"]
        parts += [
            "",
            f"**Profile `{prof}`** ({len(caps)} experts, relative capacities {caps}); validation in eval mode "
            "with the training capacity factor:",
            "",
            table(result),
            "",
            f"Eval mode, profile `{prof}`: the same trained models scored with each eval capacity factor:",
            "",
            eval_table(result),
        ]
    parts += ["", "Goals (the default router):", "", goals_table(results)]
    block = "\n".join(parts)
    start, end = "<!-- charlm:start -->", "<!-- charlm:end -->"
    text = path.read_text() if path.exists() else f"# MoE training comparison\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{block}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="half profile, 1 seed, 60 steps, a smaller model")
    ap.add_argument("--profiles", nargs="+", choices=PROFILES)
    ap.add_argument("--routers", nargs="+", choices=ROUTERS)
    ap.add_argument("--steps", type=_args.positive_int)
    ap.add_argument("--seeds", type=_args.positive_int, help="number of model seeds")
    ap.add_argument("--jobs", type=_args.positive_int, default=1, help="training processes at once")
    ap.add_argument(
        "--bias-rate", type=_args.nonnegative_float, help="bias_rate of the default router (default: MoERouter's)"
    )
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. a variant's name)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot and tables from the JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "TRAINING_RESULTS.md"))
    ap.add_argument(
        "--reference",
        type=_args.existing_file,
        help="a char_lm JSON of the same configuration whose nocaps runs pair with this run's seeds "
        "in the seed table (for a run without nocaps, e.g. a variant)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    stem = "char_lm" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    json_path = out / f"{stem}.json"
    if args.plot_only and not json_path.is_file():
        ap.error(f"--plot-only: no {json_path} to redraw from (run without --plot-only first)")
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        saved = json.loads(json_path.read_text())
        results, meta = saved["profiles"], saved["meta"]
        _restore_curves(results)
    else:
        base = QUICK if args.quick else Config()
        profs = args.profiles or (["half"] if args.quick else PROFILES)
        if args.steps is not None:
            base = replace(base, steps=args.steps)
        if args.seeds is not None:
            base = replace(base, seeds=list(range(args.seeds)))
        if args.routers is not None:
            base = replace(base, routers=args.routers)
        if args.bias_rate is not None:
            base = replace(base, bias_rate=args.bias_rate)
        meta = {"machine": machine(), "jobs": args.jobs}
        t0 = time.perf_counter()
        results = {p: run(replace(base, profile=p), jobs=args.jobs) for p in profs}
        meta["seconds"] = time.perf_counter() - t0
        meta["load_end"] = [round(v, 2) for v in os.getloadavg()]
        json_path.write_text(json.dumps({"meta": meta, "profiles": compact(results)}, separators=(",", ":")))
    plot(results, out / (f"{stem}.png" if stem != "char_lm" else "char_lm_panel.png"))
    for prof, result in results.items():
        print(f"\nprofile {prof}\n" + table(result) + "\n\n" + eval_table(result))
    print("\n" + goals_table(results))
    reference = json.loads(Path(args.reference).read_text())["profiles"] if args.reference else None
    seeds = seeds_table(results, reference)
    if seeds.count("\n") > 1:
        print("\nSpread over the model seeds:\n\n" + seeds)
    if not (args.quick or args.tag) and args.md:
        write_md(results, meta, Path(args.md))


if __name__ == "__main__":
    main()
