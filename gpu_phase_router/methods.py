"""The routing methods: one table of row-range functions with one signature.

Every entry point — :func:`~gpu_phase_router.route`, :func:`~gpu_phase_router.route_block`,
:func:`gpu_phase_router.dask.route` and the torch router — validates its arguments, picks a
backend and then calls one function of this table for a range of rows ``[row0, row0 + rows)``:

    fn(backend, w, caps, *, n_src, row0, rows, k, seed, density, weight_mean, degree_prefix,
       rows_per_call) -> int32 (rows, k) array of backend.xp

* ``w``: the rows' float64 weights (finite, ``>= 0``) as an array of ``backend.xp``, or ``None``
  for sources of weight 1 (then nothing is read back from the device: the path a training loop
  needs);
* ``caps``: *all* target capacities, a validated float64 NumPy vector (target-side preparation
  is O(n_tgt) and runs on the host; its results are moved to the backend once per call);
* ``weight_mean`` and ``degree_prefix``: the global quantities a row range cannot know — the mean
  of all ``n_src`` weights and the sum of the degrees of rows ``[0, row0)``; only methods with
  ``uses_weight_mean`` / a ``degrees`` function read them.

A :class:`Method` records which global quantities its function needs (and, for a degree prefix,
how a row range's degrees follow from its weights), so the entry points (blocks, Dask) compute
or ask for exactly those. :func:`register_method` adds a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import _prep
from ._arrays import Array
from ._validate import check_density, check_int, check_k, check_seed, check_size, check_weights
from .backends import Backend, BackendName, get_backend
from .baselines import hash_block, weighted_hash_block

DEFAULT_ROWS_PER_CALL = 1 << 18  # rows per kernel call: bounds the O(rows) temporaries


class RowsFn(Protocol):
    """The signature every method implements (see the module docstring)."""

    def __call__(
        self,
        backend: Backend,
        w: Array | None,
        caps: np.ndarray,
        *,
        n_src: int,
        row0: int,
        rows: int,
        k: int,
        seed: int,
        density: float,
        weight_mean: float,
        degree_prefix: int,
        rows_per_call: int,
    ) -> Array: ...


class DegreesFn(Protocol):
    """int64 degrees of a row range from its weights (their sum over earlier rows is the
    ``degree_prefix`` of a later range)."""

    def __call__(
        self, xp: Any, w: Array, caps: np.ndarray, *, n_src: int, k: int, density: float, weight_mean: float
    ) -> Array: ...


class RingSizeFn(Protocol):
    """Length of the ring the degrees are counted on (``degree_prefix <= row0 * ring size``)."""

    def __call__(self, caps: np.ndarray, *, n_src: int, k: int, density: float) -> int: ...


@dataclass(frozen=True)
class Method:
    """A routing method of the table.

    Attributes:
        name: the ``method=`` value.
        rows: the row-range function.
        uses_weight_mean: needs the mean of all source weights (SPEC §7).
        degrees: for methods that need the sum of the degrees of earlier rows (SPEC §3), how a
            row range's degrees follow from its weights; ``None`` otherwise.
        uniform_sources: gives every source exactly ``k`` slots, so all weights must be equal.
        summary: one line for tables and error messages.
        ring_size: with ``degrees``, the length of the ring they are counted on (default
            ``n_tgt``; the phase router's virtual ring of SPEC §13 when ``n_tgt < n_src``).
    """

    name: str
    rows: RowsFn
    uses_weight_mean: bool = False
    degrees: DegreesFn | None = None
    uniform_sources: bool = False
    summary: str = ""
    ring_size: RingSizeFn | None = None

    def degree_ring(self, caps: np.ndarray, *, n_src: int, k: int, density: float) -> int:
        """Length of the ring this method's degrees (and ``degree_prefix``) are counted on."""
        if self.ring_size is None:
            return int(caps.shape[0])
        return self.ring_size(caps, n_src=n_src, k=k, density=density)

    @property
    def uses_degree_prefix(self) -> bool:
        """Whether a row range after the first needs ``degree_prefix``."""
        return self.degrees is not None


# --- the methods -----------------------------------------------------------------------------------


def _phase(
    be: Backend,
    w: Array | None,
    caps: np.ndarray,
    *,
    n_src: int,
    row0: int,
    rows: int,
    k: int,
    seed: int,
    density: float,
    weight_mean: float,
    degree_prefix: int,
    rows_per_call: int,
) -> Array:
    col_map = None
    if _prep.bands_apply(n_src, int(caps.shape[0])):  # SPEC §13: virtual ring, first k distinct targets
        lay = _prep.band_layout(caps, n_src, k, density)  # host arithmetic only, cached
        counts, k_draw, col_map = lay.col_counts, lay.k_draw, lay.col_map
    else:
        counts, k_draw = _prep.weights_to_counts(np, caps, density, n_src, name="target_capacities"), k
    return _prep.phase_rows(
        be,
        counts,
        n_src=n_src,
        row0=row0,
        rows=rows,
        k=k_draw,
        seed=seed,
        degree_prefix=degree_prefix,
        rows_per_call=rows_per_call,
        w=w,
        weight_mean=weight_mean,
        density=density,
        col_map=col_map,
        k_out=None if col_map is None else k,
    )


def _phase_degrees(
    xp: Any, w: Array, caps: np.ndarray, *, n_src: int, k: int, density: float, weight_mean: float
) -> Array:
    n_ring = _prep.phase_ring_size(caps, n_src=n_src, k=k, density=density)
    return _prep.weights_to_counts(xp, w, density, n_ring, mean=weight_mean, name="source_weights")


def _systematic(
    be: Backend,
    w: Array | None,
    caps: np.ndarray,
    *,
    n_src: int,
    row0: int,
    rows: int,
    k: int,
    seed: int,
    density: float,
    weight_mean: float,
    degree_prefix: int,
    rows_per_call: int,
) -> Array:
    return _prep.systematic_rows(
        be, caps, n_src=n_src, k=k, seed=seed, row0=row0, rows=rows, rows_per_call=rows_per_call
    )


def _zero_weight_rows(out: Array, w: Array | None) -> Array:
    """A source of weight 0 never routes: its row becomes all ``-1``."""
    if w is not None:
        out[w == 0] = -1
    return out


def _hash(
    be: Backend,
    w: Array | None,
    caps: np.ndarray,
    *,
    n_src: int,
    row0: int,
    rows: int,
    k: int,
    seed: int,
    density: float,
    weight_mean: float,
    degree_prefix: int,
    rows_per_call: int,
) -> Array:
    xp = be.xp
    positive = xp.asarray(np.flatnonzero(np.asarray(caps) > 0).astype(np.int64))  # zero capacities never receive
    out = xp.empty((rows, k), dtype=xp.int32)
    for a, b in _prep.call_ranges(rows, rows_per_call):
        out[a:b] = hash_block(xp, int(caps.shape[0]), k=k, seed=seed, row0=row0 + a, rows=b - a, positive=positive)
    return _zero_weight_rows(out, w)


def _weighted_hash(
    be: Backend,
    w: Array | None,
    caps: np.ndarray,
    *,
    n_src: int,
    row0: int,
    rows: int,
    k: int,
    seed: int,
    density: float,
    weight_mean: float,
    degree_prefix: int,
    rows_per_call: int,
) -> Array:
    xp = be.xp
    cum = _prep.capacity_cum(np, caps)
    total, n_pos = int(cum[-1]), int(np.count_nonzero(cum[1:] - cum[:-1]))
    cum = xp.asarray(cum)
    out = xp.empty((rows, k), dtype=xp.int32)
    for a, b in _prep.call_ranges(rows, rows_per_call):
        out[a:b] = weighted_hash_block(xp, cum, k=k, seed=seed, row0=row0 + a, rows=b - a, total=total, n_pos=n_pos)
    return _zero_weight_rows(out, w)


_TABLE: dict[str, Method] = {}


def register_method(
    name: str,
    rows: RowsFn | Callable[..., Any],
    *,
    uses_weight_mean: bool = False,
    degrees: DegreesFn | Callable[..., Any] | None = None,
    uniform_sources: bool = False,
    summary: str = "",
    ring_size: RingSizeFn | Callable[..., Any] | None = None,
) -> Method:
    """Add (or replace) a routing method; it then works in ``route``, ``route_block`` and Dask.

    Args:
        name: the ``method=`` value.
        rows: the row-range function (signature in the module docstring).
        uses_weight_mean, degrees, uniform_sources, ring_size: see :class:`Method`.
        summary: one line describing the method.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string; got {name!r}")
    if not callable(rows):
        raise TypeError(f"rows must be callable; got {type(rows).__name__}")
    method = Method(name, rows, uses_weight_mean, degrees, uniform_sources, summary, ring_size)
    _TABLE[name] = method
    return method


register_method(
    "phase",
    _phase,
    uses_weight_mean=True,
    degrees=_phase_degrees,
    ring_size=_prep.phase_ring_size,
    summary="the seed's phase router (SPEC §3–§7; banded, §13, when n_tgt < n_src)",
)
register_method(
    "systematic",
    _systematic,
    uniform_sources=True,
    summary="equally spaced slots on the capacity ring, exact shares (SPEC §11)",
)
register_method("hash", _hash, summary="k uniform targets per source among those of positive capacity (baseline)")
register_method(
    "weighted_hash", _weighted_hash, summary="k distinct targets drawn in proportion to capacity (baseline)"
)


def available_methods() -> list[str]:
    """Names accepted by ``method=``."""
    return list(_TABLE)


def get_method(name: Any) -> Method:
    """The table entry for ``method=name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _TABLE:
        raise ValueError(f"method must be one of {available_methods()}; got {name!r}")
    return _TABLE[name]


def check_rows_per_call(rows_per_call: Any, block_rows: Any = None) -> int:
    """``rows_per_call`` (``None``: the default); ``block_rows`` is its former name."""
    if block_rows is not None:
        if rows_per_call is not None:
            raise TypeError("give rows_per_call only (block_rows is its former name)")
        rows_per_call, name = block_rows, "block_rows"
    else:
        name = "rows_per_call"
    return DEFAULT_ROWS_PER_CALL if rows_per_call is None else check_int(name, rows_per_call, lo=1)


def route_uniform(
    method: str,
    backend: BackendName,
    n_src: int,
    caps: Any,
    *,
    k: int,
    seed: int,
    density: float = 0.3,
    rows_per_call: int | None = None,
) -> Array:
    """All rows of ``method`` for ``n_src`` sources of weight 1 and host capacities ``caps``.

    Validates only host values and reads nothing back from the device, so on the ``cuda``
    backend the work is queued on the current stream without a host synchronisation (what a
    training step needs). Returns the backend's int32 ``(n_src, k)`` array (CuPy on ``cuda``).

    Args:
        method: a name from :func:`available_methods`.
        backend: ``"cpu"``, ``"cuda"`` or another registered backend (``"auto"`` means ``"cpu"``
            here: there is no data to follow).
        n_src: number of sources (``>= 1``).
        caps: host ``[n_tgt]`` relative capacities (NumPy or a sequence; finite, ``>= 0``, one
            positive).
        k, seed, density, rows_per_call: as in :func:`gpu_phase_router.route`.
    """
    m = get_method(method)
    be = get_backend(backend)
    n_src = check_size("n_src", n_src)
    caps = check_weights(np, "caps", np.asarray(caps))
    k = check_k(k, int(caps.shape[0]))
    return m.rows(
        be,
        None,
        caps,
        n_src=n_src,
        row0=0,
        rows=n_src,
        k=k,
        seed=check_seed(seed),
        density=check_density(density),
        weight_mean=1.0,
        degree_prefix=0,
        rows_per_call=check_rows_per_call(rows_per_call),
    )


__all__ = [
    "DEFAULT_ROWS_PER_CALL",
    "DegreesFn",
    "Method",
    "RingSizeFn",
    "RowsFn",
    "available_methods",
    "get_method",
    "register_method",
    "route_uniform",
]
