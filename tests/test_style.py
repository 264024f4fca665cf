"""The code base stays ruff-clean (config in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_clean():
    out = subprocess.run(["ruff", "check", "stochmm", "tests", "benchmarks", "models"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:]
