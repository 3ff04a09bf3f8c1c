"""Expert parallelism over ``torch.distributed`` with the packed layout of SPEC §15.

Every rank routes its own ``T`` tokens with its own :class:`RoutingPlan`; all ranks' plans have
the same hard caps (same ``T``, capacities, ``k`` and capacity factor), so the number of rows each
rank sends to each other rank is ``sum(capacity[e] for e on the destination)``, known on the host
before any data. One ``all_to_all_single`` with those split sizes moves the packed rows to the
experts' ranks (no exchange of counts, no host read), a second one brings the expert outputs back,
and autograd runs the same two exchanges in reverse.

Local buffer of a rank (``ExpertParallel.dispatch``): ``[sum over local experts e of W * cap[e], d]``
with ``W`` the group size; local expert ``i`` (``handle.experts[i]``, ascending) owns rows
``handle.offsets[i]:handle.offsets[i + 1]``, in source-rank order: rows
``offsets[i] + r * cap[e] + c`` hold source rank ``r``'s slot ``c`` of expert ``e`` (0 where that
slot is unused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._plan import RoutingPlan, _check_rows, _gather_rows, _scatter_rows, split_rows


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with host split sizes; backward swaps the splits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        out_splits, in_splits = ctx.splits
        # the exchange itself, so that a graph built in backward (create_graph=True) has it too
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def _to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 host table onto ``device``; on CUDA through pinned memory, asynchronously (no sync)."""
    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class _Exchange:
    """Host-known send/receive layout for one set of hard caps (shared by all ranks)."""

    experts: tuple[int, ...]  # local experts, ascending
    capacity: tuple[int, ...]  # their caps
    offsets: tuple[int, ...]  # local buffer offsets, expert-major: offsets[i + 1] - offsets[i] = W * cap
    send_offsets: np.ndarray  # int64 [E + 1]: row of expert e's slot 0 in the send buffer; [E] = total
    in_splits: list[int]  # rows sent to each rank
    out_splits: list[int]  # rows received from each rank
    to_local: np.ndarray | None  # int64 [rows]: local row -> received row (None: identity)
    to_recv: np.ndarray | None  # int64 [rows]: received row -> local row (None: identity)
    device_tables: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict, compare=False)


def _exchange(expert_ranks: tuple[int, ...], caps: Sequence[int], world: int, rank: int) -> _Exchange:
    n_exp = len(caps)
    order = sorted(range(n_exp), key=lambda e: (expert_ranks[e], e))  # send buffer: grouped by rank
    send_offsets = np.zeros(n_exp + 1, dtype=np.int64)
    row = 0
    for e in order:
        send_offsets[e] = row
        row += caps[e]
    send_offsets[n_exp] = row
    in_splits = [sum(caps[e] for e in range(n_exp) if expert_ranks[e] == q) for q in range(world)]
    local = tuple(e for e in range(n_exp) if expert_ranks[e] == rank)
    local_caps = tuple(int(caps[e]) for e in local)
    per_source = sum(local_caps)
    offsets = (0, *(int(v) for v in np.cumsum([world * c for c in local_caps])))
    # received rows are source-major ([source][local expert][slot]); the local buffer expert-major
    to_local = np.empty(world * per_source, dtype=np.int64)
    start = 0  # the local expert's first row inside one source's block
    for i, cap in enumerate(local_caps):
        for src in range(world):
            dst = offsets[i] + src * cap
            to_local[dst : dst + cap] = np.arange(src * per_source + start, src * per_source + start + cap)
        start += cap
    identity = bool(np.array_equal(to_local, np.arange(to_local.shape[0])))
    to_recv = np.empty_like(to_local)
    to_recv[to_local] = np.arange(to_local.shape[0])
    return _Exchange(
        experts=local,
        capacity=local_caps,
        offsets=offsets,
        send_offsets=send_offsets,
        in_splits=in_splits,
        out_splits=[per_source] * world,
        to_local=None if identity else to_local,
        to_recv=None if identity else to_recv,
    )


@dataclass(frozen=True, eq=False)
class ExpertParallelHandle:
    """What ``ExpertParallel.combine`` needs to send a dispatch's expert outputs back.

    Attributes:
        experts: this rank's experts (global ids, ascending).
        capacity: their hard caps (rows per source rank).
        offsets: host ``(len(experts) + 1)``-tuple; local expert ``i``'s rows of the local buffer
            are ``offsets[i]:offsets[i + 1]`` (``world * capacity[i]`` rows, source rank ``r`` at
            ``offsets[i] + r * capacity[i]``).
        plan: the rank's routing plan.
    """

    experts: tuple[int, ...]
    capacity: tuple[int, ...]
    offsets: tuple[int, ...]
    plan: RoutingPlan = field(repr=False)
    _exchange: _Exchange = field(repr=False)
    _position: torch.Tensor = field(repr=False)  # int64 [T*k]: row in the send buffer, total if dropped
    _tables: tuple[torch.Tensor, ...] = field(repr=False)
    _empty: torch.Tensor | None = field(repr=False)  # the (0-row) local buffer of a rank without experts

    @property
    def num_rows(self) -> int:
        """Rows of the local buffer, ``offsets[-1]``."""
        return self.offsets[-1]

    def expert_rows(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-local-expert views ``buf[offsets[i]:offsets[i + 1]]`` of a local buffer."""
        return split_rows(buf, self.offsets, "a local buffer")


class ExpertParallel:
    """Send each expert's packed rows to the rank that holds the expert, and the outputs back.

    Args:
        group: the ``torch.distributed`` process group (default: the world group); ranks below
            are ranks in this group. Its backend must support ``all_to_all_single`` (gloo on CPU,
            NCCL on CUDA).
        expert_ranks: optional length-``E`` sequence, the rank holding each expert (any
            placement: several or no experts per rank, more capacity on faster ranks). Default:
            contiguous, as even as possible: expert ``e`` on rank ``e * W // E``.

    Every rank calls ``dispatch`` and ``combine`` with plans of the same hard caps (routers with
    the same ``E``, capacities, ``k``, capacity factor and ``T``) and the same ``expert_ranks``.
    ``dispatch`` checks both across ranks (one ``all_gather_object``): on the CPU at every call, on
    a GPU at the first call of each set of caps only (the check is a synchronisation). So on GPUs
    give every rank the same ``T`` in every step (e.g. ``drop_last=True``): a rank whose batch size
    changes alone, say a short last batch, would make the exchanges disagree, which the
    collectives' timeout ends.
    """

    def __init__(self, group: Any = None, expert_ranks: Sequence[int] | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised; call init_process_group first")
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the group")
        self._expert_ranks: tuple[int, ...] | None = None
        if expert_ranks is not None:
            if isinstance(expert_ranks, torch.Tensor):
                expert_ranks = expert_ranks.tolist()
            ranks = np.asarray(expert_ranks)
            if ranks.ndim != 1 or ranks.shape[0] < 1 or not np.issubdtype(ranks.dtype, np.integer):
                raise ValueError(f"expert_ranks must be a non-empty 1-D sequence of integers; got {expert_ranks!r}")
            if ranks.min() < 0 or ranks.max() >= self.world_size:
                raise ValueError(
                    f"expert_ranks must lie in [0, {self.world_size}) (the group's ranks); "
                    f"got range [{ranks.min()}, {ranks.max()}]"
                )
            self._expert_ranks = tuple(int(r) for r in ranks)
        self._cache: dict[tuple[int, ...], _Exchange] = {}

    def expert_ranks(self, num_experts: int) -> tuple[int, ...]:
        """The rank of each of ``num_experts`` experts."""
        if self._expert_ranks is not None:
            if len(self._expert_ranks) != num_experts:
                raise ValueError(
                    f"expert_ranks has {len(self._expert_ranks)} entries but the plan has E = {num_experts} experts"
                )
            return self._expert_ranks
        return tuple(e * self.world_size // num_experts for e in range(num_experts))

    def local_experts(self, num_experts: int) -> tuple[int, ...]:
        """This rank's experts (global ids, ascending)."""
        return tuple(e for e, r in enumerate(self.expert_ranks(num_experts)) if r == self.rank)

    def _exchange_of(self, plan: RoutingPlan, every_call: bool) -> _Exchange:
        key = plan.offsets
        placement = self.expert_ranks(plan.num_experts)
        hit = self._cache.get(key)
        if hit is None or every_call:
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, (key, placement), group=self.group)
            if any(tuple(o) != key for o, _ in everyone):
                raise ValueError(
                    "plan: the ranks' plans have different hard caps (packed offsets per rank: "
                    f"{[tuple(o) for o, _ in everyone]}); every rank needs the same T, capacities, k "
                    "and capacity factor"
                )
            if any(tuple(p) != placement for _, p in everyone):
                raise ValueError(
                    "expert_ranks: the ranks place the experts differently (per rank: "
                    f"{[tuple(p) for _, p in everyone]}); give every rank the same expert_ranks"
                )
        if hit is None:
            caps = [b - a for a, b in zip(key[:-1], key[1:], strict=True)]
            hit = _exchange(placement, caps, self.world_size, self.rank)
            self._cache[key] = hit
        return hit

    def dispatch(self, plan: RoutingPlan, x: torch.Tensor) -> tuple[torch.Tensor, ExpertParallelHandle]:
        """This rank's expert buffer, with rows from every rank's tokens.

        Args:
            plan: this rank's routing plan for its ``T`` tokens.
            x: ``[T, d]`` this rank's activations (on the plan's device).

        Returns:
            ``(buf, handle)``: ``buf`` is ``[handle.offsets[-1], d]``, the local experts' rows from
            all ranks (module docstring); differentiable in ``x`` on every rank. No host read.
        """
        if not isinstance(plan, RoutingPlan):
            raise TypeError(f"plan must be a RoutingPlan; got {type(plan).__name__}")
        _check_rows("x", x, plan.num_tokens, "T")
        if x.device != plan.slot.device:
            raise ValueError(f"x must be on the plan's device {plan.slot.device}; got {x.device}")
        ex = self._exchange_of(plan, every_call=x.device.type == "cpu")  # no check per call on a GPU
        dev_key = str(x.device)
        tables = ex.device_tables.get(dev_key)
        if tables is None:
            tables = tuple(_to_device(t, x.device) for t in (ex.send_offsets, ex.to_local, ex.to_recv) if t is not None)
            ex.device_tables[dev_key] = tables
        send_offsets = tables[0]
        total = int(ex.send_offsets[-1])
        kept = plan.slot >= 0
        position = torch.where(kept, send_offsets[plan.experts.clamp(min=0)] + plan.slot, total).reshape(-1)
        send = _scatter_rows(x, position, plan.k, total)
        recv = _AllToAll.apply(send, ex.out_splits, ex.in_splits, self.group)
        buf = recv if ex.to_local is None else recv.index_select(0, tables[1])
        handle = ExpertParallelHandle(
            experts=ex.experts,
            capacity=ex.capacity,
            offsets=ex.offsets,
            plan=plan,
            _exchange=ex,
            _position=position,
            _tables=tables,
            _empty=buf if ex.offsets[-1] == 0 else None,
        )
        return buf, handle

    def combine(self, handle: ExpertParallelHandle, y: torch.Tensor) -> torch.Tensor:
        """This rank's token outputs from the local experts' outputs on every rank.

        Args:
            handle: from this rank's ``dispatch``.
            y: ``[handle.offsets[-1], d_out]`` local expert outputs, rows as in the dispatched
                buffer, computed from it (backward runs the dispatch's exchange through ``y``;
                on a rank without experts any ``[0, d_out]`` tensor will do).

        Returns:
            ``[T, d_out]``: ``sum_s weights[t, s] * (expert output of slot (t, s))`` over kept
            slots, as ``plan.combine(..., layout="packed")`` on one process. Differentiable in
            ``y`` and the plan's weights. No host read.
        """
        if not isinstance(handle, ExpertParallelHandle):
            raise TypeError(f"handle must come from ExpertParallel.dispatch; got {type(handle).__name__}")
        _check_rows("y", y, handle.num_rows, "rows")
        if not (y.dtype.is_floating_point or y.dtype.is_complex):
            raise TypeError(f"y must have a floating dtype (expert outputs, weighted); got {y.dtype}")
        ex = handle._exchange
        if handle._empty is not None:  # no local experts: tie y to the buffer so that backward runs
            y = y + handle._empty.sum().to(y.dtype)  # the dispatch's exchange here too (sends x's gradient)
        back = y if ex.to_recv is None else y.index_select(0, handle._tables[2])
        out = _AllToAll.apply(back, ex.in_splits, ex.out_splits, self.group)
        return _gather_rows(out, handle._position, handle.plan.weights)


__all__ = ["ExpertParallel", "ExpertParallelHandle"]
