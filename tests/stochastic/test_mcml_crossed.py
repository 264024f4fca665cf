"""Monte Carlo ML on a crossed binary GLMM (where no quadrature reaches): it must beat the Laplace estimates.

A simulated 80 × 8 fully crossed binary design with a large subject SD (3; 8 binary responses per subject), where
Laplace is visibly off. Checked statistically, with the fit's own Monte Carlo SEs:

* the importance-sampling log-likelihood at the MC-ML estimates, from fresh draws (common to both points, so the
  difference is sharp: independent evaluations have MC SEs near the gain itself), exceeds that at the Laplace
  estimates by more than 3 MC SE;
* two fits with different seeds agree within 3 × their combined reported MC SEs.
"""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm

crossed_data: dict = {}


@pytest.fixture(scope="module")
def crossed():
    rng = np.random.default_rng(3)
    ns, ni = 80, 8
    s, it = np.repeat(np.arange(ns), ni), np.tile(np.arange(ni), ns)
    df = pd.DataFrame({"s": pd.Categorical(s), "item": pd.Categorical(it), "x": rng.standard_normal(s.size), "y": 0.0})
    m = sm.Model("y ~ x + (1 | s) + (1 | item)", df, family="binomial")
    m = m.with_response(m.simulate([-0.5, 1.0], [3.0, 0.8], seed=3)[:, 0])
    crossed_data["df"] = df.assign(y=m.y)
    lap = m.fit()
    fits = [m.fit(method="is", draws=500, seed=seed, start=lap) for seed in (1, 2)]
    return m, lap, fits


def test_crossed_mcml_beats_laplace(crossed):
    m, lap, fits = crossed
    for fit in fits:
        assert fit.method == "IS" and fit.joint and not fit.mcml_failed
        gain, se = fit.loglik_gain["gain"], fit.loglik_gain["mcse"]
        assert np.isfinite(se) and se > 0
        assert gain > 3.0 * se, (gain, se)
        mc = fit.mc_se.to_numpy()
        assert np.all(np.isfinite(mc)) and np.all(mc > 0)


def test_crossed_mcml_seeds_agree_within_mc_error(crossed):
    _, _, (f1, f2) = crossed
    p1 = np.concatenate([f1.theta, f1._beta])
    p2 = np.concatenate([f2.theta, f2._beta])
    tol = 3.0 * np.hypot(f1.mc_se.to_numpy(), f2.mc_se.to_numpy())
    assert np.all(np.abs(p1 - p2) <= tol), pd.DataFrame({"seed1": p1, "seed2": p2, "tol": tol})
    # and the reported MC error is small against the sampling error
    assert np.nanmax(f1.mc_se_ratio.to_numpy()) < 0.25


def test_check_approximation_reports_moves_on_crossed_fit(crossed):
    _, lap, _ = crossed
    chk = lap.check_approximation(draws=2000, seed=5, refit_draws=500)
    assert chk.refit_method == "IS" and chk.estimates is not None
    est = chk.estimates
    # the subject SD moves beyond 0.1 SE plus twice the refit's own Monte Carlo error, and is flagged
    row = est.loc["s.(Intercept)"]
    assert row["change_se"] - 2.0 * row["mc_se_in_se"] > 0.1
    assert any("estimates move" in f for f in chk.flags)
    assert "change/SE" in str(chk)


@pytest.mark.parametrize("rule, formula", [("agq", None), ("lattice", None),
                                           ("agq", "y ~ x + (1 | s) + (0 + x | item)"),
                                           ("agq", "y ~ x + (0 + x | s) + (1 | item)")])
def test_nested_objective_gradient_is_exact(crossed, rule, formula):
    """The fixed-draw objective's analytic gradient (draws moving along dũ/dφ) equals central differences."""
    from stochmm.builder.families import get_family
    from stochmm.deterministic.pirls import make_engine
    from stochmm.stochastic.importance import _plan
    from stochmm.stochastic.mcml import _mode_tangent, _NestedObjective

    m, lap, _ = crossed
    if formula is not None:  # slopes: z ≠ 1 in the crossed or the first factor
        m = sm.Model(formula, crossed_data["df"], family="binomial")
        lap = m.fit()
    eng = make_engine(m, get_family(m.family), hessian="observed")
    phi = np.concatenate([lap.theta, lap._beta])
    lower = np.concatenate([np.asarray(m.lower, dtype=float), np.full(m.p, -np.inf)])
    D = _mode_tangent(eng, phi, lower)
    st = eng.pirls(phi[: len(lap.theta)], lap._beta)
    obj = _NestedObjective(eng, st, _plan(60, "normal", 7.0, False, False, 16), 5, np.random.default_rng(4), None,
                           rule=rule, phi_ref=phi, tangent=D)
    at = phi + 0.05  # away from the reference point, so the tangent terms count
    f, g, _ = obj.value_and_grad(at)
    h = 1e-5
    fd = [(obj.value_and_grad(at + h * e)[0] - obj.value_and_grad(at - h * e)[0]) / (2 * h) for e in np.eye(at.size)]
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5)
