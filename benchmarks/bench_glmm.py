"""Benchmark: GLMM fits (stochmm vs lme4's glmer in the same run), per-evaluation and
per-PIRLS-iteration costs, and how adaptive quadrature scales with nodes and dimension.

Usage::

    python benchmarks/bench_glmm.py            # full run (≈ 1–2 min with R)
    python benchmarks/bench_glmm.py --quick    # fewer repetitions
    python benchmarks/bench_glmm.py --no-r     # skip R; print lme4's pinned times instead

Timing follows the lme4 reference files: each fit is repeated k times per timed run (k chosen
so a run takes ≥ 0.3 s), the reported time is the median over 5 runs of (run time)/k, and the
first fit in the process (imports, caches) is reported separately. lme4 1.1-31 is timed by
Rscript in the same run when ``Rscript`` and lme4 are available; otherwise the times pinned in
tests/reference/lme4_results.json (same machine class: 2 cores) are printed and labelled so.
Results are also written to benchmarks/out/bench_glmm.json.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import _blas  # noqa: E402

_blas.use_native_blas()  # before numpy: these machines' OPENBLAS_* settings are not a user's

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import stochmm as sm
from stochmm.deterministic.glmm import glmm_engine
from stochmm.deterministic.pirls import blas_threads
from stochmm.deterministic.quadrature import agq, make_rule, tensor_rule

ROOT = Path(__file__).resolve().parents[1]
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
POIS = "incidence ~ period + offset(log(size)) + (1 | herd)"
VERB = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"

# (label, dataset, formula, family, nAGQ, lme4 reference id for pinned times, target speed-up)
MODELS = [
    ("VerbAgg Laplace", "VerbAgg", VERB, "binomial", 1, "verbagg_agq1", 4.0),
    ("VerbAgg nAGQ=0", "VerbAgg", VERB, "binomial", 0, "verbagg_agq0", 4.0),
    ("cbpp nAGQ=25", "cbpp", CBPP, "binomial", 25, "cbpp_agq25", 4.0),
    ("cbpp Laplace", "cbpp", CBPP, "binomial", 1, "cbpp_agq1", None),
    ("cbpp nAGQ=0", "cbpp", CBPP, "binomial", 0, "cbpp_agq0", None),
    ("cbpp Poisson Laplace", "cbpp", POIS, "poisson", 1, "cbpp_pois_agq1", None),
]

R_SCRIPT = r"""
suppressPackageStartupMessages(library(lme4))
data(cbpp); data(VerbAgg)
quick <- as.logical(commandArgs(trailingOnly = TRUE)[1])
time_fit <- function(f, n_runs = if (quick) 3 else 5, target = if (quick) 0.15 else 0.3) {
  t0 <- proc.time()[["elapsed"]]; f(); first <- proc.time()[["elapsed"]] - t0
  t0 <- proc.time()[["elapsed"]]; f(); second <- proc.time()[["elapsed"]] - t0
  k <- max(1L, as.integer(ceiling(target / max(second, 1e-3))))
  runs <- vapply(seq_len(n_runs), function(i) {
    t <- proc.time()[["elapsed"]]; for (j in seq_len(k)) f(); (proc.time()[["elapsed"]] - t) / k }, 0)
  c(median = median(runs), first = first, k = k)
}
fits <- list(
  "VerbAgg Laplace" = function() glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), VerbAgg, binomial),
  "VerbAgg nAGQ=0" = function() glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), VerbAgg, binomial, nAGQ = 0),
  "cbpp nAGQ=25" = function() glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, nAGQ = 25),
  "cbpp Laplace" = function() glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial),
  "cbpp nAGQ=0" = function() glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, nAGQ = 0),
  "cbpp Poisson Laplace" = function() glmer(incidence ~ period + offset(log(size)) + (1 | herd), cbpp, poisson))
out <- lapply(fits, function(f) suppressWarnings(suppressMessages(time_fit(f))))
cat(jsonlite::toJSON(lapply(out, as.list), auto_unbox = TRUE, digits = 8))
"""


def time_fit(fn, quick: bool) -> dict:
    """Median seconds per fit over timed runs (lme4's protocol), plus the first fit."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    second = time.perf_counter() - t0
    target = 0.15 if quick else 0.3
    k = max(1, int(np.ceil(target / max(second, 1e-4))))
    runs = []
    for _ in range(3 if quick else 5):
        t = time.perf_counter()
        for _ in range(k):
            fn()
        runs.append((time.perf_counter() - t) / k)
    return {"median": float(np.median(runs)), "first": first, "k": k}


def lme4_times(quick: bool, use_r: bool) -> tuple[dict, str]:
    if use_r and shutil.which("Rscript"):
        ok = subprocess.run(["Rscript", "-e", "quit(status = !requireNamespace('lme4', quietly = TRUE))"],
                            capture_output=True).returncode == 0
        if ok:
            with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
                fh.write(R_SCRIPT)
            res = subprocess.run(["Rscript", fh.name, str(quick).upper()], capture_output=True, text=True, timeout=900)
            if res.returncode == 0:
                return json.loads(res.stdout), "lme4 timed by Rscript in this run"
            print("Rscript failed:\n" + res.stderr[-2000:], file=sys.stderr)
    ref = {}
    for name in ("lme4_results.json", "lme4_extra_results.json"):
        ref.update({e["id"]: e["results"] for e in json.loads((ROOT / "tests/reference" / name).read_text())})
    pinned = {label: {"median": ref[rid]["elapsed_median_s"], "first": ref[rid]["elapsed_first_fit_s"], "k": None}
              for label, _, _, _, _, rid, _ in MODELS}
    return pinned, "lme4 NOT run here (no Rscript/lme4): pinned times from tests/reference (2-core machine)"


def fits_table(quick: bool, use_r: bool) -> dict:
    data = {"cbpp": sm.datasets.load("cbpp"), "VerbAgg": sm.datasets.load("VerbAgg")}
    ours = {}
    stats = {}
    for label, ds, form, fam, nq, _, _ in MODELS:
        def fn(ds=ds, form=form, fam=fam, nq=nq):
            return sm.glmer(form, data[ds], family=fam, nagq=nq)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours[label] = time_fit(fn, quick)
            fit = fn()
        t0 = time.perf_counter()
        sm.Model(form, data[ds], family=fam)
        build = time.perf_counter() - t0
        stats[label] = {**fit.timing, "model_build_s": build, "objective": fit.objective}
    lme, how = lme4_times(quick, use_r)
    print(f"\n== Fits: stochmm vs lme4 1.1-31 glmer ({how}) ==")
    print(f"{'model':22s} {'stochmm':>10s} {'lme4':>10s} {'ratio':>7s} {'target':>7s}   "
          f"{'first fit':>9s} {'Model()':>8s} {'evals':>5s} {'PIRLS it':>8s}")
    rows = {}
    for label, *_, target in MODELS:
        o, r = ours[label], lme.get(label)
        ratio = r["median"] / o["median"] if r else float("nan")
        st = stats[label]
        tgt = f"≥{target:.0f}×" if target else ""
        print(f"{label:22s} {o['median'] * 1e3:8.1f}ms {r['median'] * 1e3:8.1f}ms {ratio:6.1f}× {tgt:>7s}   "
              f"{o['first'] * 1e3:7.1f}ms {st['model_build_s'] * 1e3:6.1f}ms {st['evaluations']:5d} "
              f"{st['pirls_iterations']:8d}")
        rows[label] = {"stochmm_s": o["median"], "stochmm_first_fit_s": o["first"], "lme4_s": r["median"],
                       "lme4_first_fit_s": r["first"], "speedup": ratio, "target": target, **st}
    return {"lme4_source": how, "fits": rows}


def eval_costs(quick: bool) -> dict:
    """Cost of one objective evaluation (PIRLS to convergence + value), with the exact gradient,
    and of one PIRLS iteration, at the optimum and after a small parameter change."""
    print("\n== Cost per objective evaluation and per PIRLS iteration (at the optimum, warm PIRLS) ==")
    data = {"cbpp": sm.datasets.load("cbpp"), "VerbAgg": sm.datasets.load("VerbAgg")}
    out = {}
    reps = 20 if quick else 60
    for label, ds, form, fam, nq in [("VerbAgg Laplace", "VerbAgg", VERB, "binomial", 1),
                                     ("VerbAgg nAGQ=0", "VerbAgg", VERB, "binomial", 0),
                                     ("cbpp Laplace", "cbpp", CBPP, "binomial", 1),
                                     ("cbpp nAGQ=25", "cbpp", CBPP, "binomial", 25)]:
        fit = sm.glmer(form, data[ds], family=fam, nagq=nq)
        eng = glmm_engine(fit.model)
        th, be = fit.theta, fit.fixef.to_numpy()
        rule = tensor_rule(nq, 1) if nq > 1 else None
        with blas_threads(1):
            def value(d, th=th, be=be, eng=eng, rule=rule, nq=nq):
                t = th * (1 + d)
                if nq == 0:
                    return eng.fast(t)
                return agq(eng, t, be, rule)[0] if rule else eng.laplace(t, be)[0]

            def grad(d, th=th, be=be, eng=eng, rule=rule, nq=nq):
                t = th * (1 + d)
                if nq == 0:
                    return eng.fast_grad(t)
                return agq(eng, t, be, rule, grad=True) if rule else eng.laplace(t, be, grad=True)

            value(0.0)
            t0 = time.perf_counter()
            for i in range(reps):
                value(1e-3 * (i % 5))
            t_val = (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for i in range(reps):
                grad(1e-3 * (i % 5))
            t_grad = (time.perf_counter() - t0) / reps
            # one PIRLS iteration: cold starts (u = 0) at the optimum, total time / iterations
            n0, s0 = eng.n_pirls, eng.t_pirls
            for _ in range(max(3, reps // 10)):
                if nq == 0:
                    eng._u_j[:] = 0.0
                    eng.pirls_joint(th)
                else:
                    eng.pirls(th, be, u0=np.zeros_like(eng._u))
            per_it = (eng.t_pirls - s0) / max(1, eng.n_pirls - n0)
        out[label] = {"eval_s": t_val, "eval_grad_s": t_grad, "pirls_iteration_s": per_it,
                      "engine": type(eng).__name__, "q": fit.model.q, "n": fit.model.n}
        print(f"{label:18s} [{type(eng).__name__:13s} n={fit.model.n:5d} q={fit.model.q:3d}]  value {t_val * 1e6:8.0f} µs"
              f"   value+gradient {t_grad * 1e6:8.0f} µs   PIRLS iteration {per_it * 1e6:7.0f} µs")
    return out


def agq_scaling(quick: bool) -> dict:
    """AGQ cost versus nodes per dimension and random-effect dimension k (nodes = nAGQ^k)."""
    print("\n== Adaptive quadrature: cost vs nodes and dimension (value + exact gradient per evaluation) ==")
    out = {}
    rng = np.random.default_rng(2024)
    G, npg = 200, 10
    g = np.repeat(np.arange(G), npg)
    x1, x2 = rng.normal(size=G * npg), rng.normal(size=G * npg)
    b = rng.normal(size=(G, 3)) * [0.8, 0.4, 0.3]
    eta = -0.3 + 0.5 * x1 - 0.4 * x2 + b[g, 0] + b[g, 1] * x1 + b[g, 2] * x2
    df = pd.DataFrame(dict(y=rng.binomial(1, 1 / (1 + np.exp(-eta))), x1=x1, x2=x2, g=pd.Categorical(g.astype(str))))
    cases = [(1, "y ~ x1 + x2 + (1 | g)", [1, 3, 5, 9, 15, 25, 51]),
             (2, "y ~ x1 + x2 + (1 + x1 | g)", [1, 3, 5, 7, 11, 15]),
             (3, "y ~ x1 + x2 + (1 + x1 + x2 | g)", [1, 3, 5, 7, 9])]
    cbpp = sm.datasets.load("cbpp")
    print(f"{'k':>2s} {'rule':>7s} {'nAGQ':>5s} {'nodes':>6s} {'eval':>10s} {'per node·obs':>13s} {'full fit':>10s}")
    for k, form, nqs in cases:
        m = sm.Model(form, df, family="binomial")
        eng = glmm_engine(m)
        th = m.theta0 * 0.5
        be = np.zeros(m.p)
        for nq in nqs:
            for kind in (("tensor", "sparse") if k == 3 and nq > 1 else ("tensor",)):
                rule = make_rule(nq, k, rule=kind, max_nodes=100_000)
                with blas_threads(1):
                    agq(eng, th, be, rule, grad=True)
                    reps = 3 if rule.size * m.n > 2e6 else (5 if quick else 15)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        agq(eng, th, be, rule, grad=True)
                    te = (time.perf_counter() - t0) / reps
                tfit = None
                if (k == 1 or (k == 2 and nq <= 11) or (k == 3 and nq <= 5)) and not quick:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = time.perf_counter()
                        m.fit(method="agq" if nq > 1 else "laplace", nagq=nq if nq > 1 else None, rule=kind)
                        tfit = time.perf_counter() - t0
                out[f"k{k}_{kind}_{nq}"] = {"k": k, "rule": kind, "nagq": nq, "nodes": rule.size, "eval_grad_s": te,
                                           "fit_s": tfit}
                fit_txt = f"{tfit * 1e3:8.1f}ms" if tfit is not None else "        --"
                print(f"{k:2d} {kind:>7s} {nq:5d} {rule.size:6d} {te * 1e3:8.2f}ms {te / (rule.size * m.n) * 1e9:10.1f} ns "
                      f"{fit_txt}")
    # lme4's own case for reference: cbpp, k = 1
    print("(simulated binary data: 200 groups × 10 observations; n = 2000)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for nq in (1, 5, 25, 51):
            t0 = time.perf_counter()
            sm.glmer(CBPP, cbpp, nagq=nq)
            out[f"cbpp_fit_{nq}"] = time.perf_counter() - t0
    return out


def main() -> None:
    print(_blas.report())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-r", action="store_true", help="do not run Rscript; print the pinned lme4 times")
    args = ap.parse_args()
    import platform

    import scipy

    print(f"stochmm {sm.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, cores: {__import__('os').cpu_count()}")
    res = {"fits": fits_table(args.quick, not args.no_r)}
    res["eval_costs"] = eval_costs(args.quick)
    res["agq_scaling"] = agq_scaling(args.quick)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_glmm.json").write_text(json.dumps(res, indent=1, default=float))
    print(f"\nwritten: {out / 'bench_glmm.json'}")


if __name__ == "__main__":
    main()
