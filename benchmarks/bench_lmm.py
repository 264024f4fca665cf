"""Linear mixed models: ours vs lme4 in one run.

    python benchmarks/bench_lmm.py                 # InstEval, sleepstudy, optimizers, scaling 1x-4x
    python benchmarks/bench_lmm.py --scales 1 2 4 8  # the crossed-design scaling up to 8x InstEval

Prints our time, lme4's time (measured now with Rscript when R + lme4 are installed; otherwise
the pinned 2-core timings from tests/reference/), and the ratio lme4/ours.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import _blas  # noqa: E402

_blas.use_native_blas()  # before numpy: these machines' OPENBLAS_* settings are not a user's

import argparse
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import scipy.optimize as so

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import lme4_times, median_time, peak_rss_mb, row  # noqa: E402

R_CODE = r"""
suppressMessages(library(lme4))
tm <- function(f, k) median(replicate(k, system.time(f())[["elapsed"]]))
cat("insteval_ML=", tm(function() lmer(y ~ service * dept + (1 | s) + (1 | d), InstEval, REML = FALSE), 3), "\n")
cat("insteval_REML=", tm(function() lmer(y ~ service * dept + (1 | s) + (1 | d), InstEval, REML = TRUE), 3), "\n")
k <- 50
cat("sleepstudy=", tm(function() for (i in 1:k) lmer(Reaction ~ Days + (Days | Subject), sleepstudy), 3) / k, "\n")
"""


def first_fit_cost() -> tuple[float, float]:
    """Import time and first-fit time in a fresh interpreter (the one-off costs)."""
    code = ("import time; t0=time.perf_counter(); import stochmm as sm; t1=time.perf_counter(); "
            "d=sm.datasets.load('sleepstudy'); t2=time.perf_counter(); "
            "sm.lmer('Reaction ~ Days + (Days | Subject)', d); t3=time.perf_counter(); print(t1-t0, t3-t2)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    a, b = out.stdout.split()
    return float(a), float(b)


def optimizer_comparison() -> pd.DataFrame:
    """BOBYQA (NLopt) vs scipy's COBYQA and L-BFGS-B (finite differences) on the profiled deviance."""
    import stochmm as sm
    from stochmm.deterministic.lmm import ProfiledDeviance
    from stochmm.deterministic.optsummary import minimize_bounded

    cases = [("sleepstudy", "Reaction ~ Days + (Days | Subject)", False),
             ("sleepstudy", "Reaction ~ Days + (Days | Subject)", True),
             ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", False),
             ("pastes", "strength ~ 1 + (1 | batch/cask)", True),
             ("insteval", "y ~ service * dept + (1 | s) + (1 | d)", False)]
    rows = []
    for ds, f, reml in cases:
        m = sm.Model(f, sm.datasets.load(ds))
        bounds = list(zip(m.lower, [None] * len(m.lower)))
        res = {}
        dev = ProfiledDeviance(m, reml)
        t0 = time.perf_counter()
        s = minimize_bounded(dev, m.theta0, m.lower)
        res["BOBYQA"] = (s.feval, s.fmin, time.perf_counter() - t0)
        for meth in ("COBYQA", "L-BFGS-B"):
            dev = ProfiledDeviance(m, reml)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = so.minimize(dev, m.theta0, method=meth,
                                bounds=[(lo if np.isfinite(lo) else None, hi) for lo, hi in bounds])
            res[meth] = (dev.nfev, float(r.fun), time.perf_counter() - t0)
        best = min(v[1] for v in res.values())
        for k, (nf, fv, el) in res.items():
            rows.append({"model": f"{ds} {'REML' if reml else 'ML'}", "optimizer": k, "evaluations": nf,
                         "objective - best": fv - best, "seconds": el})
    return pd.DataFrame(rows)


def start_values() -> pd.DataFrame:
    """Deviance evaluations and time from lme4's start (θ = 1) vs moment estimates (the default for
    unweighted random-intercept models), same optimum."""
    import stochmm as sm

    cases = [("dyestuff", "Yield ~ 1 + (1 | Batch)"), ("pastes", "strength ~ 1 + (1 | batch/cask)"),
             ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
             ("oats", "yield ~ nf * Variety + (1 | Block/Variety)"),
             ("sleepstudy", "Reaction ~ Days + (1 | Subject)"),
             ("insteval", "y ~ service * dept + (1 | s) + (1 | d)")]
    rows = []
    for ds, f in cases:
        d = sm.datasets.load(ds)
        for reml in (True, False):
            out = {}
            for st in ("lme4", "moments"):
                fit = sm.lmer(f, d, reml=reml, start=st)
                t = median_time(lambda st=st, f=f, d=d, reml=reml: sm.lmer(f, d, reml=reml, start=st),
                                repeat=3 if ds == "insteval" else 7,
                                warmup=0)
                out[st] = (fit.optsum.feval, fit.objective, t)
            rows.append({"model": f"{ds} {'REML' if reml else 'ML'}", "evals (lme4 start)": out["lme4"][0],
                         "evals (moments)": out["moments"][0], "objective diff": out["moments"][1] - out["lme4"][1],
                         "time lme4 start (s)": out["lme4"][2], "time moments (s)": out["moments"][2]})
    return pd.DataFrame(rows)


def simulate_crossed(scale: int, seed: int = 1) -> pd.DataFrame:
    """An InstEval-shaped crossed design: 73421·scale ratings, 2972·scale students, 1128·scale lecturers."""
    rng = np.random.default_rng(seed)
    n, ns, nd = 73421 * scale, 2972 * scale, 1128 * scale
    s = rng.integers(0, ns, n)
    # each student rates lecturers from a small pool near them, as in InstEval (sparse s x d pattern)
    d = (s * nd // ns + rng.integers(-20, 21, n)) % nd
    y = 3.2 + 0.33 * rng.normal(size=ns)[s] + 0.51 * rng.normal(size=nd)[d] + 1.18 * rng.normal(size=n)
    return pd.DataFrame({"y": y, "service": pd.Categorical(rng.integers(0, 2, n).astype(str)),
                         "s": pd.Categorical(s), "d": pd.Categorical(d)})


def scaling(scales: list[int]) -> pd.DataFrame:
    import stochmm as sm
    from stochmm.deterministic.lmm import ProfiledDeviance

    rows = []
    for k in scales:
        df = simulate_crossed(k)
        t0 = time.perf_counter()
        m = sm.Model("y ~ service + (1 | s) + (1 | d)", df)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        dev = ProfiledDeviance(m, reml=False)
        t_xprod = time.perf_counter() - t0
        th = np.array([0.28, 0.43])
        per_eval = median_time(lambda dev=dev, th=th: dev(th), repeat=3 if k <= 4 else 2, warmup=1)
        rows.append({"scale": f"{k}x", "n": m.n, "levels s": m.terms[0].nlev, "levels d": m.terms[1].nlev,
                     "nnz(Z_d'Z_s)": dev.system.S_A.nnz, "build (s)": t_build, "cross-products (s)": t_xprod,
                     "per deviance eval (s)": per_eval, "peak RSS (MB)": peak_rss_mb()})
        del dev, m, df
    return pd.DataFrame(rows)


def main() -> None:
    print(_blas.report())
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import stochmm as sm

    print("== one-off costs (fresh interpreter)")
    imp, first = first_fit_cost()
    print(f"import stochmm: {imp:.3f} s;  first sleepstudy fit (formulaic/scipy warm-up): {first:.3f} s")

    ie = sm.datasets.load("insteval")
    sl = sm.datasets.load("sleepstudy")
    f_ie = "y ~ service * dept + (1 | s) + (1 | d)"
    ours = {
        "insteval_ML": median_time(lambda: sm.lmer(f_ie, ie, reml=False), repeat=args.repeat),
        "insteval_REML": median_time(lambda: sm.lmer(f_ie, ie, reml=True), repeat=args.repeat),
        "sleepstudy": median_time(lambda: sm.lmer("Reaction ~ Days + (Days | Subject)", sl), repeat=50, warmup=3),
    }
    rss = peak_rss_mb()
    theirs, how = lme4_times(R_CODE, {"insteval_ML": "insteval_ML", "insteval_REML": "insteval_REML",
                                      "sleepstudy": "sleepstudy_slopes_REML"})
    print(f"\n== whole call, DataFrame -> fitted model (median); lme4: {how}")
    print(f"{'':<44s} {'stochmm':>10s} {'lme4':>10s} {'lme4/ours':>9s}")
    print(row("InstEval ML   y ~ service*dept + (1|s) + (1|d)", ours["insteval_ML"], theirs.get("insteval_ML")))
    print(row("InstEval REML", ours["insteval_REML"], theirs.get("insteval_REML")))
    print(row("sleepstudy REML Reaction ~ Days + (Days|Subject)", ours["sleepstudy"], theirs.get("sleepstudy")))
    print(f"peak resident memory of this process after the InstEval fits: {rss:.0f} MB")

    from stochmm.deterministic.lmm import ProfiledDeviance

    fit = sm.lmer(f_ie, ie, reml=False)
    dev = ProfiledDeviance(fit.model, False)
    dev_time = median_time(lambda: dev(fit.theta), repeat=9)
    print(f"\nInstEval: {fit.optsum.feval} deviance evaluations; {dev_time * 1000:.1f} ms per evaluation "
          f"(cross-products formed once per model)")

    print("\n== optimizer choice on the profiled deviance")
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(optimizer_comparison().to_string(index=False))

    print("\n== start values: lme4's (theta = 1) vs moment estimates")
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(start_values().to_string(index=False))

    print("\n== cost per deviance evaluation vs size (simulated InstEval-shaped crossed designs)")
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(scaling(args.scales).to_string(index=False))


if __name__ == "__main__":
    main()
