"""Learned routing with capacity targets (SPEC §16): selection, caps by score, rerouting rounds, the
bias update, auxiliary losses, expert choice and eval mode, against plain loop oracles written from
SPEC §16; the plan contract of SPEC §15 for every method; a two-process gloo bias sum."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="torch not installed: gpu_phase_router.torch not exercised")

from gpu_phase_router.torch import (  # noqa: E402
    MoERouter,
    learned,  # noqa: E402
    router_methods,
)

pytestmark = pytest.mark.torch

FLT_MAX = float(np.finfo(np.float32).max)


# --- the oracle: SPEC §16 written as loops -------------------------------------------------------------


def f32(x: float) -> float:
    return float(np.float32(x))


def oracle_caps(caps: list[float], n_tok: int, k: int, h: float) -> list[int]:
    total = sum(caps)  # small binary fractions: every summation order is exact
    return [0 if c == 0 else max(1, math.ceil(c / total * n_tok * k * h)) for c in caps]


def oracle_select(v_row: list[float], k: int) -> list[int]:
    """The k largest values, descending, ties to the lower index."""
    return sorted(range(len(v_row)), key=lambda e: (-v_row[e], e))[:k]


def oracle_learned(logits, bias, k, capacity, rounds):
    """(selected, experts, placed, per-round accepted experts, slot, loads) of SPEC §16."""
    n_tok, n_exp = len(logits), len(logits[0])
    g = [[f32(x) for x in row] for row in logits]
    b = [0.0] * n_exp if bias is None else [f32(x) for x in bias]
    v = [[max(f32(g[t][e] + b[e]), -FLT_MAX) for e in range(n_exp)] for t in range(n_tok)]
    selected = [oracle_select(v[t], k) for t in range(n_tok)]
    placed = [[False] * k for _ in range(n_tok)]
    experts = [list(row) for row in selected]
    load = [0] * n_exp
    for e in range(n_exp):
        slots = [(t, s) for t in range(n_tok) for s in range(k) if selected[t][s] == e]
        slots.sort(key=lambda ts: (-g[ts[0]][e], ts[0] * k + ts[1]))
        for t, s in slots[: capacity[e]]:
            placed[t][s] = True
            load[e] += 1
    trace = []
    for _ in range(rounds):
        room = [capacity[e] - load[e] for e in range(n_exp)]
        proposals = {}  # expert -> [(t, s)]
        for t in range(n_tok):
            unplaced = [s for s in range(k) if not placed[t][s]]
            if not unplaced:
                continue
            using = {experts[t][s] for s in range(k) if placed[t][s]}
            eligible = [e for e in range(n_exp) if room[e] > 0 and e not in using]
            if not eligible:
                continue
            best = oracle_select([v[t][e] if e in eligible else -math.inf for e in range(n_exp)], 1)[0]
            proposals.setdefault(best, []).append((t, unplaced[0]))
        accepted = [-1] * n_tok
        for e, props in proposals.items():
            props.sort(key=lambda ts: (-g[ts[0]][e], ts[0]))
            for t, s in props[: room[e]]:
                experts[t][s] = e
                placed[t][s] = True
                load[e] += 1
                accepted[t] = e
        trace.append(accepted)
    slot = [[-1] * k for _ in range(n_tok)]
    seen = [0] * n_exp
    for t in range(n_tok):
        for s in range(k):
            if placed[t][s]:
                slot[t][s] = seen[experts[t][s]]
                seen[experts[t][s]] += 1
    return selected, experts, placed, trace, slot, load


def oracle_bias(bias, selected_per_rank, n_tok_per_rank, k, caps, rate):
    """SPEC §16 bias update with routed counts and T summed over the ranks."""
    n_exp = len(caps)
    routed = [0] * n_exp
    for selected in selected_per_rank:
        for row in selected:
            for e in row:
                routed[e] += 1
    total_t = sum(n_tok_per_rank)
    total = sum(caps)
    out = []
    for e in range(n_exp):
        target = (k * total_t) * (caps[e] / total)
        sign = (target > routed[e]) - (target < routed[e])
        out.append(float(np.float32(np.float32(bias[e]) + np.float32(rate) * np.float32(sign))))
    return out


def oracle_expert_choice(logits, capacity):
    n_tok, n_exp = len(logits), len(logits[0])
    experts = [[-1] * n_exp for _ in range(n_tok)]
    for e in range(n_exp):
        order = sorted(range(n_tok), key=lambda t: (-f32(logits[t][e]), t))
        for t in order[: min(capacity[e], n_tok)]:
            experts[t][e] = e
    slot = [[-1] * n_exp for _ in range(n_tok)]
    for e in range(n_exp):
        pos = 0
        for t in range(n_tok):
            if experts[t][e] == e:
                slot[t][e] = pos
                pos += 1
    return experts, slot


def check_plan_contract(plan) -> None:
    """SPEC §15: kept slots have distinct positions below their expert's cap, loads count them,
    weights are 0 off the kept slots and sum to 1 over a row's kept slots."""
    kept = plan.slot >= 0
    experts = plan.experts[kept]
    assert (plan.slot[kept] < plan.capacity[experts]).all()
    pairs = set(zip(experts.tolist(), plan.slot[kept].tolist(), strict=True))
    assert len(pairs) == int(kept.sum())
    assert torch.equal(torch.bincount(experts, minlength=plan.num_experts), plan.tokens_per_expert)
    assert (plan.tokens_per_expert <= plan.capacity).all()
    assert (plan.weights[~kept] == 0).all()
    rows = kept.any(dim=1)
    sums = plan.weights.float().sum(dim=1)
    assert torch.allclose(sums[rows], torch.ones_like(sums[rows]), atol=1e-2)


# --- SPEC §16 test vectors -----------------------------------------------------------------------------

VECTOR_LOGITS = [[3, 1.5, 0], [5, 1, 0], [2.5, 1.8, 0], [4, 2, 0], [0, 3, 1], [1, 2, 3]]


def test_spec_vector_caps_by_score_and_two_rounds():
    router = MoERouter(3, 1, [1, 1, 1], balance=None, capacity_factor=1.0)
    logits = torch.tensor(VECTOR_LOGITS)
    plan = router(logits)
    assert plan.capacity.tolist() == [2, 2, 2]
    assert plan.experts.tolist() == [[2], [0], [1], [0], [1], [2]]
    assert plan.slot.tolist() == [[0], [0], [0], [1], [1], [1]]
    assert plan.tokens_per_expert.tolist() == [2, 2, 2]
    trace: list[torch.Tensor] = []
    learned.learned_topk(logits, None, 1, plan.capacity, 2, trace)
    assert [r.tolist() for r in trace] == [[-1, -1, 1, -1, -1, -1], [2, -1, -1, -1, -1, -1]]
    one = MoERouter(3, 1, [1, 1, 1], balance=None, capacity_factor=1.0, reroute_rounds=1)(logits)
    assert one.experts.tolist() == [[0], [0], [1], [0], [1], [2]] and one.slot[0].tolist() == [-1]
    assert one.tokens_per_expert.tolist() == [2, 2, 1]
    drop = MoERouter(3, 1, [1, 1, 1], balance=None, overflow="drop", capacity_factor=1.0)(logits)
    assert drop.experts.tolist() == [[0], [0], [0], [0], [1], [2]]
    assert drop.slot.tolist() == [[-1], [0], [-1], [1], [0], [0]]
    assert drop.tokens_per_expert.tolist() == [2, 1, 1]


def test_spec_vector_ties():
    plan = MoERouter(2, 1, [1, 1], balance=None, capacity_factor=0.5)(torch.zeros(2, 2))
    assert plan.experts.tolist() == [[0], [1]] and plan.slot.tolist() == [[0], [0]]
    assert learned.select_topk(torch.zeros(2, 4), 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    # -0.0 equals +0.0; -inf counts as the lowest float and is still chosen before nothing
    row = torch.tensor([[-math.inf, 0.0, -0.0, -math.inf]])
    assert learned.select_topk(row, 4).tolist() == [[1, 2, 0, 3]]


def test_spec_vector_bias_update():
    router = MoERouter(3, 1, [2, 1, 1])
    logits = torch.tensor([[1, 0, 0], [2, 0, 0], [1, 0.5, 0], [0, 1, 0]], dtype=torch.float32)
    r = np.float32(0.01)
    router(logits)
    assert router.expert_bias.tolist() == [float(-r), 0.0, float(r)]
    router(logits)
    assert router.expert_bias.tolist() == [float(-r - r), 0.0, float(r + r)]
    router.eval()
    router(logits)
    assert router.expert_bias.tolist() == [float(-r - r), 0.0, float(r + r)]


def test_spec_vector_aux_losses():
    router = MoERouter(2, 1, [3, 1], balance="aux")
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)
    plan = router(logits)
    assert plan.aux_loss is not None and plan.z_loss is not None
    assert plan.aux_loss.shape == () and plan.aux_loss.dtype == torch.float32
    assert math.isclose(float(plan.aux_loss.detach()), 5 / 6, rel_tol=1e-6)
    assert math.isclose(float(plan.z_loss.detach()), 2.5 * math.log(2) ** 2, rel_tol=1e-6)
    (plan.aux_loss + plan.z_loss).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert router.expert_bias.tolist() == [0.0, 0.0]  # balance="aux" keeps no bias
    for balance in ("bias", None):
        other = MoERouter(2, 1, [3, 1], balance=balance)(logits)
        assert other.aux_loss is None and other.z_loss is None


def test_spec_vector_expert_choice():
    router = MoERouter(2, 1, [1, 1], method="expert_choice", capacity_factor=1.0)
    plan = router(torch.tensor([[1.0, 0.0], [3.0, 3.0], [2.0, 3.0], [0.0, 3.0]]))
    assert plan.experts.tolist() == [[-1, -1], [0, 1], [0, 1], [-1, -1]]
    assert plan.slot.tolist() == [[-1, -1], [0, 0], [1, 1], [-1, -1]]
    assert plan.tokens_per_expert.tolist() == [2, 2]
    e = math.e
    expected = [[0, 0], [0.5, 0.5], [1 / (1 + e), e / (1 + e)], [0, 0]]
    assert np.allclose(plan.weights.numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="expert_choice"):
        router(num_tokens=4)


# --- against the oracle ------------------------------------------------------------------------------


def _logit_rows(data, n_tok, n_exp):
    """Small integers and halves: many exact ties, the case the tie rules exist for."""
    values = st.sampled_from([-2.0, -1.0, -0.5, 0.0, -0.0, 0.5, 1.0, 2.0, 3.0])
    return data.draw(
        st.lists(st.lists(values, min_size=n_exp, max_size=n_exp), min_size=n_tok, max_size=n_tok), label="logits"
    )


def test_argmax_rows_equals_torch_argmax_with_ties_nan_and_infinities(monkeypatch):
    """The CPU's NumPy argmax gives torch.argmax's indices: the first maximum, NaN as the maximum."""
    gen = torch.Generator().manual_seed(3)
    nan, inf = float("nan"), float("inf")
    for trial in range(300):
        n, m = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 70, (1,), generator=gen))
        x = torch.randn(n, m, generator=gen)
        r = torch.rand(n, m, generator=gen)
        x[r < 0.05], x[(r >= 0.05) & (r < 0.15)], x[(r >= 0.15) & (r < 0.2)] = nan, -inf, inf
        if trial % 3 == 0:
            x = x.round()  # ties
        if trial % 4 == 0:
            x[(r >= 0.2) & (r < 0.5)] = -0.0 if trial % 8 else 0.0
        if trial % 7 == 0:
            x[::2] = -inf  # rows with no finite value
        want = x.argmax(dim=1)
        got = learned._argmax_rows(x)
        assert got.dtype == torch.int64 and torch.equal(got, want)
    monkeypatch.setattr(learned, "NUMPY_ARGMAX_ON_CPU", False)
    assert torch.equal(learned._argmax_rows(x), x.argmax(dim=1))


def test_compact_rounds_stop_once_no_token_can_propose():
    """Skewed logits overflow the first experts, and a tenth of the slots cannot be placed at all
    (capacity factor 0.9): the CPU rounds stop once no token with an unplaced slot has an eligible
    expert, however many rounds are asked for, with the plan of as many rounds as they ran."""
    logits = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) + torch.linspace(2, 0, 16)
    capacity = torch.tensor(oracle_caps([1.0] * 16, 512, 2, 0.9))
    trace: list[torch.Tensor] = []
    _, experts, placed = learned.learned_topk(logits, None, 2, capacity, 5000, trace)
    assert placed.sum().item() == capacity.sum().item() < 1024  # every expert full, the rest unplaced
    assert 2 <= len(trace) <= 512 * 2 + 16  # at most one round per accepted slot or filled expert
    again = learned.learned_topk(logits, None, 2, capacity, len(trace))
    assert torch.equal(again[1], experts) and torch.equal(again[2], placed)


@settings(max_examples=80, deadline=None)
@given(
    n_tok=st.integers(1, 24),
    caps=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
    h=st.sampled_from([0.25, 0.5, 1.0, 1.25]),
    rounds=st.sampled_from([0, 1, 2, 3, 40]),  # 40: past the last round that can change anything
    compact=st.booleans(),
    numpy_argmax=st.booleans(),
    data=st.data(),
)
def test_learned_topk_equals_oracle(n_tok, caps, h, rounds, compact, numpy_argmax, data):
    n_exp = len(caps)
    k = data.draw(st.integers(1, n_exp), label="k")
    logits = _logit_rows(data, n_tok, n_exp)
    bias = data.draw(st.lists(st.sampled_from([-0.5, 0.0, 0.25, 1.0]), min_size=n_exp, max_size=n_exp), label="b")
    capacity = oracle_caps(caps, n_tok, k, h)
    trace: list[torch.Tensor] = []
    lg = torch.tensor(logits, dtype=torch.float32)
    saved = learned.COMPACT_ON_CPU, learned.NUMPY_ARGMAX_ON_CPU
    learned.COMPACT_ON_CPU, learned.NUMPY_ARGMAX_ON_CPU = compact, numpy_argmax
    try:
        selected, experts, placed = learned.learned_topk(
            lg, torch.tensor(bias, dtype=torch.float32), k, torch.tensor(capacity), rounds, trace
        )
    finally:
        learned.COMPACT_ON_CPU, learned.NUMPY_ARGMAX_ON_CPU = saved
    o_sel, o_exp, o_placed, o_trace, o_slot, o_load = oracle_learned(logits, bias, k, capacity, rounds)
    assert selected.tolist() == o_sel
    assert experts.tolist() == o_exp
    assert placed.tolist() == o_placed
    # every round's acceptances (the compact CPU path stops early once no token can propose)
    got = [r.tolist() for r in trace]
    assert got == o_trace[: len(got)] and all(r == [-1] * n_tok for r in o_trace[len(got) :])
    # through the router: the same routes, SPEC §15 slots on them, never over a cap
    router = MoERouter(n_exp, k, caps, capacity_factor=h, reroute_rounds=rounds, overflow="reroute").eval()
    router.expert_bias.copy_(torch.tensor(bias))
    plan = router(lg)
    assert plan.capacity.tolist() == capacity
    assert plan.experts.tolist() == o_exp and plan.slot.tolist() == o_slot
    assert plan.tokens_per_expert.tolist() == o_load
    assert all(load <= cap for load, cap in zip(o_load, capacity, strict=True))
    check_plan_contract(plan)


def test_random_batches_equal_oracle_and_reroute_serves_more():
    gen = torch.Generator().manual_seed(3)
    caps = [1.0] * 4 + [0.5] * 4
    for step in range(4):
        logits = torch.randn(200, 8, generator=gen) * 2 + torch.linspace(0, 3, 8)  # skewed: many drops
        for rounds in (0, 2):
            router = MoERouter(8, 2, caps, reroute_rounds=rounds, balance=None, capacity_factor=1.0)
            plan = router(logits)
            *_, o_slot, o_load = oracle_learned(logits.tolist(), None, 2, plan.capacity.tolist(), rounds)
            assert plan.slot.tolist() == o_slot and plan.tokens_per_expert.tolist() == o_load
            check_plan_contract(plan)
        drop = MoERouter(8, 2, caps, overflow="drop", balance=None, capacity_factor=1.0)(logits)
        assert int(plan.tokens_per_expert.sum()) > int(drop.tokens_per_expert.sum()), step


def test_drops_follow_score_not_position():
    """One over-full expert: the kept slots are its highest scores wherever they sit in the batch."""
    logits = torch.zeros(10, 2)
    logits[:, 0] = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 1.0]) + 5
    router = MoERouter(2, 1, [1, 0], balance=None, overflow="drop", capacity_factor=0.4)  # cap of expert 0: 4
    plan = router(logits)
    assert plan.capacity.tolist() == [4, 0]
    assert plan.kept[:, 0].nonzero().flatten().tolist() == [1, 3, 5, 9]  # scores 1.0, 0.9, 0.8, 0.7
    assert plan.slot[:, 0].tolist() == [-1, 0, -1, 1, -1, 2, -1, -1, -1, 3]


# --- the bias -----------------------------------------------------------------------------------------


def test_bias_direction_rate_and_convergence():
    caps = [2.0, 2.0, 1.0, 1.0]
    router = MoERouter(4, 1, caps, bias_rate=0.05)
    gen = torch.Generator().manual_seed(0)
    base = torch.tensor([1.0, 0.0, 0.0, -1.0])  # expert 0 over-selected, expert 3 under
    logits = torch.randn(300, 4, generator=gen) * 0.3 + base
    before = router.expert_bias.clone()
    plan = router(logits)
    routed = torch.bincount(learned.select_topk(logits, 1, before).flatten(), minlength=4)
    target = torch.tensor(caps) / sum(caps) * 300
    step = router.expert_bias - before
    assert torch.equal(torch.sign(step), torch.sign(target - routed.float()))
    assert torch.allclose(step.abs(), torch.full((4,), 0.05))
    assert step[0] < 0 and step[3] > 0
    served = []
    for _ in range(60):
        plan = router(logits)
        served.append(float(plan.tokens_per_expert.sum()) / 300)
    final = torch.bincount(learned.select_topk(logits, 1, router.expert_bias).flatten(), minlength=4)
    assert (final.float() - target).abs().max() <= 0.1 * 300  # selected loads near the capacity shares
    assert served[-1] == 1.0


def test_bias_state_dict_round_trip_and_modes():
    a = MoERouter(4, 2, [1, 1, 0.5, 0.5])
    logits = torch.randn(64, 4) + torch.tensor([2.0, 0, 0, 0])
    a(logits)
    assert a.expert_bias.abs().sum() > 0
    state = a.state_dict()
    assert "expert_bias" in state and state["expert_bias"].dtype == torch.float32
    b = MoERouter(4, 2, [1, 1, 0.5, 0.5])
    b.load_state_dict(state)
    assert torch.equal(b.expert_bias, a.expert_bias)
    assert torch.equal(a(logits).experts, b(logits).experts)
    assert torch.equal(a.expert_bias, b.expert_bias)
    frozen = a.expert_bias.clone()
    a.eval()
    a(logits)
    assert torch.equal(a.expert_bias, frozen)  # no update in eval mode
    still = MoERouter(4, 2, [1, 1, 0.5, 0.5], bias_rate=0.0)
    still(logits)
    assert still.expert_bias.abs().sum() == 0
    for balance in ("aux", None):
        other = MoERouter(4, 2, balance=balance)
        other(logits)
        assert other.expert_bias.abs().sum() == 0


def test_bias_device_mismatch_is_an_error():
    router = MoERouter(4, 1)
    router.expert_bias = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="expert_bias"):
        router(torch.zeros(3, 4))


_GLOO_RANK = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from gpu_phase_router.torch import MoERouter
    rank, path = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(rank)
    logits = torch.randn(40 + 24 * rank, 4, generator=gen) + torch.tensor([1.5, 0.0, 0.0, -1.0]) * rank
    router = MoERouter(4, 2, [2, 1, 1, 0.5], bias_rate=0.125, process_group=dist.group.WORLD)
    router(logits)
    print(json.dumps({"logits": logits.tolist(), "bias": router.expert_bias.tolist()}), flush=True)
    dist.destroy_process_group()
    import os
    os._exit(0)  # skip interpreter finalisation: torch's gloo threads can abort it ("terminate called ...")
    """
)


def test_router_copies_and_pickles_with_its_state():
    """``copy.deepcopy`` and a pickle round trip give a router with the same bias, step and options
    whose next training call makes the same plan and the same bias update; the copy's bias is its own."""
    import copy
    import pickle

    router = MoERouter(4, 2, [2, 1, 1, 0.5], bias_rate=0.25)
    gen = torch.Generator().manual_seed(5)
    router(torch.randn(24, 4, generator=gen))
    logits = torch.randn(24, 4, generator=gen)
    for twin in (copy.deepcopy(router), pickle.loads(pickle.dumps(router))):
        assert twin.process_group is None and torch.equal(twin.expert_bias, router.expert_bias)
        assert twin.expert_bias.data_ptr() != router.expert_bias.data_ptr()
        before = router.expert_bias.clone()
        mine, theirs = router(logits), twin(logits)
        assert torch.equal(mine.experts, theirs.experts) and torch.equal(mine.slot, theirs.slot)
        assert torch.equal(twin.expert_bias, router.expert_bias) and not torch.equal(before, router.expert_bias)
        router.expert_bias.copy_(before)  # the next twin starts from the same state


_GLOO_ONE_RANK = textwrap.dedent(
    """
    import copy, pickle, sys
    import torch
    import torch.distributed as dist
    from gpu_phase_router.torch import MoERouter
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    group = dist.group.WORLD
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), MoERouter(4, 2, [2, 1, 1, 0.5], process_group=group))
    ema = copy.deepcopy(model)  # an EMA or teacher copy shares the group
    assert ema[1].process_group is group and model[1].process_group is group
    ema[1](torch.randn(8, 4))  # a training call of the copy sums over the group
    assert not torch.equal(ema[1].expert_bias, model[1].expert_bias)  # and updates its own bias
    try:
        pickle.dumps(model)
    except TypeError as exc:
        assert "state_dict" in str(exc) and "process_group" in str(exc), exc
    else:
        raise AssertionError("pickling a router with a group did not raise")
    model[1].process_group = None  # the way out the error names
    back = pickle.loads(pickle.dumps(model))
    assert back[1].process_group is None
    back[1].process_group = group  # the setter checks like the constructor
    for bad, exc in ((object(), TypeError), (group, ValueError)):
        router = MoERouter(4, 2) if exc is TypeError else MoERouter(4, 2, balance=None)
        try:
            router.process_group = bad
        except exc as err:
            assert "process_group" in str(err), err
        else:
            raise AssertionError(f"process_group = {bad!r} was accepted")
    print("ok", flush=True)
    dist.destroy_process_group()
    import os
    os._exit(0)
    """
)


@pytest.mark.subprocess
def test_router_with_a_process_group_deep_copies_and_refuses_pickling(tmp_path, gloo):
    """A deep copy shares the group (a group copies no more than it pickles: torch's own error
    before); pickling raises a TypeError naming ``state_dict`` and ``process_group``; the
    ``process_group`` setter checks its value like the constructor."""
    proc = subprocess.run(
        [sys.executable, "-c", _GLOO_ONE_RANK, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


@pytest.mark.subprocess
def test_process_group_sums_routed_counts_over_two_gloo_ranks(tmp_path, gloo):
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GLOO_RANK, str(rank), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["bias"] == outs[1]["bias"]
    selected = [learned.select_topk(torch.tensor(o["logits"]), 2).tolist() for o in outs]
    expected = oracle_bias([0.0] * 4, selected, [len(o["logits"]) for o in outs], 2, [2, 1, 1, 0.5], 0.125)
    assert outs[0]["bias"] == expected
    alone = [oracle_bias([0.0] * 4, [sel], [len(sel)], 2, [2, 1, 1, 0.5], 0.125) for sel in selected]
    assert alone[0] != alone[1], "the ranks' own updates must differ, or the sum is not tested"


# --- expert choice, eval mode, every method --------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n_tok=st.integers(1, 20), n_exp=st.integers(1, 5), h=st.sampled_from([0.3, 1.0, 2.0]), data=st.data())
def test_expert_choice_equals_oracle(n_tok, n_exp, h, data):
    caps = data.draw(st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=n_exp, max_size=n_exp).filter(sum))
    k = data.draw(st.integers(1, n_exp))
    logits = _logit_rows(data, n_tok, n_exp)
    router = MoERouter(n_exp, k, caps, method="expert_choice", capacity_factor=h)
    plan = router(torch.tensor(logits))
    capacity = oracle_caps(caps, n_tok, k, h)
    experts, slot = oracle_expert_choice(logits, capacity)
    assert plan.experts.tolist() == experts and plan.slot.tolist() == slot
    assert plan.tokens_per_expert.tolist() == [min(c, n_tok) for c in capacity]
    check_plan_contract(plan)


def test_eval_capacity_factor():
    logits = torch.randn(50, 4) + torch.tensor([3.0, 0, 0, 0])
    router = MoERouter(4, 2, [1, 1, 1, 1], capacity_factor=1.0, eval_capacity_factor=2.0)
    assert router.hard_caps(50).tolist() == [25] * 4
    router.eval()
    assert router.hard_caps(50).tolist() == [50] * 4
    assert router(logits).capacity.tolist() == [50] * 4
    assert MoERouter(4, 2, capacity_factor=1.0).eval().hard_caps(50).tolist() == [25] * 4  # None: the same
    free = MoERouter(4, 2, [1, 1, 1, 0], balance=None, eval_capacity_factor=math.inf).eval()
    plan = free(logits)
    assert plan.capacity.tolist() == [50, 50, 50, 0]
    selected = learned.select_topk(logits, 2)
    on_zero = (selected == 3).any(dim=1)
    assert torch.equal(plan.experts[~on_zero], selected[~on_zero])  # no caps: every selection kept
    assert plan.kept.all()  # the slots on the zero-capacity expert were rerouted
    blind = MoERouter(4, 2, method="hash", eval_capacity_factor=math.inf).eval()
    assert blind.hard_caps(10).tolist() == [20] * 4


@pytest.mark.parametrize("method", router_methods())
def test_plan_contract_for_every_method(method):
    caps = [2.0, 1.0, 1.0, 0.5, 0.5, 0.0]
    router = MoERouter(6, 2, caps, method=method, capacity_factor=0.9)
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = (torch.randn(97, 6, generator=gen) * 2).to(dtype).requires_grad_()
        plan = router(logits)
        check_plan_contract(plan)
        assert plan.weights.dtype == dtype
        out = plan.combine(plan.dispatch(torch.randn(97, 3, dtype=dtype)))
        out.float().sum().backward()
        assert logits.grad is not None
        assert plan.tokens_per_expert[5] == 0  # a zero-capacity expert never receives


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"balance": "mean"}, ValueError, "balance"),
        ({"overflow": "spill"}, ValueError, "overflow"),
        ({"reroute_rounds": -1}, ValueError, "reroute_rounds"),
        ({"reroute_rounds": 1.5}, TypeError, "reroute_rounds"),
        ({"bias_rate": -0.1}, ValueError, "bias_rate"),
        ({"bias_rate": float("nan")}, ValueError, "bias_rate"),
        ({"bias_rate": "0.1"}, TypeError, "bias_rate"),
        ({"eval_capacity_factor": 0.0}, ValueError, "eval_capacity_factor"),
        ({"eval_capacity_factor": float("nan")}, ValueError, "eval_capacity_factor"),
        ({"eval_capacity_factor": "2"}, TypeError, "eval_capacity_factor"),
        ({"balance": None, "process_group": object()}, ValueError, "process_group"),
        ({"method": "phase", "balance": "aux"}, ValueError, "balance"),
        ({"method": "systematic", "overflow": "drop"}, ValueError, "overflow"),
        ({"method": "hash", "reroute_rounds": 3}, ValueError, "reroute_rounds"),
        ({"method": "weighted_hash", "bias_rate": 0.1}, ValueError, "bias_rate"),
        ({"method": "expert_choice", "balance": None}, ValueError, "balance"),
        ({"method": "expert_choice", "eval_capacity_factor": math.inf}, ValueError, "eval_capacity_factor"),
    ],
)
def test_option_errors_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        MoERouter(4, 2, **kwargs)


def test_default_is_learned_capacity_aware():
    router = MoERouter(4, 2)
    assert (router.method, router.balance, router.overflow, router.reroute_rounds) == ("topk", "bias", "reroute", 8)
    assert router.bias_rate == 1e-2 and router.eval_capacity_factor is None
    assert "balance='bias'" in repr(router)


# --- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("balance,overflow", [("bias", "reroute"), (None, "drop"), ("aux", "reroute")])
def test_cuda_learned_plan_equals_cpu_without_sync(balance, overflow):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    caps = [1.0] * 8 + [0.5] * 8
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(4096, 16, generator=gen) + torch.linspace(0, 2, 16)).round(decimals=1)  # ties
    cpu = MoERouter(16, 2, caps, balance=balance, overflow=overflow, capacity_factor=1.0)
    gpu = MoERouter(16, 2, caps, balance=balance, overflow=overflow, capacity_factor=1.0).cuda()
    dev_logits = logits.cuda().requires_grad_()
    gpu(dev_logits)  # caches the caps on the device
    gpu.expert_bias.zero_()
    torch.cuda.synchronize()
    expected = [cpu(logits) for _ in range(3)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        plans = [gpu(dev_logits) for _ in range(3)]
        out = plans[-1].combine(plans[-1].dispatch(torch.randn(4096, 8, device="cuda")))
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for plan, exp in zip(plans, expected, strict=True):
        assert torch.equal(plan.experts.cpu(), exp.experts)
        assert torch.equal(plan.slot.cpu(), exp.slot)
        assert torch.equal(plan.tokens_per_expert.cpu(), exp.tokens_per_expert)
    assert torch.equal(gpu.expert_bias.cpu(), cpu.expert_bias)
    ec_cpu = MoERouter(16, 2, caps, method="expert_choice")(logits)
    ec_gpu = MoERouter(16, 2, caps, method="expert_choice")(dev_logits)
    assert torch.equal(ec_gpu.experts.cpu(), ec_cpu.experts) and torch.equal(ec_gpu.slot.cpu(), ec_cpu.slot)
