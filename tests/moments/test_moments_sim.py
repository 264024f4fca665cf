"""Simulation checks: the moment estimators recover known parameters.

Each test simulates R data sets from a known model and checks that the mean of
the estimates is within 4 Monte Carlo standard errors of the truth (the
estimators are exactly unbiased given the design, so any bias would show), and
that the delta-method standard errors match the spread of the estimates. Seeds
are fixed, so the tests are deterministic.
"""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.moments.crossed import crossed_arrays_fit
from stochmm.moments.randomn import ClusterTable, fit_oneway

# small simulated data sets give some negative raw estimates: expected, and averaged raw
pytestmark = pytest.mark.filterwarnings("ignore::stochmm.moments.NegativeEstimateWarning")


def within_mc(est, truth, k=4.0):
    est = np.asarray(est)
    mc = est.std(axis=0, ddof=1) / np.sqrt(est.shape[0])
    assert np.all(np.abs(est.mean(axis=0) - truth) < k * mc), (est.mean(axis=0), truth, mc)


@pytest.mark.parametrize("method", ["matloff", "anova"])
def test_random_n_oneway_with_covariates_unbiased(method):
    rng = np.random.default_rng(2016)
    R, G = 600, 80
    s2a, s2e, beta = 1.0, 0.5, np.array([1.0, 2.0, -1.0])
    out = []
    for _ in range(R):
        N = 1 + rng.poisson(4, G)  # random cluster sizes
        g = np.repeat(np.arange(G), N)
        zg = rng.normal(size=G)
        x = rng.normal(size=g.size) + zg[g]  # within- and between-cluster variation
        X = np.column_stack([np.ones(g.size), x, zg[g]])
        y = X @ beta + rng.normal(0, np.sqrt(s2a), G)[g] + rng.normal(0, np.sqrt(s2e), g.size)
        ct = ClusterTable.from_arrays(X, y, g, pd.RangeIndex(G), per_cluster_xx=False)
        o = fit_oneway(ct, method=method, se=None)
        out.append(np.r_[o["s2a"], o["s2e"], o["beta"]])
    within_mc(out, np.r_[s2a, s2e, beta])


def test_random_n_size_effect_and_delta_se():
    rng = np.random.default_rng(7)
    R, G = 500, 150
    c1, c2, s2a, s2e = 2.0, 0.3, 0.8, 1.0
    est, se = [], []
    for _ in range(R):
        N = rng.choice([1, 2, 4, 8, 12], size=G)
        g = np.repeat(np.arange(G), N)
        y = c1 + c2 * N[g] + rng.normal(0, np.sqrt(s2a), G)[g] + rng.normal(0, np.sqrt(s2e), g.size)
        ct = ClusterTable.from_arrays(np.ones((g.size, 1)), y, g, pd.RangeIndex(G)).with_size()
        o = fit_oneway(ct, method="matloff", se="delta")
        est.append(np.r_[o["s2a"], o["s2e"], o["beta"]])
        se.append(np.r_[o["varcomp_se"], np.sqrt(np.diag(o["vcov"]))])
    est, se = np.array(est), np.array(se)
    within_mc(est, [s2a, s2e, c1, c2])
    # delta-method / GLS standard errors agree with the Monte Carlo spread
    assert se.mean(axis=0) == pytest.approx(est.std(axis=0, ddof=1), rel=0.12)


def test_crossed_unbalanced_with_covariates_unbiased():
    rng = np.random.default_rng(2017)
    R, La, Lb, n = 1200, 40, 30, 900
    sig = np.array([1.0, 0.49, 0.25])
    beta = np.array([1.0, 2.0, -1.0])
    out = []
    for _ in range(R):
        ca = np.minimum(rng.exponential(8, n).astype(int), La - 1)  # very unequal level sizes
        cb = rng.integers(0, Lb, n)  # random cells, some replicated
        za = rng.normal(size=La)  # a covariate constant within levels of a
        X = np.column_stack([np.ones(n), rng.normal(size=n) + ca / 10, za[ca]])
        y = (X @ beta + rng.normal(0, 1.0, La)[ca] + rng.normal(0, 0.7, Lb)[cb] + rng.normal(0, 0.5, n))
        o = crossed_arrays_fit(X, y, ca, pd.RangeIndex(La), cb, pd.RangeIndex(Lb), ["(Intercept)", "x", "z"])
        out.append(np.r_[o["sig"], o["beta"]])
    within_mc(out, np.r_[sig, beta])


def test_henderson3_unbalanced_split_plot_unbiased():
    rng = np.random.default_rng(3)
    oats = sm.datasets.load("oats").drop(index=np.array([1, 5, 10, 22, 40, 41, 60]) - 1).reset_index(drop=True)
    m = sm.Model("yield ~ nf * Variety + (1 | Block/Variety)", oats)
    refs = {t.group: t.refs for t in m.terms}
    truth = {"Variety:Block": 100.0, "Block": 200.0, "Residual": 150.0}
    mean = m.X @ rng.normal(0, 10, m.p)
    est = []
    for _ in range(150):
        d = oats.copy()
        d["yield"] = (mean + rng.normal(0, np.sqrt(200), 6)[refs["Block"]] + rng.normal(0, 10, 18)[refs["Variety:Block"]]
                      + rng.normal(0, np.sqrt(150), len(d)))
        fit = sm.anova_components("yield ~ nf * Variety + (1 | Block/Variety)", d)
        est.append(fit.varcomp_raw[list(truth)].to_numpy())
    within_mc(est, np.array(list(truth.values())))
