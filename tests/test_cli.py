"""The command line: `stochmm validate` and `stochmm demo`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, "-m", "stochmm.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_validate_subset_prints_differences():
    out = run("validate", "dyestuff_ML", "sleepstudy_slopes_REML")
    assert out.returncode == 0, out.stderr
    assert "ok   dyestuff_ML" in out.stdout and "ok   sleepstudy_slopes_REML" in out.stdout
    assert "2 passed, 0 failed" in out.stdout
    assert "lme4 1.1-31" in out.stdout


def test_demo_fits_real_models():
    out = run("demo")
    assert out.returncode == 0, out.stderr
    for piece in ["Linear mixed model fit by REML ['lmerMod']", "REML criterion at convergence: 1743.6",
                  "boundary (singular) fit", "InstEval", "Number of obs: 73421, groups:  s, 2972, d, 1128",
                  "(Laplace Approximation) ['glmerMod']", "VerbAgg", "σ² + 4·σ²(Variety:Block) + 12·σ²(Block)"]:
        assert piece in out.stdout, piece
    assert "FAIL" not in out.stdout
