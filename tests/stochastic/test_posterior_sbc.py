"""Simulation-based calibration (Talts et al. 2018) of the posterior sampler: rank statistics of every
parameter uniform (χ² over 10 bins at 1 %). Slow (minutes): marked, deselected by default; run with
``pytest -m slow tests/stochastic/test_posterior_sbc.py``.
"""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm

pytest.importorskip("numpyro")

from stochmm.stochastic.sbc import sbc


def _design(seed=1):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(8), 6)
    return pd.DataFrame({"y": rng.standard_normal(48) + 0.3 * g, "x": rng.standard_normal(48), "g": g.astype(str),
                         "yb": (rng.random(48) < 0.5).astype(int)})


@pytest.mark.slow
@pytest.mark.parametrize("formula,family", [("y ~ x + (1 | g)", None), ("yb ~ x + (1 | g)", "binomial")])
def test_sbc_full_nuts(formula, family):
    res = sbc(sm.Model(formula, _design(), family=family), reps=200, seed=2)
    assert res.ranks.shape == (200, 4 if family is None else 3)
    assert res.uniform(0.01), res.table


@pytest.mark.slow
def test_sbc_marginal_nuts_lmm():
    res = sbc(sm.Model("y ~ x + (1 | g)", _design()), reps=60, bins=5, seed=3, marginalize=True)
    assert res.uniform(0.01), res.table


@pytest.mark.slow
def test_sbc_marginal_nuts_glmm():
    """Marginal NUTS on a binary GLMM: adaptive Gauss-Hermite marginal likelihood, b drawn given each draw."""
    res = sbc(sm.Model("yb ~ x + (1 | g)", _design(), family="binomial"), reps=60, bins=5, seed=4,
              marginalize=True)
    assert res.uniform(0.01), res.table


def test_sbc_arguments():
    from stochmm.stochastic.posterior import SamplingError

    with pytest.raises(SamplingError, match="reps must be an integer ≥ 2"):
        sbc(sm.Model("y ~ x + (1 | g)", _design()), reps=1)
    with pytest.raises(SamplingError, match="posterior draws per replication"):
        sbc(sm.Model("y ~ x + (1 | g)", _design()), draws=10, thin=5)
