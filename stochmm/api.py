"""Where the user-facing entry points meet the estimation paths.

The builder (:mod:`stochmm.builder`) and the shared vocabulary
(:mod:`stochmm.results`) know no estimation path: a method such as
``Model.fit`` or ``sm.lmer`` is looked up here, by name, in one table that maps
each entry point to the function that implements it (``"module:function"``).
The module is imported only when the entry point is first used, so
``import stochmm`` loads neither the paths nor JAX, NumPyro, ArviZ or Dask, and
no module of the package imports a path that imports it back.

Examples
--------
>>> from stochmm import api
>>> api.resolve("lmer").__module__
'stochmm.deterministic.lmm'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["ENTRY_POINTS", "PUBLIC", "resolve", "fit"]

#: entry point -> "module:function" that implements it
ENTRY_POINTS: dict[str, str] = {
    # -- sm.<name>: deterministic paths and moments
    "lmer": "stochmm.deterministic.lmm:lmer",
    "glmer": "stochmm.deterministic.glmm:glmer",
    "anova_components": "stochmm.moments.anova:anova_components",
    "mom": "stochmm.moments.fit:mom",

    # -- inference

    "anova": "stochmm.inference.comparison:anova",
    "all_fit": "stochmm.inference.diagnostics:all_fit",
    "results.ddf_table": "stochmm.inference.ddf:ddf_coef_table",
    "results.vcov_kr": "stochmm.inference.ddf:vcov_kr",
    "results.profile": "stochmm.inference.profile:profile",
    "results.bootstrap": "stochmm.inference.bootstrap:bootstrap",
    "results.rePCA": "stochmm.inference.diagnostics:rePCA",
    "results.influence": "stochmm.inference.diagnostics:influence",

    # -- stochastic: posterior
    "sample": "stochmm.stochastic.posterior:sample",
    "sample_prior": "stochmm.stochastic.posterior:sample_prior",
    "diagnose": "stochmm.stochastic.diagnostics:diagnose",
    "Model.sample": "stochmm.stochastic.posterior:model_sample",

    # -- stochastic: importance sampling
    "compare_likelihoods": "stochmm.stochastic.compare:compare_likelihoods",
    "Model.loglik": "stochmm.stochastic.importance:model_loglik",
    "Model.fit:is": "stochmm.stochastic.mcml:fit_is",
    "check_approximation": "stochmm.stochastic.compare:check_approximation",

    # -- stochastic: accuracy studies
    "accuracy_study": "stochmm.stochastic.accuracy:accuracy_study",

    # -- methods (dotted names are not attributes of `stochmm`)
    "Model.fit:lmm": "stochmm.deterministic.lmm:fit_lmm",
    "Model.fit:glmm": "stochmm.deterministic.glmm:fit_glmm",
}

#: entry points that are attributes of the package (``sm.lmer``, ...)
PUBLIC = frozenset(k for k in ENTRY_POINTS if "." not in k and ":" not in k)


def resolve(name: str) -> Callable[..., Any]:
    """resolve(name) -> callable

    The function behind entry point ``name`` (imported on first use).
    """
    try:
        target = ENTRY_POINTS[name]
    except KeyError:
        raise AttributeError(f"no entry point {name!r}; known: {', '.join(sorted(ENTRY_POINTS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def fit(model: Any, method: str | None = None, **options: Any) -> Any:
    """fit(model, method=None, **options) -> results

    ``Model.fit``: linear mixed models by ``"REML"`` (default) or ``"ML"``
    (:func:`stochmm.deterministic.lmm.fit_lmm`); GLMMs by ``"laplace"`` (default),
    ``"agq"`` (with ``nagq=``) or ``"fast"`` (nAGQ = 0)
    (:func:`stochmm.deterministic.glmm.fit_glmm`).
    """
    if isinstance(method, str) and method.lower() == "is":  # Monte Carlo ML (importance sampling)
        return resolve("Model.fit:is")(model, **options)
    if model.family_name == "gaussian":
        if method is not None:  # method= and reml=/REML= are two spellings of one choice
            m = method.upper() if isinstance(method, str) else None
            if m not in ("REML", "ML"):
                raise ValueError(f"method for a linear mixed model is 'REML' or 'ML', not {method!r}")
            for key in ("reml", "REML"):
                if key in options and options[key] is not (m == "REML"):
                    raise ValueError(f"method={method!r} contradicts {key}={options[key]!r}; give one")
            options = {k: v for k, v in options.items() if k not in ("reml", "REML")} | {"reml": m == "REML"}
        return resolve("Model.fit:lmm")(model, **options)
    return resolve("Model.fit:glmm")(model, method=method, **options)
