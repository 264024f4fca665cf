"""Shared scenarios of the stochastic tests."""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm


@pytest.fixture(scope="session")
def small_cluster_model():
    """small_cluster_model(ncl=200, sd=3.0, seed=11) -> Model

    Binary GLMM ``y ~ x + (1 | g)`` with clusters of 2–3 observations, intercept −0.5, slope 1 and
    random-intercept SD ``sd``: Laplace is far off here, AGQ and importance sampling are not.
    """

    def make(ncl: int = 200, sd: float = 3.0, seed: int = 11):
        rng = np.random.default_rng(seed)
        size = rng.integers(2, 4, ncl)
        g = np.repeat(np.arange(ncl), size)
        df = pd.DataFrame({"g": pd.Categorical(g), "x": rng.standard_normal(g.size), "y": 0.0})
        m = sm.Model("y ~ x + (1 | g)", df, family="binomial")
        return m.with_response(m.simulate([-0.5, 1.0], [sd], seed=seed)[:, 0])

    return make
