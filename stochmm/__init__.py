"""stochmm: linear and generalized linear mixed-effects models in Python.

One formula-to-structure builder (:class:`Model`) feeds every estimation path:
profiled-deviance LMMs (:func:`lmer`), GLMMs by Laplace / adaptive Gauss–Hermite
quadrature (:func:`glmer`), and moment estimators of variance components.

Examples
--------
>>> import stochmm as sm
>>> fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
>>> round(fit.objective, 4)
1743.6283
"""

from __future__ import annotations

from . import datasets
from .errors import (
    ConvergenceWarning,
    DataError,
    DesignError,
    FormulaError,
    MissingColumnError,
    MissingDataWarning,
    NegativeEstimateWarning,
    RankDeficiencyWarning,
    SingularFitWarning,
    StochmmError,
)
from .model import Model

__version__ = "0.1.0"

__all__ = [
    "Model",
    "datasets",
    "lmer",
    "glmer",
    "anova",
    "anova_components",
    "mom",
    "ConvergenceWarning",
    "DataError",
    "DesignError",
    "FormulaError",
    "MissingColumnError",
    "MissingDataWarning",
    "NegativeEstimateWarning",
    "RankDeficiencyWarning",
    "SingularFitWarning",
    "StochmmError",
]


def __getattr__(name: str):
    # estimation paths are imported lazily so `import stochmm` stays fast
    if name == "lmer":
        from .lmm import lmer

        return lmer
    if name == "anova":
        from .comparison import anova

        return anova
    if name in ("glmer",):
        from .glmm import glmer

        return glmer
    if name in ("anova_components", "mom"):
        from . import moments

        return getattr(moments, name)
    if name == "moments":
        import importlib

        return importlib.import_module(".moments", __name__)
    raise AttributeError(f"module 'stochmm' has no attribute {name!r}")
