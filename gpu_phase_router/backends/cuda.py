"""CuPy CUDA backend: the kernels of ``kernels/phase_router.cu``, bit-identical to the CPU backend.

The CUDA source is compiled by NVRTC through ``cupy.RawModule`` on the first kernel launch on each
device (CuPy also caches the binary on disk); importing this module imports neither CuPy nor
compiles anything. Kernels run on CuPy's current stream.

:class:`CudaBackend` holds only host-side launch logic (which kernel, which grid, which argument
types) and takes the array module and a launch function as parameters, so the test suite runs this
exact class on NumPy arrays with the same ``.cu`` file executed by a CPU SIMT emulator.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._keys import feistel_params
from . import CUDA_INSTALL_HINT

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
KERNEL_FILES = ("phase_router.cu", "seed_router.cu")
NVRTC_OPTIONS = ("--std=c++17",)

INT32_LIMIT = (1 << 31) - (1 << 16)  # n_src and n_tgt bound: kernels use int ring positions
PHASE_WIDTHS = (1, 2, 4, 8, 16)  # register bottom-K widths compiled (gpr_phase_rows_k<K>)
MAX_WARPS_PER_CTA = 8  # GPR_MAX_WARPS in the kernel source
SEED_ROWS_PER_CTA = 4  # GPR_SEED_ROWS in seed_router.cu: one warp per row
THREADS = 256  # threads per CTA (CUDA thread block) of the elementwise kernels

Launch = Callable[[str, tuple[int, int, int], tuple[int, int, int], tuple[Any, ...]], None]


def kernel_paths() -> list[Path]:
    """The CUDA source files, in the order they are concatenated."""
    return [KERNEL_DIR / name for name in KERNEL_FILES]


def kernel_source() -> str:
    """The CUDA source compiled into one module."""
    return "\n".join(path.read_text() for path in kernel_paths())


def phase_width(k: int, max_width: int = PHASE_WIDTHS[-1]) -> int:
    """Register list width ``K`` for ``k`` outputs: the smallest compiled ``K >= k``, else the largest
    allowed one (the kernel then makes ``ceil(k / K)`` passes)."""
    widths = [w for w in PHASE_WIDTHS if w <= max_width]
    for w in widths:
        if w >= k:
            return w
    return widths[-1]


def phase_shape(rows: int, n_tgt: int) -> tuple[int, int]:
    """``(warps_per_row, rows_per_cta)`` for ``rows`` rows on a target ring of ``n_tgt`` positions.

    Throughput favours few warps per row (each warp merges its lanes once per row), latency favours
    many; degrees are not known on the host without a synchronisation, so ``n_tgt`` stands in for
    them: one more warp per row for each doubling of ``n_tgt`` beyond 8192, and more warps while
    fewer than 8192 warps would be in flight on a ring of at least 1024 positions per warp. Rows of
    one warp go four to a CTA (128 threads) so the per-SM CTA limit does not cap occupancy.
    Untuned: measure with benchmarks/bench_cuda.py.
    """
    warps = 1
    while warps < MAX_WARPS_PER_CTA and (n_tgt > 8192 * warps or (rows * warps < 8192 and n_tgt >= 1024 * warps)):
        warps *= 2
    return warps, max(1, 4 // warps)


def _ctas(count: int, per_cta: int) -> int:
    return (count + per_cta - 1) // per_cta


class CudaBackend:
    """Kernels of ``phase_router.cu`` on arrays of ``xp``, launched through ``launch``.

    Args:
        xp: the array module (``cupy``; NumPy for the CPU emulation in the tests).
        launch: ``launch(name, grid, block, args)`` runs kernel ``name``; ``args`` holds arrays of
            ``xp`` and NumPy scalars of the exact parameter types.
        name: the backend's registry name.
        warps_per_row, rows_per_cta: fixed launch shape (default: :func:`phase_shape`).
        max_width: largest register list width to use (default 16), to force multi-pass selection.
    """

    def __init__(
        self,
        xp: Any,
        launch: Launch,
        *,
        name: str = "cuda",
        warps_per_row: int | None = None,
        rows_per_cta: int | None = None,
        max_width: int = PHASE_WIDTHS[-1],
    ) -> None:
        if warps_per_row is not None and warps_per_row not in (1, 2, 4, 8):
            raise ValueError(f"warps_per_row must be 1, 2, 4 or 8; got {warps_per_row}")
        if max_width not in PHASE_WIDTHS:
            raise ValueError(f"max_width must be one of {PHASE_WIDTHS}; got {max_width}")
        self.name = name
        self.xp = xp
        self._launch = launch
        self.warps_per_row = warps_per_row
        self.rows_per_cta = rows_per_cta
        self.max_width = max_width

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _check_int32(**sizes: int) -> None:
        for arg, value in sizes.items():
            if value >= INT32_LIMIT:
                raise ValueError(f"the cuda backend needs {arg} < {INT32_LIMIT}; got {value}")

    def _i64(self, a: Any) -> Any:
        return self.xp.ascontiguousarray(a, dtype=self.xp.int64)

    # -- Backend protocol ----------------------------------------------------------------------

    def popcount_rows(self, words: Any, nbits: int) -> tuple[Any, int]:
        xp = self.xp
        words = xp.ascontiguousarray(words, dtype=xp.uint64)
        rows, nbw = int(words.shape[0]), int(words.shape[1])
        counts = xp.zeros(rows, dtype=xp.int64)
        if rows == 0 or nbw == 0:
            return counts, 0
        self._check_int32(nb_words=nbw)
        bad = xp.zeros(rows, dtype=xp.int32)
        tail = nbits - 64 * (nbw - 1)  # valid bits of the last word, in [1, 64] for nbw = ceil(nbits / 64)
        pad_mask = 0 if tail >= 64 else ((1 << 64) - 1) ^ ((1 << max(tail, 0)) - 1)
        warps = THREADS // 32
        self._launch(
            "gpr_popcount_rows",
            (_ctas(rows, warps), 1, 1),
            (THREADS, 1, 1),
            (words, np.int64(rows), np.int32(nbw), np.uint64(pad_mask), counts, bad),
        )
        return counts, int(xp.count_nonzero(bad))

    def feistel(self, start: int, count: int, n: int, key: int, inverse: bool = False) -> Any:
        out = self.xp.empty(count, dtype=self.xp.int64)
        if count == 0:
            return out
        h, mask = feistel_params(n)
        self._launch(
            "gpr_feistel_range",
            (min(_ctas(count, THREADS), 1 << 16), 1, 1),
            (THREADS, 1, 1),
            (
                np.int64(start),
                np.int64(count),
                np.uint64(n),
                np.uint64(key),
                np.int32(h),
                np.uint64(mask),
                np.int32(1 if inverse else 0),
                out,
            ),
        )
        return out

    def pack_ring(self, ring_start: Any, ring_len: Any, ring_col: Any) -> tuple[Any, Any]:
        """int32 ``(n_tgt, 2)`` (start, len) pairs and int32 ``(n_tgt,)`` columns for the phase kernel."""
        xp = self.xp
        n_tgt = int(ring_col.shape[0])
        self._check_int32(n_tgt=n_tgt)
        ring_sl = xp.empty((n_tgt, 2), dtype=xp.int32)
        ring_col32 = xp.empty(n_tgt, dtype=xp.int32)
        self._launch(
            "gpr_pack_ring",
            (_ctas(n_tgt, THREADS), 1, 1),
            (THREADS, 1, 1),
            (self._i64(ring_start), self._i64(ring_len), self._i64(ring_col), np.int32(n_tgt), ring_sl, ring_col32),
        )
        return ring_sl, ring_col32

    def launch_phase(
        self,
        phase: Any,
        off_s: Any,
        deg: Any,
        ring_sl: Any,
        ring_col32: Any,
        out: Any,
        *,
        n_src: int,
        k: int,
        row0: int,
        select_key: int,
        col_map32: Any = None,
        k_out: int = 0,
    ) -> None:
        """The phase router kernel alone, on packed ring arrays (see :meth:`pack_ring`).

        With ``col_map32`` (int32 ``[n_tgt]``) and ``k_out > 0`` the kernel maps the ``k`` selected
        columns to targets and writes each row's first ``k_out`` distinct ones (SPEC §13)."""
        rows = int(phase.shape[0])
        n_tgt = int(ring_col32.shape[0])
        warps, per_cta = phase_shape(rows, n_tgt)
        if self.warps_per_row is not None:
            warps, per_cta = self.warps_per_row, max(1, 4 // self.warps_per_row)
        if self.rows_per_cta is not None:
            per_cta = self.rows_per_cta
        per_cta = max(1, min(per_cta, MAX_WARPS_PER_CTA // warps))
        width = phase_width(k, self.max_width)
        self._launch(
            f"gpr_phase_rows_k{width}",
            (_ctas(rows, per_cta), 1, 1),
            (32 * warps, per_cta, 1),
            (
                phase,
                off_s,
                deg,
                ring_sl,
                ring_col32,
                np.int32(rows),
                np.int32(n_tgt),
                np.int32(n_src),
                np.int32(k),
                np.int64(row0),
                np.uint64(select_key),
                ring_col32 if col_map32 is None else col_map32,
                np.int32(0 if col_map32 is None else k_out),
                out,
            ),
        )

    def prepare_ring(self, ring_start: Any, ring_len: Any, ring_col: Any) -> tuple[Any, Any]:
        """The ring packed once per routing call (:meth:`pack_ring`), shared by every kernel call."""
        return self.pack_ring(ring_start, ring_len, ring_col)

    def phase_rows(
        self,
        phase: Any,
        off_s: Any,
        deg: Any,
        ring: tuple[Any, Any],
        *,
        n_src: int,
        k: int,
        row0: int,
        select_key: int,
        col_map: Any = None,
        k_out: int | None = None,
    ) -> Any:
        xp = self.xp
        rows = int(phase.shape[0])
        ring_sl, ring_col32 = ring
        self._check_int32(n_src=n_src, n_tgt=int(ring_col32.shape[0]), rows=rows)
        banded = col_map is not None
        if banded and not (k_out is not None and 1 <= k_out <= k):
            raise ValueError(f"k_out must be in [1, k={k}] with col_map; got {k_out}")
        out = xp.empty((rows, k_out if banded else k), dtype=xp.int32)
        if rows == 0:
            return out
        # host -> device only (a NumPy map is uploaded, a device map converted there); no read-back
        col_map32 = xp.ascontiguousarray(xp.asarray(col_map), dtype=xp.int32) if banded else None
        self.launch_phase(
            self._i64(phase),
            self._i64(off_s),
            self._i64(deg),
            ring_sl,
            ring_col32,
            out,
            n_src=n_src,
            k=k,
            row0=row0,
            select_key=select_key,
            col_map32=col_map32,
            k_out=k_out or 0,
        )
        return out

    def systematic_rows(self, phase: Any, cum: Any, *, n_src: int, k: int, phi: int) -> Any:
        xp = self.xp
        rows = int(phase.shape[0])
        n_tgt = int(cum.shape[0]) - 1
        self._check_int32(n_tgt=n_tgt)
        out = xp.empty((rows, k), dtype=xp.int32)
        if rows == 0:
            return out
        self._launch(
            "gpr_systematic_rows",
            (_ctas(rows, THREADS), 1, 1),
            (THREADS, 1, 1),
            (
                self._i64(phase),
                xp.ascontiguousarray(cum, dtype=xp.uint64),
                np.int64(rows),
                np.int32(n_tgt),
                np.int64(n_src),
                np.int32(k),
                np.uint64(phi),
                out,
            ),
        )
        return out

    def seed_rows(
        self,
        phase: Any,
        off_s: Any,
        deg: Any,
        ring_start: Any,
        ring_len: Any,
        ring_col: Any,
        *,
        n: int,
        k: int,
        row0: int,
        seed: int,
    ) -> Any:
        """Seed-exact rows (SPEC §14) → int32 ``(rows, k)``: one warp per row (``kernels/seed_router.cu``).

        Arguments as for ``phase_rows``, with ``phase[i] = col_perm_t[j]``, ``deg[i]`` the row's popcount
        (it may exceed ``n``) and ``n`` the square size; ``seed`` is the crate's kernel seed.
        """
        xp = self.xp
        rows = int(phase.shape[0])
        lens = int(ring_len.max()) if int(ring_len.shape[0]) else 0
        self._check_int32(n=n, rows=rows, k=k, ring_len=lens)
        out = xp.empty((rows, k), dtype=xp.int32)
        if rows == 0:
            return out
        ring_sl, ring_col32 = self.pack_ring(ring_start, ring_len, ring_col)
        self._launch(
            "gpr_seed_rows",
            (_ctas(rows, SEED_ROWS_PER_CTA), 1, 1),
            (32, SEED_ROWS_PER_CTA, 1),
            (
                self._i64(phase),
                self._i64(off_s),
                self._i64(deg),
                ring_sl,
                ring_col32,
                np.int32(rows),
                np.int32(n),
                np.int32(k),
                np.int64(row0),
                np.uint64(seed),
                out,
            ),
        )
        return out


class CupyLauncher:
    """Launches kernels of :func:`kernel_source` with CuPy: one ``RawModule`` per device, compiled on
    first use, kernels on the current stream."""

    def __init__(self, cupy: Any) -> None:
        self._cupy = cupy
        self._modules: dict[int, Any] = {}
        self._functions: dict[tuple[int, str], Any] = {}

    def function(self, name: str) -> Any:
        device = self._cupy.cuda.Device().id
        fn = self._functions.get((device, name))
        if fn is None:
            module = self._modules.get(device)
            if module is None:
                module = self._cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS)
                self._modules[device] = module
            fn = module.get_function(name)
            self._functions[(device, name)] = fn
        return fn

    def __call__(
        self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple[Any, ...]
    ) -> None:
        self.function(name)(grid, block, args)


def load() -> CudaBackend:
    """Entry point used by the backend registry; ``ValueError`` with the install command when CuPy
    or a CUDA device is missing."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or CuPy present but its CUDA libraries are not
        raise ValueError(f"backend='cuda' needs CuPy ({type(exc).__name__}: {exc}); {CUDA_INSTALL_HINT}") from None
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError: no driver, no device
        count, reason = 0, f"{type(exc).__name__}: {exc}"
    else:
        reason = "no CUDA device found"
    if count < 1:
        raise ValueError(f"backend='cuda' needs a usable CUDA GPU ({reason}); check the driver, or {CUDA_INSTALL_HINT}")
    return CudaBackend(cupy, CupyLauncher(cupy))
