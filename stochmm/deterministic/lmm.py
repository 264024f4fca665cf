"""Linear mixed models by maximum likelihood and REML.

The profiled deviance (Bates, Mächler, Bolker & Walker 2015, JSS 67(1), eq. 34
and 41; MixedModels.jl, "Details of the parameter estimation"):

    −2ℓ(θ)     = log|L_θ|² + n [1 + log(2π r²_θ / n)]
    −2ℓ_R(θ)   = log|L_θ|² + log|R_X|² + (n−p) [1 + log(2π r²_θ / (n−p))]

with L_θ, R_X and r²_θ from the blocked Cholesky factor of the cross-products of
``[ZΛ X y]`` (:class:`stochmm.deterministic.blocks.BlockedSystem`). β and σ are profiled out;
only θ is optimised, with bounds, by BOBYQA (:mod:`stochmm.deterministic.optsummary`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..builder.model import Model
from ..errors import DataError, DesignError, OptionError, SingularFitWarning, check_flag, check_keywords
from ..results import MixedModelResults, Summary, format_coef_table
from .blocks import BlockedSystem
from .optsummary import OptSummary, check_convergence, minimize_bounded

__all__ = ["ProfiledDeviance", "LmmResults", "fit_lmm", "lmer"]

_LOG2PI = float(np.log(2.0 * np.pi))


class ProfiledDeviance:
    """ProfiledDeviance(model, reml=True)

    The LMM objective as a function of θ alone. Cross-products are computed
    once here; each call applies Λ(θ) and refactors.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> f = ProfiledDeviance(m, reml=False)
    >>> round(f([1.0, 0.0, 1.0]), 6)
    1784.642296
    """

    def __init__(self, model: Model, reml: bool = True) -> None:
        if model.family_name != "gaussian":
            raise DesignError(f"ProfiledDeviance is for linear mixed models; this model's family is {model.family_name!r}")
        self.model = model
        self.reml = bool(reml)
        w = None if np.all(model.prior_weights == 1.0) else model.prior_weights
        self.system = BlockedSystem(model.terms, model.X, model.y - model.offset, weights=w)
        self.ldW = 0.0 if w is None else float(np.log(w).sum())
        self.n, self.p = model.n, model.p
        self.nfev = 0

    def __call__(self, theta: np.ndarray) -> float:
        self.nfev += 1
        bs = self.system.factor(self.model.lambda_blocks(theta))
        return self.from_factor(bs)

    def from_factor(self, bs: BlockedSystem) -> float:
        r2 = bs.pwrss
        if self.reml:
            nmp = self.n - self.p
            return float(bs.logdet_L + bs.logdet_RX - self.ldW + nmp * (1.0 + _LOG2PI + np.log(r2 / nmp)))
        return float(bs.logdet_L - self.ldW + self.n * (1.0 + _LOG2PI + np.log(r2 / self.n)))


class LmmResults(MixedModelResults):
    """Results of :func:`lmer` — see :class:`stochmm.results.MixedModelResults` for the attributes.

    Additional attributes
    ---------------------
    reml : bool
    pwrss : float
        Penalised weighted residual sum of squares at the optimum.
    """

    family_label = "Linear"

    def __init__(self, *args: Any, reml: bool, pwrss: float, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.reml = reml
        self.pwrss = pwrss

    @property
    def scaled_residuals(self) -> np.ndarray:
        """Residuals scaled by σ/√w (lme4's ``residuals(fit, scaled = TRUE)``)."""
        return self.residuals * np.sqrt(self.model.prior_weights) / self.sigma

    _ddf_label = {"satterthwaite": "Satterthwaite's method", "kenward-roger": "Kenward-Roger's method",
                  "between-within": "the between-within method"}

    def simulate(self, nsim: int = 1, seed: int | np.random.Generator | None = None,
                 use_u: bool = False) -> pd.DataFrame:
        """simulate(nsim=1, seed=None, use_u=False) -> DataFrame

        Responses simulated from the fitted model, one column per simulation
        (``sim_1``, ...), as lme4's ``simulate(fit, nsim, seed)``:
        new random effects each time, or (``use_u=True``) the conditional modes kept
        (lme4's ``use.u = TRUE``). Draws come from :meth:`stochmm.Model.simulate` at
        (β̂, θ̂, σ̂).

        Examples
        --------
        >>> import stochmm as sm
        >>> fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
        >>> fit.simulate(2, seed=1).shape
        (30, 2)
        """
        if not isinstance(use_u, (bool, np.bool_)):
            raise TypeError(f"use_u must be True or False, not {use_u!r}")
        b = self._b / self.sigma if use_u else None
        sims = self.model.simulate(self._beta, self.theta, self.sigma, nsim=nsim, seed=seed, b=b)
        return pd.DataFrame(sims, columns=[f"sim_{s + 1}" for s in range(sims.shape[1])])

    def summary(self, ddf: str | None = None) -> Summary:
        """summary(ddf=None) -> Summary

        The text lme4's ``summary(lmer(...))`` prints: criterion, scaled residuals,
        random effects, fixed effects with t values and their correlations. With
        ``ddf="satterthwaite" | "kenward-roger" | "between-within"`` the fixed-effects
        table has lmerTest's df and Pr(>|t|) columns.
        """
        m = self.model
        coef = self.coef_table(ddf=ddf)
        head = [f"Linear mixed model fit by {'REML' if self.reml else 'maximum likelihood'}"
                + (" ['lmerMod']" if ddf is None else f". t-tests use {self._ddf_label[coef.attrs['ddf']]}"
                   " ['lmerModLmerTest']"),
                f"Formula: {m.formula}", ""]
        if self.reml:
            head.append(f"REML criterion at convergence: {self.objective:.1f}")
        else:
            head += self._ic_lines(self.objective)
        head += ["", "Scaled residuals: ", self._residual_quantiles(self.scaled_residuals), "",
                 "Random effects:", self._random_effects_text(), "", "Fixed effects:",
                 format_coef_table(coef)]
        corr = self._fixef_corr_text()
        if corr:
            head += ["", corr]
        if self.is_singular:
            head += ["", "boundary (singular) fit: see is_singular"]
        if m.dropped_columns:
            head += [f"fixed-effect model matrix is rank deficient so dropping {len(m.dropped_columns)} columns / coefficients"]
        return Summary("\n".join(head), {"coefficients": coef, "varcorr": self.varcorr})


#: optimizer options fit_lmm passes to BOBYQA (stochmm.deterministic.optsummary.minimize_bounded)
_OPTIMIZER_OPTIONS = ("ftol_rel", "ftol_abs", "xtol_abs", "maxeval", "initial_step")
_LMM_KEYWORDS = ("reml", "start", "check_derivatives", "condvar", "keep_log", *_OPTIMIZER_OPTIONS)
#: what lme4 users type, and where it goes here
_LMM_HINTS = {
    "family": "a GLMM is fitted by glmer() (sm.glmer(formula, data, family=...)); lmer() fits linear mixed models",
    "nagq": "nAGQ is for GLMMs: use glmer()",
    "nAGQ": "nAGQ is for GLMMs: use glmer()",
    "method": "lmer() takes reml=True/False (Model.fit takes method='REML' or 'ML')",
}


def _lmm_keywords(options: dict[str, Any], func: str, reml: Any = True) -> tuple[bool, dict[str, Any]]:
    """Entry-point check of fit_lmm's keywords -> (reml, other options).

    ``REML`` is lme4's spelling of ``reml`` (given with a different ``reml=False`` it is
    refused); flags must be True/False; anything else unknown is refused with the valid
    names, never passed down to the optimizer.
    """
    options = dict(options)
    if "REML" in options:
        val = options.pop("REML")
        if reml is not True and val is not reml:
            raise OptionError(f"{func}() got both reml={reml!r} and REML={val!r}; give one")
        reml = val
    check_keywords(options, _LMM_KEYWORDS[1:] + ("weights", "offset") * (func == "lmer"), func, _LMM_HINTS)
    for flag in ("check_derivatives", "condvar", "keep_log"):
        if flag in options:
            check_flag(options[flag], flag)
    return check_flag(reml, "reml"), options


def fit_lmm(model: Model, reml: bool = True, *, start: np.ndarray | None = None, check_derivatives: bool = True,
            condvar: bool = True, keep_log: bool = False, **optimizer_options: Any) -> LmmResults:
    """fit_lmm(model, reml=True, start=None, ...) -> LmmResults

    Fit a linear mixed model built by :class:`Model` by ML or REML.

    Parameters
    ----------
    model : Model
    reml : bool
        REML (default) or maximum likelihood.
    start : array-like, "moments" or "lme4", optional
        θ start values. ``"lme4"``: 1 on the diagonals of each Λ block, 0 off (lme4's
        start). ``"moments"``: method-of-moments estimates (:func:`moment_start`) with
        a first trust region of 0.1. Default: ``"moments"`` for unweighted
        random-intercept models, else ``"lme4"``. Measured
        (``python benchmarks/bench_lmm.py``, section "start values"): deviance
        evaluations lme4 start → moment start: Pastes 34 → 14, Penicillin 45 → 16,
        Oats 29 → 24, InstEval REML 43 → 25, same optimum.
    check_derivatives : bool
        Finite-difference gradient and Hessian at the optimum, with lme4's
        convergence warnings (max |grad| after scaling by the Hessian > 0.002).
    condvar : bool
        Make conditional variances of the random effects available
        (computed on first use of ``ranef_condvar``).
    **optimizer_options
        ``ftol_rel``, ``ftol_abs``, ``xtol_abs``, ``maxeval``, ``initial_step``;
        ``REML=`` (lme4's spelling) is taken for ``reml``. Other names are refused
        (:class:`~stochmm.errors.OptionError`, listing the valid ones).
    """
    t_start = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"fit_lmm needs a stochmm Model, got {type(model).__name__}")
    reml, optimizer_options = _lmm_keywords(optimizer_options, "fit_lmm", reml)
    check_derivatives, condvar = check_flag(check_derivatives, "check_derivatives"), check_flag(condvar, "condvar")
    keep_log = check_flag(keep_log, "keep_log")
    dev = ProfiledDeviance(model, reml=reml)
    _check_response_varies(model, dev.system.y_residual_rms)
    if start is None:
        start = "moments" if moment_start_applies(model) else "lme4"
    if isinstance(start, str):
        if start not in ("moments", "lme4"):
            raise ValueError(f"start must be θ values, 'moments' or 'lme4', not {start!r}")
        if start == "moments":
            try:
                moments = moment_start(model)
            except (DesignError, DataError, ValueError, np.linalg.LinAlgError, ZeroDivisionError):
                moments = None  # a start-value failure never aborts a fit: lme4's start instead
            if moments is not None and np.all(np.isfinite(moments)):
                # close to the optimum already: a small first trust region (measured: fewer evaluations)
                optimizer_options.setdefault("initial_step", np.full(model.theta0.size, 0.1))
            start = moments
        else:
            start = None
    x0 = model.theta0 if start is None else np.asarray(start, dtype=float)
    if x0.shape != model.theta0.shape:
        raise ValueError(f"start must have {model.theta0.size} values ({', '.join(model.theta_names)}), got {x0.size}")
    optsum = minimize_bounded(dev, x0, model.lower, names=model.theta_names, keep_log=keep_log, **optimizer_options)
    theta = optsum.xfinal.copy()
    # tidy the boundary (lme4's boundary.tol): components within 1e-5 of a bound are put on it
    # if that is no worse
    lower = model.lower
    near = np.isfinite(lower) & (theta - lower < 1e-5) & (theta != lower)
    if near.any():
        trial = theta.copy()
        trial[near] = lower[near]
        ft = dev(trial)
        if ft <= optsum.fmin:
            theta, optsum.xfinal, optsum.fmin = trial, trial, ft
    derivs = None
    if check_derivatives:
        # finite-difference gradient and Hessian at the optimum (lme4's calc.derivs); one Newton
        # step on them polishes the last digits BOBYQA's tolerances leave, kept only if it improves
        derivs = _fd_at_optimum(dev, theta, lower)
        if derivs is not None:
            step = _newton_polish(dev, theta, lower, optsum.fmin, derivs)
            if step is not None:
                theta, optsum.xfinal, optsum.fmin = step[0], step[0], step[1]
    res = _results_at(model, dev, theta, optsum, condvar=condvar)
    if check_derivatives:
        check_convergence(res, derivs)
    if res.is_singular:
        msg = ("boundary (singular) fit: θ component(s) "
               + ", ".join(f"{n}={v:.3g}" for n, v, d in zip(model.theta_names, theta, np.isfinite(lower)) if d and v < 1e-4)
               + " at or within 1e-4 of 0")
        res.warnings.append(msg)
        warnings.warn(msg, SingularFitWarning, stacklevel=3)
    res.elapsed = time.perf_counter() - t_start
    return res


def _check_response_varies(model: Model, residual_rms: float) -> None:
    """A response with no variation about its least-squares fit on X leaves nothing for the
    variance components: say so instead of letting the factorization fail."""
    y = model.y - model.offset
    scale = float(np.max(np.abs(y))) if y.size else 0.0
    if not residual_rms > 1e-12 * scale:
        what = "is constant" if np.ptp(y) == 0 else "is fitted exactly by the fixed effects"
        raise DataError(f"the response {model.response_name!r} {what} (no residual variation): "
                        "a linear mixed model has no variance to estimate")


def moment_start_applies(model: Model) -> bool:
    """Whether :func:`moment_start` covers the model: random intercepts only, no weights or offset."""
    return (all(t.cnames == ["(Intercept)"] for t in model.terms) and bool(np.all(model.prior_weights == 1.0))
            and bool(np.all(model.offset == 0.0)))


def moment_start(model: Model) -> np.ndarray:
    """moment_start(model) -> ndarray

    θ start values from moment estimates of the variance components: Gao–Owen
    U-statistics (:func:`stochmm.mom`) for one or two random-intercept terms,
    Henderson III (:func:`stochmm.anova_components`) for more. Random slopes and
    prior weights are not covered (ValueError).
    """
    if not moment_start_applies(model):
        raise ValueError("moment start values need unweighted random-intercept terms only, as in (1 | g)")
    from ..moments import model_varcomp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vc = model_varcomp(model)
    sigma2 = float(vc["Residual"])
    names = [t.group for t in model.terms]
    if sigma2 <= 0 or len(set(names)) != len(names) or not all(g in vc.index for g in names):
        return model.theta0
    return np.sqrt(np.maximum(vc[names].to_numpy(dtype=float), 0.0) / sigma2)


def _results_at(model: Model, dev: ProfiledDeviance, theta: np.ndarray, optsum: OptSummary, condvar: bool) -> LmmResults:
    bs = dev.system.factor(model.lambda_blocks(theta))
    objective = dev.from_factor(bs)
    n, p = model.n, model.p
    r2 = bs.pwrss
    sigma = np.sqrt(r2 / (n - p)) if dev.reml else np.sqrt(r2 / n)
    beta = bs.beta()
    RX = bs.RX
    if p:
        RXinv = np.linalg.inv(RX)
        vcov = sigma**2 * (RXinv.T @ RXinv)
    else:
        vcov = np.zeros((0, 0))
    u = bs.u(beta)
    b = np.concatenate([_lambda_times(t, T, u[sl]) for t, T, sl in zip(model.terms, model.lambda_blocks(theta), model.z_slices)])
    def b_condvar():  # lazily: refactor at θ̂ (the system may have moved on) and invert blockwise
        Ts = model.lambda_blocks(theta)
        blocks = dev.system.factor(Ts).cond_cov_u()
        return [sigma**2 * np.einsum("ab,lbc,dc->lad", T, C, T) for T, C in zip(Ts, blocks)]

    df = p + len(theta) + 1
    res = LmmResults(model, "REML" if dev.reml else "ML", objective, beta, vcov, theta, sigma, b,
                     b_condvar if condvar else None, optsum,
                     loglik=-objective / 2.0, df=df, reml=dev.reml, pwrss=r2)
    res.ldL2, res.ldRX2 = bs.logdet_L, bs.logdet_RX
    return res


def _lambda_times(term, T: np.ndarray, u: np.ndarray) -> np.ndarray:
    return (u.reshape(term.nlev, term.k) @ T.T).ravel()


def _fd_derivatives(f, x: np.ndarray, free: np.ndarray, h: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient and Hessian over the ``free`` components."""
    idx = np.flatnonzero(free)
    k = idx.size
    f0 = f(x)
    g, H = np.zeros(k), np.zeros((k, k))
    fp, fm = np.zeros(k), np.zeros(k)
    for a, i in enumerate(idx):
        e = np.zeros_like(x)
        e[i] = h
        fp[a], fm[a] = f(x + e), f(x - e)
        g[a] = (fp[a] - fm[a]) / (2 * h)
        H[a, a] = (fp[a] - 2 * f0 + fm[a]) / h**2
    for a, i in enumerate(idx):
        for c in range(a):
            j = idx[c]
            e = np.zeros_like(x)
            e[i], e[j] = h, h
            fpp, fmm = f(x + e), f(x - e)
            H[a, c] = H[c, a] = (fpp - fp[a] - fp[c] + 2 * f0 - fm[a] - fm[c] + fmm) / (2 * h * h)
    return g, H


def _fd_at_optimum(f, theta: np.ndarray, lower: np.ndarray) -> dict | None:
    free = ~(np.isfinite(lower) & (theta - lower < 1e-4 * np.maximum(1.0, np.abs(lower))))
    if not free.any():
        return None
    g, H = _fd_derivatives(f, theta, free)
    return {"free": free, "gradient": g, "Hessian": H}


def _newton_polish(f, theta, lower, fmin, derivs) -> tuple[np.ndarray, float] | None:
    try:
        step = np.linalg.solve(derivs["Hessian"], derivs["gradient"])
    except np.linalg.LinAlgError:
        return None
    trial = theta.copy()
    trial[derivs["free"]] -= step
    if np.any(trial < lower) or np.max(np.abs(step)) > 1e-2:
        return None
    ft = f(trial)
    return (trial, ft) if ft < fmin else None


def lmer(formula: str, data: pd.DataFrame, reml: bool = True, *, weights: Any = None, offset: Any = None,
         start: np.ndarray | None = None, **options: Any) -> LmmResults:
    """lmer(formula, data, reml=True, *, weights=None, offset=None, start=None, **options) -> LmmResults

    Fit a linear mixed model, as lme4's ``lmer``.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas.DataFrame
        Not modified.
    reml : bool
        REML (default) or maximum likelihood; True or False only (``REML=`` is
        accepted for it, lme4's spelling).
    weights, offset : str or array-like, optional
        Prior weights (residual variance σ²/w) and an offset.
    start : array-like, optional
        θ start values.
    **options
        Passed to :func:`fit_lmm` (``check_derivatives``, ``condvar``, ``keep_log``, optimizer
        tolerances ``ftol_rel``, ``ftol_abs``, ``xtol_abs``, ``maxeval``, ``initial_step``).
        ``REML=`` (lme4's spelling) is taken for ``reml``; ``family=`` points to :func:`glmer`;
        other names are refused with the list of valid ones.

    Returns
    -------
    LmmResults

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> round(fit.objective, 3), fit.fixef.round(3).tolist()
    (1743.628, [251.405, 10.467])
    """
    reml, options = _lmm_keywords(options, "lmer", reml)
    model = Model(formula, data, family=None, weights=weights, offset=offset)
    return fit_lmm(model, reml=reml, start=start, **options)
