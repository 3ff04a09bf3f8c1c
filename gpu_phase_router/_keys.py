"""SplitMix64 keys and the keyed Feistel bijection of SPEC §5–§6, in plain Python integers.

These are the slow, obvious definitions used by the reference implementation and for
host-side constants (the per-call stream keys), plus the same SplitMix64 vectorised over
NumPy/CuPy arrays (:func:`mix64_array`, :func:`at_array`) for the hash baselines. The kernels
implement the same formulas in uint64 arithmetic; tests compare them against these functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX_M1 = 0xBF58476D1CE4E5B9
MIX_M2 = 0x94D049BB133111EB

STREAM_PERM_S = 1
STREAM_PERM_T = 2
STREAM_SELECT = 3
STREAM_SYSTEMATIC = 4

FEISTEL_ROUNDS = 6
FILL_TRIES = 16  # SPEC §13 fill completion: the draws key(j, V + r), r < FILL_TRIES, before the band walk


def mix64(z: int) -> int:
    """SplitMix64 finaliser (SPEC §5)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_M1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_M2) & MASK64
    return z ^ (z >> 31)


def stream(seed: int, s: int) -> int:
    """Key of stream ``s`` (1 perm_s, 2 perm_t, 3 select, 4 systematic) for ``seed``."""
    return mix64(seed + GOLDEN * s)


def at(base: int, i: int) -> int:
    """The ``i``-th SplitMix64 output from state ``base``."""
    return mix64(base + GOLDEN * (i + 1))


def mix64_array(xp: Any, z: Any) -> Any:
    """:func:`mix64` elementwise on a uint64 array of the module ``xp`` (NumPy or CuPy)."""
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(MIX_M1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(MIX_M2)
    return z ^ (z >> xp.uint64(31))


def at_array(xp: Any, base: Any, i: Any) -> Any:
    """:func:`at` elementwise: ``mix64(base + G * (i + 1))`` for uint64 arrays (or ints) of ``xp``."""
    with np.errstate(over="ignore"):
        base = xp.asarray(base, dtype=xp.uint64)
        i = xp.asarray(i, dtype=xp.uint64)
        return mix64_array(xp, base + xp.uint64(GOLDEN) * (i + xp.uint64(1)))


def feistel_params(n: int) -> tuple[int, int]:
    """Half width ``h`` and ``mask = 2**h - 1`` of the Feistel network on ``[0, n)``."""
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    h = bits // 2
    return h, (1 << h) - 1


def feistel(x: int, n: int, key: int) -> int:
    """Keyed bijection of ``[0, n)`` by a 6-round Feistel network with cycle walking."""
    if n == 1:
        return 0
    h, mask = feistel_params(n)
    while True:
        left, right = x >> h, x & mask
        for r in range(FEISTEL_ROUNDS):
            left, right = right, left ^ (at(key, (r << 32) + right) & mask)
        x = (left << h) | right
        if x < n:
            return x


def feistel_inverse(y: int, n: int, key: int) -> int:
    """Inverse of :func:`feistel`: ``feistel_inverse(feistel(x, n, key), n, key) == x``."""
    if n == 1:
        return 0
    h, mask = feistel_params(n)
    while True:
        left, right = y >> h, y & mask
        for r in reversed(range(FEISTEL_ROUNDS)):
            left, right = right ^ (at(key, (r << 32) + left) & mask), left
        y = (left << h) | right
        if y < n:
            return y
