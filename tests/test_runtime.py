"""The CPU backend where real programs run it: forked children, many threads under every Numba
threading layer, a read-only install, Ctrl-C, and the first-use notice.

Each test runs a child Python process (the behaviour under test is process-wide) with a timeout,
so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess


def run_child(
    code: str, *, env: dict[str, str | None] | None = None, timeout: float = 240, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(cwd), **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def layer_available(layer: str) -> bool:
    code = f"""
        from numba.np.ufunc import parallel
        import numba
        numba.config.THREADING_LAYER = {layer!r}
        parallel._launch_threads()
        print(parallel._threading_layer)
    """
    res = run_child(code, timeout=120)
    return res.returncode == 0 and res.stdout.strip() == layer


# ── 1. fork after use ────────────────────────────────────────────────────────────────────────────

FORK_CODE = """
    import multiprocessing, numpy as np
    import gpu_phase_router as gpr
    from gpu_phase_router.backends import _numba_runtime as rt
    rt.PAR_MIN_WORK = 1  # every call on the thread pool, however small or busy the machine
    rt._others_running = lambda: 0

    def job(seed):
        return gpr.route(n=3000, k=4, seed=seed, backend="cpu").tobytes()

    if __name__ == "__main__":
        parent = [job(s) for s in range(4)]   # the parent has used the kernels (threads launched)
        from numba.np.ufunc import parallel
        assert parallel._is_initialized, "the parent never launched Numba's thread pool"
        with multiprocessing.get_context("fork").Pool(2) as pool:
            children = pool.map(job, range(4))
        assert children == parent, "forked children routed differently"
        gpr.route(n=3000, k=4, seed=9, backend="cpu", method="systematic")
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map(job, range(2))
        print("ok")
"""


@pytest.mark.parametrize("layer", ["default", "omp", "workqueue"])
def test_fork_after_use_routes_in_children(layer, tmp_path):
    if layer != "default" and not layer_available(layer):
        pytest.skip(f"Numba threading layer {layer!r} is not available here")
    script = tmp_path / "fork_job.py"
    script.write_text(textwrap.dedent(FORK_CODE))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    try:
        res = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("multiprocessing fork Pool hung after the parent had routed")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
    assert "unsafe" not in res.stderr


FORK_FAST_CODE = """
    import os, signal
    import gpu_phase_router as gpr
    from gpu_phase_router.backends import _numba_runtime as rt
    from numba.np.ufunc import parallel
    rt.PAR_MIN_WORK = 1  # every call on the thread pool, however small or busy the machine
    rt._others_running = lambda: 0

    want = gpr.route(n=3000, k=4, seed=1, backend="cpu").tobytes()  # launches the threading layer
    layer = parallel._threading_layer
    gnu = False
    if layer == "omp":
        from numba.np.ufunc import omppool
        gnu = omppool.openmp_vendor == "GNU"
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a kernel hung in the child ends it (SIGALRM) instead of stalling the test
        if gnu and not rt.serial_only():
            os._exit(3)  # forked after GNU OpenMP ran: the serial path must be on before any kernel
        os._exit(0 if gpr.route(n=3000, k=4, seed=1, backend="cpu").tobytes() == want else 4)
    _, status = os.waitpid(pid, 0)
    print(layer, gnu, os.waitstatus_to_exitcode(status))
"""
FORK_FAILURES = {3: "serial path off in a child forked after GNU OpenMP", 4: "the child routed differently"}


@pytest.mark.parametrize("layer", ["default", "omp"])
def test_fork_child_fails_fast(layer):
    """A plain os.fork after use: the child checks the fork-unsafe flag before it runs any kernel and
    routes under a 20 s alarm, so a broken fork path fails here within seconds, not by a timeout."""
    if layer != "default" and not layer_available(layer):
        pytest.skip(f"Numba threading layer {layer!r} is not available here")
    res = run_child(FORK_FAST_CODE, env={"NUMBA_THREADING_LAYER": None if layer == "default" else layer})
    assert res.returncode == 0, res.stderr[-3000:]
    got_layer, gnu, code = res.stdout.split()[-3:]
    assert layer in ("default", got_layer)
    if int(code) == -signal.SIGALRM:
        pytest.fail(f"forked child hung in a kernel under {got_layer} (GNU OpenMP: {gnu})")
    assert int(code) == 0, FORK_FAILURES.get(int(code), f"child exit status {code}")


# ── 2. threads under every threading layer ───────────────────────────────────────────────────────

THREAD_CODE = """
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import gpu_phase_router as gpr
    from numba.np.ufunc import parallel
    from gpu_phase_router.backends import _numba_runtime as rt
    rt.PAR_MIN_WORK = 1  # every call on the thread pool, however small or busy the machine
    rt._others_running = lambda: 0

    def job(i):
        method = "systematic" if i % 3 == 2 else "phase"
        return gpr.route(n=4000, k=4, seed=i % 4, backend="cpu", method=method).tobytes()

    expected = [job(i) for i in range(16)]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            assert list(ex.map(job, range(16))) == expected
    print(parallel._threading_layer)
"""


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_threads_route_concurrently_under_every_layer(layer):
    if not layer_available(layer):
        pytest.skip(f"Numba threading layer {layer!r} is not available here")
    try:
        res = run_child(THREAD_CODE, env={"NUMBA_THREADING_LAYER": layer})
    except subprocess.TimeoutExpired:
        pytest.fail(f"concurrent routing hung under NUMBA_THREADING_LAYER={layer}")
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-3000:]}"
    assert res.stdout.strip() == layer


def test_threads_without_libgomp_pick_workqueue_and_take_turns():
    """Where neither TBB nor GNU OpenMP loads, the backend picks workqueue itself and serialises."""
    code = "import sys\nsys.modules['numba.np.ufunc.omppool'] = None\nsys.modules['numba.np.ufunc.tbbpool'] = None\n"
    res = run_child(code + textwrap.dedent(THREAD_CODE), env={"NUMBA_THREADING_LAYER": None})
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-3000:]}"
    assert res.stdout.strip() == "workqueue"


def test_dask_threaded_scheduler_under_workqueue():
    pytest.importorskip("dask")
    code = """
        import dask, dask.array as da, numpy as np
        import gpu_phase_router as gpr
        from gpu_phase_router.dask import route as dask_route
        w = np.ones(40000)
        caps = np.linspace(1, 4, 64)
        expected = gpr.route(w, caps, k=4, seed=3, backend="cpu")
        with dask.config.set(scheduler="threads", num_workers=4):
            got = dask_route(da.from_array(w, chunks=5000), caps, k=4, seed=3).compute()
        assert (got == expected).all()
        print("ok")
    """
    res = run_child(code, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-3000:]}"


# ── 3. read-only install ─────────────────────────────────────────────────────────────────────────


def _unshare_command(probe_dir: Path) -> tuple[list[str] | None, str]:
    """``unshare`` flags that give a private mount namespace here (as root: ``-m``; otherwise a user
    namespace mapped to root: ``-r -m``), or ``None`` and the reason."""
    if sys.platform != "linux" or shutil.which("unshare") is None or shutil.which("mount") is None:
        return None, "needs Linux with unshare(1) and mount(8)"
    errors = []
    for flags in (["-m"], ["-r", "-m"]):
        script = f"mount --bind {probe_dir} {probe_dir} && mount -o remount,bind,ro {probe_dir}"
        res = subprocess.run(["unshare", *flags, "sh", "-c", script], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            return ["unshare", *flags], ""
        errors.append(res.stderr.strip()[:120])
    return None, f"read-only bind mounts are not permitted here: {'; '.join(errors)}"


def _private_install(tmp_path: Path) -> tuple[list[str], Path, Path, Path, dict[str, str]]:
    """``(unshare command, site, home, tmp, env)``: a copy of the package in ``site`` (no
    ``__pycache__``), empty ``home`` and ``tmp`` folders, and an environment (no ``NUMBA_*``) that
    imports that copy with them as ``$HOME`` and ``$TMPDIR``; skips where read-only bind mounts
    cannot be made."""
    probe = tmp_path / "probe"
    probe.mkdir()
    unshare, why = _unshare_command(probe)
    if unshare is None:
        pytest.skip(why)
    site = tmp_path / "site"
    shutil.copytree(ROOT / "gpu_phase_router", site / "gpu_phase_router", ignore=shutil.ignore_patterns("__pycache__"))
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(
        {
            "PYTHONPATH": str(site),
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "TMPDIR": str(tmp),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return unshare, site, home, tmp, env


@pytest.mark.parametrize("prebuilt", [False, True], ids=["cold", "prebuilt-cache"])
def test_read_only_install_and_home(tmp_path, prebuilt):
    unshare, site, home, tmp, env = _private_install(tmp_path)
    code = (
        "import warnings, gpu_phase_router as gpr\n"
        "print(gpr.__file__)\n"
        "r = gpr.route(n=500, k=4, seed=1, backend='cpu')\n"
        "s = gpr.route(n=500, k=4, seed=1, backend='cpu', method='systematic')\n"
        "print(int(r.sum()), int(s.sum()))\n"
    )
    if prebuilt:  # the cache is built in the user cache folder, before it becomes read-only
        res = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
            check=False,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert list((home / ".cache" / "gpu_phase_router").rglob("*.nbi")), "not cached in the user cache folder"
        assert not list((site / "gpu_phase_router").rglob("*.nbi")), "cache files written into the package folder"
    ro = (
        f"mount --bind {site} {site} && mount -o remount,bind,ro {site} && "
        f"mount --bind {home} {home} && mount -o remount,bind,ro {home} && "
    )
    script = ro + f'exec {sys.executable} -W always -c "$CODE"'
    env["CODE"] = code
    res = subprocess.run(
        [*unshare, "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert "site/gpu_phase_router" in res.stdout.splitlines()[0], "imported the wrong copy of the package"
    assert res.returncode == 0, res.stderr[-3000:]
    from gpu_phase_router import route

    want = route(n=500, k=4, seed=1, backend="cpu")
    want_s = route(n=500, k=4, seed=1, backend="cpu", method="systematic")
    assert res.stdout.split()[1:] == [str(int(want.sum())), str(int(want_s.sum()))]
    assert res.stderr.count("read-only") == 1, res.stderr  # one warning naming the fallback
    cache = list((tmp).rglob("*.nbi"))
    assert cache, "the fallback cache directory was not used"
    if prebuilt:
        assert "compiling" not in res.stderr, "the prebuilt cache was not reused"


# ── 4. Ctrl-C ────────────────────────────────────────────────────────────────────────────────────


def test_ctrl_c_stops_a_long_route_within_two_seconds():
    code = """
        import signal, sys, time
        import gpu_phase_router as gpr
        # Python maps SIGINT to KeyboardInterrupt only where the parent left it at its default; a
        # background job of a non-interactive shell inherits it ignored. Ctrl-C in a terminal is the default.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # compile / load outside the timed part the kernel the timed call runs: more than 2^15 sources
        # (int32 ring), enough work for the parallel kernel, and rows scanned one by one (degree 800:
        # below cpu.SWEEP_MIN_DEG; the timed call's ring is too large for a sweep)
        gpr.route(n=40000, k=4, density=0.02, backend="cpu")
        print("ready", flush=True)
        t0 = time.perf_counter()
        try:
            gpr.route(n=70000, k=4, density=1.0, backend="cpu")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        print("finished", time.perf_counter() - t0, flush=True)
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        time.sleep(1.0)
        assert proc.poll() is None, "the large route finished before SIGINT was sent"
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the child ignored SIGINT for 30 s")
        waited = time.perf_counter() - t0
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted" in out, f"stdout: {out!r}; stderr: {err[-3000:]}"
    assert proc.returncode == 3
    assert waited < 2.0, f"the child took {waited:.1f} s to stop after SIGINT"


def test_ctrl_c_while_a_kernel_compiles_raises_keyboard_interrupt_after_the_compile(tmp_path):
    """A SIGINT that lands while LLVM hands a compiled object to Python (a ctypes callback, where a
    ``KeyboardInterrupt`` is printed and dropped) is held until the function being compiled is done
    and then raised, ending the kernel's compile; the process routes again. The child raises SIGINT
    from inside that callback (Numba's object-code hook) when the scan's ``_compact`` is compiled
    (square rows of degree 600, below ``cpu.SWEEP_MIN_DEG``: tested position by position), with an
    empty cache: without the hold the interrupt is lost and the kernel has no object code
    to cache; held until the whole kernel is compiled, it would come seconds later."""
    code = """
        import signal, sys
        import numba.core.codegen as cg

        signal.signal(signal.SIGINT, signal.default_int_handler)
        hook = cg.CPUCodeLibrary.__dict__["_object_compiled_hook"].__func__
        fired = []

        def ctrl_c_in_the_callback(cls, ll_module, buf):
            if ll_module.name == "_compact" and not fired:
                fired.append(1)
                signal.raise_signal(signal.SIGINT)  # what a Ctrl-C at this moment does
            return hook(cls, ll_module, buf)

        cg.CPUCodeLibrary._object_compiled_hook = classmethod(ctrl_c_in_the_callback)
        import gpu_phase_router as gpr

        from gpu_phase_router.backends import cpu

        try:
            gpr.route(n=2000, k=4, density=0.3, seed=3, backend="cpu")
            print("finished", flush=True)
        except KeyboardInterrupt:
            # raised when _compact's compile ended, before the rows kernel that calls it was compiled
            print("interrupted", len(fired), len(cpu._phase_rows.overloads), flush=True)
        print("again", int(gpr.route(n=2000, k=4, density=0.3, seed=3, backend="cpu").sum()), flush=True)
    """
    res = run_child(code, env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    from gpu_phase_router import route

    want = int(route(n=2000, k=4, density=0.3, seed=3, backend="cpu").sum())
    assert res.stdout.split() == ["interrupted", "1", "0", "again", str(want)], res.stderr[-3000:]
    assert "Exception ignored" not in res.stderr, res.stderr[-3000:]
    assert list((tmp_path / "cache").rglob("*.nbc")), "nothing was cached"


@pytest.mark.subprocess
def test_numba_disable_jit_names_itself():
    """The kernels' LLVM intrinsics have no pure-Python form: NUMBA_DISABLE_JIT=1 gets an error
    that says so, not Numba's NotImplementedError about an intrinsic."""
    code = """
        import numpy as np
        import gpu_phase_router as gpr
        try:
            gpr.route(np.ones(256), np.ones(8), k=2)
        except RuntimeError as exc:
            print("raised", "NUMBA_DISABLE_JIT" in str(exc))
    """
    res = run_child(code, env={"NUMBA_DISABLE_JIT": "1"}, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["raised", "True"], res.stdout + res.stderr[-2000:]


@pytest.mark.subprocess
def test_fork_while_another_thread_compiles_gives_a_working_child(tmp_path):
    """A thread compiles the phase kernels (empty cache) while the main thread forks: the fork waits
    for the compilation (Numba's compiler lock), so the child, which compiles its own kernel, does
    not wait forever on a lock held by a thread it does not have (a DataLoader worker started while
    another thread routes the first time)."""
    code = """
        import multiprocessing as mp, threading, time
        import gpu_phase_router as gpr

        worker = threading.Thread(target=lambda: gpr.route(n=3000, k=4, seed=1, backend="cpu"))
        worker.start()
        while worker.is_alive():  # until the worker holds Numba's compiler lock (it is compiling)
            try:
                lock = __import__("numba.core.compiler_lock", fromlist=["x"]).global_compiler_lock._lock
            except ImportError:
                time.sleep(0.01)
                continue
            if not lock.acquire(blocking=False):
                break
            lock.release()
            time.sleep(0.01)
        def child(q):
            q.put(gpr.route(n=500, k=2, seed=1, backend="cpu", method="systematic").shape)
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        try:
            print("child", q.get(timeout=60), flush=True)
        except Exception:  # queue.Empty: the child waits on a lock no thread of it will release
            print("hung", flush=True)
            p.kill()
        p.join()
        worker.join()
    """
    res = run_child(code, env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")}, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[:1] == ["child"] and "(500," in res.stdout, res.stdout + res.stderr[-2000:]


# A module import held open for a while: the module's code runs ``seconds`` late. Its import holds
# that module's lock (and, for a backend module, the backends' load lock) meanwhile, but not Python's
# global import lock, which a finder's ``find_spec`` would hold: the main thread can import (say
# ``multiprocessing.queues``) and fork while the module loads, at once rather than after the wait.
SLOW_IMPORT = """
import importlib.abc, importlib.machinery, sys, threading, time

def slow_import(name, seconds):
    inside = threading.Event()

    class Slow(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            real = spec.loader

            class Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return real.create_module(spec)

                def exec_module(self, module):
                    inside.set()
                    time.sleep(seconds)
                    real.exec_module(module)

            spec.loader = Loader()
            return spec

    sys.meta_path.insert(0, Slow())
    return inside
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("module", ["gpu_phase_router.backends.cpu", "gpu_phase_router.backends.cpu_crate"])
def test_fork_while_another_thread_loads_the_backend_gives_a_working_child(module):
    """A thread's first call imports the CPU backend (Numba and the kernel modules: about 0.5 s,
    held longer here by a slow finder) while the main thread forks: the fork waits for the import,
    so the child does not wait forever on the import lock of a module that a thread it does not
    have was importing (a DataLoader worker started during the first route), and routes as the
    parent does. Also for the crate-exact kernels' module, imported at their first call."""
    code = SLOW_IMPORT + textwrap.dedent(f"""
        import multiprocessing as mp, threading
        import numpy as np
        import gpu_phase_router as gpr
        from gpu_phase_router import compat

        inside = slow_import({module!r}, 1.0)
        if {module!r}.endswith("cpu_crate"):
            gpr.route(n=64, k=2, seed=1, backend="cpu")  # the CPU backend is loaded, the crate's kernels not
        bits = compat.build_bits([20] * 64, 64)
        call = lambda: (gpr.route(n=500, k=2, seed=1, backend="cpu"), compat.phase_router_auto(bits, bits, 64, 2, 3))
        worker = threading.Thread(target=call)
        worker.start()
        assert inside.wait(60)
        def child(q):
            routes, crate = call()
            q.put((routes.tobytes(), crate.tobytes()))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        try:
            got = q.get(timeout=60)
        except Exception:  # queue.Empty: the child waits on a lock no thread of it will release
            got = None
            p.kill()
        p.join()
        worker.join()
        routes, crate = call()
        print("hung" if got is None else ("same" if got == (routes.tobytes(), crate.tobytes()) else "differ"))
    """)
    res = run_child(code, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["same"], res.stdout + res.stderr[-2000:]


@pytest.mark.subprocess
def test_fork_that_waited_in_vain_for_a_backend_load_raises_in_the_child():
    """When the other thread's import outlasts the fork's wait (``FORK_WAIT_S``), the parent goes on
    and the child's first call raises a ``RuntimeError`` that says what to do, instead of waiting
    forever on the import lock; the parent routes normally."""
    code = SLOW_IMPORT + textwrap.dedent("""
        import multiprocessing as mp, threading
        import gpu_phase_router as gpr
        from gpu_phase_router import backends

        backends.FORK_WAIT_S = 0.2
        inside = slow_import("gpu_phase_router.backends.cpu", 3.0)
        worker = threading.Thread(target=lambda: gpr.route(n=500, k=2, seed=1, backend="cpu"))
        worker.start()
        assert inside.wait(60)
        def child(q):
            try:
                gpr.route(n=500, k=2, seed=1, backend="cpu")
                q.put("routed")
            except RuntimeError as exc:
                q.put("raised " + str("spawn" in str(exc) and "forked" in str(exc)))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        try:
            print(q.get(timeout=60))
        except Exception:
            print("hung")
            p.kill()
        p.join()
        worker.join()
        print(gpr.route(n=500, k=2, seed=1, backend="cpu").shape)
    """)
    res = run_child(code, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[:2] == ["raised True", "(500, 2)"], res.stdout + res.stderr[-2000:]


def test_ctrl_c_handlers_other_than_python_s_are_left_alone(tmp_path):
    """SIGINT ignored (a background job's inheritance) stays ignored through a compile, and the
    handler Python had before a compile is the one in place after it."""
    code = """
        import signal
        import gpu_phase_router as gpr

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gpr.route(n=300, k=2, backend="cpu")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        seen = []
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
        handler = signal.getsignal(signal.SIGINT)
        gpr.route(n=300, k=2, backend="cpu", method="systematic")
        assert signal.getsignal(signal.SIGINT) is handler
        print("ok", seen)
    """
    res = run_child(code, env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ok", "[]"]


# ── 5. first use: one notice when compiling ──────────────────────────────────────────────────────


def test_compile_notice_once_per_process_and_silent_when_cached(tmp_path):
    code = """
        import logging
        logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
        import gpu_phase_router as gpr
        gpr.route(n=300, k=4, backend="cpu")
        gpr.route(n=300, k=4, backend="cpu", method="systematic")
        gpr.route(n=300, k=40, backend="cpu")
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    cold = run_child(code, env=env, timeout=300)
    assert cold.returncode == 0, cold.stderr[-3000:]
    notices = [ln for ln in cold.stderr.splitlines() if ln.startswith("LOG gpu_phase_router") and "compiling" in ln]
    assert len(notices) == 1, cold.stderr
    warm = run_child(code, env=env, timeout=300)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "compiling" not in warm.stderr, warm.stderr


def test_a_call_compiles_only_the_rows_kernel_it_runs(tmp_path):
    """With an empty cache, MoE-shape rows (banded, every row short) compile no ring scan, square
    rows compile none of the banded code, and long square rows (swept) none of the window test
    (the kernel kinds of ``backends/cpu.py``)."""
    code = """
        import json
        import numpy as np
        from numba.core import event

        compiled = []

        class Seen(event.Listener):
            def on_start(self, ev):
                compiled.append(ev.data["dispatcher"].py_func.__name__)

            def on_end(self, ev):
                pass

        event.register("numba:compile", Seen())
        import gpu_phase_router as gpr

        gpr.route(np.ones(500), np.ones(8), k=2, backend="cpu")  # short banded rows
        moe = sorted(set(compiled))
        compiled.clear()
        gpr.route(n=300, k=3, backend="cpu")  # square rows
        square = sorted(set(compiled))
        compiled.clear()
        gpr.route_counts(np.full(64, 1100), np.full(1100, 64), k=2, seed=1, backend="cpu")  # long square rows
        print(json.dumps([moe, square, sorted(set(compiled))]))
    """
    res = run_child(code, env={"NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    moe, square, swept = json.loads(res.stdout.strip().splitlines()[-1])
    assert "_short_rows" in moe and "_complete_row" in moe  # the short banded kind ran
    assert "_scan_row" not in moe and "_compact" not in moe and "_banded_rows" not in moe
    assert "_phase_rows" in square and "_scan_row" in square  # the square kind ran
    assert "_complete_row" not in square and "_short_rows" not in square
    assert "_swept_rows" not in square and "_ring_events" not in square
    assert "_swept_rows" in swept and "_swept_scan_row" in swept and "_ring_events" in swept  # the swept kind ran
    assert "_compact" not in swept and "_scan_row" not in swept and "_phase_rows" not in swept


def test_kernel_kinds_have_their_own_cache_files():
    """The kinds of the rows kernel come from one source; each must have its own cache index, or two
    processes compiling different kinds at once can leave an index entry naming the other kind's code."""
    from gpu_phase_router.backends import cpu

    kinds = [cpu._phase_rows, cpu._swept_rows, cpu._banded_rows, cpu._short_rows, cpu._scan_row, cpu._swept_scan_row]
    kinds += [cpu._phase_rows_par, cpu._swept_rows_par, cpu._banded_rows_par, cpu._short_rows_par]
    assert len({k.py_func.__qualname__ for k in kinds}) == len(kinds)
    index = [getattr(getattr(getattr(k, "_cache", None), "_cache_file", None), "_index_name", None) for k in kinds]
    if None not in index:  # Numba's own names for the index files, where this Numba exposes them
        assert len(set(index)) == len(kinds)


# ── 6. cache folders that cannot be written ──────────────────────────────────────────────────────


def test_unwritable_numba_cache_dir_never_caches_into_the_package(tmp_path):
    """``NUMBA_CACHE_DIR`` that cannot be written (here: below a file) must not send the kernels
    to Numba's next locator, the ``__pycache__`` folder of the (writable) package."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "gpu_phase_router", site / "gpu_phase_router", ignore=shutil.ignore_patterns("__pycache__"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = """
        import numpy as np, gpu_phase_router as gpr
        print(gpr.__file__)
        print(int(gpr.route(np.ones(3000), np.linspace(1, 2, 64), k=4, seed=3).sum()))
    """
    env = {
        "NUMBA_CACHE_DIR": str(blocker / "cache"),
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "home" / ".cache"),
        "TMPDIR": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    res = run_child(code, env=env, cwd=site)
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(site) in res.stdout.splitlines()[0], "imported the wrong copy of the package"
    from gpu_phase_router import route

    assert res.stdout.split()[1] == str(int(route(np.ones(3000), np.linspace(1, 2, 64), k=4, seed=3).sum()))
    assert not list((site / "gpu_phase_router").rglob("*.nb[ic]")), "cache files written into the package folder"
    assert res.stderr.count("NUMBA_CACHE_DIR") >= 1, res.stderr  # a warning names the variable


def test_nothing_writable_routes_uncached_with_one_warning(tmp_path):
    """A read-only package, ``$HOME``, ``NUMBA_CACHE_DIR`` and temporary directory (a container with a
    read-only root): the kernels compile and run, uncached, after one warning; no crash."""
    unshare, site, home, tmp, env = _private_install(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    env["CODE"] = (
        "import numpy as np, gpu_phase_router as gpr\n"
        "print(gpr.__file__)\n"
        "print(int(gpr.route(np.ones(3000), np.linspace(1, 2, 64), k=4, seed=3).sum()))\n"
    )
    ro = " && ".join(
        f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"
        for d in (site, home, tmp, cache, Path(tempfile.gettempdir()), Path("/var/tmp"))
        if d.is_dir()
    )
    for numba_cache in (None, str(cache)):
        if numba_cache is not None:
            env["NUMBA_CACHE_DIR"] = numba_cache
        res = subprocess.run(
            [*unshare, "sh", "-c", f'{ro} && cd {home} && exec {sys.executable} -W always -c "$CODE"'],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "site/gpu_phase_router" in res.stdout.splitlines()[0], "imported the wrong copy of the package"
        from gpu_phase_router import route

        assert res.stdout.split()[1] == str(int(route(np.ones(3000), np.linspace(1, 2, 64), k=4, seed=3).sum()))
        assert res.stderr.count("RuntimeWarning") == 1, res.stderr[-3000:]
