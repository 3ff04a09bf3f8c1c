"""Learned routing with capacity targets (SPEC §16): top-k with a capacity bias, score-based caps,
room-aware overflow rerouting, expert choice, and the capacity-targeted auxiliary losses.

Every integer decision (experts, kept slots, reroutes, bias updates) compares float32 values with
an explicit tie rule (the lower expert or token index): selection by first-index argmax passes,
sorts by an integer key that orders float32 values (:func:`order_key`), so the same logits give the
same plan on every device. The work is torch operations with shapes fixed by ``T``, ``E``, ``k``
and the number of rounds, with nothing read back to the host; only on the CPU do the rerouting
rounds look at the tokens that can still propose and stop without one (``COMPACT_ON_CPU``; same
result; not under ``torch.compile``), and the argmax passes run through NumPy (:func:`_argmax_rows`; same
indices).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np
import torch

from ._plan import RoutingPlan, _plan

LEARNED_METHODS = ("topk", "expert_choice")
BALANCES = ("bias", "aux", None)
OVERFLOWS = ("reroute", "drop")

_I32_MAX = 2**31 - 1
_SHIFT = 32
#: the CPU rounds work on the tokens with an unplaced slot only (a host read, harmless on the CPU);
#: tests turn it off to check the fixed-shape path that CUDA runs
COMPACT_ON_CPU = True
#: eager CPU argmax passes go through NumPy (same indices, faster); tests turn it off with
#: ``COMPACT_ON_CPU`` to check that the torch path reads nothing back to the host
NUMPY_ARGMAX_ON_CPU = True
_F32_LOWEST = float(torch.finfo(torch.float32).min)


def order_key(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of float32 values (SPEC §16): ``a < b`` as floats iff ``key(a) < key(b)``.

    ``-0.0`` is first made ``+0.0`` (``x + 0.0``), so equal values get equal keys. Every bit pattern,
    NaN included, gets a key (a NaN with the sign bit clear sorts above ``+inf``, one with it set
    below ``-inf``), so the order is total and device independent.

    Args:
        values: float tensor, any shape (converted to float32: float64 is rounded to nearest).

    Returns:
        int64 tensor of the same shape, in ``[-2^31, 2^31)``.
    """
    bits = (values.to(torch.float32) + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & _I32_MAX)).to(torch.int64)


def _rank_in_group(group: torch.Tensor, score: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rank of each element within its group, by descending score, ties to the lower position.

    Args:
        group: int64 ``[n]`` in ``[0, n_groups]`` (``n_groups`` = "no group").
        score: float ``[n]`` scores (compared as float32 through :func:`order_key`).
        n_groups: number of real groups.

    Returns:
        int64 ``[n]``: how many elements of the same group come first in the order (score
        descending, position ascending).
    """
    n = group.shape[0]
    dev = group.device
    composite = (group << _SHIFT) + (_I32_MAX - order_key(score))  # second part in [0, 2^32)
    sorted_key, order = torch.sort(composite, stable=True)
    sorted_group = sorted_key >> _SHIFT
    start = torch.searchsorted(sorted_group, torch.arange(n_groups + 1, device=dev, dtype=torch.int64))
    rank_sorted = torch.arange(n, device=dev, dtype=torch.int64) - start.index_select(0, sorted_group)
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)


def _counts(index: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """int64 ``[size]`` sums of ``weights`` per ``index`` (no ``bincount``: it synchronises on CUDA)."""
    return torch.zeros(size, dtype=torch.int64, device=index.device).index_add_(0, index, weights.to(torch.int64))


def _selection_values(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[T, E]`` ``float32(logits) + bias`` with ``-inf`` raised to ``-FLT_MAX`` (a new
    tensor): every real value then ranks above the ``-inf`` that marks an expert out of reach."""
    work = logits.detach().to(torch.float32)
    work = work + bias.to(torch.float32) if bias is not None else work.clone()
    return work.clamp_(min=_F32_LOWEST)


def _argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: each row's ``x.argmax(dim=1)`` of a float32 ``[n, m]`` tensor — the first
    maximal index, a NaN counting as the maximum (its first one), as on every device.

    Eager on the CPU through ``np.argmax`` (same indices, NaN and ties included), whose vectorised
    loop takes about a third of torch's time at ``[16384, 64]`` (0.7 against 2.0 ms, one thread,
    2-core Zen 3); the selection makes ``k`` such passes per forward. A tensor without storage
    (wrapped by a ``torch.func`` transform) goes through torch.
    """
    if (
        NUMPY_ARGMAX_ON_CPU
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
    ):
        try:
            values = x.detach().numpy()
        except RuntimeError:  # no storage to share (torch.func.grad, vmap, ...)
            pass
        else:
            return torch.from_numpy(np.argmax(values, axis=1).astype(np.int64, copy=False))
    return x.argmax(dim=1)


def _take_topk(work: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ``[T, k]``: ``k`` argmax passes over ``work``, each pick set to ``-inf`` in place.

    ``torch.argmax`` returns the first maximal index on every device, so ties go to the lower
    column; ``work`` holds no ``-inf`` before (``_selection_values``), so a pick is never repeated.
    """
    picks = []
    for _ in range(k):
        best = _argmax_rows(work).unsqueeze(1)
        work.scatter_(1, best, float("-inf"))
        picks.append(best)
    return torch.cat(picks, dim=1)


def select_topk(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[T, k]``: each row's ``k`` largest ``float32(logits) + bias``, descending, ties to the
    lower column (SPEC §16 "selection").

    Args:
        logits: float ``[T, E]``.
        k: ``1 <= k <= E``.
        bias: optional float32 ``[E]``.
    """
    return _take_topk(_selection_values(logits, bias), k)


def select_and_cap(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, capacity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §16 "selection" and "caps by score", before any rerouting round.

    Returns:
        ``(score, avail, selected, placed, load)``: float32 ``[T, E]`` gate scores (the unbiased
        logits); float32 ``[T, E]`` selection values, ``-inf`` at the selected experts; int64
        ``[T, k]`` the biased top-k; bool ``[T, k]`` the slots each expert keeps (its
        ``capacity[e]`` highest-scoring); int64 ``[E]`` the kept slots per expert.
    """
    score = logits.detach().to(torch.float32)  # [T, E] the gate score of (token, expert): the unbiased logit
    avail = _selection_values(logits, bias)
    selected = _take_topk(avail, k)  # [T, k]; avail is now -inf at the selected experts
    placed, load = cap_by_score(score, selected, capacity)
    return score, avail, selected, placed, load


def cap_by_score(
    score: torch.Tensor, selected: torch.Tensor, capacity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §16 "caps by score": bool ``[T, k]`` the slots of ``selected`` (int64 ``[T, k]``) each
    expert keeps, its ``capacity[e]`` highest by ``score`` (float32 ``[T, E]``), and int64 ``[E]``
    the kept slots per expert."""
    n_tok, k = selected.shape
    n_exp = score.shape[1]
    flat = selected.reshape(-1)
    rank = _rank_in_group(flat, score.gather(1, selected).reshape(-1), n_exp)
    placed = (rank < capacity.index_select(0, flat)).view(n_tok, k)
    load = torch.minimum(_counts(flat, torch.ones_like(flat), n_exp), capacity)
    return placed, load


def learned_topk(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    capacity: torch.Tensor,
    rounds: int,
    trace: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Biased top-k selection, score-based caps and room-aware rerouting (SPEC §16).

    Args:
        logits: ``[T, E]`` float router logits (any device).
        bias: float32 ``[E]`` selection bias on the logits' device, or ``None`` (no bias).
        k: slots per token, ``1 <= k <= E``.
        capacity: int64 ``[E]`` hard caps on the logits' device.
        rounds: rerouting rounds ``>= 0`` (0 = ``overflow="drop"``).
        trace: if a list, each round's int64 ``[T]`` accepted expert per token (``-1`` for none)
            is appended (for tests).

    Returns:
        ``(selected, experts, placed)``: int64 ``[T, k]`` the biased top-k selection (the bias
        update counts these), int64 ``[T, k]`` each slot's final expert (the rerouted one where a
        round placed it, else the selected one), bool ``[T, k]`` the slots that reach an expert.
    """
    n_tok, n_exp = logits.shape
    dev = logits.device
    score, avail, selected, placed, load = select_and_cap(logits, bias, k, capacity)
    if rounds == 0:
        return selected, selected, placed

    # rounds: avail is -inf where the token already uses the expert (a selected expert that
    # dropped the slot is full, so it is out of reach either way) or the expert has no room.
    # Eager on the CPU the rounds look at the tokens that can propose (an unplaced slot, an
    # eligible expert) only and stop when there are none (a host read, harmless there); compiled on
    # the CPU a round runs only while a slot is unplaced (torch.cond); elsewhere every round looks
    # at every token, with fixed shapes and no host read. All give the same plan: a round in which
    # no token proposes changes nothing, then or later.
    cap_ext = torch.cat([capacity, capacity.new_zeros(1)])
    experts = selected.clone()
    state = (avail, experts, placed, load)
    compiling = torch.compiler.is_compiling()
    for _ in range(rounds):
        if dev.type == "cpu" and COMPACT_ON_CPU and not compiling:
            # the tokens that propose: an unplaced slot and an eligible expert (room only shrinks,
            # so a round in which no token proposes leaves every later round the same: stop)
            # (the tokens with an unplaced slot first, from the [T, k] mask: the eligibility test
            # reads [T, E] values, and only those tokens' rows are read)
            pending = (~state[2]).any(dim=1).nonzero().squeeze(1)
            avail_rows = state[0][pending]
            eligible = ((avail_rows > float("-inf")) & (cap_ext[:n_exp] > state[3])).any(dim=1)
            rows, avail_rows = pending[eligible], avail_rows[eligible]
            if rows.shape[0] == 0:
                break
            sub, accepted = _round(score[rows], avail_rows, state[1][rows], state[2][rows], state[3], cap_ext)
            for whole, part in zip(state[:3], sub[:3], strict=True):
                whole[rows] = part
            state = (*state[:3], sub[3])
            if trace is not None:
                trace.append(torch.full((n_tok,), -1, dtype=torch.int64, device=dev).index_put_((rows,), accepted))
        elif dev.type == "cpu" and compiling:
            state = torch.cond((~state[2]).any(), _round_state, _same_state, (score, *state, cap_ext))
        else:
            state, accepted = _round(score, *state, cap_ext)
            if trace is not None:
                trace.append(accepted)
    return selected, state[1], state[2]


_State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # avail, experts, placed, load


def _round(
    score: torch.Tensor,
    avail: torch.Tensor,
    experts: torch.Tensor,
    placed: torch.Tensor,
    load: torch.Tensor,
    cap_ext: torch.Tensor,
) -> tuple[_State, torch.Tensor]:
    """One rerouting round of SPEC §16 over the given tokens (rows in ascending token order), out
    of place, fixed shapes: ``((avail, experts, placed, load), accepted)`` after the round, with
    ``accepted`` int64 ``[rows]`` each token's accepted expert (``-1`` for none)."""
    n_rows, n_exp = avail.shape
    pending = ~placed
    col = pending.to(torch.uint8).argmax(dim=1)  # the token's first unplaced slot
    room = cap_ext - torch.cat([load, load.new_zeros(1)])  # [E + 1], 0 for "no expert"
    full = torch.zeros(n_exp, dtype=avail.dtype, device=avail.device).masked_fill_(room[:n_exp] <= 0, float("-inf"))
    reach = avail + full  # a full expert stays full (float32 whatever torch's default dtype)
    proposal = _argmax_rows(reach)  # the best eligible expert by biased logit, ties to the lower
    valid = (reach.gather(1, proposal.unsqueeze(1)).squeeze(1) > float("-inf")) & pending.any(dim=1)
    group = torch.where(valid, proposal, n_exp)
    prop_rank = _rank_in_group(group, score.gather(1, proposal.unsqueeze(1)).squeeze(1), n_exp)
    accept = valid & (prop_rank < room.index_select(0, group))
    rows = torch.arange(n_rows, device=avail.device)
    experts = experts.index_put((rows, col), torch.where(accept, proposal, experts[rows, col]))
    placed = placed.index_put((rows, col), placed[rows, col] | accept)
    load = load + _counts(group, accept, n_exp + 1)[:n_exp]
    avail = reach.index_put((rows, proposal), torch.where(accept, float("-inf"), reach[rows, proposal]))
    return (avail, experts, placed, load), torch.where(accept, group, -1)


def _round_state(score: torch.Tensor, *state_and_caps: torch.Tensor) -> _State:
    """:func:`_round`'s state only (a ``torch.cond`` branch)."""
    avail, experts, placed, load, cap_ext = state_and_caps
    return _round(score, avail, experts, placed, load, cap_ext)[0]


def _same_state(score: torch.Tensor, *state_and_caps: torch.Tensor) -> _State:
    """The state unchanged (the other ``torch.cond`` branch: no unplaced slot is left)."""
    avail, experts, placed, load, _ = state_and_caps
    return avail.clone(), experts.clone(), placed.clone(), load.clone()


def expert_choice(logits: torch.Tensor, capacity: torch.Tensor, max_capacity: int | None = None) -> torch.Tensor:
    """bool ``[T, E]``: expert ``e`` takes its ``capacity[e]`` highest-scoring tokens (SPEC §16).

    The score is the unbiased logit (float32 order key); ties go to the lower token index. Reads
    the whole batch: not for autoregressive decoding. ``max_capacity`` is ``max(capacity)`` as a
    host integer (read from ``capacity`` when not given: a synchronisation on a GPU).

    Each column's keys (descending score, then ascending token) are distinct, so expert ``e`` takes
    exactly the tokens whose key is at most the ``capacity[e]``-th smallest of its column: one
    ``topk`` of ``min(T, max(capacity))`` keys per expert instead of sorting every column (the whole
    selection at 16384 tokens x 64 experts, one thread: 17-24 ms instead of 105-121 ms, 2-core Zen 3).
    """
    n_tok, n_exp = logits.shape
    if max_capacity is None:
        max_capacity = int(capacity.max()) if n_exp else 0
    take = min(n_tok, int(max_capacity))
    if take <= 0:
        return torch.zeros(n_tok, n_exp, dtype=torch.bool, device=logits.device)
    score = order_key(logits.detach())  # [T, E]
    # descending score, ties to the lower token: the negated key with the token, ascending
    tok = torch.arange(n_tok, device=logits.device, dtype=torch.int64).unsqueeze(1)
    composite = (_I32_MAX - score) * n_tok + tok  # distinct within each column
    smallest = torch.topk(composite.t(), take, dim=1, largest=False, sorted=True).values  # [E, take]
    nth = (capacity.clamp(max=take) - 1).clamp(min=0).unsqueeze(1)  # the capacity[e]-th smallest
    threshold = smallest.gather(1, nth).squeeze(1)
    return (composite <= threshold.unsqueeze(0)) & (capacity > 0).unsqueeze(0)


def update_bias(
    bias: torch.Tensor,
    selected: torch.Tensor,
    share: torch.Tensor,
    rate: float,
    process_group: object | None = None,
) -> None:
    """In place: ``bias[e] += rate * sign(k * T * share[e] - routed[e])`` (SPEC §16 "bias update").

    Args:
        bias: float32 ``[E]`` buffer (updated in place, on its device).
        selected: int64 ``[T, k]`` the biased top-k selection of this batch.
        share: float64 ``[E]`` capacity shares ``cap / sum(cap)`` on the bias's device.
        rate: the step size.
        process_group: a ``torch.distributed`` group: the routed counts and ``T`` are summed over
            it first, so every rank makes the same update.
    """
    n_tok, k = selected.shape
    n_exp = bias.shape[0]
    with torch.no_grad():
        flat = selected.reshape(-1)
        counts = _counts(flat, torch.ones_like(flat), n_exp + 1)  # the last entry carries T
        counts[n_exp] = n_tok
        if process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
        total = counts[n_exp].to(torch.float64)
        target = (total * k) * share
        step = torch.sign(target - counts[:n_exp].to(torch.float64)).to(torch.float32) * rate
        bias.add_(step.to(bias.dtype))


def balance_losses(
    logits: torch.Tensor, selected: torch.Tensor, share: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The capacity-targeted Switch loss and the z-loss (SPEC §16 "auxiliary losses"), 0-d float32.

    ``aux = sum_{e: share_e > 0} f_e * P_e / share_e`` with ``f_e`` the share of the ``T * k``
    selected slots naming ``e`` and ``P_e`` the mean softmax probability of ``e``;
    ``z = mean_t logsumexp(logits[t])^2``; both 0 when ``T = 0``. Differentiable in the logits
    (``aux`` through ``P``).
    """
    n_tok, k = selected.shape
    n_exp = logits.shape[1]
    work = logits.to(torch.float32)
    if n_tok == 0:  # no tokens: both 0 (a mean over none would be NaN), still attached to the logits
        zero = work.sum() * 0.0
        return zero, zero.clone()
    flat = selected.reshape(-1)
    frac = _counts(flat, torch.ones_like(flat), n_exp).to(torch.float32) / float(n_tok * k)
    prob = torch.softmax(work, dim=1).mean(dim=0)
    share32 = share.to(torch.float32)
    positive = share32 > 0
    aux = torch.where(positive, frac * prob / torch.where(positive, share32, 1.0), 0.0).sum()
    z = torch.logsumexp(work, dim=1).square().mean()
    return aux, z


# --- options and the plan of one batch ----------------------------------------------------------------


def check_options(
    method: str,
    balance: Any,
    overflow: Any,
    reroute_rounds: Any,
    bias_rate: Any,
    eval_capacity_factor: Any,
    process_group: Any,
) -> tuple[Any, str, int, float, float | None]:
    """Validated ``(balance, overflow, reroute_rounds, bias_rate, eval_capacity_factor)``.

    ``balance``, ``overflow``, ``reroute_rounds``, ``bias_rate`` and ``process_group`` steer
    ``method="topk"`` only: for every other method they must keep their defaults (a ValueError
    names the argument otherwise).
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {list(BALANCES)}; got {balance!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {list(OVERFLOWS)}; got {overflow!r}")
    if isinstance(reroute_rounds, (bool, np.bool_)) or not isinstance(reroute_rounds, numbers.Integral):
        raise TypeError(f"reroute_rounds must be an integer; got {type(reroute_rounds).__name__}")
    if reroute_rounds < 0:
        raise ValueError(f"reroute_rounds must be >= 0; got {reroute_rounds}")
    if isinstance(bias_rate, (bool, np.bool_)) or not isinstance(bias_rate, numbers.Real):
        raise TypeError(f"bias_rate must be a real number; got {type(bias_rate).__name__}")
    if not (math.isfinite(float(bias_rate)) and float(bias_rate) >= 0):
        raise ValueError(f"bias_rate must be finite and >= 0; got {bias_rate}")
    if eval_capacity_factor is not None:
        if isinstance(eval_capacity_factor, (bool, np.bool_)) or not isinstance(eval_capacity_factor, numbers.Real):
            raise TypeError(
                "eval_capacity_factor must be None or a positive real number; "
                f"got {type(eval_capacity_factor).__name__}"
            )
        eval_capacity_factor = float(eval_capacity_factor)
        if not eval_capacity_factor > 0:  # also rejects NaN; math.inf = no hard caps in eval mode
            raise ValueError(f"eval_capacity_factor must be > 0 (math.inf: no caps); got {eval_capacity_factor}")
        if method == "expert_choice" and math.isinf(eval_capacity_factor):
            raise ValueError(
                "eval_capacity_factor=inf would give every token to every expert with method='expert_choice'"
            )
    if method != "topk":
        given = {
            "balance": (balance, "bias"),
            "overflow": (overflow, "reroute"),
            "reroute_rounds": (reroute_rounds, 8),
            "bias_rate": (bias_rate, 1e-2),
            "process_group": (process_group, None),
        }
        for name, (value, default) in given.items():
            if value is not default and value != default:
                raise ValueError(f"{name} applies to method='topk' only; method={method!r} must keep its default")
    elif process_group is not None and balance != "bias":
        raise ValueError("process_group applies to balance='bias' only (it sums the routed counts)")
    if process_group is not None:
        import torch.distributed as dist

        non_member = dist.GroupMember.NON_GROUP_MEMBER if dist.is_available() else None
        if isinstance(process_group, int) and process_group == non_member:
            raise ValueError("process_group: this rank is not a member of the group (dist.new_group gave it none)")
        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup or None; got {type(process_group).__name__}"
            )
    return balance, overflow, int(reroute_rounds), float(bias_rate), eval_capacity_factor


def topk_plan(
    logits: torch.Tensor,
    capacity: torch.Tensor,
    buffer_size: int,
    *,
    k: int,
    bias: torch.Tensor,
    share: torch.Tensor,
    balance: Any,
    rounds: int,
    rate: float,
    update: bool,
    process_group: Any = None,
    offsets: tuple[int, ...] | None = None,
) -> RoutingPlan:
    """The SPEC §16 plan of ``method="topk"``; updates ``bias`` in place when ``update``.

    ``offsets``: the host packed offsets of ``capacity`` (read from it when not given).
    """
    if balance == "bias" and bias.device != logits.device:
        raise ValueError(
            f"expert_bias lives on {bias.device} but the logits on {logits.device}: move the router with .to(device)"
        )
    selected, experts, placed = learned_topk(logits, bias if balance == "bias" else None, k, capacity, rounds)
    if update and balance == "bias":
        update_bias(bias, selected, share, rate, process_group)
    plan = _plan(torch.where(placed, experts, -1), capacity, buffer_size, logits, None, offsets=offsets)
    aux = z = None
    if balance == "aux":
        aux, z = balance_losses(logits, selected, share)
    return dataclasses.replace(plan, experts=experts, aux_loss=aux, z_loss=z)


def expert_choice_plan(
    logits: torch.Tensor,
    capacity: torch.Tensor,
    buffer_size: int,
    offsets: tuple[int, ...] | None = None,
    requested_k: int | None = None,
) -> RoutingPlan:
    """The SPEC §16 plan of ``method="expert_choice"``: ``[T, E]`` slots, column ``e`` for expert ``e``
    (``requested_k``: the router's ``k``, which the plan's ``drop_rate`` counts against)."""
    chosen = expert_choice(logits, capacity, buffer_size)  # buffer_size = max(capacity), a host integer
    col = torch.arange(logits.shape[1], device=logits.device, dtype=torch.int64).unsqueeze(0)
    experts = torch.where(chosen, col, -1)
    plan = _plan(experts, capacity, buffer_size, logits, None, offsets=offsets)
    return plan if requested_k is None else dataclasses.replace(plan, requested_k=requested_k)


__all__ = [
    "LEARNED_METHODS",
    "balance_losses",
    "check_options",
    "expert_choice_plan",
    "topk_plan",
    "expert_choice",
    "learned_topk",
    "order_key",
    "select_and_cap",
    "select_topk",
    "update_bias",
]
