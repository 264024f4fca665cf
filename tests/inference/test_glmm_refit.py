"""fit_glmm options for refits from a converged neighbour (stage1=False, vcov="RX"), the recorded
hessian= of a GLMM fit, and its use by the profile and the (AGQ) bootstrap."""

import numpy as np
import pytest

import stochmm as sm
from stochmm.deterministic.glmm import fit_glmm
from stochmm.errors import OptionError

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp():
    return sm.datasets.load("cbpp")


@pytest.mark.parametrize("nagq", [1, 9])
def test_refit_from_a_full_start_skips_stage1_and_the_hessian(cbpp, nagq):
    fit = sm.glmer(CBPP, cbpp, nagq=nagq)
    start = {"theta": fit.theta, "beta": fit._beta}
    # stage 1 skipped, Hessian kept: the same fit, the same Hessian-based vcov
    f1 = fit_glmm(fit.model, nagq=nagq, start=start, stage1=False)
    assert f1.optsum.stage1 is None and f1.timing["pirls_iterations_stage1"] <= 30
    np.testing.assert_allclose(f1.theta, fit.theta, atol=1e-6)
    np.testing.assert_allclose(f1._beta, fit._beta, atol=1e-6)
    assert abs(f1.objective - fit.objective) < 1e-9
    assert f1.vcov_source == "hessian"
    np.testing.assert_allclose(f1._vcov, fit._vcov, rtol=1e-4)
    # no Hessian either: vcov from R_X, no derivative check
    f2 = fit_glmm(fit.model, nagq=nagq, start=start, stage1=False, vcov="RX")
    assert f2.vcov_source == "RX" and f2.derivs is None and f2.timing["hessian_s"] < fit.timing["hessian_s"]
    np.testing.assert_allclose(f2._vcov, fit.engine.rx_vcov(f2.theta, f2._beta), rtol=1e-10)
    assert abs(f2.objective - fit.objective) < 1e-9


def test_refit_options_are_checked(cbpp):
    m = sm.glmer(CBPP, cbpp).model
    with pytest.raises(OptionError, match="full start"):
        fit_glmm(m, start={"theta": [0.6]}, stage1=False)
    with pytest.raises(OptionError, match="full start"):
        fit_glmm(m, stage1=False)
    with pytest.raises(OptionError, match="nagq=0"):
        fit_glmm(m, nagq=0, start={"theta": [0.6], "beta": [-1.4, -1, -1.1, -1.6]}, stage1=False)
    with pytest.raises(OptionError, match="vcov"):
        fit_glmm(m, vcov="wald")
    with pytest.raises(OptionError, match="stage1"):
        fit_glmm(m, stage1="no")


def test_hessian_kind_is_recorded_and_profiled(cbpp):
    """A probit fit with lme4's expected-information log-determinant: the fit records hessian="expected"
    and its profile is of that deviance (ζ = 0 at its own estimate, endpoints not the observed-Hessian ones)."""
    fe = sm.glmer(CBPP, cbpp, link="probit", hessian="expected")
    fo = sm.glmer(CBPP, cbpp, link="probit")
    assert fe.hessian_kind == "expected" and fo.hessian_kind == "observed"
    pe = fe.profile(which="sd_(Intercept)|herd")
    po = fo.profile(which="sd_(Intercept)|herd")
    assert pe.table["zeta"].abs().min() < 1e-6
    assert np.max(np.abs(pe.confint().to_numpy() - po.confint().to_numpy())) > 1e-4


def test_agq_bootstrap_refits_from_the_estimates(cbpp):
    fit = sm.glmer(CBPP, cbpp, nagq=9)
    b1 = fit.bootstrap(nsim=6, seed=3, progress=False)
    b2 = fit.bootstrap(nsim=6, seed=3, progress=False)
    t, t2 = b1.replicates, b2.replicates
    assert t.equals(t2)
    assert t["converged"].all()
    # a replicate refit equals a full fit of the same simulated response
    y = fit.simulate(1, seed=11).iloc[:, 0].to_numpy(dtype=float)
    m = fit.model.with_response(y)
    full = fit_glmm(m, nagq=9)
    quick = fit_glmm(m, nagq=9, start={"theta": fit.theta, "beta": fit._beta}, stage1=False, vcov="RX",
                     check_derivatives=False)
    np.testing.assert_allclose(quick.theta, full.theta, atol=2e-5)
    np.testing.assert_allclose(quick._beta, full._beta, atol=2e-5)
    assert abs(quick.objective - full.objective) < 1e-7
