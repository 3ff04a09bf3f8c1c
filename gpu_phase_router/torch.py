"""PyTorch MoE router (SPEC §15): routes, hard caps, buffer slots, dispatch and combine.

``MoERouter`` turns a batch of router logits ``[T, E]`` (or just a token count) into a
:class:`RoutingPlan`: which ``k`` experts each token goes to, which of those slots survive the
experts' hard caps, where each kept slot sits in its expert's buffer, the gate weights, and
``dispatch`` / ``combine`` to move activations into ``[E, C, d]`` expert buffers and back.

The routes of the package's methods depend only on host-known values (``T``, the capacities,
``k``, ``seed + step``, ``density``, ``method``), so they are computed without looking at the
logits: with NumPy/Numba for CPU tensors, and on the GPU for CUDA tensors, queued on torch's
current stream. Capacity enforcement and slot positions are torch operations on the logits'
device with shapes fixed by ``T``, ``k`` and ``C = max(capacity)`` (known on the host): the
forward pass reads nothing back from the GPU.

Needs the optional extra ``torch`` (``pip install 'gpu_phase_router[torch]'``); ``import
gpu_phase_router`` alone never imports torch.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gpu_phase_router.torch needs PyTorch: pip install 'gpu_phase_router[torch]' (or install torch yourself)"
    ) from exc

from . import _prep
from ._arrays import on_caller_stream, to_numpy
from ._validate import SEED_LIMIT, check_density, check_int, check_k, check_seed, check_weights
from .methods import available_methods, route_uniform

LEARNED_METHOD = "topk"
_CAP_CACHE_SIZE = 8


def router_methods() -> list[str]:
    """Names accepted by ``MoERouter(method=...)``: the package's methods and ``"topk"``."""
    return [*available_methods(), LEARNED_METHOD]


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
    """

    experts: torch.Tensor
    weights: torch.Tensor
    slot: torch.Tensor
    capacity: torch.Tensor
    tokens_per_expert: torch.Tensor
    buffer_size: int
    _position: torch.Tensor = field(repr=False)  # int64 [T*k]: e * C + slot if kept, else E * C

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


# --- the router --------------------------------------------------------------------------------------


def _check_factor(capacity_factor: Any) -> float:
    if isinstance(capacity_factor, (bool, np.bool_)) or not isinstance(capacity_factor, numbers.Real):
        raise TypeError(f"capacity_factor must be a positive real number; got {type(capacity_factor).__name__}")
    value = float(capacity_factor)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"capacity_factor must be finite and > 0; got {capacity_factor}")
    return value


@on_caller_stream
def _routes_on_stream(
    anchor: torch.Tensor, method: str, n_tok: int, caps: np.ndarray, options: dict[str, Any]
) -> torch.Tensor:
    """int32 ``[T, k]`` routes on ``anchor``'s device: NumPy/Numba for CPU tensors (shared with
    ``torch.from_numpy``), the CUDA backend for CUDA tensors, queued on torch's current stream
    (``on_caller_stream``) and shared through DLPack."""
    if anchor.device.type == "cpu":
        return torch.from_numpy(route_uniform(method, "cpu", n_tok, caps, **options))
    out = route_uniform(method, "cuda", n_tok, caps, **options)
    if isinstance(out, np.ndarray):  # a backend that computed on the host
        return torch.from_numpy(out).to(anchor.device)
    return torch.from_dlpack(out)


class MoERouter(nn.Module):
    """Capacity-aware token → expert router for MoE training (SPEC §15); no parameters.

    Each call routes with seed ``seed + step`` (mod 2^64) and then increments ``step``, so a run
    that restores ``step`` (an attribute, also saved in ``state_dict``) reproduces its routes.

    Args:
        num_experts: ``E >= 1``.
        k: experts per token, ``1 <= k <= E``.
        capacities: optional ``[E]`` relative expert capacities (finite, ``>= 0``, one positive;
            a sequence, NumPy array or CPU tensor); default all equal. Zero = never receives.
        method: a routing method of the package (``"phase"``, ``"systematic"``,
            ``"weighted_hash"``, ``"hash"``, …) or ``"topk"`` (the learned baseline: the ``k``
            largest logits, same capacity enforcement).
        capacity_factor: ``h > 0``; hard caps ``max(1, ceil(cap / sum(cap) * T * k * h))``.
        seed: base seed in ``[0, 2^64)``.
        density: the phase router's density in ``(0, 1]``; ``None`` = the method's default.
        validate: check in every forward that the logits are finite (costs one synchronisation
            on CUDA).
    """

    def __init__(
        self,
        num_experts: int,
        k: int,
        capacities: Any = None,
        *,
        method: str = "phase",
        capacity_factor: float = 1.25,
        seed: int = 0,
        density: float | None = None,
        validate: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, lo=1)
        self.k = check_k(k, self.num_experts)
        if not isinstance(method, str) or method not in router_methods():
            raise ValueError(f"method must be one of {router_methods()}; got {method!r}")
        self.method = method
        if capacities is None:
            caps = np.ones(self.num_experts, dtype=np.float64)
        else:
            if isinstance(capacities, torch.Tensor) and capacities.device.type != "cpu":
                raise TypeError(
                    "capacities must be host values (a sequence, NumPy array or CPU tensor); "
                    f"got a tensor on {capacities.device}"
                )
            caps = check_weights(np, "capacities", to_numpy(capacities))
            if caps.shape[0] != self.num_experts:
                raise ValueError(f"capacities must have length num_experts={self.num_experts}; got {caps.shape[0]}")
        self.capacities = np.ascontiguousarray(caps, dtype=np.float64)
        self._share = self.capacities / _prep.tree_sum(np, self.capacities)
        self.capacity_factor = _check_factor(capacity_factor)
        self.seed = check_seed(seed)
        self.density = None if density is None else check_density(density)
        self.validate = bool(validate)
        self._step = 0
        self._caps_cache: OrderedDict[tuple[int, str], tuple[torch.Tensor, int]] = OrderedDict()

    # step: settable, checkpointed through get_extra_state / set_extra_state
    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = check_int("step", value, lo=0)

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = state["step"]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, method={self.method!r}, "
            f"capacity_factor={self.capacity_factor}, seed={self.seed}, step={self._step}"
        )

    def hard_caps(self, num_tokens: int) -> np.ndarray:
        """int64 ``[E]`` hard caps for a batch of ``num_tokens`` tokens (SPEC §15, host)."""
        n_tok = check_int("num_tokens", num_tokens, lo=1)
        hard = np.maximum(1.0, np.ceil(self._share * n_tok * self.k * self.capacity_factor)).astype(np.int64)
        return np.where(self.capacities == 0, 0, hard).astype(np.int64)

    def _caps_on(self, n_tok: int, device: torch.device) -> tuple[torch.Tensor, int]:
        key = (n_tok, str(device))
        hit = self._caps_cache.get(key)
        if hit is None:
            hard = self.hard_caps(n_tok)
            hit = (torch.from_numpy(hard).to(device), int(hard.max()))
            self._caps_cache[key] = hit
            if len(self._caps_cache) > _CAP_CACHE_SIZE:
                self._caps_cache.popitem(last=False)
        return hit

    def _check_logits(self, logits: Any) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor [T, E]; got {type(logits).__name__}")
        if not logits.dtype.is_floating_point:
            raise TypeError(f"logits must have a floating dtype; got {logits.dtype}")
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D [T, E]; got shape {tuple(logits.shape)}")
        if logits.shape[1] != self.num_experts:
            raise ValueError(
                f"logits must have E = num_experts = {self.num_experts} columns; got shape {tuple(logits.shape)}"
            )
        if logits.shape[0] < 1:
            raise ValueError("logits must have at least one row (T >= 1)")
        if self.validate and not bool(torch.isfinite(logits.detach()).all()):
            raise ValueError("logits must be finite (validate=True found NaN or inf)")
        return logits

    def routes(self, num_tokens: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The method's int64 ``[T, k]`` routes for ``num_tokens`` tokens and an explicit seed.

        Not for ``method="topk"`` (its routes come from the logits).
        """
        if self.method == LEARNED_METHOD:
            raise ValueError("method='topk' routes from logits; call the router with logits")
        n_tok = check_int("num_tokens", num_tokens, lo=1)
        seed = check_seed(seed)
        options: dict[str, Any] = {"k": self.k, "seed": seed}
        if self.density is not None:
            options["density"] = self.density
        anchor = torch.empty(0, device=device)
        return _routes_on_stream(anchor, self.method, n_tok, self.capacities, options).to(torch.int64)

    def forward(
        self,
        logits: torch.Tensor | None = None,
        *,
        num_tokens: int | None = None,
        device: torch.device | str | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> RoutingPlan:
        """Route one batch and advance ``step``.

        Args:
            logits: ``[T, E]`` router logits (any float dtype, any device), or ``None``.
            num_tokens: ``T`` when no logits are given (weights are then ``1/k`` per kept slot).
            device: device of the plan without logits (default CPU).
            weight_dtype: dtype of the weights without logits (default float32).

        Returns:
            The :class:`RoutingPlan` (tensors on the logits' device).
        """
        if logits is not None:
            if num_tokens is not None or device is not None:
                raise TypeError("give either logits or num_tokens (and device), not both")
            logits = self._check_logits(logits)
            n_tok, dev = int(logits.shape[0]), logits.device
        else:
            if num_tokens is None:
                raise TypeError("MoERouter needs logits [T, E] or num_tokens=T")
            if self.method == LEARNED_METHOD:
                raise ValueError("method='topk' needs logits; num_tokens alone cannot choose experts")
            n_tok = check_int("num_tokens", num_tokens, lo=1)
            dev = torch.device(device) if device is not None else torch.device("cpu")
        capacity, buffer_size = self._caps_on(n_tok, dev)
        if self.method == LEARNED_METHOD:
            assert logits is not None
            experts = torch.topk(logits.detach(), self.k, dim=1).indices
        else:
            experts = self.routes(n_tok, (self.seed + self._step) % SEED_LIMIT, dev)
        self._step += 1
        return _plan(experts, capacity, buffer_size, logits, weight_dtype)


__all__ = ["MoERouter", "RoutingPlan", "router_methods"]
