"""The command-line demo: runs end to end in a subprocess, writes both plots, degrades without
matplotlib, explains its options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _grid import CUPY

import gpu_phase_router as gpr
from gpu_phase_router.__main__ import main

pytestmark = pytest.mark.subprocess
ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["demo", "--experts", "64", "--tokens", "256", "-k", "2", "--repeat", "1"]


def run_cli(args, *, block_matplotlib=False, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "Agg"
    if block_matplotlib:
        code = (
            "import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['gpu-phase-router', *{list(args)!r}]; "
            "runpy.run_module('gpu_phase_router', run_name='__main__')"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "gpu_phase_router", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def table_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in gpr.available_methods() and len(parts) == 8:
            rows[parts[0]] = parts
    return rows


def test_demo_writes_both_plots(tmp_path):
    out = tmp_path / "plots"
    proc = run_cli([*SMALL, "--out", str(out), "--backend", "cpu"])
    assert proc.returncode == 0, proc.stderr
    for name in ("capacity_vs_load.png", "load_capacity_ratio.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert str(out.resolve()) in proc.stdout
    rows = table_rows(proc.stdout)
    assert set(rows) == set(gpr.available_methods())
    # SPEC §11/§12: with no expert above 1/k of the capacity, the systematic router fills every
    # slot and survives headroom >= 1 completely
    assert rows["systematic"][5] == "100.0%" and rows["systematic"][6] == "100.0%"
    survival = {m: float(r[6].rstrip("%")) for m, r in rows.items()}
    assert survival["hash"] < survival["weighted_hash"]


def test_demo_default_out_dir_is_relative(tmp_path):
    proc = run_cli([*SMALL], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "phase_router_demo" / "capacity_vs_load.png").is_file()
    assert (tmp_path / "phase_router_demo" / "load_capacity_ratio.png").is_file()


def test_demo_without_matplotlib_prints_table_and_hint(tmp_path):
    out = tmp_path / "none"
    proc = run_cli([*SMALL, "--out", str(out)], block_matplotlib=True)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'gpu_phase_router[plot]'" in proc.stdout
    assert set(table_rows(proc.stdout)) == set(gpr.available_methods())
    assert not out.exists()


def test_demo_help_explains_options():
    proc = run_cli(["demo", "--help"])
    assert proc.returncode == 0
    for opt in ("--experts", "--tokens", "--k", "--seed", "--headroom", "--out", "--backend"):
        assert opt in proc.stdout
    assert "%%" not in proc.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--k", "65"], ["--experts", "0"]])
def test_demo_rejects_bad_sizes(bad):
    proc = run_cli(["demo", "--experts", "64", "--tokens", "64", *bad])
    assert proc.returncode != 0
    assert re.search(r"--k|--experts", proc.stderr + proc.stdout)


@pytest.mark.skipif(CUPY is not None, reason="a usable GPU is present")
def test_demo_cuda_without_gpu_says_how_to_install():
    proc = run_cli([*SMALL, "--backend", "cuda"])
    assert proc.returncode != 0
    assert "gpu_phase_router[cuda12]" in proc.stderr


@pytest.mark.parametrize(
    "bad, option",
    [
        (["--headroom", "0.5"], "--headroom"),
        (["--headroom", "nan"], "--headroom"),
        (["--headroom", "1e300"], "--headroom"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--tokens", "-3"], "--tokens"),
        (["--repeat", "0"], "--repeat"),
        (["--out", "/proc/nope/x"], "--out"),
        (["--tokens", "2000000000"], "--tokens"),
        (["--experts", "2", "-k", "3"], "--k"),
    ],
)
def test_demo_bad_options_are_usage_errors(bad, option, capsys):
    """Bad values end in argparse's usage error (exit status 2) naming the option, not a traceback."""
    with pytest.raises(SystemExit) as exc:
        main([*SMALL, *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and option in err and "Traceback" not in err


def test_demo_errors_about_several_options_show_the_demo_usage(capsys):
    with pytest.raises(SystemExit):
        main([*SMALL, "--experts", "2", "-k", "3"])
    assert "gpu-phase-router demo: error: argument --k" in capsys.readouterr().err


def test_demo_out_folder_holding_a_folder_named_like_a_plot_is_refused_before_routing(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "capacity_vs_load.png").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([*SMALL, "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "capacity_vs_load.png" in err and "--out" in err
    assert "survival" not in out  # nothing was routed


def test_demo_with_equal_capacities_shows_no_nan(tmp_path):
    """Four experts of the strong profile are all at 1x: the load-capacity correlation is undefined
    and shows as n/a, not nan."""
    proc = run_cli(["demo", "--experts", "4", "--tokens", "200", "--repeat", "1", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["phase"]]
    assert rows and rows[0][4] == "n/a", proc.stdout
    assert "nan" not in proc.stdout
