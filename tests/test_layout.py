"""The package's import graph has no loop and no upward import (benchmarks/bench_layout.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_layout", ROOT / "benchmarks" / "bench_layout.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_layout"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycle_and_no_upward_import():
    bench = _bench()
    graph = bench.import_graph(ROOT / "gpu_phase_router")
    assert "gpu_phase_router._prep" in graph["gpu_phase_router.methods.phase"]  # the graph is read
    assert bench.cycles(graph) == []
    assert bench.upward_imports(graph) == []


def test_checks_can_fail():
    """A planted loop and a planted upward import are found."""
    bench = _bench()
    graph = {
        "gpu_phase_router.api": {"gpu_phase_router.blocks"},
        "gpu_phase_router.blocks": {"gpu_phase_router._prep"},
        "gpu_phase_router._prep": {"gpu_phase_router._keys", "gpu_phase_router.blocks"},
        "gpu_phase_router._keys": set(),
        "gpu_phase_router.methods": {"gpu_phase_router.methods.phase"},
        "gpu_phase_router.methods.phase": {"gpu_phase_router._prep"},
    }
    assert bench.cycles(graph) == [["gpu_phase_router._prep", "gpu_phase_router.blocks"]]
    assert bench.upward_imports(graph) == [("gpu_phase_router._prep", "gpu_phase_router.blocks")]
