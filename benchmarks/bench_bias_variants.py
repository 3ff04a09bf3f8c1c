"""Variants of the default ``MoERouter`` (capacity bias + rerouting) on the training benchmarks.

A record of the alternatives measured against the default router (SPEC §16: ``method="topk"``,
``balance="bias"``, ``overflow="reroute"``, ``bias_rate`` 1e-2; ``--rounds`` sets the reroute
rounds of every variant, default ``MoERouter``'s), so the comparison can be rerun. Only the rounds
and rate variants are options of ``MoERouter``; the others are experiments that the package does
not ship: they replace a function of ``gpu_phase_router.torch.learned`` for the duration of one
variant's runs (the default router is restored afterwards).

* ``rounds8`` — 8 reroute rounds (the default now; the tables of ``TRAINING_RESULTS.md`` were
  measured with ``--rounds 4``, the default before);
* ``rate3e-2``, ``rate3e-3`` — ``bias_rate`` 3e-2 / 3e-3;
* ``count_final`` — the bias update counts each slot at its plan expert (the rerouted one where a
  round placed it, else the selected one) instead of the selected expert;
* ``all_propose`` — every unplaced slot of a token proposes in the same round (the token's
  unplaced slots, in slot order, propose its best, second best, ... eligible experts; an expert
  ranks its proposers by gate score, then flat slot index), instead of the first unplaced slot;
* ``cap_target`` — the bias targets each expert's hard cap instead of its capacity share
  (``b_e += rate * sign(capacity_e - routed_e)``, then shifted so that ``max(b) = 0``);
* ``valve`` — the bias only acts where a cap binds: ``b_e = min(0, b_e + rate * sign(capacity_e -
  routed_e))``;
* ``valve90``, ``valve75`` — the valve with a margin: ``b_e = min(0, b_e + rate * sign(m * capacity_e -
  routed_e))``, ``m`` = 0.9 / 0.75 (dual ascent on the caps, kept below them so that fewer slots
  overflow);
* ``share_pow0.9``, ``share_pow1.1`` — the default's update towards shares ``share_e^g / sum(share^g)``
  instead of ``share_e``: a little flatter (``g`` = 0.9) or a little steeper (1.1; at the strong
  profile the largest expert's target stays under its cap for ``g`` up to about 1.15);
* ``fill0.6``, ``fill0.65`` — the default's update towards targets that leave the smaller experts
  room: every expert outside the largest capacity class is aimed at ``rho`` = 0.6 / 0.65 times its hard
  cap and the largest class takes the rest of the ``T * k`` slots (at the strong profile that aims the 8x
  expert at 1.24 / 1.13 times its cap, so its cap binds and it keeps its best-scoring slots);
* ``rate1e-1`` — ``bias_rate`` 1e-1 (ten times the default's step);
* ``proportional`` — a step proportional to the relative miss instead of its sign:
  ``b_e += 0.1 * clip((target_e - routed_e) / target_e, -1, 1)``;
* ``log_share_start`` — the default with the bias started at ``log(E * share_e)`` instead of 0 (the
  selected loads then start near the capacity shares when the logits are alike);
* ``bias_nocaps`` (diagnostic) — the default's bias with caps so high (capacity factor 13) that
  nothing is dropped: what the bias's steering of the selection costs by itself;
* ``full_softmax_weights`` — each kept slot weighted by ``softmax(logits)`` over all experts, not
  renormalised over the token's kept slots (the default renormalises, SPEC §15);
* ``biased_weights`` — gate weights from ``logits + expert_bias`` (the selection values, with the
  bias after this step's update) instead of the unbiased logits;
* ``unbiased_proposals`` — each rerouting proposal is the token's best eligible expert by unbiased
  logit instead of by ``logits + expert_bias``;
* ``first_unbiased`` — each token's first expert is its best by unbiased logit and only the other
  ``k - 1`` are chosen by ``logits + expert_bias``, so the bias balances through the second slots
  and leaves every token its own best expert.

``nocaps`` (learned top-k without caps, the reference) and ``topk`` (capped top-k with drops) are
``bench_training``'s routers. Torch and Numba run on one thread. ``--k`` changes the slots per
token of every router (``--k 1 --variants nocaps``: the reference with one expert per token).

Run from the repository root::

    python benchmarks/bench_bias_variants.py --profile strong --rounds 4        # regression task, seeds 0-2
    python benchmarks/bench_bias_variants.py --profile strong --seeds 3 4 5 --variants nocaps default all_propose
    python benchmarks/bench_bias_variants.py --task char_lm --variants rate3e-2  # bench_char_lm, default row only
    python benchmarks/bench_bias_variants.py --task char_lm --variants cap_target --seeds 0 1 2 3 4 5 6 7 8 9 10 11 \
        --reference benchmarks/results/char_lm_seeds12.json  # 12 seeds, paired with that run's no-caps seeds

Output: a table on stdout; ``--json`` writes the per-seed numbers (regression task); the char-LM
task writes ``char_lm_variant_<name>.json`` through ``bench_char_lm`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _args  # noqa: E402
import bench_training as bt  # noqa: E402

from gpu_phase_router.torch import RoutingPlan, learned  # noqa: E402

BASELINES = ["nocaps", "topk"]
VARIANTS = [
    "default",
    "rounds8",
    "rate3e-2",
    "rate3e-3",
    "count_final",
    "all_propose",
    "cap_target",
    "valve",
    "valve90",
    "valve75",
    "share_pow0.9",
    "share_pow1.1",
    "fill0.6",
    "fill0.65",
    "rate1e-1",
    "proportional",
    "log_share_start",
    "bias_nocaps",
    "full_softmax_weights",
    "biased_weights",
    "unbiased_proposals",
    "first_unbiased",
    "cluster_oracle5",
    "cluster_oracle6",
    "cluster_oracle_fragmented",
]
OPTIONS: dict[str, dict[str, Any]] = {
    "rounds8": {"reroute_rounds": 8},
    "rate3e-2": {"bias_rate": 3e-2},
    "rate3e-3": {"bias_rate": 3e-3},
    "rate1e-1": {"bias_rate": 1e-1},
}
PROPORTIONAL_RATE = 0.1  # ``proportional``: the step at a miss of 100 % of the target
NOCAPS_FACTOR = 13.0  # strong profile: the smallest expert's cap 2048 / 26 * 13 = 1024 = T, nothing drops


def _learned_topk_all(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    capacity: torch.Tensor,
    rounds: int,
    trace: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``learned.learned_topk`` where every unplaced slot of a token proposes in the same round."""
    n_tok, n_exp = logits.shape
    score, avail, selected, placed, load = learned.select_and_cap(logits, bias, k, capacity)
    experts = selected.clone()
    zero = capacity.new_zeros(1)
    for _ in range(rounds):
        pending = ~placed
        room = torch.cat([capacity - load, zero])  # [E + 1], 0 for "no expert"
        reach = avail + torch.where(room[:n_exp] > 0, 0.0, float("-inf"))
        work, picks, values = reach.clone(), [], []
        for _j in range(k):  # the token's eligible experts, best first (-inf once none is left)
            best = work.argmax(dim=1, keepdim=True)
            values.append(work.gather(1, best))
            picks.append(best)
            work.scatter_(1, best, float("-inf"))
        proposal_all, value_all = torch.cat(picks, dim=1), torch.cat(values, dim=1)
        nth = (pending.cumsum(dim=1) - 1).clamp(min=0)  # index of each slot among the unplaced ones
        proposal = proposal_all.gather(1, nth)
        valid = pending & (value_all.gather(1, nth) > float("-inf"))
        group = torch.where(valid, proposal, n_exp).reshape(-1)
        prop_rank = learned._rank_in_group(group, score.gather(1, proposal).reshape(-1), n_exp)
        accept = (valid.reshape(-1) & (prop_rank < room[group])).view(n_tok, k)
        experts = torch.where(accept, proposal, experts)
        placed = placed | accept
        taken = torch.where(accept, proposal, n_exp).reshape(-1)
        load = load + learned._counts(taken, torch.ones_like(taken), n_exp + 1)[:n_exp]
        rows = torch.arange(n_tok).unsqueeze(1).expand(n_tok, k)[accept]
        avail[rows, proposal[accept]] = float("-inf")
    return selected, experts, placed


_ORIGINAL = {
    name: getattr(learned, name)
    for name in ("learned_topk", "topk_plan", "update_bias", "_plan", "_round", "select_and_cap")
}
_CAPACITY: dict[str, torch.Tensor] = {}


def _learned_topk_count_final(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The default rerouting; hands the plan experts to the bias update in place of the selection."""
    _selected, experts, placed = _ORIGINAL["learned_topk"](*args, **kwargs)
    return experts, experts, placed


def _topk_plan_keeping_capacity(logits: torch.Tensor, capacity: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    _CAPACITY["capacity"] = capacity
    return _ORIGINAL["topk_plan"](logits, capacity, *args, **kwargs)


def _cap_step(bias: torch.Tensor, selected: torch.Tensor, rate: float, margin: float = 1.0) -> torch.Tensor:
    """``bias + rate * sign(margin * capacity - routed)`` with the hard caps of the current call."""
    flat = selected.reshape(-1)
    routed = learned._counts(flat, torch.ones_like(flat), bias.shape[0]).to(torch.float64)
    diff = margin * _CAPACITY["capacity"].to(torch.float64) - routed
    return bias + torch.sign(diff).to(torch.float32) * rate


def _update_cap_target(bias: torch.Tensor, selected: torch.Tensor, share: Any, rate: float, *_: Any) -> None:
    new = _cap_step(bias, selected, rate)
    bias.copy_(new - new.max())


def _update_valve(bias: torch.Tensor, selected: torch.Tensor, share: Any, rate: float, *_: Any) -> None:
    bias.copy_(_cap_step(bias, selected, rate).clamp(max=0.0))


def _valve_below(margin: float) -> Callable[..., None]:
    """``valve`` aimed at ``margin`` times each hard cap."""

    def update(bias: torch.Tensor, selected: torch.Tensor, share: Any, rate: float, *_: Any) -> None:
        bias.copy_(_cap_step(bias, selected, rate, margin).clamp(max=0.0))

    return update


def _share_power(power: float) -> Callable[..., None]:
    """The default update (``learned.update_bias`` as shipped) towards shares ``share^power``, renormalised."""

    def update(bias: torch.Tensor, selected: torch.Tensor, share: torch.Tensor, rate: float, *rest: Any) -> None:
        tilted = share**power
        _ORIGINAL["update_bias"](bias, selected, tilted / tilted.sum(), rate, *rest)

    return update


def _fill(rho: float) -> Callable[..., None]:
    """The default update towards targets that leave the smaller experts room: every expert outside the
    largest capacity class is aimed at ``rho`` times its hard cap, and the largest class takes the rest of
    the ``T * k`` slots in proportion to its shares (at the strong profile, ``rho`` below about 0.71 aims
    the 8x expert above its own cap, so its cap binds and it keeps its best-scoring slots)."""

    def update(bias: torch.Tensor, selected: torch.Tensor, share: torch.Tensor, rate: float, *rest: Any) -> None:
        n_slots = selected.numel()
        cap = _CAPACITY["capacity"].to(torch.float64)
        largest = share == share.max()
        target = torch.where(largest, 0.0, rho * cap)
        left = max(n_slots - float(target.sum()), 0.0)
        target = torch.where(largest, left * share / share[largest].sum(), target)
        _ORIGINAL["update_bias"](bias, selected, target / max(n_slots, 1), rate, *rest)

    return update


def _update_proportional(bias: torch.Tensor, selected: torch.Tensor, share: torch.Tensor, rate: float, *_: Any) -> None:
    """``bias += PROPORTIONAL_RATE * clip((target - routed) / target, -1, 1)`` (``rate`` unused)."""
    n_tok, k = selected.shape
    flat = selected.reshape(-1)
    routed = learned._counts(flat, torch.ones_like(flat), bias.shape[0]).to(torch.float64)
    target = (n_tok * k) * share
    miss = ((target - routed) / target.clamp(min=1.0)).clamp(-1.0, 1.0)
    bias.add_((PROPORTIONAL_RATE * miss).to(torch.float32))


def _plan_full_softmax(
    experts: torch.Tensor, capacity: torch.Tensor, buffer_size: int, logits: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """``_plan`` with each kept slot weighted by ``softmax(logits)`` over all experts (not renormalised)."""
    plan = _ORIGINAL["_plan"](experts, capacity, buffer_size, logits, *args, **kwargs)
    prob = torch.softmax(logits.float(), dim=1).gather(1, experts.clamp(min=0))
    return replace(plan, weights=torch.where(experts >= 0, prob, 0.0).to(plan.weights.dtype))


def _topk_plan_biased_weights(
    logits: torch.Tensor, capacity: torch.Tensor, buffer_size: int, *, bias: torch.Tensor, **kwargs: Any
) -> Any:
    """The default plan with gate weights from ``logits + expert_bias`` (after this step's update)."""

    def plan(experts: torch.Tensor, cap: torch.Tensor, size: int, lg: torch.Tensor, *args: Any, **kw: Any) -> Any:
        return _ORIGINAL["_plan"](experts, cap, size, lg + bias.detach(), *args, **kw)

    learned._plan = plan
    try:
        return _ORIGINAL["topk_plan"](logits, capacity, buffer_size, bias=bias, **kwargs)
    finally:
        learned._plan = _ORIGINAL["_plan"]


def _round_unbiased(score: torch.Tensor, avail: torch.Tensor, *state_and_caps: torch.Tensor) -> Any:
    """``learned._round`` proposing each token's best eligible expert by unbiased logit (``score``)."""
    unbiased = torch.where(avail > float("-inf"), score, float("-inf"))
    (marks, *rest), accepted = _ORIGINAL["_round"](score, unbiased, *state_and_caps)
    return (torch.where(marks > float("-inf"), avail, float("-inf")), *rest), accepted


def _select_first_unbiased(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, capacity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``learned.select_and_cap`` with each token's first expert its best by unbiased logit; the other
    ``k - 1`` are the best of ``logits + expert_bias`` among the rest (caps by score as before)."""
    score = logits.detach().to(torch.float32)
    first = learned._argmax_rows(score.clamp(min=learned._F32_LOWEST)).unsqueeze(1)
    avail = learned._selection_values(logits, bias)
    avail.scatter_(1, first, float("-inf"))
    rest = learned._take_topk(avail, k - 1) if k > 1 else first[:, :0]
    selected = torch.cat([first, rest], dim=1)
    placed, load = learned.cap_by_score(score, selected, capacity)
    return score, avail, selected, placed, load


PATCHES: dict[str, dict[str, Callable[..., Any]]] = {
    "count_final": {"learned_topk": _learned_topk_count_final},
    "all_propose": {"learned_topk": _learned_topk_all},
    "cap_target": {"topk_plan": _topk_plan_keeping_capacity, "update_bias": _update_cap_target},
    "valve": {"topk_plan": _topk_plan_keeping_capacity, "update_bias": _update_valve},
    "valve90": {"topk_plan": _topk_plan_keeping_capacity, "update_bias": _valve_below(0.9)},
    "valve75": {"topk_plan": _topk_plan_keeping_capacity, "update_bias": _valve_below(0.75)},
    "share_pow0.9": {"update_bias": _share_power(0.9)},
    "share_pow1.1": {"update_bias": _share_power(1.1)},
    "proportional": {"update_bias": _update_proportional},
    "fill0.6": {"topk_plan": _topk_plan_keeping_capacity, "update_bias": _fill(0.6)},
    "fill0.65": {"topk_plan": _topk_plan_keeping_capacity, "update_bias": _fill(0.65)},
    "full_softmax_weights": {"_plan": _plan_full_softmax},
    "biased_weights": {"topk_plan": _topk_plan_biased_weights},
    "unbiased_proposals": {"_round": _round_unbiased},
    "first_unbiased": {"select_and_cap": _select_first_unbiased},
}


def _start_bias_at_log_share(router: torch.nn.Module, cfg: Any) -> None:
    """``log_share_start``: ``expert_bias = log(E * share)`` before the first step."""
    caps = cfg.caps()
    with torch.no_grad():
        router.expert_bias.copy_(torch.from_numpy(np.log(cfg.num_experts * caps / caps.sum())).to(torch.float32))


# --- cluster oracles: the assignment a router would make if it knew each token's cluster ----------------------
#
# Diagnostics for the strong profile of the regression task, not routers a user could run: each token's
# experts come from its cluster (the nearest centre of the task, which is its own cluster in practice) and
# a fixed split of the cluster, so every expert sees the same part of the same clusters from the first
# step. The gate still learns the weights of the two experts (SPEC §15, as for every router here). Slots
# over an expert's hard cap (token order) move to the expert with the most room that the token does not
# use yet, so no cap is ever exceeded. The cluster's slots are "units" of 1 / (clusters * k) of all slots:
# at the strong profile the 8x expert's share is 4.9 units (cap 6.2), a 2x expert's 1.2 (cap 1.5) and a
# 1x expert's 0.62 (cap 0.77).
ORACLES: dict[str, tuple[str, float]] = {
    "cluster_oracle5": ("whole", 5.0),  # the 8x expert takes the first slot of 5 whole clusters (its share)
    "cluster_oracle6": ("whole", 6.0),  # ... of 6 whole clusters (near its cap)
    "cluster_oracle_fragmented": ("fragmented", 5.0),  # ... 5/8 of the first slot of every cluster
}
_EPS = 1e-9


def _cut(
    segments: list[tuple[int, int, float, float]], takers: list[tuple[int, float]]
) -> dict[tuple[int, int], list[tuple[int, float, float]]]:
    """Lay ``segments`` ``(cluster, slot, lo, hi)`` end to end and give consecutive stretches of the lengths
    in ``takers`` ``(expert, length)`` to each expert: ``{(cluster, slot): [(expert, lo, hi), ...]}``."""
    table: dict[tuple[int, int], list[tuple[int, float, float]]] = {}
    queue = list(segments)
    for expert, length in takers:
        while length > _EPS and queue:
            cluster, slot, lo, hi = queue.pop(0)
            take = min(length, hi - lo)
            table.setdefault((cluster, slot), []).append((expert, lo, lo + take))
            if lo + take < hi - _EPS:
                queue.insert(0, (cluster, slot, lo + take, hi))
            length -= take
    if queue:
        raise ValueError(f"cluster oracle: {len(queue)} cluster slots left without an expert")
    return table


def oracle_table(caps: np.ndarray, clusters: int, layout: str, big_units: float) -> dict[tuple[int, int], Any]:
    """The cluster oracle's split, ``{(cluster, slot): [(expert, lo, hi), ...]}`` (``k = 2``): the largest
    expert takes ``big_units`` first slots (``layout="whole"``: whole clusters; ``"fragmented"``: the same
    share of every cluster's first slot), each 2x expert one unit, the 1x experts the rest in equal parts."""
    big = int(np.argmax(caps))
    mid = [int(e) for e in np.flatnonzero(caps == 2.0)]
    small = [int(e) for e in np.flatnonzero(caps == 1.0)]
    if caps[big] != 8.0 or len(mid) + len(small) + 1 != caps.size:
        raise ValueError("the cluster oracles are laid out for the strong profile (one 8x, 2x and 1x experts)")
    if layout == "whole":
        firsts = [(c, 0, 0.0, 1.0) for c in range(clusters)]
    else:
        part = big_units / clusters
        firsts = [(c, 0, 0.0, part) for c in range(clusters)] + [(c, 0, part, 1.0) for c in range(clusters)]
    segments = firsts + [(c, 1, 0.0, 1.0) for c in range(clusters)]
    rest = 2 * clusters - big_units - len(mid)
    takers = [(big, big_units)] + [(e, 1.0) for e in mid] + [(e, rest / len(small)) for e in small]
    return _cut(segments, takers)


class ClusterOracle(torch.nn.Module):
    """Routes by the task's clusters (see ``ORACLES``); ``inputs`` is set by the model before each call."""

    def __init__(self, cfg: Any, seed: int, layout: str, big_units: float) -> None:
        super().__init__()
        if cfg.k != 2:
            raise ValueError(f"the cluster oracles route k = 2 slots; got k = {cfg.k}")
        self.cfg = cfg
        self.centres = bt.Task(cfg, seed).centres  # train_one's task: the same generator seed
        self.table = oracle_table(cfg.caps(), cfg.clusters, layout, big_units)
        g = torch.Generator().manual_seed(40_000 + seed)  # not the global generator: the model's init is unchanged
        dirs = torch.randn(cfg.clusters, cfg.k, cfg.d_in, generator=g)
        self.dirs = dirs / dirs.norm(dim=2, keepdim=True)
        self.inputs: torch.Tensor | None = None
        self._caps: dict[int, np.ndarray] = {}  # hard caps by batch size (a MoERouter builds them)

    def forward(self, logits: torch.Tensor) -> Any:
        x = self.inputs
        if x is None or x.shape[0] != logits.shape[0]:
            raise RuntimeError("ClusterOracle: the model sets .inputs before each call")
        n_tok, k, n_exp = x.shape[0], self.cfg.k, self.cfg.num_experts
        cid = torch.cdist(x, self.centres).argmin(dim=1)
        # (x - centre) is N(0, I) around the centre: its projection on a unit direction is N(0, 1), and the
        # normal CDF of it is uniform in [0, 1): the position of the token in its cluster's split
        u = torch.special.ndtr(((x - self.centres[cid]).unsqueeze(1) * self.dirs[cid]).sum(dim=2))
        experts = torch.full((n_tok, k), -1, dtype=torch.int64)
        for (cluster, slot), pieces in self.table.items():
            rows = cid == cluster
            experts[rows, slot] = pieces[-1][0]  # the last piece ends at 1 (ndtr may round to 1.0)
            for expert, lo, hi in pieces[:-1]:
                experts[rows & (u[:, slot] >= lo) & (u[:, slot] < hi), slot] = expert
        if n_tok not in self._caps:
            self._caps[n_tok] = bt.reference_caps(self.cfg, n_tok)
        caps = self._caps[n_tok]
        flat = experts.reshape(-1)
        rank = torch.nn.functional.one_hot(flat, n_exp).cumsum(dim=0).gather(1, flat.unsqueeze(1)).squeeze(1) - 1
        load = np.minimum(np.bincount(flat.numpy(), minlength=n_exp), caps)
        for i in torch.nonzero(rank >= torch.from_numpy(caps)[flat]).flatten().tolist():
            room = caps - load
            room[experts[i // k].numpy()] = 0
            best = int(np.argmax(room))
            flat[i] = best if room[best] > 0 else -1
            load[best] += room[best] > 0
        return RoutingPlan.from_experts(experts, caps, logits)


@contextmanager
def _cluster_oracle(variant: str) -> Iterator[None]:
    """While on: ``bench_training`` routes ``"variant"`` by the cluster oracle ``variant`` (the model hands
    its input to the router before each call)."""
    original_make, original_model = bt.make_router, bt.MoEModel
    layout, big_units = ORACLES[variant]

    class Model(original_model):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> Any:
            self.router.inputs = x
            return super().forward(x)

    def make(name: str, cfg: Any, seed: int) -> torch.nn.Module:
        return ClusterOracle(cfg, seed, layout, big_units) if name == "variant" else original_make(name, cfg, seed)

    bt.make_router, bt.MoEModel = make, Model
    try:
        yield
    finally:
        bt.make_router, bt.MoEModel = original_make, original_model


@contextmanager
def patched(variant: str) -> Iterator[dict[str, Any]]:
    """The ``MoERouter`` options of ``variant``, with its replacement functions in place meanwhile."""
    for name, fn in PATCHES.get(variant, {}).items():
        setattr(learned, name, fn)
    try:
        yield dict(OPTIONS.get(variant, {}))
    finally:
        for name, fn in _ORIGINAL.items():
            setattr(learned, name, fn)


@contextmanager
def _log_share_start(on: bool) -> Iterator[None]:
    """While ``on``: ``bench_training.make_router`` starts the bias at ``log(E * share)``."""
    original = bt.make_router

    def make(name: str, cfg: Any, seed: int) -> torch.nn.Module:
        router = original(name, cfg, seed)
        _start_bias_at_log_share(router, cfg)
        return router

    if on:
        bt.make_router = make
    try:
        yield
    finally:
        bt.make_router = original


def _rounds(rounds: int | None) -> dict[str, Any]:
    return {} if rounds is None else {"reroute_rounds": rounds}


def run_training(
    profile: str,
    variants: list[str],
    seeds: list[int],
    steps: int,
    rounds: int | None = None,
    k: int | None = None,
) -> dict[str, Any]:
    """``bench_training.train_one`` for every variant and seed; per-seed final/eval loss and served share.

    ``rounds``: the reroute rounds of every variant that does not set its own (None: the default);
    ``k``: slots per token of every router (None: the profile's).
    """
    cfg = replace(bt.profile_config(profile), seeds=seeds, steps=steps)
    if k is not None:
        cfg = replace(cfg, k=k)
    out: dict[str, Any] = {"profile": profile, "seeds": seeds, "steps": steps, "rounds": rounds, "k": cfg.k}
    out["load_start"] = os.getloadavg()
    out["runs"] = {}
    for name in variants:
        t0 = time.perf_counter()
        if name in BASELINES:
            runs = [bt.train_one(cfg, name, s) for s in seeds]
        elif name in ORACLES:
            with _cluster_oracle(name):
                runs = [bt.train_one(cfg, "variant", s) for s in seeds]
        else:
            base_name = "default" if name in ("bias_nocaps", "log_share_start") else name
            with patched(base_name) as opts, _log_share_start(name == "log_share_start"):
                base = {"method": "topk", "balance": "bias", "overflow": "reroute", **_rounds(rounds)}
                bt.ROUTER_OPTIONS["variant"] = base | opts
                run_cfg = replace(cfg, capacity_factor=NOCAPS_FACTOR) if name == "bias_nocaps" else cfg
                runs = [bt.train_one(run_cfg, "variant", s) for s in seeds]
        keys = ("final_loss", "eval_loss", "served_mean", "served_min", "load_max", "expert_bias")
        out["runs"][name] = [{key: r[key] for key in keys} for r in runs]
        print(f"{profile} {name:<12} {time.perf_counter() - t0:5.0f} s  " + _cells(out, name), flush=True)
    out["load_end"] = os.getloadavg()
    return out


def _cells(out: dict[str, Any], name: str) -> str:
    runs = out["runs"][name]
    final = [r["final_loss"] for r in runs]
    text = f"final loss {np.mean(final):.4f} ({', '.join(f'{v:.4f}' for v in final)})"
    if "nocaps" in out["runs"]:
        text += f"  x no caps {np.mean(final) / np.mean([r['final_loss'] for r in out['runs']['nocaps']]):.2f}"
    served = 100 * np.mean([r["served_mean"] for r in runs])
    return text + f"  served {served:.3f} % (worst step {100 * min(r['served_min'] for r in runs):.2f} %)"


BOOTSTRAP = 5000  # resamples of the seeds for the ratio's interval


def ratio_interval(losses: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, float]:
    """``(ratio of the means, 5th and 95th percentile of it over seeds resampled in pairs, median of
    the per-seed ratios)`` of final losses ``losses[i]`` against the reference's ``ref[i]`` (the
    same seed ``i``): the spread of "× no caps" across draws of the seeds."""
    losses, ref = np.asarray(losses, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    pick = np.random.default_rng(0).integers(0, losses.size, size=(BOOTSTRAP, losses.size))
    lo, hi = np.percentile(losses[pick].mean(axis=1) / ref[pick].mean(axis=1), [5, 95])
    return float(losses.mean() / ref.mean()), float(lo), float(hi), float(np.median(losses / ref))


def table(out: dict[str, Any]) -> str:
    """Markdown: one row per variant, means over the seeds; "× no caps" is the ratio of the mean
    final losses, with a 90 % bootstrap interval over the seeds (paired with the reference's seeds)
    and the median of the per-seed ratios."""
    ref = np.array([r["final_loss"] for r in out["runs"]["nocaps"]]) if "nocaps" in out["runs"] else None
    lines = [
        "| variant | slots served, mean (worst step) | final loss | × no caps [90 % interval] | median per-seed ratio "
        "| eval loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in out["runs"].items():
        final = np.array([r["final_loss"] for r in runs])
        ratio, median = "–", "–"
        if ref is not None and ref.size == final.size:
            mean, lo, hi, mid = ratio_interval(final, ref)
            ratio, median = f"{mean:.2f} [{lo:.2f}, {hi:.2f}]", f"{mid:.2f}"
        lines.append(
            f"| {name} | {100 * np.mean([r['served_mean'] for r in runs]):.2f} % "
            f"({100 * min(r['served_min'] for r in runs):.2f} %) | {final.mean():.4f} | {ratio} | {median} | "
            f"{np.mean([r['eval_loss'] for r in runs]):.4f} |"
        )
    return "\n".join(lines)


def run_char_lm(
    variants: list[str],
    out: str,
    rounds: int | None = None,
    seeds: list[int] | None = None,
    reference: str | None = None,
) -> None:
    """``bench_char_lm`` (both profiles; seeds ``0 .. n-1``, default 3) with the default router
    replaced by each variant; ``reference``: a ``char_lm`` JSON whose no-caps runs pair with the
    variant's seeds in the seed table."""
    import bench_char_lm as bc

    extra: list[str] = []
    if seeds is not None:
        if seeds != list(range(len(seeds))):
            raise ValueError(f"seeds: the char-LM task runs seeds 0 .. n-1; got {seeds}")
        extra += ["--seeds", str(len(seeds))]
    if reference:
        extra += ["--reference", reference]

    refused = not_run("char_lm", "strong", None)  # the char LM runs both profiles; the set is the same
    for name in variants:
        if name in refused:
            raise ValueError(f"variant {name!r} is not run on the char LM")
        with patched(name) as opts:
            saved = bc.ROUTER_OPTIONS["default"]
            bc.ROUTER_OPTIONS["default"] = saved | _rounds(rounds) | opts
            try:
                bc.main(["--routers", "default", "--tag", f"variant_{name}", "--out", out, *extra])
            finally:
                bc.ROUTER_OPTIONS["default"] = saved


def not_run(task: str, profile: str, k: int | None) -> dict[str, str]:
    """The variants that ``task`` at ``profile`` with ``k`` slots (None: the profile's) does not run,
    with the reason: the char LM runs neither the baselines nor ``bias_nocaps`` (it has its own
    no-caps reference) nor the cluster oracles, which route the regression task's strong profile, k = 2."""
    if task == "char_lm":
        why = "the char LM runs the default router's variants only"
        return {v: why for v in [*BASELINES, "bias_nocaps", *ORACLES]}
    if profile != "strong" or k not in (None, 2):
        return dict.fromkeys(ORACLES, "the cluster oracles route the strong profile with k = 2")
    return {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--task", choices=["training", "char_lm"], default="training")
    ap.add_argument("--profile", choices=bt.PROFILES, default="strong")
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=BASELINES + VARIANTS,
        help="default: every variant the task and profile run (the cluster oracles: strong profile, k = 2)",
    )
    ap.add_argument(
        "--seeds", nargs="+", type=_args.nonnegative_int, default=[0, 1, 2], help="model seeds (char LM: 0 .. n-1)"
    )
    ap.add_argument("--steps", type=_args.positive_int, default=300)
    ap.add_argument(
        "--rounds", type=_args.nonnegative_int, help="reroute rounds of every variant (default: MoERouter's)"
    )
    ap.add_argument(
        "--k", type=_args.positive_int, help="regression task: slots per token of every router (default: 2)"
    )
    ap.add_argument("--json", help="write the per-seed results here (regression task)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument(
        "--reference",
        type=_args.existing_file,
        help="char LM: a char_lm JSON whose no-caps runs the seed table pairs with",
    )
    args = ap.parse_args(argv)
    if args.task == "char_lm" and args.seeds != list(range(len(args.seeds))):
        ap.error(f"argument --seeds: the char-LM task runs seeds 0 .. n-1; got {args.seeds}")
    if args.k is not None and args.k > (n_exp := bt.profile_config(args.profile).num_experts):
        ap.error(f"argument --k: at most the {n_exp} experts of profile {args.profile!r}; got {args.k}")
    not_here = not_run(args.task, args.profile, args.k)
    if args.variants is None:
        args.variants = [v for v in BASELINES + VARIANTS if v not in not_here]
    elif bad := [v for v in args.variants if v in not_here]:
        ap.error(f"argument --variants: {bad} do not run here ({not_here[bad[0]]})")
    import numba

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    if args.task == "char_lm":
        run_char_lm(args.variants, args.out, args.rounds, args.seeds, args.reference)
    else:
        out = run_training(args.profile, args.variants, args.seeds, args.steps, args.rounds, args.k)
        print("\n" + table(out))
        if args.json:
            from bench_cpu import cpu_info

            Path(args.json).write_text(json.dumps({**out, "machine": cpu_info()}))
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
