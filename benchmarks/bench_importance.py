"""Benchmark: importance-sampling likelihoods and Monte Carlo ML (issue 9, §4).

Usage::

    python benchmarks/bench_importance.py            # full run (≈ 5–8 min on 2 cores, with R)
    python benchmarks/bench_importance.py --quick    # fewer seeds and draws
    python benchmarks/bench_importance.py --no-r     # skip timing lme4
    python benchmarks/bench_importance.py --only-mcml   # section 5 only (VerbAgg MC ML vs glmer)

Sections:

1. cbpp, 10,000 draws per level (default proposal: Student-t, df 7, randomised QMC): wall time of the
   first call in the process (imports, Sobol set-up, PIRLS) and the median of later calls; MC SE of −2ℓ.
2. VerbAgg (crossed: id × item), joint proposal from the blocked factor: MC SE of −2ℓ and wall time for
   growing numbers of draws.
3. Efficiency (MC SE × √seconds, smaller is better) of each proposal and variance-reduction choice on cbpp,
   the small-cluster binary model and VerbAgg, from the spread of the estimate over independent seeds
   (the reported MC SE, averaged, alongside: it should match the spread); 3b. for the joint proposal,
   inner draws per level of the first factor and pilot re-centring of the crossed effects, at equal work.
4. Cost against q and n: InstEval-shaped binary data (the InstEval design, simulated 0/1 responses),
   row subsets of growing size: seconds for 200 outer draws (× 8 inner draws per student).
5. Monte Carlo ML on VerbAgg against lme4's glmer (Laplace) in the same run, how far the Laplace
   estimates are from the MC ML ones (in SEs), and how much higher the likelihood is at the MC ML estimates
   (fresh draws common to both points, with its MC SE).

Results are also written to benchmarks/out/bench_importance.json.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import _blas  # noqa: E402

_blas.use_native_blas()  # before numpy: these machines' OPENBLAS_* settings are not a user's

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

ROOT = _Path(__file__).resolve().parent.parent
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
VERB = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"

R_SCRIPT = r"""
suppressPackageStartupMessages(library(lme4))
data(VerbAgg)
f <- function() glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), VerbAgg, binomial)
t0 <- proc.time()[["elapsed"]]; invisible(f()); first <- proc.time()[["elapsed"]] - t0
runs <- vapply(1:3, function(i) { t <- proc.time()[["elapsed"]]; invisible(f()); proc.time()[["elapsed"]] - t }, 0)
cat(sprintf('{"first": %.4f, "median": %.4f}', first, median(runs)))
"""


def small_cluster_model(ncl=300, sd=3.0, seed=11):
    import stochmm as sm

    rng = np.random.default_rng(seed)
    size = rng.integers(2, 4, ncl)
    g = np.repeat(np.arange(ncl), size)
    df = pd.DataFrame({"g": pd.Categorical(g), "x": rng.standard_normal(g.size), "y": 0.0})
    m = sm.Model("y ~ x + (1 | g)", df, family="binomial")
    return m.with_response(m.simulate([-0.5, 1.0], [sd], seed=seed)[:, 0])


def section_cbpp(out: dict) -> None:
    t0 = time.perf_counter()
    import stochmm as sm  # noqa: F401  (import time is part of the first call)

    fit = sm.glmer(CBPP, sm.datasets.load("cbpp"), nagq=25)
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    ll = fit.model.loglik(fit, method="is", draws=10_000, seed=1)
    first = time.perf_counter() - t1
    times, ses, vals = [], [], []
    for s in range(2, 7):
        t = time.perf_counter()
        r = fit.model.loglik(fit, method="is", draws=10_000, seed=s)
        times.append(time.perf_counter() - t)
        ses.append(r.deviance_mcse)
        vals.append(r.deviance)
    print("\n== 1. cbpp at the AGQ-25 estimates, 10,000 draws per herd (t df 7, RQMC) ==")
    print(f"  import + AGQ-25 fit: {t_fit:.2f} s (not part of the IS timing)")
    print(f"  first IS call in the process: {first:.3f} s   (target < 1 s)   -2ℓ = {ll.deviance:.4f}"
          f" ± {ll.deviance_mcse:.4f}")
    print(f"  later calls: median {np.median(times):.3f} s; MC SE of -2ℓ {np.mean(ses):.4f} (target ≤ 0.005);"
          f" spread over 5 seeds {np.std(vals, ddof=1):.4f}; AGQ-25 -2ℓ {fit.objective:.6f}")
    out["cbpp"] = {"first_s": first, "median_s": float(np.median(times)), "mcse_dev": float(np.mean(ses)),
                   "spread_dev": float(np.std(vals, ddof=1)), "agq25_dev": fit.objective,
                   "is_dev": [ll.deviance] + vals}


def section_verbagg(out: dict, quick: bool) -> None:
    import stochmm as sm

    fit = sm.glmer(VERB, sm.datasets.load("VerbAgg"))
    print("\n== 2. VerbAgg joint IS at the Laplace estimates (defaults: t df 7 outer draws of the item effects, "
          "re-centred by 2 pilot rounds; 8 lattice draws per subject given each) ==")
    print(f"  Laplace -2ℓ {fit.objective:.3f}")
    rows = []
    for draws in ([2000, 8000] if quick else [2000, 8000, 32000]):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ll = fit.model.loglik(fit, method="is", draws=draws, seed=draws)
        dt = time.perf_counter() - t
        rows.append({"draws": draws, "seconds": dt, "dev": ll.deviance, "mcse_dev": ll.deviance_mcse,
                     "khat": ll.khat, "ess": ll.ess, "laplace_minus_is": fit.objective - ll.deviance})
    tab = pd.DataFrame(rows)
    print(tab.round(4).to_string(index=False))
    last = rows[-1]
    need = last["draws"] * (last["mcse_dev"] / 0.05) ** 2
    print(f"  draws for MC SE 0.05 (extrapolated from the last row, SE ∝ 1/√draws): {need:,.0f} "
          f"≈ {last['seconds'] * need / last['draws']:.0f} s on this machine (target ≤ 30 s)")
    out["verbagg_joint"] = rows


def _spread(fn, seeds) -> dict:
    vals, ses, ts, ks = [], [], [], []
    for s in seeds:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = fn(s)
        ts.append(time.perf_counter() - t)
        vals.append(r.deviance)
        ses.append(r.deviance_mcse)
        ks.append(r.khat)
    sd = float(np.std(vals, ddof=1))
    sec = float(np.median(ts))
    return {"sd_dev": sd, "mean_mcse_dev": float(np.mean(ses)), "seconds": sec, "efficiency": sd * np.sqrt(sec),
            "khat_max": float(np.max(ks))}


def section_efficiency(out: dict, quick: bool) -> None:
    import stochmm as sm

    print("\n== 3. Efficiency: SD of -2ℓ over seeds × √seconds (smaller is better) ==")
    cb = sm.glmer(CBPP, sm.datasets.load("cbpp"), nagq=25)
    sc = small_cluster_model().fit(method="agq", nagq=25)
    va = sm.glmer(VERB, sm.datasets.load("VerbAgg"))
    choices = [("normal", {}), ("normal", {"antithetic": True}), ("normal", {"qmc": True}),
               ("t", {"df": 7}), ("t", {"df": 7, "antithetic": True}), ("t", {"df": 7, "qmc": True}),
               ("t", {"df": 20, "antithetic": True})]
    rows = []
    for name, fit, draws, nseed in [("cbpp", cb, 10_000, 6 if quick else 12),
                                    ("small clusters", sc, 4000, 4 if quick else 8),
                                    ("VerbAgg (joint)", va, 2000, 3 if quick else 5)]:
        for prop, kw in choices:
            kw2 = {"qmc": False, **kw}
            if name.startswith("VerbAgg") and kw2.get("qmc") and prop == "normal":
                continue
            r = _spread(lambda s, fit=fit, prop=prop, kw2=kw2, draws=draws:
                        fit.model.loglik(fit, "is", draws=draws, seed=1000 + s, proposal=prop, **kw2),
                        range(nseed))
            label = prop + (f" df {kw2['df']}" if "df" in kw2 else "") + (" antithetic" if kw2.get("antithetic") else "") \
                + (" RQMC" if kw2.get("qmc") else "")
            rows.append({"model": name, "draws": draws, "proposal": label, **r})
    tab = pd.DataFrame(rows)
    print(tab.round(5).to_string(index=False))
    out["efficiency"] = rows


def section_joint_choices(out: dict, quick: bool) -> None:
    import stochmm as sm
    from stochmm.stochastic.importance import importance_sample

    print("\n== 3b. VerbAgg joint proposal: inner draws per subject and re-centring (t df 7; ~equal work per row:"
          " outer draws × inner = 8000) ==")
    va = sm.glmer(VERB, sm.datasets.load("VerbAgg"))
    rows = []
    for inner, adapt in [(1, 0), (1, 2), (8, 0), (8, 2)]:
        r = _spread(lambda s, inner=inner, adapt=adapt: importance_sample(
            va.model, va._beta, va.theta, draws=8000 // inner, seed=2000 + s, inner=inner, adapt=adapt, warn=False),
            range(2 if quick else 4))
        rows.append({"inner": inner, "adapt_rounds": adapt, "outer_draws": 8000 // inner, **r})
    print(pd.DataFrame(rows).round(4).to_string(index=False))
    out["joint_choices"] = rows


def section_cost(out: dict, quick: bool) -> None:
    import stochmm as sm

    print("\n== 4. Cost against q and n: InstEval design, simulated binary responses (joint proposal: 200 outer "
          "draws × 8 per student, incl. the pilot rounds) ==")
    ie = sm.datasets.load("InstEval")
    rows = []
    for frac in ([0.1, 0.3] if quick else [0.1, 0.3, 1.0]):
        d = ie.sample(frac=frac, random_state=1) if frac < 1 else ie
        d = d.assign(yb=0.0)
        m = sm.Model("yb ~ service + (1 | s) + (1 | d) + (1 | dept)", d, family="binomial")
        y = m.simulate([0.2, -0.3], [1.0, 0.6, 0.3], seed=2)[:, 0]
        m = m.with_response(y)
        params = {"beta": [0.2, -0.3], "theta": [1.0, 0.6, 0.3]}
        t = time.perf_counter()
        lap = m.loglik(params, "laplace")
        t_lap = time.perf_counter() - t
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ll = m.loglik(params, "is", draws=200, seed=3)
        dt = time.perf_counter() - t
        rows.append({"n": m.n, "q": m.q, "q_first": m.terms[0].q, "q_rest": m.q - m.terms[0].q,
                     "laplace_s": t_lap, "is_200x8_draws_s": dt, "us_per_draw_per_obs": 1e6 * dt / (1600 * m.n),
                     "laplace_minus_is_dev": lap.deviance - ll.deviance, "mcse_dev": ll.deviance_mcse,
                     "khat": ll.khat})
    tab = pd.DataFrame(rows)
    print(tab.round(4).to_string(index=False))
    out["cost"] = rows


def section_mcml(out: dict, quick: bool, use_r: bool) -> None:
    import stochmm as sm

    print("\n== 5. Monte Carlo ML on VerbAgg vs glmer (Laplace) ==")
    print("  (crossed: Gaussian outer draws of the 24 item effects, re-centred; adaptive Gauss-Hermite nodes per "
          "subject given each draw; draws moved along dũ/dφ; trust-region rounds validated with fresh draws)")
    m = sm.Model(VERB, sm.datasets.load("VerbAgg"), family="binomial")
    t = time.perf_counter()
    lap = m.fit()
    t_lap = time.perf_counter() - t
    draws = 300 if quick else 1000
    up0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        fi = m.fit(method="is", draws=draws, seed=1, start=lap, eval_draws=2000 if quick else 8000)
    t_is = time.perf_counter() - t
    names = list(fi.se_all.index)
    phi_l = np.concatenate([lap.theta, lap._beta])
    phi_i = np.concatenate([fi.theta, fi._beta])
    tab = pd.DataFrame({"Laplace": phi_l, "MC ML": phi_i, "SE": fi.se_all.to_numpy(), "MC SE": fi.mc_se.to_numpy(),
                        "(MCML - Laplace)/SE": (phi_i - phi_l) / fi.se_all.to_numpy(),
                        "MC SE/SE": fi.mc_se_ratio.to_numpy()}, index=names)
    print(tab.round(5).to_string())
    print("  rounds (fresh-draw validation of each step):")
    print(fi.trust_rounds.round(5).to_string(index=False))
    g = fi.loglik_gain
    gi = fi.loglik_gain_is
    print(f"  -2ℓ(MC ML) - (-2ℓ(Laplace estimates)), fresh outer draws common to both points "
          f"({fi.loglik_is.draws}):\n"
          f"    with adaptive quadrature per subject: {-2 * g['gain']:+.4f} ± {2 * g['mcse']:.4f}  "
          f"({g['gain'] / g['mcse']:.1f} MC SE)\n"
          f"    all Monte Carlo (8 lattice draws per subject, unbiased): {-2 * gi['gain']:+.4f} ± {2 * gi['mcse']:.4f}"
          f"  ({gi['gain'] / gi['mcse']:.1f} MC SE)")
    print(f"  -2ℓ at the MC ML estimates (independent IS, {fi.loglik_is.draws} draws): {fi.loglik_is.deviance:.3f} ± "
          f"{fi.loglik_is.deviance_mcse:.3f}; at the Laplace estimates {fi.loglik_start.deviance:.3f} ± "
          f"{fi.loglik_start.deviance_mcse:.3f}; Laplace's own -2ℓ {lap.objective:.3f}")
    print(f"  rounds {fi.timing['rounds']}, objective evaluations {fi.timing['evaluations']}; warnings: "
          + ("; ".join(str(w.message)[:120] for w in wlist if "Monte Carlo" in str(w.message)) or "none"))
    r_times, how = None, "lme4 not timed (--no-r or no Rscript)"
    if use_r and shutil.which("Rscript"):
        with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
            fh.write(R_SCRIPT)
        res = subprocess.run(["Rscript", fh.name], capture_output=True, text=True, timeout=900)
        os.unlink(fh.name)
        if res.returncode == 0:
            r_times, how = json.loads(res.stdout), "lme4 1.1-31 timed by Rscript in this run"
    print(f"  wall time: stochmm MC ML ({draws} joint draws) {t_is:.1f} s; stochmm Laplace {t_lap:.2f} s; "
          + (f"glmer Laplace {r_times['median']:.2f} s (first {r_times['first']:.2f} s); "
             f"ratio MC ML / glmer = {t_is / r_times['median']:.0f}" if r_times else "") + f"  [{how}]")
    print(f"  load before the MC ML fit: {up0}")
    out["mcml_verbagg"] = {"draws": draws, "seconds": t_is, "laplace_s": t_lap, "glmer": r_times,
                           "table": tab.reset_index().to_dict(orient="records"),
                           "gain_loglik": float(g["gain"]), "gain_mcse": float(g["mcse"]),
                           "gain_loglik_is": float(gi["gain"]), "gain_mcse_is": float(gi["mcse"]),
                           "is_dev": fi.loglik_is.deviance, "is_mcse_dev": fi.loglik_is.deviance_mcse,
                           "rounds": fi.trust_rounds.to_dict(orient="records"), "uptime": up0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--only-mcml", action="store_true", help="run section 5 only")
    args = ap.parse_args()
    print(_blas.report())
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    out: dict = {}
    if args.only_mcml:
        section_mcml(out, args.quick, not args.no_r)
        print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        return
    section_cbpp(out)
    section_verbagg(out, args.quick)
    section_efficiency(out, args.quick)
    section_joint_choices(out, args.quick)
    section_cost(out, args.quick)
    section_mcml(out, args.quick, not args.no_r)
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "bench_importance.json").write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
