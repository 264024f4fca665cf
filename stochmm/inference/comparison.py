"""Comparing nested fits: likelihood-ratio tests as lme4's ``anova(fit0, fit1)``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chi2

from ..results import MixedModelResults

__all__ = ["anova"]


def _ml(fit: MixedModelResults) -> MixedModelResults:
    """lme4 refits REML fits by ML before comparing likelihoods ("refitting model(s) with ML")."""
    if getattr(fit, "reml", False):
        from ..deterministic.lmm import fit_lmm

        return fit_lmm(fit.model, reml=False, start=fit.theta)
    return fit


def anova(*fits: MixedModelResults, refit: bool = True) -> pd.DataFrame:
    """anova(*fits, refit=True) -> DataFrame

    Likelihood-ratio tests between nested models, ordered by number of
    parameters, with lme4's columns: npar, AIC, BIC, logLik, deviance, Chisq, Df,
    Pr(>Chisq). REML fits are refitted by ML first (as lme4 does) unless
    ``refit=False``.

    Examples
    --------
    >>> import stochmm as sm
    >>> d = sm.datasets.load("sleepstudy")
    >>> f0 = sm.lmer("Reaction ~ Days + (Days || Subject)", d, reml=False)
    >>> f1 = sm.lmer("Reaction ~ Days + (Days | Subject)", d, reml=False)
    >>> round(float(anova(f0, f1)["Chisq"].iloc[1]), 4)
    0.0639
    """
    if len(fits) < 2:
        raise ValueError("anova needs at least two fits to compare")
    n = {f.nobs for f in fits}
    if len(n) > 1:
        raise ValueError(f"models were fitted to different numbers of observations: {sorted(n)}")
    fits = tuple(_ml(f) if refit else f for f in fits)
    order = np.argsort([f.df for f in fits], kind="stable")
    rows, prev = [], None
    for i in order:
        f = fits[i]
        row = {"model": f.model.formula, "npar": f.df, "AIC": f.aic, "BIC": f.bic, "logLik": f.loglik,
               "deviance": -2 * f.loglik, "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan}
        if prev is not None:
            stat = max(2 * (f.loglik - prev.loglik), 0.0)
            df = f.df - prev.df
            row.update({"Chisq": stat, "Df": df, "Pr(>Chisq)": chi2.sf(stat, df) if df > 0 else np.nan})
        rows.append(row)
        prev = f
    return pd.DataFrame(rows).set_index("model")
