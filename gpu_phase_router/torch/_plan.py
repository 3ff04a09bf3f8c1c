"""The routing plan of SPEC §15: slots, loads, gate weights, dispatch and combine.

All tensors live on the routes' device; shapes are fixed by ``T``, ``k`` and host-known caps, so
building a plan reads nothing back from a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._validate import check_int

# --- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """One batch's routing (SPEC §15). All tensors live on the logits' device.

    Attributes:
        experts: int64 ``[T, k]`` — the router's expert per slot, ``-1`` where it gave none.
            Dropped slots keep their expert here; ``slot`` marks the drop.
        weights: ``[T, k]`` gate weights (the logits' dtype; float32 without logits), ``0`` at
            slots that are not kept; differentiable with respect to the logits.
        slot: int64 ``[T, k]`` — position in the expert's buffer, ``-1`` where the slot is not
            kept (no expert, or dropped by the hard cap).
        capacity: int64 ``[E]`` hard caps (SPEC §12 rule with ``n_src = T``).
        tokens_per_expert: int64 ``[E]`` kept slots per expert.
        buffer_size: ``C = max(capacity)``, a host integer: the dispatch buffer is ``[E, C, d]``.
        aux_loss: 0-d float32 capacity-targeted load-balancing loss (SPEC §16), differentiable in
            the logits; ``None`` unless the router was built with ``balance="aux"``.
        z_loss: 0-d float32 ``mean(logsumexp(logits)^2)`` (SPEC §16); ``None`` unless
            ``balance="aux"``.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    slot: torch.Tensor
    capacity: torch.Tensor
    tokens_per_expert: torch.Tensor
    buffer_size: int
    _position: torch.Tensor = field(repr=False)  # int64 [T*k]: e * C + slot if kept, else E * C
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.capacity.shape[0])

    @property
    def k(self) -> int:
        return int(self.experts.shape[1])

    @property
    def kept(self) -> torch.Tensor:
        """bool ``[T, k]``: slots that reach an expert."""
        return self.slot >= 0

    def drop_rate(self) -> torch.Tensor:
        """Share of the ``T * k`` slots not served (no expert or dropped), a 0-d float tensor."""
        return 1.0 - self.tokens_per_expert.sum().to(torch.float32) / float(self.slot.numel())

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """Expert buffers from token activations.

        Args:
            x: ``[T, d]`` activations (any dtype; on the plan's device).

        Returns:
            ``[E, C, d]``: entry ``(e, c)`` is ``x[t]`` for the kept slot of token ``t`` at
            position ``c`` of expert ``e``; unused positions are 0. Differentiable in ``x``.
        """
        n_tok, k, n_exp, cap = self.num_tokens, self.k, self.num_experts, self.buffer_size
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] != n_tok:
            raise ValueError(
                f"x must be a [T, d] tensor with T = {n_tok}; got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        d = x.shape[1]
        rows = x.unsqueeze(1).expand(n_tok, k, d).reshape(n_tok * k, d)
        buf = x.new_zeros(n_exp * cap + 1, d)  # the last row collects the slots that are not kept
        buf = buf.index_copy(0, self._position, rows)
        return buf[: n_exp * cap].view(n_exp, cap, d)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Token outputs from expert buffers: the weighted sum over each token's kept slots.

        Args:
            y: ``[E, C, d]`` expert outputs (e.g. ``expert(plan.dispatch(x))``).

        Returns:
            ``[T, d]`` in ``y``'s dtype; ``out[t] = sum_s weights[t, s] * y[experts[t, s], slot[t, s]]``
            over kept slots. Differentiable in ``y`` and in the weights.
        """
        n_tok, k, n_exp, cap = self.num_tokens, self.k, self.num_experts, self.buffer_size
        if not isinstance(y, torch.Tensor) or y.ndim != 3 or tuple(y.shape[:2]) != (n_exp, cap):
            raise ValueError(
                f"y must be an [E, C, d] tensor with E = {n_exp}, C = {cap}; got "
                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
            )
        d = y.shape[2]
        flat = torch.cat([y.reshape(n_exp * cap, d), y.new_zeros(1, d)])
        gathered = flat.index_select(0, self._position).view(n_tok, k, d)
        return torch.bmm(self.weights.to(y.dtype).unsqueeze(1), gathered).squeeze(1)

    @classmethod
    def from_experts(
        cls,
        experts: torch.Tensor,
        capacity: Any,
        logits: torch.Tensor | None = None,
        *,
        buffer_size: int | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> RoutingPlan:
        """The plan of SPEC §15 for given routes and hard caps (e.g. a custom router's choice).

        Args:
            experts: integer ``[T, k]`` tensor, experts in ``[0, E)`` or ``-1`` (checked for CPU
                tensors only).
            capacity: integer ``[E]`` hard caps ``>= 0`` (a tensor, moved to the device of
                ``experts``, or host values).
            logits: optional ``[T, E]`` float tensor for the gate weights.
            buffer_size: ``C``; default ``max(capacity)``, read from the tensor (one
                synchronisation when ``capacity`` lives on a GPU).
            weight_dtype: dtype of the weights without logits (default float32).
        """
        if not isinstance(experts, torch.Tensor) or experts.ndim != 2:
            raise ValueError("experts must be a 2-D [T, k] integer tensor")
        if experts.dtype.is_floating_point or experts.dtype.is_complex or experts.dtype == torch.bool:
            raise TypeError(f"experts must hold integers; got {experts.dtype}")
        if not isinstance(capacity, torch.Tensor):
            capacity = torch.as_tensor(np.asarray(capacity, dtype=np.int64))
        capacity = capacity.to(device=experts.device, dtype=torch.int64)
        if capacity.ndim != 1 or capacity.shape[0] < 1:
            raise ValueError(f"capacity must be 1-D [E] with E >= 1; got shape {tuple(capacity.shape)}")
        if experts.device.type == "cpu" and experts.numel():  # a range check on a GPU would synchronise
            lo, hi = int(experts.min()), int(experts.max())
            if lo < -1 or hi >= capacity.shape[0]:
                raise ValueError(f"experts must lie in [-1, E) with E = {capacity.shape[0]}; got range [{lo}, {hi}]")
        if buffer_size is None:
            buffer_size = max(1, int(capacity.max()))
        buffer_size = check_int("buffer_size", buffer_size, lo=1)
        if logits is not None and (logits.ndim != 2 or tuple(logits.shape) != (experts.shape[0], capacity.shape[0])):
            raise ValueError(
                f"logits must have shape [T, E] = [{experts.shape[0]}, {capacity.shape[0]}]; got {tuple(logits.shape)}"
            )
        return _plan(experts.to(torch.int64), capacity, buffer_size, logits, weight_dtype)


def _plan(
    experts: torch.Tensor,
    capacity: torch.Tensor,
    buffer_size: int,
    logits: torch.Tensor | None,
    weight_dtype: torch.dtype | None,
) -> RoutingPlan:
    """SPEC §15 slots, loads, weights and buffer positions: fixed shapes, no host synchronisation."""
    n_tok, k = experts.shape
    n_exp = int(capacity.shape[0])
    dev = experts.device
    flat = experts.reshape(-1)
    n = flat.shape[0]
    key = torch.where(flat >= 0, flat, n_exp)  # "no expert" (-1) sorts last, as group E
    # stable: row-major order inside each expert; int32 keys sort faster than int64 (E < 2^31)
    sorted_key, order = torch.sort(key.to(torch.int32), stable=True)
    sorted_key = sorted_key.to(torch.int64)
    start = torch.searchsorted(sorted_key, torch.arange(n_exp + 1, device=dev, dtype=key.dtype))
    rank_sorted = torch.arange(n, device=dev, dtype=torch.int64) - start[sorted_key]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    kept = rank < torch.cat([capacity, capacity.new_zeros(1)])[key]  # group E has capacity 0
    slot = torch.where(kept, rank, -1)
    tokens_per_expert = torch.minimum(start[1:] - start[:-1], capacity)
    position = torch.where(kept, key * buffer_size + rank, n_exp * buffer_size)
    kept2 = kept.view(n_tok, k)
    if logits is None:
        dtype = weight_dtype or torch.float32
        weights = kept2.to(dtype) / k
    else:
        weights = _gate_weights(logits, experts, kept2)
    return RoutingPlan(
        experts=experts,
        weights=weights,
        slot=slot.view(n_tok, k),
        capacity=capacity,
        tokens_per_expert=tokens_per_expert,
        buffer_size=buffer_size,
        _position=position,
    )


def _gate_weights(logits: torch.Tensor, experts: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """softmax(logits) at the chosen experts, renormalised over the kept slots (0 where none kept).

    The softmax denominator over all ``E`` experts cancels in the renormalisation, so this is the
    softmax over the kept chosen logits only: O(T k), not O(T E).
    """
    work = logits if logits.dtype == torch.float64 else logits.float()
    chosen = work.gather(1, experts.clamp(min=0))
    masked = chosen.masked_fill(~kept, float("-inf"))
    top = masked.detach().amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)  # 0 for a row with no kept slot
    expo = torch.exp(masked - top)
    total = expo.sum(dim=1, keepdim=True)
    weights = expo / torch.where(total > 0, total, 1.0)  # a row with no kept slot: 0 / 1, no NaN
    return weights.to(logits.dtype)
