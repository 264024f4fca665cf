"""The shared results vocabulary (stochmm.results): documented properties, plain types, one missing marker."""

import inspect

import numpy as np
import pytest

import stochmm as sm
from stochmm.builder.formula import BarTerm
from stochmm.builder.model import Model
from stochmm.builder.terms import ReTerm
from stochmm.deterministic.glmm import GlmmResults
from stochmm.deterministic.lmm import LmmResults
from stochmm.results import MixedModelResults


@pytest.mark.parametrize("cls", [MixedModelResults, LmmResults, GlmmResults, Model, ReTerm, BarTerm])
def test_every_property_has_its_own_docstring(cls):
    """issue 8, 3.9: help(fit.se) says what se is."""
    missing = [name for klass in inspect.getmro(cls) if klass.__module__.startswith("stochmm")
               for name, v in vars(klass).items() if isinstance(v, property) and not (v.__doc__ or "").strip()]
    assert not missing, missing


def test_information_criteria_are_python_floats_and_varcorr_marks_missing_with_nan():
    fit = sm.lmer("Yield ~ 1 | Batch", sm.datasets.load("dyestuff"), reml=False)
    for v in (fit.aic, fit.bic, fit.deviance, fit.loglik, fit.objective):
        assert type(v) is float
    assert fit.bic == pytest.approx(fit.aic - 2 * 3 + 3 * np.log(30))
    vc = fit.varcorr
    assert vc["term2"].dtype == object and vc["term2"].isna().all() and vc["term1"].isna().tolist() == [False, True]
    assert "None" not in vc.to_string()
    vs = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy")).varcorr
    assert vs["term2"].isna().tolist() == [True, True, False, True]
    assert vs.loc[2, "term2"] == "Days"
