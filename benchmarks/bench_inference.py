"""Benchmark: inference (issue 11) — stochmm vs lmerTest / pbkrtest / lme4 in the same run.

Usage::

    python benchmarks/bench_inference.py            # 1,000 bootstrap replicates (≈ 1–2 min with R)
    python benchmarks/bench_inference.py --quick    # 200 replicates
    python benchmarks/bench_inference.py --no-r     # skip R
    python benchmarks/bench_inference.py --coverage # coverage study only: 12 x 5 and 40 x 5 designs, paired
                                                    # (1,000 data sets x 500 bootstrap replicates each,
                                                    #  ~20 min; --nrep / --nboot / --groups 12,40,80)

Rows: Satterthwaite and Kenward-Roger coefficient tables (sleepstudy random slopes; the cake split
plot with 18 fixed effects), profile-likelihood intervals (cbpp Laplace, nAGQ = 25, Poisson nAGQ = 9,
nAGQ = 0 (no lme4 figure: lme4 1.1-31 cannot profile it), sleepstudy), parametric
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
CBPP_POIS = "incidence ~ period + offset(log(size)) + (1 | herd)"


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
g25 <- glmer({CBPP}, cbpp, binomial, nAGQ = 25)
cat("prof_cbpp_agq25=", tm(function() suppressWarnings(confint(g25, method = "profile")), 1), "\\n")
gp9 <- glmer({CBPP_POIS}, cbpp, poisson, nAGQ = 9)
cat("prof_cbpp_pois9=", tm(function() suppressWarnings(confint(gp9, method = "profile")), 1), "\\n")
cat("prof_sleep=", tm(function() suppressWarnings(confint(fs, method = "profile")), 1), "\\n")
t0 <- proc.time()[["elapsed"]]; b <- bootMer(fs, fixef, nsim = {nsim}, seed = 1)
cat("boot_sleep=", proc.time()[["elapsed"]] - t0, "\\n")
t0 <- proc.time()[["elapsed"]]; b <- suppressWarnings(bootMer(gm, fixef, nsim = {nsim}, seed = 1))
cat("boot_cbpp=", proc.time()[["elapsed"]] - t0, "\\n")
"""


def coverage_design(groups: int, per: int = 5, nrep: int = 1000, nboot: int = 500, seed: int = 2026,
                    sd_b: float = 1.0, sigma: float = 1.0) -> dict:
    """Paired coverage of nominal 95 % intervals for the between-group SD on a balanced one-way design
    (``groups`` x ``per``, mean 10, REML fits): the profile interval and the parametric-bootstrap
    percentile interval computed on the SAME simulated data sets, plus profile / Wald intervals of the
    intercept. Returns coverages, their MC SEs, the paired difference and its MC SE (from the paired
    indicators: SE = sd(d) / sqrt(nrep), d = hit_percentile - hit_profile)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    idx = np.repeat(np.arange(groups), per)
    g = idx.astype(str)
    hits = {"sd profile": [], "sd bootstrap percentile": [], "intercept profile": [], "intercept Wald": []}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rep in range(nrep):
            if rep and rep % 100 == 0:
                print(f"  ... {groups} x {per}: {rep}/{nrep} data sets, {time.perf_counter() - t0:.0f} s", flush=True)
            y = 10 + sd_b * rng.standard_normal(groups)[idx] + sigma * rng.standard_normal(idx.size)
            fit = sm.lmer("y ~ 1 + (1 | g)", pd.DataFrame({"y": y, "g": g}))
            pr = fit.confint(method="profile")
            bt = fit.bootstrap(nsim=nboot, seed=int(rng.integers(1 << 31)), progress=False).confint()
            wd = fit.confint()
            sdn = "sd_(Intercept)|g"
            hits["sd profile"].append(pr.loc[sdn].iloc[0] <= sd_b <= pr.loc[sdn].iloc[1])
            hits["sd bootstrap percentile"].append(bt.loc[sdn].iloc[0] <= sd_b <= bt.loc[sdn].iloc[1])
            hits["intercept profile"].append(pr.loc["(Intercept)"].iloc[0] <= 10 <= pr.loc["(Intercept)"].iloc[1])
            hits["intercept Wald"].append(wd.loc["(Intercept)"].iloc[0] <= 10 <= wd.loc["(Intercept)"].iloc[1])
    h = {k: np.asarray(v, dtype=float) for k, v in hits.items()}
    d = h["sd bootstrap percentile"] - h["sd profile"]
    out = {"design": f"{groups} groups x {per}", "nrep": nrep, "nboot": nboot, "seconds": time.perf_counter() - t0,
           "coverage": {k: float(v.mean()) for k, v in h.items()},
           "mcse": {k: float(np.sqrt(v.mean() * (1 - v.mean()) / nrep)) for k, v in h.items()},
           "diff_percentile_minus_profile": float(d.mean()), "diff_mcse": float(d.std(ddof=1) / np.sqrt(nrep)),
           "discordant": {"profile only": int((d < 0).sum()), "percentile only": int((d > 0).sum())}}
    return out


def coverage(nrep: int = 1000, nboot: int = 500, designs: tuple[int, ...] = (12, 40)) -> list[dict]:
    """Coverage study on the small (12 x 5) and the larger (40 x 5) design; prints both."""
    res = []
    for groups in designs:
        r = coverage_design(groups, nrep=nrep, nboot=nboot, seed=2026 + groups)
        res.append(r)
        print(f"coverage of nominal 95 % intervals, {r['design']} (sd_b = sigma = 1, REML), {nrep} simulated "
              f"data sets, {nboot} bootstrap replicates each ({r['seconds']:.0f} s):")
        for k, c in r["coverage"].items():
            print(f"  {k:<28s} {c:.3f}  (MC SE {r['mcse'][k]:.3f})")
        print(f"  paired difference percentile - profile (SD): {r['diff_percentile_minus_profile']:+.3f} "
              f"(paired MC SE {r['diff_mcse']:.3f}; discordant pairs {r['discordant']})")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    tag = "" if designs == (12, 40) else "_" + "_".join(map(str, designs))
    (out / f"bench_inference_coverage{tag}.json").write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--coverage", action="store_true")
    ap.add_argument("--nrep", type=int, default=1000, help="simulated data sets per design (--coverage)")
    ap.add_argument("--nboot", type=int, default=500, help="bootstrap replicates per data set (--coverage)")
    ap.add_argument("--groups", type=str, default="12,40", help="numbers of groups of the designs (--coverage)")
    args = ap.parse_args()
    if args.coverage:
        print(_blas.report())
        coverage(nrep=args.nrep, nboot=args.nboot, designs=tuple(int(g) for g in args.groups.split(",")))
        return
    nsim = 200 if args.quick else 1000
    print(_blas.report())
    sleep = sm.datasets.load("sleepstudy")
    fs = sm.lmer(SLEEP, sleep)
    fc = sm.lmer(CAKE, sm.datasets.load("cake"))
    cbpp = sm.datasets.load("cbpp")
    gm = sm.glmer(CBPP, cbpp)
    g25 = sm.glmer(CBPP, cbpp, nagq=25)
    gp9 = sm.glmer(CBPP_POIS, cbpp, family="poisson", nagq=9)
    g0 = sm.glmer(CBPP, cbpp, nagq=0)

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
        "prof_cbpp_agq25": median_time(lambda: g25.confint(method="profile"), 3),
        "prof_cbpp_pois9": median_time(lambda: gp9.confint(method="profile"), 3),
        "prof_cbpp_nagq0": median_time(lambda: g0.confint(method="profile"), 3),
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
        "prof_cbpp_agq25": ("profile confint, cbpp nAGQ = 25", "prof_cbpp_agq25"),
        "prof_cbpp_pois9": ("profile confint, cbpp Poisson nAGQ = 9", "prof_cbpp_pois9"),
        "prof_cbpp_nagq0": ("profile confint, cbpp nAGQ = 0 (lme4 cannot)", "-"),
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
