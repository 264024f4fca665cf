"""Denominator df against lmerTest 3.1-3 / pbkrtest 0.5.2 (models/reference/make_inference_refs.R).

Satterthwaite and Kenward-Roger coefficient tables, Type III and Type I F tests and the KR-adjusted
covariance for six models: sleepstudy random slopes (balanced and an unbalanced subset), a random-slope
model with a between-subject factor and its interaction, Penicillin (crossed), Pastes (nested) and cake
(split plot, interaction of a factor and an ordered factor). Fits are evaluated at lme4's θ; tolerance
1e-3 relative on df and p-values (lmerTest's own derivatives are numerical: its df carry ~1e-5 error).
"""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.inference import ddf

MODELS = ["sleep_slopes", "sleep_unbalanced", "sleep_factor", "penicillin", "pastes", "cake"]


@pytest.fixture(scope="module")
def fits(fit_at):
    return {k: fit_at(k) for k in MODELS}


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize("method,ref", [("satterthwaite", "satterthwaite"), ("kenward-roger", "kenward_roger")])
def test_coef_table_matches_lmertest(fits, refs, key, method, ref):
    tab = fits[key].coef_table(ddf=method)
    r = pd.DataFrame(refs[key][ref]).T.astype(float).loc[tab.index]
    assert list(tab.columns) == ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
    np.testing.assert_allclose(tab["df"], r["df"], rtol=1e-3)
    np.testing.assert_allclose(tab["Pr(>|t|)"], r["p"], rtol=1e-3)
    np.testing.assert_allclose(tab["Std. Error"], r["se"], rtol=1e-5)
    np.testing.assert_allclose(tab["t value"], r["t"], rtol=1e-5)


@pytest.mark.parametrize("key", ["sleep_slopes", "sleep_unbalanced", "sleep_factor", "cake"])
@pytest.mark.parametrize("method,typ,ref", [("satterthwaite", 3, "anova_satterthwaite_type3"),
                                            ("satterthwaite", 1, "anova_satterthwaite_type1"),
                                            ("kenward-roger", 3, "anova_kr_type3"),
                                            ("kenward-roger", 1, "anova_kr_type1")])
def test_f_tests_match_lmertest(fits, refs, key, method, typ, ref):
    a = sm.anova(fits[key], ddf=method, type=typ)
    r = pd.DataFrame(refs[key][ref]).T.astype(float)
    assert list(a.index) == list(r.index)
    np.testing.assert_array_equal(a["NumDF"], r["NumDF"])
    np.testing.assert_allclose(a["DenDF"], r["DenDF"], rtol=1e-3)
    np.testing.assert_allclose(a["F value"], r["F"], rtol=1e-5)
    np.testing.assert_allclose(a["Pr(>F)"], r["p"], rtol=1e-3)


@pytest.mark.parametrize("key", MODELS)
def test_vcov_kr_matches_pbkrtest(fits, refs, key):
    v = fits[key].vcov_kr()
    np.testing.assert_allclose(v.to_numpy(), np.asarray(refs[key]["vcov_kr"], dtype=float).reshape(v.shape),
                               rtol=1e-5, atol=1e-10)


def test_shared_sleepstudy_reference(lme4_refs):
    """The shared reference file: lmerTest Satterthwaite df 16.99973 / 16.99998 (numerical), KR 17 / 17."""
    ref = lme4_refs["sleepstudy_slopes_REML"]["ddf"]
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    s = fit.coef_table(ddf="satterthwaite")
    np.testing.assert_allclose(s["df"], [ref["satterthwaite_lmerTest"][k]["df"] for k in s.index], rtol=1e-3)
    k = fit.coef_table(ddf="kenward-roger")
    np.testing.assert_allclose(k["df"], [17, 17], rtol=1e-6)
    np.testing.assert_allclose(fit.vcov_kr().to_numpy(), ref["kenward_roger_pbkrtest"]["vcov_adj"]["matrix"],
                               rtol=1e-4)


def test_exact_derivatives_agree_with_finite_differences(fits):
    """The analytic Hessian of the deviance in (θ, σ) against central differences of the deviance."""
    fit = fits["sleep_factor"]
    _, _, H = ddf._satterthwaite_parts(fit)
    from stochmm.deterministic.lmm import ProfiledDeviance

    dev = ProfiledDeviance(fit.model, reml=True)
    n, p = fit.model.n, fit.model.p

    def d(vp):
        bs = dev.system.factor(fit.model.lambda_blocks(vp[:-1]))
        s2 = vp[-1] ** 2
        return bs.logdet_L + bs.logdet_RX + bs.pwrss / s2 + (n - p) * np.log(2 * np.pi * s2)

    x0 = np.concatenate([fit.theta, [fit.sigma]])
    h = 1e-4 * np.maximum(np.abs(x0), 0.1)
    Hfd = np.empty_like(H)
    for i in range(x0.size):
        for j in range(x0.size):
            ei, ej = np.eye(x0.size)[i] * h[i], np.eye(x0.size)[j] * h[j]
            Hfd[i, j] = (d(x0 + ei + ej) - d(x0 + ei - ej) - d(x0 - ei + ej) + d(x0 - ei - ej)) / (4 * h[i] * h[j])
    np.testing.assert_allclose(H, Hfd, rtol=1e-4, atol=1e-4 * np.abs(H).max())


def test_between_within_sleepstudy(fits):
    """nlme's rule: Days varies within Subject -> 180 - 18 - 1 = 161 df; the intercept too (as nlme prints)."""
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    tab = fit.coef_table(ddf="between-within")
    np.testing.assert_array_equal(tab["df"], [161, 161])
    d = fits["sleep_factor"]
    bw = d.coef_table(ddf="between-within")["df"]
    assert bw["Gb"] == 18 - 1 - 2 and bw["Days"] == 180 - 18 - 3


def test_summary_with_ddf():
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    text = str(fit.summary(ddf="kenward-roger"))
    assert "Kenward-Roger" in text and "Pr(>|t|)" in text and "df" in text
    assert "Pr(>|t|)" not in str(fit.summary())


def test_bad_ddf_inputs():
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    with pytest.raises(ValueError, match="Did you mean 'satterthwaite'"):
        fit.coef_table(ddf="satterthwait")
    with pytest.raises(TypeError, match="ddf must be a string"):
        fit.coef_table(ddf=3)
    with pytest.raises(ValueError, match="type must be 1"):
        sm.anova(fit, type=2)
    ml = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"), reml=False)
    with pytest.raises(ValueError, match="REML"):
        ml.coef_table(ddf="kenward-roger")
    g = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    with pytest.raises(ValueError, match="not defined for a generalized linear mixed model.*pboot"):
        g.coef_table(ddf="satterthwaite")
    with pytest.raises(ValueError, match="pboot"):
        sm.anova(g, ddf="satterthwaite")


@pytest.mark.parametrize("scale", [1e5, 1e7, 1e-5])
def test_satterthwaite_df_invariant_to_the_scale_of_y(scale):
    # df are scale-free: the near-zero test on the Hessian in (θ, σ) must not depend on the units of y
    d = sm.datasets.load("sleepstudy")
    d = d[d["Days"] < 4].reset_index(drop=True)
    ref = sm.lmer("Reaction ~ Days + (1 | Subject)", d).coef_table(ddf="satterthwaite")["df"]
    d["Reaction"] = d["Reaction"] * scale
    fit = sm.lmer("Reaction ~ Days + (1 | Subject)", d)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fit.coef_table(ddf="satterthwaite")["df"]
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("transform", [lambda x: x * 1e-9, lambda x: x + 1e6])
def test_between_within_levels_do_not_depend_on_the_units_of_x(transform):
    """Whether a column varies within a group is a yes/no question: Days·1e-9 (below allclose's absolute
    1e-8) and Days + 1e6 (within allclose's relative 1e-5) still vary within Subject."""
    d = sm.datasets.load("sleepstudy")
    fit = sm.lmer("Reaction ~ Days + (1 | Subject)", d.assign(Days=transform(d["Days"])))
    np.testing.assert_array_equal(fit.coef_table(ddf="between-within")["df"], [161, 161])


@pytest.mark.parametrize("c", [1e-5, 1e-8])
def test_type1_f_tests_do_not_depend_on_the_units_of_x(ref_data, c):
    """Type I contrasts come from the Doolittle factor of X'X, whose near-zero test was absolute (as
    lmerTest's): Days·1e-5 halved the F of Days, Days·1e-8 changed G's."""
    d = ref_data("ss")
    f = "Reaction ~ Days * G + (1 | Subject)"
    base = sm.anova(sm.lmer(f, d), type=1)
    got = sm.anova(sm.lmer(f, d.assign(Days=d["Days"] * c)), type=1)
    np.testing.assert_allclose(got["F value"], base["F value"], rtol=1e-5)
    np.testing.assert_allclose(got["DenDF"], base["DenDF"], rtol=1e-5)
