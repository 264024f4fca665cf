"""Benchmark the moment estimators: throughput, peak memory, and REML comparison.

Data are generated lazily, one Dask partition at a time (never all in memory): a
crossed design of students x lecturers (``y ~ x + (1 | student) + (1 | lecturer)``;
students live in one partition each, 20 ratings on average, 10,000 lecturers
shared by all partitions) and the one-factor random-N model on the same rows
(``y ~ x + (1 | student)``: the number of ratings per student is random).

Each size runs in a fresh subprocess so that its peak resident memory
(``resource.getrusage``) is its own; the table shows it next to the memory of the
bare interpreter with numpy/pandas/dask/stochmm imported. Rows per second count
everything: generating the partitions (both passes, for the crossed model with
a covariate), building X, the sufficient statistics, the tree combine and the
solve. ``gen only`` is the throughput of a pass that only generates the data.

At sizes where REML still runs (``--reml-sizes``) the same data are also fitted
in memory by ``sm.lmer`` (REML), and the moment estimates are compared to REML and
to the truth; the last table counts ``sm.lmer`` function evaluations with the
start (θ = 1) and with the moment estimates as start values (sm.lmer's default for random-intercept models).

Usage::

    python benchmarks/bench_moments.py                        # quick: 1e5, 1e6 rows
    python benchmarks/bench_moments.py --sizes 1e6,1e7,1e8    # the full run
    python benchmarks/bench_moments.py --sizes 1e6 --reml-sizes 1e4,1e5,3e5
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
import subprocess
import sys
import time

TRUTH = {"student": 0.64, "lecturer": 0.36, "Residual": 1.21}
N_LECT = 10_000
PER_STUDENT = 20


def make_partition(i: int, rows: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    lect = np.random.default_rng([seed, 10**9]).normal(0, TRUTH["lecturer"] ** 0.5, N_LECT)
    rng = np.random.default_rng([seed, i])
    students = max(rows // PER_STUDENT, 2)
    s = rng.integers(0, students, rows)
    d = rng.integers(0, N_LECT, rows)
    x = rng.normal(size=rows)
    y = (3.0 + 0.2 * x + rng.normal(0, TRUTH["student"] ** 0.5, students)[s] + lect[d]
         + rng.normal(0, TRUTH["Residual"] ** 0.5, rows))
    return pd.DataFrame({"y": y, "x": x, "student": (s + i * students).astype(np.int64), "lecturer": d.astype(np.int32)})


def lazy_frame(n: int, part_rows: int, seed: int = 0):
    import dask.dataframe as dd

    nparts = max(1, n // part_rows)
    rows = n // nparts
    return dd.from_map(make_partition, range(nparts), rows=rows, seed=seed)


def peak_rss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


# ---------------------------------------------------------------------------------------------
# one size, in a subprocess
# ---------------------------------------------------------------------------------------------
def run_one(n: int, part_rows: int, model: str) -> dict:
    import warnings

    import dask

    import stochmm as sm

    warnings.simplefilter("ignore")
    base = peak_rss_mb()
    dask.config.set(scheduler="threads")
    ddf = lazy_frame(n, part_rows)
    out = {"n": n, "model": model, "npartitions": ddf.npartitions, "base_rss_mb": base}
    if model == "gen":
        t = time.perf_counter()
        total = float(ddf["y"].sum().compute())
        out.update(seconds=time.perf_counter() - t, check=total)
    else:
        formula = ("y ~ x + (1 | student) + (1 | lecturer)" if model == "crossed" else "y ~ x + (1 | student)")
        t = time.perf_counter()
        fit = sm.mom(formula, ddf)
        out.update(seconds=time.perf_counter() - t, varcomp=fit.varcomp.to_dict(), fixef=fit.fixef.to_dict(),
                   ngroups=fit.ngroups, nobs=fit.nobs)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_reml(n: int, name: str) -> dict:
    import warnings

    import numpy as np
    import pandas as pd

    import stochmm as sm

    warnings.simplefilter("ignore")
    formula = {"crossed": "y ~ x + (1 | student) + (1 | lecturer)", "oneway": "y ~ x + (1 | student)"}[name]
    nparts = max(1, n // 100_000)
    df = pd.concat([make_partition(i, n // nparts, seed=1) for i in range(nparts)], ignore_index=True)
    warm = make_partition(0, 2000, seed=2)  # first calls import and compile: keep them out of the timings
    sm.mom(formula, warm, se=None)
    sm.lmer(formula, warm)
    t = time.perf_counter()
    mo = sm.mom(formula, df, se=None)
    t_mo = time.perf_counter() - t
    t = time.perf_counter()
    re = sm.lmer(formula, df)
    t_re = time.perf_counter() - t
    t = time.perf_counter()
    cold = sm.lmer(formula, df, start="lme4")  # lme4's start θ = 1 (the default start is the moment estimate)
    t_cold = time.perf_counter() - t
    vre = re.varcorr.set_index("group")["variance"]
    return {
        "n": n, "mom_s": t_mo, "reml_s": t_re, "reml_cold_s": t_cold,
        "mom": mo.varcomp.to_dict(), "reml": {k: float(vre[k]) for k in mo.varcomp.index},
        "feval": int(re.optsum.feval), "feval_cold": int(cold.optsum.feval),
        "dobj": float(re.objective - cold.objective),
        "max_rel_dev": float(np.max(np.abs(mo.varcomp.to_numpy() / vre[mo.varcomp.index].to_numpy() - 1))),
        "peak_rss_mb": peak_rss_mb(),
    }


def child(args: list, timeout: float | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
def fmt_table(rows: list[list], header: list[str]) -> str:
    w = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(header)]
    line = "  ".join(str(h).rjust(w[i]) for i, h in enumerate(header))
    out = [line, "-" * len(line)]
    out += ["  ".join(str(r[i]).rjust(w[i]) for i in range(len(header))) for r in rows]
    return "\n".join(out)


def main() -> None:
    print(_blas.report())
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6", help="comma-separated numbers of rows (e.g. 1e6,1e7,1e8)")
    ap.add_argument("--reml-sizes", default="1e4,1e5", help="sizes at which sm.lmer REML is also run ('' for none)")
    ap.add_argument("--partition-rows", type=float, default=1e6, help="rows per Dask partition")
    ap.add_argument("--reml-timeout", type=float, default=600, help="seconds allowed for each REML size")
    ap.add_argument("--models", default="gen,oneway,crossed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = json.loads(a.child)
        res = run_one(*rest) if kind == "one" else run_reml(*rest)  # type: ignore[arg-type]
        print(json.dumps(res))
        return

    import platform

    print(f"# bench_moments: python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}")
    sizes = [int(float(s)) for s in a.sizes.split(",") if s]
    models = a.models.split(",")
    rows = []
    for n in sizes:
        for model in models:
            r = child(["one", n, int(min(a.partition_rows, n)), model])
            if "error" in r:
                rows.append([f"{n:.0e}", model, "-", "-", "-", "-", "FAILED: " + r["error"].splitlines()[-1][:60]])
                continue
            acc = ""
            if model != "gen":
                acc = " ".join(f"{k}={v:.4f}" for k, v in r["varcomp"].items())
            rows.append([f"{n:.0e}", model, r["npartitions"], f"{r['seconds']:.1f}", f"{n / r['seconds']:,.0f}",
                         f"{r['peak_rss_mb']:.0f} ({r['base_rss_mb']:.0f})", acc])
            print(f"  done n={n:.0e} {model}: {r.get('seconds', float('nan')):.1f}s", file=sys.stderr)
    if rows:
        print("\nMoment fits on lazily generated Dask data (threaded scheduler)")
        print(f"truth: {TRUTH} (one-factor model: Residual = lecturer + residual = 1.57); "
              "peak RSS in MB (bare interpreter + imports in parentheses)")
        print(fmt_table(rows, ["rows", "model", "parts", "seconds", "rows/s", "peak RSS MB", "estimates"]))

    reml_sizes = [int(float(s)) for s in a.reml_sizes.split(",") if s]
    if not reml_sizes:
        return
    rrows, srows = [], []
    for n in reml_sizes:
        for name in ("oneway", "crossed"):
            q = child(["reml", n, name], timeout=a.reml_timeout)
            print(f"  done REML n={n:.0e} {name}", file=sys.stderr)
            if "error" in q:
                msg = q["error"].splitlines()[-1][:60]
                rrows.append([f"{n:.0e}", name, "-", "-", "-", "-", "REML " + msg, "-", "-"])
                srows.append([f"{n:.0e}", name, "-", "-", "-", "-", msg])
                continue
            mo = " ".join(f"{v:.4f}" for v in q["mom"].values())
            re = " ".join(f"{v:.4f}" for v in q["reml"].values())
            rrows.append([f"{n:.0e}", name, f"{q['mom_s']:.2f}", f"{q['reml_s']:.2f}", f"{q['reml_s'] / q['mom_s']:.0f}x",
                          mo, re, f"{100 * q['max_rel_dev']:.1f}%", f"{q['peak_rss_mb']:.0f}"])
            srows.append([f"{n:.0e}", name, q["feval_cold"], q["feval"], f"{q['reml_cold_s']:.2f}", f"{q['reml_s']:.2f}",
                          f"{q['dobj']:+.1e}"])
    print("\nMoments vs REML (sm.lmer) on the same in-memory data")
    print(fmt_table(rrows, ["rows", "model", "mom s", "REML s", "speed-up", "moment σ²", "REML σ²", "max |Δ|/REML",
                            "peak RSS MB"]))
    print("\nsm.lmer start values: lme4's (θ = 1) vs moment estimates (the default for random-intercept models)")
    print(fmt_table(srows, ["rows", "model", "feval lme4 start", "feval moment start", "REML s (lme4 start)",
                            "REML s (moment start)", "Δ objective"]))


if __name__ == "__main__":
    main()
