"""Installs: ``pip install .``, ``pip install -e .`` and ``pip uninstall`` in any order leave a
working package or none at all, imported from another directory.

Compiled kernels must not be cached inside the installed package folder: pip does not know those
files, leaves the folder behind on ``pip uninstall`` or on a switch to an editable install, and
the empty folder then shadows the real package as a namespace package.

The venv is fresh (``python -m venv --without-pip``) and driven by this interpreter's pip
(``pip --python``); NumPy, Numba, llvmlite and setuptools are linked in from this environment
through a ``.pth`` file, so the test runs offline (``--no-deps --no-build-isolation``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

DEPS = ("numpy", "numpy.libs", "numba", "llvmlite", "llvmlite.libs", "setuptools", "_distutils_hack", "pkg_resources")
PROBE = (
    "import gpu_phase_router as g\n"
    "print(g.__file__)\n"
    "print(int(g.route(n=200, k=2, seed=3, backend='cpu').astype('int64').sum()))\n"
)


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("setuptools")
    base = tmp_path_factory.mktemp("install")
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    outer = Path(sysconfig.get_paths()["purelib"])
    deps = base / "deps"
    deps.mkdir()
    for name in DEPS:
        if (outer / name).exists():
            (deps / name).symlink_to(outer / name)
    for info in outer.glob("setuptools-*.dist-info"):  # its commands are entry points
        (deps / info.name).symlink_to(info)
    site = _site_packages(python)
    (site / "_deps.pth").write_text(f"{deps}\n")  # sorts before setuptools' distutils-precedence.pth
    if (outer / "distutils-precedence.pth").exists():
        shutil.copy2(outer / "distutils-precedence.pth", site)
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "gpu_phase_router", src / "gpu_phase_router", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return dict(python=python, src=src, elsewhere=elsewhere, cache=base / "cache", site=site)


def _env(v: dict[str, Path]) -> dict[str, str]:
    env = {k: val for k, val in os.environ.items() if not k.startswith(("NUMBA_CACHE", "PYTHON", "PIP_"))}
    env.update(XDG_CACHE_HOME=str(v["cache"]), PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _pip(v: dict[str, Path], *args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(v["python"]), "--no-input", "-q", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(v), cwd=v["src"], timeout=300, check=False)
    assert res.returncode == 0, f"{' '.join(args)}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def _probe(v: dict[str, Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(v["python"]), "-c", PROBE],
        capture_output=True,
        text=True,
        env=_env(v),
        cwd=v["elsewhere"],
        timeout=300,
        check=False,
    )


def _assert_works(v: dict[str, Path], where: Path) -> None:
    from gpu_phase_router import route

    res = _probe(v)
    assert res.returncode == 0, res.stderr[-3000:]
    file, total = res.stdout.split()
    assert Path(file).resolve().is_relative_to(where.resolve()), f"imported {file}, expected a file under {where}"
    assert int(total) == int(route(n=200, k=2, seed=3, backend="cpu").astype("int64").sum())
    installed = v["site"] / "gpu_phase_router"
    for folder in (installed, v["src"] / "gpu_phase_router"):
        stray = [p.name for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")] if folder.exists() else []
        assert not stray, f"compiled-kernel cache files inside the package folder {folder}: {stray[:4]}"


def _assert_absent(v: dict[str, Path]) -> None:
    res = _probe(v)
    assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, res.stdout + res.stderr[-2000:]
    assert not (v["site"] / "gpu_phase_router").exists(), "pip uninstall left the package folder behind"


def test_install_editable_reinstall_uninstall_sequence(venv):
    install = ("install", "--no-deps", "--no-build-isolation")
    _pip(venv, *install, ".")
    _assert_works(venv, venv["site"])
    _pip(venv, *install, "-e", ".")
    _assert_works(venv, venv["src"])
    _pip(venv, *install, ".")
    _assert_works(venv, venv["site"])
    _pip(venv, "uninstall", "-y", "gpu_phase_router")
    _assert_absent(venv)
    _pip(venv, *install, "-e", ".")
    _assert_works(venv, venv["src"])
    _pip(venv, "uninstall", "-y", "gpu_phase_router")
    _assert_absent(venv)
    assert list(venv["cache"].rglob("*.nbi")), "the kernels were not cached in the per-user cache folder"
