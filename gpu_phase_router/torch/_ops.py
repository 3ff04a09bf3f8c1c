"""Registered torch custom ops for the routing work that leaves torch (SPEC §15, ``torch.compile``).

The content-blind methods compute their routes with NumPy/Numba (CPU tensors) or the CUDA
backend (CUDA tensors). Wrapped as ``torch.library`` custom ops with fake implementations,
``torch.compile`` (Dynamo, AOTAutograd, Inductor) sees one opaque node with a known
``[T, k]`` int64 output instead of tracing into NumPy, Numba or CuPy; a ``meta`` tensor gets the
fake implementation's shape-only result.

Custom-op integers are int64, so the seed (in ``[0, 2^64)``) travels as two 32-bit halves, and
the router's ``step`` as a 0-d int64 CPU tensor read inside the op: a compiled graph takes the
step as a runtime input, so it is neither baked into the graph nor a reason to recompile.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from .._arrays import on_caller_stream
from .._validate import SEED_LIMIT
from ..capacity import hard_caps

_HALF = 1 << 32
_Caps = tuple[tuple[int, ...], int]  # (hard caps, buffer length C)


def split_seed(seed: int) -> tuple[int, int]:
    """``(low, high)`` 32-bit halves of a seed in ``[0, 2^64)`` (custom-op integers are int64)."""
    return seed % _HALF, seed // _HALF


@on_caller_stream
def _routes_on_stream(anchor: torch.Tensor, method: str, spec: Any, seed: int) -> torch.Tensor:
    """int32 ``[T, k]`` routes of a validated spec on ``anchor``'s device: NumPy/Numba for CPU
    tensors (shared with ``torch.from_numpy``), the CUDA backend for CUDA tensors, queued on
    torch's current stream (``on_caller_stream``) and shared through DLPack. On a device without
    kernels of ours (Apple ``mps``, ``xpu``) the routes, which depend on ``T`` and the seed alone,
    are computed on the CPU and copied there."""
    from ..methods import run_uniform

    out = run_uniform(method, "cuda" if anchor.device.type == "cuda" else "cpu", spec, seed)
    if isinstance(out, np.ndarray):  # computed on the host: shared as is on the CPU, else copied
        return torch.from_numpy(out).to(anchor.device)
    return torch.from_dlpack(out)


@torch.library.custom_op("gpu_phase_router::uniform_routes", mutates_args=())
def uniform_routes(
    anchor: torch.Tensor,
    step: torch.Tensor,
    method: str,
    num_tokens: int,
    capacities: list[float],
    k: int,
    seed_lo: int,
    seed_hi: int,
    density: float | None,
) -> torch.Tensor:
    """int64 ``[T, k]`` routes of ``method`` with seed ``(seed + step) mod 2^64`` on ``anchor``'s device.

    Args:
        anchor: any tensor on the device of the result (its data is not read).
        step: 0-d int64 CPU tensor, the router's step (read on the host: no device sync).
        method: a content-blind method of the package.
        num_tokens: ``T >= 0`` (``T = 0`` gives an empty ``[0, k]`` result).
        capacities: relative expert capacities (host floats).
        k: experts per token.
        seed_lo, seed_hi: the base seed's 32-bit halves (see :func:`split_seed`).
        density: the phase router's density, or ``None`` for the method's default.
    """
    if num_tokens == 0:
        return torch.empty((0, k), dtype=torch.int64, device=anchor.device)
    from ..methods import cached_uniform_spec

    seed = (seed_lo + seed_hi * _HALF + int(step)) % SEED_LIMIT
    spec = cached_uniform_spec(method, num_tokens, tuple(capacities), k, density)  # validated once per T
    return _routes_on_stream(anchor, method, spec, seed).to(torch.int64)


@uniform_routes.register_fake
def _uniform_routes_fake(
    anchor: torch.Tensor,
    step: torch.Tensor,
    method: str,
    num_tokens: int,
    capacities: list[float],
    k: int,
    seed_lo: int,
    seed_hi: int,
    density: float | None,
) -> torch.Tensor:
    return anchor.new_empty((num_tokens, k), dtype=torch.int64)


@torch.compiler.assume_constant_result
def hard_caps_host(capacities: tuple[float, ...], num_tokens: int, k: int, factor: float) -> _Caps:
    """``(hard caps, C = max(1, max(caps)))`` as host integers (SPEC §15 via SPEC §12's rule).

    A constant for ``torch.compile`` (computed once at trace time from host values, never traced
    into NumPy); cached for eager calls.
    """
    return _hard_caps_cached(capacities, num_tokens, k, factor)


@functools.lru_cache(maxsize=64)
def _hard_caps_cached(capacities: tuple[float, ...], num_tokens: int, k: int, factor: float) -> _Caps:
    hard = hard_caps(np.asarray(capacities, dtype=np.float64), num_tokens, k, factor, factor_name="capacity_factor")
    values = tuple(int(v) for v in hard)
    return values, max(1, *values)


__all__ = ["hard_caps_host", "split_seed", "uniform_routes"]
