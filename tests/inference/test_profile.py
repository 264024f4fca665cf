"""Profile likelihood against lme4 1.1-31's confint(method = "profile") (models/reference/make_inference_refs.R
and the shared reference file for cbpp). Tolerance 1e-3 absolute on the endpoints; lme4 interpolates its
profile by splines, stochmm finds the exact roots of zeta = +-1.96."""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm

CASES = {
    "sleep_slopes_REML": ("Reaction ~ Days + (Days | Subject)", "sleepstudy", True, 1e-3),
    "penicillin_REML": ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", True, 1e-3),
    # lme4's spline interpolation of its coarse Dyestuff profile is off by up to 2e-3 (its .sig01 lower
    # endpoint 12.19854 vs the exact root 12.19651; the intercept of Dyestuff2 by 7e-4)
    "dyestuff_ML": ("Yield ~ 1 + (1 | Batch)", "dyestuff", False, 3e-3),
    "dyestuff2_ML": ("Yield ~ 1 + (1 | Batch)", "dyestuff2", False, 1e-3),
}


@pytest.mark.parametrize("key", list(CASES))
def test_lmm_profile_intervals_match_lme4(refs, key):
    formula, data, reml, tol = CASES[key]
    with pytest.warns() if key == "dyestuff2_ML" else _nullcontext():
        fit = sm.lmer(formula, sm.datasets.load(data), reml=reml)
    ci = fit.confint(method="profile")
    r = refs["profile"][key]
    assert len(ci) == len(r["names"])
    np.testing.assert_allclose(ci.iloc[:, 0], r["lower"], atol=tol)
    np.testing.assert_allclose(ci.iloc[:, 1], r["upper"], atol=tol)


def test_boundary_sd_gets_zero_with_a_note():
    with pytest.warns(sm.errors.SingularFitWarning):
        fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff2"), reml=False)
    pr = fit.profile()
    assert pr.confint().iloc[0, 0] == 0.0
    assert any("bound 0" in n for n in pr.notes)
    assert not pr.table["zeta"].isna().any()


def test_glmm_profile_cbpp_matches_lme4(lme4_refs):
    ref = lme4_refs["cbpp_agq1"]["confint"]["profile"]["ci"]
    fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    pr = fit.profile()
    ci = pr.confint()
    want = pd.DataFrame(ref).T.to_numpy(dtype=float)
    np.testing.assert_allclose(ci.to_numpy(), want, atol=1e-3)
    # tidy table, zeta increasing in each parameter, 0 at the estimate
    t = pr.table
    assert list(t.columns) == ["parameter", "value", "zeta"]
    for _, g in t.groupby("parameter"):
        assert np.all(np.diff(g.sort_values("value")["zeta"].to_numpy()) > 0)
        assert np.isclose(g["zeta"].abs().min(), 0.0)
    # interpolated intervals at another level are inside the 95 % ones
    c80 = pr.confint(0.8)
    assert np.all(c80.iloc[:, 0] > ci.iloc[:, 0]) and np.all(c80.iloc[:, 1] < ci.iloc[:, 1])


def test_profile_which_and_bad_names():
    fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), reml=False)
    pr = fit.profile(which=".sig01")
    assert list(pr.estimates.index) == ["sd_(Intercept)|Batch"]
    assert list(fit.profile(which="beta_").estimates.index) == ["(Intercept)"]
    with pytest.raises(ValueError, match="not a parameter of the model.*Did you mean"):
        fit.profile(which="sd_(Intercept)|Bacth")
    with pytest.raises(ValueError, match="level"):
        fit.confint(level=95, method="profile")
    with pytest.raises(ValueError, match="method must be"):
        fit.confint(method="likelihood")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


AGQ_CASES = {
    "cbpp_agq25": (CBPP, "binomial", 25),
    "cbpp_poisson_agq9": ("incidence ~ period + offset(log(size)) + (1 | herd)", "poisson", 9),
}


@pytest.mark.parametrize("key", list(AGQ_CASES))
def test_glmm_agq_profile_matches_lme4(refs, key):
    """nAGQ > 1 fits are profiled on the AGQ deviance with the fit's rule, as lme4's profile.merMod does."""
    formula, family, nagq = AGQ_CASES[key]
    fit = sm.glmer(formula, sm.datasets.load("cbpp"), family=family, nagq=nagq)
    pr = fit.profile()
    r = refs["profile"][key]
    ci = pr.confint()
    assert len(ci) == len(r["names"])
    np.testing.assert_allclose(ci.iloc[:, 0], r["lower"], atol=1e-3)
    np.testing.assert_allclose(ci.iloc[:, 1], r["upper"], atol=1e-3)
    assert any(f"nAGQ = {nagq}" in n for n in pr.notes)


def test_glmm_agq_profile_is_not_the_laplace_one(refs, lme4_refs):
    fit = sm.glmer(CBPP, sm.datasets.load("cbpp"), nagq=25)
    ci = fit.profile(which="sd_(Intercept)|herd").confint()
    # the AGQ intervals are not lme4's Laplace ones (the SD's upper endpoint moves by about 0.011)
    lap = pd.DataFrame(lme4_refs["cbpp_agq1"]["confint"]["profile"]["ci"]).T.to_numpy(dtype=float)
    assert abs(ci.iloc[0, 1] - lap[0, 1]) > 5e-3


def test_glmm_nagq0_profile_is_the_profile_of_its_own_criterion(refs):
    """lme4 1.1-31 cannot profile an nAGQ = 0 fit (its error is pinned); stochmm profiles the fit's own
    criterion. Checked independently: at each endpoint of period2 a fresh nAGQ = 0 fit of the model without
    period2 and with the offset period2 * endpoint has objective = objective + 1.96^2, and the nAGQ = 0
    criterion at the SD endpoints is objective + 1.96^2."""
    assert "theta size mismatch" in refs["profile_glmm_nagq0"]["lme4_error"]
    d = sm.datasets.load("cbpp").copy()
    fit = sm.glmer(CBPP, d, nagq=0)
    pr = fit.profile(which=["period2", "sd_(Intercept)|herd"])
    ci = pr.confint()
    assert any("nAGQ = 0" in n for n in pr.notes)
    z2 = 1.959963984540054**2
    per = d["period"].astype(str)
    d["p3"], d["p4"] = (per == "3").astype(float), (per == "4").astype(float)
    x2 = (per == "2").to_numpy(dtype=float)
    for v in ci.loc["period2"]:
        g = sm.glmer("cbind(incidence, size - incidence) ~ p3 + p4 + (1 | herd)", d, nagq=0, offset=v * x2)
        assert abs(g.objective - fit.objective - z2) < 1e-5
    from stochmm.deterministic.glmm import glmm_engine

    eng = glmm_engine(fit.model)
    for v in ci.loc["sd_(Intercept)|herd"]:
        assert abs(eng.fast(np.array([v])) - fit.objective - z2) < 1e-6
    # close to, but not, the Laplace intervals
    lap = sm.glmer(CBPP, d).profile(which=["period2", "sd_(Intercept)|herd"]).confint()
    assert 0 < np.max(np.abs(ci.to_numpy() - lap.to_numpy())) < 0.01


def test_profile_options_are_checked():
    """delta <= 0 traced nothing and gave NaN intervals silently; which= of another type and a
    Profile.confint level outside (0, 1) get specific errors."""
    fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), reml=False)
    for bad in (0, -1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="delta must be a positive number"):
            fit.profile(which="sigma", delta=bad)
    with pytest.raises(TypeError, match="which must be"):
        fit.profile(which=3)
    pr = fit.profile(which="sigma")
    for bad in (2, 0, "0.9"):
        with pytest.raises(ValueError, match="level must be a number in"):
            pr.confint(level=bad)


def test_profile_interval_of_the_intercept_keeps_its_digits_when_y_is_far_from_zero():
    """Adding 1e8 to y moves the intercept's profile interval by exactly 1e8 (the root finder's tolerance
    was relative to the value: 0.01 at 1e8)."""
    d = sm.datasets.load("sleepstudy")
    f = "Reaction ~ Days + (1 | Subject)"
    base = sm.lmer(f, d, reml=False).profile(which="(Intercept)").confint()
    c = 1e8
    sh = sm.lmer(f, d.assign(Reaction=d["Reaction"] + c), reml=False).profile(which="(Intercept)").confint()
    np.testing.assert_allclose(sh.to_numpy() - c, base.to_numpy(), atol=1e-4)


@pytest.mark.parametrize("c", [1e-5])
def test_profile_intervals_follow_the_units_of_y(c):
    """Multiplying y by c multiplies the SD and σ intervals by c and leaves the correlation's alone (the
    absolute step floors made y·1e-5 return collapsed SD intervals and a correlation of 0.08)."""
    d = sm.datasets.load("sleepstudy")
    f = "Reaction ~ Days + (Days | Subject)"
    base = sm.lmer(f, d, reml=False).profile(which="theta_").confint()
    got = sm.lmer(f, d.assign(Reaction=d["Reaction"] * c), reml=False).profile(which="theta_").confint()
    unit = np.where(got.index.str.startswith("cor_"), 1.0, c)[:, None]
    np.testing.assert_allclose(got.to_numpy() / unit, base.to_numpy(), rtol=1e-4, atol=1e-5)
