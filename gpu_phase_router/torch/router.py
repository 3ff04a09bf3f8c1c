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

from .._arrays import check_plain_input, to_numpy
from .._validate import SIZE_LIMIT, check_density, check_int, check_k, check_seed, check_weights
from ..methods import available_methods
from ._ops import hard_caps_host, split_seed, uniform_routes
from ._plan import RoutingPlan, _check_weight_dtype, _plan

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


def _check_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, (bool, np.bool_)) or not isinstance(device, (str, numbers.Integral)):
        raise TypeError(f"device must be a torch.device, a device string or index; got {type(device).__name__}")
    try:
        return torch.device(device if isinstance(device, str) else int(device))
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda:0'); got {device!r}: {exc}") from None


class MoERouter(nn.Module):
    """Capacity-aware token → expert router for MoE training (SPEC §15); no parameters.

    Each call routes with seed ``seed + step`` (mod 2^64). In training mode (``module.train()``,
    the default) a call then increments ``step``; in evaluation mode (``module.eval()``) it does
    not, so evaluating between training steps leaves the training run's routes unchanged. ``seed``
    and ``step`` are saved in ``state_dict`` (as the module's extra state), so loading a checkpoint
    resumes the routes exactly.

    ``torch.compile`` traces the router: the content-blind methods' routes are the registered
    custom op ``gpu_phase_router::uniform_routes`` (the step a runtime input, so compiled training
    does not recompile per step), the hard caps are trace-time constants of ``T`` (a new batch
    size compiles once more; with ``fullgraph=True`` and varying ``T`` compile with
    ``dynamic=False``), and ``method="topk"`` is plain torch. ``fullgraph=True`` works for every
    method.

    Args:
        num_experts: ``E >= 1``.
        k: experts per token, ``1 <= k <= E``.
        capacities: optional ``[E]`` relative expert capacities (finite, ``>= 0``, one positive;
            a sequence, NumPy array or CPU tensor; a masked array with masked entries is
            rejected); default all equal. Zero = never receives.
        method: a routing method of the package (``"phase"``, ``"systematic"``,
            ``"weighted_hash"``, ``"hash"``, …) or ``"topk"`` (the learned baseline: the ``k``
            largest logits, same capacity enforcement).
        capacity_factor: ``h > 0``; hard caps ``max(1, ceil(cap / sum(cap) * T * k * h))``
            (caps beyond int64 raise ``ValueError``, here for ``T = 1`` and at a call for its ``T``).
        seed: base seed in ``[0, 2^64)``.
        density: the phase router's density in ``(0, 1]``; ``None`` = the method's default.
        validate: check in every forward that the logits are finite (costs one synchronisation
            on CUDA; not done for ``meta`` tensors). Without it, non-finite logits still give
            weights in ``[0, 1]``: NaN and ``-inf`` count as ``-inf`` (weight 0), ``+inf``
            logits share their row's weight equally.
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
            check_plain_input("capacities", capacities)
            caps = check_weights(np, "capacities", to_numpy(capacities))
            if caps.shape[0] != self.num_experts:
                raise ValueError(f"capacities must have length num_experts={self.num_experts}; got {caps.shape[0]}")
        self.capacities = np.ascontiguousarray(caps, dtype=np.float64)
        self._cap_values = tuple(float(c) for c in self.capacities)
        self.capacity_factor = _check_factor(capacity_factor)
        hard_caps_host(self._cap_values, 1, self.k, self.capacity_factor)  # caps beyond int64 raise now
        self.seed = check_seed(seed)
        self.density = None if density is None else check_density(density)
        self.validate = bool(validate)
        # a host (CPU) tensor, not a buffer: it stays on the host when the module moves, so the
        # routing op reads it without a device synchronisation; compiled graphs take it as input
        self._step_counter = torch.zeros((), dtype=torch.int64)
        self._caps_cache: OrderedDict[tuple[tuple[int, ...], str], torch.Tensor] = OrderedDict()

    # step: settable, checkpointed (with the seed) through get_extra_state / set_extra_state
    @property
    def step(self) -> int:
        """Training calls made so far (the next call routes with ``seed + step``)."""
        return int(self._step_counter)

    @step.setter
    def step(self, value: int) -> None:
        self._step_counter.fill_(check_int("step", value, lo=0, hi=(1 << 63) - 1))

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        if "seed" in state:
            self.seed = check_seed(state["seed"])
        self.step = state["step"]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, method={self.method!r}, "
            f"capacity_factor={self.capacity_factor}, seed={self.seed}, step={self.step}"
        )

    def hard_caps(self, num_tokens: int) -> np.ndarray:
        """int64 ``[E]`` hard caps for a batch of ``num_tokens`` tokens (SPEC §15, host).

        SPEC §12's rule (:func:`gpu_phase_router.capacity.hard_caps`) with ``n_src = T`` and
        ``headroom = capacity_factor``; ``T = 0`` gives caps of 1 (0 for zero capacities).
        """
        n_tok = check_int("num_tokens", num_tokens, lo=0, hi=SIZE_LIMIT)
        return np.asarray(hard_caps_host(self._cap_values, n_tok, self.k, self.capacity_factor)[0], dtype=np.int64)

    def _caps_on(self, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a constant of the compiled graph
            return torch.tensor(values, dtype=torch.int64, device=device)
        key = (values, str(device))
        hit = self._caps_cache.get(key)
        if hit is None:
            hit = torch.tensor(values, dtype=torch.int64, device=device)
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
        if self.validate and logits.device.type != "meta" and not bool(torch.isfinite(logits.detach()).all()):
            raise ValueError("logits must be finite (validate=True found NaN or inf)")
        return logits

    def _uniform(self, anchor: torch.Tensor, n_tok: int, step: torch.Tensor, seed: int) -> torch.Tensor:
        lo, hi = split_seed(seed)
        return uniform_routes(anchor, step, self.method, n_tok, list(self._cap_values), self.k, lo, hi, self.density)

    def routes(self, num_tokens: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The method's int64 ``[T, k]`` routes for ``num_tokens`` tokens and an explicit seed.

        Not for ``method="topk"`` (its routes come from the logits).
        """
        if self.method == LEARNED_METHOD:
            raise ValueError("method='topk' routes from logits; call the router with logits")
        n_tok = check_int("num_tokens", num_tokens, lo=0, hi=SIZE_LIMIT)
        anchor = torch.empty(0, device=_check_device(device))
        return self._uniform(anchor, n_tok, torch.zeros((), dtype=torch.int64), check_seed(seed))

    def forward(
        self,
        logits: torch.Tensor | None = None,
        *,
        num_tokens: int | None = None,
        device: torch.device | str | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> RoutingPlan:
        """Route one batch; in training mode, then advance ``step``.

        Args:
            logits: ``[T, E]`` router logits (any float dtype, any device, ``T >= 0``), or ``None``.
            num_tokens: ``T >= 0`` when no logits are given (weights are then ``1/k`` per kept slot).
            device: device of the plan without logits (default CPU).
            weight_dtype: floating ``torch.dtype`` of the weights without logits (default float32).

        Returns:
            The :class:`RoutingPlan` (tensors on the logits' device). ``T = 0`` gives an empty plan
            (``[0, k]`` tensors) whose dispatch and combine work; a ``meta`` device gives a plan of
            shapes only.
        """
        weight_dtype = _check_weight_dtype(weight_dtype)
        if logits is not None:
            if num_tokens is not None or device is not None:
                raise TypeError("give either logits or num_tokens (and device), not both")
            logits = self._check_logits(logits)
            # int(): the hard caps and C depend on T, so a compiled graph specialises on it
            n_tok, dev = int(logits.shape[0]), logits.device
        else:
            if num_tokens is None:
                raise TypeError("MoERouter needs logits [T, E] or num_tokens=T")
            if self.method == LEARNED_METHOD:
                raise ValueError("method='topk' needs logits; num_tokens alone cannot choose experts")
            n_tok = check_int("num_tokens", num_tokens, lo=0, hi=SIZE_LIMIT)
            dev = _check_device(device)
        cap_values, buffer_size = hard_caps_host(self._cap_values, n_tok, self.k, self.capacity_factor)
        capacity = self._caps_on(cap_values, dev)
        if self.method == LEARNED_METHOD:
            assert logits is not None
            experts = torch.topk(logits.detach(), self.k, dim=1).indices
        else:
            anchor = logits.detach() if logits is not None else torch.empty(0, device=dev)
            experts = self._uniform(anchor, n_tok, self._step_counter, self.seed)
        if self.training:
            self._step_counter.add_(1)
        return _plan(experts, capacity, buffer_size, logits, weight_dtype)


__all__ = ["MoERouter", "router_methods"]
