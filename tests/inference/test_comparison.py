"""Likelihood-ratio tests and Wald intervals against lme4 1.1-31.

Reference (R 4.2.2, lme4 1.1-31):
    f0 <- lmer(Reaction ~ Days + (Days || Subject), sleepstudy)
    f1 <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
    anova(f0, f1)                                  # refits with ML
    confint(f1, method = "Wald", parm = "beta_")
"""

import numpy as np
import pytest

import stochmm as sm


@pytest.fixture(scope="module")
def fits():
    d = sm.datasets.load("sleepstudy")
    return (sm.lmer("Reaction ~ Days + (Days || Subject)", d), sm.lmer("Reaction ~ Days + (Days | Subject)", d))


def test_anova_refits_with_ml_and_matches_lme4(fits):
    a = sm.anova(*fits)
    np.testing.assert_array_equal(a["npar"], [5, 6])
    np.testing.assert_allclose(a["AIC"], [1762.003255, 1763.939345], atol=1e-5)
    np.testing.assert_allclose(a["BIC"], [1777.968039, 1783.097086], atol=1e-5)
    np.testing.assert_allclose(a["logLik"], [-876.0016276, -875.9696722], atol=1e-6)
    assert a["Chisq"].iloc[1] == pytest.approx(0.06391, abs=1e-5)
    assert a["Pr(>Chisq)"].iloc[1] == pytest.approx(0.80042, abs=1e-5)
    # order of arguments does not matter
    assert list(sm.anova(fits[1], fits[0])["npar"]) == [5, 6]


def test_anova_needs_two_fits_on_the_same_data(fits):
    with pytest.raises(ValueError, match="at least two"):
        sm.anova(fits[0])
    other = sm.lmer("Reaction ~ Days + (1 | Subject)", sm.datasets.load("sleepstudy").iloc[:170])
    with pytest.raises(ValueError, match="different numbers of observations"):
        sm.anova(fits[0], other)


def test_wald_confint(fits):
    ci = fits[1].confint()
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    np.testing.assert_allclose(ci.to_numpy(), [[238.02914112, 264.78106858], [7.43759393, 13.49697799]], rtol=1e-5)
