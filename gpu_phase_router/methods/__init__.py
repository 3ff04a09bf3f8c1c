"""The routing methods: one module per method and one table of row-range functions.

* :mod:`~gpu_phase_router.methods.phase` — the phase router (SPEC §3–§7) and its banded form (§13);
* :mod:`~gpu_phase_router.methods.systematic` — the systematic router (SPEC §11);
* :mod:`~gpu_phase_router.methods.hashing` — the hash baselines.

Every entry point — :func:`~gpu_phase_router.route`, :func:`~gpu_phase_router.route_block`,
:func:`gpu_phase_router.dask.route` and the torch router — validates its arguments, picks a
backend, makes one :class:`RowRange` (rows ``[row0, row0 + rows)`` and the global quantities
they need) and calls one function of this table:

    fn(backend, rr: RowRange) -> int32 (rr.rows, rr.k) array of backend.xp

``rr.w`` is ``None`` for sources of weight 1 (then nothing is read back from the device: the path
a training loop needs); ``rr.caps`` holds *all* target capacities on the host (target-side
preparation is O(n_tgt); its results are moved to the backend once). ``rr.weight_mean`` and
``rr.degree_prefix`` are the global quantities a row range cannot know — the mean of all
``n_src`` weights and the sum of the degrees of rows ``[0, row0)``; only methods with
``uses_weight_mean`` / a ``degrees`` function read them.

A :class:`Method` records which global quantities its function needs (and, for a degree prefix,
how a row range's degrees follow from its weights), so the entry points (blocks, Dask) compute
or ask for exactly those, and its own size checks (``check``), so no entry point names a method.
:func:`register_method` adds a method.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._arrays import Array
from .._validate import check_route_options, check_rows_per_call, check_seed, check_size, check_weights
from ..backends import Backend, BackendName, get_backend
from . import hashing, phase, systematic
from ._row_range import DEFAULT_ROWS_PER_CALL, RowRange


class RowsFn(Protocol):
    """The signature every method implements (see the module docstring)."""

    def __call__(self, backend: Backend, rr: RowRange) -> Array: ...


class DegreesFn(Protocol):
    """int64 degrees of weights ``w`` (rows of ``rr``) — their sum over earlier rows is the
    ``degree_prefix`` of a later range."""

    def __call__(self, xp: Any, w: Array, rr: RowRange) -> Array: ...


class RingSizeFn(Protocol):
    """Ring size the degrees are counted on (``degree_prefix <= row0 * ring size``)."""

    def __call__(self, rr: RowRange) -> int: ...


class CheckFn(Protocol):
    """Checks of a method that need only sizes; raises ``ValueError`` naming the argument."""

    def __call__(self, rr: RowRange) -> None: ...


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
        ring: with ``degrees``, the ring size they are counted on (default ``n_tgt``; the phase
            router's virtual ring of SPEC §13 when ``n_tgt < n_src``).
        check: the method's own checks on sizes, run by the entry points before any work.
    """

    name: str
    rows: RowsFn
    uses_weight_mean: bool = False
    degrees: DegreesFn | None = None
    uniform_sources: bool = False
    summary: str = ""
    ring: RingSizeFn | None = None
    check: CheckFn | None = None

    def ring_size(self, rr: RowRange) -> int:
        """Ring size this method's degrees (and ``degree_prefix``) are counted on."""
        return rr.n_tgt if self.ring is None else self.ring(rr)

    @property
    def uses_degree_prefix(self) -> bool:
        """Whether a row range after the first needs ``degree_prefix``."""
        return self.degrees is not None


_TABLE: dict[str, Method] = {}


def register_method(
    name: str,
    rows: RowsFn | Callable[..., Any],
    *,
    uses_weight_mean: bool = False,
    degrees: DegreesFn | Callable[..., Any] | None = None,
    uniform_sources: bool = False,
    summary: str = "",
    ring: RingSizeFn | Callable[..., Any] | None = None,
    check: CheckFn | Callable[..., Any] | None = None,
) -> Method:
    """Add (or replace) a routing method; it then works in ``route``, ``route_block`` and Dask.

    Args:
        name: the ``method=`` value.
        rows: the row-range function (signature in the module docstring).
        uses_weight_mean, degrees, uniform_sources, ring, check: see :class:`Method`.
        summary: one line describing the method.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string; got {name!r}")
    if not callable(rows):
        raise TypeError(f"rows must be callable; got {type(rows).__name__}")
    method = Method(name, rows, uses_weight_mean, degrees, uniform_sources, summary, ring, check)
    _TABLE[name] = method
    return method


register_method(
    "phase",
    phase.rows,
    uses_weight_mean=True,
    degrees=phase.degrees,
    ring=phase.ring_size,
    summary="the crate's phase router (SPEC §3–§7; banded, §13, when n_tgt < n_src)",
)
register_method(
    "systematic",
    systematic.rows,
    uniform_sources=True,
    check=systematic.check,
    summary="equally spaced slots on the capacity ring, exact shares (SPEC §11)",
)
register_method(
    "hash", hashing.hash_rows, summary="k uniform targets per source among those of positive capacity (baseline)"
)
register_method(
    "weighted_hash", hashing.weighted_hash_rows, summary="k distinct targets drawn in proportion to capacity (baseline)"
)


def available_methods() -> list[str]:
    """Names accepted by ``method=``."""
    return list(_TABLE)


def get_method(name: Any) -> Method:
    """The table entry for ``method=name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _TABLE:
        raise ValueError(f"method must be one of {available_methods()}; got {name!r}")
    return _TABLE[name]


def uniform_spec(
    method: str,
    n_src: int,
    caps: Any,
    *,
    k: int,
    density: float = 0.3,
    rows_per_call: int | None = None,
) -> RowRange:
    """The validated :class:`RowRange` of all ``n_src`` rows of ``method`` for sources of weight 1
    and host capacities ``caps``, with seed 0 (give each call its seed with
    ``dataclasses.replace(spec, seed=...)``).

    Validates host values only (the method's size checks included). The torch router keeps the
    result per batch size (:func:`cached_uniform_spec`), so a training loop validates its
    capacities, ``k`` and ``density`` once, not on every forward.
    """
    m = get_method(method)
    n_src = check_size("n_src", n_src)
    caps = check_weights(np, "caps", np.asarray(caps))
    k, _, density, per_call = check_route_options(k, int(caps.shape[0]), 0, density, rows_per_call)
    rr = RowRange(caps, n_src, 0, n_src, k, 0, density=density, rows_per_call=per_call)
    if m.check is not None:
        m.check(rr)
    return rr


@functools.lru_cache(maxsize=64)
def cached_uniform_spec(method: str, n_src: int, caps: tuple[float, ...], k: int, density: float | None) -> RowRange:
    """:func:`uniform_spec` for host values (``density=None``: the default), kept per arguments."""
    host = np.array(caps, dtype=np.float64)
    options: dict[str, Any] = {} if density is None else {"density": density}
    spec = uniform_spec(method, n_src, host, k=k, **options)
    host.setflags(write=False)  # shared by every call that hits the cache
    return spec


def run_uniform(method: str, backend: BackendName, spec: RowRange, seed: int) -> Array:
    """All rows of a validated :func:`uniform_spec` with ``seed`` (validated by the caller) on
    ``backend``: the backend's int32 ``(n_src, k)`` array, nothing read back from a device."""
    return get_method(method).rows(get_backend(backend), dataclasses.replace(spec, seed=seed))


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
    get_method(method)
    get_backend(backend)  # an unknown method or backend fails before any work
    spec = uniform_spec(method, n_src, caps, k=k, density=density, rows_per_call=rows_per_call)
    return run_uniform(method, backend, spec, check_seed(seed))


__all__ = [
    "DEFAULT_ROWS_PER_CALL",
    "CheckFn",
    "DegreesFn",
    "Method",
    "RingSizeFn",
    "RowRange",
    "RowsFn",
    "available_methods",
    "cached_uniform_spec",
    "check_rows_per_call",
    "get_method",
    "register_method",
    "route_uniform",
    "run_uniform",
    "uniform_spec",
]
