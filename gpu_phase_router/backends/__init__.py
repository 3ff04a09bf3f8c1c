"""Backend registry: one small interface, implemented by the Numba CPU and the CuPy CUDA kernels.

A backend owns an array module (``xp``: NumPy or CuPy) and the few row-parallel kernels of
SPEC.md. Everything else (validation, weights → counts, prefix sums, ring layout) is written
once, against ``xp``, in :mod:`gpu_phase_router._prep`. Backends are imported lazily: asking
for ``"cpu"`` imports Numba, asking for ``"cuda"`` imports CuPy; ``import gpu_phase_router``
imports neither.

Kernel inputs (all arrays of the backend's ``xp``, C-contiguous):

* ``popcount_rows(words, nbits)``: ``words`` uint64 ``(rows, nbw)`` → int64 ``(rows,)`` popcounts
  and the number of rows with a set padding bit (SPEC §2).
* ``feistel(start, count, n, key, inverse)``: int64 ``(count,)`` values
  ``feistel(start + i, n, key)`` (or its inverse) for ``i`` in ``[0, count)`` (SPEC §6).
* ``prepare_ring(ring_start, ring_len, ring_col, *, n_src)``: the target ring in the backend's own layout,
  made once per call and shared by every kernel call of that call.
* ``phase_rows(...)``: the phase router for a range of rows (SPEC §4–§5), see :class:`Backend`.
* ``systematic_rows(...)``: the systematic router for a block of rows (SPEC §11).
* ``crate_rows(...)``: the crate's per-row ChaCha8 reservoir (crate-exact mode, SPEC §14).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal, Protocol

from .._arrays import Array, Namespace, array_namespace

BackendName = Literal["auto", "cpu", "cuda"] | str
"""``"auto"`` (follow the data), ``"cpu"``, ``"cuda"`` or a name given to :func:`register_backend`."""


class Backend(Protocol):
    """What a backend provides. All integers named ``key`` are Python ints in ``[0, 2^64)``."""

    name: str
    xp: Any  # numpy or cupy

    def popcount_rows(self, words: Any, nbits: int) -> tuple[Any, int]:
        """Row popcounts of uint64 ``(rows, nbw)`` words and the count of rows whose padding
        bits (positions ``>= nbits``) are set."""

    def feistel(self, start: int, count: int, n: int, key: int, inverse: bool = False) -> Any:
        """int64 ``(count,)``: ``feistel(start + i, n, key)`` or its inverse (SPEC §6)."""

    def prepare_ring(self, ring_start: Array, ring_len: Array, ring_col: Array, *, n_src: int) -> Any:
        """The target ring of a source ring of ``n_src`` phases, in the layout :meth:`phase_rows`
        reads, made once per routing call.

        Per target-ring position ``p`` (int64 ``(n_tgt,)``): ``ring_col[p] = inv_s[p]``,
        ``ring_start[p] = off_t[inv_s[p]]``, ``ring_len[p] = c[inv_s[p]]``.
        """

    def phase_rows(
        self,
        phase: Array | None,
        off_s: Array,
        deg: Array,
        ring: Any,
        *,
        n_src: int,
        k: int,
        row0: int,
        select_key: int,
        col_map: Any = None,
        k_out: int | None = None,
        perm_key: int | None = None,
    ) -> Array:
        """Phase router rows ``row0 .. row0 + len(off_s) - 1`` → int32 ``(rows, k)``.

        Per row ``i`` (global source ``j = row0 + i``): ``phase[i] = perm_t[j]``,
        ``off_s[i]`` its start on the target ring, ``deg[i] = d[j]`` (all int64 ``(rows,)``);
        ``phase=None`` means the derived ``perm_t[j] = feistel(j, n_src, perm_key)`` (SPEC §6),
        made by the backend (the CPU kernel makes them on its threads, per task of rows);
        ``ring`` comes from :meth:`prepare_ring`. Candidates are the
        positions ``p = (off_s[i] + q) mod n_tgt``, ``q < deg[i]``, with
        ``(phase[i] - ring_start[p]) mod n_src < ring_len[p]``; the row holds the ``k``
        smallest ``(at(at(select_key, j), col), col)`` in ascending order, then ``-1``.

        Banded (SPEC §13), when ``col_map`` (int ``(n_tgt,)``: virtual column → target, host or
        device) is given: the ``k`` selected columns are mapped through it in that order and the
        row keeps its first ``k_out`` distinct targets, then ``-1`` → int32 ``(rows, k_out)``. The
        mapping happens inside the kernel; there is no second pass over the output.
        """

    def systematic_rows(self, phase: Any, cum: Any, *, n_src: int, k: int, phi: int) -> Any:
        """Systematic router rows (SPEC §11) → int32 ``(rows, k)``: ``phase`` int64 ``(rows,)``
        holds ``perm_t[j]``; ``cum`` uint64 ``(n_tgt + 1,)`` the cumulative capacity units."""

    def crate_rows(
        self,
        phase: Array,
        off_s: Array,
        deg: Array,
        ring_start: Array,
        ring_len: Array,
        ring_col: Array,
        *,
        n: int,
        k: int,
        row0: int,
        seed: int,
    ) -> Array:
        """Crate-exact rows (SPEC §14) of the square ``n x n`` router → int32 ``(rows, k)``.

        Arguments as for :meth:`phase_rows`, unprepared (int64 ring arrays of :meth:`prepare_ring`'s
        inputs), with ``phase[i] = col_perm_t[j]`` and ``deg[i]`` the row's popcount (it may exceed
        ``n``); ``seed`` is the kernel's RNG seed: row ``j`` draws from ``ChaCha8(seed + j)``.
        """


_REGISTRY: dict[str, str] = {
    "cpu": "gpu_phase_router.backends.cpu",
    "cuda": "gpu_phase_router.backends.cuda",
}
_INSTANCES: dict[str, Backend] = {}

CUDA_INSTALL_HINT = (
    "install CuPy for your CUDA version with pip install 'gpu_phase_router[cuda12]' "
    "(CUDA 12) or pip install 'gpu_phase_router[cuda13]' (CUDA 13)"
)


# ── loading, and forks during a load ─────────────────────────────────────────────────────────────
#
# A thread's first call imports a backend (Numba or CuPy and the kernel modules: about 0.5 s). A
# process forked meanwhile (a DataLoader worker started during the first route) would inherit the
# import locks of those modules held by a thread it does not have, and its own first call would wait
# on them forever. So backend modules are imported under one lock, and a fork waits for it: one set
# of fork hooks, registered before the first load (and after `logging`'s, whose lock a loading thread
# takes: hooks registered later run first), runs the backends' own hooks (add_fork_hooks) after the
# wait, in order.

FORK_WAIT_S = 30.0  # how long a fork waits for another thread's backend load before going on
_load_lock = threading.RLock()  # held by a thread importing a backend module
_loading: str | None = None  # the module being imported under _load_lock
_held_for_fork = False  # _load_lock acquired by the forking thread in _before_fork
_fork_hooks: list[tuple[Callable[[], None], Callable[[], None], Callable[[], None]]] = []
_hooks_installed = False
_interrupted_load: str | None = None  # in a child forked mid-load (the wait timed out): the module


def add_fork_hooks(
    before: Callable[[], None], after_in_parent: Callable[[], None], after_in_child: Callable[[], None]
) -> None:
    """Run ``before`` ahead of every fork once no other thread loads a backend, ``after_*`` after it
    (in reverse order of registration for ``after_in_parent``, as ``os.register_at_fork`` does)."""
    _install_fork_hooks()
    _fork_hooks.append((before, after_in_parent, after_in_child))


def _install_fork_hooks() -> None:
    global _hooks_installed
    if _hooks_installed or not hasattr(os, "register_at_fork"):
        return
    _hooks_installed = True
    import logging  # noqa: F401  (its fork hook must be registered before ours, see above)

    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


def _before_fork() -> None:
    global _held_for_fork
    _held_for_fork = _load_lock.acquire(timeout=FORK_WAIT_S)
    for before, _, _ in _fork_hooks:
        before()


def _after_fork_parent() -> None:
    global _held_for_fork
    for _, after, _ in reversed(_fork_hooks):
        after()
    if _held_for_fork:
        _held_for_fork = False
        _load_lock.release()


def _after_fork_child() -> None:
    global _load_lock, _held_for_fork, _interrupted_load
    for _, _, after in _fork_hooks:
        after()
    if not _held_for_fork:  # another thread was still importing _loading when the process was copied
        _interrupted_load = _loading or "a backend module"
    _held_for_fork = False
    _load_lock = threading.RLock()


def import_backend_module(module: str) -> ModuleType:
    """``importlib.import_module(module)`` under the backends' load lock (see above)."""
    global _loading
    if _interrupted_load is not None and (module == _interrupted_load or module not in sys.modules):
        raise RuntimeError(
            f"this process was forked while a thread of its parent was importing {_interrupted_load}, "
            f"and the fork waited {FORK_WAIT_S:.0f} s for it in vain; load the backend in the parent "
            "before forking (one routing call does), or start processes with the 'spawn' or "
            "'forkserver' method"
        )
    if _loading is None and module in sys.modules:  # imported and initialised: nothing to wait for
        return sys.modules[module]
    _install_fork_hooks()
    with _load_lock:
        outer, _loading = _loading, module
        try:
            return importlib.import_module(module)
        finally:
            _loading = outer


def register_backend(name: str, module: str) -> None:
    """Register a backend module (it must define ``load() -> Backend``) under ``name``."""
    _REGISTRY[name] = module
    _INSTANCES.pop(name, None)


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` (``"auto"`` plus every registered backend)."""
    return ["auto", *_REGISTRY]


def check_backend_name(name: Any) -> str:
    """``name`` if it is a name ``backend=`` accepts (``TypeError`` / ``ValueError`` otherwise);
    nothing is loaded, so whether ``"cuda"`` can run is not checked."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {available_backends()}; got {type(name).__name__}")
    if name not in available_backends():
        raise ValueError(f"backend must be one of {available_backends()}; got {name!r}")
    return name


def get_backend(name: str, *, data_on_device: bool = False) -> Backend:
    """Resolve a ``backend=`` argument to a loaded backend.

    ``"auto"`` follows the data: device arrays (CuPy, CUDA torch) → ``"cuda"``, else ``"cpu"``.
    Raises ``ValueError`` for unknown names, and ``ValueError`` with the install command when
    ``"cuda"`` cannot be used (no CuPy, or no usable device).
    """
    name = check_backend_name(name)
    if name == "auto":
        name = "cuda" if data_on_device else "cpu"
    if name not in _INSTANCES:
        try:
            module = import_backend_module(_REGISTRY[name])
        except ImportError as exc:
            hint = f"; {CUDA_INSTALL_HINT}" if name == "cuda" else ""
            raise ValueError(f"backend {name!r} is not available ({exc}){hint}") from exc
        _INSTANCES[name] = module.load()
    return _INSTANCES[name]


def resolve(backend: BackendName, **arrays: Any) -> tuple[Backend, Namespace]:
    """The single place where data decides the backend: the arrays' :class:`Namespace` (one
    library, one device, else ``TypeError``) and the backend that computes on it.

    ``backend="auto"`` picks ``"cuda"`` for CuPy arrays and CUDA torch tensors, ``"cpu"`` for
    everything else; an explicit name is used as given (data is then copied to it).
    """
    ns = array_namespace(**arrays)
    return get_backend(backend, data_on_device=ns.on_device), ns


def cuda_available() -> bool:
    """True when ``backend="cuda"`` can run here: CuPy imports and sees a CUDA device."""
    try:
        get_backend("cuda")
    except ValueError:
        return False
    return True
