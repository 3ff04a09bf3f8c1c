"""The one value every routing method receives: a validated range of rows of one routing call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import DEFAULT_ROWS_PER_CALL


@dataclass(frozen=True)
class RowRange:
    """Rows ``[row0, row0 + rows)`` of one routing call, with every global quantity they need.

    Made by the entry points (``route``, ``route_block``, Dask, the torch router) *after*
    validation; methods read it and never check it again.

    Attributes:
        caps: *all* target capacities, a validated float64 NumPy vector ``[n_tgt]`` (target-side
            preparation is O(n_tgt) and runs on the host), or ``None`` in the count form
            (``route_counts``), which gives the integer counts itself.
        n_src: the global number of sources.
        row0: global index of the first row.
        rows: number of rows.
        k: targets per source.
        seed: integer in ``[0, 2^64)``.
        density: SPEC §7 density in ``(0, 1]`` (unused by the count form).
        w: the rows' float64 weights (finite, ``>= 0``) as an array of the backend's ``xp``, or
            ``None`` for sources of weight 1 (then nothing is read back from the device: the path
            a training loop needs).
        weight_mean: the mean of all ``n_src`` weights (methods with ``uses_weight_mean``).
        degree_prefix: the sum of the degrees of rows ``[0, row0)`` (methods with ``degrees``).
        rows_per_call: rows per kernel call.
    """

    caps: np.ndarray | None
    n_src: int
    row0: int
    rows: int
    k: int
    seed: int
    density: float = 0.3
    w: Any = None
    weight_mean: float = 1.0
    degree_prefix: int = 0
    rows_per_call: int = DEFAULT_ROWS_PER_CALL

    @property
    def n_tgt(self) -> int:
        """Number of targets (``len(caps)``)."""
        assert self.caps is not None
        return int(self.caps.shape[0])


__all__ = ["DEFAULT_ROWS_PER_CALL", "RowRange"]
