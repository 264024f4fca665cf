"""Benchmark: per-gradient cost of the marginal log density (random effects integrated out,
stochmm.stochastic.marginal) against the full joint log density p(y | b) p(b) that full NUTS
differentiates, as n and q grow.

Usage::

    python benchmarks/bench_marginal.py            # all cases (≈ 2–4 min on 2 cores)
    python benchmarks/bench_marginal.py --quick    # smaller scaling series

For each model: compile time of jax.jit(jax.grad(·)) (first call), then the median over 5 runs of the
time per gradient (each run repeats the gradient until ≥ 0.2 s). The joint density is the
non-centred one of full NUTS, b = Λu with u ~ N(0, I), differentiated in (β, Λ[, σ], u) — gathers and
segment sums over the level codes, written here in JAX. Ratio = marginal / joint per gradient: the
marginal NUTS samples p + θ dimensions instead of p + θ + q, so fewer leapfrog steps can offset a ratio
above 1. Results go to benchmarks/out/bench_marginal.json.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import _blas  # noqa: E402

_blas.use_native_blas()  # before numpy: these machines' OPENBLAS_* settings are not a user's

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402, I001
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import stochmm as sm  # noqa: E402
from stochmm.stochastic import marginal as mg  # noqa: E402
from stochmm.stochastic.jaxfamily import kernel  # noqa: E402

ROOT = _Path(__file__).resolve().parents[1]


def joint_logdensity(model, family=None):
    """The full joint log density log p(y | u) + log N(u; 0, I) (b = Λu), full scale, in JAX."""
    X, y, off = (jnp.asarray(a, dtype=jnp.float64) for a in (model.X, model.y, model.offset))
    wt = jnp.asarray(model.weights if model.family_name != "gaussian" else model.prior_weights)
    zs = [jnp.asarray(t.z) for t in model.terms]
    refs = [jnp.asarray(t.refs) for t in model.terms]
    gaussian = model.family_name == "gaussian"
    if not gaussian:
        from stochmm.builder.families import get_family

        fam = get_family(model.family if family is None else family)
        kern = kernel(fam)
        const = float(np.sum(fam.constant(model)))
    n = model.n

    def f(beta, Ls, sigma, us):
        eta = X @ beta + off
        for z, r, L, u in zip(zs, refs, Ls, us):
            eta = eta + jnp.sum(z * (u @ L.T)[r], axis=1)
        prior = -0.5 * sum(jnp.sum(u * u) for u in us)
        if gaussian:
            res = y - eta
            ll = -0.5 * (n * jnp.log(2 * jnp.pi * sigma**2) - jnp.sum(jnp.log(wt)) + jnp.sum(wt * res * res) / sigma**2)
        else:
            ll = jnp.sum(kern(y, eta, wt)) + const
        return ll + prior

    return f


def time_grad(fn, args, target=0.2, runs=5):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    k = max(1, int(np.ceil(target / max(one, 1e-5))))
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(k):
            r = fn(*args)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / k)
    return compile_s, statistics.median(out)


def case(label, model, kind="auto", nagq=None, theta=None, sigma=None, beta=None):
    ml = mg.build(model, kind=kind, nagq=nagq)
    theta = model.theta0 if theta is None else np.asarray(theta, dtype=float)
    Ls = [jnp.asarray(L) for L in ml.L_list(theta, sigma)]
    beta = jnp.asarray(np.zeros(model.p) if beta is None else beta, dtype=jnp.float64)
    gauss = model.family_name == "gaussian"
    s = jnp.asarray(sigma if gauss else 1.0)
    gm = jax.jit(jax.grad(lambda b, L, s: ml.loglik(b, L, s if gauss else None), argnums=(0, 1, 2)))
    jf = joint_logdensity(model)
    us = [jnp.zeros((t.nlev, t.k)) + 0.1 for t in model.terms]
    gj = jax.jit(jax.grad(jf, argnums=(0, 1, 2, 3)))
    cm, tmg = time_grad(gm, (beta, Ls, s))
    cj, tj = time_grad(gj, (beta, Ls, s, us))
    row = dict(model=label, kind=ml.kind, n=model.n, q=model.q, q_rest=ml.lay.q_rest, dims_marginal=model.p
               + len(model.theta0) + gauss, dims_joint=model.p + len(model.theta0) + gauss + model.q,
               marginal_ms=1e3 * tmg, joint_ms=1e3 * tj, ratio=tmg / tj, compile_marginal_s=cm, compile_joint_s=cj)
    print(f"{label:<38} {ml.kind:>8} n={model.n:>7} q={model.q:>6}  marginal {1e3 * tmg:9.3f} ms  "
          f"joint {1e3 * tj:8.3f} ms  ratio {tmg / tj:7.2f}  (compile {cm:5.1f} s / {cj:4.1f} s)", flush=True)
    return row


def sim_binary(nlev, per, seed=0, k=1):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(nlev), per)
    x = rng.normal(size=g.size)
    b = rng.normal(size=(nlev, 2)) * [1.0, 0.5]
    eta = -0.5 + 0.8 * x + b[g, 0] + (b[g, 1] * x if k == 2 else 0.0)
    y = (rng.uniform(size=g.size) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame(dict(y=y, x=x, g=g.astype(str)))


def sim_gauss(nlev, per, seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(nlev), per)
    x = np.tile(np.arange(per, dtype=float), nlev)
    b = rng.normal(size=(nlev, 2)) * [25.0, 6.0]
    y = 250 + 10 * x + b[g, 0] + b[g, 1] * x + 25 * rng.normal(size=g.size)
    return pd.DataFrame(dict(y=y, x=x, g=g.astype(str)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(_blas.report())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; cores: {os.cpu_count()}; load average "
          f"{os.getloadavg()[0]:.1f} (other jobs share the machine when > cores)")
    warnings.simplefilter("ignore")
    rows = []
    cb = sm.datasets.load("cbpp")
    cbpp = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", cb, family="binomial")
    rows.append(case("cbpp (1|herd)", cbpp, nagq=9, theta=[0.64], beta=[-1.4, -1.0, -1.1, -1.6]))
    rows.append(case("cbpp (1|herd)", cbpp, nagq=25, theta=[0.64], beta=[-1.4, -1.0, -1.1, -1.6]))
    rows.append(case("cbpp (1|herd) Laplace", cbpp, nagq=1, theta=[0.64], beta=[-1.4, -1.0, -1.1, -1.6]))
    sleep = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    rows.append(case("sleepstudy (Days|Subject)", sleep, theta=[0.93, 0.02, 0.23], sigma=25.6,
                     beta=[251.4, 10.5]))
    pen = sm.Model("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"))
    rows.append(case("Penicillin crossed", pen, theta=[1.5, 3.5], sigma=0.55, beta=[22.97]))
    v = sm.datasets.load("VerbAgg")
    verb = sm.Model("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", v, family="binomial")
    rows.append(case("VerbAgg crossed Laplace", verb, kind="laplace", theta=[1.34, 0.50]))
    levels = [100, 1000] if args.quick else [100, 1000, 10000]
    for nl in levels:
        m = sm.Model("y ~ x + (1 | g)", sim_binary(nl, 10), family="binomial")
        rows.append(case(f"binary (1|g), {nl} levels x 10", m, nagq=9, theta=[1.0], beta=[-0.5, 0.8]))
    for nl in levels:
        m = sm.Model("y ~ x + (x | g)", sim_binary(nl, 10, k=2), family="binomial")
        rows.append(case(f"binary (x|g), {nl} levels x 10", m, nagq=5, theta=[1.0, 0.0, 0.5], beta=[-0.5, 0.8]))
    for nl in levels:
        m = sm.Model("y ~ x + (x | g)", sim_gauss(nl, 10))
        rows.append(case(f"LMM (x|g), {nl} levels x 10", m, theta=[1.0, 0.0, 0.24], sigma=25.0, beta=[250, 10]))
    if not args.quick:
        ie = sm.Model("y ~ service + (1 | s) + (1 | d)", sm.datasets.load("insteval"))
        rows.append(case("InstEval LMM (1|s)+(1|d)", ie, theta=[0.31, 0.5], sigma=1.18, beta=[3.2, -0.05]))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_marginal.json").write_text(json.dumps(rows, indent=1))
    print(pd.DataFrame(rows)[["model", "kind", "n", "q", "dims_marginal", "dims_joint", "marginal_ms", "joint_ms",
                              "ratio"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
