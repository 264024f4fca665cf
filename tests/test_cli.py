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
    # issue 8, 3.10: every coefficient table in lme4's layout, one missing marker
    assert "None" not in out.stdout
    assert "btypeshout  -2.10540    0.25947  -8.114 4.88e-16" in out.stdout


def test_subpackages_load_lazily_as_the_readme_uses_them():
    """issue 8, 3.3: `stochmm.plots.caterpillar(fit)` right after `import stochmm`."""
    code = ("import stochmm, sys; assert 'stochmm.plots' not in sys.modules; "
            "print(stochmm.plots.caterpillar.__name__, stochmm.moments.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["caterpillar", "stochmm.moments"]


def test_progress_bars_stay_out_of_logs():
    """issue 8, 3.10: no tqdm carriage returns when stderr is not a terminal; progress=False switches them off."""
    code = ("import stochmm as sm; d = sm.datasets.load('dyestuff'); "
            "sm.mom('Yield ~ 1 + (1 | Batch)', d, se='bootstrap', nboot=50, seed=1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "bootstrap" not in out.stderr
