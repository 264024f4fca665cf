"""GLMM fits by Laplace, nAGQ = 0 and adaptive quadrature, against lme4 1.1-31 and glmmTMB 1.1.5.

Reference files (tests/reference/):
* lme4_results.json — shared lme4/glmmTMB fits (cbpp nAGQ 0/1/5/9/25, VerbAgg nAGQ 0/1);
* lme4_extra_results.json — Poisson with offset (nAGQ 0/1/25, glmmTMB), probit, cloglog,
  binomial proportions with weights;
* lme4_glmm_extra.json — models/reference/make_glmm_refs.R: lme4 with a tight PIRLS tolerance
  (glmerControl(tolPwrss = 1e-12)), glmmTMB probit/cloglog, and the GLMMadaptive vignette model.

Tolerances (ISSUE 3): objective within 1e-3 of lme4 or lower; β and θ within 1e-3 relative;
SEs within 1e-2 relative. Every ``objective`` is the full −2 log-likelihood; lme4's nAGQ > 1
values are compared with the saturated term restored (``minus2logLik_abs``). Two documented
exceptions, each also pinned against a reference that computes the same quantity exactly:
* lme4's *default* nAGQ = 1 standard errors come from finite differences of a deviance whose
  PIRLS stops at tolPwrss = 1e-7; they are up to 1.4 % off. With tolPwrss = 1e-12 lme4 gives
  ours to 1e-4 (and so does glmmTMB) — tested at 1e-3; the default lme4 SEs at 1.5e-2.
* VerbAgg's intercept (0.199, SE 0.41) is 1.1e-3 (relative) from lme4's Nelder–Mead optimum of its
  approximate deviance; glmmTMB agrees with ours to 3e-5 — lme4 fixef tested at 2e-3 there.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.deterministic.glmm import GlmmResults, fit_glmm
from stochmm.deterministic.quadrature import QuadratureError
from stochmm.errors import ConvergenceWarning, SingularFitWarning

REF = Path(__file__).resolve().parents[1] / "reference"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
POIS = "incidence ~ period + offset(log(size)) + (1 | herd)"
VERB = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"


def _load(name):
    raw = json.loads((REF / name).read_text())
    return {e["id"]: e["results"] for e in raw} if isinstance(raw, list) else raw


R = {**_load("lme4_results.json"), **_load("lme4_extra_results.json")}
X = _load("lme4_glmm_extra.json")


def _vec(d):
    return np.array(list(d.values()), dtype=float)


def _close_se(a, b, se, k):
    """|a − b| ≤ k·SE elementwise (coefficients near zero)."""
    a, b, se = (np.asarray(v, dtype=float) for v in (a, b, se))
    assert np.all(np.abs(a - b) <= k * se), (a, b, np.abs(a - b) / se)


def _check(fit, ref, *, obj=1e-3, fe=1e-3, th=1e-3, se=1e-2, objective_key="minus2logLik_abs"):
    target = ref.get(objective_key, ref.get("minus2logLik"))
    assert fit.objective < target + obj, (fit.objective, target)
    assert fit.objective > target - 0.05  # "lower" means a better optimum of the same function, not a bug
    np.testing.assert_allclose(fit.fixef.to_numpy(), _vec(ref["fixef"]), rtol=fe)
    if "theta" in ref:
        np.testing.assert_allclose(fit.theta, _vec(ref["theta"]), rtol=th)
    if se is not None:
        np.testing.assert_allclose(fit.se.to_numpy(), _vec(ref["se"]), rtol=se)


@pytest.fixture(scope="module")
def cbpp():
    return sm.datasets.load("cbpp")


@pytest.fixture(scope="module")
def verbagg():
    return sm.datasets.load("VerbAgg")


@pytest.fixture(scope="module")
def cbpp_fits(cbpp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these fits may warn
        return {nq: sm.glmer(CBPP, cbpp, nagq=nq) for nq in (0, 1, 5, 9, 25)}


# ============================================================================= cbpp
@pytest.mark.parametrize("nq", [0, 5, 9, 25])
def test_cbpp_matches_lme4(cbpp_fits, nq):
    # lme4_results.json cbpp_agq{nq}; nAGQ=25: −2logLik 100.0100 + saturated 83.9567 = 183.9667,
    # θ 0.6475199, β (−1.399224, −0.9914089, −1.12781, −1.579481)
    fit = cbpp_fits[nq]
    _check(fit, R[f"cbpp_agq{nq}"])
    assert fit.lme4_objective == pytest.approx(R[f"cbpp_agq{nq}"]["minus2logLik"], abs=1e-3)


def test_cbpp_laplace_matches_lme4_and_exact_laplace(cbpp_fits):
    fit = cbpp_fits[1]
    ref = R["cbpp_agq1"]  # −2logLik 184.0531, θ 0.6420699, β (−1.398343, −0.991925, −1.128216, −1.579745)
    _check(fit, ref, se=None)
    assert fit.objective == pytest.approx(184.0531, abs=1e-3)
    assert ref["minus2logLik"] - fit.objective == pytest.approx(5.69e-4, abs=2e-5)  # lme4 sits above exact Laplace
    np.testing.assert_allclose(fit.se, _vec(ref["se"]), rtol=1.5e-2)  # lme4 default tolPwrss: see module doc
    tight = X["cbpp_agq1_tight"]  # lme4, glmerControl(tolPwrss = 1e-12)
    _check(fit, tight, obj=1e-6, fe=1e-4, th=1e-4, se=1e-4, objective_key="minus2logLik")
    tmb = R["tmb_cbpp"]  # glmmTMB: exact Laplace
    assert fit.objective == pytest.approx(tmb["minus2logLik"], abs=1e-6)
    np.testing.assert_allclose(fit.fixef, _vec(tmb["fixef"]), rtol=1e-5)
    np.testing.assert_allclose(fit.se, _vec(tmb["se"]), rtol=1e-4)


def test_one_loglik_scale_across_methods(cbpp_fits):
    # every method reports the full −2 log L: Laplace, AGQ and nAGQ=0 are directly comparable and the
    # AGQ values converge from above towards the exact marginal likelihood (lme4 issue #161)
    obj = {nq: f.objective for nq, f in cbpp_fits.items()}
    assert obj[1] - obj[25] == pytest.approx(0.0858, abs=5e-4)
    assert abs(obj[9] - obj[25]) < 1e-5
    assert all(f.loglik == pytest.approx(-f.objective / 2) for f in cbpp_fits.values())
    assert cbpp_fits[25].lme4_objective == pytest.approx(100.0100305, abs=1e-6)
    assert cbpp_fits[25].saturated_loglik == pytest.approx(-83.9567075378711 / 2, abs=1e-10)


def test_cbpp_conditional_modes_and_variances(cbpp_fits):
    ref = X["cbpp_agq1_tight"]["ranef"]["herd"]
    fit = cbpp_fits[1]
    np.testing.assert_allclose(fit.ranef["herd"]["(Intercept)"], ref["terms"]["(Intercept)"], atol=5e-5)
    np.testing.assert_allclose(np.sqrt(fit.ranef_condvar["herd"][:, 0, 0]), ref["condsd"]["(Intercept)"], atol=2e-5)
    assert list(fit.ranef["herd"].index) == ref["levels"]
    for nq in (0, 25):
        np.testing.assert_allclose(fit_ranef := cbpp_fits[nq].ranef["herd"]["(Intercept)"],
                                   R[f"cbpp_agq{nq}"]["ranef"]["herd"]["terms"]["(Intercept)"], atol=5e-4)
        assert len(fit_ranef) == 15


# ============================================================================= VerbAgg
@pytest.fixture(scope="module")
def verbagg_fits(verbagg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {nq: sm.glmer(VERB, verbagg, nagq=nq) for nq in (0, 1)}


def test_verbagg_fast_matches_lme4(verbagg_fits):
    # lme4_results.json verbagg_agq0: −2logLik 8151.590 (ours is the exact Laplace at the joint modes, lower)
    _check(verbagg_fits[0], R["verbagg_agq0"])
    assert verbagg_fits[0].vcov_source == "RX"


def test_verbagg_laplace_matches_lme4_and_glmmtmb(verbagg_fits):
    fit = verbagg_fits[1]
    ref = R["verbagg_agq1"]  # −2logLik 8151.40049
    assert fit.objective == pytest.approx(8151.3997, abs=1e-4)
    _check(fit, ref, fe=2e-3)
    tmb = R["tmb_verbagg"]  # glmmTMB exact Laplace: 8151.39971975614
    assert fit.objective == pytest.approx(tmb["minus2logLik"], abs=1e-6)
    np.testing.assert_allclose(fit.fixef, _vec(tmb["fixef"]), rtol=1e-4)
    np.testing.assert_allclose(fit.se, _vec(tmb["se"]), rtol=1e-3)
    np.testing.assert_allclose(fit.theta, [1.33970422773092, 0.495306366505268], rtol=1e-4)  # glmmTMB SDs
    assert fit.timing["engine"] == "BlockedEngine"
    re = X["verbagg_agq1_tight"]["ranef"]
    np.testing.assert_allclose(fit.ranef["item"]["(Intercept)"], re["item"]["terms"]["(Intercept)"], atol=2e-4)
    np.testing.assert_allclose(np.sqrt(fit.ranef_condvar["id"][:, 0, 0]), re["id"]["condsd"]["(Intercept)"], atol=1e-4)


def test_quadrature_refuses_crossed_factors(verbagg):
    with pytest.raises(QuadratureError, match="single grouping factor.*importance sampling"):
        sm.glmer(VERB, verbagg, nagq=5)


# ============================================================================= Poisson with offset
@pytest.mark.parametrize("nq", [0, 1, 25])
def test_poisson_with_offset_matches_lme4(cbpp, nq):
    # lme4_extra_results.json cbpp_pois_agq{nq}: incidence ~ period + offset(log(size)) + (1 | herd);
    # lme4's nAGQ 0/1 objectives include 2 Σ log y! = 173.2978, nAGQ 25 drops the saturated term
    fit = sm.glmer(POIS, cbpp, family="poisson", nagq=nq)
    ref = R[f"cbpp_pois_agq{nq}"]
    _check(fit, ref, se=None if nq == 1 else 1e-2)
    if nq == 1:
        np.testing.assert_allclose(fit.se, _vec(ref["se"]), rtol=1.5e-2)
        _check(fit, X["cbpp_pois_agq1_tight"], obj=1e-6, fe=1e-4, th=1e-4, se=1e-4, objective_key="minus2logLik")
        tmb = R["tmb_cbpp_pois"]
        assert fit.objective == pytest.approx(tmb["minus2logLik"], abs=1e-6)
        np.testing.assert_allclose(fit.se, _vec(tmb["se"]), rtol=1e-4)
    if nq == 25:
        assert fit.lme4_objective == pytest.approx(ref["minus2logLik"], abs=1e-3)
    # the same fit through the builder and offset= instead of offset() in the formula
    m = sm.Model("incidence ~ period + (1 | herd)", cbpp, family="poisson", offset=np.log(cbpp["size"].to_numpy()))
    assert m.fit(nagq=nq).objective == pytest.approx(fit.objective, abs=1e-8)


# ============================================================================= links and weights
@pytest.mark.parametrize("link", ["probit", "cloglog"])
def test_non_canonical_links(cbpp, link):
    # exact (observed-information) Laplace = glmmTMB (lme4_glmm_extra.json tmb_cbpp_<link>);
    # hessian="expected" = lme4's Fisher-weight Laplace (lme4_extra_results.json cbpp_<link>_agq1)
    fit = sm.glmer(CBPP, cbpp, link=link)
    tmb = X[f"tmb_cbpp_{link}"]
    assert fit.objective == pytest.approx(tmb["minus2logLik"], abs=1e-6)
    np.testing.assert_allclose(fit.fixef, _vec(tmb["fixef"]), rtol=1e-4)
    np.testing.assert_allclose(fit.se, _vec(tmb["se"]), rtol=1e-3)
    np.testing.assert_allclose(fit.theta, tmb["sd"], rtol=1e-4)
    lme = sm.glmer(CBPP, cbpp, link=link, hessian="expected")
    _check(lme, R[f"cbpp_{link}_agq1"])
    _check(lme, X[f"cbpp_{link}_agq1_tight"], obj=1e-6, fe=1e-4, th=1e-4, se=1e-3, objective_key="minus2logLik")
    assert lme.objective - fit.objective == pytest.approx(0.0758 if link == "probit" else 0.0881, abs=1e-3)
    assert fit.family.label == f"binomial  ( {link} )"


def test_proportions_with_weights_equal_cbind(cbpp, cbpp_fits):
    # lme4_extra_results.json cbpp_binom_weights_agq1: identical to the cbind fit
    prop = cbpp.assign(prop=cbpp["incidence"] / cbpp["size"])
    fit = sm.glmer("prop ~ period + (1 | herd)", prop, weights="size")
    assert fit.objective == pytest.approx(cbpp_fits[1].objective, abs=1e-8)
    np.testing.assert_allclose(fit.fixef, cbpp_fits[1].fixef, rtol=1e-7)
    _check(fit, R["cbpp_binom_weights_agq1"], se=1.5e-2)


# ============================================================================= vector-valued AGQ
@pytest.fixture(scope="module")
def slopes():
    d = X["glmmadaptive_slopes"]
    D = d["data"]
    df = pd.DataFrame(dict(id=pd.Categorical([str(i) for i in D["id"]], categories=[str(i) for i in range(1, 101)]),
                           time=D["time"], sex=pd.Categorical(D["sex"], categories=["male", "female"]), y=D["y"]))
    return d, df


def test_vector_laplace_matches_lme4_and_glmmtmb(slopes):
    d, df = slopes
    with pytest.warns(SingularFitWarning, match=r"id\.time=\d"):
        fit = sm.glmer("y ~ sex * time + (time | id)", df)
    lme = d["lme4_laplace"]  # −2logLik 723.40291: the Laplace optimum is singular (correlation → 1)
    assert fit.objective < lme["minus2logLik"] + 1e-6
    # the interaction (0.0022, SE 0.075) is compared on the SE scale
    _close_se(fit.fixef, _vec(lme["fixef"]), _vec(lme["se"]), 1e-3)
    np.testing.assert_allclose(fit.theta[:2], _vec(lme["theta"])[:2], rtol=1e-3)
    np.testing.assert_allclose(fit.se, _vec(lme["se"]), rtol=1e-3)
    assert fit.is_singular


def test_vector_agq_against_glmmadaptive(slopes):
    # GLMMadaptive 0.5.26 (docs/articles/Methods_MixMod.html): 11-point AGQ, log-Lik −358.8142,
    # SDs 0.6808/0.2510, corr 0.6544, β (−2.0571, −1.1696, 0.2616, 0.0020)
    d, df = slopes
    pub = d["glmmadaptive_published"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularFitWarning)
        fit = sm.glmer("y ~ sex * time + (time | id)", df, nagq=11)
    assert fit.rule.size == 121 and fit.timing["engine"] == "LevelEngine"
    # our 11-point maximum is at least as high as GLMMadaptive's (which stops on a flat ridge) ...
    assert fit.loglik > pub["logLik"]
    assert fit.loglik == pytest.approx(-358.7897, abs=1e-3)
    # ... and the converged marginal likelihood (40×40 nodes) agrees: ours is higher by 0.016
    from stochmm.deterministic.quadrature import agq, tensor_rule

    eng = fit.engine
    ours = agq(eng, fit.theta, fit.fixef.to_numpy(), tensor_rule(40, 2))[0]
    theirs = d["independent_agq_at_glmmadaptive_estimates"]["values"][-1]["minus2logLik"]
    assert ours < theirs - 0.02
    _close_se(fit.fixef, _vec(pub["fixef"]), _vec(pub["se"]), 0.15)
    np.testing.assert_allclose(fit.se, _vec(pub["se"]), rtol=0.1)


# ============================================================================= results vocabulary
def test_summary_like_glmer(cbpp_fits):
    text = str(cbpp_fits[1].summary())
    lines = text.splitlines()
    assert lines[0] == "Generalized linear mixed model fit by maximum likelihood (Laplace Approximation) ['glmerMod']"
    assert lines[1] == " Family: binomial  ( logit )"
    assert "   194.1    204.2    -92.0    184.1       51" in text
    assert "Residual" not in text and "z value Pr(>|z|)" in text
    assert "(Intercept)  -1.3985     0.2325  -6.016 1.79e-09 ***" in text
    assert "Number of obs: 56, groups:  herd, 15" in text
    assert "Signif. codes" in text and "Correlation of Fixed Effects:" in text
    agq_title = str(cbpp_fits[25].summary()).splitlines()[0]
    assert "(Adaptive Gauss-Hermite Quadrature, nAGQ = 25)" in agq_title
    tab = cbpp_fits[1].coef_table()
    assert list(tab.columns) == ["Estimate", "Std. Error", "z value", "Pr(>|z|)"]


def test_results_vocabulary(cbpp, cbpp_fits):
    fit = cbpp_fits[1]
    assert isinstance(fit, GlmmResults)
    assert fit.sigma == 1.0 and fit.df == 5 and fit.nobs == 56
    assert fit.aic == pytest.approx(R["cbpp_agq1"]["AIC"], abs=1e-3)
    assert fit.bic == pytest.approx(R["cbpp_agq1"]["BIC"], abs=1e-3)
    vc = fit.varcorr
    assert list(vc["group"]) == ["herd"] and vc["sd"].iloc[0] == pytest.approx(fit.theta[0])
    # fitted on the response scale, and predict with new levels → zero random effects
    np.testing.assert_allclose(fit.fitted, fit.predict(cbpp), rtol=1e-12)
    eta = fit.predict(cbpp, type="link")
    np.testing.assert_allclose(fit.fitted, 1 / (1 + np.exp(-eta)), rtol=1e-12)
    new = cbpp.head(2).assign(herd=["no-such-herd", "1"])
    np.testing.assert_allclose(fit.predict(new, type="link")[0], fit.predict(new.head(1), re_form=None, type="link")[0])
    assert fit.predict(new)[1] == pytest.approx(fit.fitted[1])
    # Pearson residuals as glmer's "Scaled residuals"
    mu, n = fit.fitted, cbpp["size"].to_numpy()
    y = cbpp["incidence"].to_numpy() / n
    np.testing.assert_allclose(fit.pearson_residuals, (y - mu) / np.sqrt(mu * (1 - mu) / n))
    assert fit.optsum.feval > 0 and fit.timing["pirls_iterations"] > 0
    assert fit.derivs is not None and fit.max_grad < 1e-3


def test_simulate(cbpp_fits, cbpp):
    fit = cbpp_fits[1]
    s1, s2 = fit.simulate(200, seed=7), fit.simulate(200, seed=7)
    pd.testing.assert_frame_equal(s1, s2)
    assert s1.shape == (56, 200) and list(s1.columns[:2]) == ["sim_1", "sim_2"]
    n = cbpp["size"].to_numpy()
    assert np.all((s1.to_numpy() >= 0) & (s1.to_numpy() <= n[:, None]))
    assert np.all(s1.to_numpy() == np.round(s1.to_numpy()))
    # the marginal mean of the simulated incidence ≈ E[n·g⁻¹(η + b)], b ~ N(0, θ²)
    z, w = np.polynomial.hermite_e.hermegauss(30)
    eta = fit.predict(cbpp, type="link", re_form=None)
    expected = n * ((w / w.sum()) * (1 / (1 + np.exp(-(eta[:, None] + fit.theta[0] * z))))).sum(1)
    assert abs(s1.to_numpy().mean() - expected.mean()) < 0.15
    cond = fit.simulate(3, seed=1, use_u=True)
    assert cond.shape == (56, 3)


def test_method_and_option_errors(cbpp):
    m = sm.Model(CBPP, cbpp, family="binomial")
    assert m.fit(method="agq", nagq=5).nagq == 5
    assert m.fit(nagq=0).method == "fast"
    assert m.fit(method="fast").nagq == 0
    with pytest.raises(ValueError, match="needs nagq >= 2"):
        fit_glmm(m, method="agq", nagq=1)
    with pytest.raises(ValueError, match="method='fast' means nagq=0"):
        fit_glmm(m, method="fast", nagq=3)
    with pytest.raises(ValueError, match="'laplace', 'agq' or 'fast'"):
        fit_glmm(m, method="REML")
    with pytest.raises(ValueError, match="optimizer"):
        fit_glmm(m, optimizer="nelder-mead")
    with pytest.raises(ValueError, match="start theta must have 1 values"):
        fit_glmm(m, start={"theta": [1.0, 1.0]})


def test_optimizers_agree(cbpp, cbpp_fits):
    for opt in ("lbfgs", "bobyqa"):
        fit = sm.glmer(CBPP, cbpp, optimizer=opt)
        assert fit.objective == pytest.approx(cbpp_fits[1].objective, abs=1e-6)
        np.testing.assert_allclose(fit.fixef, cbpp_fits[1].fixef, rtol=2e-4)
    fit = sm.glmer(CBPP, cbpp, nagq=25, optimizer="bobyqa")
    assert fit.objective == pytest.approx(cbpp_fits[25].objective, abs=1e-6)


def test_convergence_warning_prints_the_number(cbpp):
    with pytest.warns(ConvergenceWarning, match=r"max\|grad\| = [0-9.e-]+ \(tol = 0.002"):
        fit = sm.glmer(CBPP, cbpp, tol=10.0)  # stage 2 stops at once: the nAGQ=0 optimum is not the Laplace one
    assert any("max|grad|" in w for w in fit.warnings)



# -- issue 8 (reliability) ----------------------------------------------------------------------------------
def test_glmer_takes_method_and_lme4_spellings(cbpp, cbpp_fits):
    agq5 = sm.glmer(CBPP, cbpp, method="agq", nagq=5)
    assert agq5.nagq == 5
    assert sm.glmer(CBPP, cbpp, nAGQ=5).objective == pytest.approx(agq5.objective, abs=1e-8)
    m = sm.Model(CBPP, cbpp, family="binomial")
    assert m.fit(nAGQ=0).nagq == 0 and m.fit(method="agq", nagq=5).objective == pytest.approx(agq5.objective, abs=1e-8)
    with pytest.raises(sm.OptionError, match="REML is for linear mixed models"):
        sm.glmer(CBPP, cbpp, REML=False)
    with pytest.raises(sm.OptionError, match="REML is for linear mixed models"):
        m.fit(reml=False)
    with pytest.raises(TypeError, match=r"'optimiser'. Did you mean 'optimizer'\? Valid keywords: check_derivatives"):
        sm.glmer(CBPP, cbpp, optimiser="newton")
    with pytest.raises(sm.OptionError, match=r"optimizer must be one of 'newton', 'lbfgs', 'bobyqa'; got 'Newton'"):
        sm.glmer(CBPP, cbpp, optimizer="Newton")
    with pytest.raises(sm.OptionError, match="condvar must be True or False"):
        fit_glmm(m, condvar="yes")
    with pytest.raises(sm.OptionError, match="got both nagq=3 and nAGQ=5"):
        sm.glmer(CBPP, cbpp, nagq=3, nAGQ=5)
    with pytest.raises(ValueError, match="method='fast' means nagq=0"):
        sm.glmer(CBPP, cbpp, method="fast", nagq=5)


def test_nagq_has_lme4s_ceiling(cbpp):
    for n in (26, 1000):
        with pytest.raises(QuadratureError, match=f"nagq={n} is above the ceiling of 25"):
            sm.glmer(CBPP, cbpp, nagq=n)
    with pytest.raises(sm.OptionError, match="nagq must be a non-negative whole number"):
        sm.glmer(CBPP, cbpp, nagq="5")
    fit = sm.glmer(CBPP, cbpp, nagq=25)
    assert np.isfinite(fit.objective) and np.all(np.isfinite(fit.se))
