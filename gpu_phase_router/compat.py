"""Drop-in for the crate ``phase_router_rs`` (crate-exact mode, SPEC.md §14).

``import gpu_phase_router.compat as phase_router_rs`` gives the crate's Python bindings
(:func:`phase_router`, :func:`phase_router_auto`, :func:`phase_router_uniform_dispatch`, same
argument order and defaults) and the helpers of its ``python/phase_router.py`` (:func:`route`,
:func:`build_bits`, :func:`hash_route`, :func:`enforce_capacity`, :func:`compute_loads`,
:func:`load_stats`, :func:`survival_rate`, :func:`make_hard_caps`, the capacity profiles), returning
exactly what the crate returns: the same routes, bit for bit, as int32 ``(n, k)`` arrays (``-1`` for
an empty slot), computed on ``backend="cpu"`` (Numba) or ``backend="cuda"`` (CuPy).

The one deliberate difference: invalid input raises ``ValueError``/``TypeError`` naming the
argument (``k = 0``, a ``col_perm_*`` that is not a permutation of ``range(n)``, wrong lengths,
non-uint64 bits, a seed outside ``[0, 2^64)``, ...) where the crate panics or reads out of bounds.
Set bits beyond column ``n`` (the padding of a row's last word) count towards the row's popcount,
as in the crate. The routing functions (``phase_router``, ``phase_router_auto``,
``phase_router_uniform_dispatch``, ``route``) take ``backend=`` like the rest of the package and
return routes in the array library of their inputs (NumPy for NumPy inputs and for the calls that
take no arrays); the evaluation helpers follow their input's array library, as
:mod:`gpu_phase_router.capacity` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _crate
from ._arrays import HOST, check_plain_input, on_caller_stream, to_backend_array, to_numpy
from ._validate import check_bits, check_int, check_permutation, check_real, check_seed, check_weights
from .backends import get_backend, resolve
from .capacity import (
    compute_loads,
    enforce_capacity,
    extreme_hetero_capacities,
    strong_hetero_capacities,
    survival_rate,
    uniform_capacities,
)
from .capacity import load_stats as _load_stats

__all__ = [
    "build_bits",
    "compute_loads",
    "enforce_capacity",
    "extreme_hetero_capacities",
    "hash_route",
    "load_stats",
    "make_hard_caps",
    "phase_router",
    "phase_router_auto",
    "phase_router_uniform_dispatch",
    "route",
    "strong_hetero_capacities",
    "survival_rate",
    "uniform_capacities",
]


def _popcounts(be: Any, name: str, bits: Any, n: int, nb_words: int | None = None) -> Any:
    """int64 ``(n,)`` popcounts of every word of each row (stray bits beyond column ``n`` included)."""
    words = check_bits(be.xp, name, to_backend_array(bits, be.xp), n, n, nb_words)
    counts, _stray = be.popcount_rows(words, n)
    return counts


def _check_k(k: Any) -> int:
    return check_int("k", k, lo=1, hi=(1 << 31) - 1)


# -- the crate's bindings ------------------------------------------------------------------------


@on_caller_stream
def phase_router(
    s_bits: Any,
    t_bits: Any,
    n: int,
    nb_words: int,
    k: int,
    col_perm_s: Any,
    col_perm_t: Any,
    seed: int,
    *,
    backend: str = "auto",
) -> Any:
    """The crate's kernel: per-row ChaCha8 reservoir over the row's candidates (SPEC §14).

    Args:
        s_bits, t_bits: uint64 bit matrices, flat ``(n * nb_words,)`` as the crate takes them or
            ``(n, nb_words)``; only each row's popcount matters.
        n: square size (sources = targets), ``>= 1``.
        nb_words: ``ceil(n / 64)``.
        k: slots per row, ``>= 1`` (``k > n`` is allowed: the extra slots stay ``-1``).
        col_perm_s, col_perm_t: permutations of ``range(n)``, any integer dtype.
        seed: integer in ``[0, 2^64)``; row ``j`` draws from ``ChaCha8Rng::seed_from_u64(seed + j)``.
        backend: ``"auto"`` (the inputs' device), ``"cpu"`` or ``"cuda"``.

    Returns:
        int32 ``(n, k)`` routes, ``-1`` for empty slots.
    """
    n = check_int("n", n, lo=1)
    nb_words = check_int("nb_words", nb_words, lo=1)
    k = _check_k(k)
    seed = check_seed(seed)
    be, ns = resolve(backend, s_bits=s_bits, t_bits=t_bits, col_perm_s=col_perm_s, col_perm_t=col_perm_t)
    xp = be.xp
    ones_s = _popcounts(be, "s_bits", s_bits, n, nb_words)
    ones_t = _popcounts(be, "t_bits", t_bits, n, nb_words)
    perm_s = check_permutation(xp, "col_perm_s", to_backend_array(col_perm_s, xp), n)
    perm_t = check_permutation(xp, "col_perm_t", to_backend_array(col_perm_t, xp), n)
    return ns.wrap(_crate.route_counts(be, ones_s, ones_t, perm_s, perm_t, k, seed))


@on_caller_stream
def phase_router_auto(s_bits: Any, t_bits: Any, n: int, k: int, seed: int, *, backend: str = "auto") -> Any:
    """The crate's ``phase_router_auto``: :func:`phase_router` with the permutations it draws itself.

    ``col_perm_s`` and then ``col_perm_t`` are ``0..n`` shuffled (``SliceRandom::shuffle``) by one
    ``ChaCha8Rng::seed_from_u64(seed)``; the kernel runs with the same ``seed``. The shuffles are
    sequential and run on the host CPU (Numba) for every backend; see SPEC §14.

    Returns:
        int32 ``(n, k)`` routes, ``-1`` for empty slots.
    """
    n = check_int("n", n, lo=1)
    k = _check_k(k)
    seed = check_seed(seed)
    be, ns = resolve(backend, s_bits=s_bits, t_bits=t_bits)
    xp = be.xp
    ones_s = _popcounts(be, "s_bits", s_bits, n)
    ones_t = _popcounts(be, "t_bits", t_bits, n)
    perm_s, perm_t = _crate.auto_permutations(n, seed)
    return ns.wrap(_crate.route_counts(be, ones_s, ones_t, xp.asarray(perm_s), xp.asarray(perm_t), k, seed))


def auto_permutations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``(col_perm_s, col_perm_t)`` exactly as the crate's ``phase_router_auto(…, n, k, seed)`` draws them."""
    return _crate.auto_permutations(check_int("n", n, lo=1), check_seed(seed))


def _round_half_away(x: float) -> int:
    """Rust's ``f64::round`` then ``as usize`` (saturating; negative and NaN give 0)."""
    if not x > 0.0:
        return 0
    if x >= 2.0**64:
        return (1 << 64) - 1
    whole = np.floor(x)
    return int(whole) + (1 if x - whole >= 0.5 else 0)


def phase_router_uniform_dispatch(
    n_tokens: int, n_experts: int, k: int, base_density: float, seed: int, oversample: int = 4, *, backend: str = "auto"
) -> Any:
    """The crate's fused uniform MoE dispatch → int32 ``(n_tokens, k)`` expert ids, ``-1`` for unfilled slots.

    Tokens are padded to ``n_pad``, a multiple of ``n_experts`` (expert ``e`` owns the band of
    ``width = n_pad / n_experts`` columns from ``e * width``); every row of S has
    ``round(base_density * n_pad)`` ones and every row of T ``round(base_density * width)`` (both
    clipped to ``[1, n_pad]``, rounding half away from zero); :func:`phase_router_auto` runs with
    ``k_kernel = min(max(k * oversample, k + 1), n_pad)`` slots; each token keeps the first ``k``
    distinct experts of its row. Argument order is the Python binding's (``seed`` before
    ``oversample``).
    """
    n_tokens = check_int("n_tokens", n_tokens, lo=1)
    n_experts = check_int("n_experts", n_experts, lo=1)
    k = _check_k(k)
    oversample = check_int("oversample", oversample, lo=0)
    seed = check_seed(seed)
    base_density = check_real("base_density", base_density, lo=0.0)
    be = get_backend(backend)
    xp = be.xp
    width = max(n_tokens // n_experts, 1)
    n_pad = width * n_experts
    if n_pad < n_tokens:
        n_pad = (n_tokens // n_experts + 1) * n_experts
        width = n_pad // n_experts
    ones_e = min(max(_round_half_away(base_density * width), 1), n_pad)
    s_ones = min(max(_round_half_away(base_density * n_pad), 1), n_pad)
    k_kernel = min(max(k * oversample, k + 1), n_pad)
    perm_s, perm_t = _crate.auto_permutations(n_pad, seed)
    routes = _crate.route_counts(
        be,
        xp.full(n_pad, s_ones, dtype=xp.int64),
        xp.full(n_pad, ones_e, dtype=xp.int64),
        xp.asarray(perm_s),
        xp.asarray(perm_t),
        k_kernel,
        seed,
    )
    return HOST.wrap(_first_distinct(xp, routes[:n_tokens], width, k))


def _first_distinct(xp: Any, routes: Any, width: int, k: int) -> Any:
    """Per row, the first ``k`` distinct experts ``col // width`` of ``routes`` (``-1`` skipped) → int32, padded."""
    rows, kk = int(routes.shape[0]), int(routes.shape[1])
    e = xp.where(routes >= 0, routes // width, -1).astype(xp.int64)
    order = xp.argsort(e * kk + xp.arange(kk, dtype=xp.int64), axis=1)  # by expert, then position
    se = xp.take_along_axis(e, order, axis=1)
    first_sorted = xp.ones((rows, kk), dtype=bool)
    first_sorted[:, 1:] = se[:, 1:] != se[:, :-1]
    first = xp.zeros((rows, kk), dtype=bool)
    first[xp.arange(rows)[:, None], order] = first_sorted
    keep = first & (e >= 0)
    slot = xp.cumsum(keep, axis=1) - 1
    keep &= slot < k
    out = xp.full((rows, k), -1, dtype=xp.int32)
    r_idx, c_idx = xp.nonzero(keep)
    out[r_idx, slot[r_idx, c_idx]] = e[r_idx, c_idx].astype(xp.int32)
    return out


# -- the crate's python/phase_router.py ------------------------------------------------------------


def build_bits(ones_per_row: Any, n: int) -> np.ndarray:
    """Flat uint64 ``(n * ceil(n / 64),)``: row ``i`` has its ``min(ones_per_row[i], n)`` low bits set.

    Args:
        ones_per_row: ``[>= n]`` counts (integers, or floats truncated as the crate's ``int()``); the
            first ``n`` must be finite and ``>= 0``. A masked array with masked entries raises.
        n: bits per row, ``>= 1``.

    Raises:
        ValueError: naming ``ones_per_row`` for a NaN, infinite or negative count or masked entries.
    """
    n = check_int("n", n, lo=1)
    check_plain_input("ones_per_row", ones_per_row)  # masked entries would be read as their data
    ones = np.asarray(to_numpy(ones_per_row))
    if ones.ndim != 1 or ones.shape[0] < n:
        raise ValueError(f"ones_per_row must be 1-D with at least n={n} entries; got shape {ones.shape}")
    if ones.dtype.kind not in "iuf":
        raise TypeError(f"ones_per_row must hold numbers; got dtype {ones.dtype}")
    ones = ones[:n]
    if ones.dtype.kind == "f" and not bool(np.isfinite(ones).all()):
        raise ValueError("ones_per_row must be finite (no NaN or inf) in its first n entries")
    if bool((ones < 0).any()):
        raise ValueError(f"ones_per_row must be >= 0 in its first n entries; got minimum {ones.min()}")
    ones = np.minimum(ones, n).astype(np.int64)  # clip first: a float above 2^63 stays in range
    from .api import left_aligned_bits

    return left_aligned_bits(ones, n).reshape(-1)  # word by word: memory of the output only


def hash_route(n: int, k: int, seed: int = 0) -> np.ndarray:
    """The crate's baseline: ``np.random.default_rng(seed).integers(0, n, size=(n, k), dtype=np.int32)``."""
    n = check_int("n", n, lo=1)
    k = check_int("k", k, lo=1)
    seed = check_seed(seed)  # NumPy's generator takes any non-negative integer; the crate a u64
    return np.random.default_rng(seed).integers(0, n, size=(n, k), dtype=np.int32)


def load_stats(loads: Any) -> dict[str, float | int]:
    """The crate's load statistics: ``mean``, ``std``, ``max`` and ``min`` (ints), ``cv``, ``max_over_mean``."""
    stats: dict[str, float | int] = dict(_load_stats(loads))
    stats["max"] = int(stats["max"])
    stats["min"] = int(stats["min"])
    return stats


def make_hard_caps(rel_caps: Any, n: int, k: int, headroom: float = 1.2) -> np.ndarray:
    """The crate's hard caps: ``ceil(rel_caps / rel_caps.sum() * n * k * headroom).clip(1)`` as int.

    Unlike :func:`gpu_phase_router.make_hard_caps` (SPEC §12), a zero relative capacity still gets
    a cap of 1, and the sum is NumPy's, exactly as in the crate.
    """
    n = check_int("n", n, lo=1)
    k = check_int("k", k, lo=1)
    rel = check_weights(np, "rel_caps", to_numpy(rel_caps))
    headroom = check_real("headroom", headroom, lo=0.0, lo_open=True)
    with np.errstate(over="ignore"):
        total = rel.sum()  # NumPy's sum, as the crate's
        caps = np.ceil((rel / total) * n * k * headroom).clip(1)
    if not np.isfinite(total):  # the crate's caps would all be 1: invalid input here (SPEC §9)
        raise ValueError("rel_caps: the sum of the values overflows float64; rescale them (relative values)")
    if not float(caps.max()) < 2.0**63:  # never a wrapped cap
        raise ValueError(
            f"headroom={headroom} with n={n} and k={k} gives hard caps beyond int64; use a smaller headroom"
        )
    return caps.astype(int)


@on_caller_stream
def route(
    source_weights: Any = None,
    target_capacities: Any = None,
    n: int = 1024,
    k: int = 4,
    seed: int = 42,
    density: float = 0.3,
    *,
    backend: str = "auto",
) -> Any:
    """The crate's high-level ``route``: ``n`` sources to ``n`` targets, ones proportional to weight.

    ``ones = np.round((w / np.mean(w)) * density * n).clip(1, n)`` for the source weights and the
    target capacities (``None`` is ``np.ones(n)``; given source weights set ``n = len(source_weights)``),
    so even a zero weight keeps one bit, as in the crate; then :func:`phase_router_auto` with ``seed``.

    Returns:
        int32 ``(n, k)`` routes, ``-1`` for empty slots.
    """
    k = _check_k(k)
    seed = check_seed(seed)
    density = check_real("density", density, lo=0.0, lo_open=True)
    be, ns = resolve(backend, source_weights=source_weights, target_capacities=target_capacities)
    if source_weights is None:
        n = check_int("n", n, lo=1)
        w = np.ones(n, dtype=np.float64)
    else:
        w = check_weights(np, "source_weights", to_numpy(source_weights))
        n = int(w.shape[0])
    if target_capacities is None:
        c = np.ones(n, dtype=np.float64)
    else:
        c = check_weights(np, "target_capacities", to_numpy(target_capacities))
        if c.shape[0] != n:
            raise ValueError(f"target_capacities must have length n={n}; got {c.shape[0]}")
    s_ones = np.round((w / np.mean(w)) * density * n).clip(1, n).astype(np.int64)
    t_ones = np.round((c / np.mean(c)) * density * n).clip(1, n).astype(np.int64)
    xp = be.xp
    perm_s, perm_t = _crate.auto_permutations(n, seed)
    return ns.wrap(
        _crate.route_counts(be, xp.asarray(s_ones), xp.asarray(t_ones), xp.asarray(perm_s), xp.asarray(perm_t), k, seed)
    )
