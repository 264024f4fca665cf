"""The estimation methods an accuracy study compares: one row per method in one table.

Each :class:`StudyMethod` says how to fit a replicate (a :class:`~stochmm.builder.model.Model`
with a simulated response) and how to read the estimates, standard errors and intervals of the
study's parameters from what the fit returns. :func:`parse_method` turns the strings users write
(``"laplace"``, ``"agq:9"``, ``"fast"``, ``"REML"``, ``"ML"``; ``"is"``/``"is:1000"``, Monte Carlo ML
by importance sampling; ``"nuts"``, the posterior by NUTS) into rows of the table; another path
joins the study by adding one row to :data:`METHODS`.

The study's parameters are the fixed effects (model-matrix column names), the random-effect SDs
and correlations named after the variance components table (``varcorr``), and σ for linear mixed
models: :func:`parameter_names` lists them, :func:`vc_from_theta` computes them from (θ, σ).

Examples
--------
>>> import stochmm as sm
>>> m = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
>>> parameter_names(m)
['(Intercept)', 'Days', 'sd(Subject)', 'sd(Subject:Days)', 'cor(Subject:(Intercept),Days)', 'sigma']
>>> parse_method("agq:9", "binomial").label, parse_method("reml", "gaussian").label
('agq:9', 'REML')
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from ..builder.model import Model
from ..errors import ConvergenceWarning, SingularFitWarning, StochmmError
from ..results import unique_group_names

__all__ = ["StudyMethod", "StudyContext", "Estimates", "METHODS", "parse_method", "method_names", "parameter_names",
           "vc_layout", "vc_from_theta", "StudyInputError", "methods_offering", "profile_interval",
           "ProfileFailed"]


class StudyInputError(StochmmError, ValueError):
    """An argument of an accuracy study that cannot describe a study (unknown name, impossible truth, ...)."""


# =============================================================================================
# parameters: β, random-effect SDs and correlations (varcorr names), σ
# =============================================================================================
def vc_layout(model: Model) -> list[tuple[str, str, int, int, int]]:
    """vc_layout(model) -> list of (name, kind, term, a, b)

    The variance-component parameters, term by term: its SDs (``kind="sd"``, column ``a``) then
    its correlations (``kind="cor"``, columns a < b). Names as the posterior path names them
    (:mod:`stochmm.stochastic.priors`): ``sd(group)`` for an intercept column, ``sd(group:term)``
    for any other, ``cor(group:term1,term2)``; a name that would repeat (the same factor and
    column in two terms) takes ``varcorr``'s unique group name (``group.1``).
    """
    gnames = unique_group_names([t.group for t in model.terms])
    out: list[tuple[str, str, int, int, int]] = []
    seen: set[str] = set()
    for j, t in enumerate(model.terms):
        for a, cname in enumerate(t.cnames):
            name = f"sd({t.group})" if cname == "(Intercept)" else f"sd({t.group}:{cname})"
            if name in seen:
                name = f"sd({gnames[j]})" if cname == "(Intercept)" else f"sd({gnames[j]}:{cname})"
            seen.add(name)
            out.append((name, "sd", j, a, a))
        if t.k > 1:
            g = t.group if f"cor({t.group})" not in seen else gnames[j]
            seen.add(f"cor({g})")
            for a in range(t.k):
                for b in range(a + 1, t.k):
                    out.append((f"cor({g}:{t.cnames[a]},{t.cnames[b]})", "cor", j, a, b))
    return out


def parameter_names(model: Model) -> list[str]:
    """parameter_names(model) -> list of str

    The parameters an accuracy study reports, in table order: fixed effects, SDs and
    correlations of the random effects, and ``sigma`` for a Gaussian model.
    """
    names = list(model.xnames) + [v[0] for v in vc_layout(model)]
    return names + (["sigma"] if model.family_name == "gaussian" else [])


def vc_from_theta(model: Model, theta: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """vc_from_theta(model, theta, sigma=1.0) -> ndarray

    SDs and correlations of the random effects (in :func:`vc_layout` order) at
    θ and σ: Σ_j = σ² T_j T_jᵀ. A correlation with a zero SD is NaN.
    """
    out = []
    covs = [sigma * sigma * (T @ T.T) for T in model.lambda_blocks(theta)]
    for _, kind, j, a, b in vc_layout(model):
        S = covs[j]
        if kind == "sd":
            out.append(np.sqrt(S[a, a]))
        else:
            d = np.sqrt(S[a, a] * S[b, b])
            out.append(S[a, b] / d if d > 0 else np.nan)
    return np.asarray(out, dtype=float)


# =============================================================================================
# the method table
# =============================================================================================
@dataclass(frozen=True)
class StudyContext:
    """What reading a fit needs besides the fit, computed once per study.

    Attributes
    ----------
    model : Model
        The design (any replicate's model has the same structure).
    names : tuple of str
        :func:`parameter_names`.
    layout : list
        :func:`vc_layout`.
    level : float
        Nominal interval level; ``z`` its two-sided normal quantile.
    interval : str
        ``"auto"`` or a kind from :attr:`StudyMethod.intervals`.
    profile_rows : tuple of int
        For each study parameter, its row in the profile's interval table (``fit.profile().confint()``:
        SDs/correlations in θ order, ``sigma``, then β), for ``interval="profile"``.
    """

    model: Model
    names: tuple[str, ...]
    layout: tuple
    level: float
    z: float
    interval: str
    theta_rows: tuple = ()
    scalar: bool = False
    profile_rows: tuple = ()

    @classmethod
    def build(cls, model: Model, level: float, interval: str) -> StudyContext:
        rows = tuple((j, r) for j, t in enumerate(model.terms) for r, _ in t.tril)
        layout = tuple(vc_layout(model))
        # the profile's order: SDs/correlations term by term in θ order (tril: r ≥ c), sigma, β
        gaussian = model.family_name == "gaussian"
        prof = [("sd", j, r, r) if r == c else ("cor", j, c, r) for j, t in enumerate(model.terms) for r, c in t.tril]
        prof += [("sigma",)] if gaussian else []
        prof += [("beta", i) for i in range(model.p)]
        pos = {key: k for k, key in enumerate(prof)}
        study = [("beta", i) for i in range(model.p)] + [(kind, j, a, b) for _, kind, j, a, b in layout]
        study += [("sigma",)] if gaussian else []
        return cls(model, tuple(parameter_names(model)), layout, float(level),
                   NormalDist().inv_cdf(0.5 + level / 2.0), interval, rows, all(t.k == 1 for t in model.terms),
                   tuple(pos[key] for key in study))

    def vc(self, theta: np.ndarray, sigma: float = 1.0) -> np.ndarray:
        """:func:`vc_from_theta` (SDs straight from θ when every term is scalar)."""
        if self.scalar:
            return sigma * np.abs(np.asarray(theta, dtype=float))
        return vc_from_theta(self.model, theta, sigma)


@dataclass
class Estimates:
    """What a method reports for the study's parameters (arrays in :func:`parameter_names` order)."""

    estimate: np.ndarray
    se: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    converged: bool = True
    singular: bool = False


@dataclass(frozen=True)
class StudyMethod:
    """One estimation method of an accuracy study.

    Attributes
    ----------
    label : str
        The name in the study's tables (``"laplace"``, ``"agq:9"``, ``"REML"``, ...).
    families : str
        ``"lmm"`` (Gaussian models only), ``"glmm"`` (binomial/Poisson) or ``"any"``.
    fit : callable
        ``fit(model, seed, **options) -> results``; ``seed`` is the method's own integer seed
        for the replicate when ``seeded`` (else None: deterministic fits need none).
    read : callable
        ``read(results, context, caught) -> Estimates``: ``context`` a :class:`StudyContext`,
        ``caught`` the warnings the fit issued (``warnings.catch_warnings(record=True)``).
    intervals : tuple of str
        Interval kinds the method offers; the first is its own (``interval="auto"``).
    description : str
    seeded : bool
        The fit draws random numbers (importance sampling, MCMC): it gets its own seed.
    """

    label: str
    families: str
    fit: Callable[..., Any]
    read: Callable[..., Estimates]
    intervals: tuple[str, ...] = ("wald",)
    description: str = ""
    seeded: bool = False


def _flags(fit: Any, caught: list) -> tuple[bool, bool]:
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    singular = bool(getattr(fit, "is_singular", False)) or any(issubclass(w.category, SingularFitWarning)
                                                               for w in caught)
    return converged, singular


def _vc_se_glmm(fit: Any, ctx: StudyContext) -> np.ndarray:
    """Delta-method SEs of the SDs/correlations of a GLMM fit from its Hessian in (θ, β).

    The fit's finite-difference Hessian H of the deviance over the free (θ, β) gives
    cov(θ̂) = 2 H⁻¹ restricted to θ; a component of θ on its bound is not free and every SD or
    correlation that depends on it (through its row of T_j) gets NaN: no Wald interval on a boundary.
    """
    nvc = len(ctx.layout)
    derivs = getattr(fit, "derivs", None)
    out = np.full(nvc, np.nan)
    if not derivs or derivs.get("Hessian") is None:
        return out
    nt = len(ctx.theta_rows)
    free = np.asarray(derivs["free"], dtype=bool)
    try:
        Hinv = np.linalg.inv(np.asarray(derivs["Hessian"], dtype=float))
    except np.linalg.LinAlgError:
        return out
    fi = np.flatnonzero(free)
    tpos = np.flatnonzero(fi < nt)  # θ's rows in the Hessian of the free parameters
    tfree = fi[tpos]
    cov_t = 2.0 * Hinv[tpos[:, None], tpos]
    if np.any(np.diag(cov_t) < 0):
        return out
    theta = np.asarray(fit.theta, dtype=float)
    if ctx.scalar:  # SD_j = |θ_j|: the Jacobian is diagonal
        out[tfree] = np.sqrt(np.diag(cov_t))
        return out
    J = np.zeros((nvc, nt))
    for k in range(nt):  # central differences of the smooth map θ -> (SD, cor)
        h = 1e-6 * max(1.0, abs(theta[k]))
        tp, tm = theta.copy(), theta.copy()
        tp[k] += h
        tm[k] -= h
        J[:, k] = (ctx.vc(tp) - ctx.vc(tm)) / (2 * h)
    Jf = J[:, tfree]
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", Jf, cov_t, Jf), 0.0))
    for k in np.flatnonzero(~free[:nt]):
        jk, rk = ctx.theta_rows[k]
        for idx, (_, _kind, j, a, b) in enumerate(ctx.layout):
            if j == jk and rk in (a, b):
                se[idx] = np.nan
    return se


def _coef(fit: Any) -> tuple[np.ndarray, np.ndarray]:
    """β̂ and its SEs as arrays: the arrays behind ``fit.fixef``/``fit.se`` when the fit is one of the
    package's results (no pandas objects per replicate: they cost more than the study's whole
    bookkeeping), else the public properties."""
    beta, vcov = getattr(fit, "_beta", None), getattr(fit, "_vcov", None)
    if isinstance(beta, np.ndarray) and isinstance(vcov, np.ndarray):
        return beta, np.sqrt(np.diag(vcov))
    return np.asarray(fit.fixef, dtype=float), np.asarray(fit.se, dtype=float)


class ProfileFailed(StochmmError, RuntimeError):
    """Profiling a replicate's fit failed (the study records the replicate's fit as failed)."""


def profile_interval(fit: Any, ctx: StudyContext) -> tuple[np.ndarray, np.ndarray]:
    """profile_interval(fit, ctx) -> (lower, upper)

    Profile-likelihood intervals at ``ctx.level`` of every study parameter (study order):
    ``fit.profile(level=ctx.level).confint(ctx.level)``, the same computation as
    ``fit.confint(method="profile", level=ctx.level)`` (exact roots of ζ = ±z, found while
    profiling; one profile per fit, at the study's level only). REML fits are profiled on the ML
    deviance (lme4's ``refitML``). An endpoint the profile cannot reach is NaN; an SD whose
    profile stays below the cutoff down to 0 gets 0, a correlation ±1 (lme4's rule).

    A coarser trace (``delta``) would save about a third of the time but moves endpoints of
    multi-parameter terms by up to ~1 % (the inner optimisations are warm-started from different
    points), so the study keeps the profile's default: its intervals are exactly the user's.
    """
    try:
        with np.errstate(all="ignore"):
            ci = fit.profile(level=ctx.level).confint(ctx.level)
    except Exception as e:  # noqa: BLE001 - reported as this replicate's failure
        raise ProfileFailed(f"profile likelihood interval failed: {type(e).__name__}: {e}") from e
    arr = ci.to_numpy(dtype=float)
    if arr.shape != (len(ctx.profile_rows), 2):
        raise ProfileFailed(f"profile returned {arr.shape[0]} intervals for {len(ctx.profile_rows)} parameters")
    rows = np.asarray(ctx.profile_rows, dtype=int)
    return arr[rows, 0], arr[rows, 1]


def _read_ml(fit: Any, ctx: StudyContext, caught: list) -> Estimates:
    """Estimates of an ML/REML fit; Wald intervals estimate ± z·SE (β always; SDs and
    correlations where the fit has a Hessian in θ: GLMMs fitted with nAGQ ≥ 1), or profile
    intervals (:func:`profile_interval`) when ``ctx.interval == "profile"``."""
    gaussian = ctx.model.family_name == "gaussian"
    sigma = float(fit.sigma) if gaussian else 1.0
    beta, se_b = _coef(fit)
    vc = ctx.vc(fit.theta, sigma)
    se_vc = np.full(vc.size, np.nan) if gaussian else _vc_se_glmm(fit, ctx)
    est = np.concatenate([beta, vc] + ([[sigma]] if gaussian else []))
    se = np.concatenate([se_b, se_vc] + ([[np.nan]] if gaussian else []))
    converged, singular = _flags(fit, caught)
    if ctx.interval == "profile":
        lo, hi = profile_interval(fit, ctx)
        return Estimates(est, se, lo, hi, converged, singular)
    return Estimates(est, se, est - ctx.z * se, est + ctx.z * se, converged, singular)


@dataclass(frozen=True)
class _GlmmFit:
    method: str
    nagq: int | None = None

    def __call__(self, model: Model, seed: int, **options: Any) -> Any:
        if self.nagq is not None:
            options = {**options, "nagq": self.nagq}
        return model.fit(method=self.method, **options)


@dataclass(frozen=True)
class _LmmFit:
    method: str

    def __call__(self, model: Model, seed: int, **options: Any) -> Any:
        return model.fit(method=self.method, **options)


def _laplace(arg: str | None) -> StudyMethod:
    return StudyMethod("laplace", "glmm", _GlmmFit("laplace"), _read_ml, ("wald", "profile"),
                       "maximum likelihood, Laplace approximation (nAGQ = 1)")


def _fast(arg: str | None) -> StudyMethod:
    return StudyMethod("fast", "glmm", _GlmmFit("fast"), _read_ml, ("wald",),
                       "nAGQ = 0: β within PIRLS, Laplace in θ")


def _agq(arg: str | None) -> StudyMethod:
    if arg is None:
        raise StudyInputError("method 'agq' needs its number of nodes, e.g. 'agq:9' (adaptive Gauss-Hermite "
                              "quadrature with 9 nodes)")
    try:
        k = int(arg)
    except ValueError:
        raise StudyInputError(f"'agq:{arg}': the number of quadrature nodes must be an integer, e.g. 'agq:9'") from None
    if k < 2:
        raise StudyInputError(f"'agq:{arg}' needs at least 2 nodes ('agq:1' is the Laplace approximation: "
                              "use 'laplace')")
    return StudyMethod(f"agq:{k}", "glmm", _GlmmFit("agq", k), _read_ml, ("wald",),
                       f"maximum likelihood, adaptive Gauss-Hermite quadrature ({k} nodes)")


def _reml(arg: str | None) -> StudyMethod:
    return StudyMethod("REML", "lmm", _LmmFit("REML"), _read_ml, ("wald", "profile"),
                       "restricted maximum likelihood (profile intervals: on the ML deviance, as lme4)")


def _ml(arg: str | None) -> StudyMethod:
    return StudyMethod("ML", "lmm", _LmmFit("ML"), _read_ml, ("wald", "profile"), "maximum likelihood")


# -- Monte Carlo ML by importance sampling (stochmm.stochastic.mcml: Model.fit(method="is"))
@dataclass(frozen=True)
class _IsFit:
    draws: int | None = None

    def __call__(self, model: Model, seed: int, **options: Any) -> Any:
        if self.draws is not None:
            options = {**options, "draws": self.draws}
        options.setdefault("progress", False)
        return model.fit(method="is", seed=seed, **options)


def _is(arg: str | None) -> StudyMethod:
    if arg is None:
        return StudyMethod("is", "glmm", _IsFit(), _read_ml, ("wald",),
                           "Monte Carlo maximum likelihood by importance sampling", seeded=True)
    try:
        draws = int(arg)
    except ValueError:
        raise StudyInputError(f"'is:{arg}': the number of importance draws must be an integer, e.g. 'is:1000'") from None
    if draws < 1:
        raise StudyInputError(f"'is:{arg}' needs at least one importance draw")
    return StudyMethod(f"is:{draws}", "glmm", _IsFit(draws), _read_ml, ("wald",),
                       f"Monte Carlo maximum likelihood by importance sampling ({draws} draws)", seeded=True)


# -- the posterior by NUTS (stochmm.stochastic.posterior: Model.sample)
@dataclass(frozen=True)
class _NutsFit:
    def __call__(self, model: Model, seed: int, **options: Any) -> Any:
        options.setdefault("progress", False)
        return model.sample(seed=seed, **options)


def _read_posterior(post: Any, ctx: StudyContext, caught: list) -> Estimates:
    """Posterior means as estimates, posterior SDs as SEs; intervals: equal-tailed posterior quantiles at
    the level (``interval="auto"``/``"posterior"``) or mean ± z·SD (``"wald"``). Any sampler warning
    (R-hat, ESS, divergences, E-BFMI) counts as not converged."""
    from .diagnostics import SamplerWarning

    k = len(ctx.names)
    est, se, lo, hi = (np.full(k, np.nan) for _ in range(4))
    a = (1.0 - ctx.level) / 2.0
    for i, name in enumerate(ctx.names):
        d = np.asarray(post.draws(name), dtype=float).ravel()
        est[i], se[i] = d.mean(), d.std(ddof=1)
        if ctx.interval == "wald":
            lo[i], hi[i] = est[i] - ctx.z * se[i], est[i] + ctx.z * se[i]
        else:
            lo[i], hi[i] = np.quantile(d, [a, 1.0 - a])
    converged = not any(issubclass(w.category, (SamplerWarning, ConvergenceWarning)) for w in caught)
    return Estimates(est, se, lo, hi, converged, False)


def _nuts(arg: str | None) -> StudyMethod:
    if arg is not None:
        raise StudyInputError(f"'nuts:{arg}': NUTS takes its settings from method_options, e.g. "
                              "method_options={'nuts': {'draws': 1000, 'chains': 4}}")
    return StudyMethod("nuts", "any", _NutsFit(), _read_posterior, ("posterior", "wald"),
                       "posterior by NUTS (NumPyro): posterior means, SDs and quantile intervals", seeded=True)


#: method name (lower case, before any ``:argument``) -> factory(argument) -> StudyMethod
METHODS: dict[str, Callable[[str | None], StudyMethod]] = {
    "laplace": _laplace,
    "agq": _agq,
    "fast": _fast,
    "reml": _reml,
    "ml": _ml,
    "is": _is,
    "nuts": _nuts,
}

_SPELLED = {"laplace": "laplace", "agq": "agq:K", "fast": "fast", "reml": "REML", "ml": "ML", "is": "is[:draws]",
            "nuts": "nuts"}


def method_names(family: str | None = None) -> list[str]:
    """method_names(family=None) -> list of str

    The method names a study accepts (for a family: those that apply to it).
    """
    out = []
    for key, make in METHODS.items():
        spelled = _SPELLED.get(key, key)
        if family is None:
            out.append(spelled)
            continue
        m = make("9") if key == "agq" else make(None)
        if m.families == "any" or (m.families == "lmm") == (family == "gaussian"):
            out.append(spelled)
    return out


def methods_offering(interval: str, family: str | None = None) -> list[str]:
    """methods_offering(interval, family=None) -> list of str

    The method names (as :func:`method_names` spells them) that offer an interval kind
    (``"wald"``, ``"profile"``, ``"posterior"``), for a family when given.

    Examples
    --------
    >>> methods_offering("profile", "binomial"), methods_offering("profile", "gaussian")
    (['laplace'], ['REML', 'ML'])
    """
    out = []
    for key, make in METHODS.items():
        m = make("9") if key == "agq" else make(None)
        if family is not None and not (m.families == "any" or (m.families == "lmm") == (family == "gaussian")):
            continue
        if interval in m.intervals:
            out.append(_SPELLED.get(key, key))
    return out


def parse_method(name: str, family: str) -> StudyMethod:
    """parse_method(name, family) -> StudyMethod

    The table row for a method name (case-insensitive; ``"agq:K"`` takes its number of nodes),
    checked against the model's family.
    """
    if not isinstance(name, str):
        raise StudyInputError(f"methods are given by name (str), got {name!r}")
    key, _, arg = name.strip().partition(":")
    key = key.lower()
    if key not in METHODS:
        valid = method_names(family)
        near = difflib.get_close_matches(key, [v.split(":")[0].lower() for v in method_names()], n=1, cutoff=0.5)
        hint = f" Did you mean {_SPELLED.get(near[0], near[0])!r}?" if near else ""
        raise StudyInputError(f"unknown method {name!r}.{hint} Methods for a {family} model: {', '.join(valid)}")
    m = METHODS[key](arg or None)
    gaussian = family == "gaussian"
    if m.families == "lmm" and not gaussian:
        raise StudyInputError(f"method {name!r} fits linear mixed models; methods for a {family} model: "
                              f"{', '.join(method_names(family))}")
    if m.families == "glmm" and gaussian:
        raise StudyInputError(f"method {name!r} fits GLMMs; methods for a Gaussian (linear) mixed model: "
                              f"{', '.join(method_names(family))}")
    return m
