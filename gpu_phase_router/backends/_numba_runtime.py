"""Process-wide runtime policy for the Numba CPU kernels.

Imported by every Numba kernel module before its first ``@njit(cache=True)`` decoration, so it
applies to all of them:

* **Threading layer** — chosen explicitly before Numba's first parallel launch (unless the user
  set ``NUMBA_THREADING_LAYER`` or Numba already launched): ``tbb`` (thread- and fork-safe) if
  it loads, else ``omp`` (thread-safe; GNU libgomp is not fork-safe), else ``workqueue``
  (fork-safe, not thread-safe). Numba's own safety table: ``numba/np/ufunc/parallel.py``.
* **Threads** — under a layer that is not thread-safe (``workqueue``), kernel calls from
  different Python threads are serialised by one process-wide lock (held per chunk, see
  :func:`row_chunks`), instead of Numba aborting the interpreter.
* **fork** — ``os.register_at_fork``: a child forked after the parent launched a layer that is
  not fork-safe (GNU OpenMP) runs the kernels through their serial versions (same results), so
  it neither dies nor hangs; the lock is re-created in every child.
* **Cache** — when neither the package's ``__pycache__`` nor the user cache directory is
  writable (read-only install and ``$HOME``), ``_numba_config().CACHE_DIR`` is pointed at a
  writable temporary directory, seeded with any cache files built beforehand, with one warning.
* **First use** — one ``logging`` notice per process when a kernel of the package is compiled.
* **Ctrl-C** — :func:`row_chunks` cuts a kernel call into chunks of bounded work; Python raises
  ``KeyboardInterrupt`` between them. Rows are independent, so chunks never change a result.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("gpu_phase_router")

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SAFE_LAYERS = {"tbb": (True, True), "omp": (True, None), "workqueue": (False, True)}  # (thread-safe, fork-safe)
_LAYER_MODULES = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}
CHUNK_WORK = 1 << 24  # work units (about one ring position or key each) per thread per chunk: ~10-50 ms

_lock = threading.RLock()
_serial_only = False  # set in a child forked after the parent used a fork-unsafe layer
_chosen_layer: str | None = None
_noticed = False


# ── threading layer ──────────────────────────────────────────────────────────────────────────────


def _loadable(layer: str) -> bool:
    """Whether Numba could load ``layer`` here (the checks of its ``select_known_backend``)."""
    try:
        if layer == "tbb":
            from numba.np.ufunc.parallel import _check_tbb_version_compatible

            _check_tbb_version_compatible()
        importlib.import_module(f"numba.np.ufunc.{_LAYER_MODULES[layer]}")
    except Exception:  # missing libtbb / libgomp, incompatible versions
        return False
    return True


def _numba_config() -> Any:
    """``numba.config`` (the settings module; typed loosely, its attributes are set at import)."""
    return importlib.import_module("numba.core.config")


def _launched_layer() -> str | None:
    """The layer Numba runs on, or ``None`` before its first parallel launch."""
    par = sys.modules.get("numba.np.ufunc.parallel")
    if par is None or not getattr(par, "_is_initialized", False):
        return None
    return par._threading_layer


def choose_threading_layer() -> str:
    """Fix Numba's threading layer before its first launch and return the (expected) layer.

    Respects ``NUMBA_THREADING_LAYER`` and a layer Numba already launched; otherwise picks the
    first loadable of ``tbb``, ``omp``, ``workqueue`` and sets ``_numba_config().THREADING_LAYER``.
    """
    global _chosen_layer

    launched = _launched_layer()
    if launched is not None:
        _chosen_layer = launched
        return launched
    requested = str(_numba_config().THREADING_LAYER).lower()
    if os.environ.get("NUMBA_THREADING_LAYER") or requested != "default":
        _chosen_layer = requested  # the user's choice (a name, or 'safe' / 'threadsafe' / 'forksafe')
        return requested
    for layer in ("tbb", "omp", "workqueue"):
        if _loadable(layer):
            _numba_config().THREADING_LAYER = layer
            _chosen_layer = layer
            return layer
    _chosen_layer = "workqueue"
    return "workqueue"


def _current_layer() -> str:
    return _launched_layer() or _chosen_layer or "default"


def _thread_safe(layer: str) -> bool:
    if layer in ("tbb", "omp", "safe", "threadsafe"):
        return True
    return False  # workqueue, 'forksafe' (may be workqueue) and anything unknown: serialise


def _fork_safe(layer: str) -> bool:
    if layer == "omp":
        try:
            return importlib.import_module("numba.np.ufunc.omppool").openmp_vendor != "GNU"
        except Exception:
            return False
    return layer in ("tbb", "workqueue")


# ── fork ─────────────────────────────────────────────────────────────────────────────────────────


def _before_fork() -> None:
    if not _thread_safe(_current_layer()):
        _lock.acquire()  # no kernel of another thread is mid-chunk while the process is copied


def _after_fork_parent() -> None:
    if not _thread_safe(_current_layer()):
        _lock.release()


def _after_fork_child() -> None:
    global _lock, _serial_only
    _lock = threading.RLock()
    layer = _launched_layer()
    if layer is not None and not _fork_safe(layer):
        _serial_only = True


def serial_only() -> bool:
    """True in a child forked after its parent launched a fork-unsafe threading layer."""
    return _serial_only


def threads() -> int:
    """Threads a parallel kernel uses here (1 on the serial path); never launches Numba's pool."""
    if _serial_only:
        return 1

    return max(1, int(_numba_config().NUMBA_NUM_THREADS))


def run(parallel: Callable[..., Any], serial: Callable[..., Any], *args: Any) -> Any:
    """Call one kernel chunk: ``serial(*args)`` in a fork-unsafe child, else ``parallel(*args)``,
    under the process-wide lock when the threading layer is not thread-safe."""
    if _serial_only:
        return serial(*args)
    if _thread_safe(_current_layer()):
        return parallel(*args)
    with _lock:
        return parallel(*args)


def row_chunks(rows: int, work: Any, *, min_rows: int = 1) -> Iterator[tuple[int, int]]:
    """Split ``[0, rows)`` into consecutive ``(a, b)`` chunks of bounded work.

    Args:
        rows: number of rows.
        work: per-row work, an int (the same for every row) or an integer array ``(rows,)``.
        min_rows: at least this many rows per chunk (e.g. one task per thread).

    Chunk work is about ``threads() * CHUNK_WORK`` units, so one chunk takes tens of
    milliseconds and Ctrl-C is seen between chunks.
    """
    if rows <= 0:
        return
    budget = threads() * CHUNK_WORK
    if isinstance(work, (int, np.integer)):
        step = max(min_rows, budget // max(1, int(work)))
        for a in range(0, rows, step):
            yield a, min(rows, a + step)
        return
    cum = np.cumsum(work, dtype=np.int64)
    a = 0
    while a < rows:
        base = int(cum[a - 1]) if a else 0
        b = int(np.searchsorted(cum, base + budget, side="right"))
        b = min(rows, max(b, a + min_rows))
        yield a, b
        a = b


# ── cache directory ──────────────────────────────────────────────────────────────────────────────


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _user_cache_dir() -> Path:
    from numba.misc.appdirs import AppDirs

    return Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)


def configure_cache() -> Path | None:
    """Make ``@njit(cache=True)`` work from a read-only install; return the fallback dir if used.

    Numba needs a writable directory for each cached function: ``NUMBA_CACHE_DIR``, else the
    source's ``__pycache__``, else the user cache directory; with none it raises when the
    function is decorated. Here, in that case, a per-user directory under the temporary
    directory is used, seeded with cache files found in the read-only ``__pycache__`` folders
    (a cache built at install time still loads; index entries carry a source hash).
    """

    if _numba_config().CACHE_DIR:
        return None
    kernel_dirs = [PACKAGE_DIR / "backends"]
    if all(_writable(d / "__pycache__") for d in kernel_dirs) or _writable(_user_cache_dir()):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    try:
        fallback = Path(tempfile.gettempdir()) / f"gpu_phase_router-numba-cache-{uid}"
    except (FileNotFoundError, OSError):
        warnings.warn(
            "gpu_phase_router: the install and the user cache directory are read-only and no "
            "temporary directory is writable; set NUMBA_CACHE_DIR to a writable directory",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if not _writable(fallback):
        return None
    from numba.core.caching import _CacheLocator

    for d in kernel_dirs:
        src = d / "__pycache__"
        if not src.is_dir():
            continue
        dest = fallback / _CacheLocator.get_suitable_cache_subpath(str(d / "cpu.py"))
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix in (".nbi", ".nbc") and not (dest / f.name).exists():
                try:
                    shutil.copy2(f, dest / f.name)
                except OSError:
                    pass
    _numba_config().CACHE_DIR = str(fallback)
    warnings.warn(
        f"gpu_phase_router: the install directory and the user cache directory are read-only; "
        f"caching compiled CPU kernels in {fallback} (set NUMBA_CACHE_DIR to choose another)",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback


# ── first-use notice ─────────────────────────────────────────────────────────────────────────────


def _install_compile_notice() -> None:
    from numba.core import event

    class _Notice(event.Listener):
        def on_start(self, ev: Any) -> None:
            global _noticed
            if _noticed:
                return
            disp = (ev.data or {}).get("dispatcher")
            module = getattr(getattr(disp, "py_func", None), "__module__", "") or ""
            if module.startswith("gpu_phase_router"):
                _noticed = True
                logger.warning(
                    "gpu_phase_router: compiling the CPU kernels (first use with an empty cache; a few seconds, once)"
                )

        def on_end(self, ev: Any) -> None:
            pass

    event.register("numba:compile", _Notice())


_configured = False


def configure() -> None:
    """Apply the policy (idempotent): threading layer, cache directory, fork hooks, notice."""
    global _configured
    if _configured:
        return
    _configured = True
    choose_threading_layer()
    configure_cache()
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)
    _install_compile_notice()


configure()
