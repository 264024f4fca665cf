"""Benchmark: posterior sampling (sm.sample) against the hand-written NumPyro model of
../shared/baselines/nuts_handwritten.py (raw and --center), in the same run.

Figure of merit (as the issue defines it): 4 chains x 1000 warm-up + 1000 draws, min bulk ESS over the fixed
effects and the random-effect SDs per second of wall, JIT compilation included, each measurement in a fresh
process (imports excluded, as the baseline does); peak RSS of that process. Also: the per-gradient cost of the
full log density as n and q grow (synthetic binary GLMMs), and optionally an InstEval LMM run.

Usage::

    python benchmarks/bench_posterior.py                  # cbpp (full, marginal) + VerbAgg (full) + baselines
    python benchmarks/bench_posterior.py --quick          # cbpp only
    python benchmarks/bench_posterior.py --insteval       # also the InstEval LMM (73,421 obs, 4,100 REs)
    python benchmarks/bench_posterior.py --worker cbpp full   # one measurement (used by the above)

Results are also written to benchmarks/out/bench_posterior.json. The machine may be shared: `uptime` is printed.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import _blas  # noqa: E402

_blas.use_native_blas()  # before numpy: these machines' OPENBLAS_* settings are not a user's

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT.parent / "shared" / "baselines" / "nuts_handwritten.py"
if not BASELINE.exists():
    BASELINE = Path("/work/shared/baselines/nuts_handwritten.py")

MODELS = {
    "cbpp": ("cbind(incidence, size - incidence) ~ period + (1 | herd)", "cbpp", "binomial"),
    "verbagg": ("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", "VerbAgg", "binomial"),
    "insteval": ("y ~ service + (1 | s) + (1 | d)", "InstEval", None),
}


def worker(name: str, mode: str) -> dict:
    """One measurement in this (fresh) process."""
    import stochmm as sm  # isort: skip  (before JAX: stochmm asks XLA for host devices, parallel chains)
    import arviz  # noqa: F401  # isort: skip  (imports excluded from the wall time, as the baseline's are)
    import dask.array  # noqa: F401  # isort: skip  (xarray imports it, 0.8 s, on first use when dask is installed)
    import numpyro.distributions as dist  # isort: skip
    from stochmm.stochastic.diagnostics import SamplerWarning

    formula, data, family = MODELS[name]
    df = sm.datasets.load(data)
    priors = None
    if family == "binomial":  # the peers' priors: beta ~ N(0, 5) raw, SD ~ HalfNormal(1)
        m = sm.Model(formula, df, family=family)
        priors = {n: dist.Normal(0.0, 5.0) for n in m.xnames}
        priors.update({f"sd({t.group})": dist.HalfNormal(1.0) for t in m.terms})
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        post = sm.sample(formula, df, family=family or "gaussian", priors=priors, progress=False, seed=0,
                         marginalize=(mode == "marginal") if mode != "auto" else "auto",
                         log_likelihood=False)
    wall = time.perf_counter() - t
    tab = post.summary_table()
    keep = [n for n in tab.index if n in post.layout.fixef or n in post.layout.sd]
    ch = post.diagnose(ranef=False).attrs["chains"]
    ess = float(tab.loc[keep, "ess_bulk"].min())
    return dict(data=name, mode=mode, sampler=post.sampler, wall_s=round(wall, 2), min_ess_bulk=round(ess, 1),
                ess_per_s=round(ess / wall, 2), rhat_max=round(float(tab["r_hat"].max()), 4),
                divergences=int(ch["divergences"].sum()), mean_leapfrog=round(float(ch["mean_leapfrog"].mean()), 1),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                timing={k: round(v, 2) for k, v in post.timing.items()},
                post_mean={k: round(float(v), 4) for k, v in tab["mean"].items()})


def gradient_costs() -> list[dict]:
    """µs per value-and-gradient of the full log density (one chain) as n and q grow."""
    import jax
    import pandas as pd

    import stochmm as sm
    from stochmm.stochastic import posterior as P
    from stochmm.stochastic.priors import resolve_priors

    rows = []
    rng = np.random.default_rng(0)
    for n, q in [(1_000, 10), (10_000, 10), (100_000, 10), (10_000, 100), (10_000, 1_000), (100_000, 1_000)]:
        g = rng.integers(0, q, n)
        df = pd.DataFrame({"y": (rng.random(n) < 0.4).astype(int), "x": rng.standard_normal(n),
                           "g": pd.Categorical(g)})
        m = sm.Model("y ~ x + (1 | g)", df, family="binomial")
        pri, user = resolve_priors(m, None)
        dens = P._Density(m, pri, user, centered=[False], clones=1)
        init = P._start(dens, None, 1, np.random.default_rng(1))
        one = {k: v[0] for k, v in init.items()}
        f = jax.jit(jax.value_and_grad(dens.log_density))
        jax.block_until_ready(f(one))
        reps = max(20, int(2e6 / n))
        t = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(f(one))
        rows.append(dict(n=n, q=q, us_per_gradient=round((time.perf_counter() - t) / reps * 1e6, 1)))
    return rows


def run_worker(args: list[str], script: list[str] | None = None, env: dict | None = None) -> dict:
    cmd = script or [sys.executable, __file__, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        print(json.dumps(worker(sys.argv[i + 1], sys.argv[i + 2])))
        return
    quick = "--quick" in sys.argv
    print(_blas.report())
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    results: dict = {"ours": [], "handwritten": [], "gradient": []}
    datasets = ["cbpp"] if quick else ["cbpp", "verbagg"]
    print(f"\n{'data':8} {'sampler':44} {'wall s':>7} {'minESS':>7} {'ESS/s':>7} {'Rhat':>6} {'div':>4} "
          f"{'leapfrog':>8} {'RSS MB':>7}")
    for name in datasets:
        modes = ["full", "marginal"] if name == "cbpp" else ["full"]
        for mode in modes:
            # cold: an empty compilation cache (the figure: compilation included); warm: a second
            # fresh process finding the compiled sampler in the persistent cache (stochmm/stochastic/_jax.py)
            cache = tempfile.mkdtemp(prefix="stochmm-jax-")
            for state in ("cold", "warm"):
                r = run_worker([name, mode], env={"STOCHMM_JAX_CACHE": cache})
                r["cache"] = state
                results["ours"].append(r)
                print(f"{name:8} {('sm.sample ' + mode + ' (' + state + ' cache)'):44} {r['wall_s']:7.1f} "
                      f"{r['min_ess_bulk']:7.0f} {r['ess_per_s']:7.1f} {r['rhat_max']:6.3f} {r['divergences']:4d} "
                      f"{r['mean_leapfrog']:8.1f} {r['peak_rss_mb']:7.0f}")
            shutil.rmtree(cache, ignore_errors=True)
        for variant in ([], ["--center"]):
            r = run_worker([], [sys.executable, str(BASELINE), name, "0", *variant])
            results["handwritten"].append(r)
            label = "hand-written NumPyro " + ("centred" if variant else "raw")
            print(f"{name:8} {label:44} {r['wall_s']:7.1f} {r['min_ess_bulk']:7.0f} {r['ess_per_s']:7.1f} "
                  f"{r['rhat_max']:6.3f} {r['divergences']:4d} {r['mean_leapfrog']:8.1f} {'':>7}")
        ours = [r for r in results["ours"] if r["data"] == name]
        base = [r for r in results["handwritten"] if r["data"] == name]
        for r in ours:
            for b in base:
                print(f"   ratio sm.sample {r['mode']} ({r['cache']}) / hand-written {'centred' if b['center'] else 'raw'}: "
                      f"{r['ess_per_s'] / b['ess_per_s']:.2f}x ESS/s")
    if "--insteval" in sys.argv:
        r = run_worker(["insteval", "auto"])
        results["ours"].append(r)
        print(f"\nInstEval LMM ({r['sampler']}): {r['wall_s']:.0f} s, R-hat max {r['rhat_max']:.3f}, "
              f"min bulk ESS {r['min_ess_bulk']:.0f}, peak RSS {r['peak_rss_mb']:.0f} MB")
    print("\nper-gradient cost of the full log density (binary GLMM, one chain):")
    results["gradient"] = gradient_costs()
    for g in results["gradient"]:
        print(f"  n = {g['n']:>7,}  q = {g['q']:>5,}: {g['us_per_gradient']:9.1f} µs")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_posterior.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
