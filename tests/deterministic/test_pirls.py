"""PIRLS, the reweighted blocked system and the Laplace approximation (stochmm.deterministic.pirls).

Reference numbers: tests/reference/lme4_devfun_points.json (lme4 1.1-31 devfun values
at fixed parameters, with independent exact-Laplace values and glmmTMB 1.1.5's
Laplace values) and lme4_extra_results.json (``independent_at_estimates``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.builder.families import get_family
from stochmm.deterministic.blocks import BlockedSystem
from stochmm.deterministic.pirls import BlockedEngine, LevelEngine, blas_threads, make_engine, single_factor

REF = Path(__file__).resolve().parents[1] / "reference"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
POIS = "incidence ~ period + offset(log(size)) + (1 | herd)"
VERB = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"


@pytest.fixture(scope="module")
def cbpp():
    return sm.datasets.load("cbpp")


@pytest.fixture(scope="module")
def devpoints():
    return json.loads((REF / "lme4_devfun_points.json").read_text())


@pytest.fixture(scope="module")
def sim():
    """Binary data with a random intercept and slope (60 groups) plus a crossed 7-level factor."""
    rng = np.random.default_rng(3)
    G, nper = 30, 8
    g = np.repeat(np.arange(G), nper)
    x = rng.normal(size=G * nper)
    b = rng.multivariate_normal([0, 0], [[1, 0.3], [0.3, 0.5]], size=G)
    eta = -0.5 + 0.8 * x + b[g, 0] + b[g, 1] * x
    y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    return pd.DataFrame(dict(y=y, x=x, g=pd.Categorical(g.astype(str)), h=pd.Categorical((np.arange(G * nper) % 7).astype(str))))


# ----------------------------------------------------------------------------- reweighted system
@pytest.mark.parametrize("formula", [VERB, "r2 ~ Anger + (1 | id) + (1 + Gender | item)", "r2 ~ btype + (1 | item:id) + (1 | item)"])
def test_reweighted_system_equals_blocked_system(formula):
    v = sm.datasets.load("VerbAgg").iloc[:3000]
    m = sm.Model(formula, v, family="binomial")
    rng = np.random.default_rng(0)
    w, y = rng.random(m.n) + 0.1, rng.normal(size=m.n)
    rs = BlockedSystem(m.terms, m.X).reweight(w, w * y, float(np.sum(w * y * y)))
    bs = BlockedSystem(m.terms, m.X, y, w)
    Ts = m.lambda_blocks(m.theta0 * 0.7)
    rs.factor(Ts)
    bs.factor(Ts)
    assert rs.logdet_L == pytest.approx(bs.logdet_L, rel=1e-12)
    assert rs.pwrss == pytest.approx(bs.pwrss, rel=1e-9)
    np.testing.assert_allclose(rs.beta(), bs.beta(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rs.u(), bs.u(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- Laplace values
@pytest.mark.parametrize("engine", [BlockedEngine, LevelEngine])
def test_exact_laplace_at_lme4_devfun_points(cbpp, devpoints, engine):
    # lme4_devfun_points.json cbpp_agq1: exact Laplace (independent R code; glmmTMB agrees) tightly,
    # lme4's own devfun within 1e-2 (its Laplace sits up to 5.6e-4 above the exact value)
    eng = engine(sm.Model(CBPP, cbpp, family="binomial"), get_family("binomial"))
    for pt in devpoints["cbpp_agq1"]["points"]:
        th, be = np.array(pt["params"][:1]), np.array(pt["params"][1:])
        val = eng.laplace(th, be)[0]
        assert val == pytest.approx(pt["laplace_exact_independent"], abs=1e-8), pt["label"]
        if "glmmTMB_laplace" in pt:
            assert val == pytest.approx(pt["glmmTMB_laplace"], abs=1e-8)
        assert abs(val - pt["value"]) < 1e-2
        assert val <= pt["value"] + 1e-9


def test_fast_criterion_at_lme4_devfun_points(cbpp, devpoints):
    # lme4_devfun_points.json cbpp_agq0: nAGQ = 0 criterion (β and u jointly by PIRLS) at fixed θ
    m = sm.Model(CBPP, cbpp, family="binomial")
    for engine in (BlockedEngine, LevelEngine):
        eng = engine(m, get_family("binomial"))
        for pt in devpoints["cbpp_agq0"]["points"]:
            val = eng.fast(np.array(pt["params"]))
            assert abs(val - pt["value"]) < 1e-2, pt["label"]
            assert val <= pt["value"] + 1e-9


def test_poisson_laplace_matches_independent_value(cbpp):
    # lme4_extra_results.json cbpp_pois_agq1: independent exact Laplace at lme4's estimates (log y! included)
    e = {r["id"]: r for r in json.loads((REF / "lme4_extra_results.json").read_text())}["cbpp_pois_agq1"]["results"]
    eng = make_engine(sm.Model(POIS, cbpp, family="poisson"), get_family("poisson"))
    val = eng.laplace(np.array(list(e["theta"].values())), np.array(list(e["fixef"].values())))[0]
    assert val == pytest.approx(e["independent_at_estimates"]["laplace_exact_independent"], abs=1e-8)
    assert val < e["minus2logLik"]  # lme4's value includes the same constants but sits 9e-4 above


def test_expected_hessian_reproduces_lme4_fisher_laplace(cbpp):
    # lme4_extra_results.json cbpp_probit_agq1 / cbpp_cloglog_agq1: laplace_fisher_independent and
    # laplace_exact_independent at lme4's estimates
    ref = {r["id"]: r for r in json.loads((REF / "lme4_extra_results.json").read_text())}
    for link in ("probit", "cloglog"):
        e = ref[f"cbpp_{link}_agq1"]["results"]
        m = sm.Model(CBPP, cbpp, family=get_family("binomial", link))
        th, be = np.array(list(e["theta"].values())), np.array(list(e["fixef"].values()))
        obs = make_engine(m, get_family("binomial", link)).laplace(th, be)[0]
        exp_ = make_engine(m, get_family("binomial", link), hessian="expected").laplace(th, be)[0]
        assert obs == pytest.approx(e["independent_at_estimates"]["laplace_exact_independent"], abs=1e-7)
        assert exp_ == pytest.approx(e["independent_at_estimates"]["laplace_fisher_independent"], abs=1e-7)
        assert exp_ - obs > 0.07


def test_engines_agree_on_vector_valued_terms(sim):
    for formula in ("y ~ x + (1 + x | g)", "y ~ x + (1 | g) + (0 + x | g)"):
        m = sm.Model(formula, sim, family="binomial")
        assert single_factor(m)
        fam = get_family("binomial")
        a, b = LevelEngine(m, fam), BlockedEngine(m, fam)
        th = m.theta0 * 0.8
        be = np.array([-0.4, 0.7])
        va, ga = a.laplace(th, be, grad=True)
        vb, gb = b.laplace(th, be, grad=True)
        assert va == pytest.approx(vb, abs=1e-9)
        np.testing.assert_allclose(ga, gb, rtol=1e-7, atol=1e-8)
        assert a.fast(th) == pytest.approx(b.fast(th), abs=1e-9)


def test_pirls_modes_are_stationary(cbpp):
    m = sm.Model(VERB, sm.datasets.load("VerbAgg"), family="binomial")
    eng = BlockedEngine(m, get_family("binomial"))
    th, be = np.array([1.34, 0.5]), np.array([0.2, 0.057, 0.32, -1.06, -2.1, -1.05])
    st = eng.pirls(th, be)
    assert st.converged and st.iterations < 15
    A = st.extra["A"]
    grad_u = eng._Zlt(A, st.d1) - st.u  # ∇ of −D/2 in u
    assert np.max(np.abs(grad_u)) < 1e-8
    # warm start from the converged modes: the next evaluation converges at once
    assert eng.pirls(th, be).iterations == 1


# ----------------------------------------------------------------------------- gradients
def _fd(f, x, h=1e-5):
    g = np.zeros_like(x)
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = h
        g[j] = (f(x + e) - f(x - e)) / (2 * h)
    return g


CASES = [
    (CBPP, "cbpp", "binomial", None, "observed"),
    (CBPP, "cbpp", "binomial", "probit", "expected"),
    (POIS, "cbpp", "poisson", None, "observed"),
    ("y ~ x + (1 + x | g)", "sim", "binomial", "cloglog", "observed"),
    ("y ~ x + (1 + x | g) + (1 | h)", "sim", "binomial", None, "observed"),
    ("y ~ x + (1 | h) + (1 + x | g)", "sim", "binomial", None, "expected"),
    (VERB, "verbagg", "binomial", None, "observed"),  # crossed scalar terms: the dense off-diagonal path
    ("r2 ~ Anger + (1 | id) + (1 + Gender | item)", "verbagg", "binomial", "probit", "observed"),
]


@pytest.mark.parametrize("formula,data,family,link,hessian", CASES)
def test_exact_gradients_match_finite_differences(formula, data, family, link, hessian, cbpp, sim):
    df = {"cbpp": cbpp, "sim": sim}.get(data)
    if df is None:
        df = sm.datasets.load("VerbAgg").iloc[:1500]
    fam = get_family(family, link)
    m = sm.Model(formula, df, family=fam)
    engines = [BlockedEngine(m, fam, hessian)] + ([LevelEngine(m, fam, hessian)] if single_factor(m) else [])
    for eng in engines:
        th = m.theta0 * 0.7
        v0, g0 = eng.fast_grad(th)
        np.testing.assert_allclose(g0, _fd(eng.fast, th), rtol=1e-5, atol=1e-5)
        phi = np.concatenate([th, eng.state.beta + 0.05])
        v1, g1 = eng.value_and_grad(phi)
        np.testing.assert_allclose(g1, _fd(eng.objective, phi), rtol=1e-5, atol=1e-5)


def test_blas_threads_restores_setting():
    from stochmm.deterministic.pirls import _blas_libs

    before = [g() for g, _ in _blas_libs()]
    with blas_threads(1):
        assert all(g() == 1 for g, _ in _blas_libs())
    assert [g() for g, _ in _blas_libs()] == before
