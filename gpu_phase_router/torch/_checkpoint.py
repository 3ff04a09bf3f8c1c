"""Activation checkpointing of layers that contain a ``MoERouter`` (SPEC §15, *Recomputation*).

``torch.utils.checkpoint`` runs a checkpointed function a second time during the backward pass to
rebuild the activations it did not keep. A router's forward reads and changes state (``step``,
``expert_bias``), so a plain second run routes with the state the first run left behind: the
content-blind methods draw other routes, the learned gate sees another bias, and the state
advances twice. :func:`checkpoint_context` gives ``checkpoint(..., use_reentrant=False)`` the two
contexts that make the recomputation exact: the forward context records the state each router call
used, the recomputation context replays it (the same routes, no state change).

The records live on a frame per checkpointed call, so any schedule of forwards and backwards
(gradient accumulation, pipeline schedules, ``retain_graph=True``, nested checkpoints) replays each
call with its own state. The contexts are kept per thread: the recomputation runs in the thread of
the autograd engine, inside the recomputation context.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CallState:
    """What one router call routed with: the seed, a copy of the step counter and of the bias, the mode."""

    router: Any
    seed: int
    step: torch.Tensor
    bias: torch.Tensor
    training: bool


@dataclass
class _Frame:
    """The router calls of one checkpointed call, in call order."""

    calls: list[CallState] = field(default_factory=list)


class _Context:
    """Pushes ``(mode, frame)`` on this thread's stack for its ``with`` block; reusable, as a
    recomputation context must be when a graph is run backward twice (``retain_graph=True``)."""

    def __init__(self, mode: str, frame: _Frame) -> None:
        self.mode, self.frame = mode, frame
        self._cursors: list[int] = []

    def __enter__(self) -> _Context:
        stack = _stack()
        stack.append(self)
        self._cursors.append(0)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack().remove(self)
        self._cursors.pop()

    def next_call(self, router: Any) -> CallState:
        """The recorded state of the next router call of this replay (calls come in recorded order)."""
        at = self._cursors[-1]
        calls = self.frame.calls
        if at >= len(calls) or calls[at].router is not router:
            raise RuntimeError(
                "MoERouter: the recomputation of a checkpointed function called the routers in another "
                "order (or more often) than its forward did; checkpoint_context needs the same calls in "
                "the same order"
            )
        self._cursors[-1] = at + 1
        return calls[at]


_local = threading.local()


def _stack() -> list[_Context]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def checkpoint_context() -> tuple[_Context, _Context]:
    """The ``context_fn`` of ``torch.utils.checkpoint.checkpoint`` for functions that call a ``MoERouter``.

    Pass the function itself (not its result)::

        from torch.utils.checkpoint import checkpoint
        from gpu_phase_router.torch import checkpoint_context

        y = checkpoint(moe_block, x, use_reentrant=False, context_fn=checkpoint_context)

    Each router call in the checkpointed forward records the state it routes with (seed, step,
    a copy of ``expert_bias``: ``E`` floats on the router's device, no synchronisation); in the
    recomputation during the backward pass the same call routes with that state and changes none
    (SPEC §15), so the recomputed plan equals the forward's and the state advances once. Without
    it, a router call inside a backward pass raises ``RuntimeError``. Reentrant checkpointing
    (``use_reentrant=True``) takes no ``context_fn``, and under ``torch.compile`` torch takes only
    ``TorchDispatchMode`` contexts: checkpoint the experts there, not the router.
    """
    frame = _Frame()
    return _Context("record", frame), _Context("replay", frame)


def replayed_state(router: Any) -> CallState | None:
    """For a router call: the recorded state to route with when it is a recomputation, else ``None``.

    The state the call routes with is also noted in every checkpointed forward running inside the
    innermost recomputation (or anywhere, without one), which their own recomputations read later.
    """
    stack = _stack()
    replays = [i for i, ctx in enumerate(stack) if ctx.mode == "replay"]
    inner = replays[-1] if replays else -1
    state = stack[inner].next_call(router) if replays else None
    recorders = [ctx for ctx in stack[inner + 1 :] if ctx.mode == "record"]
    if recorders:
        noted = state or CallState(
            router, router.seed, router._step_counter.clone(), router.expert_bias.detach().clone(), router.training
        )
        for ctx in recorders:
            ctx.frame.calls.append(noted)
    return state


def in_backward() -> bool:
    """Whether this thread is running a backward pass (the autograd engine's graph task)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


__all__ = ["CallState", "checkpoint_context", "in_backward", "replayed_state"]
