"""LmmResults.simulate (issue 8, item 3.7): lme4's simulate(fit, nsim, seed, use.u) through Model.simulate."""

import numpy as np
import pytest

import stochmm as sm


@pytest.fixture(scope="module")
def fit():
    return sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))


def test_simulate_shape_seed_and_model_simulate(fit):
    s = fit.simulate(3, seed=5)
    assert s.shape == (180, 3) and list(s.columns) == ["sim_1", "sim_2", "sim_3"]
    np.testing.assert_array_equal(s.to_numpy(), fit.simulate(3, seed=5).to_numpy())
    direct = fit.model.simulate(fit.fixef.to_numpy(), fit.theta, fit.sigma, nsim=3, seed=5)
    np.testing.assert_array_equal(s.to_numpy(), direct)


def test_simulate_moments(fit):
    """Marginal variance of y: Z Σ Z' + σ² at each observation, checked within 4 MC SEs over 4000 draws."""
    s = fit.simulate(4000, seed=1).to_numpy()
    mean = fit.model.X @ fit.fixef.to_numpy()
    T = fit.model.lambda_blocks(fit.theta)[0]
    Sigma = fit.sigma**2 * (T @ T.T)
    z = fit.model.terms[0].z
    var = np.einsum("ij,jk,ik->i", z, Sigma, z) + fit.sigma**2
    sd_mean = np.sqrt(var / 4000)
    assert np.all(np.abs(s.mean(axis=1) - mean) < 4.5 * sd_mean)
    assert np.all(np.abs(s.var(axis=1) / var - 1) < 4.5 * np.sqrt(2 / 4000))


def test_simulate_use_u_keeps_the_conditional_modes(fit):
    s = fit.simulate(2000, seed=2, use_u=True).to_numpy()
    resid_sd = (s - fit.fitted[:, None]).std(axis=1)
    assert np.all(np.abs(resid_sd / fit.sigma - 1) < 4.5 / np.sqrt(2 * 2000))
    with pytest.raises(TypeError, match="use_u"):
        fit.simulate(1, use_u="yes")
    with pytest.raises(ValueError, match="nsim"):
        fit.simulate(0)
