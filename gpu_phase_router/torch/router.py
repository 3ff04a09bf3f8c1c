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
from .._tree import tree_sum
from .._validate import SIZE_LIMIT, check_density, check_int, check_k, check_seed, check_sum, check_weights
from ..methods import available_methods
from . import learned
from ._checkpoint import in_backward, replayed_state
from ._ops import hard_caps_host, split_seed, uniform_routes
from ._plan import RoutingPlan, _check_weight_dtype, _plan, host_offsets

LEARNED_METHOD = "topk"
LEARNED_METHODS = learned.LEARNED_METHODS
_CAP_CACHE_SIZE = 8


class _GroupRef:
    """Holds a ``MoERouter``'s ``torch.distributed`` group, which can be neither copied nor pickled.

    A deep copy of the router (an EMA or teacher model made with ``copy.deepcopy``) shares the group,
    as the copy runs on the same ranks; pickling the router (``torch.save(model)``, sending it to a
    worker process) raises a ``TypeError`` that names the ways out, where the group's own error does not.
    """

    __slots__ = ("group",)

    def __init__(self, group: Any) -> None:
        self.group = group

    def __copy__(self) -> _GroupRef:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _GroupRef:
        return self

    def __reduce__(self) -> Any:
        if self.group is None:
            return (_GroupRef, (None,))
        raise TypeError(
            "a MoERouter with a process_group cannot be pickled (torch.save(model), multiprocessing): "
            "a torch.distributed group does not pickle. Save model.state_dict() instead, or set "
            "router.process_group = None before pickling and give the group again afterwards"
        )


def router_methods() -> list[str]:
    """Names accepted by ``MoERouter(method=...)``: the package's methods, ``"topk"`` and
    ``"expert_choice"``."""
    return [*available_methods(), *LEARNED_METHODS]


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
    """Capacity-aware token → expert router for MoE training (SPEC §15, §16); no parameters.

    The default, ``method="topk"``, is the learned gate made capacity-aware (SPEC §16): each
    token takes its ``k`` largest ``logits + expert_bias``; in training mode the float32 buffer
    ``expert_bias [E]`` (in ``state_dict``) moves every expert's selected load towards its
    capacity share, as ``BatchNorm`` updates its running statistics; an expert over its hard cap
    keeps its highest-scoring slots and the others are rerouted to the token's best expert with
    room left. The content-blind methods (``"phase"``, ``"systematic"``, ``"weighted_hash"``,
    ``"hash"``) route without looking at the logits: each call routes with seed ``seed + step``
    (mod 2^64).

    In training mode (``module.train()``, the default) a call then increments ``step``; in
    evaluation mode (``module.eval()``) it does not, and the bias is frozen, so evaluating between
    training steps leaves the training run unchanged. ``seed``, ``step`` (the module's extra state)
    and ``expert_bias`` are saved in ``state_dict``, so loading a checkpoint resumes exactly. The
    configuration (capacities, ``k``, method and options) is not saved: build the router as it was
    for an exact resume (a bias loaded under other capacities then moves towards their shares).

    One router serves one training loop: calls of the same router from several threads at once
    route with steps and biases that depend on their timing (give each thread its own router).

    ``torch.compile`` traces the router: the content-blind methods' routes are the registered
    custom op ``gpu_phase_router::uniform_routes`` (the step a runtime input, so compiled training
    does not recompile per step), the hard caps are trace-time constants of ``T`` (a new batch
    size compiles once more; with ``fullgraph=True`` and varying ``T`` compile with
    ``dynamic=False``, as ``dynamic=True`` needs ``fullgraph=False``; past torch's
    ``recompile_limit`` of batch sizes a call site runs eager, or with ``fullgraph=True`` raises,
    so pad variable-length batches to a few sizes), and the learned methods are plain torch.
    ``fullgraph=True`` works for every method.

    Args:
        num_experts: ``E >= 1``.
        k: experts per token, ``1 <= k <= E``.
        capacities: optional ``[E]`` relative expert capacities (finite, ``>= 0``, one positive;
            a sequence, NumPy array or CPU tensor; a masked array with masked entries is
            rejected); default all equal. Zero = never receives.
        method: ``"topk"`` (default: learned, capacity-aware), ``"expert_choice"`` (expert ``e``
            takes its ``capacity[e]`` highest-scoring tokens; reads the whole batch, so not for
            autoregressive use; the plan has ``E`` slot columns, column ``e`` for expert ``e``),
            or a content-blind method of the package (``"phase"``, ``"systematic"``,
            ``"weighted_hash"``, ``"hash"``, …).
        balance: ``method="topk"`` only. ``"bias"`` (default): the capacity bias above;
            ``"aux"``: no bias, ``plan.aux_loss`` and ``plan.z_loss`` for the training loss;
            ``None``: neither.
        overflow: ``method="topk"`` only. ``"reroute"`` (default): slots over a cap go to the
            token's best expert with room, in ``reroute_rounds`` rounds; ``"drop"``: they are
            dropped. Either way an expert over its cap drops its lowest-scoring slots.
        reroute_rounds: rerouting rounds ``>= 0`` (default 8: measured, 4 left the character LM of
            ``benchmarks/bench_char_lm.py`` at 99.2 % of its training slots served at the strong
            profile, 8 at 99.99 %; on the CPU the rounds stop once every slot is placed).
        bias_rate: the bias step per training call, ``>= 0`` (default ``1e-2``, on the logits).
        capacity_factor: ``h > 0``; hard caps ``max(1, ceil(cap / sum(cap) * T * k * h))``
            (caps beyond int64 raise ``ValueError``, here for ``T = 1`` and at a call for its ``T``).
        eval_capacity_factor: the factor in eval mode: ``None`` (default) = ``capacity_factor``;
            a float ``> 0``; ``math.inf`` = no hard caps in eval mode (every routed slot kept).
        process_group: ``torch.distributed`` group over which ``balance="bias"`` sums the routed
            counts before each update, so every data-parallel rank keeps the same bias. Give it
            after ``init_process_group`` (``dist.group.WORLD`` is ``None`` before, which means no
            sum). Each training call is a collective: every rank of the group makes the same
            training calls in the same order (``T`` may differ, ``0`` included: a rank out of data
            calls with a ``[0, E]`` batch; DDP's ``join()`` does not cover this collective, as it
            does not cover ``SyncBatchNorm``'s); evaluation mode calls none.
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
        method: str = "topk",
        balance: str | None = "bias",
        overflow: str = "reroute",
        reroute_rounds: int = 8,
        bias_rate: float = 1e-2,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float | None = None,
        process_group: Any = None,
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
            check_sum(np, "capacities", caps)
        self.capacities = np.ascontiguousarray(caps, dtype=np.float64)
        self._cap_values = tuple(float(c) for c in self.capacities)
        self.capacity_factor = _check_factor(capacity_factor)
        hard_caps_host(self._cap_values, 1, self.k, self.capacity_factor)  # caps beyond int64 raise now
        self._share = self.capacities / tree_sum(np, self.capacities)
        self._share_values = tuple(float(v) for v in self._share)  # Python floats: constants under compile
        options = learned.check_options(
            method, balance, overflow, reroute_rounds, bias_rate, eval_capacity_factor, process_group
        )
        self.balance, self.overflow, self.reroute_rounds, self.bias_rate, self.eval_capacity_factor = options
        if self.eval_capacity_factor is not None and math.isfinite(self.eval_capacity_factor):
            try:  # caps beyond int64 raise now, naming the eval factor
                hard_caps_host(self._cap_values, 1, self.k, self.eval_capacity_factor)
            except ValueError:
                raise ValueError(
                    f"eval_capacity_factor={eval_capacity_factor} gives hard caps beyond int64 (2^63 - 1); "
                    "use a smaller factor, or math.inf for no caps in eval mode"
                ) from None
        self._group_ref = _GroupRef(process_group)
        self.expert_bias: torch.Tensor
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self._share_cache: dict[str, torch.Tensor] = {}
        self.seed = check_seed(seed)
        if density is not None and method in LEARNED_METHODS:
            raise ValueError(f"density applies to the package's routing methods; method={method!r} takes none")
        self.density = None if density is None else check_density(density)
        self.validate = bool(validate)
        # a host (CPU) tensor, not a buffer: it stays on the host when the module moves, so the
        # routing op reads it without a device synchronisation; compiled graphs take it as input.
        # On the CPU whatever the default device (a router built under `with torch.device("meta")`)
        self._step_counter = torch.zeros((), dtype=torch.int64, device="cpu")
        self._caps_cache: OrderedDict[tuple[tuple[int, ...], str], torch.Tensor] = OrderedDict()

    def _apply(self, fn: Any, recurse: bool = True) -> MoERouter:
        """``Module.to``/``.half()``/``.cuda()`` and the like move ``expert_bias`` but keep it float32
        (SPEC §16: in bfloat16 a ``1e-2`` step rounds away once ``|b| >= 4``)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device)
        if bias.is_meta and not self.expert_bias.is_meta:  # to_empty: no values came along; start at 0
            with torch.no_grad():
                self.expert_bias.zero_()
        return self

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """``load_state_dict(..., assign=True)`` takes the saved tensor itself: keep ``expert_bias``
        float32 (SPEC §16) when a checkpoint holds it in another dtype."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.to(torch.float32)

    def reset_parameters(self) -> None:
        """The state at construction: ``expert_bias`` zero, ``step`` 0 (the seed stays); the hook
        that FSDP and ``to_empty`` initialisation recipes call on each module that has one."""
        with torch.no_grad():
            self.expert_bias.zero_()
        self.step = 0

    # step: settable, checkpointed (with the seed) through get_extra_state / set_extra_state
    @property
    def step(self) -> int:
        """Training calls made so far (the next call routes with ``seed + step``)."""
        return int(self._step_counter)

    @step.setter
    def step(self, value: int) -> None:
        self._plain_counter().fill_(check_int("step", value, lo=0, hi=(1 << 63) - 1))

    def _plain_counter(self) -> torch.Tensor:
        """The step counter, made a normal tensor again where a compiled call under
        ``torch.inference_mode`` replaced it by an inference tensor (which nothing may update in
        place outside inference mode)."""
        if self._step_counter.is_inference() and not torch.is_inference_mode_enabled():
            self._step_counter = self._step_counter.clone()
        return self._step_counter

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"MoERouter state must be a dict with 'step' (and 'seed'); got {state!r}")
        if "seed" in state:
            self.seed = check_seed(state["seed"])
        self.step = state["step"]

    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` group over which ``balance="bias"`` sums the routed counts, or
        ``None``. Settable (checked as in the constructor); deep copies share it; see ``__init__``."""
        return self._group_ref.group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        learned.check_options(
            self.method,
            self.balance,
            self.overflow,
            self.reroute_rounds,
            self.bias_rate,
            self.eval_capacity_factor,
            group,
        )
        self._group_ref = _GroupRef(group)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, method={self.method!r}, "
            + (
                f"balance={self.balance!r}, overflow={self.overflow!r}, reroute_rounds={self.reroute_rounds}, "
                if self.method == LEARNED_METHOD
                else ""
            )
            + f"capacity_factor={self.capacity_factor}, seed={self.seed}, step={self.step}"
        )

    def _factor(self, training: bool | None = None) -> float:
        """The capacity factor of a mode (default: the current one; eval mode: ``eval_capacity_factor`` if set)."""
        if not (self.training if training is None else training) and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def hard_caps(self, num_tokens: int) -> np.ndarray:
        """int64 ``[E]`` hard caps for a batch of ``num_tokens`` tokens (SPEC §15, host), with the
        current mode's capacity factor.

        SPEC §12's rule (:func:`gpu_phase_router.capacity.hard_caps`) with ``n_src = T`` and
        ``headroom`` the factor; ``T = 0`` gives caps of 1 (0 for zero capacities). An infinite
        factor (eval mode) gives ``T`` for ``method="topk"`` and ``T * k`` for the other methods
        (SPEC §16).
        """
        n_tok = check_int("num_tokens", num_tokens, lo=0, hi=SIZE_LIMIT)
        return np.asarray(self._hard_caps(n_tok)[0], dtype=np.int64)

    def _hard_caps(self, n_tok: int, training: bool | None = None) -> tuple[tuple[int, ...], int]:
        """``(caps, C)`` as host integers for a mode (default: the current one)."""
        factor = self._factor(training)
        if math.isinf(factor):
            full = n_tok if self.method == LEARNED_METHOD else n_tok * self.k
            values = tuple(0 if c == 0 else full for c in self._cap_values)
            return values, max(1, *values)
        return hard_caps_host(self._cap_values, n_tok, self.k, factor)

    def _share_on(self, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a constant of the compiled graph
            return torch.tensor(self._share_values, dtype=torch.float64, device=device)
        key = str(device)
        if key not in self._share_cache:
            self._share_cache[key] = torch.from_numpy(self._share).to(device)
        return self._share_cache[key]

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

        Not for the learned methods (their routes come from the logits).
        """
        if self.method in LEARNED_METHODS:
            raise ValueError(f"method={self.method!r} routes from logits; call the router with logits")
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
        weight_dtype = _check_weight_dtype(weight_dtype, with_logits=logits is not None)
        if logits is not None:
            if num_tokens is not None or device is not None:
                raise TypeError("give either logits or num_tokens (and device), not both")
            logits = self._check_logits(logits)
            # int(): the hard caps and C depend on T, so a compiled graph specialises on it
            n_tok, dev = int(logits.shape[0]), logits.device
        else:
            if num_tokens is None:
                raise TypeError("MoERouter needs logits [T, E] or num_tokens=T")
            if self.method in LEARNED_METHODS:
                raise ValueError(f"method={self.method!r} needs logits; num_tokens alone cannot choose experts")
            n_tok = check_int("num_tokens", num_tokens, lo=0, hi=SIZE_LIMIT)
            dev = _check_device(device)
        replay = None if torch.compiler.is_compiling() else replayed_state(self)
        if replay is None and not torch.compiler.is_compiling() and in_backward():
            raise RuntimeError(
                "MoERouter: a call inside a backward pass (a checkpointed function recomputed?) would route "
                "with the state and mode of now, not of its forward (in training mode it would also advance "
                "step and expert_bias twice); checkpoint with torch.utils.checkpoint.checkpoint(..., "
                "use_reentrant=False, context_fn=gpu_phase_router.torch.checkpoint_context)"
            )
        if replay is None:  # route with the live state, then update it in training mode
            seed, step, bias, training = self.seed, self._step_counter, self.expert_bias, self.training
        else:  # a recomputation: the state its forward used, and no update (SPEC §15)
            seed, step, bias, training = replay.seed, replay.step, replay.bias, replay.training
        update = self.training and replay is None
        cap_values, buffer_size = self._hard_caps(n_tok, training)
        capacity = self._caps_on(cap_values, dev)
        offsets = host_offsets(cap_values)
        if self.method == LEARNED_METHOD:
            assert logits is not None
            rounds = self.reroute_rounds if self.overflow == "reroute" else 0
            meta = dev.type == "meta"  # a plan of shapes only: a meta view of the bias, no update
            plan = learned.topk_plan(
                logits, capacity, buffer_size, k=self.k, bias=bias.to(dev) if meta else bias,
                share=self._share_on(dev), balance=self.balance, rounds=rounds, rate=self.bias_rate,
                update=update and not meta, process_group=self.process_group, offsets=offsets,
            )  # fmt: skip
        elif self.method == "expert_choice":
            assert logits is not None
            plan = learned.expert_choice_plan(logits, capacity, buffer_size, offsets, requested_k=self.k)
        else:
            anchor = logits.detach() if logits is not None else torch.empty(0, device=dev)
            experts = self._uniform(anchor, n_tok, step, seed)
            plan = _plan(experts, capacity, buffer_size, logits, weight_dtype, offsets=offsets)
        if update:
            if torch.compiler.is_compiling():  # out of place: a compiled recomputation reads the old tensor
                self._step_counter = self._step_counter + 1
            else:  # in place, as before: copies that share the counter (nn.DataParallel replicas) count too
                self._plain_counter().add_(1)
        return plan


__all__ = ["MoERouter", "router_methods"]
