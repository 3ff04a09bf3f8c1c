"""benchmarks/gpu_check.sh and its helpers, as far as they can run without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_phase_router.backends.cuda import PHASE_WIDTHS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("env", "install", "tests", "memcheck", "racecheck", "synccheck", "bench", "compile", "nccl")

pytestmark = [pytest.mark.subprocess, pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")]


def _no_gpu_env() -> dict[str, str]:
    """The environment of a machine without a usable GPU (CUDA sees no device)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_without_gpu_prints_one_line_and_exits_0(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=_no_gpu_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0], res.stdout
    assert not out.exists()


def test_gpu_check_dry_run_lists_every_step_and_runs_none(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--dry-run"], env=_no_gpu_env(), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[1].split()[0] for line in steps] == list(STEPS)
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert any(f"compute-sanitizer --tool {tool}" in line and "sanitize_kernels.py" in line for line in steps)
    assert any("pytest" in line for line in steps) and any("bench_cuda.py" in line for line in steps)
    tests = next(line for line in steps if " tests (limit" in line)
    assert " -m gpu " in tests and " -v " in tests  # the GPU cases only, a line per test as it ends
    assert any("--backend nccl" in line and "expert_parallel.py" in line for line in steps)
    limits = [int(line.split("limit ")[1].split()[0]) for line in steps]
    assert sum(limits) <= 480  # the whole check fits in 8 minutes
    kill_after = int(SCRIPT.read_text().split("\nKILL_AFTER=")[1].split()[0])
    assert sum(limits) + kill_after * len(limits) <= 590  # and in one 10-minute device command if every step hangs
    assert not out.exists()


def test_gpu_check_rejects_bad_arguments():
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), "a", "--bogus"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown option" in res.stderr


def test_sanitize_script_discovers_every_kernel():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sanitize_kernels.py"), "--list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    names = set(res.stdout.split())
    expected = {f"gpr_phase_rows_k{w}" for w in PHASE_WIDTHS}  # stamped out by a macro
    expected |= {"gpr_feistel_range", "gpr_popcount_rows", "gpr_pack_ring", "gpr_systematic_rows"}
    assert expected <= names, expected - names


def test_bench_cuda_without_gpu_prints_one_line_and_exits_0():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cuda.py")],
        env=_no_gpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], res.stdout
