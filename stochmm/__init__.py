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

from ._hostdevices import set_host_devices

set_host_devices()  # an environment variable only (parallel NUTS chains); JAX is not imported here

from . import api, datasets  # noqa: E402
from .builder.model import Model  # noqa: E402
from .errors import (  # noqa: E402
    ConvergenceWarning,
    DataError,
    DesignError,
    FormulaError,
    MissingColumnError,
    MissingDataWarning,
    NegativeEstimateWarning,
    OptionError,
    RankDeficiencyWarning,
    SingularFitWarning,
    StochmmError,
)

__version__ = "0.1.0"

__all__ = [
    "Model",
    "datasets",
    *sorted(api.PUBLIC),
    "ConvergenceWarning",
    "DataError",
    "DesignError",
    "FormulaError",
    "MissingColumnError",
    "MissingDataWarning",
    "NegativeEstimateWarning",
    "OptionError",
    "RankDeficiencyWarning",
    "SingularFitWarning",
    "StochmmError",
]


def __getattr__(name: str):
    # entry points and subpackages load on first use, so `import stochmm` stays fast
    if name in api.PUBLIC:
        return api.resolve(name)
    if name in ("moments", "plots", "builder", "deterministic", "stochastic", "inference"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'stochmm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
