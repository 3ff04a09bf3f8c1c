"""The routing plan of SPEC §15: slots, loads, gate weights, dispatch and combine.

All tensors live on the routes' device; shapes are fixed by ``T``, ``k`` and host-known caps, so
building a plan reads nothing back from a GPU. Two buffer layouts: ``"padded"`` (``[E, C, d]``,
every expert padded to ``C = max(capacity)``) and ``"packed"`` (``[sum(capacity), d]``, expert
``e``'s rows at ``offsets[e]:offsets[e + 1]``; SPEC §15).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .._arrays import check_plain_input, to_numpy
from .._validate import check_int

LAYOUTS = ("padded", "packed")
Layout = Literal["padded", "packed"]


_INF = float("inf")


def _check_layout(layout: Any) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    return layout


def host_offsets(capacity: Any) -> tuple[int, ...]:
    """Packed-layout offsets ``(0, cap[0], cap[0] + cap[1], ..., sum(cap))`` of host caps (a
    sequence of ints or a NumPy array). Python integers only, so under ``torch.compile`` a tuple
    of constant caps gives constant offsets (NumPy calls would be traced into tensor ops)."""
    values = capacity.reshape(-1).tolist() if isinstance(capacity, np.ndarray) else capacity
    return tuple(itertools.accumulate((int(v) for v in values), initial=0))


# --- the plan ---------------------------------------------------------------------------------------


def split_rows(buf: torch.Tensor, offsets: tuple[int, ...], what: str) -> tuple[torch.Tensor, ...]:
    """Views ``buf[offsets[i]:offsets[i + 1]]`` (``torch.split`` with host sizes: no copy, no host
    read); ``ValueError`` naming ``buf`` unless it has ``offsets[-1]`` rows."""
    if not isinstance(buf, torch.Tensor) or buf.ndim < 1 or buf.shape[0] != offsets[-1]:
        raise ValueError(
            f"buf must be {what} with {offsets[-1]} rows; got "
            f"{tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__}"
        )
    return tuple(torch.split(buf, [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]))


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
        buffer_size: ``C = max(capacity)``, a host integer: the padded buffer is ``[E, C, d]``.
        offsets: host ``(E + 1)``-tuple of ints, ``offsets[e] = sum(capacity[:e])``: expert
            ``e``'s rows of the packed buffer ``[offsets[E], d]`` are ``offsets[e]:offsets[e + 1]``.
        offsets_tensor: the same offsets as an int64 ``[E + 1]`` tensor on the plan's device
            (e.g. ``offsets_tensor[1:].int()`` for ``torch._grouped_mm``'s ``offs``).
        aux_loss: 0-d float32 capacity-targeted load-balancing loss (SPEC §16), differentiable in
            the logits; ``None`` unless the router was built with ``balance="aux"``.
        z_loss: 0-d float32 ``mean(logsumexp(logits)^2)`` (SPEC §16); ``None`` unless
            ``balance="aux"``.
        requested_k: experts each token asks for where it differs from the slot columns (an
            expert-choice plan: the router's ``k``), else ``None``; :meth:`drop_rate` counts with it.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    slot: torch.Tensor
    capacity: torch.Tensor
    tokens_per_expert: torch.Tensor
    buffer_size: int
    offsets: tuple[int, ...]
    offsets_tensor: torch.Tensor = field(repr=False)
    _position: torch.Tensor = field(repr=False)  # int64 [T*k]: e * C + slot if kept, else E * C
    _packed_position: torch.Tensor = field(repr=False)  # int64 [T*k]: offsets[e] + slot if kept, else sum(cap)
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    requested_k: int | None = None

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
        """Share of the ``T * k`` requested slots not served, a 0-d float32 tensor (0 when ``T = 0``).

        ``k`` is :attr:`requested_k` where set (an expert-choice plan: the router's ``k``; its
        ``E`` slot columns are one per expert, and a token served by more than ``k`` experts counts
        as ``k``), else the plan's slot columns: ``1 - sum_t min(kept slots of t, k) / (T * k)``.
        """
        k = self.k if self.requested_k is None else self.requested_k
        total = self.num_tokens * k
        if total == 0:
            return torch.zeros((), dtype=torch.float32, device=self.slot.device)
        served = self.kept.sum(dim=1).clamp(max=k).sum() if k < self.k else self.tokens_per_expert.sum()
        return 1.0 - served.to(torch.float32) / float(total)

    @property
    def packed_size(self) -> int:
        """Rows of the packed buffer, ``sum(capacity) = offsets[E]`` (a host integer)."""
        return self.offsets[-1]

    def _layout(self, layout: Any) -> tuple[torch.Tensor, int]:
        """(slot positions with the drop sentinel, rows) of ``layout``."""
        if _check_layout(layout) == "packed":
            return self._packed_position, self.packed_size
        return self._position, self.num_experts * self.buffer_size

    def dispatch(self, x: torch.Tensor, layout: Layout = "padded") -> torch.Tensor:
        """Expert buffers from token activations.

        Args:
            x: ``[T, d]`` activations (any dtype; on the plan's device).
            layout: ``"padded"`` (default) or ``"packed"``.

        Returns:
            ``"padded"``: ``[E, C, d]``, entry ``(e, c)`` is ``x[t]`` for the kept slot of token
            ``t`` at position ``c`` of expert ``e``. ``"packed"``: ``[sum(capacity), d]``, row
            ``offsets[e] + c`` is that same ``x[t]``. Unused positions are 0. Differentiable in
            ``x``; no host read.
        """
        position, rows_out = self._layout(layout)
        _check_rows("x", x, self.num_tokens, "T")
        _check_same_device("x", x, position.device)
        buf = _scatter_rows(x, position, self.k, rows_out)
        return buf if layout == "packed" else buf.view(self.num_experts, self.buffer_size, x.shape[1])

    def combine(self, y: torch.Tensor, layout: Layout = "padded") -> torch.Tensor:
        """Token outputs from expert buffers: the weighted sum over each token's kept slots.

        Args:
            y: expert outputs in ``layout`` on the plan's device (e.g. ``expert(plan.dispatch(x, layout))``):
                ``[E, C, d]`` for ``"padded"`` (default), ``[sum(capacity), d]`` for ``"packed"``.
            layout: ``"padded"`` or ``"packed"``.

        Returns:
            ``[T, d]`` in ``y``'s dtype; ``out[t] = sum_s weights[t, s] * y[row of (t, s)]`` over
            kept slots. Differentiable in ``y`` and in the weights; no host read.
        """
        position, rows_in = self._layout(layout)
        n_exp, cap = self.num_experts, self.buffer_size
        if layout == "packed":
            shape_ok = isinstance(y, torch.Tensor) and y.ndim == 2 and y.shape[0] == rows_in
            want = f"a [sum(capacity), d] tensor with sum(capacity) = {rows_in}"
        else:
            shape_ok = isinstance(y, torch.Tensor) and y.ndim == 3 and tuple(y.shape[:2]) == (n_exp, cap)
            want = f"an [E, C, d] tensor with E = {n_exp}, C = {cap}"
        if not shape_ok:
            raise ValueError(
                f"y must be {want} for layout={layout!r}; got "
                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
            )
        _check_same_device("y", y, position.device)
        if not (y.dtype.is_floating_point or y.dtype.is_complex):
            raise TypeError(f"y must have a floating dtype (the weights are fractions); got {y.dtype}")
        return _gather_rows(y.reshape(rows_in, y.shape[-1]), position, self.weights)

    def expert_rows(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-expert views of a packed buffer: ``buf[offsets[e]:offsets[e + 1]]`` for each ``e``.

        Args:
            buf: ``[sum(capacity), ...]`` packed buffer (e.g. ``plan.dispatch(x, "packed")``).

        Returns:
            ``E`` views (``torch.split`` with the host caps; no copy, no host read).
        """
        return split_rows(buf, self.offsets, "a packed buffer")

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
            buffer_size: ``C``; default ``max(capacity)``.
            weight_dtype: dtype of the weights without logits (default float32).

        ``buffer_size`` and the packed ``offsets`` are host values: taken from ``capacity`` when
        it is given on the host (values or a CPU tensor), else read from the device tensor (one
        synchronisation; give host caps to avoid it).
        """
        if not isinstance(experts, torch.Tensor) or experts.ndim != 2:
            raise ValueError("experts must be a 2-D [T, k] integer tensor")
        if experts.dtype.is_floating_point or experts.dtype.is_complex or experts.dtype == torch.bool:
            raise TypeError(f"experts must hold integers; got {experts.dtype}")
        host_caps = capacity if not isinstance(capacity, torch.Tensor) or capacity.device.type == "cpu" else None
        capacity = _check_capacity(capacity, experts.device)
        if host_caps is not None:
            caps_host = np.asarray(to_numpy(host_caps) if isinstance(host_caps, torch.Tensor) else host_caps)
        elif capacity.device.type == "meta":
            raise ValueError("capacity on the meta device has no values: give host caps for a meta plan")
        else:
            caps_host = capacity.detach().cpu().numpy()  # one synchronisation: the packed offsets are host values
        caps_host = caps_host.astype(np.int64).reshape(-1)
        if experts.device.type == "cpu" and experts.numel():  # a range check on a GPU would synchronise
            lo, hi = int(experts.min()), int(experts.max())
            if lo < -1 or hi >= capacity.shape[0]:
                raise ValueError(f"experts must lie in [-1, E) with E = {capacity.shape[0]}; got range [{lo}, {hi}]")
        top = None if capacity.device.type != "cpu" else int(capacity.max())
        if buffer_size is None:
            buffer_size = max(1, int(caps_host.max()))
        buffer_size = check_int("buffer_size", buffer_size, lo=1)
        if top is not None and buffer_size < top:
            raise ValueError(
                f"buffer_size must be >= max(capacity) = {top} (each expert's kept slots need a buffer row); "
                f"got {buffer_size}"
            )
        if top is None and capacity.device.type != "meta":  # checked on the device, no synchronisation
            torch._assert_async(capacity.max() <= buffer_size, "buffer_size must be >= max(capacity)")
        n_exp = int(capacity.shape[0])
        if n_exp * buffer_size >= 1 << 63 or int(caps_host.sum(dtype=object)) >= 1 << 63:
            raise ValueError(
                f"capacity and buffer_size must keep E * buffer_size and sum(capacity) below 2^63 (buffer "
                f"positions are int64); got E = {n_exp}, buffer_size = {buffer_size}"
            )
        weight_dtype = _check_weight_dtype(weight_dtype, with_logits=logits is not None)
        if logits is not None and not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor [T, E] or None; got {type(logits).__name__}")
        if logits is not None and not logits.dtype.is_floating_point:
            raise TypeError(f"logits must have a floating dtype; got {logits.dtype}")
        if logits is not None and (logits.ndim != 2 or tuple(logits.shape) != (experts.shape[0], capacity.shape[0])):
            raise ValueError(
                f"logits must have shape [T, E] = [{experts.shape[0]}, {capacity.shape[0]}]; got {tuple(logits.shape)}"
            )
        return _plan(
            experts.to(torch.int64), capacity, buffer_size, logits, weight_dtype, offsets=host_offsets(caps_host)
        )


def _check_rows(name: str, value: Any, rows: int, label: str) -> None:
    """``value`` must be a 2-D tensor of ``rows`` rows (``ValueError`` naming ``name`` otherwise)."""
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != rows:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a [{label}, d] tensor with {label} = {rows}; got {got}")


def _check_same_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    """``value`` must live on the plan's ``device`` (``ValueError`` naming ``name`` otherwise)."""
    if value.device != device:
        raise ValueError(f"{name} must be on the plan's device ({device}); got a tensor on {value.device}")


def _scatter_rows(x: torch.Tensor, position: torch.Tensor, k: int, rows_out: int) -> torch.Tensor:
    """``[rows_out, d]``: row ``position[t * k + s]`` is ``x[t]``; ``position == rows_out`` drops."""
    n_tok, d = x.shape
    rows = x.unsqueeze(1).expand(n_tok, k, d).reshape(n_tok * k, d)
    buf = x.new_zeros(rows_out + 1, d)  # the last row collects the slots that are not kept
    return buf.index_copy(0, position, rows)[:rows_out]


def _gather_rows(y: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[T, d]``: ``sum_s weights[t, s] * y[position[t * k + s]]``, row ``len(y)`` reading 0."""
    n_tok, k = weights.shape
    flat = torch.cat([y, y.new_zeros(1, y.shape[1])])
    gathered = flat.index_select(0, position).view(n_tok, k, y.shape[1])
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), gathered).squeeze(1)


def _check_weight_dtype(weight_dtype: Any, with_logits: bool) -> torch.dtype | None:
    """``None`` or a floating ``torch.dtype`` (the dtype of weights built without logits; with
    logits the weights take the logits' dtype, so a ``weight_dtype`` beside them raises)."""
    if weight_dtype is None:
        return None
    if with_logits:
        raise TypeError("weight_dtype applies without logits only (with logits the weights take their dtype)")
    if not isinstance(weight_dtype, torch.dtype):
        raise TypeError(
            f"weight_dtype must be a floating torch.dtype such as torch.float32; got "
            f"{type(weight_dtype).__name__} {weight_dtype!r}"
        )
    if not weight_dtype.is_floating_point:
        raise TypeError(f"weight_dtype must be a floating torch.dtype (weights lie in [0, 1]); got {weight_dtype}")
    return weight_dtype


def _check_capacity(capacity: Any, device: torch.device) -> torch.Tensor:
    """Hard caps: whole numbers ``>= 0`` (checked on the host and for CPU tensors; on a GPU by a
    device-side assertion) → int64 ``[E]`` on ``device``."""
    if isinstance(capacity, torch.Tensor):
        if capacity.dtype == torch.bool or capacity.dtype.is_complex:
            raise TypeError(f"capacity must hold integers; got {capacity.dtype}")
        cap = capacity
        if cap.device.type == "cpu" and cap.numel():
            _check_capacity_values(to_numpy(cap))
        elif cap.device.type != "meta" and cap.numel():
            ok = (cap >= 0).all() & (cap == cap.trunc()).all() if cap.dtype.is_floating_point else (cap >= 0).all()
            torch._assert_async(ok, "capacity must hold whole numbers >= 0")
    else:
        check_plain_input("capacity", capacity)
        try:
            values = np.asarray(capacity.data if isinstance(capacity, np.ma.MaskedArray) else capacity)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"capacity must be a 1-D sequence of integers: {exc}") from None
        if values.dtype.kind not in "iuf":
            raise TypeError(f"capacity must hold integers; got dtype {values.dtype}")
        if values.size:
            _check_capacity_values(values)
        cap = torch.as_tensor(values.astype(np.int64))
    cap = cap.to(device=device, dtype=torch.int64)
    if cap.ndim != 1 or cap.shape[0] < 1:
        raise ValueError(f"capacity must be 1-D [E] with E >= 1; got shape {tuple(cap.shape)}")
    return cap


def _check_capacity_values(values: np.ndarray) -> None:
    if values.dtype.kind == "u" and (values > np.iinfo(np.int64).max).any():
        raise ValueError("capacity must hold values below 2^63 (int64)")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.floor(values)).any():
            bad = values[~np.isfinite(values) | (values != np.floor(values))].ravel()[0]
            raise ValueError(f"capacity must hold whole numbers (hard caps); got {bad}")
        if (np.abs(values) >= 2.0**63).any():
            raise ValueError("capacity must hold values below 2^63 (int64)")
    if (values < 0).any():
        raise ValueError(f"capacity must be >= 0; got minimum {values.min()}")


def _plan(
    experts: torch.Tensor,
    capacity: torch.Tensor,
    buffer_size: int,
    logits: torch.Tensor | None,
    weight_dtype: torch.dtype | None,
    offsets: tuple[int, ...] | None = None,
) -> RoutingPlan:
    """SPEC §15 slots, loads, weights and buffer positions: fixed shapes, no host synchronisation.

    ``offsets`` are the host packed offsets of ``capacity`` (``host_offsets``); without them they
    are read from ``capacity`` (a synchronisation when it lives on a GPU).
    """
    if offsets is None:
        if capacity.device.type == "meta":
            raise ValueError("a plan on the meta device needs host offsets (the caps have no values there)")
        offsets = host_offsets(capacity.detach().cpu().numpy())
    n_tok, k = experts.shape
    n_exp = int(capacity.shape[0])
    dev = experts.device
    flat = experts.reshape(-1)
    n = flat.shape[0]
    key = torch.where(flat >= 0, flat, n_exp)  # "no expert" (-1) sorts last, as group E
    # stable: row-major order inside each expert. The sort key is int32 (it sorts faster than
    # int64, E < 2^31) and indexes as it is; expert ids stay int64 everywhere else.
    sorted_key, order = torch.sort(key.to(torch.int32), stable=True)
    start = torch.searchsorted(sorted_key, torch.arange(n_exp + 1, device=dev, dtype=torch.int32))
    rank_sorted = torch.arange(n, device=dev, dtype=torch.int64) - start.index_select(0, sorted_key)
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    kept = rank < torch.cat([capacity, capacity.new_zeros(1)]).index_select(0, key)  # group E has capacity 0
    slot = torch.where(kept, rank, -1)
    tokens_per_expert = torch.minimum(start[1:] - start[:-1], capacity)
    position = torch.where(kept, key * buffer_size + rank, n_exp * buffer_size)
    offsets_tensor = torch.cat([capacity.new_zeros(1), torch.cumsum(capacity, 0)])
    packed_position = torch.where(kept, offsets_tensor.index_select(0, key) + rank, offsets[-1])  # key E: never kept
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
        offsets=offsets,
        offsets_tensor=offsets_tensor,
        _position=position,
        _packed_position=packed_position,
    )


def _gate_weights(logits: torch.Tensor, experts: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """softmax(logits) at the chosen experts, renormalised over the kept slots (0 where none kept).

    The softmax denominator over all ``E`` experts cancels in the renormalisation, so this is the
    softmax over the kept chosen logits only: O(T k), not O(T E).

    Non-finite logits never give weights outside ``[0, 1]`` (nor NaN): NaN counts as ``-inf``
    (weight 0); in a row whose largest kept logit is ``+inf``, the ``+inf`` slots share the
    weight equally (the softmax limit); a row whose kept logits are all ``-inf``/NaN is all 0.
    """
    work = logits if logits.dtype == torch.float64 else logits.float()
    chosen = work.gather(1, experts.clamp(min=0))
    masked = torch.where(kept & (chosen == chosen), chosen, -_INF)  # NaN != NaN: NaN counts as -inf
    # the row's largest kept logit; 0 for a row of -inf only (no kept finite slot); +inf stays +inf
    top = masked.detach().amax(dim=1, keepdim=True).nan_to_num(nan=0.0, posinf=_INF, neginf=0.0)
    # finite top: masked - top, at most 0. A +inf row: +inf - inf = NaN at its +inf slots, turned
    # into 0 (weight 1 before renormalising), and -inf elsewhere. exp never sees +inf, and
    # nan_to_num passes no gradient from the NaN entries, so no NaN gradient either.
    arg = (masked - top).nan_to_num(nan=0.0, posinf=_INF, neginf=-_INF)
    expo = torch.exp(arg)
    total = expo.sum(dim=1, keepdim=True)
    weights = expo / torch.where(total > 0, total, 1.0)  # a row with no kept slot: 0 / 1, no NaN
    return weights.to(logits.dtype)
