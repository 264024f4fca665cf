"""Shared helpers for the inference tests: data sets as the R reference script builds them, and
fits evaluated at R's θ (so that the df/p comparisons test the inference code, not the optimiser)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

import stochmm as sm

REFS = json.loads((Path(__file__).parents[1] / "reference" / "inference_refs.json").read_text())


def data(name: str) -> pd.DataFrame:
    if name in ("ss", "ss_unb"):
        ss = sm.datasets.load("sleepstudy")
        lev = list(ss["Subject"].cat.categories)
        pos = np.array([lev.index(s) for s in ss["Subject"].astype(str)])
        ss["G"] = pd.Categorical(np.array(["a", "b", "c"])[pos % 3])
        if name == "ss_unb":
            ss = ss[(np.arange(1, len(ss) + 1) % 7) != 0].reset_index(drop=True)
        return ss
    return sm.datasets.load({"Penicillin": "penicillin", "Pastes": "pastes", "cake": "cake"}[name])


def fit_at_r_theta(key: str):
    """The REML fit of reference model ``key`` with θ set to lme4's θ (β, σ profiled as lme4 does)."""
    from stochmm.deterministic.lmm import ProfiledDeviance, _results_at

    e = REFS[key]
    fit = sm.lmer(e["formula"], data(e["data"]))
    theta = np.atleast_1d(np.asarray(e["theta"], dtype=float))
    return _results_at(fit.model, ProfiledDeviance(fit.model, reml=True), theta, fit.optsum, condvar=False)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def refs():
    return REFS


@pytest.fixture(scope="session")
def fit_at():
    return fit_at_r_theta


@pytest.fixture(scope="session")
def ref_data():
    return data
