"""The systematic router (SPEC §11): equally spaced slots on the capacity ring, exact shares."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import Array
from .._keys import STREAM_SYSTEMATIC, at, stream
from .._prep import block_phases, call_ranges, host_capacity_cum, on_backend
from ._row_range import RowRange


def systematic_phi(seed: int, n_src: int, k: int) -> int:
    """SPEC §11: the common offset ``phi`` in ``[0, n_src * k)``."""
    return at(stream(seed, STREAM_SYSTEMATIC), 0) % (n_src * k)


def systematic_block(
    backend: Any, cum: Any, *, n_src: int, k: int, seed: int, row0: int = 0, rows: int | None = None, perm_t: Any = None
) -> Any:
    """Rows ``row0 .. row0 + rows - 1`` of the systematic router (SPEC §11) → int32 ``(rows, k)``."""
    if rows is None:
        rows = n_src - row0 if perm_t is None else perm_t.shape[0]
    phase = block_phases(backend, n_src, row0, rows, seed, perm_t)
    return backend.systematic_rows(phase, cum, n_src=n_src, k=k, phi=systematic_phi(seed, n_src, k))


def check_systematic_slots(n_src: int, k: int, units_total: int | None = None) -> None:
    """SPEC §11 needs ``M = n_src * k <= 2^31``, and ``M <= U`` so that every slot point
    ``x < U`` lands on a target (``U``, the total capacity units, can fall a little below 2^31
    through rounding; with ``M > U`` the last point could reach ``U``)."""
    m = n_src * k
    if m > 1 << 31:
        raise ValueError(f"method='systematic' needs n_src * k <= 2^31; got {n_src} * {k} = {m}")
    if units_total is not None and m > units_total:
        raise ValueError(
            f"method='systematic' needs n_src * k <= U = {units_total} (the total capacity units); "
            f"got {n_src} * {k} = {m}"
        )


def systematic_rows(
    backend: Any,
    caps: Any,
    *,
    n_src: int,
    k: int,
    seed: int,
    row0: int,
    rows: int,
    rows_per_call: int,
    perm_t: Any = None,
) -> Any:
    """Rows ``row0 .. row0 + rows - 1`` of the systematic router, ``rows_per_call`` rows per kernel call.

    ``caps`` are host (NumPy) capacities: the units ``cum`` are made on the host and uploaded
    once per capacities and device, so nothing is read back from the device."""
    xp = backend.xp
    check_systematic_slots(n_src, k)
    key, host = host_capacity_cum(caps)
    check_systematic_slots(n_src, k, int(host[-1]))
    (cum,) = on_backend(backend, ("capacity_cum", key), host)
    out = xp.empty((rows, k), dtype=xp.int32)
    for a, b in call_ranges(rows, rows_per_call):
        out[a:b] = systematic_block(
            backend,
            cum,
            n_src=n_src,
            k=k,
            seed=seed,
            row0=row0 + a,
            rows=b - a,
            perm_t=None if perm_t is None else perm_t[a:b],
        )
    return out


# -- the method-table entry -------------------------------------------------------------------


def check(rr: RowRange) -> None:
    """The checks of SPEC §11 that need no device data, run by the entry points before any work:
    the sizes, and with host capacities their units too (so a lazy Dask route raises when built)."""
    check_systematic_slots(rr.n_src, rr.k)
    if isinstance(rr.caps, np.ndarray):
        check_systematic_slots(rr.n_src, rr.k, int(host_capacity_cum(rr.caps)[1][-1]))


def rows(be: Any, rr: RowRange) -> Array:
    """The ``rows`` function of ``method="systematic"`` (see :mod:`gpu_phase_router.methods`)."""
    return systematic_rows(
        be, rr.caps, n_src=rr.n_src, k=rr.k, seed=rr.seed, row0=rr.row0, rows=rr.rows, rows_per_call=rr.rows_per_call
    )
