"""Variance components by moments: ANOVA / expected-mean-square tables, Matloff's
random-N moment estimators, Gao–Owen U-statistics for crossed factors, and
out-of-core / distributed fits on Dask.

* :func:`anova_components` — ANOVA table with expected mean squares and Henderson
  III (Type I) estimates, balanced or not (:mod:`stochmm.moments.anova`).
* :func:`mom` — moment fit of ``y ~ fixed + (1 | g)`` (random-N, law of total
  variance: :mod:`stochmm.moments.randomn`) or ``y ~ fixed + (1 | a) + (1 | b)``
  (U-statistics: :mod:`stochmm.moments.crossed`) from a pandas or a Dask DataFrame
  (:mod:`stochmm.moments.distributed`).
* :func:`fit_parquet` — the same on parquet files larger than memory.

Examples
--------
>>> import stochmm as sm
>>> sm.anova_components("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff")).varcomp.round(2).to_dict()
{'Batch': 1764.05, 'Residual': 2451.25}
"""

from ._common import MomentResults, NegativeEstimateWarning
from .anova import AnovaComponents, anova_components
from .fit import MomentFit, fit_parquet, model_varcomp, mom
from .randomn import ClusterTable, fit_oneway

__all__ = [
    "model_varcomp",
    "anova_components",
    "mom",
    "fit_parquet",
    "AnovaComponents",
    "MomentFit",
    "MomentResults",
    "NegativeEstimateWarning",
    "ClusterTable",
    "fit_oneway",
]
