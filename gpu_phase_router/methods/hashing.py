"""Hash-routing baselines for evaluation: ``route(..., method="hash" | "weighted_hash")``, kernels and
method-table entries.

Both are counter-based: the slot ``s`` of source ``j`` draws the 64-bit key

    key(j, s) = at(at(stream(seed, STREAM), j), s)        # SplitMix64, as SPEC §5

so a row depends only on ``(seed, j)`` — no global RNG state, any split of the rows into
blocks (or GPU threads) gives the same table, and NumPy and CuPy compute the same integers
(the code below is written once against the array module ``xp``, in uint64 arithmetic).

* ``method="hash"`` (stream 5) — the crate's capacity-blind baseline: ``k`` independent uniform
  targets per source, **with replacement** like the crate's ``rng.integers(0, n, (n, k))``, so a
  row may name a target twice (probability about ``k^2 / (2 P)`` per row); each occurrence is a
  separate slot for enforcement and survival. It is blind to the *size* of capacities but, like
  every method, never sends a slot to a zero-capacity target: with ``pos`` the ``P`` targets of
  positive capacity in ascending order, slot ``s`` takes ``pos[key(j, s) mod P]`` (SPEC §12).
  With all capacities positive that is ``key(j, s) mod n_tgt``, the crate's rule.
* ``method="weighted_hash"`` (stream 6) — capacity-aware: ``k`` **distinct** targets per
  source, drawn one after another with probability proportional to capacity among the targets
  not yet drawn (successive sampling without replacement — the same distribution as the
  Efraimidis–Spirakis keys ``u^(1/w)``, but integer only). Capacities are turned into the
  integer units ``u[t]`` of SPEC §11 (``rint(cap / sum(cap) * 2^31)``, at least 1, 0 for a zero
  capacity); slot ``s`` takes ``x = key(j, s) mod R`` with ``R`` the units not yet drawn in
  that row, and maps ``x`` to the target whose interval holds it once the drawn intervals are
  cut out. Zero-capacity targets have no units and are never chosen; if fewer than ``k``
  targets have positive capacity the row ends in ``-1``.

For both, a source with weight 0 never routes (its row is all ``-1``); every other source gets
``k`` slots whatever its weight (``density`` is not used).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import Array
from .._keys import at_array, stream
from .._prep import call_ranges, host_capacity_cum, on_backend
from ._row_range import RowRange

STREAM_HASH = 5
STREAM_WEIGHTED_HASH = 6


def slot_keys(xp: Any, seed: int, stream_id: int, row0: int, rows: int, k: int) -> Any:
    """uint64 ``[rows, k]``: ``key(j, s) = at(at(stream(seed, stream_id), j), s)`` for
    ``j = row0 .. row0 + rows - 1`` and ``s = 0 .. k - 1``."""
    rows_idx = xp.arange(row0, row0 + rows, dtype=xp.uint64)
    row_base = at_array(xp, xp.uint64(stream(seed, stream_id)), rows_idx)
    return at_array(xp, row_base[:, None], xp.arange(k, dtype=xp.uint64)[None, :])


def hash_block(xp: Any, n_tgt: int, *, k: int, seed: int, row0: int, rows: int, positive: Any = None) -> Any:
    """Rows ``row0 .. row0 + rows - 1`` of the uniform hash → int32 ``[rows, k]``.

    Args:
        n_tgt: number of targets.
        positive: optional int64 ``[P]``, the targets of positive capacity in ascending order
            (``None``: all ``n_tgt`` targets); slots are uniform over these.
    """
    keys = slot_keys(xp, seed, STREAM_HASH, row0, rows, k)
    if positive is None or int(positive.shape[0]) == n_tgt:
        return (keys % xp.uint64(n_tgt)).astype(xp.int32)
    idx = (keys % xp.uint64(positive.shape[0])).astype(xp.int64)
    return positive[idx].astype(xp.int32)


def weighted_hash_block(xp: Any, cum: Any, *, k: int, seed: int, row0: int, rows: int, total: int, n_pos: int) -> Any:
    """Rows of the capacity-weighted hash → int32 ``[rows, k]`` (see the module docstring).

    ``k * (k + 1) / 2`` vectorised passes over the rows (a ``k``-wide sort per slot): cheap for
    the small ``k`` of MoE routing, slow for ``k`` in the hundreds.

    Args:
        cum: uint64 ``[n_tgt + 1]`` cumulative capacity units (:func:`gpu_phase_router._prep.capacity_cum`).
        total: ``cum[-1]``; n_pos: the number of targets with positive units (host integers, so
            nothing is read back from a device).
    """
    keys = slot_keys(xp, seed, STREAM_WEIGHTED_HASH, row0, rows, k)
    units = cum[1:] - cum[:-1]
    out = xp.full((rows, k), -1, dtype=xp.int32)
    # ``taken`` holds the targets drawn so far in ascending order (padding n_tgt sorts last).
    n_tgt = int(units.shape[0])
    taken = xp.full((rows, k), n_tgt, dtype=xp.int64)
    left = xp.full(rows, xp.uint64(total), dtype=xp.uint64)  # units not yet drawn, per row
    for s in range(min(k, n_pos)):
        x = keys[:, s] % left
        for q in range(s):  # cut the drawn intervals out, in ascending order
            t = taken[:, q]
            x = xp.where(x >= cum[t], x + units[t], x)
        t_new = xp.searchsorted(cum, x, side="right") - 1
        out[:, s] = t_new.astype(xp.int32)
        left = left - units[t_new]
        taken[:, s] = t_new
        taken = xp.sort(taken, axis=1)
    return out


# -- the method-table entries ------------------------------------------------------------------


def _zero_weight_rows(out: Array, w: Array | None) -> Array:
    """A source of weight 0 never routes: its row becomes all ``-1``."""
    if w is not None:
        out[w == 0] = -1
    return out


def hash_rows(be: Any, rr: RowRange) -> Array:
    """The ``rows`` function of ``method="hash"``."""
    xp = be.xp
    caps = np.ascontiguousarray(rr.caps, dtype=np.float64)
    positive_host = np.flatnonzero(caps > 0).astype(np.int64)  # zero capacities never receive
    (positive,) = on_backend(be, ("positive", caps.tobytes()), positive_host)
    out = xp.empty((rr.rows, rr.k), dtype=xp.int32)
    for a, b in call_ranges(rr.rows, rr.rows_per_call):
        out[a:b] = hash_block(
            xp, int(caps.shape[0]), k=rr.k, seed=rr.seed, row0=rr.row0 + a, rows=b - a, positive=positive
        )
    return _zero_weight_rows(out, rr.w)


def weighted_hash_rows(be: Any, rr: RowRange) -> Array:
    """The ``rows`` function of ``method="weighted_hash"``."""
    xp = be.xp
    key, host = host_capacity_cum(rr.caps)
    total, n_pos = int(host[-1]), int(np.count_nonzero(host[1:] - host[:-1]))
    (cum,) = on_backend(be, ("capacity_cum", key), host)
    out = xp.empty((rr.rows, rr.k), dtype=xp.int32)
    for a, b in call_ranges(rr.rows, rr.rows_per_call):
        out[a:b] = weighted_hash_block(
            xp, cum, k=rr.k, seed=rr.seed, row0=rr.row0 + a, rows=b - a, total=total, n_pos=n_pos
        )
    return _zero_weight_rows(out, rr.w)


__all__ = [
    "STREAM_HASH",
    "STREAM_WEIGHTED_HASH",
    "hash_block",
    "hash_rows",
    "slot_keys",
    "weighted_hash_block",
    "weighted_hash_rows",
]
