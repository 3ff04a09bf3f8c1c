"""PyTorch MoE router (SPEC §15): routes, hard caps, buffer slots, dispatch and combine.

``MoERouter`` turns a batch of router logits ``[T, E]`` (or just a token count) into a
:class:`RoutingPlan`: which ``k`` experts each token goes to, which of those slots survive the
experts' hard caps, where each kept slot sits in its expert's buffer, the gate weights, and
``dispatch`` / ``combine`` to move activations into expert buffers and back.

Modules: ``_plan`` (the plan and its dispatch/combine), ``router`` (``MoERouter``), ``learned``
(SPEC §16: the default learned top-k with a capacity bias and rerouting, and expert choice),
``parallel`` (``ExpertParallel``: experts on several ranks over ``torch.distributed``), ``_ops``
(the routing custom op that ``torch.compile`` traces), ``_checkpoint`` (``checkpoint_context``:
activation checkpointing of layers with a router).

Needs the optional extra ``torch`` (``pip install 'gpu_phase_router[torch]'``); ``import
gpu_phase_router`` alone never imports torch.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gpu_phase_router.torch needs PyTorch: pip install 'gpu_phase_router[torch]' (or install torch yourself)"
    ) from exc

from ._checkpoint import checkpoint_context
from ._plan import RoutingPlan
from .parallel import ExpertParallel, ExpertParallelHandle
from .router import MoERouter, router_methods

__all__ = [
    "ExpertParallel",
    "ExpertParallelHandle",
    "MoERouter",
    "RoutingPlan",
    "checkpoint_context",
    "router_methods",
]
