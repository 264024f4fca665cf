"""rePCA, hat values and Cook's distance against lme4 1.1-31 (models/reference/make_inference_refs.R);
all_fit; the profile and bootstrap plots."""

import numpy as np
import pytest

import stochmm as sm

CASES = {"dyestuff_REML": ("Yield ~ 1 + (1 | Batch)", "dyestuff"),
         "sleep_slopes_REML": ("Reaction ~ Days + (Days | Subject)", "sleepstudy")}


@pytest.mark.parametrize("key", list(CASES))
def test_hatvalues_cooks_and_repca_match_lme4(refs, key):
    formula, data = CASES[key]
    fit = sm.lmer(formula, sm.datasets.load(data))
    r = refs["diagnostics"][key]
    inf = fit.influence()
    np.testing.assert_allclose(inf["hat"], r["hatvalues"], atol=1e-5)
    np.testing.assert_allclose(inf["cooks"], r["cooks"], rtol=1e-4, atol=1e-6 * max(r["cooks"]))
    pca = fit.rePCA()
    want = np.atleast_1d(np.asarray(next(iter(r["rePCA_sdev"].values())), dtype=float))
    np.testing.assert_allclose(pca["sdev"], want, rtol=1e-4)
    assert pca["cumulative"].iloc[-1] == pytest.approx(1.0)


def test_repca_shows_a_singular_fit():
    with pytest.warns(sm.errors.SingularFitWarning):
        fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff2"))
    assert fit.rePCA()["sdev"].iloc[0] == 0.0


def test_all_fit_lmm_and_glmm():
    t = sm.all_fit("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    assert set(t["optimizer"]) == {"bobyqa", "nelder_mead", "lbfgsb"}
    assert not t["disagrees"].any() and t["delta"].max() < 1e-4
    g = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    tg = sm.all_fit(g)
    assert len(tg) == 6 and not tg["disagrees"].any()
    np.testing.assert_allclose(tg["objective"], g.objective, atol=1e-6)
    with pytest.raises(TypeError, match="data="):
        sm.all_fit("Reaction ~ Days + (Days | Subject)")


def test_influence_refuses_glmm():
    g = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    with pytest.raises(ValueError, match="linear mixed models"):
        g.influence()


def test_plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    fig = sm.plots.profile_zeta(fit.profile(which="theta_"))
    assert len(fig.axes) == 4
    fig2 = fit.bootstrap(nsim=10, progress=False).plot()
    assert len(fig2.axes) == 6
    plt.close("all")


def test_all_fit_options_are_checked():
    """tol <= 0 flagged every optimiser as disagreeing (with a warning that blamed the optimisers)."""
    d = sm.datasets.load("dyestuff")
    for bad in (-1, 0, "1e-4", float("nan")):
        with pytest.raises(ValueError, match="tol must be a positive number"):
            sm.all_fit("Yield ~ 1 + (1 | Batch)", d, tol=bad)


def test_all_fit_refuses_glmm_options_for_an_lmm():
    """nagq= and method= were silently ignored for a linear mixed model."""
    d = sm.datasets.load("dyestuff")
    with pytest.raises(ValueError, match="nagq.*GLMM"):
        sm.all_fit("Yield ~ 1 + (1 | Batch)", d, nagq=3)
    with pytest.raises(ValueError, match="method.*GLMM"):
        sm.all_fit("Yield ~ 1 + (1 | Batch)", d, method="agq")
