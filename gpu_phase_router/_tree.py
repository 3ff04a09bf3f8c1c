"""The package's one summation order (SPEC §7, §11): a fixed pairwise tree over float64 values.

Written against an array module ``xp`` (NumPy or CuPy); every aligned power-of-two run of the
values is a node of the tree, so sums compose over chunks (:func:`tree_partials`,
:func:`tree_combine`) and give the same bits on every library and any chunking.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TREE_EVAL_BLOCK = 1 << 14  # leaves per row when evaluating big nodes; any power of two gives the same bits
TREE_EVAL_ROWS = 64  # rows of TREE_EVAL_BLOCK leaves per step: temporaries stay below 4 MiB


def _node_sum(xp: Any, v: Any) -> float:
    """Value of the tree node over ``v`` (float64, length a power of two): adjacent pairs are added,
    level by level. Evaluated in aligned rows of ``TREE_EVAL_BLOCK`` leaves so temporaries stay small;
    every row is itself a node of the same tree, so the bits do not depend on the row size."""
    n = v.shape[0]
    if n > TREE_EVAL_BLOCK:
        step = TREE_EVAL_BLOCK * TREE_EVAL_ROWS
        rows = []
        for a in range(0, n, step):
            x = v[a : a + step].reshape(-1, TREE_EVAL_BLOCK)
            while x.shape[1] > 1:
                x = x[:, 0::2] + x[:, 1::2]
            rows.append(x[:, 0])
        v = xp.concatenate(rows) if len(rows) > 1 else rows[0]
    while v.shape[0] > 1:
        v = v[0::2] + v[1::2]
    return float(v[0])


def tree_partials(xp: Any, values: Any, start: int = 0) -> list[tuple[int, int, float]]:
    """Node values of :func:`tree_sum`'s tree for the elements ``start .. start + len(values) - 1``.

    The elements are split into the maximal aligned power-of-two runs (``(level, index)`` covers
    ``[index * 2^level, (index + 1) * 2^level)``), and each run's node value is returned as
    ``(level, index, value)``. :func:`tree_combine` joins the partials of consecutive chunks
    (any chunking) into exactly the float that :func:`tree_sum` gives for the whole vector.
    """
    v = xp.asarray(values, dtype=xp.float64)
    out = []
    pos, end = start, start + v.shape[0]
    while pos < end:
        level = (pos & -pos).bit_length() - 1 if pos else 64
        while pos + (1 << level) > end:
            level -= 1
        with np.errstate(over="ignore"):  # an overflow to inf is reported by the callers
            out.append((level, pos >> level, _node_sum(xp, v[pos - start : pos - start + (1 << level)])))
        pos += 1 << level
    return out


def tree_combine(partials: Any, n: int) -> float:
    """The tree sum of ``n`` elements from the :func:`tree_partials` of chunks covering ``[0, n)``."""
    nodes = {(int(lv), int(ix)): float(val) for lv, ix, val in partials}
    if sum(1 << lv for lv, _ in nodes) != n:
        raise ValueError(f"partial sums cover {sum(1 << lv for lv, _ in nodes)} elements; expected {n}")
    return _node_value(nodes, n, max(0, (n - 1).bit_length()), 0)


def _node_value(nodes: dict[tuple[int, int], float], n: int, level: int, index: int) -> float:
    """Tree node ``(level, index)`` from the given ``nodes``, adding children where it is absent.

    A module-level function, not a closure over ``nodes``: a recursive closure is a reference cycle
    that every call would leave to the garbage collector.
    """
    if (level, index) in nodes:
        return nodes[(level, index)]
    if index << level >= n:
        return 0.0  # all padding
    if level == 0:
        raise ValueError(f"partial sums do not cover element {index}")
    return _node_value(nodes, n, level - 1, 2 * index) + _node_value(nodes, n, level - 1, 2 * index + 1)


def tree_sum(xp: Any, values: Any) -> float:
    """Float64 sum in a fixed pairwise order, identical on every array library and any chunking.

    SPEC §7 and §11 divide by ``mean``/``sum`` of a float vector but leave the summation order
    open; library reductions (NumPy's pairwise blocks, CuPy's tree) round differently. Here the
    vector is padded with zeros to a power of two and adjacent pairs are added level by level
    (``v = v[0::2] + v[1::2]`` until one value is left). Every aligned power-of-two run is a node
    of that tree, so the sum composes over chunks: :func:`tree_partials` per chunk and
    :func:`tree_combine` give the same bits as this function (which is computed that way).
    """
    v = xp.asarray(values, dtype=xp.float64)
    return tree_combine(tree_partials(xp, v), v.shape[0])
