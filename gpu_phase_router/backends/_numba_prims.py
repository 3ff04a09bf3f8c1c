"""Numba primitives shared by the CPU kernels (``cpu.py``, ``cpu_crate.py``): uint64 constants, so
Numba never promotes key arithmetic to float64, SplitMix64 (SPEC §5), and LLVM bit counts."""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .._keys import GOLDEN, MIX_M1, MIX_M2
from . import _numba_runtime  # noqa: F401  (threading layer and cache dir: before any decoration)

U0 = np.uint64(0)
U1 = np.uint64(1)
U27 = np.uint64(27)
U30 = np.uint64(30)
U31 = np.uint64(31)
U32 = np.uint64(32)
M32 = np.uint64(0xFFFFFFFF)
KEY_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
G = np.uint64(GOLDEN)
M1 = np.uint64(MIX_M1)
M2 = np.uint64(MIX_M2)


@nb.njit(inline="always", cache=True)
def mix64(z):
    """SplitMix64 finaliser of a uint64 (SPEC §5)."""
    z = (z ^ (z >> U30)) * M1
    z = (z ^ (z >> U27)) * M2
    return z ^ (z >> U31)


@nb.njit(inline="always", cache=True)
def at(base, i):
    """``at(base, i)``: the ``i``-th SplitMix64 output from state ``base`` (SPEC §5)."""
    return mix64(base + G * (np.uint64(i) + U1))


@intrinsic
def cttz(typingctx, x):
    """Index of the lowest set bit of a non-zero uint64 (one ``tzcnt``)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


@intrinsic
def ctlz(typingctx, x):
    """``leading_zeros`` of a uint64 (LLVM ``ctlz``; 64 for 0)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen
