"""Monte Carlo maximum likelihood (Model.fit(method="is")) against the AGQ-25 MLE, and its MC error."""

import numpy as np
import pytest

import stochmm as sm
from stochmm.deterministic.glmm import GlmmResults

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


def _phi(fit):
    return np.concatenate([fit.theta, fit._beta])


@pytest.mark.parametrize("which", ["cbpp", "small clusters"])
def test_mcml_equals_agq25_mle_within_mc_error(which, small_cluster_model):
    if which == "cbpp":
        m = sm.Model(CBPP, sm.datasets.load("cbpp"), family="binomial")
    else:
        m = small_cluster_model()
    agq = m.fit(method="agq", nagq=25)
    fit = m.fit(method="is", draws=1000, seed=20261202)
    assert isinstance(fit, GlmmResults) and fit.method == "IS" and not fit.mcml_failed
    mc = fit.mc_se.to_numpy()
    assert np.all(np.isfinite(mc)) and np.all(mc > 0)
    # |IS MLE − AGQ-25 MLE| within 3 Monte Carlo SEs (plus AGQ's own quadrature error, ~1e-4 here)
    assert np.all(np.abs(_phi(fit) - _phi(agq)) <= 3 * mc + 1e-4)
    # the log-likelihood at the estimates: IS value within 3 MCSE of AGQ-25 at the same point
    ll_agq = float(m.loglik(fit, "agq:25"))
    assert abs(fit.loglik - ll_agq) <= 3 * fit.loglik_is.mcse + 1e-6
    assert fit.se.shape == (m.p,) and np.all(fit.se > 0)
    assert "Monte Carlo ML by importance sampling" in str(fit.summary())


def test_mcml_bad_input():
    m = sm.Model(CBPP, sm.datasets.load("cbpp"), family="binomial")
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        m.fit(method="is", draws=0)
    with pytest.raises(TypeError, match="unexpected option"):
        m.fit(method="is", nagq=5)
    lmm = sm.Model("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    with pytest.raises(ValueError, match="likelihood is exact"):
        lmm.fit(method="is")
