"""Importance-sampling marginal likelihood of a mixed model, and the one-scale log-likelihood of every method.

For spherical random effects u ~ N(0, I) (b = Λ(θ)u; Gaussian models: b = σΛ(θ)u) the
marginal likelihood is

    L(β, θ) = ∫ exp(Σ_i ℓ_i(η_i(u))) φ(u) du,          η = Xβ + ZΛu + offset,

with ℓ the *full* log-likelihood (binomial coefficients, log y! included), so every number here
is on the scale of ``fit.loglik`` of the deterministic paths. The proposal is the Laplace
approximation at the conditional mode ũ — PIRLS (:mod:`stochmm.deterministic.pirls`) gives ũ
and the Cholesky factor L of the curvature H = Λ'Z'WZΛ + I — either Gaussian, u = ũ + L⁻ᵀz
with z ~ N(0, I), or multivariate Student-t with ``df`` degrees of freedom (heavier tails).

* **One grouping factor** (:class:`~stochmm.deterministic.pirls.LevelEngine`): the integral is a
  product over levels, so each level is sampled in its own k dimensions, all levels at once
  (arrays levels × draws × k), and log L̂ = Σ_l log p̂_l. The Monte Carlo SE comes from the
  per-level variances: Var(log p̂_l) ≈ Var(p̂_l)/p̂_l² (delta method), summed over the
  independent levels.
* **Crossed or several factors** (:class:`~stochmm.deterministic.pirls.BlockedEngine`): one
  joint proposal in q dimensions from the blocked factor of H = LL' (a diagonal block per level
  of the first factor, a sparse block S below it, a dense remainder Lrr): the crossed effects
  v = ũ_r + Lrr⁻ᵀz_r, then the first factor's effects from their Gaussian conditional
  ũ_0 + L0⁻ᵀ(z_0 − S'Lrr⁻ᵀz_r) — triangular solves with many right-hand sides, in chunks of
  draws; no q × q matrix is formed. Given v the integrand factorises over the levels of the first
  factor, so each outer draw carries ``inner`` conditional draws per level (a randomly shifted
  1-D lattice for scalar effects) averaged level by level before the product (unbiased; the
  per-level noise no longer compounds over hundreds of levels), and ``adapt`` pilot rounds
  re-centre the proposal of v at its importance-sampling posterior mean (on VerbAgg the Laplace
  mean of the item effects is off by up to 0.6 SD). ``draws`` counts outer draws there.

Variance reduction: ``antithetic=True`` pairs z with −z; ``qmc=True`` uses scrambled Sobol
points (:mod:`scipy.stats.qmc`) with ``randomizations`` independent scramblings (and, per
level, independent random shifts), whose spread gives the MC SE. The draws are arranged in
independent groups (single draws, antithetic pairs or randomised point sets) and the SE is
always computed from the group means, so it is honest for every choice.

Weight diagnostics: the effective sample size (Σw)²/Σw² and the Pareto k̂ of the log weights
(generalized-Pareto fit to the largest weights, Zhang & Stephens 2009, regularised as in
Vehtari et al.'s PSIS; :func:`pareto_khat`, vectorised over levels and checked against
``arviz.psislw`` in the tests). k̂ > 0.7 warns: the variance of the weights is (nearly)
infinite and the MC SE cannot be trusted.

``method="laplace"``, ``"agq"`` (``nagq=``) and ``"fast"`` evaluate the deterministic criteria of
:mod:`stochmm.deterministic.glmm` at the given parameters; ``"exact"`` is the Gaussian likelihood
of a linear mixed model at (β, θ, σ).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as sla
from scipy import special

from ..builder.families import Family, get_family
from ..errors import DataError

__all__ = ["LogLik", "ImportanceWarning", "loglik", "model_loglik", "pareto_khat", "importance_sample",
           "METHODS", "parse_params"]

METHODS = ("is", "laplace", "agq", "fast", "exact")
_LOG2PI = float(np.log(2.0 * np.pi))
_MAX_ELEMS = 4_000_000  # observations × draws per chunk (≈ 32 MB per array)


class ImportanceWarning(UserWarning):
    """Importance weights are unreliable (Pareto k̂ > 0.7 or a tiny effective sample size)."""


# =============================================================================================
# the value object
# =============================================================================================
class LogLik(float):
    """LogLik(value, method, mcse=0.0, ess=nan, khat=nan, draws=0, seconds=0.0, details=None)

    A log-likelihood value (a ``float``: it adds, compares and prints as one) that carries how it
    was computed. Stochastic methods report their Monte Carlo SE, the effective sample size of
    the importance weights (the smallest over levels when the integral factorises) and the
    Pareto k̂ (the largest over levels, with the level in ``details["khat_level"]``).

    Attributes
    ----------
    value : float
        The log-likelihood, all normalising constants included.
    mcse : float
        Monte Carlo standard error of ``value`` (0 for deterministic methods).
    ess : float
        Effective sample size of the importance weights.
    khat : float
        Pareto k̂ of the log weights (> 0.7: unreliable).
    draws : int
        Draws per level (factorised case) or in total (joint case).
    seconds : float
    method : str
        ``"is"``, ``"laplace"``, ``"agq(25)"``, ``"fast"`` or ``"exact"``.
    details : dict
        Per-level arrays and settings (proposal, df, qmc, antithetic, ...).

    Examples
    --------
    >>> ll = LogLik(-91.98, "is", mcse=0.001, ess=9000.0, khat=0.1, draws=10000)
    >>> float(ll) + 1.0, round(ll.deviance, 2), ll.deviance_mcse
    (-90.98, 183.96, 0.002)
    """

    def __new__(cls, value: float, method: str, mcse: float = 0.0, ess: float = np.nan, khat: float = np.nan,
                draws: int = 0, seconds: float = 0.0, details: dict | None = None) -> LogLik:
        obj = super().__new__(cls, float(value))
        obj.method = method
        obj.mcse = float(mcse)
        obj.ess = float(ess)
        obj.khat = float(khat)
        obj.draws = int(draws)
        obj.seconds = float(seconds)
        obj.details = dict(details or {})
        return obj

    @property
    def value(self) -> float:
        return float(self)

    @property
    def deviance(self) -> float:
        """−2 × the log-likelihood."""
        return -2.0 * float(self)

    @property
    def deviance_mcse(self) -> float:
        """Monte Carlo SE of the deviance (2 × ``mcse``)."""
        return 2.0 * self.mcse

    def __reduce__(self):
        return (LogLik, (float(self), self.method, self.mcse, self.ess, self.khat, self.draws, self.seconds,
                         self.details))

    def __repr__(self) -> str:
        if self.method == "is":
            return (f"LogLik({float(self):.6f} ± {self.mcse:.2g} MCSE, method='is', draws={self.draws}, "
                    f"ess={self.ess:.0f}, khat={self.khat:.2f}, {self.seconds:.2f} s)")
        return f"LogLik({float(self):.6f}, method={self.method!r}, {self.seconds:.3f} s)"

    __str__ = __repr__


# =============================================================================================
# parameters and targets
# =============================================================================================
def parse_params(model: Any, params: Any) -> tuple[np.ndarray, np.ndarray, float | None]:
    """parse_params(model, params) -> (beta, theta, sigma)

    ``params``: a results object (``fixef``/``theta``/``sigma``) or a dict with ``"beta"``,
    ``"theta"`` and, for linear mixed models, ``"sigma"``. Validates lengths, finiteness and the
    θ bounds (standard deviations are non-negative).

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> parse_params(m, {"beta": [1527.5], "theta": [0.75], "sigma": 49.5})
    (array([1527.5]), array([0.75]), 49.5)
    """
    from ..results import MixedModelResults

    if isinstance(params, MixedModelResults):
        if params.model.p != model.p or list(params.model.theta_names) != list(model.theta_names):
            raise DataError("params is a fit of a different model (its fixed effects or θ names differ)")
        beta, theta = np.asarray(params._beta, dtype=float), np.asarray(params.theta, dtype=float)
        sigma = float(params.sigma) if model.family_name == "gaussian" else None
        return beta.copy(), theta.copy(), sigma
    if not isinstance(params, dict):
        raise TypeError(f"params must be a fitted results object or a dict with 'beta', 'theta' (and 'sigma'), "
                        f"got {type(params).__name__}")
    unknown = sorted(set(params) - {"beta", "theta", "sigma"})
    if unknown:
        raise DataError(f"unknown key(s) in params: {unknown}; expected 'beta', 'theta' and (LMMs) 'sigma'")
    for key in ("beta", "theta"):
        if key not in params:
            raise DataError(f"params needs {key!r}")
    beta = np.atleast_1d(np.asarray(params["beta"], dtype=float))
    theta = np.atleast_1d(np.asarray(params["theta"], dtype=float))
    if beta.shape != (model.p,):
        raise DataError(f"beta must have {model.p} values ({', '.join(model.xnames)}); got {beta.size}")
    nt = len(model.theta_names)
    if theta.shape != (nt,):
        raise DataError(f"theta must have {nt} values ({', '.join(model.theta_names)}); got {theta.size}")
    if not (np.all(np.isfinite(beta)) and np.all(np.isfinite(theta))):
        raise DataError("beta and theta must be finite")
    lower = np.asarray(model.lower, dtype=float)
    bad = np.flatnonzero(theta < lower)
    if bad.size:
        raise DataError("negative standard deviation(s) in theta: "
                        + ", ".join(f"{model.theta_names[j]}={theta[j]:g}" for j in bad)
                        + " (diagonal entries of the relative covariance factor must be >= 0)")
    sigma = params.get("sigma")
    if model.family_name == "gaussian":
        if sigma is None or not np.isfinite(sigma) or float(sigma) <= 0:
            raise DataError(f"a linear mixed model needs a positive residual SD 'sigma' in params; got {sigma!r}")
        sigma = float(sigma)
    elif sigma is not None and abs(float(sigma) - 1.0) > 1e-12:
        raise DataError(f"{model.family_name} models have no residual SD; drop 'sigma' (got {sigma!r})")
    else:
        sigma = None
    return beta, theta, sigma


class _GaussianKernel(Family):
    """The Gaussian log-likelihood at a fixed residual SD σ, in the engines' interface.

    With b = σΛ(θ)u the LMM is a 'GLMM' in u with Λ(σθ) (Λ is linear in θ) and this family;
    its Laplace approximation is exact.
    """

    name = "gaussian"
    links = ("identity",)

    def __init__(self, sigma: float) -> None:  # no Link object needed
        self.sigma2 = float(sigma) ** 2

    @property
    def label(self) -> str:
        return "gaussian  ( identity )"

    def derivs(self, y, eta, wt, order=2):
        r = y - eta
        out = [-0.5 * wt * r * r / self.sigma2]
        if order >= 1:
            out.append(wt * r / self.sigma2)
        if order >= 2:
            out.append(np.broadcast_to(-wt / self.sigma2, np.shape(eta)))
        if order >= 3:
            out.append(np.zeros(np.shape(eta)))
        return tuple(out)

    def fisher_weights(self, eta, wt):
        return np.broadcast_to(wt / self.sigma2, np.shape(eta))

    def constant(self, model):
        w = np.asarray(model.prior_weights, dtype=float)
        return 0.5 * np.log(w) - 0.5 * (_LOG2PI + np.log(self.sigma2))


def _engine(model: Any, theta: np.ndarray, sigma: float | None, family: Family | None = None):
    """(engine, θ for the engine) at the given parameters: PIRLS engine of the model's family,
    or, for an LMM, of the Gaussian kernel at σ with θ scaled by σ."""
    from ..deterministic.pirls import make_engine

    if model.family_name == "gaussian":
        return make_engine(model, _GaussianKernel(sigma)), theta * sigma
    fam = family if family is not None else get_family(model.family)
    return make_engine(model, fam, hessian="observed"), theta


# =============================================================================================
# draws
# =============================================================================================
@dataclass
class _Draws:
    """Base draws z (standardised proposal) for ``nblock`` independent blocks (levels, or 1 joint)."""

    proposal: str
    df: float
    qmc: bool
    antithetic: bool
    groups: int  # independent groups per block
    per_group: int  # draws per group

    @property
    def size(self) -> int:
        return self.groups * self.per_group


def _plan(draws: int, proposal: str, df: float, qmc: bool, antithetic: bool, randomizations: int) -> _Draws:
    if qmc:
        R = int(randomizations)
        m = max(1, int(np.ceil(draws / R)))
        if antithetic:
            m += m % 2
        return _Draws(proposal, df, True, antithetic, R, m)
    if antithetic:
        return _Draws(proposal, df, False, True, max(1, int(np.ceil(draws / 2))), 2)
    return _Draws(proposal, df, False, False, int(draws), 1)


def _std_draws(plan: _Draws, nblock: int, dim: int, rng: np.random.Generator, g0: int = 0,
               g1: int | None = None, sobol_sets: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Standardised draws for groups g0..g1 of every block: z (nblock, ng·m, dim) and log q_z(z) (nblock, ng·m).

    Plain MC and antithetic draws come from ``rng`` group by group (the same stream whatever
    the chunking); RQMC uses ``sobol_sets[g]`` (scrambled points, shape m × (dim [+1])) shifted
    per block at random (Cranley–Patterson), so blocks are independent.
    """
    g1 = plan.groups if g1 is None else g1
    ng, m = g1 - g0, plan.per_group
    t_prop = plan.proposal == "t"
    half = m // 2 if plan.antithetic else m
    ext = dim + (1 if t_prop else 0)
    if plan.qmc:
        P = np.stack([sobol_sets[g][:half] for g in range(g0, g1)])  # ng × half × ext
        shift = rng.random((nblock, ng, 1, ext))
        U = (P[None] + shift) % 1.0
        U = np.clip(U, 1e-16, 1.0 - 1e-16)
        N = special.ndtri(U[..., :dim])
        C = special.chdtri(plan.df, 1.0 - U[..., dim]) if t_prop else None  # χ²_df quantile
    else:
        N = rng.standard_normal((nblock, ng, half, dim))
        C = rng.chisquare(plan.df, (nblock, ng, half)) if t_prop else None
    if t_prop:
        N = N * np.sqrt(plan.df / C)[..., None]
    if plan.antithetic:
        N = np.concatenate([N, -N], axis=2)
    z = N.reshape(nblock, ng * m, dim)
    r2 = np.einsum("bsd,bsd->bs", z, z)
    lnorm = -0.5 * dim * _LOG2PI - 0.5 * r2
    if t_prop:
        nu = plan.df
        logq = (special.gammaln(0.5 * (nu + dim)) - special.gammaln(0.5 * nu) - 0.5 * dim * np.log(nu * np.pi)
                - 0.5 * (nu + dim) * np.log1p(r2 / nu))
    else:
        logq = lnorm
    return z, logq


def _sobol_sets(plan: _Draws, dim: int, rng: np.random.Generator) -> list | None:
    if not plan.qmc:
        return None
    from scipy.stats import qmc

    ext = dim + (1 if plan.proposal == "t" else 0)
    half = plan.per_group // 2 if plan.antithetic else plan.per_group
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "balance properties ... power of 2"
        for _ in range(plan.groups):
            s = qmc.Sobol(d=ext, scramble=True, seed=rng)
            out.append(s.random(half))
    return out


# =============================================================================================
# Pareto k̂
# =============================================================================================
def pareto_khat(log_weights: np.ndarray) -> np.ndarray:
    """pareto_khat(log_weights) -> ndarray

    Pareto k̂ of each row of ``log_weights`` (shape (..., S)): the shape of a generalized Pareto
    distribution fitted to the M = min(S/5, 3√S) largest weights above the cut-off, by the
    empirical-Bayes estimator of Zhang & Stephens (2009), shrunk towards 0.5 with a weak prior
    (n·k + 5)/(n + 10) as PSIS does (Vehtari, Simpson, Gelman, Yao & Gabry). Vectorised over
    rows; equal to ``arviz.psislw(log_weights)[1]`` (tested). k̂ < 0.5: the weights have a
    finite variance; 0.5–0.7: usable; > 0.7: the MC SE of an importance-sampling estimate is
    unreliable.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> float(pareto_khat(rng.standard_normal(4000) * 0.1)) < 0.3
    True
    >>> float(pareto_khat(np.log(rng.pareto(1.0, 4000)))) > 0.7   # infinite-mean weights
    True
    """
    lw = np.asarray(log_weights, dtype=float)
    shape = lw.shape[:-1]
    S = lw.shape[-1]
    x = np.sort(lw.reshape(-1, S), axis=1)
    x = x - x[:, -1:]  # k̂ is invariant to the scale of the weights; keeps exp() in range
    nrow = x.shape[0]
    ntail = int(np.ceil(min(0.2 * S, 3.0 * np.sqrt(S))))
    cut_idx = S - ntail - 1
    if cut_idx < 0 or ntail <= 4:
        return np.full(shape, np.inf)
    out = np.full(nrow, np.inf)
    tiny = np.log(np.finfo(float).tiny)
    cutoff = np.maximum(x[:, cut_idx], tiny)
    tail = x[:, cut_idx + 1 :]
    ok = np.all(tail > cutoff[:, None], axis=1) & np.all(np.isfinite(tail), axis=1)
    if not ok.any():
        return out.reshape(shape)
    mx = tail[ok, -1]
    # exceedances, scaled by the largest (k̂ is scale invariant): exp(x) − exp(cutoff)
    y = np.exp(tail[ok] - mx[:, None]) - np.exp(cutoff[ok] - mx)[:, None]
    n = y.shape[1]
    m_est = 30 + int(np.sqrt(n))
    j = np.arange(1, m_est + 1)
    b = 1.0 - np.sqrt(m_est / (j - 0.5))  # (m,)
    quart = y[:, int(n / 4 + 0.5) - 1]
    b = b[None, :] / (3.0 * quart[:, None]) + 1.0 / y[:, -1][:, None]  # rows × m
    kk = np.log1p(-b[:, :, None] * y[:, None, :]).mean(axis=2)  # rows × m
    ll = n * (np.log(-(b / kk)) - kk - 1.0)
    wts = 1.0 / np.exp(ll[:, None, :] - ll[:, :, None]).sum(axis=2)
    wts = np.where(wts >= 10 * np.finfo(float).eps, wts, 0.0)
    wts /= wts.sum(axis=1, keepdims=True)
    bpost = (b * wts).sum(axis=1)
    kpost = np.log1p(-bpost[:, None] * y).mean(axis=1)
    k = (n * kpost + 10 * 0.5) / (n + 10)
    out[np.flatnonzero(ok)] = k
    return out.reshape(shape)


# =============================================================================================
# importance sampling
# =============================================================================================
def _logmeanexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def _summarise(lw: np.ndarray, plan: _Draws) -> dict:
    """Per-block estimate, delta-method variance from group means, ESS and k̂ from log weights lw (B × S)."""
    B, S = lw.shape
    lmean = _logmeanexp(lw, axis=1)  # log p̂_b
    r = np.exp(lw - lmean[:, None])  # weights / p̂ (mean 1)
    gm = r.reshape(B, plan.groups, plan.per_group).mean(axis=2)  # group means of the ratio
    G = plan.groups
    var_log = gm.var(axis=1, ddof=1) / G if G > 1 else np.full(B, np.nan)  # Var(p̂)/p̂²
    ess = S / np.mean(r * r, axis=1)
    khat = pareto_khat(lw)
    flat = np.ptp(lw, axis=1) <= 1e-9 * (1.0 + np.abs(lmean))  # constant weights: the proposal is exact
    khat[flat] = -np.inf
    return {"logp": lmean, "var": var_log, "ess": ess, "khat": khat}


def importance_sample(model: Any, beta: np.ndarray, theta: np.ndarray, sigma: float | None = None, *,
                      draws: int = 10_000, seed: Any = None, proposal: str = "t", df: float = 7.0,
                      qmc: bool | None = None, antithetic: bool = False, randomizations: int = 16,
                      inner: int = 8, adapt: int = 2, family: Family | None = None, engine: str = "auto",
                      max_elems: int = _MAX_ELEMS,
                      progress: bool | None = None, warn: bool = True) -> LogLik:
    """importance_sample(model, beta, theta, sigma=None, *, draws=10000, seed=None, proposal="t", df=7.0, ...) -> LogLik

    The importance-sampling log-likelihood at (β, θ[, σ]) — see the module docstring. Arguments
    are assumed validated (use :func:`loglik`, or ``Model.loglik``, for the checked entry point).
    ``engine="blocked"`` forces the joint proposal even for one grouping factor; ``inner`` (draws per
    level of the first factor for each outer draw) and ``adapt`` (pilot rounds re-centring the
    crossed effects' proposal) apply to the joint proposal only.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> ll = importance_sample(m, np.array([-1.3985, -0.9923, -1.1287, -1.5803]), np.array([0.642]),
    ...                        draws=2000, seed=1)
    >>> round(ll.deviance, 1), ll.mcse < 0.01   # Laplace: 184.05
    (184.0, True)
    """
    from ..deterministic.pirls import BlockedEngine, make_engine

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if engine == "blocked" and model.family_name != "gaussian":
        eng, th = make_engine(model, family or get_family(model.family), engine="blocked"), theta
    elif engine == "blocked":
        eng, th = make_engine(model, _GaussianKernel(sigma), engine="blocked"), theta * sigma
    else:
        eng, th = _engine(model, theta, sigma, family)
    st = eng.pirls(th, beta)
    if not st.converged:
        warnings.warn(f"PIRLS did not converge at these parameters ({st.iterations} iterations): the proposal "
                      "is centred at an inaccurate mode", ImportanceWarning, stacklevel=3)
    joint = isinstance(eng, BlockedEngine)
    if qmc is None:  # measured (benchmarks/bench_importance.py): RQMC pays per level, not in the joint proposal
        qmc = not joint
    plan = _plan(draws, proposal, df, qmc, antithetic, randomizations)
    if joint:
        prop = _adapt_outer(eng, st, plan, rng, max_elems, inner, adapt) if adapt else None
        lw = _joint_logweights(eng, st, plan, rng, max_elems, progress, inner=inner, outer_prop=prop)
    else:
        lw = _level_logweights(eng, st, plan, rng, max_elems, progress)
    s = _summarise(lw, plan)
    val = float(s["logp"].sum() + eng.const)
    mcse = float(np.sqrt(np.sum(s["var"])))
    kmax_at = int(np.argmax(np.nan_to_num(s["khat"], nan=np.inf)))
    khat = float(s["khat"][kmax_at])
    if joint:
        level = None
    else:
        level = str(model.terms[0].levels[kmax_at])
    details = {"proposal": proposal, "df": df if proposal != "normal" else None, "qmc": qmc, "antithetic": antithetic,
               "groups": plan.groups, "per_group": plan.per_group, "joint": joint,
               "level_loglik": s["logp"] + (0.0 if joint else _level_const(eng)), "level_mcse": np.sqrt(s["var"]),
               "level_ess": s["ess"], "level_khat": s["khat"], "khat_level": level,
               "laplace": float(-(st.pdev + st.logdet) / 2.0 + eng.const)}
    out = LogLik(val, "is", mcse=mcse, ess=float(np.min(s["ess"])), khat=khat, draws=plan.size,
                 seconds=time.perf_counter() - t0, details=details)
    if warn:
        _check_weights(out, model)
    return out


def _level_const(eng) -> np.ndarray:
    """Normalising constants summed per level (engine order)."""
    c = np.asarray(eng.family.constant(eng.model), dtype=float)[eng.order]
    return eng.ls(c)


def _check_weights(ll: LogLik, model: Any) -> None:
    where = ""
    if ll.details.get("khat_level") is not None:
        where = f" at level {ll.details['khat_level']!r} of {model.terms[0].group!r}"
    if ll.khat > 0.7 or np.isnan(ll.khat):
        warnings.warn(
            f"importance weights are unreliable: Pareto k̂ = {ll.khat:.2f}{where} (> 0.7), so the Monte Carlo SE "
            f"({ll.mcse:.3g}) cannot be trusted. Use proposal='t' with a smaller df (heavier tails), more draws, "
            "or check the parameters (a mode far from the data's support)", ImportanceWarning, stacklevel=4)
    elif ll.ess < 20:
        warnings.warn(f"importance sampling: effective sample size only {ll.ess:.1f}{where}; use more draws",
                      ImportanceWarning, stacklevel=4)


def _progress(total: int, progress: bool | None, desc: str):
    import sys

    from tqdm import tqdm

    show = (sys.stderr.isatty() and total > 4) if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


def _level_logweights(eng, st, plan: _Draws, rng, max_elems: int, progress) -> np.ndarray:
    """Log weights (nlev × S) of the per-level proposals, draws vectorised over levels and chunked."""
    fam, y, wt, refs = eng.family, eng.y, eng.wt, eng.refs
    k, nlev, n = eng.k, eng.nlev, eng.n
    A, u = st.extra["A"], st.u
    Lc = np.linalg.cholesky(st.extra["Hobs"]) if eng.hessian != "observed" else st.extra["L"]
    if k == 1:
        R = (1.0 / Lc[:, 0, 0])[:, None, None]
    else:
        R = np.transpose(np.linalg.inv(Lc), (0, 2, 1))  # L^{-T}
    logdetL = np.log(np.diagonal(Lc, axis1=1, axis2=2)).sum(1)
    AR = np.einsum("ia,iab->ib", A, R[refs])  # n × k
    sob = _sobol_sets(plan, k, rng)
    S = plan.size
    lw = np.empty((nlev, S))
    gchunk = max(1, int(max_elems // max(1, n * plan.per_group * k)))
    bar = _progress(plan.groups, progress, "importance sampling")
    for g0 in range(0, plan.groups, gchunk):
        g1 = min(plan.groups, g0 + gchunk)
        z, logq = _std_draws(plan, nlev, k, rng, g0, g1, sob)
        s0, s1 = g0 * plan.per_group, g1 * plan.per_group
        if k == 1:
            eta = st.eta[:, None] + AR[:, :1] * z[refs, :, 0]
            U2 = (u[:, 0][:, None] + R[:, 0, 0][:, None] * z[:, :, 0]) ** 2
        else:
            eta = st.eta[:, None] + np.einsum("ik,isk->is", AR, z[refs])
            Uu = u[:, None, :] + np.einsum("lab,lsb->lsa", R, z)
            U2 = np.einsum("lsa,lsa->ls", Uu, Uu)
        ll = fam.derivs(y[:, None], eta, wt[:, None], 0)[0]
        lw[:, s0:s1] = eng.ls(ll) - 0.5 * U2 - 0.5 * k * _LOG2PI - logq - logdetL[:, None]
        bar.update(g1 - g0)
    bar.close()
    return lw


def _adapt_outer(eng, st, plan: _Draws, rng, max_elems: int, inner: int, rounds: int):
    """Re-centre the crossed effects' proposal: ``rounds`` pilot runs (Gaussian, plain MC; not used in the
    estimate) estimate the posterior mean of v by self-normalised IS; the Laplace covariance is kept (a
    covariance estimated from a few hundred weighted draws in qr dimensions is noisier than the Laplace one).
    Measured on VerbAgg: the Laplace marginal mean of the 24 item effects is off by up to 0.6 SD, which
    alone gives log weights of variance ≈ 1.3; after re-centring ≈ 0.3."""
    sysu = eng.sys_u
    qr = sysu.q_rest
    if qr == 0:
        return None
    C = sla.solve_triangular(sysu.Ld[:qr, :qr], np.eye(qr), lower=True, check_finite=False).T  # Lrr⁻ᵀ
    prop = None
    pilot = _Draws("normal", 0.0, False, False, int(min(400, max(100, plan.size // 4))), 1)
    mu = np.zeros(qr)
    for _ in range(int(rounds)):
        keep: list = []
        lw = _joint_logweights(eng, st, pilot, rng, max_elems, False, inner=inner, outer_prop=prop, keep=keep)[0]
        w = np.exp(lw - lw.max())
        w /= w.sum()
        ess = 1.0 / np.sum(w * w)
        # a mean estimated from ESS weighted draws in qr dimensions is noise when ESS << qr: move only as far
        # as the pilot supports (no move at all when ESS < 2 qr is far off, e.g. InstEval's 1,100 instructors)
        c = min(1.0, ess / (2.0 * qr))
        mu = mu + c * (np.hstack(keep) @ w - mu)
        prop = (mu, C)
    return prop


def _joint_logweights(eng, st, plan: _Draws, rng, max_elems: int, progress, inner: int = 1, outer_prop=None,
                      keep: list | None = None) -> np.ndarray:
    """Log weights (1 × S) of the joint proposal from the blocked factor, in chunks of outer draws.

    H = L L' with L = [[L0, 0], [S, Lrr]]: the crossed ("rest") effects v = u_r are drawn from their
    Laplace marginal, v = ũ_r + Lrr⁻ᵀ z_r (Gaussian or t), and the first factor's effects, given v,
    from the Gaussian conditional u_0 = ũ_0 + L0⁻ᵀ(z_0 − S'Lrr⁻ᵀz_r) — one joint proposal. Given v
    the integrand factorises over the levels of the first factor, so each outer draw carries
    ``inner`` independent conditional draws per level and the level factors are averaged before
    they are multiplied (an unbiased estimate of the conditional likelihood): the per-level noise
    falls by ``inner`` instead of compounding over hundreds of levels. ``inner=1`` is the plain
    joint estimator. Returns one log weight per outer draw.
    """
    import scipy.sparse as sp

    fam, y, wt = eng.family, eng.y, eng.wt
    n = eng.n
    sysu = eng.sys_u
    q0, qr, k0, nlev0 = sysu.q0, sysu.q_rest, sysu.k0, sysu.nlev0
    u = st.u
    theta = st.extra["theta"]
    model = eng.model
    t0 = model.terms[0]
    Ts = model.lambda_blocks(theta)
    refs0 = np.asarray(t0.refs, dtype=np.intp)
    A0 = t0.z @ Ts[0]  # n × k0: ZΛ on the first factor's own effects
    Zr = sp.hstack([t.Z() for t in model.terms[1:]], format="csc") if qr else None
    ZLr = (Zr @ sp.block_diag([sp.kron(sp.identity(t.nlev), sp.csr_matrix(T)) for t, T in
                              zip(model.terms[1:], Ts[1:])], format="csc")).tocsr() if qr else None
    P = sp.csr_matrix((np.ones(n), (refs0, np.arange(n))), shape=(nlev0, n))  # level sums
    L0 = sysu.L0
    L0inv = 1.0 / L0 if k0 == 1 else np.linalg.inv(L0)
    logdetL0 = np.log(np.diagonal(L0, axis1=1, axis2=2)).sum(1)  # per level
    Lrr = sysu.Ld[:qr, :qr]
    logdetLrr = float(np.log(np.diag(Lrr)).sum()) if qr else 0.0
    Sop = sysu.S if sysu.Sd is None else sysu.Sd
    u0 = u[:q0].reshape(nlev0, k0)
    ur = u[q0:]
    sob = _sobol_sets(plan, qr, rng) if qr else None
    M = int(inner)
    S = plan.size
    lw = np.empty((1, S))
    gchunk = max(1, int(max_elems // max(1, n * plan.per_group * M)))
    bar = _progress(plan.groups, progress, "importance sampling")
    for g0 in range(0, plan.groups, gchunk):
        g1 = min(plan.groups, g0 + gchunk)
        m = (g1 - g0) * plan.per_group
        if qr:
            zr, logq = _std_draws(plan, 1, qr, rng, g0, g1, sob)
            zr, logq = zr[0].T, logq[0]  # qr × m, m
            if outer_prop is None:  # the Laplace marginal of the crossed effects: xr = Lrr⁻ᵀ z
                xr = sla.solve_triangular(Lrr, zr, lower=True, trans="T", check_finite=False)
                ldet = logdetLrr
            else:  # an adapted marginal: xr = μ + C z (qr × qr, the dense block's size)
                xr = outer_prop[0][:, None] + outer_prop[1] @ zr
                ldet = -float(np.log(np.diag(outer_prop[1])).sum())
            if keep is not None:
                keep.append(xr)
            shift0 = -np.asarray(Sop.T @ xr)  # q0 × m: conditional mean shift (before L0⁻ᵀ)
            Urr = ur[:, None] + xr
            outer = -0.5 * np.einsum("qs,qs->s", Urr, Urr) - 0.5 * qr * _LOG2PI - logq - ldet
            eta_r = st.eta[:, None] + np.asarray(ZLr @ xr)  # n × m
        else:
            shift0 = np.zeros((q0, m))
            outer = np.zeros(m)
            eta_r = np.repeat(st.eta[:, None], m, axis=1)
        if M > 1 and k0 == 1:  # randomly shifted 1-D lattice per level and outer draw: unbiased, low variance
            u01 = (np.arange(M)[None, None, None, :] + rng.random((nlev0, 1, m, 1))) / M
            z0 = special.ndtri(u01)
        else:
            z0 = rng.standard_normal((nlev0, k0, m, M))
        r0 = z0 + shift0.reshape(nlev0, k0, m)[..., None]
        if k0 == 1:
            x0 = L0inv[:, 0, 0][:, None, None, None] * r0
        else:
            x0 = np.einsum("lba,lbsj->lasj", L0inv, r0)
        U0 = u0[:, :, None, None] + x0  # nlev × k0 × m × M
        eta = eta_r[:, :, None] + np.einsum("ik,iksj->isj", A0, x0[refs0]) if k0 > 1 else \
            eta_r[:, :, None] + A0[:, 0][:, None, None] * x0[refs0, 0]
        ll = fam.derivs(y[:, None, None], eta, wt[:, None, None], 0)[0]
        lev = np.asarray(P @ ll.reshape(n, m * M)).reshape(nlev0, m, M)
        lev += -0.5 * np.einsum("lksj,lksj->lsj", U0, U0) + 0.5 * np.einsum("lksj,lksj->lsj", z0, z0)
        lev -= logdetL0[:, None, None]
        lw[0, g0 * plan.per_group : g0 * plan.per_group + m] = outer + _logmeanexp(lev, axis=2).sum(0)
        bar.update(g1 - g0)
    bar.close()
    return lw


# =============================================================================================
# deterministic methods on the same scale
# =============================================================================================
def _deterministic(model: Any, method: str, beta: np.ndarray, theta: np.ndarray, sigma: float | None,
                   nagq: int | None, rule: str, max_nodes: int, family: Family | None) -> tuple[float, str]:
    from ..deterministic.pirls import single_factor

    if model.family_name == "gaussian":
        eng, th = _engine(model, theta, sigma)
        return -eng.laplace(th, beta)[0] / 2.0, "exact"
    fam = family if family is not None else get_family(model.family)
    if method == "laplace":
        eng, th = _engine(model, theta, None, fam)
        return -eng.laplace(th, beta)[0] / 2.0, "laplace"
    if method == "fast":
        eng, th = _engine(model, theta, None, fam)
        return -eng.fast(th) / 2.0, "fast"
    from ..deterministic.pirls import LevelEngine
    from ..deterministic.quadrature import QuadratureError, agq, make_rule

    if not single_factor(model):
        groups = ", ".join(dict.fromkeys(t.group for t in model.terms))
        raise QuadratureError(f"method='agq' needs one grouping factor; this model has crossed or several factors "
                              f"({groups}): use method='is' (importance sampling) or 'laplace'")
    k = int(sum(t.k for t in model.terms))
    nq = 9 if nagq is None else int(nagq)
    rule_obj = make_rule(nq, k, rule=rule, max_nodes=max_nodes)
    eng = LevelEngine(model, fam)
    return -agq(eng, theta, beta, rule_obj)[0] / 2.0, f"agq({nq})"


# =============================================================================================
# the checked entry point
# =============================================================================================
def _check_method(method: Any, model: Any) -> tuple[str, int | None]:
    """Normalise ``"agq:25"``/``"AGQ"``; unknown names list the valid ones."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(METHODS)}; got {method!r}")
    key = method.strip().lower()
    nq = None
    if key.startswith("agq"):
        rest = key[3:].lstrip(":=(").rstrip(")")
        if rest:
            try:
                nq = int(rest)
            except ValueError:
                raise ValueError(f"cannot read the number of nodes in method {method!r}; write 'agq:25'") from None
        key = "agq"
    if key not in METHODS:
        import difflib

        near = difflib.get_close_matches(key, METHODS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown method {method!r}.{hint} Valid methods: {', '.join(METHODS)} "
                         "('agq:<nodes>' for quadrature)")
    gaussian = model.family_name == "gaussian"
    if key == "exact" and not gaussian:
        raise ValueError(f"method='exact' is only for linear mixed models (their likelihood has a closed form); "
                         f"this is a {model.family_name} GLMM: use 'agq' (one grouping factor) or 'is'")
    if gaussian and key in ("laplace", "agq", "fast"):
        raise ValueError(f"method={method!r}: a linear mixed model's likelihood is exact; use method='exact' "
                         "(or 'is' to check the sampler)")
    return key, nq


def _check_draws(draws: Any) -> int:
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) and not (
            isinstance(draws, float) and float(draws).is_integer()):
        raise TypeError(f"draws must be a positive integer, got {draws!r}")
    if int(draws) <= 0:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    return int(draws)


def loglik(model: Any, params: Any, method: str = "is", *, draws: int = 10_000, seed: Any = None,
           proposal: str = "t", df: float = 7.0, qmc: bool | None = None, antithetic: bool = False,
           randomizations: int = 16, nagq: int | None = None, rule: str = "tensor", max_nodes: int = 10_000,
           inner: int = 8, adapt: int = 2, progress: bool | None = None, warn: bool = True,
           engine: str = "auto") -> LogLik:
    """loglik(model, params, method="is", *, draws=10000, seed=None, proposal="t", df=7.0, qmc=None, ...) -> LogLik

    The log-likelihood of ``model`` at ``params`` on the package's one full scale, by importance
    sampling or by a deterministic method. ``Model.loglik(params, method=..., **options)`` calls this.

    Parameters
    ----------
    model : Model
    params : results object or dict
        A fit of this model (its estimates), or ``{"beta": ..., "theta": ..., "sigma": ...}``
        (``sigma`` only for linear mixed models).
    method : {"is", "laplace", "agq", "fast", "exact"}
        ``"agq:25"`` is ``method="agq", nagq=25``. GLMMs: ``"is"``, ``"laplace"``, ``"agq"`` (one
        grouping factor; default 9 nodes), ``"fast"`` (lme4's nAGQ = 0 criterion: β is profiled
        out, the given β is not used). Linear mixed models: ``"exact"`` or ``"is"``.
    draws : int
        Importance draws per level (one grouping factor) or outer draws of the crossed effects (joint
        proposal; each with ``inner`` draws per level of the first factor).
    seed : int or numpy.random.Generator, optional
    proposal : {"t", "normal"}
        Multivariate Student-t (default; heavier tails than the target, so the weights have a
        finite variance) or Gaussian, centred at the conditional mode with the Laplace curvature.
    df : float
        Degrees of freedom of the t proposal.
    qmc : bool, optional
        Randomised quasi-Monte Carlo (scrambled Sobol points, ``randomizations`` of them). Default:
        on for one grouping factor, off for the joint proposal (where it was measured not to pay).
    antithetic : bool
        Antithetic pairs (z, −z).
    nagq, rule, max_nodes
        For ``method="agq"`` (see :func:`stochmm.deterministic.quadrature.make_rule`).
    inner, adapt : int
        Joint proposal only: conditional draws per level of the first factor for each outer draw,
        and pilot rounds re-centring the crossed effects' proposal (see :func:`importance_sample`).
    progress : bool, optional
        Progress bar (default: only on a terminal for long runs).
    warn : bool
        Warn when the weights are unreliable (Pareto k̂ > 0.7).

    Returns
    -------
    LogLik

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    >>> ll = fit.model.loglik(fit, method="is", draws=2000, seed=1)
    >>> float(ll) > fit.loglik     # the Laplace approximation is a little low on cbpp
    True
    >>> abs(float(fit.model.loglik(fit, method="laplace")) - fit.loglik) < 1e-9
    True
    """
    t0 = time.perf_counter()
    key, nq = _check_method(method, model)
    if nagq is not None:
        if key != "agq":
            raise ValueError(f"nagq is for method='agq', not {method!r}")
        if isinstance(nagq, bool) or int(nagq) != nagq or nagq < 2:
            raise ValueError(f"nagq must be an integer >= 2 (nagq=1 is the Laplace approximation), got {nagq!r}")
        if nq is not None and nq != nagq:
            raise ValueError(f"method={method!r} and nagq={nagq} disagree")
        nq = int(nagq)
    beta, theta, sigma = parse_params(model, params)
    if key != "is":
        val, label = _deterministic(model, key, beta, theta, sigma, nq, rule, max_nodes, None)
        return LogLik(val, label, seconds=time.perf_counter() - t0)
    draws = _check_draws(draws)
    if proposal not in ("t", "normal"):
        raise ValueError(f"proposal must be 't' or 'normal', not {proposal!r}")
    if proposal != "normal" and (not np.isfinite(df) or df <= 0):
        raise ValueError(f"df of the t proposal must be positive and finite, got {df!r}")
    if qmc and (int(randomizations) != randomizations or randomizations < 2):
        raise ValueError(f"randomizations must be an integer >= 2 (the MC SE comes from their spread), got "
                         f"{randomizations!r}")
    for nm, v, lo in (("inner", inner, 1), ("adapt", adapt, 0)):
        if isinstance(v, bool) or int(v) != v or v < lo:
            raise ValueError(f"{nm} must be an integer >= {lo}, got {v!r}")
    if engine not in ("auto", "blocked"):
        raise ValueError(f"engine must be 'auto' or 'blocked', not {engine!r}")
    return importance_sample(model, beta, theta, sigma, draws=draws, seed=seed, proposal=proposal, df=df, qmc=qmc,
                             antithetic=antithetic, randomizations=int(randomizations), progress=progress, warn=warn,
                             engine=engine, inner=int(inner), adapt=int(adapt))


def model_loglik(model: Any, params: Any, method: str = "is", **options: Any) -> LogLik:
    """model_loglik(model, params, method="is", **options) -> LogLik — ``Model.loglik`` (see :func:`loglik`)."""
    return loglik(model, params, method, **options)
