"""Benchmark: inference (issue 11) — stochmm vs lmerTest / pbkrtest / lme4 in the same run.

Usage::

    python benchmarks/bench_inference.py            # 1,000 bootstrap replicates (≈ 1–2 min with R)
    python benchmarks/bench_inference.py --quick    # 200 replicates
    python benchmarks/bench_inference.py --no-r     # skip R
    python benchmarks/bench_inference.py --coverage # coverage study only (no timing)

Rows: Satterthwaite and Kenward-Roger coefficient tables (sleepstudy random slopes; the cake split
plot with 18 fixed effects), profile-likelihood intervals (cbpp Laplace, sleepstudy), parametric
bootstraps of sleepstudy (Days | Subject) and cbpp Laplace with 1 and 2 processes against lme4's
``bootMer`` (serial) on the same number of replicates. Times: median of 3 runs for the quick rows,
one run for the bootstraps. Results are also written to benchmarks/out/bench_inference.json.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import _blas  # noqa: E402

_blas.use_native_blas()  # before numpy

import argparse
import json
import time
import warnings
from pathlib import Path

from _common import median_time, r_available, row, run_r

import stochmm as sm

ROOT = Path(__file__).resolve().parents[1]
SLEEP = "Reaction ~ Days + (Days | Subject)"
CAKE = "angle ~ recipe * temperature + (1 | recipe:replicate)"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


def r_code(nsim: int) -> str:
    return f"""
suppressMessages({{library(lme4); library(lmerTest); library(pbkrtest)}})
tm <- function(expr, k = 3) {{ t <- numeric(k); for (i in 1:k) {{ t0 <- proc.time()[["elapsed"]]; force(expr());
  t[i] <- proc.time()[["elapsed"]] - t0 }}; median(t) }}
data(cake, package = "lme4")
fs <- lme4::lmer({SLEEP}, sleepstudy); fc <- lme4::lmer({CAKE}, cake)
cat("satt_sleep=", tm(function() summary(as_lmerModLmerTest(fs), ddf = "Satterthwaite")), "\\n")
cat("kr_sleep=", tm(function() summary(as_lmerModLmerTest(fs), ddf = "Kenward-Roger")), "\\n")
cat("satt_cake=", tm(function() summary(as_lmerModLmerTest(fc), ddf = "Satterthwaite")), "\\n")
cat("kr_cake=", tm(function() summary(as_lmerModLmerTest(fc), ddf = "Kenward-Roger")), "\\n")
gm <- glmer({CBPP}, cbpp, binomial)
cat("prof_cbpp=", tm(function() suppressWarnings(confint(gm, method = "profile")), 1), "\\n")
cat("prof_sleep=", tm(function() suppressWarnings(confint(fs, method = "profile")), 1), "\\n")
t0 <- proc.time()[["elapsed"]]; b <- bootMer(fs, fixef, nsim = {nsim}, seed = 1)
cat("boot_sleep=", proc.time()[["elapsed"]] - t0, "\\n")
t0 <- proc.time()[["elapsed"]]; b <- suppressWarnings(bootMer(gm, fixef, nsim = {nsim}, seed = 1))
cat("boot_cbpp=", proc.time()[["elapsed"]] - t0, "\\n")
"""


def coverage(nrep: int = 200, nboot: int = 200, seed: int = 2026) -> None:
    """Coverage of 95 % intervals for the between-group SD on a simulated balanced one-way design
    (12 groups x 5, sigma_b = 1, sigma = 1, REML): profile vs bootstrap percentile vs Wald-on-beta
    for the intercept. Prints the coverages with their Monte Carlo SEs."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(12), 5).astype(str)
    hits = {"sd profile": [], "sd bootstrap percentile": [], "intercept profile": [], "intercept Wald": []}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(nrep):
            y = 10 + rng.standard_normal(12)[np.repeat(np.arange(12), 5)] + rng.standard_normal(60)
            fit = sm.lmer("y ~ 1 + (1 | g)", pd.DataFrame({"y": y, "g": g}))
            pr = fit.confint(method="profile")
            bt = fit.bootstrap(nsim=nboot, seed=int(rng.integers(1 << 31)), progress=False).confint()
            wd = fit.confint()
            hits["sd profile"].append(pr.iloc[0, 0] <= 1 <= pr.iloc[0, 1])
            hits["sd bootstrap percentile"].append(bt.iloc[1, 0] <= 1 <= bt.iloc[1, 1])
            hits["intercept profile"].append(pr.iloc[2, 0] <= 10 <= pr.iloc[2, 1])
            hits["intercept Wald"].append(wd.iloc[0, 0] <= 10 <= wd.iloc[0, 1])
    print(f"coverage of nominal 95 % intervals, {nrep} simulated data sets ({time.perf_counter() - t0:.0f} s):")
    for k, v in hits.items():
        c = float(np.mean(v))
        print(f"  {k:<28s} {c:.3f}  (MC SE {np.sqrt(c * (1 - c) / nrep):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--coverage", action="store_true")
    args = ap.parse_args()
    if args.coverage:
        coverage()
        return
    nsim = 200 if args.quick else 1000
    print(_blas.report())
    sleep = sm.datasets.load("sleepstudy")
    fs = sm.lmer(SLEEP, sleep)
    fc = sm.lmer(CAKE, sm.datasets.load("cake"))
    gm = sm.glmer(CBPP, sm.datasets.load("cbpp"))

    def fresh(fit, ddf):
        def run():
            fit.__dict__.pop("_inference_cache", None)
            return fit.coef_table(ddf=ddf)
        return run

    ours = {
        "satt_sleep": median_time(fresh(fs, "satterthwaite"), 3),
        "kr_sleep": median_time(fresh(fs, "kenward-roger"), 3),
        "satt_cake": median_time(fresh(fc, "satterthwaite"), 3),
        "kr_cake": median_time(fresh(fc, "kenward-roger"), 3),
        "prof_cbpp": median_time(lambda: gm.confint(method="profile"), 3),
        "prof_sleep": median_time(lambda: fs.confint(method="profile"), 3),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, fit in (("sleep", fs), ("cbpp", gm)):
            for jobs in (1, 2):
                t0 = time.perf_counter()
                fit.bootstrap(nsim=nsim, seed=1, progress=False, n_jobs=jobs)
                ours[f"boot_{label}" + ("" if jobs == 1 else "_2proc")] = time.perf_counter() - t0
    theirs: dict[str, float] = {}
    source = "R skipped (--no-r)"
    if not args.no_r and r_available():
        theirs = run_r(r_code(nsim), timeout=3600)
        source = "measured now with Rscript (lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2)"
    print(f"peer times: {source}")
    print(f"{'':<44s} {'stochmm':>10s} {'R':>10s} {'R/ours':>9s}")
    labels = {
        "satt_sleep": ("Satterthwaite table, sleepstudy", "satt_sleep"),
        "kr_sleep": ("Kenward-Roger table, sleepstudy", "kr_sleep"),
        "satt_cake": ("Satterthwaite table, cake (p = 18)", "satt_cake"),
        "kr_cake": ("Kenward-Roger table, cake (p = 18)", "kr_cake"),
        "prof_cbpp": ("profile confint, cbpp Laplace", "prof_cbpp"),
        "prof_sleep": ("profile confint, sleepstudy REML", "prof_sleep"),
        "boot_sleep": (f"parametric bootstrap {nsim}x, sleepstudy, 1 proc", "boot_sleep"),
        "boot_sleep_2proc": (f"parametric bootstrap {nsim}x, sleepstudy, 2 procs", "boot_sleep"),
        "boot_cbpp": (f"parametric bootstrap {nsim}x, cbpp Laplace, 1 proc", "boot_cbpp"),
        "boot_cbpp_2proc": (f"parametric bootstrap {nsim}x, cbpp Laplace, 2 procs", "boot_cbpp"),
    }
    for k, (name, rk) in labels.items():
        print(row(name, ours[k], theirs.get(rk)))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_inference.json").write_text(json.dumps({"nsim": nsim, "stochmm": ours, "R": theirs,
                                                         "R_source": source}, indent=1))


if __name__ == "__main__":
    main()
