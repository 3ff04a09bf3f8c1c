"""``MoERouter`` (SPEC §15): routes, hard caps and the routing plan of one batch.

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
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _prep
from .._arrays import on_caller_stream, to_numpy
from .._validate import SEED_LIMIT, check_density, check_int, check_k, check_seed, check_weights
from ..methods import available_methods, route_uniform
from ._plan import RoutingPlan, _plan, host_offsets

LEARNED_METHOD = "topk"
_CAP_CACHE_SIZE = 8


def router_methods() -> list[str]:
    """Names accepted by ``MoERouter(method=...)``: the package's methods and ``"topk"``."""
    return [*available_methods(), LEARNED_METHOD]


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
        self._caps_cache: OrderedDict[tuple[int, str], tuple[torch.Tensor, int, tuple[int, ...]]] = OrderedDict()

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

    def _caps_on(self, n_tok: int, device: torch.device) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        """(hard caps on ``device``, ``C = max(caps)``, packed offsets), the last two host values."""
        key = (n_tok, str(device))
        hit = self._caps_cache.get(key)
        if hit is None:
            hard = self.hard_caps(n_tok)
            hit = (torch.from_numpy(hard).to(device), int(hard.max()), host_offsets(hard))
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
        capacity, buffer_size, offsets = self._caps_on(n_tok, dev)
        if self.method == LEARNED_METHOD:
            assert logits is not None
            experts = torch.topk(logits.detach(), self.k, dim=1).indices
        else:
            experts = self.routes(n_tok, (self.seed + self._step) % SEED_LIMIT, dev)
        self._step += 1
        return _plan(experts, capacity, buffer_size, logits, weight_dtype, offsets=offsets)


__all__ = ["MoERouter", "router_methods"]
