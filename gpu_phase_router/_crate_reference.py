"""Plain-Python oracle of crate-exact mode (SPEC.md §14): the crate ``phase_router_rs``'s routes.

Written from the crate's ``src/router.rs`` / ``src/core.rs`` and the semantics of the Rust crates it
draws with (rand 0.8.5, rand_core 0.6.3, rand_chacha 0.3.1), on Python integers, one operation per
line, for clarity and not for speed. The fast backends (Numba, CUDA) are tested against it; it is
never imported by them.

Pieces:

* :func:`chacha8_block` — the ChaCha block function with 8 rounds (4 double rounds), 256-bit key,
  64-bit block counter in words 12–13, stream (nonce) 0 in words 14–15.
* :class:`ChaCha8Rng` — ``ChaCha8Rng::seed_from_u64``: the u64 seed expanded by PCG32 into the 32-byte
  key; ``next_u32`` takes the next keystream word, ``next_u64`` the next two (low word first), in
  keystream order (blocks 0, 1, 2, …, words 0..15 of each).
* ``gen_range`` on u64/usize (:meth:`ChaCha8Rng.gen_range_u64`) and on u32
  (:meth:`ChaCha8Rng.gen_range_u32`, the path ``shuffle`` takes): widening multiply with the "zone"
  rejection ``zone = (range << leading_zeros(range)) - 1``; accept when the low half ``<= zone``.
* :func:`shuffle` — ``SliceRandom::shuffle``: for ``i`` from ``len - 1`` down to 1, swap ``i`` with
  ``gen_index(i + 1)``.
* :func:`phase_router`, :func:`phase_router_auto`, :func:`phase_router_uniform_dispatch` — the crate's
  three entry points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

M32 = (1 << 32) - 1
M64 = (1 << 64) - 1
CHACHA_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
CHACHA8_DOUBLE_ROUNDS = 4
PCG_MUL = 6364136223846793005
PCG_INC = 11634580027462260723


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & M32


def _quarter(x: list[int], a: int, b: int, c: int, d: int) -> None:
    x[a] = (x[a] + x[b]) & M32
    x[d] = _rotl32(x[d] ^ x[a], 16)
    x[c] = (x[c] + x[d]) & M32
    x[b] = _rotl32(x[b] ^ x[c], 12)
    x[a] = (x[a] + x[b]) & M32
    x[d] = _rotl32(x[d] ^ x[a], 8)
    x[c] = (x[c] + x[d]) & M32
    x[b] = _rotl32(x[b] ^ x[c], 7)


def chacha8_block(key: Sequence[int], counter: int) -> list[int]:
    """The 16 output words of ChaCha8 block ``counter`` (64-bit) for the 8-word ``key``, stream 0."""
    state = [*CHACHA_CONSTANTS, *key, counter & M32, (counter >> 32) & M32, 0, 0]
    x = list(state)
    for _ in range(CHACHA8_DOUBLE_ROUNDS):
        _quarter(x, 0, 4, 8, 12)
        _quarter(x, 1, 5, 9, 13)
        _quarter(x, 2, 6, 10, 14)
        _quarter(x, 3, 7, 11, 15)
        _quarter(x, 0, 5, 10, 15)
        _quarter(x, 1, 6, 11, 12)
        _quarter(x, 2, 7, 8, 13)
        _quarter(x, 3, 4, 9, 14)
    return [(x[i] + state[i]) & M32 for i in range(16)]


def pcg32_key(seed: int) -> list[int]:
    """``seed_from_u64``: the 8 key words (little-endian u32 of the 32-byte seed) from PCG32 steps."""
    state = seed & M64
    key = []
    for _ in range(8):
        state = (state * PCG_MUL + PCG_INC) & M64
        xorshifted = (((state >> 18) ^ state) >> 27) & M32
        rot = state >> 59
        key.append(((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & M32)
    return key


def _leading_zeros(x: int, bits: int) -> int:
    return bits - x.bit_length()


class ChaCha8Rng:
    """``rand_chacha::ChaCha8Rng::seed_from_u64(seed)``: a keystream read word by word."""

    def __init__(self, seed: int) -> None:
        self.key = pcg32_key(seed)
        self.block = 0  # next block to generate
        self.buf: list[int] = []
        self.pos = 0

    def next_u32(self) -> int:
        if self.pos == len(self.buf):
            self.buf = chacha8_block(self.key, self.block)
            self.block += 1
            self.pos = 0
        word = self.buf[self.pos]
        self.pos += 1
        return word

    def next_u64(self) -> int:
        low = self.next_u32()
        return low | (self.next_u32() << 32)

    def gen_range_u64(self, low: int, high_inclusive: int) -> int:
        """``gen_range(low..=high)`` for u64/usize: 64×64→128 multiply, zone rejection."""
        rng = (high_inclusive - low + 1) & M64
        if rng == 0:
            return self.next_u64()
        zone = ((rng << _leading_zeros(rng, 64)) & M64) - 1
        while True:
            prod = self.next_u64() * rng
            if prod & M64 <= zone:
                return low + (prod >> 64)

    def gen_range_u32(self, low: int, high_exclusive: int) -> int:
        """``gen_range(low..high)`` for u32: 32×32→64 multiply, zone rejection."""
        rng = (high_exclusive - 1 - low + 1) & M32
        if rng == 0:
            return self.next_u32()
        zone = ((rng << _leading_zeros(rng, 32)) & M32) - 1
        while True:
            prod = self.next_u32() * rng
            if prod & M32 <= zone:
                return low + (prod >> 32)


def gen_index(rng: ChaCha8Rng, ubound: int) -> int:
    """rand's ``seq::gen_index``: the u32 path when ``ubound`` fits in u32, else usize."""
    if ubound <= M32:
        return rng.gen_range_u32(0, ubound)
    return rng.gen_range_u64(0, ubound - 1)


def shuffle(values: list[int], rng: ChaCha8Rng) -> None:
    """``SliceRandom::shuffle`` in place (Fisher–Yates from the end)."""
    for i in range(len(values) - 1, 0, -1):
        j = gen_index(rng, i + 1)
        values[i], values[j] = values[j], values[i]


def auto_permutations(n: int, seed: int) -> tuple[list[int], list[int]]:
    """The two permutations ``phase_router_auto`` draws: ``0..n`` shuffled twice by one rng."""
    rng = ChaCha8Rng(seed)
    perm_s = list(range(n))
    perm_t = list(range(n))
    shuffle(perm_s, rng)
    shuffle(perm_t, rng)
    return perm_s, perm_t


def row_ones(bits: np.ndarray, n: int, nb_words: int) -> list[int]:
    """Popcount of each of the ``n`` rows of ``nb_words`` words (every bit of every word counts)."""
    flat = [int(w) for w in np.asarray(bits, dtype=np.uint64).reshape(-1)]
    return [sum(bin(w).count("1") for w in flat[i * nb_words : (i + 1) * nb_words]) for i in range(n)]


def offsets(ones: Sequence[int], n: int) -> list[int]:
    """``compute_offsets``: ``off[0] = 0``, ``off[i] = (off[i-1] + ones[i-1]) mod n``."""
    out = [0] * n
    for i in range(1, n):
        out[i] = (out[i - 1] + ones[i - 1]) % n
    return out


def phase_router_counts(
    ones_s: Sequence[int],
    ones_t: Sequence[int],
    n: int,
    k: int,
    perm_s: Sequence[int],
    perm_t: Sequence[int],
    seed: int,
) -> np.ndarray:
    """The crate's kernel on row popcounts: int32 ``(n, k)`` routes, ``-1`` for empty slots."""
    off_s = offsets(ones_s, n)
    off_t = offsets(ones_t, n)
    inv_s = [0] * n
    for i, p in enumerate(perm_s):
        inv_s[p] = i
    out = np.full((n, k), -1, dtype=np.int32)
    for j in range(n):
        rng = ChaCha8Rng((seed + j) & M64)
        p_t = perm_t[j]
        count = 0
        p = off_s[j]
        for _ in range(ones_s[j]):
            col = inv_s[p]
            d = (p_t - off_t[col]) % n
            if d < ones_t[col]:
                if count < k:
                    out[j, count] = col
                else:
                    r = rng.gen_range_u64(0, count)
                    if r < k:
                        out[j, r] = col
                count += 1
            p += 1
            if p == n:
                p = 0
    return out


def phase_router(
    s_bits: np.ndarray,
    t_bits: np.ndarray,
    n: int,
    nb_words: int,
    k: int,
    col_perm_s: Sequence[int],
    col_perm_t: Sequence[int],
    seed: int,
) -> np.ndarray:
    """``router::phase_router`` on flat uint64 bit arrays of ``n * nb_words`` words."""
    return phase_router_counts(
        row_ones(s_bits, n, nb_words),
        row_ones(t_bits, n, nb_words),
        n,
        k,
        [int(v) for v in col_perm_s],
        [int(v) for v in col_perm_t],
        seed,
    )


def phase_router_auto(s_bits: np.ndarray, t_bits: np.ndarray, n: int, k: int, seed: int) -> np.ndarray:
    """The binding's ``phase_router_auto``: permutations from :func:`auto_permutations`, same seed."""
    nb_words = (n + 63) // 64
    perm_s, perm_t = auto_permutations(n, seed)
    return phase_router(s_bits, t_bits, n, nb_words, k, perm_s, perm_t, seed)


def uniform_dispatch_plan(
    n_tokens: int, n_experts: int, k: int, base_density: float, oversample: int
) -> tuple[int, int, int, int, int]:
    """``(n_pad, width, ones_e, s_ones, k_kernel)`` of ``phase_router_uniform_dispatch``."""
    width = max(n_tokens // n_experts, 1)
    n_pad = width * n_experts
    if n_pad < n_tokens:
        n_pad = (n_tokens // n_experts + 1) * n_experts
        width = n_pad // n_experts
    # Rust's f64::round rounds half away from zero; `as usize` saturates (negative -> 0)
    ones_e = min(max(_round_half_away(base_density * width), 1), n_pad)
    s_ones = min(max(_round_half_away(base_density * n_pad), 1), n_pad)
    k_kernel = min(max(k * oversample, k + 1), n_pad)
    return n_pad, width, ones_e, s_ones, k_kernel


def _round_half_away(x: float) -> int:
    """Rust's ``f64::round`` (half away from zero) followed by ``as usize`` (saturating, NaN -> 0)."""
    if x != x or x <= 0.0:
        return 0
    if x == float("inf"):
        return M64
    whole = math.floor(x)
    return min(int(whole) + (1 if x - whole >= 0.5 else 0), M64)


def phase_router_uniform_dispatch(
    n_tokens: int, n_experts: int, k: int, base_density: float, seed: int, oversample: int = 4
) -> np.ndarray:
    """``phase_router_uniform_dispatch`` (the binding's argument order): int32 ``(n_tokens, k)`` expert ids."""
    n_pad, width, ones_e, s_ones, k_kernel = uniform_dispatch_plan(n_tokens, n_experts, k, base_density, oversample)
    perm_s, perm_t = auto_permutations(n_pad, seed)
    routes = phase_router_counts([s_ones] * n_pad, [ones_e] * n_pad, n_pad, k_kernel, perm_s, perm_t, seed)
    out = np.full((n_tokens, k), -1, dtype=np.int32)
    for row in range(n_tokens):
        seen: set[int] = set()
        j = 0
        for col in routes[row]:
            if col < 0 or col >= n_pad:
                continue
            e = int(col) // width
            if e >= n_experts or e in seen:
                continue
            seen.add(e)
            out[row, j] = e
            j += 1
            if j == k:
                break
    return out
