"""Linear mixed models against lme4 1.1-31 (values pinned in tests/reference/, see conftest)."""

import warnings

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.deterministic.lmm import ProfiledDeviance
from stochmm.errors import SingularFitWarning

SLEEP = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleep():
    return sm.datasets.load("sleepstudy")


@pytest.fixture(scope="module")
def fit_reml(sleep):
    return sm.lmer(SLEEP, sleep)


@pytest.mark.parametrize("key,reml", [("sleepstudy_slopes_ML", False), ("sleepstudy_slopes_REML", True)])
def test_profiled_deviance_at_lme4_points(sleep, devfun_points, key, reml):
    """lme4's devFunOnly values at the optimum and off it (source: lme4 1.1-31 devfun)."""
    f = ProfiledDeviance(sm.Model(SLEEP, sleep), reml=reml)
    for pt in devfun_points[key]["points"]:
        assert f(np.array(pt["params"])) == pytest.approx(pt["value"], abs=1e-8), pt["label"]
        bs = f.system
        assert bs.pwrss == pytest.approx(pt["pwrss"], rel=1e-10)
        assert bs.logdet_L == pytest.approx(pt["ldL2"], abs=1e-9)
        assert bs.logdet_RX == pytest.approx(pt["ldRX2"], abs=1e-9)
        np.testing.assert_allclose(bs.beta(), list(pt["beta_hat"].values()), rtol=1e-10)


@pytest.mark.parametrize("key,ds,formula", [("pastes_nested_ML", "pastes", "strength ~ 1 + (1 | batch/cask)"),
                                            ("penicillin_crossed_ML", "penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)")])
def test_devfun_points_nested_and_crossed(devfun_points, key, ds, formula):
    f = ProfiledDeviance(sm.Model(formula, sm.datasets.load(ds)), reml=False)
    for pt in devfun_points[key]["points"]:
        assert f(np.array(pt["params"])) == pytest.approx(pt["value"], abs=1e-8), pt["label"]


def test_sleepstudy_reml_parity(fit_reml, lme4_refs):
    r = lme4_refs["sleepstudy_slopes_REML"]["results"]
    f = fit_reml
    assert f.objective == pytest.approx(r["objective"], abs=1e-6)
    assert f.loglik == pytest.approx(r["logLik"], abs=1e-6)
    assert f.aic == pytest.approx(r["AIC"], abs=1e-6) and f.bic == pytest.approx(r["BIC"], abs=1e-6)
    np.testing.assert_allclose(f.fixef, list(r["fixef"].values()), rtol=1e-8)
    np.testing.assert_allclose(f.se, list(r["se"].values()), rtol=1e-4)
    np.testing.assert_allclose(f.vcov.to_numpy(), r["vcov"]["matrix"], rtol=1e-4)
    np.testing.assert_allclose(f.theta, list(r["theta"].values()), atol=1e-4)
    assert f.sigma == pytest.approx(r["sigma"], rel=1e-5)
    assert f.nobs == 180 and f.ngroups == {"Subject": 18} and f.df == 6
    assert not f.is_singular
    assert f.optsum.feval < 80 and f.optsum.optimizer == "LN_BOBYQA"


def test_varcorr_matches_lme4(fit_reml, lme4_refs):
    vc = fit_reml.varcorr
    ref = lme4_refs["sleepstudy_slopes_REML"]["results"]["varcorr"]
    assert list(vc.columns) == ["group", "term1", "term2", "variance", "sd", "corr"]
    assert list(vc["group"]) == [v["group"] for v in ref]
    np.testing.assert_allclose(vc["variance"], [v["vcov"] for v in ref], rtol=1e-4)
    assert vc.loc[2, "corr"] == pytest.approx(ref[2]["sdcor"], abs=1e-4)
    assert vc.loc[3, "sd"] == pytest.approx(ref[3]["sdcor"], rel=1e-5)


def test_ranef_and_condvar(fit_reml, lme4_refs):
    r = lme4_refs["sleepstudy_slopes_REML"]["results"]["ranef"]["Subject"]
    re = fit_reml.ranef["Subject"]
    assert list(re.index) == r["levels"] and list(re.columns) == ["(Intercept)", "Days"]
    for term, vals in r["terms"].items():
        np.testing.assert_allclose(re[term], vals, atol=1e-3)
    cv = fit_reml.ranef_condvar["Subject"]
    assert cv.shape == (18, 2, 2)
    tab = fit_reml.ranef_table()
    assert list(tab.columns) == ["group", "term", "level", "condval", "condsd"] and len(tab) == 36


@pytest.mark.parametrize("key,ds,formula,reml", [
    ("pastes_nested_ML", "pastes", "strength ~ 1 + (1 | batch/cask)", False),
    ("penicillin_crossed_REML", "penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", True),
    ("oats_splitplot_REML", "oats", "yield ~ nf * Variety + (1 | Block/Variety)", True),
])
def test_conditional_sds_match_lme4(lme4_refs, key, ds, formula, reml):
    """Conditional SDs of the random effects (lme4's ranef(condVar = TRUE))."""
    fit = sm.lmer(formula, sm.datasets.load(ds), reml=reml)
    ref = lme4_refs[key]["results"]["ranef"]
    tab = fit.ranef_table()
    for g, rg in ref.items():
        for term, vals in rg["terms"].items():
            sub = tab[(tab["group"] == g) & (tab["term"] == term)]
            assert list(sub["level"]) == rg["levels"]
            np.testing.assert_allclose(sub["condval"], vals, atol=2e-4 * max(1, np.abs(vals).max()))
            np.testing.assert_allclose(sub["condsd"], rg["condsd"][term], rtol=2e-4)


def test_singular_fit_flagged_with_number():
    with pytest.warns(SingularFitWarning, match=r"Batch\.\(Intercept\)=0"):
        f = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff2"), reml=False)
    assert f.is_singular and f.theta[0] == 0.0
    assert f.objective == pytest.approx(162.873036653826, abs=1e-8)  # lme4 1.1-31, ML


def test_better_or_equal_to_lme4_from_a_poor_start(sleep, lme4_refs):
    f = sm.lmer(SLEEP, sleep, reml=False, start=[3.0, -1.0, 0.1])
    assert f.objective <= lme4_refs["sleepstudy_slopes_ML"]["results"]["objective"] + 1e-6
    with pytest.raises(ValueError, match="3 values"):
        sm.lmer(SLEEP, sleep, start=[1.0])


def test_fitted_residuals_predict(fit_reml, sleep):
    f = fit_reml
    np.testing.assert_allclose(f.fitted + f.residuals, sleep["Reaction"])
    np.testing.assert_allclose(f.predict(), f.fitted)
    np.testing.assert_allclose(f.predict(sleep), f.fitted)
    nd = pd.DataFrame({"Days": [0.0, 0.0], "Subject": ["308", "new"]})
    p = f.predict(nd)
    assert p[0] == pytest.approx(f.fixef["(Intercept)"] + f.ranef["Subject"].loc["308", "(Intercept)"])
    assert p[1] == pytest.approx(f.fixef["(Intercept)"])  # new level: random effect 0
    np.testing.assert_allclose(f.predict(nd, re_form=None), [f.fixef["(Intercept)"]] * 2)


def test_summary_reads_like_lme4(fit_reml, sleep):
    text = str(fit_reml.summary())
    for piece in ["Linear mixed model fit by REML ['lmerMod']", "REML criterion at convergence: 1743.6",
                  "Scaled residuals:", " Subject  (Intercept)", "Number of obs: 180, groups:  Subject, 18",
                  "(Intercept)  251.405      6.825   36.84", "Days          10.467      1.546    6.77",
                  "Correlation of Fixed Effects:"]:
        assert piece in text, piece
    ml = str(sm.lmer(SLEEP, sleep, reml=False).summary())
    assert "AIC" in ml and "1763.9" in ml and "-876.0" in ml and "174" in ml


def test_weights_scale_the_residual_variance(sleep):
    """Var(ε_i) = σ²/w_i: doubling every weight doubles σ², divides θ by √2, and leaves β and the
    log-likelihood unchanged (the −Σ log w_i term in the deviance cancels the change of scale)."""
    f1 = sm.lmer(SLEEP, sleep, reml=False)
    f2 = sm.lmer(SLEEP, sleep, reml=False, weights=np.full(180, 2.0))
    np.testing.assert_allclose(f2.theta * np.sqrt(2.0), f1.theta, rtol=1e-3)
    np.testing.assert_allclose(f2.fixef, f1.fixef, rtol=1e-6)
    assert f2.sigma**2 == pytest.approx(2 * f1.sigma**2, rel=1e-4)
    assert f2.loglik == pytest.approx(f1.loglik, abs=1e-6)


def test_model_fit_dispatch(sleep):
    m = sm.Model(SLEEP, sleep)
    assert m.fit(method="ML").objective == pytest.approx(1751.93934448899, abs=1e-6)  # lme4 1.1-31 ML
    with pytest.raises(ValueError, match="'REML' or 'ML'"):
        m.fit(method="laplace")


def test_no_warnings_on_a_clean_fit(sleep):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sm.lmer(SLEEP, sleep)


def test_weighted_fit_matches_lme4(sleep):
    """lme4 1.1-31: lmer(Reaction ~ Days + (Days|Subject), sleepstudy, weights = w) with
    set.seed(1); w <- runif(180, 0.5, 2) (weights stored in tests/reference/)."""
    from pathlib import Path

    w = pd.read_csv(Path(__file__).resolve().parents[1] / "reference" / "sleepstudy_weights_runif_seed1.csv")["w"].to_numpy()
    f = sm.lmer(SLEEP, sleep, reml=False, weights=w)
    assert f.objective == pytest.approx(1752.0062666881, abs=1e-6)
    np.testing.assert_allclose(f.theta, [0.8222455045, 0.0275910595, 0.1943193761], atol=1e-4)
    assert f.sigma == pytest.approx(28.0774682584, rel=1e-5)
    assert sm.lmer(SLEEP, sleep, reml=True, weights=w).objective == pytest.approx(1743.8167317764, abs=1e-6)


def test_ordered_factors_use_polynomial_contrasts_like_r():
    """Ordered factors get contr.poly, as R's model.matrix gives them. Reference:
    lme4 1.1-31, lmer(y ~ studage * service + lectage + (1|s) + (1|d), InstEval, REML = TRUE)."""
    fit = sm.lmer("y ~ studage * service + lectage + (1 | s) + (1 | d)", sm.datasets.load("insteval"))
    names = ("(Intercept)|studage.L|studage.Q|studage.C|service1|lectage.L|lectage.Q|lectage.C|lectage^4|"
             "lectage^5|studage.L:service1|studage.Q:service1|studage.C:service1").split("|")
    beta = [3.228417814376, 0.075409749000, -0.012774100536, 0.042170380630, -0.074437966760, -0.190272573197,
            0.018597685047, -0.022432304050, -0.019439905512, -0.040092365026, 0.050086193278, 0.041572384582,
            -0.055067479656]
    se = [0.019454891214, 0.021158956085, 0.018400434411, 0.018048869240, 0.013443598544, 0.016196686456,
          0.012530428801, 0.013105348041, 0.013473676055, 0.015125972073, 0.021520179593, 0.019658145708,
          0.018734792211]
    assert list(fit.fixef.index) == names
    assert fit.objective == pytest.approx(237629.144353375828, abs=1e-3)
    np.testing.assert_allclose(fit.fixef, beta, rtol=1e-4)
    np.testing.assert_allclose(fit.se, se, rtol=1e-3)
    np.testing.assert_allclose(fit.theta, [0.277282472716, 0.439020423157], atol=1e-4)


def test_moment_start_values():
    """Random-intercept models start from moment estimates (fewer evaluations, same optimum)."""
    from stochmm.deterministic.lmm import moment_start

    p = sm.datasets.load("penicillin")
    f = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    classic = sm.lmer(f, p, start="lme4")
    default = sm.lmer(f, p)
    np.testing.assert_array_equal(classic.optsum.x0, [1.0, 1.0])
    np.testing.assert_allclose(default.optsum.x0, moment_start(sm.Model(f, p)))
    # balanced crossed design: the moment estimates are the REML estimates already (lme4 1.1-31 REML θ)
    np.testing.assert_allclose(default.optsum.x0, [1.539675554152165, 3.5125188600064563], rtol=2e-3)
    assert default.optsum.feval < classic.optsum.feval
    assert default.objective <= classic.objective + 1e-9
    with pytest.raises(ValueError, match="'moments' or 'lme4'"):
        sm.lmer(f, p, start="best")
    with pytest.raises(ValueError, match="random-intercept"):
        moment_start(sm.Model(SLEEP, sm.datasets.load("sleepstudy")))


# -- issue 8 (reliability) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reml", [False, True])
def test_shifting_and_scaling_y_changes_only_what_it_should(sleep, reml):
    """Adding c to y changes only the intercept; multiplying y by c scales β, σ by c and moves the
    objective by the log-Jacobian 2·(n or n−p)·log c; θ never changes. Over 1e-10 … 1e12."""
    base = sm.lmer(SLEEP, sleep, reml=reml)
    n = 180 - 2 * reml
    for c in (1e-10, 1e-3, 1e4, 1e8, 1e11, 1e12):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sh = sm.lmer(SLEEP, sleep.assign(Reaction=sleep["Reaction"] + c), reml=reml)
            sc = sm.lmer(SLEEP, sleep.assign(Reaction=sleep["Reaction"] * c), reml=reml)
        # the data themselves keep |c|·2^-52 absolute precision: the tolerances are that, not looser
        eps = 2.0**-52 * 4 * c / base.sigma
        assert sh.objective == pytest.approx(base.objective, abs=1e-6 + 180 * eps), c
        np.testing.assert_allclose(sh.theta, base.theta, atol=1e-5 + 10 * eps)
        assert sh.sigma == pytest.approx(base.sigma, rel=1e-6 + eps)
        assert sh.fixef.iloc[0] - c == pytest.approx(base.fixef.iloc[0], abs=1e-5 + c * 2.0**-50)
        assert sh.fixef.iloc[1] == pytest.approx(base.fixef.iloc[1], rel=1e-6 + eps)
        np.testing.assert_allclose(sh.se, base.se, rtol=1e-5 + 10 * eps)
        assert sc.objective - 2 * n * np.log(c) == pytest.approx(base.objective, abs=1e-6), c
        np.testing.assert_allclose(sc.theta, base.theta, atol=1e-5)
        assert sc.sigma / c == pytest.approx(base.sigma, rel=1e-7)
        np.testing.assert_allclose(sc.fixef / c, base.fixef, rtol=1e-7)


def test_shifting_and_scaling_x_in_the_fixed_part(sleep):
    """x only in the fixed part: scaling x scales its β by 1/c (REML: objective moves by −2 log c);
    shifting x moves only the intercept, until x − shift is numerically constant next to the
    intercept, where R's qr tolerance (1e-7) drops the column as lme4 does."""
    f = "Reaction ~ Days + (1 | Subject)"
    base = sm.lmer(f, sleep, reml=False)
    for c in (1e-10, 1e-4, 1e4, 1e12):
        sc = sm.lmer(f, sleep.assign(Days=sleep["Days"] * c), reml=False)
        assert sc.objective == pytest.approx(base.objective, abs=1e-7)
        np.testing.assert_allclose(sc.theta, base.theta, atol=1e-6)
        assert sc.fixef.iloc[1] * c == pytest.approx(base.fixef.iloc[1], rel=1e-7)
    for c in (1e-10, 1.0, 1e3, 1e5):
        sh = sm.lmer(f, sleep.assign(Days=sleep["Days"] + c), reml=False)
        assert sh.objective == pytest.approx(base.objective, abs=1e-6)
        np.testing.assert_allclose(sh.theta, base.theta, atol=1e-6)
        assert sh.fixef.iloc[0] + c * sh.fixef.iloc[1] == pytest.approx(base.fixef.iloc[0], rel=1e-7)
    with pytest.warns(sm.RankDeficiencyWarning, match="dropping 1 column"):
        sm.Model(f, sleep.assign(Days=sleep["Days"] + 1e9))


def test_entry_points_refuse_unknown_keywords_and_wrong_flag_types(sleep):
    with pytest.raises(sm.OptionError, match=r"reml must be True or False, got 'ML'"):
        sm.lmer(SLEEP, sleep, reml="ML")
    with pytest.raises(sm.OptionError, match="family.*glmer"):
        sm.lmer(SLEEP, sleep, family="binomial")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'maxevals'. Did you mean 'maxeval'\? Valid "
                                        r"keywords: check_derivatives, condvar"):
        sm.lmer(SLEEP, sleep, maxevals=10)
    with pytest.raises(sm.OptionError, match="condvar must be True or False"):
        sm.lmer(SLEEP, sleep, condvar="no")
    with pytest.raises(sm.OptionError, match="nAGQ is for GLMMs"):
        sm.lmer(SLEEP, sleep, nAGQ=5)
    with pytest.raises(sm.OptionError, match="got both reml=False and REML=True"):
        sm.lmer(SLEEP, sleep, reml=False, REML=True)


def test_lme4_spellings_and_model_fit_take_what_lmer_takes(sleep):
    ml = sm.lmer(SLEEP, sleep, reml=False)
    m = sm.Model(SLEEP, sleep)
    for fit in (sm.lmer(SLEEP, sleep, REML=False), m.fit(reml=False), m.fit(REML=False), m.fit("ML"),
                m.fit(reml=False, check_derivatives=False, maxeval=1000)):
        assert fit.method == "ML" and fit.objective == pytest.approx(ml.objective, abs=1e-8)
    assert m.fit().method == "REML" and m.fit(start="lme4").method == "REML"
    with pytest.raises(ValueError, match="contradicts reml=True"):
        m.fit("ML", reml=True)
    with pytest.raises(sm.OptionError, match="Valid keywords"):
        m.fit(reml=False, bogus=1)


def test_degenerate_responses_get_a_plain_message(sleep):
    with pytest.raises(sm.DataError, match="'Reaction' is constant .*no residual variation"):
        sm.lmer(SLEEP, sleep.assign(Reaction=3.0))
    with pytest.raises(sm.DataError, match="fitted exactly by the fixed effects"):
        sm.lmer(SLEEP, sleep.assign(Reaction=2.0 + 3.0 * sleep["Days"]))


def test_start_value_failure_falls_back_to_lme4s_start(sleep):
    """(1|Subject) + (1|Subject): the moment start's equations are singular; the fit goes on from lme4's start
    (lme4 fits it: the variance splits between the two identical terms)."""
    f = sm.lmer("Reaction ~ Days + (1 | Subject) + (1 | Subject)", sleep)
    one = sm.lmer("Reaction ~ Days + (1 | Subject)", sleep)
    assert f.objective == pytest.approx(one.objective, abs=1e-6)
    assert np.hypot(*f.theta) == pytest.approx(one.theta[0], rel=1e-4)
