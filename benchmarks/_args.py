"""``argparse`` ``type=`` helpers shared by the benchmark scripts, and their GPU check.

A count, size, seed list, path or fraction out of range is a usage error: ``argparse`` prints the
usage and ``argument --NAME: <why>`` on stderr and exits with status 2, before any work is done
or any result file is written. Each helper raises ``argparse.ArgumentTypeError`` with a message
that says what was expected and what was given.

    import _args
    ap.add_argument("--seeds", type=_args.positive_int, default=20)
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

__all__ = [
    "need_gpu",
    "executable_file",
    "existing_dir",
    "existing_file",
    "fraction",
    "int_range",
    "nonnegative_float",
    "nonnegative_int",
    "positive_count",
    "positive_float",
    "positive_int",
    "positive_int_list",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """A ``type=`` for integers in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    def check(text: str) -> int:
        value = _int(text)
        if value < lo or (hi is not None and value > hi):
            want = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be an integer {want}; got {text}")
        return value

    check.__name__ = f"int_range({lo}, {hi})"
    return check


def _checked(parse: Callable[[str], Any], ok: Callable[[Any], bool], want: str, doc: str) -> Callable[[str], Any]:
    """A ``type=``: ``parse(text)``, which must satisfy ``ok`` (else "must be ``want``")."""

    def check(text: str) -> Any:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}; got {text}")
        return value

    check.__doc__ = doc
    return check


positive_int = _checked(_int, lambda v: v >= 1, "a positive integer (>= 1)", "An integer >= 1 (a count, size, steps).")
nonnegative_int = _checked(_int, lambda v: v >= 0, "an integer >= 0", "An integer >= 0 (a seed; 0 threads: default).")
positive_float = _checked(_float, lambda v: v > 0, "a number > 0", "A finite number > 0.")
nonnegative_float = _checked(_float, lambda v: v >= 0, "a number >= 0", "A finite number >= 0.")
fraction = _checked(_float, lambda v: 0 < v <= 1, "a number in (0, 1]", "A number in ``(0, 1]`` (a density).")


def positive_count(text: str) -> int:
    """A whole number >= 1 that may be written as a float (``1e6``), returned as an int."""
    value = _float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (e.g. 1e6); got {text}")
    return int(value)


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1 (``"4096,16384"``)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers; got {text!r}")
    values = []
    for p in parts:
        value = _int(p)
        if value < 1:
            raise argparse.ArgumentTypeError(f"every value must be a positive integer (>= 1); got {text}")
        values.append(value)
    return values


def existing_file(text: str) -> str:
    """The path of an existing file (returned as given)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def existing_dir(text: str) -> str:
    """The path of an existing directory (returned as given)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return text


def executable_file(text: str) -> str:
    """The path of an existing executable file (returned as given)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not os.access(text, os.X_OK):
        raise argparse.ArgumentTypeError(f"not executable: {text}")
    return text


def need_gpu(script: str, outcome: str = "nothing measured") -> tuple[Any, Any]:
    """``(cupy, the cuda backend)``; without CuPy or a usable GPU print one line naming ``script``
    and exit 0 (a machine without a GPU is not an error for a GPU benchmark)."""
    import sys

    try:
        import cupy

        from gpu_phase_router import get_backend

        backend = get_backend("cuda")
    except (ImportError, ValueError) as exc:
        print(f"{script}: no CUDA GPU usable here, {outcome} ({str(exc).splitlines()[0][:200]})")
        sys.exit(0)
    return cupy, backend
