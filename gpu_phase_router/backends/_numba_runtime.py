"""Process-wide runtime policy for the Numba CPU kernels.

Imported by every Numba kernel module before its first ``@njit(cache=True)`` decoration, so it
applies to all of them:

* **Threading layer** — chosen explicitly before Numba's first parallel launch (unless the user
  set ``NUMBA_THREADING_LAYER`` or Numba already launched): ``tbb`` (thread- and fork-safe) if
  it loads, else ``omp`` (thread-safe; GNU libgomp is not fork-safe), else ``workqueue``
  (fork-safe, not thread-safe). Numba's own safety table: ``numba/np/ufunc/parallel.py``.
* **Thread count** — :func:`threads_for` sizes each kernel call: one thread for small work (the
  serial kernel, no pool wake-up), never more than ``NUMBA_NUM_THREADS`` / ``numba.set_num_threads``,
  ``torch.get_num_threads()`` when torch is loaded, or — for calls of less than :data:`LONG_WORK`
  — the CPUs other processes leave free.
* **Threads** — under a layer that is not thread-safe (``workqueue``), kernel calls from
  different Python threads are serialised by one process-wide lock (held per chunk, see
  :func:`row_chunks`), instead of Numba aborting the interpreter.
* **fork** — fork hooks (``backends.add_fork_hooks``: run after a fork has waited for other
  threads' backend imports): a child forked after the parent launched a layer that is
  not fork-safe (GNU OpenMP) runs the kernels through their serial versions (same results), so
  it neither dies nor hangs; the lock is re-created in every child, and a fork waits until no
  other thread is compiling (Numba's compiler lock, held by a thread the child lacks, would stop
  the child's first compilation or cache load forever).
* **Cache** — compiled kernels go to ``NUMBA_CACHE_DIR`` when set, else to a per-user folder
  keyed by package version and CPU (:func:`user_cache_dir`), shared by every process of the
  user; never into the package folder (files pip does not know keep a removed install alive as
  a namespace package). With a read-only ``$HOME`` (or a ``NUMBA_CACHE_DIR`` that cannot be
  written), a per-user temporary folder seeded from it, with one warning; with nothing writable,
  no caching of what is compiled, with one warning.
* **First use** — one ``logging`` notice per process when a kernel of the package is compiled.
* **Ctrl-C** — :func:`row_chunks` cuts a kernel call into chunks of bounded work; Python raises
  ``KeyboardInterrupt`` between them. Rows are independent, so chunks never change a result.
  While Numba compiles a kernel of the package in the main thread, SIGINT is held and delivered
  when the function being compiled is done (:func:`_release_sigint`, :func:`run`): LLVM hands each
  compiled object to Python through a ctypes callback, and a ``KeyboardInterrupt`` raised there is
  printed and dropped, which lost the Ctrl-C or left the kernel without its object code
  (``RuntimeError: no compiled object yet``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
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


@functools.cache
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


def _compiler_lock() -> Any:
    """Numba's process-wide compiler lock, once Numba is imported (else ``None``)."""
    module = sys.modules.get("numba.core.compiler_lock")
    return None if module is None else getattr(module, "global_compiler_lock", None)


def _before_fork() -> None:
    if not _thread_safe(_current_layer()):
        _lock.acquire()  # no kernel of another thread is mid-chunk while the process is copied
    compiler = _compiler_lock()  # taken after _lock, in the order a kernel call compiling under _lock takes them
    if compiler is not None:
        compiler.acquire()  # no compilation of another thread is half done: the child would wait on its lock forever


def _after_fork_parent() -> None:
    compiler = _compiler_lock()
    if compiler is not None:
        compiler.release()
    if not _thread_safe(_current_layer()):
        _lock.release()


def _after_fork_child() -> None:
    global _lock, _serial_only
    compiler = _compiler_lock()
    if compiler is not None:
        compiler.release()  # held by this (the forking) thread since _before_fork
    _lock = threading.RLock()
    layer = _launched_layer()
    if layer is not None and not _fork_safe(layer):
        _serial_only = True


def serial_only() -> bool:
    """True in a child forked after its parent launched a fork-unsafe threading layer."""
    return _serial_only


PAR_MIN_WORK = 1 << 18  # work units (see row_chunks) a call needs per thread it runs on: ~0.3-1 ms
# (2^16 ran 3500-5000 MoE rows and N = 1024 in 0.85-0.90x the time on an idle 2-core Zen 3, but then a first
# small call such as route(n=1024) also compiles the parallel kernel: about 3 s more of cold start)
LONG_WORK = 1 << 23  # from this many work units (tens of ms) a call keeps its threads beside other processes


def _pool_threads(par: Any) -> int:
    """``numba.get_num_threads()`` once Numba's pool runs (``par``: ``numba.np.ufunc.parallel``), read
    through the C getter it wraps where that is there: the public function takes a process lock and a
    thread lock first (on the 2-core Zen 3: 1.7 µs against 0.17 µs in a loop, 10-15 µs on a routing
    call's path)."""
    getter = getattr(par, "_get_num_threads", None)
    if getter is not None:
        n = int(getter())
        if n > 0:
            return n
    return int(par.get_num_threads())


def _configured_threads() -> int:
    """Numba's thread count for this Python thread (``numba.set_num_threads`` once the pool runs,
    else ``NUMBA_NUM_THREADS``), capped by ``torch.get_num_threads()`` when torch is loaded."""
    par = sys.modules.get("numba.np.ufunc.parallel")
    if par is not None and getattr(par, "_is_initialized", False):
        n = _pool_threads(par)
    else:
        n = int(_numba_config().NUMBA_NUM_THREADS)
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    if get is not None:
        try:
            n = min(n, int(get()))
        except Exception:  # a partly imported or stubbed torch
            pass
    return max(1, n)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


OTHERS_TTL = 0.02  # seconds one reading of the other processes' load is reused (the kernel calls of one call)
_others_seen = (-1.0, 0)  # (time.monotonic() of the last reading, its value)


def _others_running() -> int:
    """Runnable threads of other processes right now (Linux: ``/proc/loadavg`` less this
    process's running threads); 0 where that cannot be read. A reading is reused for
    ``OTHERS_TTL`` seconds, so the several kernel calls of one call read ``/proc`` once."""
    global _others_seen
    now = time.monotonic()
    if now - _others_seen[0] < OTHERS_TTL:
        return _others_seen[1]
    value = _read_others_running()
    _others_seen = (now, value)
    return value


def _read_proc(path: str) -> bytes:
    """The start of a ``/proc`` file, by ``os.open``/``os.read`` (half the time of ``open()``, whose
    buffered file object is set up per call; this runs on a routing call's path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _read_others_running() -> int:
    try:
        running = int(_read_proc("/proc/loadavg").split()[3].split(b"/")[0])
        if running <= 1:  # the caller alone (it is running): no need to list this process's threads
            return 0
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                own += _read_proc(f"/proc/self/task/{tid}/stat").rsplit(b")", 1)[1].split()[0] == b"R"
            except (OSError, IndexError):
                pass
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - max(1, own))


def threads_for(work: int) -> int:
    """Threads one kernel call of ``work`` units runs on: 1 on the serial path; otherwise at most
    the configured threads (:func:`_configured_threads`), one per :data:`PAR_MIN_WORK` units (a
    small call stays on one thread: waking a pool costs more than it saves). A call of less than
    :data:`LONG_WORK` units also stays off the CPUs other processes are running on at this moment:
    it lasts about one scheduler time slice, and a pool thread that waits for its turn delays the
    whole call. A longer call spans many time slices, in which every thread gets its fair share,
    so it keeps all its threads beside other processes too (beside a busy loop on each of 2 cores,
    ``route(ones(10**6), ones(64), k=2)`` took 0.70–0.76× the one-thread time on both threads)."""
    if _serial_only or int(work) < 2 * PAR_MIN_WORK:
        return 1
    t = min(_configured_threads(), int(work) // PAR_MIN_WORK)
    if t <= 1:
        return 1
    if work >= LONG_WORK:
        return t
    return max(1, min(t, _usable_cpus() - _others_running()))


def threads() -> int:
    """Threads a parallel kernel may use here (1 on the serial path); never launches Numba's pool."""
    if _serial_only:
        return 1
    return _configured_threads()


def run(parallel: Callable[..., Any], serial: Callable[..., Any], *args: Any, n_threads: int | None = None) -> Any:
    """Call one kernel chunk: ``serial(*args)`` on one thread (``n_threads == 1``, or in a
    fork-unsafe child), else ``parallel(*args)`` on ``n_threads`` threads (default: all
    configured), under the process-wide lock when the threading layer is not thread-safe.

    A SIGINT held while the call compiled a kernel (:func:`_hold_sigint`) and not delivered at the
    end of a function the kernel calls is delivered when it returns: the handler it found runs (by
    default, ``KeyboardInterrupt`` is raised here)."""
    try:
        return _run(parallel, serial, args, n_threads)
    except NotImplementedError as exc:  # an intrinsic of the kernels, run as plain Python
        if "pure-python" in str(exc) and os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
            raise RuntimeError(
                "the CPU kernels of gpu_phase_router need Numba's compiler, and NUMBA_DISABLE_JIT is set "
                "(their LLVM intrinsics have no pure-Python form); unset it for this process"
            ) from exc
        raise
    finally:
        if _sigint.pending:
            _deliver_sigint()


def _run(parallel: Callable[..., Any], serial: Callable[..., Any], args: tuple[Any, ...], n_threads: int | None) -> Any:
    if _serial_only or n_threads == 1:
        return serial(*args)
    if n_threads is None:
        return _run_parallel(parallel, args)
    import numba
    from numba.np.ufunc import parallel as par

    # numba.get_num_threads() starts the pool where it does not run yet
    before = _pool_threads(par) if getattr(par, "_is_initialized", False) else numba.get_num_threads()
    if n_threads >= before:
        return _run_parallel(parallel, args)
    numba.set_num_threads(n_threads)
    try:
        return _run_parallel(parallel, args)
    finally:
        numba.set_num_threads(before)


def _run_parallel(parallel: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    if _thread_safe(_current_layer()):
        return parallel(*args)
    with _lock:
        return parallel(*args)


def row_chunks(rows: int, work: Any, *, min_rows: int = 1, n_threads: int | None = None) -> Iterator[tuple[int, int]]:
    """Split ``[0, rows)`` into consecutive ``(a, b)`` chunks of bounded work.

    Args:
        rows: number of rows.
        work: per-row work, an int (the same for every row) or an integer array ``(rows,)``.
        min_rows: at least this many rows per chunk (e.g. one task per thread).
        n_threads: threads each chunk runs on (default :func:`threads`).

    Chunk work is about ``n_threads * CHUNK_WORK`` units, so one chunk takes tens of
    milliseconds and Ctrl-C is seen between chunks.
    """
    if rows <= 0:
        return
    budget = (n_threads or threads()) * CHUNK_WORK
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


def sized_chunks(rows: int, work: Any, *, total: int, task_rows: int) -> Iterator[tuple[int, int, int]]:
    """The chunks of one kernel call of ``total`` work units (the sum of ``work`` over the rows) with
    the threads it runs on: :func:`row_chunks` for :func:`threads_for` ``(total)`` threads, at least
    ``task_rows`` rows per thread, yielded as ``(a, b, n_threads)`` for :func:`run`. A call that fits
    in one chunk is yielded whole, without the prefix sums of a per-row ``work``."""
    n_threads = threads_for(total)
    if 0 < rows and total <= n_threads * CHUNK_WORK:  # row_chunks would yield (0, rows)
        yield 0, rows, n_threads
        return
    for a, b in row_chunks(rows, work, min_rows=task_rows * n_threads, n_threads=n_threads):
        yield a, b, n_threads


# ── cache directory ──────────────────────────────────────────────────────────────────────────────

_cache_base: Path | None = None  # where this package's kernels are cached (None: NUMBA_CACHE_DIR or Numba's own)
_cache_read_only = False  # nothing is writable: kernels load from _cache_base and are never saved


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _package_version() -> str:
    from .. import __version__

    return str(__version__)


def _cpu_name() -> str:
    """The CPU Numba compiles for (``NUMBA_CPU_NAME`` or the host's, e.g. ``znver3``)."""
    name = _numba_config().CPU_NAME
    if not name:
        import llvmlite.binding as ll

        name = ll.get_host_cpu_name()
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "cpu"


def user_cache_dir() -> Path:
    """Per-user cache folder of this package's compiled kernels, one per version and CPU.

    ``<user cache dir>/gpu_phase_router/numba-<version>-<cpu>`` (``$XDG_CACHE_HOME`` or
    ``~/.cache`` on Linux). Every process of the user (Dask workers, ``torchrun`` ranks) derives
    the same folder, so kernels compiled by one are loaded by the others.
    """
    from numba.misc.appdirs import AppDirs

    root = Path(AppDirs(appname="gpu_phase_router", appauthor=False).user_cache_dir)
    return root / f"numba-{_package_version()}-{_cpu_name()}"


def cache_dir() -> Path | None:
    """The folder this package's kernels are cached in: ``NUMBA_CACHE_DIR`` when set, else the
    per-user folder of :func:`user_cache_dir` (or its temporary fallback); ``None`` if nothing is writable."""
    if _cache_read_only:
        return None
    if _cache_base is None and _numba_config().CACHE_DIR:
        return Path(_numba_config().CACHE_DIR)
    return _cache_base


def _in_package(py_file: str) -> bool:
    try:
        Path(py_file).resolve().relative_to(PACKAGE_DIR)
    except (ValueError, OSError):
        return False
    return True


def _install_cache_locator() -> None:
    """Put this package's ``cache=True`` kernels in :data:`_cache_base`, never in the install.

    Numba's default writes next to the source (``__pycache__``) when it is writable: inside an
    installed package those files are unknown to pip, which then leaves the folder behind on
    ``pip uninstall`` / ``pip install -e`` as a namespace package that shadows the real one. The
    locator added here applies only to files of this package, after Numba's locator of a writable
    ``NUMBA_CACHE_DIR``. Where nothing is writable it still gives the package's kernels a (read-only)
    folder: Numba raises at decoration when no locator takes a ``cache=True`` function.
    """
    from numba.core import caching

    impl: Any = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")  # noqa: B009 (renamed in 0.61)
    mixin: Any = caching._SourceFileBackedLocatorMixin
    base: Any = caching._CacheLocator

    class PackageCacheLocator(mixin, base):
        def __init__(self, py_func: Any, py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            assert _cache_base is not None
            self._cache_path = str(_cache_base / self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self) -> str:
            return self._cache_path

        def ensure_cache_path(self) -> None:
            if not _cache_read_only:
                super().ensure_cache_path()

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if _cache_base is None or not _in_package(py_file):
                return None
            if _cache_read_only:
                return cls(py_func, py_file) if os.path.exists(py_file) else None
            return super().from_function(py_func, py_file)

    classes = impl._locator_classes
    if not any(c.__name__ == "PackageCacheLocator" for c in classes):
        classes.insert(1 if classes and "UserProvided" in classes[0].__name__ else 0, PackageCacheLocator)


def configure_cache() -> Path | None:
    """Choose where compiled kernels are cached; return the temporary fallback folder if it is used.

    ``NUMBA_CACHE_DIR`` wins when set and writable. Otherwise the per-user folder of
    :func:`user_cache_dir`. When the folder chosen is not writable (read-only ``$HOME``, or a
    ``NUMBA_CACHE_DIR`` that cannot be written), a per-user folder under the temporary directory,
    seeded with the kernels already in the read-only folder (they still load: index entries carry
    a hash of the source), with one warning. When that is not writable either, kernels load from
    the read-only folder where it has them and are compiled uncached otherwise, with one warning.
    Nothing is ever written into the package folder.
    """
    global _cache_base, _cache_read_only

    _install_cache_locator()
    configured = _numba_config().CACHE_DIR
    if configured:
        user = Path(configured)
        if _writable(user):
            return None
        what = f"NUMBA_CACHE_DIR {user} is not writable"
    else:
        user = user_cache_dir()
        if _writable(user):
            _cache_base = user
            return None
        what = f"the user cache directory {user} is read-only"
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    try:
        fallback = Path(tempfile.gettempdir()) / f"gpu_phase_router-numba-cache-{uid}" / user.name
    except (FileNotFoundError, OSError):
        fallback = None
    if fallback is None or not _writable(fallback):
        _cache_base = user
        _cache_read_only = True
        warnings.warn(
            f"gpu_phase_router: {what}, and so is the temporary directory; the CPU kernels compiled "
            "by this process are not cached (set NUMBA_CACHE_DIR to a writable directory)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if user.is_dir():
        for src in user.iterdir():
            if not src.is_dir():
                continue
            dest = fallback / src.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.suffix in (".nbi", ".nbc") and not (dest / f.name).exists():
                    try:
                        shutil.copy2(f, dest / f.name)
                    except OSError:
                        pass
    _cache_base = fallback
    warnings.warn(
        f"gpu_phase_router: {what}; caching compiled CPU kernels in {fallback} (set NUMBA_CACHE_DIR to choose another)",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback


# ── first-use notice, and Ctrl-C while compiling ─────────────────────────────────────────────────


class _SigintHold:
    """SIGINT held in the main thread while Numba compiles a kernel of the package.

    ``depth`` counts the compiles under way since the hold began (a kernel's compile compiles
    the functions it calls, each its own compile event); ``handler`` is the SIGINT handler the
    hold replaced; ``pending`` is set when a SIGINT arrived meanwhile (delivered by
    :func:`_release_sigint` at the end of a nested compile, else by :func:`run`)."""

    depth = 0
    handler: Any = None
    pending = False


_sigint = _SigintHold()


def _record_sigint(signum: int, frame: Any) -> None:
    _sigint.pending = True


def _hold_sigint(ours: bool) -> None:
    """A compile starts (``ours``: of a package kernel): hold SIGINT from the first compile of a
    package kernel in the main thread, where Python's handler is a Python function (Ctrl-C's
    default ``KeyboardInterrupt`` or the user's); ``SIG_IGN`` and ``SIG_DFL`` are left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _sigint.depth == 0:
        handler = signal.getsignal(signal.SIGINT)
        if not ours or not callable(handler):
            return
        _sigint.handler = handler
        signal.signal(signal.SIGINT, _record_sigint)
    _sigint.depth += 1


def _release_sigint() -> None:
    """A compile ends. At the end of the outermost one the handler is put back, and a SIGINT that
    came meanwhile stays pending until :func:`run` returns, after Numba has cached the kernel. At
    the end of a nested one (a function the kernel calls, compiled and handed over whole) a pending
    SIGINT is delivered at once, so a Ctrl-C waits for the function being compiled, not the kernel:
    by default its ``KeyboardInterrupt`` ends the kernel's compile, as it would in Numba's typing."""
    if threading.current_thread() is not threading.main_thread() or _sigint.depth == 0:
        return
    _sigint.depth -= 1
    if _sigint.depth == 0:
        signal.signal(signal.SIGINT, _sigint.handler)
        _sigint.handler = None
    elif _sigint.pending:
        _sigint.pending = False
        signal.signal(signal.SIGINT, _sigint.handler)
        try:
            signal.raise_signal(signal.SIGINT)  # the handler runs here; KeyboardInterrupt propagates
        finally:
            if _sigint.depth:  # the kernel's compile goes on (a handler that does not raise)
                signal.signal(signal.SIGINT, _record_sigint)


def _deliver_sigint() -> None:
    """Run the SIGINT handler now for the SIGINT held during a compile (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or _sigint.depth:
        return
    _sigint.pending = False
    signal.raise_signal(signal.SIGINT)


def _install_compile_notice() -> None:
    from numba.core import event

    class _Notice(event.Listener):
        def on_start(self, ev: Any) -> None:
            global _noticed
            disp = (ev.data or {}).get("dispatcher")
            module = getattr(getattr(disp, "py_func", None), "__module__", "") or ""
            ours = module.startswith("gpu_phase_router")
            _hold_sigint(ours)
            if ours and _cache_read_only:  # nowhere to save what this compiles (a failed save raises)
                cache = getattr(disp, "_cache", None)
                if cache is not None:
                    cache.disable()
            if ours and not _noticed:
                _noticed = True
                logger.warning(
                    "gpu_phase_router: compiling the CPU kernels (first use with an empty cache; a few seconds, once)"
                )

        def on_end(self, ev: Any) -> None:
            _release_sigint()

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
    from . import add_fork_hooks  # after the wait for other threads' backend loads, in one order

    add_fork_hooks(_before_fork, _after_fork_parent, _after_fork_child)
    _install_compile_notice()


configure()
