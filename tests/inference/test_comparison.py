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


def test_anova_refuses_fits_that_do_not_compare(fits):
    """As R: nested-model tests need the same response on the same observations (issue 8, item 1.8)."""
    with pytest.raises(ValueError, match="needs a fit"):
        sm.anova()
    d = sm.datasets.load("sleepstudy")
    other = sm.lmer("Reaction ~ Days + (1 | Subject)", d.iloc[:170])
    with pytest.raises(ValueError, match="not all fitted to the same size of dataset"):
        sm.anova(fits[0], other)
    d["logR"] = np.log(d["Reaction"])
    logfit = sm.lmer("logR ~ Days + (Days | Subject)", d)
    with pytest.raises(ValueError, match="different responses"):
        sm.anova(fits[0], logfit)
    d2 = sm.datasets.load("sleepstudy")
    d2["Reaction"] = d2["Reaction"].to_numpy()[::-1]
    with pytest.raises(ValueError, match="different values"):
        sm.anova(fits[0], sm.lmer("Reaction ~ Days + (Days | Subject)", d2))
    with pytest.raises(TypeError, match="fitted models"):
        sm.anova(fits[0], "fit")
    with pytest.raises(ValueError, match="method must be"):
        sm.anova(*fits, method="boot")
    with pytest.raises(ValueError, match="nsim must be a positive integer"):
        sm.anova(*fits, method="pboot", nsim=0)


def test_pboot_lrt_for_a_random_slope():
    """PBmodcomp-style test: bootstrap p-value next to the chi-square one, reproducible by seed and
    identical with two processes; under H0 the bootstrap LRT is near chi-square(1)-ish, so both p-values
    for this tiny effect are large."""
    d = sm.datasets.load("sleepstudy")
    f0 = sm.lmer("Reaction ~ Days + (1 | Subject)", d, reml=False)
    f1 = sm.lmer("Reaction ~ Days + (Days | Subject)", d, reml=False)
    a = sm.anova(f0, f1, method="pboot", nsim=40, seed=3, progress=False)
    assert {"Pr(>Chisq)", "Pr(>Chisq) pboot", "nsim"} <= set(a.columns)
    p = a["Pr(>Chisq) pboot"].iloc[1]
    # the random slope is strongly supported: no bootstrap LRT reaches the observed 42.1
    assert a["Chisq"].iloc[1] > 40 and p == pytest.approx(1 / 41)
    b = sm.anova(f0, f1, method="pboot", nsim=40, seed=3, progress=False, n_jobs=2)
    assert b["Pr(>Chisq) pboot"].iloc[1] == p


def test_wald_confint(fits):
    ci = fits[1].confint()
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    np.testing.assert_allclose(ci.to_numpy(), [[238.02914112, 264.78106858], [7.43759393, 13.49697799]], rtol=1e-5)


def test_pboot_is_on_ml_fits_even_with_refit_false(fits):
    """As pbkrtest's getLRT: the bootstrap LRT refits by ML, so the observed statistic it is compared
    with must be the ML one too, whatever refit= says about the chi-square columns."""
    a = sm.anova(*fits, method="pboot", nsim=20, seed=5, progress=False)
    b = sm.anova(*fits, refit=False, method="pboot", nsim=20, seed=5, progress=False)
    assert b["Pr(>Chisq) pboot"].iloc[1] == a["Pr(>Chisq) pboot"].iloc[1]
