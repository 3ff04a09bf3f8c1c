"""What a call leaves to the garbage collector (tests/test_api.py, tests/test_torch_edges.py)."""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np


def _ours(obj: Any) -> bool:
    if isinstance(obj, types.FunctionType):
        return (obj.__module__ or "").startswith("gpu_phase_router")
    if isinstance(obj, types.FrameType):
        return "gpu_phase_router" in obj.f_code.co_filename
    if type(obj).__module__.startswith("gpu_phase_router") or isinstance(obj, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    # plain tensors only: the FakeTensors a torch.compile trace leaves are collected at some later
    # eager call, whoever makes it
    return torch is not None and type(obj) in (torch.Tensor, torch.nn.Parameter)


def garbage_of_ours(call: Callable[[], Any]) -> list[str]:
    """Run ``call()`` and name the package's objects it left in reference cycles.

    The collector's garbage after the call is kept (``gc.DEBUG_SAVEALL``) and filtered to what the
    package made: functions and frames of its source files, instances of its classes, and arrays or
    tensors (a cycle holding an array keeps its memory until the next collection, which on a GPU is
    memory the next training step cannot reuse). Garbage of the test runner or the libraries is
    ignored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        call()
        gc.collect()
        return [f"{type(o).__name__} {getattr(o, '__qualname__', '')}".strip() for o in gc.garbage if _ours(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
