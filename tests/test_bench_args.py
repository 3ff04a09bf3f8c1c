"""The benchmark scripts reject bad arguments up front (benchmarks/_args.py).

A zero or negative count, size, seed number, step count or round count, a missing binary or a
``--plot-only`` without its JSON is a usage error: exit status 2, one ``error:`` line naming the
option, no traceback, and nothing written (every output option points into a temporary folder,
which stays empty). The GPU-only modes print one line and exit 0 on a machine without CuPy or a
GPU, as ``bench_cuda.py`` does.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.subprocess

_torch = [
    pytest.mark.torch,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the script imports torch"),
]


def _case(script: str, bad: list[str], option: str, outs: dict[str, str], torch: bool = False):
    """``outs``: the script's output options, each pointed at a name inside the temporary folder."""
    name = f"{script.removesuffix('.py')} {' '.join(bad)}"
    return pytest.param(script, bad, option, outs, id=name, marks=_torch if torch else ())


DIR = {"--out": "out"}
CASES = [
    _case("bench_moe.py", ["--seeds", "0"], "--seeds", DIR),
    _case("bench_moe.py", ["--seeds", "x"], "--seeds", DIR),
    _case("bench_moe.py", ["--plot-only"], "--plot-only", DIR),
    _case("bench_moe_shapes.py", ["--seeds", "0", "--quick", "--no-extras"], "--seeds", DIR),
    _case("bench_cost_model.py", ["--sizes", "0"], "--sizes", {"--out": "cm.json", "--plot": "cm.png"}),
    _case("bench_cost_model.py", ["--densities", "0"], "--densities", {"--out": "cm.json", "--plot": "cm.png"}),
    _case("bench_cost_model.py", ["--sizes", "1", "--k", "2"], "--k", {"--out": "cm.json", "--plot": "cm.png"}),
    _case("bench_threads.py", ["--rounds", "0"], "--rounds", {"--out": "threads.json"}),
    _case("bench_seed_exact.py", ["--seed-binary", "/nonexistent"], "--seed-binary", {"--out": "se.json"}),
    _case("bench_seed_exact.py", ["--n", "4096,0"], "--n", {"--out": "se.json"}),
    _case("bench_cpu.py", ["--calls", "0"], "--calls", {"--out": "cpu.json"}),
    _case("bench_cpu.py", ["--seed-binary", "/nonexistent"], "--seed-binary", {"--out": "cpu.json"}),
    _case("bench_scale.py", ["--sizes", "0"], "--sizes", {"--json": "scale.json"}),
    _case("bench_layout.py", ["--threads", "-1"], "--threads", DIR),
    _case("bench_runtime.py", ["--repeat", "0"], "--repeat", {"--out": "runtime.json"}),
    _case("bench_cuda.py", ["--density", "0"], "--density", {"--out": "cuda.json", "--md": "cuda.md"}),
    _case("bench_expert_parallel.py", ["--tokens", "0"], "--tokens", DIR),
    # scripts that import torch (about 2-3 s each to start)
    _case("bench_training.py", ["--steps", "0"], "--steps", {"--out": "out", "--md": "t.md"}, torch=True),
    _case("bench_training.py", ["--plot-only"], "--plot-only", {"--out": "out", "--md": "t.md"}, torch=True),
    _case("bench_char_lm.py", ["--seeds", "-1"], "--seeds", {"--out": "out", "--md": "t.md"}, torch=True),
    _case("bench_learned_router.py", ["--tokens", "0"], "--tokens", {"--out": "lr.json"}, torch=True),
    _case("bench_packed.py", ["--tokens", "0", "--quick"], "--tokens", DIR, torch=True),
]


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


@pytest.mark.parametrize("script, bad, option, outs", CASES)
def test_bad_argument_is_a_usage_error(tmp_path, script, bad, option, outs):
    argv = [sys.executable, str(BENCH / script), *bad]
    for flag, name in outs.items():
        argv += [flag, str(tmp_path / name)]
    res = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "usage:" in res.stderr and "Traceback" not in res.stderr, res.stderr
    error = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and option in error[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written"


@pytest.mark.parametrize(
    "script, argv",
    [
        ("bench_seed_exact.py", ["--cuda"]),
        ("sanitize_kernels.py", []),
    ],
)
def test_gpu_modes_without_gpu_print_one_line_and_exit_0(tmp_path, script, argv):
    """As bench_cuda.py (tests/test_gpu_check.py): CUDA sees no device, so one line and exit 0."""
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(
        [sys.executable, str(BENCH / script), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], res.stdout
    assert "Traceback" not in res.stderr, res.stderr


def _load_args():
    spec = importlib.util.spec_from_file_location("_args", BENCH / "_args.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_helpers_accept_good_values_and_say_what_is_wrong():
    a = _load_args()
    assert a.positive_int("3") == 3 and a.nonnegative_int("0") == 0
    assert a.positive_count("1e6") == 1_000_000 and a.positive_int_list("4096, 16384") == [4096, 16384]
    assert a.fraction("1") == 1.0 and a.nonnegative_float("0") == 0.0 and a.positive_float("1e-3") == 1e-3
    assert a.int_range(1, 16)("16") == 16
    assert a.executable_file(sys.executable) == sys.executable
    for fn, text, words in [
        (a.positive_int, "0", ">= 1"),
        (a.positive_int, "1.5", "integer"),
        (a.nonnegative_int, "-1", ">= 0"),
        (a.positive_count, "0.5", ">= 1"),
        (a.positive_count, "1.5", "whole number"),
        (a.positive_int_list, "2,,8", "comma-separated"),
        (a.fraction, "1.5", "(0, 1]"),
        (a.positive_float, "inf", "finite"),
        (a.nonnegative_float, "nan", "finite"),
        (a.int_range(1, 16), "17", "between 1 and 16"),
        (a.existing_file, str(BENCH), "no such file"),
        (a.existing_dir, "/nonexistent", "no such directory"),
        (a.executable_file, "/nonexistent", "no such file"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(words)):
            fn(text)
