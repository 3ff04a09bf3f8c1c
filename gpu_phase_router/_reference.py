"""Plain reference implementation of SPEC.md, written for clarity rather than speed.

Every function here follows the text of SPEC.md line by line with Python integers and lists,
so it can serve as the oracle for the fast backends. It is O(n_src * n_tgt) and meant for
small inputs (tests) only.
"""

from __future__ import annotations

import math

import numpy as np

from ._keys import (
    MASK64,
    STREAM_PERM_S,
    STREAM_PERM_T,
    STREAM_SELECT,
    STREAM_SYSTEMATIC,
    at,
    feistel,
    feistel_inverse,
    stream,
)


def popcount_rows(words: list[list[int]], nbits: int) -> list[int]:
    """Popcount of each row of a bit-packed matrix (SPEC §2); padding bits must be clear."""
    counts = []
    for row in words:
        total = 0
        for b in range(len(row) * 64):
            bit = (row[b // 64] >> (b % 64)) & 1
            if bit and b >= nbits:
                raise ValueError("padding bit set")
            total += bit
        counts.append(total)
    return counts


def tree_sum(values: list[float]) -> float:
    """Float64 sum in the fixed pairwise order of SPEC §7 (see ``_tree.tree_sum``).

    The vector is padded with zeros to a power of two and element ``2i`` is added to element
    ``2i + 1`` (adjacent pairs), level by level, until one value is left.
    """
    vals = [float(v) for v in values]
    size = 1
    while size < len(vals):
        size *= 2
    vals += [0.0] * (size - len(vals))
    while len(vals) > 1:
        vals = [vals[2 * i] + vals[2 * i + 1] for i in range(len(vals) // 2)]
    return vals[0]


def weights_to_counts(weights: list[float], density: float, n_other: int) -> list[int]:
    """SPEC §7: degrees (or capacity counts) from non-negative weights."""
    mean = tree_sum(weights) / len(weights)
    out = []
    for w in weights:
        if w == 0:
            out.append(0)
        else:
            v = float(np.rint(float(w) / mean * density * n_other))
            out.append(int(min(max(v, 1), n_other)))
    return out


def in_ring(x: int, start: int, length: int, m: int) -> bool:
    """SPEC §4."""
    if length == 0:
        return False
    if length >= m:
        return True
    return (x - start) % m < length


def derived_permutations(n_src: int, n_tgt: int, seed: int) -> tuple[list[int], list[int]]:
    """SPEC §6: ``perm_s`` (length n_tgt) and ``perm_t`` (length n_src) from the seed."""
    ks, kt = stream(seed, STREAM_PERM_S), stream(seed, STREAM_PERM_T)
    return [feistel(c, n_tgt, ks) for c in range(n_tgt)], [feistel(j, n_src, kt) for j in range(n_src)]


def candidate_sets(d, c, perm_s, perm_t, rows=None) -> list[list[int]]:
    """SPEC §3–§4: the candidate set ``C_j`` of every source, by the fused ring rule (with ``rows``,
    only those sources' sets are made; the others are left empty)."""
    n_src, n_tgt = len(d), len(c)
    inv_s = [0] * n_tgt
    for col, pos in enumerate(perm_s):
        inv_s[pos] = col
    off_s, off_t = [0] * n_src, [0] * n_tgt
    for i in range(1, n_src):  # SPEC §3: off_s[i] = (d[0] + ... + d[i-1]) mod n_tgt
        off_s[i] = (off_s[i - 1] + d[i - 1]) % n_tgt
    for t in range(1, n_tgt):
        off_t[t] = (off_t[t - 1] + c[t - 1]) % n_src
    wanted = set(range(n_src) if rows is None else rows)
    sets = []
    for j in range(n_src):
        cj = []
        for q in range(d[j] if j in wanted else 0):
            col = inv_s[(off_s[j] + q) % n_tgt]
            if in_ring(perm_t[j], off_t[col], c[col], n_src):
                cj.append(col)
        sets.append(cj)
    return sets


def candidate_sets_materialised(d, c, perm_s, perm_t) -> list[list[int]]:
    """SPEC §4 by dense matrices, as the crate's legacy path: ``C_j = {col : S'=1 and T'=1}``.

    ``S'[j, col]`` is 1 when column ``col`` sits at one of the ``d[j]`` ring positions that
    follow ``off_s[j]`` on the target ring (after ``perm_s``); ``T'[j, col]`` is 1 when the
    phase ``perm_t[j]`` of source ``j`` falls in target ``col``'s interval on the source ring.
    """
    n_src, n_tgt = len(d), len(c)
    s_mat = np.zeros((n_src, n_tgt), dtype=bool)
    cursor = 0
    for j in range(n_src):
        for q in range(d[j]):
            s_mat[j, (cursor + q) % n_tgt] = True  # ring position
        cursor += d[j]
    s_prime = s_mat[:, list(perm_s)]  # ring position perm_s[col] -> column col
    t_ring = np.zeros((n_tgt, n_src), dtype=bool)  # target t covers source-ring phases
    cursor = 0
    for t in range(n_tgt):
        for q in range(c[t]):
            t_ring[t, (cursor + q) % n_src] = True
        cursor += c[t]
    t_prime = t_ring[:, list(perm_t)].T  # source j reads phase perm_t[j]
    both = s_prime & t_prime
    return [sorted(np.flatnonzero(both[j]).tolist()) for j in range(n_src)]


def select(cands: list[int], j: int, k: int, seed: int) -> list[int]:
    """SPEC §5: the ``min(k, |C_j|)`` smallest ``(key, col)`` pairs, padded with -1."""
    row_base = at(stream(seed, STREAM_SELECT), j)
    ranked = sorted((at(row_base, col), col) for col in cands)
    chosen = [col for _, col in ranked[:k]]
    return chosen + [-1] * (k - len(chosen))


def route_counts(d, c, k, seed, perm_s=None, perm_t=None) -> np.ndarray:
    """SPEC §3–§5 from count form. Returns int32 ``(n_src, k)``."""
    n_src, n_tgt = len(d), len(c)
    ps, pt = derived_permutations(n_src, n_tgt, seed)
    perm_s = ps if perm_s is None else [int(v) for v in perm_s]
    perm_t = pt if perm_t is None else [int(v) for v in perm_t]
    sets = candidate_sets(list(d), list(c), perm_s, perm_t)
    return np.array([select(sets[j], j, k, seed) for j in range(n_src)], dtype=np.int32).reshape(n_src, k)


def route(target_capacities, source_weights=None, k=4, seed=42, density=0.3) -> np.ndarray:
    """SPEC §7 then §3–§5: the phase router from weights and capacities (SPEC §13 when n_tgt < n_src)."""
    caps = [float(v) for v in target_capacities]
    weights = [1.0] * len(caps) if source_weights is None else [float(v) for v in source_weights]
    n_src, n_tgt = len(weights), len(caps)
    if n_tgt < n_src:
        return route_banded(caps, weights, k, seed, density)
    d = weights_to_counts(weights, density, n_tgt)
    c = weights_to_counts(caps, density, n_src)
    return route_counts(d, c, k, seed)


BAND_OVERSAMPLE = 4
BAND_FILL = 2
BAND_MAX_COLUMNS = 1 << 20
BAND_FILL_TRIES = 16


def water_filled_shares(caps: list[float], n_src: int, k: int) -> list[float]:
    """SPEC §13: each target's share of the sources, ``pi[e] = fair[e] / n_src``, where the fair
    shares ``n_src * k * cap / sum(cap)`` are water-filled so that none exceeds ``n_src``."""
    pi = [0.0] * len(caps)
    free = [c > 0 for c in caps]
    total = float(n_src * k)
    top = max(float(c) for c in caps)
    if math.isinf(total * top):  # SPEC §13: capacities near the float64 limit are scaled by 2^-m first
        caps = [math.ldexp(float(c), -math.frexp(top)[1]) for c in caps]
    while any(free):
        s = tree_sum([c if f else 0.0 for c, f in zip(caps, free, strict=True)])
        if s == 0:  # SPEC §13: every free capacity scaled to 0, the shares would be 0 / 0 (invalid input, §9)
            raise ValueError("target_capacities: positive capacities that become 0 once scaled by 2^-m")
        over = [f and total * float(c) / s > n_src for c, f in zip(caps, free, strict=True)]
        if not any(over):
            for e, c in enumerate(caps):
                if free[e]:
                    pi[e] = total * float(c) / s / n_src
            break
        for e in range(len(caps)):
            if over[e]:
                pi[e], free[e] = 1.0, False
                total -= n_src
    return pi


def band_weights(caps: list[float], n_src: int, k: int) -> list[float]:
    """SPEC §13: the weights the band widths are proportional to (the capacities when ``k == 1``)."""
    if k == 1:
        return [float(c) for c in caps]
    top = 1.0 - 1.0 / (2 * k * BAND_OVERSAMPLE)
    pi = np.array([min(p, top) for p in water_filled_shares(caps, n_src, k)], dtype=np.float64)
    logs = -np.log1p(-pi)  # one NumPy call on the whole vector, as the backends' host code
    out = []
    for e, c in enumerate(caps):
        out.append(0.0 if c == 0 else max(1.0, float(np.rint(float(logs[e]) * 2.0**32))))
    return out


def band_layout(caps: list[float], n_src: int, k: int, density: float) -> dict:
    """SPEC §13: the virtual target ring of the banded phase router.

    Returns ``n_cols`` (V), ``k_draw``, ``weights`` (u[e]), ``widths`` (b[e]), ``counts`` (the
    capacity count of each of band e's columns) and ``col_map`` (virtual column -> expert).
    """
    n_tgt = len(caps)
    want = BAND_FILL * (k * BAND_OVERSAMPLE) / density  # inf for a subnormal density: ceil(inf) = inf
    v0 = max(n_tgt, min(BAND_MAX_COLUMNS, math.ceil(want) if math.isfinite(want) else BAND_MAX_COLUMNS))
    weights = band_weights(caps, n_src, k)
    total = tree_sum(weights)
    widths, counts = [], []
    for cap in weights:
        if cap == 0:
            widths.append(0)
            counts.append(0)
            continue
        q = float(cap) / total * v0
        b = max(1, math.ceil(q))
        cv = float(np.rint(q / b * n_src))
        widths.append(b)
        counts.append(int(min(max(cv, 1), n_src)))
    col_map = []
    for e, b in enumerate(widths):
        col_map += [e] * b
    n_cols = len(col_map)
    return {
        "n_cols": n_cols,
        "k_draw": min(k * BAND_OVERSAMPLE, n_cols),
        "weights": weights,
        "widths": widths,
        "counts": counts,
        "col_map": col_map,
    }


def first_distinct(columns: list[int], col_map: list[int], k: int) -> list[int]:
    """SPEC §13: the first ``k`` distinct experts of a row of virtual columns (``-1`` ends it), padded with -1."""
    row: list[int] = []
    for v in columns:
        if v < 0 or len(row) == k:
            break
        e = col_map[v]
        if e not in row:
            row.append(e)
    return row + [-1] * (k - len(row))


def complete_row(row: list[int], col_map: list[int], j: int, seed: int) -> list[int]:
    """SPEC §13, fill completion: a short row (fewer than ``k`` targets before the ``-1`` padding) of
    a source of positive degree gets further targets until it lists ``min(k, P)``, ``P`` the number
    of targets of positive capacity (the distinct values of ``col_map``)."""
    k = len(row)
    listed = [e for e in row if e >= 0]
    n_cols = len(col_map)
    row_base = at(stream(seed, STREAM_SELECT), j)
    for r in range(BAND_FILL_TRIES):  # capacity-weighted draws: the keys of columns V, V + 1, ...
        if len(listed) == k:
            break
        e = col_map[at(row_base, n_cols + r) % n_cols]
        if e not in listed:
            listed.append(e)
    positive = sorted(set(col_map))  # ascending targets of positive capacity
    start = positive.index(col_map[at(row_base, n_cols) % n_cols])
    for i in range(len(positive)):  # then every target in ascending order, cyclically
        if len(listed) == k:
            break
        e = positive[(start + i) % len(positive)]
        if e not in listed:
            listed.append(e)
    return listed + [-1] * (k - len(listed))


def route_banded(caps: list[float], weights: list[float], k: int, seed: int, density: float) -> np.ndarray:
    """SPEC §13: the banded phase router (used by :func:`route` when ``n_tgt < n_src``)."""
    n_src = len(weights)
    lay = band_layout(caps, n_src, k, density)
    d = weights_to_counts(weights, density, lay["n_cols"])
    c = []
    for e, b in enumerate(lay["widths"]):
        c += [lay["counts"][e]] * b
    draws = route_counts(d, c, lay["k_draw"], seed)
    rows = [first_distinct([int(v) for v in draws[j]], lay["col_map"], k) for j in range(n_src)]
    rows = [complete_row(rows[j], lay["col_map"], j, seed) if d[j] > 0 else rows[j] for j in range(n_src)]
    return np.array(rows, dtype=np.int32).reshape(n_src, k)


def capacity_units(caps: list[float]) -> list[int]:
    """SPEC §11: integer capacity units summing to about 2^31."""
    total = tree_sum(caps)
    return [0 if v == 0 else max(1, int(np.rint(float(v) / total * 2.0**31))) for v in caps]


def route_systematic(target_capacities, n_src, k, seed, perm_t=None) -> np.ndarray:
    """SPEC §11: the systematic router. Returns int32 ``(n_src, k)``."""
    units = capacity_units([float(v) for v in target_capacities])
    cum = [0]
    for u in units:
        cum.append(cum[-1] + u)
    big_u = cum[-1]
    m = n_src * k
    if perm_t is None:
        key = stream(seed, STREAM_PERM_T)
        perm_t = [feistel(j, n_src, key) for j in range(n_src)]
    phi = at(stream(seed, STREAM_SYSTEMATIC), 0) % m
    out = []
    for j in range(n_src):
        row = []
        for s in range(k):
            x = ((s * n_src + int(perm_t[j])) * big_u + phi) // m
            assert x <= MASK64
            t = 0
            while not (cum[t] <= x < cum[t + 1]):
                t += 1
            if t not in row:
                row.append(t)
        out.append(row + [-1] * (k - len(row)))
    return np.array(out, dtype=np.int32).reshape(n_src, k)


def hard_caps(caps: list[float], n_src: int, k: int, headroom: float) -> list[int]:
    """SPEC §12: hard per-target caps with headroom."""
    total = tree_sum(caps)
    return [0 if v == 0 else max(1, math.ceil(float(v) / total * n_src * k * headroom)) for v in caps]


def enforce_capacity(routes: np.ndarray, hard: list[int]) -> np.ndarray:
    """SPEC §12: admit slots in row-major order; drop a slot whose target is full."""
    out = np.array(routes, dtype=np.int32, copy=True)
    used = [0] * len(hard)
    for j in range(out.shape[0]):
        for s in range(out.shape[1]):
            t = int(out[j, s])
            if t < 0:
                continue
            if used[t] < hard[t]:
                used[t] += 1
            else:
                out[j, s] = -1
    return out


__all__ = [
    "band_layout",
    "band_weights",
    "complete_row",
    "candidate_sets",
    "candidate_sets_materialised",
    "capacity_units",
    "derived_permutations",
    "enforce_capacity",
    "feistel",
    "feistel_inverse",
    "first_distinct",
    "hard_caps",
    "in_ring",
    "popcount_rows",
    "route",
    "route_banded",
    "water_filled_shares",
    "route_counts",
    "route_systematic",
    "select",
    "tree_sum",
    "weights_to_counts",
]
