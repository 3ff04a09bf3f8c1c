"""The README's Python examples run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _kind(block: str) -> str:
    return "torch" if "import torch" in block else "dask" if "import dask" in block else "use"


def test_readme_has_its_examples():
    assert [_kind(b) for b in BLOCKS] == ["use", "torch", "torch", "torch", "dask"]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[_kind(b) for b in BLOCKS])
def test_readme_example_runs(index, tmp_path):
    if _kind(BLOCKS[index]) == "torch":
        pytest.importorskip("torch", reason="torch not installed: the 'Training with PyTorch' example not run")
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
