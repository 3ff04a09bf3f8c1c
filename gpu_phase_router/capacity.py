"""Capacity evaluation (SPEC §12): hard caps, enforcement, survival, load statistics, profiles.

These are the crate's evaluation helpers (``make_hard_caps``, ``enforce_capacity``,
``compute_loads``, ``load_stats``, ``survival_rate`` and the capacity profiles), rewritten so
that the array work runs in the module of the array it is given: NumPy arrays stay on the host,
CuPy arrays (and CUDA torch tensors) are processed on their device and returned there. No step
depends on a reduction order or a thread count, so every backend gets the same integers.

``-1`` in a routing table is an empty slot (the phase router pads short rows with it, and
enforcement writes it over dropped slots); it never counts as served.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import Namespace, array_namespace, to_numpy
from ._validate import check_real


def _namespace(x: Any, name: str) -> tuple[Any, Any, Namespace]:
    """``(xp, array, namespace)`` for ``x`` (the argument ``name``): the array in the module that
    computes on it in place."""
    ns = array_namespace(**{name: x})
    return ns.xp, ns.asarray(x), ns


def _check_routes(xp: Any, routes: Any, n_tgt: int | None, name: str = "routes", n_tgt_is: str = "n_tgt") -> Any:
    if routes.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_src, k]; got shape {tuple(routes.shape)}")
    if routes.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (targets or -1); got dtype {routes.dtype}")
    if routes.size:
        lo, hi = int(routes.min()), int(routes.max())
        if lo < -1:
            raise ValueError(f"{name} must hold targets >= 0 or -1 for an empty slot; got {lo}")
        if n_tgt is not None and hi >= n_tgt:
            raise ValueError(f"{name} must hold targets < {n_tgt_is}={n_tgt}; got {hi}")
    return routes


def _check_headroom(headroom: Any) -> float:
    return check_real("headroom", headroom, lo=1.0, note=" (SPEC §12)")


def make_hard_caps(rel_caps: Any, n_src: int, k: int, headroom: float = 1.2) -> Any:
    """Hard per-target slot limits with headroom (SPEC §12, the crate's benchmark).

    ``hard[t] = 0`` if ``rel_caps[t] == 0``, else
    ``max(1, ceil(rel_caps[t] / sum(rel_caps) * n_src * k * headroom))``; the sum is
    :func:`gpu_phase_router._tree.tree_sum`, so host and device give the same caps.

    Args:
        rel_caps: ``[n_tgt]`` finite relative capacities ``>= 0``, at least one positive.
        n_src: number of sources (rows of the routing table), ``>= 1``.
        k: slots per source, ``>= 1``.
        headroom: over-provisioning factor ``h >= 1``.

    Returns:
        hard: int64 ``[n_tgt]`` in the array library / device of ``rel_caps``.
    """
    from ._validate import check_int, check_size

    n_src = check_size("n_src", n_src)
    k = check_int("k", k, lo=1)
    headroom = _check_headroom(headroom)
    return hard_caps(rel_caps, n_src, k, headroom)


def hard_caps(rel_caps: Any, n_src: int, k: int, factor: float, *, factor_name: str = "headroom") -> Any:
    """The SPEC §12 hard-cap rule for an already checked ``n_src >= 0``, ``k >= 1`` and factor.

    ``make_hard_caps`` (``headroom >= 1``) and the torch router (``capacity_factor > 0``, SPEC §15)
    both compute their caps here. Caps beyond int64 raise ``ValueError`` naming ``factor_name``
    (SPEC §9), never a wrapped value.
    """
    from ._validate import check_sum, check_weights

    xp, caps, ns = _namespace(rel_caps, "rel_caps")
    caps = check_weights(xp, "rel_caps", caps).astype(xp.float64)
    total = check_sum(xp, "rel_caps", caps)
    with np.errstate(over="ignore"):
        raw = xp.maximum(1.0, xp.ceil(caps / total * n_src * k * factor))
    top = float(raw.max())
    if not top < 2.0**63:  # also catches inf / nan
        raise ValueError(
            f"{factor_name}={factor} with n_src={n_src} and k={k} gives hard caps up to {top:g} slots, "
            f"beyond int64 (2^63 - 1); use a smaller {factor_name}"
        )
    hard = xp.where(caps == 0, 0, raw.astype(xp.int64)).astype(xp.int64)
    return ns.wrap(hard)


def enforce_capacity(routes: Any, hard_caps: Any) -> Any:
    """Drop slots beyond each target's hard cap, admitting slots in row-major order (SPEC §12).

    Slot ``(j, s)`` is admitted when fewer than ``hard_caps[t]`` earlier slots (row-major:
    source 0 slot 0, source 0 slot 1, …) went to the same target ``t``; otherwise it becomes
    ``-1``. ``-1`` slots are skipped. Vectorised, no loop over slots: each valid slot gets the
    sort key ``t * n_slots + flat_index``, the keys are sorted (unique, so any sort algorithm
    gives one order), and a slot's rank among its target's slots is its position minus the
    start of its target's group.

    Args:
        routes: integer ``[n_src, k]``, targets in ``[0, len(hard_caps))`` or ``-1``.
        hard_caps: integer ``[n_tgt]``, ``>= 0`` (e.g. from :func:`make_hard_caps`).

    Returns:
        A new array like ``routes`` (same dtype, library and device) with dropped slots ``-1``.
    """
    xp, r, ns = _namespace(routes, "routes")
    _, caps, cap_ns = _namespace(hard_caps, "hard_caps")
    if cap_ns.on_device and not ns.on_device:
        raise TypeError(
            "hard_caps lives on a GPU but routes on the host; move hard_caps to the host first "
            "(e.g. hard_caps.get() or tensor.cpu())"
        )
    caps = xp.asarray(caps)
    if caps.ndim != 1:
        raise ValueError(f"hard_caps must be 1-D [n_tgt]; got shape {tuple(caps.shape)}")
    if caps.dtype.kind not in "iu":
        raise TypeError(f"hard_caps must hold integers; got dtype {caps.dtype}")
    if caps.size and int(caps.min()) < 0:
        raise ValueError(f"hard_caps must be >= 0; got {int(caps.min())}")
    if caps.dtype.kind == "u":  # a cap of 2^63 or more admits every slot, as 2^63 - 1 does
        caps = xp.minimum(caps, xp.asarray(np.iinfo(np.int64).max, dtype=caps.dtype))
    n_tgt = int(caps.shape[0])
    if r.dtype.kind == "u":
        raise TypeError(f"routes must have a signed integer dtype (dropped slots become -1); got {r.dtype}")
    r = _check_routes(xp, r, n_tgt, n_tgt_is="len(hard_caps)")  # hard_caps has an entry per target
    flat = r.reshape(-1)
    n_slots = int(flat.shape[0])
    out = flat.copy()
    valid = xp.flatnonzero(flat >= 0)
    if valid.shape[0]:
        tgt = flat[valid].astype(xp.int64)
        order_key = xp.sort(tgt * n_slots + valid.astype(xp.int64))
        sorted_tgt = order_key // n_slots
        sorted_idx = order_key - sorted_tgt * n_slots
        counts = xp.bincount(sorted_tgt, minlength=n_tgt)
        group_start = xp.cumsum(counts) - counts
        rank = xp.arange(sorted_tgt.shape[0], dtype=xp.int64) - group_start[sorted_tgt]
        dropped = sorted_idx[rank >= caps.astype(xp.int64)[sorted_tgt]]
        out[dropped] = -1
    return ns.wrap(out.reshape(r.shape))


def compute_loads(routes: Any, n_tgt: int) -> Any:
    """Slots per target (``-1`` ignored) → int64 ``[n_tgt]`` in the library/device of ``routes``.

    Args:
        routes: integer ``[n_src, k]``, targets in ``[0, n_tgt)`` or ``-1``.
        n_tgt: number of targets (the crate's ``n``).
    """
    from ._validate import check_int

    n_tgt = check_int("n_tgt", n_tgt, lo=1)
    xp, r, ns = _namespace(routes, "routes")
    flat = _check_routes(xp, r, n_tgt).reshape(-1)
    loads = xp.bincount(flat[flat >= 0].astype(xp.int64), minlength=n_tgt).astype(xp.int64)
    return ns.wrap(loads)


def survival_rate(routes: Any, n_tgt: int | None = None) -> float:
    """Served slots / all slots (SPEC §12): ``count(routes >= 0) / routes.size``.

    Padding ``-1`` slots (short rows of the phase router) count as not served, as in the crate's
    benchmark. ``n_tgt`` (the crate's ``n``) is optional; if given, targets ``>= n_tgt`` raise.
    """
    from ._validate import check_int

    if n_tgt is not None:
        n_tgt = check_int("n_tgt", n_tgt, lo=1)
    xp, r, _ = _namespace(routes, "routes")
    r = _check_routes(xp, r, n_tgt)
    if r.size == 0:
        raise ValueError("routes must not be empty")
    return int(xp.count_nonzero(r >= 0)) / int(r.size)


def load_stats(loads: Any, capacities: Any = None) -> dict[str, float]:
    """Load distribution statistics (the crate's ``load_stats``, extended with capacity terms).

    Computed on the host in float64 with NumPy (``loads`` is O(n_tgt)). Keys:

    * ``mean``, ``std`` (population), ``min``, ``max``, ``cv`` = std/mean,
      ``max_over_mean`` — of the loads themselves (``cv`` and ``max_over_mean`` are 0 when
      the mean is 0, as in the seed);
    * with ``capacities``: ``ratio_mean``, ``ratio_std``, ``ratio_cv``, ``ratio_min``,
      ``ratio_max`` of ``load[t] / fair[t]`` over targets with positive capacity, where
      ``fair[t] = sum(loads) * cap[t] / sum(cap)`` is the load target ``t`` would get if every
      slot were spread exactly in proportion to capacity (1.0 everywhere is perfect); and
      ``corr``, the Pearson correlation of capacity and load over all targets (``nan`` when
      either is constant, e.g. uniform capacities).

    Args:
        loads: ``[n_tgt]`` non-negative loads (e.g. from :func:`compute_loads`).
        capacities: optional ``[n_tgt]`` relative capacities ``>= 0``.
    """
    from ._validate import check_nonnegative_weights, check_sum, check_weights

    ld = check_nonnegative_weights(np, "loads", to_numpy(loads))
    if ld.shape[0] < 1:
        raise ValueError("loads must not be empty")
    check_sum(np, "loads", ld)
    mean = float(ld.mean())
    std = float(ld.std())
    stats: dict[str, float] = {
        "mean": mean,
        "std": std,
        "min": float(ld.min()),
        "max": float(ld.max()),
        "cv": std / mean if mean > 0 else 0.0,
        "max_over_mean": float(ld.max()) / mean if mean > 0 else 0.0,
    }
    if capacities is None:
        return stats
    cap = check_weights(np, "capacities", to_numpy(capacities))
    if cap.shape != ld.shape:
        raise ValueError(f"capacities must have the shape of loads {ld.shape}; got {cap.shape}")
    check_sum(np, "capacities", cap)
    pos = cap > 0
    fair = ld.sum() * cap[pos] / cap.sum()
    ratio = ld[pos] / fair if ld.sum() > 0 else np.zeros(int(pos.sum()))
    r_mean = float(ratio.mean())
    r_std = float(ratio.std())
    corr = float("nan")
    if ld.std() > 0 and cap.std() > 0:
        corr = float(np.corrcoef(cap, ld)[0, 1])
    stats.update(
        {
            "ratio_mean": r_mean,
            "ratio_std": r_std,
            "ratio_cv": r_std / r_mean if r_mean > 0 else 0.0,
            "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max()),
            "corr": corr,
        }
    )
    return stats


# ── Capacity profiles (the crate's benchmark workloads) ────────────────────────────────────────


def _profile(n: int, seed: int, levels: list[tuple[float, float]], at_least_one: bool = False) -> np.ndarray:
    """``float64 [n]`` of ones with ``int(n * share)`` entries set to each ``value``, shuffled."""
    from ._validate import check_int

    n = check_int("n", n, lo=1)
    caps = np.ones(n, dtype=np.float64)
    start = 0
    for share, value in levels:
        count = int(n * share)
        if at_least_one:
            count = max(count, 1)
        caps[start : start + count] = value
        start += count
    np.random.default_rng(seed).shuffle(caps)
    return caps


def uniform_capacities(n: int, seed: int = 0) -> np.ndarray:
    """All ``n`` targets at capacity 1 (``seed`` is accepted for a uniform call shape)."""
    return _profile(n, seed, [])


def mild_hetero_capacities(n: int, seed: int = 0) -> np.ndarray:
    """20% of targets at 3×, the rest at 1×, shuffled by ``seed``."""
    return _profile(n, seed, [(0.2, 3.0)])


def strong_hetero_capacities(n: int, seed: int = 0) -> np.ndarray:
    """10% of targets at 8×, 20% at 2×, the rest at 1×, shuffled by ``seed`` (the crate's profile)."""
    return _profile(n, seed, [(0.1, 8.0), (0.2, 2.0)])


def extreme_hetero_capacities(n: int, seed: int = 0) -> np.ndarray:
    """5% of targets (at least one) at 16×, the rest at 1×, shuffled by ``seed``."""
    return _profile(n, seed, [(0.05, 16.0)], at_least_one=True)


CAPACITY_PROFILES = {
    "uniform": uniform_capacities,
    "mild": mild_hetero_capacities,
    "strong": strong_hetero_capacities,
    "extreme": extreme_hetero_capacities,
}

__all__ = [
    "CAPACITY_PROFILES",
    "compute_loads",
    "enforce_capacity",
    "extreme_hetero_capacities",
    "load_stats",
    "make_hard_caps",
    "mild_hetero_capacities",
    "strong_hetero_capacities",
    "survival_rate",
    "uniform_capacities",
]
