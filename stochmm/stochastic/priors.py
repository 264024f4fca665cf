"""Priors of the posterior path: names, weakly-informative defaults, user overrides, support checks.

Every parameter the sampler draws has a name the user already knows from the ML fit:

* fixed effects as ``fit.fixef`` names them (``"(Intercept)"``, ``"period2"``), on the raw columns of X;
* ``"sd(group)"`` for the SD of a random intercept, ``"sd(group:term)"`` for any other column of a
  random-effects term (``"sd(Subject:Days)"``); a grouping factor that appears in two terms with the same
  column gets varcorr's de-duplicated group name (``"Subject.1"``);
* ``"cor(group)"`` for the correlation matrix of a vector-valued term (LKJ prior); its entries are reported
  as ``"cor(group:term1,term2)"``;
* ``"sigma"``: the residual SD of a linear mixed model.

Defaults follow rstanarm's autoscaling (Gabry & Goodrich, *Prior distributions for rstanarm models*):
with s_y = sd(y) for Gaussian models and 1 otherwise, s_x the SD of a column,

* β_j ~ Normal(0, 2.5 s_y / s_x) for every non-constant column;
* the intercept ~ Normal(m_y, 2.5 s_y) on the *centred* predictors (m_y = mean(y) for Gaussian models,
  0 otherwise), as rstanarm puts it; a user prior on ``"(Intercept)"`` applies to the raw intercept;
* each random-effect SD ~ Exponential(rate = s_z / s_y) (s_z = 1 for an intercept column, the column's SD
  otherwise, so that the prior is on the scale of its contribution to the linear predictor);
* the correlation matrix of a vector-valued term ~ LKJ(1) (uniform over correlation matrices);
* σ ~ Exponential(rate = 1 / s_y).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..builder.model import Model
from ..errors import StochmmError
from ..results import unique_group_names

__all__ = ["PriorError", "ParamLayout", "layout", "default_priors", "resolve_priors", "describe"]


class PriorError(StochmmError, ValueError):
    """A prior that cannot be used: unknown name, wrong support, wrong shape."""


@dataclass
class ParamLayout:
    """Names and positions of the parameters the sampler draws (constrained scale).

    Attributes
    ----------
    fixef : list of str
        Fixed-effect names (X's columns).
    sd : list of str
        One name per random-effect SD, terms in ``model.terms`` order, columns in term order.
    sd_term : list of int
        Term index of each SD; ``sd_col`` its column within the term.
    cor_terms : list of int
        Terms with k > 1 (those with a correlation matrix).
    cor_prior_names : list of str
        ``"cor(group)"`` for each of them.
    cor : list of str
        ``"cor(group:a,b)"`` for each lower-triangular pair, term by term.
    group_names : list of str
        varcorr's (de-duplicated) group name of each term.
    sigma : bool
        Whether a residual SD is sampled.
    intercept : int or None
        Position of the intercept column in X.
    """

    fixef: list[str]
    sd: list[str]
    sd_term: list[int]
    sd_col: list[int]
    cor_terms: list[int]
    cor_prior_names: list[str]
    cor: list[str]
    group_names: list[str]
    sigma: bool
    intercept: int | None

    @property
    def names(self) -> list[str]:
        """Every prior name, in the order of :func:`describe`."""
        return self.fixef + self.sd + self.cor_prior_names + (["sigma"] if self.sigma else [])

    @property
    def scalar_names(self) -> list[str]:
        """Every scalar parameter reported in summaries (correlations entry by entry)."""
        return self.fixef + self.sd + self.cor + (["sigma"] if self.sigma else [])


def layout(model: Model) -> ParamLayout:
    """layout(model) -> ParamLayout

    The parameter names of the posterior of ``model``.

    Examples
    --------
    >>> import stochmm as sm
    >>> lay = layout(sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy")))
    >>> lay.names
    ['(Intercept)', 'Days', 'sd(Subject)', 'sd(Subject:Days)', 'cor(Subject)', 'sigma']
    >>> lay.cor
    ['cor(Subject:(Intercept),Days)']
    """
    gnames = unique_group_names([t.group for t in model.terms])
    sd, sd_term, sd_col, cor_terms, cor_prior, cor = [], [], [], [], [], []
    seen: set[str] = set()
    for j, t in enumerate(model.terms):
        for c, cname in enumerate(t.cnames):
            nm = f"sd({t.group})" if cname == "(Intercept)" else f"sd({t.group}:{cname})"
            if nm in seen:  # the same group and column in two terms: varcorr's unique group name
                nm = f"sd({gnames[j]})" if cname == "(Intercept)" else f"sd({gnames[j]}:{cname})"
            seen.add(nm)
            sd.append(nm)
            sd_term.append(j)
            sd_col.append(c)
        if t.k > 1:
            g = t.group if f"cor({t.group})" not in cor_prior else gnames[j]
            cor_terms.append(j)
            cor_prior.append(f"cor({g})")
            cor += [f"cor({g}:{t.cnames[b]},{t.cnames[a]})" for b in range(t.k) for a in range(b + 1, t.k)]
    icpt = model.xnames.index("(Intercept)") if "(Intercept)" in model.xnames else None
    return ParamLayout(list(model.xnames), sd, sd_term, sd_col, cor_terms, cor_prior, cor, gnames,
                       model.family_name == "gaussian", icpt)


# -------------------------------------------------------------------------------------------------
# defaults
# -------------------------------------------------------------------------------------------------
def _scale_y(model: Model) -> tuple[float, float]:
    if model.family_name != "gaussian":
        return 0.0, 1.0
    w = np.asarray(model.prior_weights, dtype=float)
    y = np.asarray(model.y, dtype=float) - np.asarray(model.offset, dtype=float)
    m = float(np.average(y, weights=w))
    s = float(np.sqrt(np.average((y - m) ** 2, weights=w)))
    return m, (s if s > 0 else 1.0)


def default_priors(model: Model) -> dict[str, Any]:
    """default_priors(model) -> dict name -> numpyro distribution

    rstanarm-style autoscaled weakly-informative priors (see the module docstring). The intercept's
    default applies to the intercept of the centred predictors.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> {k: type(v).__name__ for k, v in default_priors(m).items()}
    {'(Intercept)': 'Normal', 'period2': 'Normal', 'period3': 'Normal', 'period4': 'Normal', 'sd(herd)': 'Exponential'}
    """
    import numpyro.distributions as dist

    lay = layout(model)
    my, sy = _scale_y(model)
    out: dict[str, Any] = {}
    X = model.X
    for j, nm in enumerate(lay.fixef):
        if j == lay.intercept:
            out[nm] = dist.Normal(my, 2.5 * sy)
            continue
        sx = float(np.std(X[:, j]))
        out[nm] = dist.Normal(0.0, 2.5 * sy / (sx if sx > 0 else 1.0))
    for nm, j, c in zip(lay.sd, lay.sd_term, lay.sd_col):
        t = model.terms[j]
        sz = 1.0 if t.cnames[c] == "(Intercept)" else float(np.std(t.z[:, c]))
        out[nm] = dist.Exponential((sz if sz > 0 else 1.0) / sy)
    for nm, j in zip(lay.cor_prior_names, lay.cor_terms):
        out[nm] = dist.LKJCholesky(model.terms[j].k, 1.0)
    if lay.sigma:
        out["sigma"] = dist.Exponential(1.0 / sy)
    return out


# -------------------------------------------------------------------------------------------------
# user priors
# -------------------------------------------------------------------------------------------------
def _support_name(d: Any) -> str:
    return type(d.support).__name__.lstrip("_")


def _is_positive_support(d: Any) -> bool:
    from numpyro.distributions import constraints

    s = d.support
    if s is constraints.positive or s is constraints.nonnegative:
        return True
    lb = getattr(s, "lower_bound", None)
    ub = getattr(s, "upper_bound", None)
    try:
        return lb is not None and float(np.min(lb)) >= 0 and (ub is None or float(np.min(ub)) > 0)
    except TypeError:
        return False


def _check_scalar(name: str, d: Any) -> None:
    if tuple(d.batch_shape) != () or tuple(d.event_shape) != ():
        raise PriorError(f"the prior of {name!r} must be a scalar distribution; got {d!r} with batch shape "
                         f"{tuple(d.batch_shape)} and event shape {tuple(d.event_shape)}")


def resolve_priors(model: Model, priors: dict[str, Any] | None) -> tuple[dict[str, Any], set[str]]:
    """resolve_priors(model, priors) -> (priors, user_names)

    Defaults overridden by ``priors`` (name -> NumPyro distribution), after checking names, shapes and
    supports. ``dist.LKJ(k, η)`` on a correlation is turned into ``dist.LKJCholesky(k, η)``.

    Raises
    ------
    PriorError
        Unknown name (the valid names are listed, with a near match), not a distribution, a prior whose
        support does not match the parameter (a Normal on an SD, a Gamma on a fixed effect), wrong shape.

    Examples
    --------
    >>> import stochmm as sm, numpyro.distributions as dist
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> resolve_priors(m, {"sd(herd)": dist.Normal(0, 1)})
    Traceback (most recent call last):
    ...
    stochmm.stochastic.priors.PriorError: the prior of 'sd(herd)' must have positive support (an SD is > 0), got Normal with support Real; use e.g. dist.HalfNormal(1.0) or dist.Exponential(1.0)
    """
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    lay = layout(model)
    out = default_priors(model)
    if priors is None:
        return out, set()
    if not isinstance(priors, dict):
        raise PriorError(f"priors must be a dict name -> numpyro distribution, got {type(priors).__name__}")
    valid = lay.names
    for name, d in priors.items():
        if name not in valid:
            near = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise PriorError(f"unknown prior name {name!r}.{hint} Valid names: {', '.join(valid)}")
        if not isinstance(d, dist.Distribution):
            raise PriorError(f"the prior of {name!r} must be a numpyro distribution, got {d!r}")
        if name in lay.fixef:
            _check_scalar(name, d)
            if d.support is not constraints.real:
                raise PriorError(f"the prior of fixed effect {name!r} must have support on the real line, got "
                                 f"{type(d).__name__} with support {_support_name(d)}; use e.g. dist.Normal(0, 5)")
        elif name in lay.sd or name == "sigma":
            _check_scalar(name, d)
            if not _is_positive_support(d):
                raise PriorError(f"the prior of {name!r} must have positive support (an SD is > 0), got "
                                 f"{type(d).__name__} with support {_support_name(d)}; use e.g. "
                                 "dist.HalfNormal(1.0) or dist.Exponential(1.0)")
        else:  # correlation matrix
            k = model.terms[lay.cor_terms[lay.cor_prior_names.index(name)]].k
            if isinstance(d, dist.LKJ):
                d = dist.LKJCholesky(k, d.concentration)
            if not isinstance(d, dist.LKJCholesky):
                raise PriorError(f"the prior of {name!r} must be dist.LKJCholesky({k}, eta) or dist.LKJ({k}, eta), "
                                 f"got {type(d).__name__}")
            if d.dimension != k:
                raise PriorError(f"the prior of {name!r} must have dimension {k}, got {d.dimension}")
        out[name] = d
    return out, set(priors)


def _fmt(d: Any) -> str:
    import numpyro.distributions as dist

    def f(v: Any) -> str:
        return f"{float(np.asarray(v)):.4g}"

    if isinstance(d, dist.Normal):
        return f"Normal({f(d.loc)}, {f(d.scale)})"
    if isinstance(d, dist.HalfNormal):
        return f"HalfNormal({f(d.scale)})"
    if isinstance(d, dist.Exponential):
        return f"Exponential(rate={f(d.rate)})"
    if isinstance(d, dist.HalfCauchy):
        return f"HalfCauchy({f(d.scale)})"
    if isinstance(d, dist.StudentT):
        return f"StudentT({f(d.df)}, {f(d.loc)}, {f(d.scale)})"
    if isinstance(d, dist.LKJCholesky):
        return f"LKJ({d.dimension}, eta={f(d.concentration)})"
    return repr(d)


def describe(model: Model, priors: dict[str, Any], user: set[str]) -> pd.DataFrame:
    """describe(model, priors, user) -> DataFrame

    rstanarm's ``prior_summary``: one row per prior with the distribution, whether the user set it, and
    the scale it applies to.
    """
    lay = layout(model)
    rows = []
    for nm in lay.names:
        if nm in lay.fixef:
            kind = "fixed effect"
            note = ("intercept of the centred predictors" if (lay.fixef.index(nm) == lay.intercept and nm not in user)
                    else "raw column of X")
        elif nm in lay.sd:
            kind, note = "random-effect SD", ""
        elif nm == "sigma":
            kind, note = "residual SD", ""
        else:
            kind, note = "correlation matrix", "Cholesky factor"
        rows.append((nm, kind, _fmt(priors[nm]), "user" if nm in user else "default (autoscaled)", note))
    return pd.DataFrame(rows, columns=["parameter", "kind", "prior", "source", "applies to"])
