"""Importance-sampling log-likelihoods (stochmm.stochastic.importance): exact cases, AGQ references, bad input.

Statistical checks use fixed seeds and tolerances in Monte Carlo standard errors (MCSE) of the
estimate being checked; deterministic references are exact (LMM) or AGQ with many nodes.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.stochastic.importance import ImportanceWarning, LogLik, importance_sample, pareto_khat

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp_agq25():
    return sm.glmer(CBPP, sm.datasets.load("cbpp"), nagq=25)


@pytest.fixture(scope="module")
def small_agq25(small_cluster_model):
    return small_cluster_model(ncl=300).fit(method="agq", nagq=25)


def test_lmm_is_equals_exact_sleepstudy():
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"), reml=False)
    m = fit.model
    exact = m.loglik(fit, method="exact")
    assert exact.method == "exact"
    assert float(exact) == pytest.approx(fit.loglik, abs=1e-8)  # the ML fit's own value
    ll = m.loglik(fit, method="is", draws=4000, seed=3)  # t proposal: weights vary
    assert ll.mcse > 0
    assert abs(float(ll) - float(exact)) <= 3 * ll.mcse
    # the Gaussian proposal is the exact conditional: every weight is the likelihood
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImportanceWarning)
        g = m.loglik(fit, method="is", draws=200, seed=3, proposal="normal")
    assert float(g) == pytest.approx(float(exact), abs=1e-8)


def test_cbpp_is_matches_agq25(cbpp_agq25):
    fit = cbpp_agq25
    assert fit.objective == pytest.approx(183.966738, abs=1e-5)  # full scale (lme4 prints 100.0099)
    ll = fit.model.loglik(fit, method="is", draws=10_000, seed=2026)
    assert isinstance(ll, LogLik) and ll.method == "is"
    assert ll.deviance_mcse < 0.01
    assert abs(ll.deviance - 183.966738) <= max(0.01, 3 * ll.deviance_mcse)
    assert abs(ll.deviance - 183.966738) <= 3 * ll.deviance_mcse
    assert ll.khat < 0.7 and ll.ess > 5000
    # every method on one scale
    assert fit.model.loglik(fit, "agq:25").deviance == pytest.approx(183.966738, abs=1e-5)
    lap = fit.model.loglik(fit, "laplace")
    assert lap.deviance - 183.966738 == pytest.approx(0.0867, abs=1e-3)


def test_small_clusters_is_agrees_with_agq_and_laplace_does_not(small_agq25):
    fit = small_agq25
    m = fit.model
    agq = float(m.loglik(fit, "agq:25"))
    ll = m.loglik(fit, method="is", draws=4000, seed=7)
    assert abs(float(ll) - agq) <= 3 * ll.mcse
    lap = float(m.loglik(fit, "laplace"))
    assert abs(lap - agq) > 5.0 and abs(lap - agq) > 100 * ll.mcse


def test_joint_proposal_agrees_with_per_level(cbpp_agq25):
    fit = cbpp_agq25
    ll = importance_sample(fit.model, fit._beta, fit.theta, draws=4000, seed=5, engine="blocked")
    assert ll.details["joint"]
    assert abs(ll.deviance - 183.966738) <= 3 * ll.deviance_mcse


def test_joint_proposal_crossed_lmm_is_exact():
    # crossed factors: the blocked factor's draws (triangular solves, S block) under a Gaussian target
    fit = sm.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"), reml=False)
    m = fit.model
    exact = float(m.loglik(fit, "exact"))
    assert exact == pytest.approx(fit.loglik, abs=1e-8)
    for inner in (1, 8):  # the Laplace proposal is the exact conditional: constant weights
        g = importance_sample(m, fit._beta, fit.theta, fit.sigma, draws=100, seed=1, proposal="normal", qmc=False,
                              inner=inner, adapt=0, warn=False)
        assert g.details["joint"] and float(g) == pytest.approx(exact, abs=1e-7)
    t = m.loglik(fit, "is", draws=1000, seed=1)  # defaults: t proposal, inner lattice draws, re-centred
    assert abs(float(t) - exact) <= 3 * t.mcse


def test_vector_random_effects_agree_with_vector_agq():
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(80), 6)
    df = pd.DataFrame({"g": pd.Categorical(g), "x": rng.standard_normal(g.size), "y": 0.0})
    m = sm.Model("y ~ x + (1 + x | g)", df, family="binomial")
    m = m.with_response(m.simulate([0.2, 0.8], [1.5, 0.3, 0.8], seed=4)[:, 0])
    params = {"beta": [0.2, 0.8], "theta": [1.5, 0.3, 0.8]}
    agq = float(m.loglik(params, "agq:15"))
    assert agq == pytest.approx(float(m.loglik(params, "agq:11")), abs=1e-3)
    ll = m.loglik(params, "is", draws=4000, seed=11)
    assert abs(float(ll) - agq) <= 3 * ll.mcse


def test_pareto_khat_equals_arviz():
    az = pytest.importorskip("arviz")
    if not hasattr(az, "psislw"):
        pytest.skip("this ArviZ has no psislw")
    rng = np.random.default_rng(0)
    lw = np.stack([rng.standard_normal(3000) * s for s in (0.1, 1.0, 2.5)] + [np.log(rng.pareto(0.8, 3000))])
    np.testing.assert_allclose(pareto_khat(lw), az.psislw(lw.copy())[1], rtol=1e-10, atol=1e-12)
    # invariant to the scale of the weights (log weights near a log-likelihood of -4000)
    np.testing.assert_allclose(pareto_khat(lw - 4000.0), pareto_khat(lw), atol=1e-10)


def test_poor_weights_warn_naming_khat(small_agq25):
    # a Gaussian proposal is lighter-tailed than these posteriors: infinite-variance weights
    with pytest.warns(ImportanceWarning, match=r"Pareto k̂ = .* at level"):
        ll = small_agq25.model.loglik(small_agq25, "is", draws=2000, seed=1, proposal="normal", qmc=False)
    assert ll.khat > 0.7


def test_loglik_value_object():
    ll = LogLik(-10.0, "is", mcse=0.01, ess=100.0, khat=0.2, draws=1000, seconds=0.5)
    assert ll + 1 == -9.0 and ll.value == -10.0 and ll.deviance == 20.0 and ll.deviance_mcse == 0.02
    assert "method='is'" in repr(ll)
    import pickle

    assert pickle.loads(pickle.dumps(ll)).mcse == 0.01


def test_qmc_and_antithetic_options(cbpp_agq25):
    fit = cbpp_agq25
    for kw in ({"qmc": False, "antithetic": True}, {"qmc": True, "antithetic": True, "proposal": "normal"}):
        ll = fit.model.loglik(fit, "is", draws=4000, seed=9, **kw)
        assert abs(ll.deviance - 183.966738) <= 3 * ll.deviance_mcse


def test_bad_input(cbpp_agq25):
    fit = cbpp_agq25
    m = fit.model
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        m.loglik(fit, "is", draws=0)
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        m.loglik(fit, "is", draws=-5)
    with pytest.raises(ValueError, match="Valid methods: is, laplace, agq, fast, exact"):
        m.loglik(fit, "laplas")
    with pytest.raises(ValueError, match="Did you mean 'laplace'"):
        m.loglik(fit, "laplas")
    with pytest.raises(sm.errors.DataError, match="theta must have 1 values"):
        m.loglik({"beta": fit._beta, "theta": [0.5, 0.1]}, "laplace")
    with pytest.raises(sm.errors.DataError, match="beta must have 4 values"):
        m.loglik({"beta": [1.0], "theta": [0.5]}, "laplace")
    with pytest.raises(sm.errors.DataError, match="negative standard deviation"):
        m.loglik({"beta": fit._beta, "theta": [-0.5]}, "is")
    with pytest.raises(ValueError, match="only for linear mixed models"):
        m.loglik(fit, "exact")
    with pytest.raises(ValueError, match="proposal must be"):
        m.loglik(fit, "is", proposal="cauchy")
    with pytest.raises(TypeError, match="params must be"):
        m.loglik([1, 2], "laplace")
    lmm = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), reml=False)
    with pytest.raises(ValueError, match="likelihood is exact"):
        lmm.model.loglik(lmm, "laplace")
    with pytest.raises(sm.errors.DataError, match="positive residual SD"):
        lmm.model.loglik({"beta": [1527.0], "theta": [0.7]}, "exact")
