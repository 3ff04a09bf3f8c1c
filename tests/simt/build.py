"""Compile the CUDA kernel sources with g++ against ``simt.h`` into a shared library (cached).

The library is rebuilt when the kernel sources, the emulator headers, the compiler or the flags
change; it lives in ``$GPR_SIMT_CACHE`` or a per-user directory under the system temp dir.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADERS = (HERE / "simt.h", HERE / "launch.h")
CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas")
KERNEL_RE = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(')


class CompilerMissing(RuntimeError):
    """No C++ compiler: the emulation tests are skipped with this message."""


def find_cxx() -> str:
    """The C++ compiler: ``$CXX`` or ``g++``."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise CompilerMissing(f"C++ compiler {cxx!r} not found (set CXX); the SIMT emulation tests need g++ >= 9")
    return path


def kernel_names(cxx: str, kernel_files: list[Path], prelude: str = "") -> list[str]:
    """Kernels (``extern "C" __global__`` functions) of the sources, found in their preprocessed text,
    so kernels stamped out by macros are found too."""
    names: list[str] = []
    for path in kernel_files:
        marker = "static int simt_kernel_source_starts_here;"
        unit = f'#include "simt.h"\n{prelude}{marker}\n#include "{path}"\n'
        cmd = [cxx, "-std=c++17", "-E", "-P", "-x", "c++", f"-I{HERE}", "-"]
        res = subprocess.run(cmd, input=unit, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"preprocessing failed:\n{' '.join(cmd)}\n{res.stderr}")
        text = res.stdout.split(marker, 1)[1]
        names += [n for n in KERNEL_RE.findall(text) if n not in names]
    return names


def _cache_dir() -> Path:
    root = os.environ.get("GPR_SIMT_CACHE")
    if root:
        return Path(root)
    return Path(tempfile.gettempdir()) / f"gpr_simt_{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def build(kernel_files: list[Path], *, extra_flags: tuple[str, ...] = (), prelude: str = "") -> Path:
    """Compile ``prelude`` (source text, e.g. the package's generated ``#define`` lines) and then
    ``kernel_files`` (concatenated) into the emulator library; return its path."""
    cxx = find_cxx()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    flags = (*CXXFLAGS, *extra_flags)
    sources = [p.read_bytes() for p in (*HEADERS, *kernel_files)]
    digest = hashlib.sha256()
    for blob in (*sources, prelude.encode(), version.encode(), " ".join(flags).encode(), cxx.encode()):
        digest.update(hashlib.sha256(blob).digest())
    tag = digest.hexdigest()[:16]
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"libgpr_simt_{tag}.so"
    if lib.exists():
        return lib
    names = kernel_names(cxx, kernel_files, prelude)
    if not names:
        raise RuntimeError(f"no kernels found in {kernel_files}")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        unit = Path(tmp) / "emulated.cpp"
        lines = ['#include "simt.h"', prelude]
        lines += [f'#include "{p}"' for p in kernel_files]
        lines.append("static const simt::Entry simt_entries[] = {")
        lines += [f'    simt::make_entry("{n}", &{n}),' for n in names]
        lines.append("};")
        lines.append('#include "launch.h"')
        unit.write_text("\n".join(lines) + "\n")
        tmp_lib = Path(tmp) / lib.name
        cmd = [cxx, *flags, f"-I{HERE}", "-o", str(tmp_lib), str(unit)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")
        os.replace(tmp_lib, lib)  # atomic: concurrent builders agree on the content
    return lib


def load(kernel_files: list[Path], **kwargs) -> ctypes.CDLL:
    """Build (if needed) and load the emulator library for ``kernel_files``."""
    lib = ctypes.CDLL(str(build(kernel_files, **kwargs)))
    lib.simt_launch.restype = ctypes.c_int
    lib.simt_launch.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_ulonglong,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    lib.simt_kernels.restype = ctypes.c_char_p
    return lib
