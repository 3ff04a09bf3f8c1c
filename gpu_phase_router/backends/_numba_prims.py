"""Numba primitives shared by the CPU kernels (``cpu.py``, ``cpu_crate.py``): uint64 constants, so
Numba never promotes key arithmetic to float64, SplitMix64 (SPEC §5), and LLVM bit counts."""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

from .._keys import GOLDEN, MIX_M1, MIX_M2
from . import _numba_runtime  # noqa: F401  (threading layer and cache dir: before any decoration)

U0 = np.uint64(0)
U1 = np.uint64(1)
U27 = np.uint64(27)
U30 = np.uint64(30)
U31 = np.uint64(31)
U32 = np.uint64(32)
U54 = np.uint64(54)
U60 = np.uint64(60)
U62 = np.uint64(62)
M32 = np.uint64(0xFFFFFFFF)
KEY_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
G = np.uint64(GOLDEN)
M1 = np.uint64(MIX_M1)
M2 = np.uint64(MIX_M2)
M1_INV = np.uint64(pow(MIX_M1, -1, 1 << 64))  # the odd multipliers' inverses modulo 2^64
M2_INV = np.uint64(pow(MIX_M2, -1, 1 << 64))
G_INV = np.uint64(pow(GOLDEN, -1, 1 << 64))


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


@nb.njit(inline="always", cache=True)
def unmix64(z):
    """The inverse of :func:`mix64` (each step is a bijection of uint64: ``z ^ (z >> s)`` is undone by
    ``z ^ (z >> s) ^ (z >> 2s)`` when ``3s >= 64``, a product by an odd constant by its inverse)."""
    z = z ^ (z >> U31) ^ (z >> U62)
    z = z * M2_INV
    z = z ^ (z >> U27) ^ (z >> U54)
    z = z * M1_INV
    return z ^ (z >> U30) ^ (z >> U60)


@nb.njit(inline="always", cache=True)
def index_of(base, key):
    """The ``i`` (uint64) with ``at(base, i) == key``: distinct ``i`` have distinct keys (``mix64`` is a
    bijection and ``G`` is odd), so a key names its index."""
    return (unmix64(key) - base) * G_INV - U1


@intrinsic
def borrow(typingctx, arr):
    """A view of the array ``arr`` that holds no reference to its memory (null ``meminfo``).

    Numba counts references to an array's memory with atomic operations at every call that passes it
    and every view made of it; threads that pass the same input array contend for one cache line.
    A borrowed view skips all of them. The caller keeps ``arr`` itself alive for as long as the view
    is used, and the view must not outlive the call that made it (it is never returned or stored).
    """
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, value=args[0])
        view = context.make_array(signature.return_type)(context, builder)
        populate_array(view, data=src.data, shape=src.shape, strides=src.strides, itemsize=src.itemsize, meminfo=None)
        return view._getvalue()

    return arr(arr), codegen


@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomically ``arr[idx] += val`` on a 1-D int64 array; returns the value before the addition.

    One ``lock xadd`` (LLVM ``atomicrmw add``, monotonic order: each call sees a distinct value,
    which is all that claiming tasks needs; what the tasks write is published by the end of the
    parallel region). ``idx`` must be in range: nothing checks it.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int64):
        return None
    if not (isinstance(idx, types.Integer) and isinstance(val, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, value=args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [i], wraparound=False)
        return builder.atomic_rmw("add", ptr, v, "monotonic")

    return types.int64(arr, idx, val), codegen


@nb.njit(inline="always", cache=True)
def claim(counter, n_tasks):
    """The next unclaimed task of ``range(n_tasks)`` (``counter``: int64 ``[1]``, zero at the start of
    the parallel region), or -1 once every task is claimed.

    A parallel kernel's ``prange`` iterations each claim tasks until none is left, so a thread that
    starts late (a pool thread waking on a busy or virtualised CPU) or runs slowly takes fewer
    tasks, where a fixed split would make the whole call wait for its share. Which thread runs a
    task changes nothing in its output. The kernels claim their first task before they allocate
    their scratch (a call that gets none returns at once), then the next one at the end of each
    task, in a ``range(n_tasks)`` loop that stops at the first -1 (it compiled about 0.3 s faster
    than a ``while`` loop).

    Numba's parfor pass does not see :func:`fetch_add` write ``counter``: the function that holds
    the ``prange`` loop must not read ``counter`` after it (the read may be moved ahead of the loop).
    """
    task = fetch_add(counter, 0, 1)
    return task if task < n_tasks else np.int64(-1)


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


@intrinsic
def popcount(typingctx, x):
    """Set bits of a uint64 (LLVM ``ctpop``)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


def _splat(builder, value, vec_type):
    """``value`` (an integer of ``vec_type``'s element width) in every lane of ``vec_type``."""
    undef = ir.Constant(vec_type, ir.Undefined)
    lane0 = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        lane0, undef, ir.Constant(ir.VectorType(ir.IntType(32), vec_type.count), [0] * vec_type.count)
    )


def _vector_at(context, builder, array_type, array, index, vec_type):
    """Pointer to ``vec_type`` at element ``index`` of a C-contiguous 1-D array (no bounds check)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vec_type.as_pointer())


def _is_c_vector(ary, *dtypes):
    """Whether the Numba type ``ary`` is a C-contiguous 1-D array of one of ``dtypes``."""
    return isinstance(ary, types.Array) and ary.ndim == 1 and ary.layout == "C" and ary.dtype in dtypes


@intrinsic
def ring_hits64(typingctx, ring_start, ring_len, p, x, n_src):
    """Bit ``i`` set iff ring position ``p + i`` (``i < 64``) holds the phase ``x`` (SPEC §4).

    ``in_ring(x, ring_start[p + i], ring_len[p + i], n_src)`` for 64 consecutive positions as one
    LLVM vector expression, for C-contiguous ring arrays of one dtype, int16 with ``n_src < 2^15``
    (four 16-lane compares and a bit-mask extraction on AVX2) or int32 with ``n_src < 2^31`` (eight
    8-lane compares), with ``0 <= x < n_src``, ``0 <= ring_start < n_src``, ``0 <= ring_len <= n_src``
    and ``p + 64 <= len(ring_start)`` — the caller guarantees all of these; nothing is checked. In
    ``w``-bit lanes, ``(x - start) mod n_src`` is ``min(x - start, x - start + n_src)`` in unsigned
    arithmetic (the first wraps past ``2^w - n_src`` exactly when ``x < start``), below
    ``n_src <= 2^(w-1)``, so the length comparison is signed.
    """
    if not (_is_c_vector(ring_start, types.int16, types.int32) and _is_c_vector(ring_len, ring_start.dtype)):
        return None
    sig = types.uint64(ring_start, ring_len, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        rs, rl, pos, xx, nn = args
        lane = ir.IntType(signature.args[0].dtype.bitwidth)
        vec = ir.VectorType(lane, 64)
        start = builder.load(_vector_at(context, builder, signature.args[0], rs, pos, vec), align=lane.width // 8)
        length = builder.load(_vector_at(context, builder, signature.args[1], rl, pos, vec), align=lane.width // 8)
        diff = builder.sub(_splat(builder, builder.trunc(xx, lane), vec), start)
        wrapped = builder.add(diff, _splat(builder, builder.trunc(nn, lane), vec))
        dist = builder.select(builder.icmp_unsigned("<", diff, wrapped), diff, wrapped)
        hit = builder.icmp_signed("<", dist, length)
        return builder.bitcast(hit, ir.IntType(64))

    return sig, codegen


@intrinsic
def store_offsets8(typingctx, out, at, packed, base):
    """``out[at + i] = base + byte i of packed`` for ``i < 8``: one 8-lane store (no bounds check;
    ``out`` is an int16, int32 or int64 C-contiguous 1-D array with room for ``at + 8`` entries)."""
    if not _is_c_vector(out, types.int16, types.int32, types.int64):
        return None
    sig = types.void(out, types.uint64, types.uint64, types.int64)

    def codegen(context, builder, signature, args):
        dest, pos, bytes8, offset = args
        lane = ir.IntType(signature.args[0].dtype.bitwidth)
        vec = ir.VectorType(lane, 8)
        values = builder.zext(builder.bitcast(bytes8, ir.VectorType(ir.IntType(8), 8)), vec)
        values = builder.add(values, _splat(builder, builder.trunc(offset, lane) if lane.width < 64 else offset, vec))
        builder.store(values, _vector_at(context, builder, signature.args[0], dest, pos, vec), align=lane.width // 8)
        return context.get_dummy_value()

    return sig, codegen


def _byte_bit_indices() -> np.ndarray:
    """``table[v]``: the indices of the set bits of the byte ``v``, ascending, packed one per byte."""
    table = np.zeros(256, dtype=np.uint64)
    for v in range(256):
        bits = [i for i in range(8) if v >> i & 1]
        table[v] = sum(b << (8 * q) for q, b in enumerate(bits))
    return table


BYTE_BITS = _byte_bit_indices()
U8 = np.uint64(8)
BYTE = np.uint64(0xFF)
_B1 = np.uint64(0x5555555555555555)
_B2 = np.uint64(0x3333333333333333)
_B4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_BYTES_ONE = np.uint64(0x0101010101010101)
_U2 = np.uint64(2)
_U4 = np.uint64(4)
_U56 = np.uint64(56)


@nb.njit(inline="always", cache=True)
def append_set_bits(out, cnt, m, base):
    """Append ``base + i`` for every set bit ``i`` of the uint64 ``m`` to ``out[cnt:]``, ascending;
    return the new count. Branch-free: eight 8-lane stores, so ``out`` needs 8 entries to spare.

    The stores are independent of each other: byte ``b``'s store goes to ``cnt`` plus the set bits
    of bytes ``< b`` — per-byte popcounts in one word (SWAR), their prefix sums by one multiply.
    """
    c = m - ((m >> U1) & _B1)
    c = (c & _B2) + ((c >> _U2) & _B2)
    c = (c + (c >> _U4)) & _B4  # byte b: the set bits of byte b of m
    before = (c * _BYTES_ONE) - c  # byte b: the set bits of bytes < b (each sum <= 56 fits a byte)
    for byte in range(8):
        shift = U8 * np.uint64(byte)
        v = (m >> shift) & BYTE
        store_offsets8(out, cnt + ((before >> shift) & BYTE), BYTE_BITS[v], base + 8 * byte)
    return cnt + ((c * _BYTES_ONE) >> _U56)
