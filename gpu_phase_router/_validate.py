"""Input validation (SPEC §9): every check runs before any kernel and names the argument.

Checks work on NumPy and CuPy arrays alike (``xp`` is the array's module); reductions over
device arrays cost one small synchronisation each, which is the price of never launching a
kernel on bad data.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np

SEED_LIMIT = 1 << 64
SIZE_LIMIT = (1 << 63) - 1  # sizes are int64 in every kernel
DEFAULT_ROWS_PER_CALL = 1 << 18  # rows per kernel call: bounds the O(rows) temporaries


def check_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """A Python/NumPy integer (not bool) in ``[lo, hi]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}; got {value}")
    return value


def check_size(name: str, value: Any) -> int:
    """A size (``n_src``, ``n_tgt``, ``n``): an integer in ``[1, 2^63 - 1]``."""
    value = check_int(name, value, lo=1)
    if value > SIZE_LIMIT:
        raise ValueError(f"{name} must be <= 2^63 - 1 (sizes are int64); got {value}")
    return value


def check_seed(seed: Any) -> int:
    """Seeds are integers in ``[0, 2^64)``."""
    return check_int("seed", seed, lo=0, hi=SEED_LIMIT - 1)


def check_k(k: Any, n_tgt: int) -> int:
    return check_int("k", k, lo=1, hi=n_tgt) if n_tgt >= 1 else check_int("k", k, lo=1)


def check_real(
    name: str, value: Any, *, lo: float, hi: float | None = None, lo_open: bool = False, note: str = ""
) -> float:
    """The one check of a real-number argument: a real number (not bool), finite, ``> lo``
    (``lo_open``) or ``>= lo``, and ``<= hi`` when given → ``float``. ``note`` ends the message."""
    if hi is None:
        rng = f"{'>' if lo_open else '>='} {lo:g}"
        want = f"a finite number {rng}"
    else:
        rng = want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {rng}; got {type(value).__name__}")
    x = float(value)
    if not (math.isfinite(x) and (x > lo if lo_open else x >= lo) and (hi is None or x <= hi)):
        raise ValueError(f"{name} must be {want}{note}; got {x}")
    return x


def check_density(density: Any) -> float:
    """SPEC §7 density in ``(0, 1]``."""
    return check_real("density", density, lo=0.0, hi=1.0, lo_open=True)


def check_rows_per_call(rows_per_call: Any, block_rows: Any = None) -> int:
    """``rows_per_call`` (``None``: the default); ``block_rows`` is its former name."""
    if block_rows is not None:
        if rows_per_call is not None:
            raise TypeError("give rows_per_call only (block_rows is its former name)")
        rows_per_call, name = block_rows, "block_rows"
    else:
        name = "rows_per_call"
    return DEFAULT_ROWS_PER_CALL if rows_per_call is None else check_int(name, rows_per_call, lo=1)


def check_route_options(
    k: Any, n_tgt: int, seed: Any, density: Any, rows_per_call: Any, block_rows: Any = None
) -> tuple[int, int, float, int]:
    """``k``, ``seed``, ``density`` and ``rows_per_call`` of a routing call, checked in that order."""
    k = check_k(k, n_tgt)
    seed = check_seed(seed)
    return k, seed, check_density(density), check_rows_per_call(rows_per_call, block_rows)


def vector_length(name: str, x: Any) -> int:
    """Length of a 1-D array or sequence (arrays are not converted; errors name ``name``)."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D array or sequence of numbers; got {type(x).__name__}")
    shape = getattr(x, "shape", None)
    if shape is None:
        try:
            shape = np.shape(x)
        except ValueError as exc:  # a ragged nested sequence
            raise ValueError(f"{name} must be a 1-D array or sequence of numbers: {exc}") from None
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(shape)}")
    return int(shape[0])


def as_vector(xp: Any, name: str, x: Any) -> Any:
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__") and not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a 1-D array or sequence of numbers; got {type(x).__name__}")
    if xp is np and not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} must be a 1-D array or sequence of numbers: {exc}") from None
    if x.dtype.kind not in "biufc":
        raise TypeError(f"{name} must be a 1-D array of numbers; got dtype {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(x.shape)}")
    return x


def check_nonnegative_weights(xp: Any, name: str, x: Any) -> Any:
    """Finite, non-negative real weights → float64 vector (may be empty or all zero: one row range)."""
    x = as_vector(xp, name, x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers; got dtype {x.dtype}")
    x = x.astype(xp.float64, copy=False)
    if x.shape[0]:
        if not bool(xp.isfinite(x).all()):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
        if bool((x < 0).any()):
            raise ValueError(f"{name} must be >= 0; got minimum {float(x.min())}")
    return x


def check_weights(xp: Any, name: str, x: Any) -> Any:
    """Finite, non-negative real weights with at least one positive entry → float64 vector."""
    x = check_nonnegative_weights(xp, name, x)
    if x.shape[0] < 1:
        raise ValueError(f"{name} must not be empty")
    if not bool((x > 0).any()):
        raise ValueError(f"{name} must have at least one positive entry; got all zeros")
    return x


def check_sum(xp: Any, name: str, x: Any) -> float:
    """The tree sum (SPEC §7) of the float64 vector ``x``, which must be finite: a sum that overflows
    is invalid input (SPEC §7, §9), where shares would silently come out as 0."""
    from ._tree import tree_sum

    total = tree_sum(xp, x)
    if not math.isfinite(total):
        raise ValueError(f"{name}: the sum of the values overflows float64; rescale them (relative values)")
    return total


def check_int_vector(
    xp: Any, name: str, x: Any, *, length: int | None = None, lo: int = 0, hi: int | None = None
) -> Any:
    """Integer vector (any integer dtype) with values in ``[lo, hi]`` → int64 vector."""
    x = as_vector(xp, name, x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype; got {x.dtype}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name} must have length {length}; got {x.shape[0]}")
    if x.shape[0]:
        mn, mx = int(x.min()), int(x.max())
        if mn < lo or (hi is not None and mx > hi):
            raise ValueError(f"{name} values must lie in [{lo}, {hi}]; got range [{mn}, {mx}]")
    return xp.ascontiguousarray(x.astype(xp.int64, copy=False))


def check_permutation(xp: Any, name: str, perm: Any, n: int) -> Any:
    """A permutation of ``[0, n)`` of any integer dtype → int64 vector."""
    perm = check_int_vector(xp, name, perm, length=n, lo=0, hi=n - 1)
    seen = xp.zeros(n, dtype=xp.int8)
    seen[perm] = 1
    if not bool(seen.all()):
        missing = int(xp.argmin(seen))
        raise ValueError(f"{name} must be a permutation of range({n}): value {missing} is missing")
    return perm


def check_bits(xp: Any, name: str, words: Any, rows: int, nbits: int, nb_words: int | None = None) -> Any:
    """Bit-packed rows (SPEC §2): uint64, 1-D of ``rows * nbw`` or 2-D ``(rows, nbw)`` words."""
    nbw = math.ceil(nbits / 64)
    if nb_words is not None and nb_words != nbw:
        raise ValueError(f"nb_words must be ceil(n / 64) = {nbw}; got {nb_words}")
    if not hasattr(words, "dtype"):
        raise TypeError(f"{name} must be a uint64 array; got {type(words).__name__}")
    if words.dtype != xp.uint64:
        raise TypeError(f"{name} must have dtype uint64; got {words.dtype}")
    if words.ndim == 1:
        if words.shape[0] != rows * nbw:
            raise ValueError(f"{name} must hold {rows} rows x {nbw} words = {rows * nbw} words; got {words.shape[0]}")
        words = words.reshape(rows, nbw)
    elif words.ndim == 2:
        if tuple(words.shape) != (rows, nbw):
            raise ValueError(f"{name} must have shape ({rows}, {nbw}); got {tuple(words.shape)}")
    else:
        raise ValueError(f"{name} must be 1-D or 2-D; got {words.ndim}-D")
    return xp.ascontiguousarray(words)


def check_uniform_weights(xp: Any, w: Any) -> None:
    """``method="systematic"`` gives every source ``k`` slots: its weights must be equal and positive."""
    if w.shape[0] and (bool((w != w[0]).any()) or float(w[0]) == 0.0):
        raise ValueError(
            "method='systematic' gives every source exactly k slots, so source_weights must be "
            "uniform and positive (or None in route); use method='phase' for weighted sources"
        )
