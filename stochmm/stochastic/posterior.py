"""Posterior of a mixed model by NumPyro's NUTS, generated from the builder's :class:`~stochmm.builder.model.Model`.

The log density is written once, from the structures every other path uses — X, y, weights (binomial
trials), offset, the family and link, and each random-effects term's level codes ``refs`` and model matrix
``z`` — and never from a second parse of the formula or a dense Z: a term's contribution to the linear
predictor is the row-wise product of ``z`` with the random effects gathered by level code (the Khatri–Rao
form of Z), whose gradient JAX scatters back by a segment sum.

Geometry (what NUTS is given, as opposed to what is reported):

* the non-intercept columns of X are centred and the intercept is transformed back afterwards
  (β on the raw columns is what priors and results use; the map has unit Jacobian);
* random effects are non-centred (b = u Lᵀ, u ~ N(0, I)) except for terms whose levels carry much
  information: there the centred form b ~ N(0, L Lᵀ) is sampled. The choice is made from the data, by the
  shrinkage of the ML fit: a term is centred when its conditional variances are on average below half of
  its prior variances (``centered=`` overrides it);
* SDs and σ are sampled on the log scale, correlation Cholesky factors through NumPyro's
  ``CorrCholeskyTransform``;
* chains start from the Laplace (GLMM) or REML (LMM) estimates, each with a small jitter;
* NUTS moves one flat vector; its mass matrix is dense up to ``DENSE_MAX`` (100) dimensions — marginal
  NUTS and small full models, where the intercept and the random effects' mean are correlated — and
  diagonal beyond;
* float64 throughout, so the numbers agree with the ML paths (float32 would halve memory and speed up
  the gathers on a GPU, at the cost of ~7 significant digits in the log density).

The sampler is NumPyro's NUTS kernel driven by :mod:`stochmm.stochastic.nuts` (one compiled program for
all iterations, chains one per device), compiled with XLA options chosen for the model's size: for a
small model NUTS costs more to compile than to run.

With ``marginalize`` the random effects are integrated out inside the log density
(:mod:`stochmm.stochastic.marginal`: exactly for LMMs, by adaptive Gauss–Hermite quadrature for a GLMM
with one grouping factor, by the Laplace approximation for crossed factors — an approximation, labelled as
such), NUTS samples only (β, SDs, correlations[, σ]) and the random effects are drawn afterwards from their
conditional posterior given each draw.

With ``clones=K`` (data cloning, Lele et al. 2007; Ponciano et al. 2009) the likelihood of K independent
copies of the data (each with its own random effects) is used: the posterior mean tends to the MLE and K
times the posterior variance to its asymptotic variance.
"""

from __future__ import annotations

import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import jax

from ._jax import configure

configure()  # float64, persistent compilation cache

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..builder.families import get_family  # noqa: E402
from ..builder.model import Model  # noqa: E402
from ..errors import DataError, StochmmError  # noqa: E402
from ..results import Summary  # noqa: E402
from . import diagnostics as diag  # noqa: E402
from .idata import make_idata  # noqa: E402
from .priors import ParamLayout, PriorError, describe, layout, resolve_priors  # noqa: E402

__all__ = ["sample", "sample_model", "sample_prior", "PosteriorResults", "SamplingError", "PriorError"]

_CHAIN_METHODS = ("auto", "vectorized", "parallel", "sequential")


class SamplingError(StochmmError, ValueError):
    """The sampler cannot start: bad arguments, or a log density that is not finite at the initial point."""


# -------------------------------------------------------------------------------------------------
# the model's data, as the log density sees it
# -------------------------------------------------------------------------------------------------
@dataclass
class _Data:
    kind: str  # gaussian | logit | probit | cloglog | poisson
    X: Any
    Xc: Any
    xmean: np.ndarray
    icpt: int | None
    y: Any
    wt: Any
    offset: Any
    const: Any  # per-observation normalising constant of the log-likelihood
    refs: list[Any]
    zs: list[Any]
    nlev: list[int]
    ks: list[int]
    trials: np.ndarray | None  # binomial trials per observation (for draws on the response scale)
    cbind: bool
    const_sum: float = 0.0
    n: int = 0
    unit: tuple[bool, ...] = ()  # per term: one column of ones (a plain random intercept: a gather, no product)
    unit_wt: bool = False  # all weights 1 (skip the product)
    no_offset: bool = False  # offset all 0 (skip the sum)


def _family_kind(model: Model) -> tuple[str, Any]:
    if model.family_name == "gaussian":
        return "gaussian", None
    fam = get_family(model.family)
    link = fam.link.name
    if fam.name == "binomial" and link in ("logit", "probit", "cloglog"):
        return link, fam
    if fam.name == "poisson" and link == "log":
        return "poisson", fam
    raise DataError(f"the posterior path supports gaussian, binomial (logit, probit, cloglog) and poisson (log) "
                    f"models; got family {fam.name!r} with link {link!r}")


def _data(model: Model) -> _Data:
    kind, fam = _family_kind(model)
    X = np.asarray(model.X, dtype=float)
    icpt = model.xnames.index("(Intercept)") if "(Intercept)" in model.xnames else None
    xmean = np.zeros(model.p)
    if icpt is not None:
        xmean = X.mean(axis=0)
        xmean[icpt] = 0.0
    Xc = X - xmean
    y = np.asarray(model.y, dtype=float)
    wt = np.asarray(model.weights, dtype=float)
    if kind == "gaussian":
        const = 0.5 * np.log(wt) - 0.5 * np.log(2.0 * np.pi)
    else:
        const = np.asarray(fam.constant(model), dtype=float)
    cbind = str(model.parsed.response).startswith("cbind(")
    trials = None
    if kind in ("logit", "probit", "cloglog"):
        trials = wt / np.asarray(model.prior_weights, dtype=float) if cbind else wt
    return _Data(kind, jnp.asarray(X), jnp.asarray(Xc), xmean, icpt, jnp.asarray(y), jnp.asarray(wt),
                 jnp.asarray(np.asarray(model.offset, dtype=float)), jnp.asarray(const),
                 [jnp.asarray(t.refs.astype(np.int32)) for t in model.terms],
                 [jnp.asarray(np.asarray(t.z, dtype=float)) for t in model.terms],
                 [t.nlev for t in model.terms], [t.k for t in model.terms], trials, cbind,
                 float(np.sum(const)), model.n,
                 tuple(bool(t.k == 1 and np.all(np.asarray(t.z) == 1.0)) for t in model.terms),
                 bool(np.all(wt == 1.0)), bool(not np.any(np.asarray(model.offset, dtype=float))))


def _softplus(x: Any) -> Any:
    """log(1 + eˣ), stably, in the fewest operations (``jax.nn.softplus`` goes through ``logaddexp`` and its
    infinity guards: on VerbAgg that made the whole log-density gradient 35 % slower)."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _loglik_obs(d: _Data, eta: Any, sigma: Any, y: Any = None) -> Any:
    """Pointwise log-likelihood (constants included) at linear predictor ``eta`` (``y``: another response of
    the same model, for simulation studies; the constants stay those of the model's own response)."""
    y, wt = (d.y if y is None else y), d.wt
    if d.kind == "gaussian":
        r = y - eta
        return d.const - jnp.log(sigma) - 0.5 * wt * r * r / (sigma * sigma)
    if d.kind == "poisson":
        return d.const + wt * (y * eta - jnp.exp(eta))
    if d.kind == "logit":
        lp, lq = -_softplus(-eta), -_softplus(eta)
    elif d.kind == "probit":
        lp, lq = jax.scipy.special.log_ndtr(eta), jax.scipy.special.log_ndtr(-eta)
    else:  # cloglog: μ = 1 − exp(−e^η)
        e = jnp.exp(eta)
        lp, lq = jnp.log(-jnp.expm1(-e)), -e
    return d.const + wt * (jnp.where(y > 0, y * lp, 0.0) + jnp.where(y < 1, (1.0 - y) * lq, 0.0))


def _loglik_sum(d: _Data, eta: Any, sigma: Any, y: Any = None) -> Any:
    """Σ of :func:`_loglik_obs` with the constants summed once and the fewest operations (the hot path)."""
    y = d.y if y is None else y
    wt = d.wt
    if d.kind == "logit":
        v = y * eta - _softplus(eta)
        return d.const_sum + jnp.sum(v if d.unit_wt else wt * v)
    if d.kind == "poisson":
        v = y * eta - jnp.exp(eta)
        return d.const_sum + jnp.sum(v if d.unit_wt else wt * v)
    if d.kind == "gaussian":
        r = y - eta
        return d.const_sum - d.n * jnp.log(sigma) - 0.5 * jnp.sum(wt * r * r) / (sigma * sigma)
    return jnp.sum(_loglik_obs(d, eta, sigma, y))


def _ranef_eta(d: _Data, bs: list[Any]) -> Any:
    """Σ_j rowwise(z_j · b_j[refs_j]): Z b without forming Z (b_j: (..., nlev_j, k_j))."""
    out = 0.0
    for j, (refs, z, b) in enumerate(zip(d.refs, d.zs, bs)):
        if d.unit and d.unit[j]:
            out = out + b[..., 0].at[..., refs].get(mode="promise_in_bounds")
        else:
            out = out + jnp.sum(z * b.at[..., refs, :].get(mode="promise_in_bounds"), axis=-1)
    return out


def _linkinv(kind: str, eta: Any) -> Any:
    if kind in ("gaussian",):
        return eta
    if kind == "logit":
        return jax.nn.sigmoid(eta)
    if kind == "probit":
        return jax.scipy.special.ndtr(eta)
    if kind == "cloglog":
        return -jnp.expm1(-jnp.exp(eta))
    return jnp.exp(eta)


# -------------------------------------------------------------------------------------------------
# the log density
# -------------------------------------------------------------------------------------------------
class _Density:
    """Unconstrained parameterisation, priors and likelihood of one model."""

    def __init__(self, model: Model, priors: dict[str, Any], user: set[str], *, centered: list[bool],
                 clones: int, marginal: Any = None, prior_only: bool = False,
                 fixed: dict[str, float] | None = None) -> None:
        from numpyro.distributions.transforms import CorrCholeskyTransform

        self.model, self.lay, self.d = model, layout(model), _data(model)
        self.priors, self.user = priors, user
        self.centered, self.clones, self.marginal, self.prior_only = centered, clones, marginal, prior_only
        self.cct = CorrCholeskyTransform()
        lay = self.lay
        self.beta_priors = [priors[nm] for nm in lay.fixef]
        self.icpt_raw = lay.intercept is not None and lay.fixef[lay.intercept] in user
        self.sd_priors = [priors[nm] for nm in lay.sd]
        self.cor_priors = [priors[nm] for nm in lay.cor_prior_names]
        self.sigma_prior = priors.get("sigma")
        import numpyro.distributions as dist

        self.beta_normal = None
        if self.beta_priors and all(type(pr) is dist.Normal for pr in self.beta_priors):
            self.beta_normal = (np.array([float(pr.loc) for pr in self.beta_priors]),
                                np.array([float(pr.scale) for pr in self.beta_priors]))
        self.fixed = dict(fixed or {})
        self.free_sd = np.array([nm not in self.fixed for nm in lay.sd], dtype=bool)
        self.fixed_log_sd = np.log(np.array([self.fixed.get(nm, 1.0) for nm in lay.sd], dtype=float))
        self.free_sigma = lay.sigma and "sigma" not in self.fixed
        self.sd_slices = []
        off = 0
        for k in self.d.ks:
            self.sd_slices.append(slice(off, off + k))
            off += k
        # sweep: a random-effect column equal to a column of X (the intercept, Days in (Days | g)) has its level
        # mean moved into that fixed effect (β* = β + mean_l b_l, η uses b_l − mean b): the same model with
        # unit Jacobian, and β* is no longer tied to the random effects' common level
        self.sweep: list[tuple[int, list[int], list[int]]] = []
        if clones == 1 and marginal is None and not prior_only:
            X = np.asarray(model.X)
            for j, t in enumerate(model.terms):
                cols, xidx = [], []
                for c, cn in enumerate(t.cnames):
                    if cn in model.xnames and np.array_equal(t.z[:, c], X[:, model.xnames.index(cn)]):
                        cols.append(c)
                        xidx.append(model.xnames.index(cn))
                if cols:
                    self.sweep.append((j, cols, xidx))

    # -- transforms ------------------------------------------------------------------------------
    def log_sd(self, params: dict[str, Any]) -> Any:
        """All log SDs: the sampled ones and those held fixed (``fixed=``)."""
        if self.free_sd.all():
            return params["log_sd"]
        return jnp.asarray(self.fixed_log_sd).at[np.flatnonzero(self.free_sd)].set(params["log_sd"])

    def log_sigma(self, params: dict[str, Any]) -> Any:
        return params["log_sigma"] if self.free_sigma else jnp.log(float(self.fixed["sigma"]))

    def beta_raw(self, beta_c: Any) -> Any:
        d = self.d
        if d.icpt is None:
            return beta_c
        return beta_c.at[d.icpt].add(-jnp.dot(jnp.asarray(d.xmean), beta_c))

    def beta_c(self, beta_raw: np.ndarray) -> np.ndarray:
        d = self.d
        out = np.array(beta_raw, dtype=float)
        if d.icpt is not None:
            out[d.icpt] += float(d.xmean @ beta_raw)
        return out

    def chol_factors(self, params: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """(L_j absolute-scale Cholesky factors, correlation Cholesky factors) of each term."""
        sd = jnp.exp(self.log_sd(params))
        Ls, Lcs = [], []
        ci = 0
        for j, k in enumerate(self.d.ks):
            s = sd[self.sd_slices[j]]
            if k == 1:
                Lc = jnp.ones((1, 1))
            else:
                Lc = self.cct(params[f"cor{ci}"])
                ci += 1
            Lcs.append(Lc)
            Ls.append(s[:, None] * Lc)
        return Ls, Lcs

    def ranef(self, params: dict[str, Any], Ls: list[Any]) -> list[Any]:
        """b_j (clones, nlev_j, k_j) from the sampled coordinates."""
        return [params[f"b{j}"] if c else (params[f"b{j}"] * L[0, 0] if L.shape[0] == 1 else params[f"b{j}"] @ L.T)
                for j, (c, L) in enumerate(zip(self.centered, Ls))]

    def effects(self, params: dict[str, Any]) -> tuple[Any, list[Any], list[Any], list[Any]]:
        """(β on the raw columns, random effects b_j (clones, nlev, k), L_j, correlation factors)."""
        Ls, Lcs = self.chol_factors(params)
        beta = self.beta_raw(params["beta"])
        if self.marginal is not None:
            return beta, [], Ls, Lcs
        bs = self.ranef(params, Ls)
        for j, cols, xidx in self.sweep:
            beta = beta.at[np.asarray(xidx)].add(-jnp.mean(bs[j][0][:, np.asarray(cols)], axis=0))
        return beta, bs, Ls, Lcs

    def sweep_start(self, beta_raw: np.ndarray, b: np.ndarray) -> np.ndarray:
        """β* of the sweep at given β (raw) and b (Z order)."""
        out = np.array(beta_raw, dtype=float)
        for j, cols, xidx in self.sweep:
            t, sl = self.model.terms[j], self.model.z_slices[j]
            out[xidx] += b[sl].reshape(t.nlev, t.k)[:, cols].mean(axis=0)
        return out

    # -- log density -----------------------------------------------------------------------------
    def log_prior(self, params: dict[str, Any], beta_raw: Any = None,
                  want_parts: bool = False) -> tuple[Any, dict[str, Any]]:
        parts: dict[str, Any] = {}
        if beta_raw is None:
            beta_raw = self.effects(params)[0]
        icpt_c = None
        if self.d.icpt is not None:
            icpt_c = beta_raw[self.d.icpt] + jnp.dot(jnp.asarray(self.d.xmean), beta_raw)
        if self.beta_normal is not None and not want_parts:  # all Normal: one vectorised log density
            v = beta_raw if icpt_c is None or self.icpt_raw else beta_raw.at[self.d.icpt].set(icpt_c)
            loc, scale = self.beta_normal
            parts["fixef"] = jnp.sum(-0.5 * ((v - loc) / scale) ** 2) - float(np.sum(np.log(scale))) \
                - 0.5 * len(loc) * np.log(2.0 * np.pi)
        else:
            for i, (nm, pr) in enumerate(zip(self.lay.fixef, self.beta_priors)):
                v = icpt_c if (i == self.d.icpt and not self.icpt_raw) else beta_raw[i]
                parts[nm] = pr.log_prob(v)
        log_sd = params["log_sd"]
        for i, (nm, pr) in enumerate(zip([n for n in self.lay.sd if n not in self.fixed],
                                         [p for n, p in zip(self.lay.sd, self.sd_priors) if n not in self.fixed])):
            parts[nm] = pr.log_prob(jnp.exp(log_sd[i])) + log_sd[i]
        for ci, (nm, pr) in enumerate(zip(self.lay.cor_prior_names, self.cor_priors)):
            raw = params[f"cor{ci}"]
            Lc = self.cct(raw)
            parts[nm] = pr.log_prob(Lc) + self.cct.log_abs_det_jacobian(raw, Lc)
        if self.free_sigma:
            ls = params["log_sigma"]
            parts["sigma"] = self.sigma_prior.log_prob(jnp.exp(ls)) + ls
        return sum(parts.values()), parts

    def log_ranef_prior(self, params: dict[str, Any], Ls: list[Any]) -> Any:
        out = 0.0
        for j, (c, L) in enumerate(zip(self.centered, Ls)):
            x = params[f"b{j}"]
            if c and x.shape[-1] == 1:  # scalar term: u = b / sd (no triangular solve)
                u = x / L[0, 0]
                out = out + jnp.sum(-0.5 * u * u) - x.shape[0] * x.shape[1] * jnp.log(L[0, 0])
            elif c:  # b ~ N(0, L Lᵀ): u = L⁻¹ b, Jacobian −nlev Σ log diag L per clone
                u = jax.scipy.linalg.solve_triangular(L, jnp.swapaxes(x, -1, -2), lower=True)
                out = out + jnp.sum(-0.5 * u * u) - x.shape[0] * x.shape[1] * jnp.sum(jnp.log(jnp.diag(L)))
            else:
                out = out + jnp.sum(-0.5 * x * x)
            out = out - 0.5 * x.size * np.log(2.0 * np.pi)
        return out

    def eta(self, beta_raw: Any, bs: list[Any]) -> Any:
        d = self.d
        fixed = d.X @ beta_raw if d.no_offset else d.X @ beta_raw + d.offset
        return fixed + _ranef_eta(d, bs) if bs else fixed

    def sigma(self, params: dict[str, Any]) -> Any:
        return jnp.exp(self.log_sigma(params)) if self.lay.sigma else None

    def log_density(self, params: dict[str, Any], y: Any = None) -> Any:
        beta, bs, Ls, _ = self.effects(params)
        lp, _ = self.log_prior(params, beta)
        if self.marginal is not None:
            ll = self.marginal.loglik(beta, Ls, self.sigma(params))
            return lp + self.clones * ll
        lp = lp + self.log_ranef_prior(params, Ls)
        return lp + _loglik_sum(self.d, self.eta(beta, bs), self.sigma(params), y)

    # -- reported quantities ---------------------------------------------------------------------
    def constrain(self, params: dict[str, Any]) -> dict[str, Any]:
        """One draw on the user's scale: fixef, sd, cor entries, sigma, b (in Z's column order, clone 0)."""
        beta, bs, Ls, Lcs = self.effects(params)
        out = {"fixef": beta, "sd": jnp.exp(self.log_sd(params))}
        cors = []
        for j in self.lay.cor_terms:
            C = Lcs[j] @ Lcs[j].T
            k = self.d.ks[j]
            cors += [C[a, b] for b in range(k) for a in range(b + 1, k)]
        if cors:
            out["cor"] = jnp.stack(cors)
        if self.lay.sigma:
            out["sigma"] = jnp.exp(self.log_sigma(params))
        if bs:
            out["b"] = jnp.concatenate([b[0].reshape(-1) for b in bs])
        return out


# -------------------------------------------------------------------------------------------------
# start values
# -------------------------------------------------------------------------------------------------
def _ml_fit(model: Model) -> Any:
    from ..api import fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model.family_name == "gaussian":
            return fit(model, "REML")
        return fit(model, "laplace", check_derivatives=False)


def _auto_centered(model: Model, fit: Any, sigma: float | None) -> list[bool]:
    """Centre a term when the data dominate its prior: mean conditional variance < ½ prior variance."""
    out = []
    if fit is None:
        return [False] * len(model.terms)
    try:
        cv = fit._b_condvar() if callable(fit._b_condvar) else fit._b_condvar
    except Exception:  # noqa: BLE001 - conditional variances unavailable: non-centred everywhere
        return [False] * len(model.terms)
    s = 1.0 if sigma is None else sigma
    for T, c in zip(model.lambda_blocks(fit.theta), cv):
        prior_var = np.diag(s * s * (T @ T.T))
        if np.any(prior_var <= 1e-12):
            out.append(False)
            continue
        ratio = float(np.mean(np.diagonal(np.asarray(c), axis1=1, axis2=2) / prior_var))
        out.append(ratio < 0.5)
    return out


def _start(dens: _Density, fit: Any, chains: int, rng: np.random.Generator, *,
           values: tuple[np.ndarray, list[np.ndarray], float, np.ndarray] | None = None) -> dict[str, Any]:
    """Start values per chain: the ML fit (or ``values`` = (β raw, absolute L_j, σ, b)) with a small jitter."""
    model, d, lay = dens.model, dens.d, dens.lay
    K = dens.clones
    if values is not None:
        beta_raw, Ls, s, b = (np.asarray(values[0], dtype=float), [np.asarray(L) for L in values[1]],
                              float(values[2]), np.asarray(values[3], dtype=float))
        se = np.full(model.p, 0.1)
    elif fit is not None:
        beta_raw = np.asarray(fit.fixef, dtype=float)
        s = float(fit.sigma) if lay.sigma else 1.0
        Ls = [s * T for T in model.lambda_blocks(fit.theta)]
        b = np.asarray(fit.b, dtype=float)
        se = np.sqrt(np.maximum(np.diag(np.asarray(fit.vcov, dtype=float)), 1e-12))
    else:
        beta_raw = np.zeros(model.p)
        s = 1.0
        Ls = [np.eye(k) for k in d.ks]
        b = np.zeros(model.q)
        se = np.ones(model.p)
    sds, cors = [], []
    Lfix = []
    for j, L in enumerate(Ls):
        sd = np.sqrt(np.sum(L * L, axis=1))
        floor = 0.1 * max(np.std(np.asarray(d.y)) if lay.sigma else 1.0, 1e-3)
        sd_c = np.maximum(sd, floor)
        if d.ks[j] > 1:
            Lc = L / np.where(sd > 0, sd, 1.0)[:, None]
            C = Lc @ Lc.T
            C = 0.9 * C + 0.1 * np.eye(d.ks[j])  # off the boundary of the correlation space
            dc = np.sqrt(np.diag(C))
            Lc = np.linalg.cholesky(C / np.outer(dc, dc))
            cors.append(np.asarray(dens.cct.inv(jnp.asarray(Lc))))
        else:
            Lc = np.ones((1, 1))
        sds.append(sd_c)
        Lfix.append(sd_c[:, None] * Lc)
    log_sd = np.log(np.concatenate(sds)) if sds else np.zeros(0)
    if dens.fixed:  # held parameters: their values, in the start too
        log_sd = np.where(dens.free_sd, log_sd, dens.fixed_log_sd)
        if "sigma" in dens.fixed:
            s = float(dens.fixed["sigma"])
        Lfix = [np.exp(log_sd[sl])[:, None] * (L / np.sqrt(np.sum(L * L, axis=1))[:, None])
                for sl, L in zip(dens.sd_slices, Lfix)]
    base: dict[str, np.ndarray] = {"beta": dens.beta_c(dens.sweep_start(beta_raw, b)), "log_sd": log_sd[dens.free_sd]}
    for ci, c in enumerate(cors):
        base[f"cor{ci}"] = c
    if dens.free_sigma:
        base["log_sigma"] = np.asarray(np.log(max(s, 1e-3 * float(np.std(np.asarray(d.y))) + 1e-12)))
    if dens.marginal is None:
        for j, (t, sl, L) in enumerate(zip(model.terms, model.z_slices, Lfix)):
            bj = b[sl].reshape(t.nlev, t.k)
            x = bj if dens.centered[j] else np.linalg.solve(L, bj.T).T
            base[f"b{j}"] = np.broadcast_to(x, (K, t.nlev, t.k)).copy()
    out = {}
    for key, v in base.items():
        v = np.asarray(v, dtype=float)
        if key == "beta":
            jit = rng.standard_normal((chains, *v.shape)) * 0.25 * dens.beta_c_se(se)
        elif key.startswith("b"):
            scale = 0.1 if not dens.centered[int(key[1:])] else 0.1 * np.sqrt(np.sum(Lfix[int(key[1:])] ** 2, 1))
            jit = rng.standard_normal((chains, *v.shape)) * scale
        else:
            jit = rng.standard_normal((chains, *v.shape)) * 0.1
        out[key] = jnp.asarray(v[None] + jit)
    return out


def _beta_c_se(self: _Density, se_raw: np.ndarray) -> np.ndarray:
    """SE-sized jitter scales in centred coordinates (the intercept's own SE is not the centred one's)."""
    out = np.array(se_raw, dtype=float)
    if self.d.icpt is not None:
        out[self.d.icpt] = float(np.min(se_raw))
    return out


_Density.beta_c_se = _beta_c_se  # type: ignore[attr-defined]


def _check_finite(dens: _Density, init: dict[str, Any]) -> None:
    """A specific error when the log density is not finite at the start: which prior, or the likelihood."""
    one = {k: v[0] for k, v in init.items()}
    total = np.asarray(jax.jit(jax.vmap(dens.log_density))(init))
    if np.all(np.isfinite(total)):
        return
    one = {k: v[int(np.flatnonzero(~np.isfinite(total))[0])] for k, v in init.items()}
    _, parts = dens.log_prior(one, want_parts=True)
    cons = dens.constrain(one)
    vals = dict(zip(dens.lay.fixef, np.asarray(cons["fixef"]).tolist()))
    vals.update(zip(dens.lay.sd, np.asarray(cons["sd"]).tolist()))
    if "sigma" in cons:
        vals["sigma"] = float(cons["sigma"])
    for nm, v in parts.items():
        if not np.isfinite(float(v)):
            at = f" at {vals[nm]:.4g}" if nm in vals else ""
            raise SamplingError(f"the log density is not finite at the initial point: the prior of {nm!r} is "
                                f"{float(v)}{at} (the ML estimate, outside the prior's support?)")
    if dens.marginal is None:
        beta, bs, _, _ = dens.effects(one)
        ll = np.asarray(_loglik_obs(dens.d, dens.eta(beta, bs), dens.sigma(one)))
        bad = np.flatnonzero(~np.isfinite(ll))
        if bad.size:
            raise SamplingError(f"the log density is not finite at the initial point: the log-likelihood of "
                                f"{bad.size} observations (rows {bad[:5].tolist()}) is {ll[bad[0]]}")
    raise SamplingError("the log density is not finite at the initial point (marginal likelihood of the "
                        f"random-effects terms {', '.join(t.text or t.group for t in dens.model.terms)})")


# -------------------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------------------
def _posint(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise SamplingError(f"{name} must be an integer ≥ {minimum}, got {v!r}")
    return int(v)


def _chain_method(method: str, chains: int) -> str:
    if method not in _CHAIN_METHODS:
        raise SamplingError(f"chain_method must be one of {', '.join(_CHAIN_METHODS)}; got {method!r}")
    if method == "auto":
        return "parallel" if (chains > 1 and jax.local_device_count() >= chains) else "vectorized"
    if method == "parallel" and jax.local_device_count() < chains:
        raise SamplingError(f"chain_method='parallel' needs {chains} JAX devices, this process has "
                            f"{jax.local_device_count()}: call numpyro.set_host_device_count({chains}) (or set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={chains}) before JAX is imported")
    return method


# -------------------------------------------------------------------------------------------------
# entry points
# -------------------------------------------------------------------------------------------------
def sample(formula: str, data: pd.DataFrame, family: Any = "gaussian", *, link: str | None = None,
           weights: Any = None, offset: Any = None, **options: Any) -> PosteriorResults:
    """sample(formula, data, family="gaussian", *, priors=None, draws=1000, warmup=1000, chains=4, seed=0, progress=True, **nuts_options) -> PosteriorResults

    Posterior of a (generalized) linear mixed model by NUTS, from the same :class:`~stochmm.builder.model.Model`
    the ML fits use. See :func:`sample_model` for every option.

    Parameters
    ----------
    formula : str
        lme4 formula (``cbind(s, f)`` responses, ``offset()``, ``(x | g)``, ``(x || g)``, nested and crossed).
    data : pandas.DataFrame
        Not modified.
    family : str or Family
        ``"gaussian"`` (LMM, σ sampled), ``"binomial"`` or ``"poisson"``, or a family object.
    link : str, optional
        ``"probit"``/``"cloglog"`` for binomial models.
    weights, offset : str or array-like, optional
        Prior weights (binomial proportions: trials) and an offset, as for ``glmer``.
    **options
        ``priors``, ``draws``, ``warmup``, ``chains``, ``seed``, ``progress``, ``clones``, ``marginalize``,
        ``chain_method``, ``posterior_predictive``, ``log_likelihood``, ``prior``, ``centered`` and NUTS
        options (``target_accept_prob``, ``max_tree_depth``, ``dense_mass``): see :func:`sample_model`.

    Returns
    -------
    PosteriorResults

    Examples
    --------
    >>> import stochmm as sm
    >>> post = sm.sample("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"),
    ...                  draws=200, warmup=200, chains=2, progress=False)  # doctest: +SKIP
    >>> post.summary()  # doctest: +SKIP
    """
    fam = None
    if not (family is None or (isinstance(family, str) and family.lower() in ("gaussian", "normal"))):
        fam = get_family(family, link)
    elif link not in (None, "identity"):
        raise DataError(f"a Gaussian model has the identity link, not {link!r}")
    model = Model(formula, data, family=fam, weights=weights, offset=offset)
    return sample_model(model, **options)


def sample_model(model: Model, *, priors: dict[str, Any] | None = None, draws: int = 1000, warmup: int = 1000,
                 chains: int = 4, seed: int = 0, progress: bool = True, clones: int = 1,
                 marginalize: bool | str = "auto", chain_method: str = "auto",
                 posterior_predictive: bool = False, log_likelihood: bool | None = None, prior: bool = False,
                 centered: bool | list[bool] | None = None, fixed: dict[str, float] | None = None,
                 thinning: int = 1, warn: bool = True,
                 **nuts_options: Any) -> PosteriorResults:
    """sample_model(model, *, priors=None, draws=1000, warmup=1000, chains=4, seed=0, progress=True, clones=1, marginalize="auto", ...) -> PosteriorResults

    ``Model.sample``: the posterior of ``model`` by NumPyro's NUTS.

    Parameters
    ----------
    model : Model
    priors : dict, optional
        Name → NumPyro distribution, overriding the defaults (:mod:`stochmm.stochastic.priors`): fixed-effect
        names as ``fit.fixef`` (raw columns), ``"sd(group)"``, ``"sd(group:term)"``, ``"cor(group)"`` (LKJ),
        ``"sigma"``. Unknown names and priors with the wrong support are errors.
    draws, warmup, chains : int
        Per chain. ``warmup`` may be 0.
    seed : int
        Everything (jitter of the start values, the chains) follows from it.
    progress : bool
        A tqdm progress bar over all chains' iterations (shown only when stderr is a terminal).
    clones : int
        Data cloning: K copies of the data (each with its own random effects); the posterior mean tends to
        the MLE and K × the posterior variance to its asymptotic variance (:meth:`PosteriorResults.dclone`).
    marginalize : "auto", True, False, "exact", "agq", "laplace"
        Integrate the random effects out of the log density (:mod:`stochmm.stochastic.marginal`) and sample
        (β, SDs, correlations[, σ]) only, then draw b given each draw. ``"auto"`` does so where it is exact
        and faster: LMMs whose random effects outside the first grouping factor number ≤ ``AUTO_MAX_QREST``
        (the dense block's Cholesky is the cost; sleepstudy: 529 ESS/s against 215 for full NUTS), and data
        cloning of GLMMs with one grouping factor (exact to quadrature error; the full model would grow
        K-fold). A GLMM with ``clones=1`` gets full NUTS: on cbpp it gave 1,079 ESS/s against 465 for marginal
        NUTS (fresh processes, compilation included, benchmarks/bench_posterior.py, 2026-12-02). ``True`` insists (an
        error where it cannot apply), ``"laplace"`` approximates crossed GLMMs (labelled as an approximation).
        Which sampler ran is ``results.sampler``.
    chain_method : {"auto", "vectorized", "parallel", "sequential"}
        ``"parallel"`` runs one chain per JAX device. ``import stochmm`` asks XLA for max(CPU count, 4) host
        devices when JAX is not yet imported (:mod:`stochmm.stochastic`; ``STOCHMM_HOST_DEVICES`` overrides),
        so ``"auto"`` runs the default four chains in parallel; where the devices are missing (JAX imported
        before stochmm) it vectorises the chains instead (in lock step: each tree is as deep as the deepest
        chain's, and XLA compiled NumPyro's vectorised cbpp sampler in 4.5 s against 3.4 s for parallel
        chains, 2026-12-02); ``"sequential"`` runs them one after another.
    posterior_predictive : bool
        Add the ``posterior_predictive`` group (one replicated response per draw); or call
        :meth:`PosteriorResults.posterior_predictive` later (the same draws).
    log_likelihood : bool, optional
        Add the pointwise ``log_likelihood`` group (for ``az.loo``/``az.waic``); default: when it holds at
        most 2.5e7 numbers.
    prior : bool
        Sample the prior instead (see :func:`sample_prior`).
    centered : bool or list of bool, optional
        Override the per-term centred/non-centred choice.
    fixed : dict, optional
        Hold SDs and σ at given values (``{"sd(Batch)": 40.0, "sigma": 50.0}``): the conditional posterior
        of the rest given them (for a Gaussian model with Normal priors on β it is Gaussian, in closed form).
    thinning : int
    warn : bool
        Warn (:class:`~stochmm.stochastic.diagnostics.SamplerWarning`) on failed diagnostics.
    **nuts_options
        NumPyro's NUTS options (``target_accept_prob``, ``max_tree_depth``, ``dense_mass``, ``step_size``,
        ``adapt_step_size``, ``adapt_mass_matrix``, ``find_heuristic_step_size``, ``regularize_mass_matrix``).
        ``dense_mass`` defaults to a dense mass matrix when at most :data:`DENSE_MAX` (100) dimensions are
        sampled (marginal NUTS, small full models), diagonal otherwise.

    Returns
    -------
    PosteriorResults
    """
    if not isinstance(model, Model):
        raise SamplingError(f"model must be a stochmm Model, got {type(model).__name__}")
    draws = _posint("draws", draws)
    warmup = _posint("warmup", warmup, 0)
    chains = _posint("chains", chains)
    clones = _posint("clones", clones)
    thinning = _posint("thinning", thinning)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise SamplingError(f"seed must be an integer, got {seed!r}")
    for nm, v in (("progress", progress), ("posterior_predictive", posterior_predictive), ("prior", prior),
                  ("warn", warn)):
        if not isinstance(v, bool):
            raise SamplingError(f"{nm} must be True or False, got {v!r}")
    if log_likelihood is not None and not isinstance(log_likelihood, bool):
        raise SamplingError(f"log_likelihood must be True, False or None, got {log_likelihood!r}")
    bad = set(nuts_options) - {"target_accept_prob", "max_tree_depth", "dense_mass", "step_size",
                               "adapt_step_size", "adapt_mass_matrix", "find_heuristic_step_size",
                               "regularize_mass_matrix"}
    if bad:
        raise SamplingError(f"unknown option(s) {', '.join(sorted(bad))}; NUTS options: target_accept_prob, "
                            "max_tree_depth, dense_mass, step_size, adapt_step_size, adapt_mass_matrix")
    _family_kind(model)
    pri, user = resolve_priors(model, priors)
    if prior:
        return sample_prior(model, priors=priors, draws=draws * chains, seed=seed)
    cm = _chain_method(chain_method, chains)
    marg, label = _marginal(model, marginalize, clones)

    t0 = time.perf_counter()
    fit = _ml_fit(model)
    sig = float(fit.sigma) if (fit is not None and model.family_name == "gaussian") else None
    if centered is None:
        cen = _auto_centered(model, fit, sig)
    elif isinstance(centered, bool):
        cen = [centered] * len(model.terms)
    else:
        cen = [bool(c) for c in centered]
        if len(cen) != len(model.terms):
            raise SamplingError(f"centered needs one value per random-effects term ({len(model.terms)}), "
                                f"got {len(cen)}")
    if marg is not None and fit is not None and getattr(fit, "_b", None) is not None:
        marg.set_start(fit._b, marg.L_list(fit.theta))
    dens = _Density(model, pri, user, centered=cen, clones=clones, marginal=marg, fixed=_check_fixed(model, fixed))
    rng = np.random.default_rng(seed)
    init = _start(dens, fit, chains, rng)
    _check_finite(dens, init)
    t_init = time.perf_counter() - t0

    show = progress and sys.stderr.isatty()
    t1 = time.perf_counter()
    samples, extra, out = _chains(dens, init, seed=seed, warmup=warmup, draws=draws, chain_method=cm, progress=show,
                                  thinning=thinning, nuts_options=nuts_options)
    t_sample = time.perf_counter() - t1
    res = PosteriorResults._from_mcmc(dens, samples, extra, seed=int(seed), sampler=label,
                                      posterior_predictive=posterior_predictive, log_likelihood=log_likelihood,
                                      max_tree_depth=int(nuts_options.get("max_tree_depth", 10)))
    res.step_size, res.inverse_mass_matrix = out.step_size, out.inverse_mass_matrix
    res.timing = {"init_s": t_init, "compile_s": out.compile_s, "run_s": out.run_s, "sampling_s": t_sample,
                  "total_s": time.perf_counter() - t0}
    res.ml_fit = fit
    res._check(warn)
    return res


#: ``dense_mass`` default: a dense mass matrix when at most this many dimensions are sampled (its
#: matrix-vector product, d² flops per leapfrog step, is then cheap beside the gradient). Measured on cbpp
#: (full NUTS, 20 dimensions, 6 seeds, 2026-12-02): min bulk ESS 1518 → 2508 on average, leapfrog steps
#: per iteration unchanged (8)
DENSE_MAX = 100


class _Flat:
    """The sampled parameters as one vector (what NUTS moves), and back: NumPyro's NUTS over a dict of
    arrays ravels and unravels it in every leapfrog step, which costs compile time (0.5 s on cbpp)."""

    def __init__(self, init: dict[str, Any]) -> None:
        self.keys = sorted(init)
        self.shapes = [tuple(np.shape(init[k])[1:]) for k in self.keys]
        self.sizes = [int(np.prod(sh)) for sh in self.shapes]
        self.dim = int(sum(self.sizes))

    def ravel(self, tree: dict[str, Any]) -> np.ndarray:
        """(chains, ...) leaves → (chains, dim)."""
        C = np.shape(tree[self.keys[0]])[0]
        return np.concatenate([np.asarray(tree[k], dtype=float).reshape(C, -1) for k in self.keys], axis=1)

    def unravel(self, x: Any) -> dict[str, Any]:
        """(..., dim) → dict of (..., *shape); JAX or NumPy in, the same out."""
        out, at = {}, 0
        lead = x.shape[:-1]
        for k, sh, sz in zip(self.keys, self.shapes, self.sizes):
            out[k] = x[..., at : at + sz].reshape(*lead, *sh)
            at += sz
        return out


def _chains(dens: _Density, init: dict[str, Any], *, seed: int, warmup: int, draws: int, chain_method: str,
            progress: bool, thinning: int, nuts_options: dict[str, Any], y: Any = None):
    """NUTS (:func:`stochmm.stochastic.nuts.run_chains`) over the unconstrained parameters as one vector
    (:class:`_Flat`), the response an argument of the potential. ``dense_mass`` defaults to dense up to
    :data:`DENSE_MAX` dimensions; small models compile with XLA options that favour compile time
    (:func:`nuts.compiler_options`).
    Returns (draws as a dict of (chain, draw, ...) arrays, sampler fields, :class:`nuts.ChainsOutput`)."""
    from . import nuts

    flat = _Flat(init)

    def potential_gen(yy):
        return lambda x: -dens.log_density(flat.unravel(x), yy)

    opts = dict(nuts_options)
    opts.setdefault("dense_mass", flat.dim <= DENSE_MAX)
    model = dens.model
    width = model.p + sum(t.k for t in model.terms)
    if dens.marginal is not None:
        width *= int(getattr(dens.marginal, "nagq", 1)) ** max(1, getattr(dens.marginal.lay, "k0", 1))
    copts = nuts.compiler_options(model.n * dens.clones, width, marginal=dens.marginal is not None)
    out = nuts.run_chains(potential_gen, flat.ravel(init), dens.d.y if y is None else y, seed=seed, warmup=warmup,
                          draws=draws, thinning=thinning, chain_method=chain_method, nuts_options=opts,
                          progress=progress, compiler_options=copts)
    return flat.unravel(out.z), out.fields, out


def _check_fixed(model: Model, fixed: Any) -> dict[str, float]:
    if fixed is None:
        return {}
    lay = layout(model)
    ok = lay.sd + (["sigma"] if lay.sigma else [])
    if not isinstance(fixed, dict):
        raise SamplingError(f"fixed must be a dict name -> value over {', '.join(ok)}; got {type(fixed).__name__}")
    out = {}
    for nm, v in fixed.items():
        if nm not in ok:
            raise SamplingError(f"fixed: {nm!r} cannot be held fixed; SDs and sigma can: {', '.join(ok)}")
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise SamplingError(f"fixed: the value of {nm!r} must be a number, got {v!r}") from None
        if not np.isfinite(v) or v <= 0:
            raise SamplingError(f"fixed: {nm!r} must be positive and finite, got {v}")
        out[nm] = v
    return out


#: largest dense block (random effects outside the first grouping factor) for which ``marginalize="auto"``
#: picks the exact LMM marginal: its Cholesky costs q_rest³/3 flops per gradient
AUTO_MAX_QREST = 300


def _marginal(model: Model, marginalize: Any, clones: int) -> tuple[Any, str]:
    """The marginal likelihood to sample with (or None) and the label saying which sampler ran."""
    full = "full NUTS (random effects sampled)"
    if marginalize not in ("auto", True, False, "exact", "agq", "laplace"):
        raise SamplingError(f"marginalize must be 'auto', True, False, 'exact', 'agq' or 'laplace'; got {marginalize!r}")
    if marginalize is False:
        return None, full
    from ..errors import DesignError
    from . import marginal as mg

    ok, why = mg.applies(model)
    if marginalize == "auto":
        if not ok:
            return None, full
        if model.family_name != "gaussian" and clones == 1:
            # measured (benchmarks/bench_posterior.py, cbpp, fresh processes, 2026-12-02): full NUTS
            # 1,079 ESS/s against 465 for the quadrature inside marginal NUTS, which costs nagq^k likelihood
            # evaluations and a Newton solve per gradient; with clones the full model grows K-fold instead
            return None, full
        lay = mg.bc.Layout(model)
        if model.family_name == "gaussian" and lay.q_rest > AUTO_MAX_QREST:
            return None, full + f" (marginal skipped: dense block of {lay.q_rest} random effects)"
        ml = mg.build(model, "auto")
    elif marginalize is True:
        if not ok:
            raise SamplingError(f"marginalize=True cannot apply to {model.formula!r}: {why}")
        ml = mg.build(model, "auto")
    else:
        try:
            ml = mg.build(model, marginalize)
        except DesignError as err:
            raise SamplingError(f"marginalize={marginalize!r} cannot apply to {model.formula!r}: {err}") from None
    if ml.kind == "laplace" and model.family_name != "gaussian":
        return ml, ("marginal NUTS, random effects integrated out by the Laplace approximation "
                    "(APPROXIMATE: the posterior of an approximate likelihood)")
    how = "exactly (Gaussian)" if ml.kind == "exact" else f"by adaptive Gauss-Hermite quadrature, {ml.kind}"
    return ml, f"marginal NUTS (random effects integrated out {how}, then drawn given each draw)"


def sample_prior(model_or_formula: Model | str, data: pd.DataFrame | None = None, family: Any = "gaussian", *,
                 priors: dict[str, Any] | None = None, draws: int = 1000, seed: int = 0, link: str | None = None,
                 weights: Any = None, offset: Any = None) -> PosteriorResults:
    """sample_prior(model_or_formula, data=None, family="gaussian", *, priors=None, draws=1000, seed=0) -> PosteriorResults

    Draws from the prior (exact, independent: no MCMC) and the prior predictive distribution of the
    response, for prior predictive checks. The results hold the groups ``prior``, ``prior_predictive`` and
    ``observed_data``; ``fixef``, ``varcorr``, ``summary()`` describe the prior.

    Examples
    --------
    >>> import stochmm as sm
    >>> pr = sm.sample_prior("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), draws=4000, seed=1)
    >>> pr.draws("sigma").shape
    (1, 4000)
    >>> bool(abs(pr.draws("sigma").mean() - 1 / float(pr.priors["sigma"].rate)) < 5)
    True
    """
    if isinstance(model_or_formula, Model):
        model = model_or_formula
    else:
        if not isinstance(data, pd.DataFrame):
            raise SamplingError("sample_prior(formula, data, ...) needs a DataFrame as data")
        fam = None if (family is None or (isinstance(family, str) and family.lower() == "gaussian")) \
            else get_family(family, link)
        model = Model(model_or_formula, data, family=fam, weights=weights, offset=offset)
    draws = _posint("draws", draws)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise SamplingError(f"seed must be an integer, got {seed!r}")
    pri, user = resolve_priors(model, priors)
    dens = _Density(model, pri, user, centered=[False] * len(model.terms), clones=1, prior_only=True)
    key = jax.random.PRNGKey(int(seed))
    keys = jax.random.split(key, 8)
    lay = dens.lay
    beta = jnp.stack([p.sample(k, (draws,)) for p, k in zip(dens.beta_priors, jax.random.split(keys[0], model.p))],
                     axis=-1) if model.p else jnp.zeros((draws, 0))
    # the default intercept prior is on the centred intercept (draws are β_c there); a user's is on the raw one
    beta_c = beta
    if lay.intercept is not None and dens.icpt_raw:
        beta_c = beta.at[:, lay.intercept].add(beta @ jnp.asarray(dens.d.xmean))
    sd = jnp.stack([p.sample(k, (draws,)) for p, k in zip(dens.sd_priors, jax.random.split(keys[1], len(lay.sd)))],
                   axis=-1)
    params = {"beta": beta_c, "log_sd": jnp.log(sd)}
    for ci, (p, k) in enumerate(zip(dens.cor_priors, jax.random.split(keys[2], max(len(lay.cor_terms), 1)))):
        params[f"cor{ci}"] = jax.vmap(dens.cct.inv)(p.sample(k, (draws,)))
    if lay.sigma:
        params["log_sigma"] = jnp.log(dens.sigma_prior.sample(keys[3], (draws,)))
    for j, (t, kk) in enumerate(zip(model.terms, jax.random.split(keys[4], len(model.terms)))):
        params[f"b{j}"] = jax.random.normal(kk, (draws, 1, t.nlev, t.k))
    params = {k: v[None] for k, v in params.items()}  # one "chain"
    res = PosteriorResults._from_mcmc(dens, params, None, seed=int(seed), sampler="prior (independent draws)",
                                      posterior_predictive=True, log_likelihood=False, group="prior")
    return res


# -------------------------------------------------------------------------------------------------
# results
# -------------------------------------------------------------------------------------------------
def _flat_map(fn, tree: dict[str, Any], chunk: int = 1024, noise: Any = None) -> dict[str, np.ndarray]:
    """Apply a one-draw function to every (chain, draw), in equal chunks (bounded memory, one compilation:
    the last chunk is padded; the draws are sliced as NumPy arrays, not by dispatching JAX slices).
    ``noise(start, size)`` adds per-draw random numbers (:func:`_noise_maker`) to each chunk."""
    leaves = jax.tree_util.tree_leaves(tree)
    C, N = leaves[0].shape[:2]
    total = C * N
    flat = {k: np.asarray(a).reshape(total, *np.shape(a)[2:]) for k, a in tree.items()}
    if noise is not None:
        chunk = max(_NOISE_BLOCK, chunk // _NOISE_BLOCK * _NOISE_BLOCK)
    nchunk = -(-total // chunk)
    size = -(-total // nchunk)
    if noise is not None:
        size = -(-size // _NOISE_BLOCK) * _NOISE_BLOCK
    pad = nchunk * size - total
    if pad:
        flat = {k: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for k, a in flat.items()}
    f = jax.jit(jax.vmap(fn))
    outs = []
    for s in range(0, nchunk * size, size):
        args = {k: a[s : s + size] for k, a in flat.items()}
        if noise is not None:
            args.update(noise(s, size))
        outs.append(jax.tree_util.tree_map(np.asarray, f(args)))
    keys = outs[0].keys()
    return {k: np.concatenate([o[k] for o in outs])[:total].reshape(C, N, *outs[0][k].shape[1:]) for k in keys}


_NOISE_BLOCK = 64


def _noise_maker(spec: dict[str, tuple[tuple[int, ...], str]], seed: int) -> Any:
    """(start, size) -> per-draw random numbers of ``spec`` (name → (shape, "normal" | "uniform" | "key"))
    for the flat draws start … start + size − 1. NumPy makes them, by blocks of :data:`_NOISE_BLOCK` draws
    each seeded from (seed, name, block): the same numbers whatever the chunking and whatever else is drawn
    (the posterior predictive method repeats the flag's draws); a PRNG inside the vectorised function would
    cost XLA seconds to compile."""
    names = sorted(spec)

    def make(start: int, size: int) -> dict[str, np.ndarray]:
        out = {nm: [] for nm in names}
        for b0 in range(start, start + size, _NOISE_BLOCK):
            for nm in names:
                rng = np.random.default_rng([int(seed), zlib.crc32(nm.encode()), b0 // _NOISE_BLOCK])
                shape, kind = spec[nm]
                if kind == "normal":
                    out[nm].append(rng.standard_normal((_NOISE_BLOCK, *shape)))
                elif kind == "uniform":
                    out[nm].append(rng.random((_NOISE_BLOCK, *shape)))
                else:  # a raw PRNG key: any 64 bits
                    out[nm].append(rng.integers(0, 2**32, (_NOISE_BLOCK, *shape), dtype=np.uint32))
        return {nm: np.concatenate(v)[:size] for nm, v in out.items()}

    return make


def _noise_spec(dens: _Density, want_pp: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """The per-draw random numbers :func:`_postprocess` takes: b | θ under marginal NUTS, replicates."""
    spec = {}
    if dens.marginal is not None and dens.model.terms:
        spec.update({f"_nb_{k}": v for k, v in dens.marginal.noise_spec().items()})
    if want_pp:
        spec["_ky"] = ((2,), "key")
    return spec


def _map_draws(dens: _Density, samples: dict[str, Any], seed: int, want_ll: bool, want_pp: bool) -> dict[str, np.ndarray]:
    """:func:`_postprocess` over every draw, with its random numbers, in chunks of at most ~2e7 numbers."""
    spec = _noise_spec(dens, want_pp)
    per_draw = dens.model.n * (int(want_ll) + int(want_pp)) + dens.model.q \
        + sum(int(np.prod(sh)) for sh, _ in spec.values())  # numbers each draw takes and produces
    return _flat_map(_postprocess(dens, want_ll, want_pp), dict(samples), chunk=max(8, min(1024, int(2e7 // per_draw))),
                     noise=_noise_maker(spec, seed) if spec else None)


def _postprocess(dens: _Density, want_ll: bool, want_pp: bool):
    """One draw → what is reported: fixef, sd, cor, sigma, b (drawn given the parameters under marginal NUTS),
    and on request the pointwise log-likelihood and a replicated response. One function, one compilation."""
    d, model = dens.d, dens.model
    bsl = [(sl, t.nlev, t.k) for sl, t in zip(model.z_slices, model.terms)]
    trials = None if d.trials is None else jnp.asarray(np.round(d.trials))

    def one(p):
        k_y = p.get("_ky")
        out = dens.constrain(p)
        sigma = out.get("sigma", 1.0)
        if dens.marginal is not None and model.terms:
            beta, _, Ls, _ = dens.effects(p)
            nz = {k[4:]: v for k, v in p.items() if k.startswith("_nb_")}
            out["b"] = dens.marginal.draw_from_noise(nz, beta, Ls, dens.sigma(p))
        if not (want_ll or want_pp):
            return out
        bs = [out["b"][sl].reshape(nl, k) for sl, nl, k in bsl]
        eta = d.X @ out["fixef"] + d.offset + _ranef_eta(d, bs)
        if want_ll:
            out["ll"] = _loglik_obs(d, eta, sigma)
        if want_pp:
            if d.kind == "gaussian":
                out["yrep"] = eta + sigma / jnp.sqrt(d.wt) * jax.random.normal(k_y, eta.shape)
            elif d.kind == "poisson":
                out["yrep"] = jax.random.poisson(k_y, _linkinv(d.kind, eta)).astype(float)
            else:
                counts = jax.random.binomial(k_y, trials, jnp.clip(_linkinv(d.kind, eta), 0.0, 1.0))
                out["yrep"] = counts if d.cbind else counts / trials
        return out

    return one


class PosteriorResults:
    """Posterior of a mixed model: the ML results vocabulary, with draws behind every number.

    Attributes
    ----------
    model : Model
    idata : arviz.InferenceData (ArviZ 0.23) or xarray.DataTree (ArviZ ≥ 1.0)
        Groups ``posterior`` (``fixef`` over ``coef``, ``sd`` over ``component``, ``cor`` over ``pair``,
        ``sigma``, ``ranef_<group>`` over the group's levels and terms), ``sample_stats``,
        ``log_likelihood`` (pointwise, variable ``y``), ``observed_data`` and, on request,
        ``posterior_predictive``.
    fixef : pandas.Series
        Posterior means of the fixed effects (names as ``fit.fixef``).
    varcorr : pandas.DataFrame
        Posterior means of variances, SDs and correlations, laid out as the ML ``varcorr``.
    sigma : float
        Posterior mean of σ (1 for families without dispersion).
    ranef : dict of str -> DataFrame
        Posterior means of the random effects by grouping factor.
    sampler : str
        Which sampler ran: full NUTS, or marginal NUTS (exact / adaptive Gauss–Hermite / Laplace approximation).
    priors : dict
        The priors used (:meth:`prior_summary`).
    clones : int
    timing : dict
        Seconds: ``init_s`` (ML start, checks), ``compile_s`` (tracing and compiling the sampler, or loading
        it from the compilation cache), ``run_s`` (NUTS itself), ``sampling_s`` (both), ``total_s``.
    step_size : ndarray (chains,)
        NUTS step sizes after adaptation.
    inverse_mass_matrix : ndarray (chains, dim) or (chains, dim, dim)
        The adapted inverse mass matrices, over the unconstrained parameters stacked in one vector (the
        keys of the unconstrained draws in sorted order: ``b<j>``, ``beta``, ``cor<j>``, ``log_sd``, ``log_sigma``).
    """

    family_label = "Linear"

    def __init__(self) -> None:  # built by _from_mcmc
        self.warnings: list[str] = []
        self.step_size = self.inverse_mass_matrix = None
        self.ml_fit = None
        self.timing: dict[str, float] = {}

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def _from_mcmc(cls, dens: _Density, samples: dict[str, Any], extra: dict[str, Any] | None, *, seed: int,
                   sampler: str, posterior_predictive: bool, log_likelihood: bool | None, group: str = "posterior",
                   max_tree_depth: int = 10) -> PosteriorResults:
        self = cls()
        model, lay, d = dens.model, dens.lay, dens.d
        self.model, self.layout, self._dens = model, lay, dens
        self.priors, self._user = dens.priors, dens.user
        self.sampler, self.clones, self.seed, self.group = sampler, dens.clones, seed, group
        C, N = jax.tree_util.tree_leaves(samples)[0].shape[:2]
        want_ll = log_likelihood if log_likelihood is not None else (model.n * C * N <= 2.5e7 and dens.clones == 1)
        want_ll = bool(want_ll and group == "posterior" and model.terms)
        want_pp = bool(posterior_predictive and model.terms)
        self._samples = samples  # unconstrained draws
        cons = _map_draws(dens, samples, seed, want_ll, want_pp)
        self._draws = {k: v for k, v in cons.items() if k not in ("ll", "yrep")}
        self.nchains, self.ndraws = C, N
        self.family_label = "Linear" if d.kind == "gaussian" else "Generalized linear"

        post: dict[str, np.ndarray] = {"fixef": cons["fixef"], "sd": cons["sd"]}
        dims: dict[str, list[str]] = {"fixef": ["coef"], "sd": ["component"]}
        coords: dict[str, Any] = {"coef": lay.fixef, "component": lay.sd, "obs": np.arange(model.n)}
        if "cor" in cons:
            post["cor"], dims["cor"], coords["pair"] = cons["cor"], ["pair"], lay.cor
        if "sigma" in cons:
            post["sigma"] = cons["sigma"]
        if "b" in cons:
            for g, (frames_idx, cols) in self._ranef_layout().items():
                arr = np.concatenate([cons["b"][..., model.z_slices[i]].reshape(C, N, model.terms[i].nlev,
                                                                                model.terms[i].k)
                                      for i in frames_idx], axis=-1)
                post[f"ranef_{g}"] = arr
                dims[f"ranef_{g}"] = [g, f"{g}_term"]
                coords[g] = list(model.terms[frames_idx[0]].levels)
                coords[f"{g}_term"] = cols
        groups: dict[str, dict[str, np.ndarray]] = {group: post}
        self._y_obs = self._observed()
        groups["observed_data"] = {"y": self._y_obs}
        dims["y"] = ["obs"]
        if extra is not None:
            steps = np.asarray(extra["num_steps"])
            groups["sample_stats"] = {
                "diverging": np.asarray(extra["diverging"]), "energy": np.asarray(extra["energy"]),
                "n_steps": steps, "tree_depth": np.ceil(np.log2(steps + 1)).astype(int),
                "step_size": np.asarray(extra["adapt_state.step_size"]),
                "lp": -np.asarray(extra["potential_energy"]), "acceptance_rate": np.asarray(extra["accept_prob"]),
            }
        if want_ll:
            groups["log_likelihood"] = {"y": cons["ll"]}
        if want_pp:
            groups[f"{group}_predictive"] = {"y": cons["yrep"]}
        attrs = {"sampler": sampler, "clones": int(dens.clones), "max_tree_depth": int(max_tree_depth),
                 "stochmm_formula": model.formula}
        self.idata = make_idata(groups, coords=coords, dims=dims, attrs=attrs)
        self._coords, self._dims = coords, dims
        return self

    def _ranef_layout(self) -> dict[str, tuple[list[int], list[str]]]:
        out: dict[str, tuple[list[int], list[str]]] = {}
        for i, t in enumerate(self.model.terms):
            idx, cols = out.setdefault(t.group, ([], []))
            idx.append(i)
            for c in t.cnames:
                cols.append(c if c not in cols else f"{c}.{len(idx) - 1}")
        return out

    def _observed(self) -> np.ndarray:
        d = self._dens.d
        y = np.asarray(self.model.y, dtype=float)
        if d.cbind:
            return np.round(y * d.trials)
        return y

    # -- diagnostics -------------------------------------------------------------------------------
    def _check(self, warn: bool) -> None:
        table = diag.diagnose(self, warn=False)
        self._diag = table
        self.warnings = list(table.attrs["warnings"])
        if warn:
            for m in self.warnings:
                warnings.warn(m, diag.SamplerWarning, stacklevel=3)

    def diagnose(self, *, ranef: bool = False) -> pd.DataFrame:
        """diagnose(*, ranef=False) -> DataFrame — :func:`stochmm.stochastic.diagnostics.diagnose` of these draws."""
        return diag.diagnose(self, ranef=ranef)

    # -- draws ------------------------------------------------------------------------------------
    def draws(self, name: str) -> np.ndarray:
        """draws(name) -> ndarray (chains, draws)

        The draws of one scalar parameter by its name (``"(Intercept)"``, ``"sd(herd)"``, ``"sigma"``, a
        correlation name).
        """
        lay = self.layout
        if name in lay.fixef:
            return self._draws["fixef"][..., lay.fixef.index(name)]
        if name in lay.sd:
            return self._draws["sd"][..., lay.sd.index(name)]
        if name in lay.cor:
            return self._draws["cor"][..., lay.cor.index(name)]
        if name == "sigma" and lay.sigma:
            return self._draws["sigma"]
        raise KeyError(f"no parameter {name!r}; parameters: {', '.join(lay.scalar_names)}")

    def _scalar_draws(self) -> dict[str, np.ndarray]:
        return {nm: self.draws(nm) for nm in self.layout.scalar_names}

    @property
    def b_draws(self) -> np.ndarray:
        """Random-effect draws, (chains, draws, q) in Z's column order."""
        return self._draws["b"]

    # -- the ML vocabulary -----------------------------------------------------------------------
    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self._draws["fixef"].mean(axis=(0, 1)), index=self.model.xnames, name="fixef")

    @property
    def vcov(self) -> pd.DataFrame:
        f = self._draws["fixef"].reshape(-1, self.model.p)
        return pd.DataFrame(np.cov(f, rowvar=False).reshape(self.model.p, self.model.p), index=self.model.xnames,
                            columns=self.model.xnames)

    @property
    def se(self) -> pd.Series:
        """Posterior SDs of the fixed effects."""
        return pd.Series(self._draws["fixef"].reshape(-1, self.model.p).std(axis=0, ddof=1), index=self.model.xnames,
                         name="se")

    @property
    def sigma(self) -> float:
        return float(self._draws["sigma"].mean()) if "sigma" in self._draws else 1.0

    @property
    def varcorr(self) -> pd.DataFrame:
        """Posterior means laid out as the ML ``varcorr`` (group, term1, term2, variance, sd, corr)."""
        lay, model = self.layout, self.model
        sd = self._draws["sd"]
        rows = []
        ci = 0
        for j, t in enumerate(model.terms):
            cols = [i for i, tj in enumerate(lay.sd_term) if tj == j]
            for a, i in enumerate(cols):
                rows.append((lay.group_names[j], t.cnames[a], np.nan, float(np.mean(sd[..., i] ** 2)),
                             float(np.mean(sd[..., i])), np.nan))
            for b in range(t.k):
                for a in range(b + 1, t.k):
                    r = self._draws["cor"][..., ci]
                    cov = r * sd[..., cols[a]] * sd[..., cols[b]]
                    rows.append((lay.group_names[j], t.cnames[b], t.cnames[a], float(cov.mean()), np.nan,
                                 float(r.mean())))
                    ci += 1
        if lay.sigma:
            s = self._draws["sigma"]
            rows.append(("Residual", np.nan, np.nan, float(np.mean(s**2)), float(s.mean()), np.nan))
        out = pd.DataFrame(rows, columns=["group", "term1", "term2", "variance", "sd", "corr"])
        return out.astype({"term1": object, "term2": object})  # as the ML varcorr: NaN where missing

    @property
    def b(self) -> np.ndarray:
        """Posterior means of the random effects in Z's column order."""
        return self._draws["b"].mean(axis=(0, 1))

    @property
    def ranef(self) -> dict[str, pd.DataFrame]:
        out = {}
        b = self.b
        for g, (idx, cols) in self._ranef_layout().items():
            arr = np.concatenate([b[self.model.z_slices[i]].reshape(self.model.terms[i].nlev, self.model.terms[i].k)
                                  for i in idx], axis=1)
            out[g] = pd.DataFrame(arr, index=pd.Index(self.model.terms[idx[0]].levels, name=g), columns=cols)
        return out

    def predict(self, newdata: pd.DataFrame | None = None, type: str = "response", re_form: str | None = "full",
                offset: Any = None, *, summary: bool = True) -> np.ndarray | pd.DataFrame:
        """predict(newdata=None, type="response", re_form="full", offset=None, *, summary=True) -> ndarray

        Posterior mean of the prediction (the mean over draws of g⁻¹(η), not g⁻¹ of the mean) on the link
        (``type="link"``) or response scale; ``summary=False`` returns every draw, (chains·draws, n).
        ``re_form=None`` sets the random effects to zero; levels not seen in the fit get zero random effects.
        """
        if type not in ("link", "response"):
            raise ValueError(f"type must be 'link' or 'response', not {type!r}")
        m = self.model
        beta = self._draws["fixef"].reshape(-1, m.p)
        b = self._draws["b"].reshape(beta.shape[0], -1) if "b" in self._draws else None
        use_re = re_form not in (None, "~0", "NA") and b is not None
        if newdata is None:
            eta = beta @ m.X.T + m.offset
            if use_re:
                eta = eta + (m.Z @ b.T).T
        else:
            from ..builder.model import eval_numeric

            X, re = m.new_design(newdata)
            eta = beta @ X.T
            for expr in m.parsed.offsets:
                eta = eta + eval_numeric(expr, newdata)
            if offset is not None:
                eta = eta + (newdata[offset].to_numpy(dtype=float) if isinstance(offset, str)
                             else np.asarray(offset, dtype=float))
            if use_re:
                for (refs, z), t, sl in zip(re, m.terms, m.z_slices):
                    bt = b[:, sl].reshape(b.shape[0], t.nlev, t.k)
                    known = refs >= 0
                    contrib = np.zeros((b.shape[0], len(refs)))
                    contrib[:, known] = np.einsum("ij,dij->di", z[known], bt[:, refs[known]])
                    eta = eta + contrib
        out = eta if type == "link" else np.asarray(_linkinv(self._dens.d.kind, jnp.asarray(eta)))
        return out.mean(axis=0) if summary else out

    def posterior_predictive(self) -> Any:
        """posterior_predictive() -> xarray.Dataset

        The posterior predictive distribution: one replicated response per posterior draw, on the scale of
        the observed response (counts for ``cbind`` binomials, proportions for proportion responses), drawn
        with the random effects of that draw. Adds the ``posterior_predictive`` group to :attr:`idata` (for
        ``az.plot_ppc``) the first time and returns it; later calls return the same group. Reproducible: the
        keys follow from the ``seed`` of :func:`sample_model`, as with ``posterior_predictive=True``.

        Examples
        --------
        >>> post = sm.sample(..., posterior_predictive=False)  # doctest: +SKIP
        >>> post.posterior_predictive()["y"].shape  # doctest: +SKIP
        (4, 1000, 56)
        """
        from .idata import add_group, group_dataset, group_names

        name = f"{self.group}_predictive"
        if name not in group_names(self.idata):
            if not self.model.terms:
                raise SamplingError("posterior_predictive needs a model with random effects")
            cons = _map_draws(self._dens, self._samples, self.seed, False, True)
            self.idata = add_group(self.idata, name, {"y": cons["yrep"]}, coords={"obs": np.arange(self.model.n)},
                                   dims={"y": ["obs"]})
        return group_dataset(self.idata, name)

    # -- tables ----------------------------------------------------------------------------------
    def summary_table(self) -> pd.DataFrame:
        """summary_table() -> DataFrame — mean, median, SD, 2.5/97.5 %, MCSE, bulk/tail ESS, R-hat per parameter."""
        t = diag.param_table(self._scalar_draws())
        prior = {nm: _prior_text(self, nm) for nm in t.index}
        t["prior"] = pd.Series(prior)
        return t

    def prior_summary(self) -> pd.DataFrame:
        """prior_summary() -> DataFrame — the priors used (rstanarm's ``prior_summary``)."""
        return describe(self.model, self.priors, self._user)

    def dclone(self) -> pd.DataFrame:
        """dclone() -> DataFrame

        Data-cloning estimates (``clones=K``): posterior mean (→ MLE) and ``se`` = √(K × posterior variance)
        (→ the asymptotic SE) for each parameter.
        """
        rows = {}
        for nm, x in self._scalar_draws().items():
            rows[nm] = (float(x.mean()), float(np.sqrt(self.clones * x.var(ddof=1))))
        return pd.DataFrame.from_dict(rows, orient="index", columns=["estimate", "se"]).rename_axis("parameter")

    def summary(self) -> Summary:
        """summary() -> Summary — a bambi/rstanarm-style printout with the table in ``.tables["params"]``."""
        t = self.summary_table()
        m = self.model
        head = [f"Posterior of a {self.family_label.lower()} mixed model ({self.sampler})",
                f" Formula: {m.formula}",
                f" Family: {self._dens.d.kind if self._dens.d.kind != 'gaussian' else 'gaussian (identity)'}",
                f" Observations: {m.n}; groups: " + ", ".join(f"{g} {n}" for g, n in m.ngroups.items()),
                f" Draws: {self.nchains} chains x {self.ndraws}" + (f"; data cloned K = {self.clones}"
                                                                   if self.clones > 1 else "")]
        cols = ["mean", "median", "sd", "2.5%", "97.5%", "mcse_mean", "ess_bulk", "ess_tail", "r_hat"]
        show = t[cols].copy()
        body = show.to_string(float_format=lambda v: f"{v:.4g}")
        pr = self.prior_summary()
        prior_txt = "\n".join(f"  {r['parameter']:<24} ~ {r['prior']}  [{r['source']}"
                              + (f"; {r['applies to']}]" if r["applies to"] else "]") for _, r in pr.iterrows())
        text = "\n".join(head) + "\n\n" + body + "\n\nPriors:\n" + prior_txt
        if self.warnings:
            text += "\n\nWarnings:\n" + "\n".join(f"  - {w}" for w in self.warnings)
        return Summary(text, {"params": t, "priors": pr})

    def __repr__(self) -> str:
        return (f"<PosteriorResults {self.model.formula!r}: {self.sampler}; {self.nchains} chains x {self.ndraws} "
                f"draws>")


def _prior_text(res: PosteriorResults, name: str) -> str:
    from .priors import _fmt

    if name in res.priors:
        return _fmt(res.priors[name])
    for nm in res.layout.cor_prior_names:  # a correlation entry: its matrix's prior
        if name.startswith(nm[:-1] + ":"):
            return _fmt(res.priors[nm])
    return ""


def model_sample(model: Model, *args: Any, **kwargs: Any) -> PosteriorResults:
    """model_sample(model, **options) -> PosteriorResults — ``Model.sample`` (see :func:`sample_model`)."""
    if args:
        raise SamplingError("Model.sample takes keyword arguments only (priors=, draws=, warmup=, chains=, ...)")
    return sample_model(model, **kwargs)


_ = ParamLayout  # re-exported type for annotations in the docs
