"""compare_likelihoods (one-scale table, profile mode) and the approximation audit of a fit."""

import numpy as np
import pytest

import stochmm as sm

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp_fit():
    return sm.glmer(CBPP, sm.datasets.load("cbpp"))


def test_compare_table(cbpp_fit):
    tab = sm.compare_likelihoods(cbpp_fit, draws=5000, seed=1)
    assert list(tab.columns) == ["method", "loglik", "mcse", "difference", "seconds", "khat", "note"]
    t = tab.set_index("method")
    assert t.loc["agq(25)", "note"] == "reference" and t.loc["agq(25)", "difference"] == 0.0
    assert t.loc["laplace", "loglik"] == pytest.approx(cbpp_fit.loglik, abs=1e-9)
    assert abs(t.loc["is", "difference"]) <= 3 * t.loc["is", "mcse"]
    assert t.loc["laplace", "difference"] == pytest.approx(-0.0425, abs=1e-3)
    # a Model with explicit params gives the same numbers
    tab2 = sm.compare_likelihoods(cbpp_fit.model, {"beta": cbpp_fit._beta, "theta": cbpp_fit.theta},
                                  methods=["laplace", "agq:25"])
    np.testing.assert_allclose(tab2["loglik"], tab["loglik"].iloc[[0, 2]], atol=1e-10)


def test_compare_crossed_marks_agq_unavailable():
    v = sm.datasets.load("VerbAgg")
    fit = sm.glmer("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", v)
    tab = sm.compare_likelihoods(fit, draws=300, seed=3).set_index("method")
    assert "not available" in tab.loc["agq(25)", "note"] and np.isnan(tab.loc["agq(25)", "loglik"])
    assert tab.loc["is", "note"] == "reference"
    # Laplace overstates -2 log L on VerbAgg by several units (about 7 here)
    d = -2 * tab.loc["laplace", "difference"]
    assert d > 3.0 + 3 * 2 * tab.loc["is", "mcse"]


def test_profile_mode(cbpp_fit):
    vals = [0.3, 0.64, 1.2]
    tab = sm.compare_likelihoods(cbpp_fit, methods=("laplace", "agq:25", "is"), profile="herd.(Intercept)",
                                 values=vals, draws=2000, seed=2)
    assert tab.shape[0] == 9 and set(tab["parameter"]) == {"herd.(Intercept)"}
    assert sorted(set(tab["value"])) == vals
    lap = tab[tab.method == "laplace"].set_index("value")["difference"]
    assert (lap < 0).all() and lap.loc[1.2] < lap.loc[0.3]  # the Laplace error grows with the SD
    isr = tab[tab.method == "is"]
    assert np.all(np.abs(isr["difference"]) <= 3 * isr["mcse"] + 1e-12)
    with pytest.raises(sm.errors.DataError, match="Did you mean 'herd.\\(Intercept\\)'"):
        sm.compare_likelihoods(cbpp_fit, profile="herd.(intercept)")


def test_compare_bad_input(cbpp_fit):
    with pytest.raises(ValueError, match="Valid methods"):
        sm.compare_likelihoods(cbpp_fit, methods=("laplace", "quadrature"))
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        sm.compare_likelihoods(cbpp_fit, draws=0)
    with pytest.raises(ValueError, match="params is required"):
        sm.compare_likelihoods(cbpp_fit.model)
    with pytest.raises(TypeError, match="results object or a Model"):
        sm.compare_likelihoods("cbpp")


def test_check_approximation_cbpp_is_fine(cbpp_fit):
    chk = cbpp_fit.check_approximation(draws=5000, seed=1)
    assert chk.ok and chk.refit_method == "agq(25)"
    assert abs(chk.error - (-0.0425)) <= 3 * chk.is_loglik.mcse + 1e-3
    assert np.all(np.abs(chk.estimates["change_se"]) < 0.1)
    text = str(chk)
    assert "OK: no flag" in text and "herd.(Intercept)" in text


def test_check_approximation_flags_small_clusters(small_cluster_model):
    fit = small_cluster_model().fit()
    chk = fit.check_approximation(draws=4000, seed=1)
    assert not chk.ok
    assert any("error in log-likelihood > 0.5" in f for f in chk.flags)
    assert any("estimates move > 0.1 SE" in f for f in chk.flags)
    assert chk.estimates.loc["g.(Intercept)", "change_se"] > 0.5  # Laplace shrinks the SD
    assert "FLAGS" in str(chk)


def test_check_approximation_lmm_says_exact():
    fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    with pytest.raises(ValueError, match="likelihood is exact"):
        fit.check_approximation()
