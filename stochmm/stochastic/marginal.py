"""Marginal likelihoods in JAX, with the random effects integrated out, for marginal NUTS.

For a mixed model y | b ~ family(g⁻¹(Xβ + Zb + offset)), b ~ N(0, Σ_b), the log-likelihood of (β, Σ[, σ])
with b integrated out, written as pure JAX (jit-able, vmappable, exact gradients by ``jax.grad``), and
draws of b from its conditional posterior given y and the parameters:

* ``"exact"`` — linear mixed models: the Gaussian marginal through the q × q penalised system of the
  spherical random effects u (b = Λu), M = I + Λ'Z'WZΛ/σ², factored blockwise
  (:mod:`stochmm.stochastic.blockchol`: per-level blocks for the first grouping factor, a sparse
  off-diagonal block, one dense Schur complement for the other factors). All cross-products are
  computed once, so an evaluation costs O(q k² + q p + Σ_l deg_l² + q_rest³), independent of n.
  Conditional draws of b are exact (Gaussian).
* ``"agq(K)"`` — GLMMs whose terms share one grouping factor: adaptive Gauss–Hermite quadrature per
  level around the conditional mode, as :mod:`stochmm.deterministic.quadrature` (K nodes per
  dimension, tensor product for vector-valued terms; K = 1 is the Laplace approximation). The mode is
  found by damped Newton steps vectorised over the levels (segment sums over the level codes); its
  derivative enters by the implicit-function theorem: the converged mode û₀ (no gradient) is moved by
  one Newton step û = û₀ + H⁻¹ g(û₀; β, Λ), whose value is û₀ (g = 0) and whose derivative is
  H⁻¹ ∂g/∂(β, Λ) = dû/d(β, Λ) exactly. Conditional draws of b: per-level independent
  Metropolis–Hastings from a multivariate t₄ proposal centred at the mode with the Laplace scale
  (``mh_steps`` steps, all levels at once); the target is bounded by a N(û, I) kernel, so the t
  proposal dominates it and the chain is uniformly ergodic: its law converges geometrically to the
  exact conditional, the error after ``mh_steps`` steps falls like (1 − 1/M)^steps, M = sup target/proposal.
* ``"laplace"`` — GLMMs with crossed or nested factors: the Laplace approximation at the joint mode
  (damped Newton on the blocked system, the same implicit-function derivative), an approximation,
  labelled so. The draws of b target the *exact* conditional p(b | y, β, Σ): a start from the joint
  Laplace Gaussian, then ``mh_steps`` Metropolis-within-Gibbs sweeps over the grouping factors (given
  the other factors, a factor's levels are independent; each gets an independence-MH step from a t₄
  proposal centred at its Gaussian conditional mean).

:meth:`MarginalLik.draw_info` also returns the mean MH acceptance rate (typically 0.85–0.95 here).

Cost per gradient (``python benchmarks/bench_marginal.py``, 2 cores shared with other jobs, so ±2×):
LMMs 0.02–0.2 ms for q ≤ 2,000 with one factor (no pass over the data; below the joint density's
cost), Penicillin 0.03–0.1 ms; AGQ about 15–90 × the joint density's gradient (Newton passes plus K
node passes over the data: cbpp AGQ-9 0.05–0.16 ms, 10,000 observations 4–14 ms) for a posterior of
p + θ instead of p + θ + q dimensions; crossed Laplace (VerbAgg) 3–4 ms; InstEval's exact LMM
(q_dense = 1,128) about 3 s — there full NUTS is the better choice.

Values are on the package's full log-likelihood scale (binomial coefficients, log y!, 2π terms), so
they equal the deterministic paths' (−2 × ``fit.loglik`` and :func:`stochmm.deterministic.quadrature.agq`).

Examples
--------
>>> import numpy as np, stochmm as sm
>>> m = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
>>> ml = build(m)
>>> ml.kind, round(float(ml.loglik(np.array([251.4, 10.47]), [np.array([[24.7, 0.0], [0.2, 5.9]])], 25.6)), 4)
('exact', -875.9973)
"""

from __future__ import annotations

from typing import Any

import jax

from ._jax import configure

configure()  # float64, persistent compilation cache

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402

from ..builder.families import get_family  # noqa: E402
from ..errors import DesignError  # noqa: E402
from . import blockchol as bc  # noqa: E402
from .jaxfamily import SUPPORTED, derivs, kernel  # noqa: E402

__all__ = ["applies", "build", "MarginalLik", "MAX_NODES"]

MAX_NODES = 1000
"""Largest quadrature rule per level (nodes = nagq ** k)."""

_LOG2PI = float(np.log(2.0 * np.pi))
_KINDS = ("auto", "exact", "agq", "laplace")
_NU = 4.0  # degrees of freedom of the t proposal of the conditional draws


def _default_nagq(k: int) -> int:
    return {1: 9, 2: 5}.get(k, 3)


def _family(model: Any, family: Any = None):
    fam = get_family(model.family if family is None else family)
    kernel(fam)  # raises for a family without a JAX kernel
    return fam


def applies(model: Any) -> tuple[bool, str]:
    """applies(model) -> (bool, str)

    Whether the random effects of ``model`` can be integrated out exactly (linear mixed models) or by
    adaptive quadrature (GLMMs whose terms share one grouping factor), and if not, why not.

    Examples
    --------
    >>> import stochmm as sm
    >>> v = sm.datasets.load("VerbAgg")
    >>> applies(sm.Model("r2 ~ Anger + (1 | id)", v, family="binomial"))
    (True, 'agq(9): one grouping factor (id), 316 levels x 1 random effect(s)')
    >>> ok, why = applies(sm.Model("r2 ~ Anger + (1 | id) + (1 | item)", v, family="binomial"))
    >>> ok, why[:62]
    (False, 'the random effects are crossed or nested (grouping factors id,')
    """
    from ..builder.model import Model

    if not isinstance(model, Model):
        raise TypeError(f"model must be a stochmm Model, got {type(model).__name__}")
    try:
        lay = bc.Layout(model)
    except DesignError as err:
        return False, str(err)
    if model.family_name == "gaussian":
        return True, (f"exact: Gaussian marginal likelihood, {model.q} random effects "
                      f"({lay.q_rest} in the dense block)")
    try:
        _family(model)
    except DesignError as err:
        return False, str(err)
    if lay.q_rest:
        groups = ", ".join(dict.fromkeys(t.group for t in model.terms))
        return False, (f"the random effects are crossed or nested (grouping factors {groups}): quadrature needs one "
                       "grouping factor; kind='laplace' gives the Laplace approximation instead")
    k, nagq = lay.k0, _default_nagq(lay.k0)
    if nagq**k > MAX_NODES:
        return False, (f"{k} random effects per level of {model.terms[0].group}: even a 3-point tensor rule has "
                       f"{3 ** k} nodes per level (> {MAX_NODES}); kind='laplace' gives the Laplace approximation")
    return True, (f"agq({nagq}): one grouping factor ({model.terms[0].group}), {lay.nlev0} levels x {k} "
                  "random effect(s)")


def build(model: Any, kind: str = "auto", nagq: int | None = None, *, family: Any = None,
          mh_steps: int = 20, newton_maxiter: int = 100) -> MarginalLik:
    """build(model, kind="auto", nagq=None, *, family=None, mh_steps=20, newton_maxiter=100) -> MarginalLik

    The marginal log-likelihood of ``model`` with its random effects integrated out.

    Parameters
    ----------
    model : Model
    kind : {"auto", "exact", "agq", "laplace"}
        ``"auto"``: exact for linear mixed models, AGQ for GLMMs with one grouping factor (an error for
        crossed GLMMs: ask for ``"laplace"`` explicitly, it is an approximation). ``"laplace"`` on a
        linear mixed model is the exact marginal (the Laplace approximation is exact there).
    nagq : int, optional
        AGQ nodes per dimension; default 9 (scalar terms), 5 (two random effects per level), else 3.
        ``nagq=1`` is the Laplace approximation.
    family : str or Family, optional
        For GLMMs, the family (default ``model.family``).
    mh_steps : int
        Independent-MH steps per conditional draw of b (GLMMs).
    newton_maxiter : int
        Most Newton iterations for the conditional modes (GLMMs); converged to ~1e-12 well before.

    Raises
    ------
    DesignError
        No marginal of that kind exists for the model (the message says why).

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> ml = build(m, nagq=25)
    >>> ml.kind, round(-2 * float(ml.loglik(np.array([-1.0, -1.0, -1.0, -1.0]), [np.eye(1)])), 5)
    ('agq(25)', 191.73226)
    """
    from ..builder.model import Model

    if not isinstance(model, Model):
        raise TypeError(f"model must be a stochmm Model, got {type(model).__name__}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, _KINDS))}, not {kind!r}")
    if nagq is not None and (isinstance(nagq, bool) or int(nagq) != nagq or nagq < 1):
        raise ValueError(f"nagq must be a positive integer, got {nagq!r}")
    if int(mh_steps) != mh_steps or mh_steps < 1:
        raise ValueError(f"mh_steps must be a positive integer, got {mh_steps!r}")
    lay = bc.Layout(model)
    if model.family_name == "gaussian":
        if kind == "agq":
            raise DesignError("kind='agq' is for GLMMs; a linear mixed model has an exact marginal (kind='exact')")
        if nagq is not None:
            raise DesignError("nagq is for GLMMs; a linear mixed model has an exact marginal")
        return _LmmMarginal(model, lay)
    if kind == "exact":
        raise DesignError(f"no closed-form marginal for a {model.family_name} GLMM: use kind='agq' (one grouping "
                          "factor) or kind='laplace'")
    fam = _family(model, family)
    if kind == "laplace" and lay.q_rest == 0 and nagq is None:
        nagq = 1
    if kind in ("auto", "agq") or (kind == "laplace" and lay.q_rest == 0):
        if lay.q_rest:
            ok, why = applies(model)
            raise DesignError(why)
        k = lay.k0
        nq = _default_nagq(k) if nagq is None else int(nagq)
        if kind == "laplace" and nq != 1:
            raise DesignError(f"kind='laplace' is one node; got nagq={nq} (use kind='agq')")
        if nq**k > MAX_NODES:
            raise DesignError(f"a tensor rule with nagq={nq} in {k} dimensions has {nq ** k} nodes per level "
                              f"(> {MAX_NODES}); lower nagq or use kind='laplace'")
        return _AgqMarginal(model, lay, fam, nq, int(mh_steps), int(newton_maxiter))
    if nagq not in (None, 1):
        raise DesignError(f"kind='laplace' has no nagq (got {nagq})")
    return _LaplaceMarginal(model, lay, fam, int(mh_steps), int(newton_maxiter))


class MarginalLik:
    """MarginalLik — a marginal log-likelihood of a model (made by :func:`build`).

    Attributes
    ----------
    kind : str
        ``"exact"``, ``"agq(K)"`` or ``"laplace"``.
    model : Model
    gaussian : bool
        Whether ``sigma`` is a parameter.
    q_dense : int
        Size of the dense block (random effects of the grouping factors after the first): 0 with one
        grouping factor. Its Cholesky (q_dense³/3 flops, and about 3× that for the gradient) bounds the
        cost per gradient: negligible below a few hundred, about 1–3 s per gradient at InstEval's 1,128
        (2 cores) — there full NUTS (a gradient costs O(n)) is the faster choice.

    Methods
    -------
    loglik(beta, L_list, sigma=None) -> scalar
        Full-scale log-likelihood; β on ``model.xnames``, one absolute-scale lower-triangular Cholesky
        factor L_j (Σ_j = L_j L_j') per term of ``model.terms``; σ the residual SD (Gaussian only).
    draw_ranef(rng_key, beta, L_list, sigma=None) -> b (q,)
        One draw of b | y, parameters, in ``model.Z``'s column order.
    draw_info(rng_key, beta, L_list, sigma=None) -> (b, acceptance rate)
        The draw and the mean Metropolis–Hastings acceptance of its steps (1 for exact Gaussian draws).
    noise_spec() -> dict, draw_from_noise(noise, beta, L_list, sigma=None) -> b (q,)
        The same draw made from random numbers passed in (name → (shape, "normal" | "uniform" | "key")
        per draw): vectorised over many draws it compiles without a batched PRNG inside, which XLA
        compiles slowly (cbpp, 1000 draws: 3.2 s with the PRNG inside, 1.3 s without; 2026-12-02).
    L_list(theta, sigma=None) -> list of arrays
        The L_j from lme4's relative θ (× σ for a Gaussian model).

    All three are jit-compiled pure functions of their arguments: they can be called inside
    ``jax.jit``/``jax.grad``/``jax.vmap`` (the argument checks run at trace time).
    """

    kind: str = ""
    gaussian: bool = False

    def __init__(self, model: Any, lay: bc.Layout) -> None:
        self.model = model
        self.lay = lay
        self.p = model.p
        self.q = model.q
        self._ks = [t.k for t in model.terms]
        self.q_dense = lay.q_rest
        self._loglik_jit = jax.jit(self._loglik)
        self._draw_jit = jax.jit(self._draw)
        self._info_jit = jax.jit(self._draw_info)

    def __repr__(self) -> str:
        return f"MarginalLik(kind={self.kind!r}, n={self.model.n}, p={self.p}, q={self.q})"

    # -- argument checks (at trace time: shapes only)
    def _check(self, beta, L_list, sigma):
        beta = jnp.asarray(beta, dtype=jnp.float64)
        if beta.shape != (self.p,):
            raise ValueError(f"beta must have shape ({self.p},) ({', '.join(self.model.xnames)}); got {beta.shape}")
        if not isinstance(L_list, (list, tuple)) or len(L_list) != len(self._ks):
            raise ValueError(f"L_list must be a list of {len(self._ks)} Cholesky factors, one per term "
                             f"({', '.join(t.text or t.group for t in self.model.terms)})")
        Ls = []
        for L, k, t in zip(L_list, self._ks, self.model.terms):
            L = jnp.asarray(L, dtype=jnp.float64)
            if L.shape != (k, k):
                raise ValueError(f"the factor of term {t.text or t.group} must be {k}x{k}; got shape {L.shape}")
            Ls.append(L)
        if self.gaussian and sigma is None:
            raise ValueError("a linear mixed model needs the residual SD sigma")
        if not self.gaussian and sigma is not None:
            raise ValueError(f"sigma is for Gaussian models; this is a {self.model.family_name} GLMM")
        return beta, Ls, (jnp.asarray(sigma, dtype=jnp.float64) if self.gaussian else None)

    def L_list(self, theta: Any, sigma: float | None = None) -> list:
        """L_list(theta, sigma=None) -> list of ndarray — absolute factors from lme4's θ (× σ if Gaussian)."""
        theta = np.asarray(theta, dtype=float)
        s = 1.0 if sigma is None else float(sigma)
        return [s * T for T in self.model.lambda_blocks(theta)]

    def loglik(self, beta, L_list, sigma=None):
        """loglik(beta, L_list, sigma=None) -> scalar — the marginal log-likelihood (full scale)."""
        beta, Ls, sigma = self._check(beta, L_list, sigma)
        return self._loglik_jit(beta, Ls, sigma)

    def draw_ranef(self, rng_key, beta, L_list, sigma=None):
        """draw_ranef(rng_key, beta, L_list, sigma=None) -> b (q,) — one draw of b | y, parameters."""
        beta, Ls, sigma = self._check(beta, L_list, sigma)
        return self._draw_jit(rng_key, beta, Ls, sigma)

    def draw_info(self, rng_key, beta, L_list, sigma=None):
        """draw_info(rng_key, beta, L_list, sigma=None) -> (b (q,), acceptance rate)

        :meth:`draw_ranef` and the mean acceptance rate of its Metropolis–Hastings steps (1 for exact
        Gaussian draws): rates far below 0.5 mean the proposal fits the conditional poorly (raise
        ``mh_steps``).
        """
        beta, Ls, sigma = self._check(beta, L_list, sigma)
        return self._info_jit(rng_key, beta, Ls, sigma)

    def set_start(self, b: Any, L_list: Any) -> None:
        """set_start(b, L_list) — where iterative marginals start their inner solves (see the AGQ marginal);
        nothing for the others."""

    def noise_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """noise_spec() -> dict — the random numbers one :meth:`draw_from_noise` takes: name → (shape, kind)."""
        return {"key": ((2,), "key")}

    def draw_from_noise(self, noise, beta, L_list, sigma=None):
        """draw_from_noise(noise, beta, L_list, sigma=None) -> b (q,) — :meth:`draw_ranef` from given
        random numbers (:meth:`noise_spec`)."""
        beta, Ls, sigma = self._check(beta, L_list, sigma)
        return self._draw_noise(noise, beta, Ls, sigma)

    def _draw_noise(self, noise, beta, Ls, sigma):
        return self._draw(noise["key"], beta, Ls, sigma)

    def _to_model(self, b0, br):
        b = jnp.concatenate([b0.reshape(-1), br])
        return b[self.lay.from_model]


# ---------------------------------------------------------------------------------------------
# linear mixed models: exact
# ---------------------------------------------------------------------------------------------
class _LmmMarginal(MarginalLik):
    kind = "exact"
    gaussian = True

    def __init__(self, model: Any, lay: bc.Layout) -> None:
        super().__init__(model, lay)
        w = np.asarray(model.prior_weights, dtype=float)
        X = np.asarray(model.X, dtype=float)
        yt = np.asarray(model.y, dtype=float) - np.asarray(model.offset, dtype=float)
        # weighted least-squares β0: residuals r0 = ỹ − Xβ0 with X'Wr0 = 0, so that r'Wr for any β is
        # r0'Wr0 + δ'X'WXδ (δ = β − β0) without cancellation
        sw = np.sqrt(w)
        beta0 = np.linalg.lstsq(X * sw[:, None], yt * sw, rcond=None)[0] if self.p else np.zeros(0)
        r0 = yt - X @ beta0
        Zi = lay.Z_internal()
        self._beta0 = jnp.asarray(beta0)
        self._r0Wr0 = float(r0 @ (w * r0))
        self._XWX = jnp.asarray(X.T @ (w[:, None] * X))
        self._ZWr0 = jnp.asarray(Zi.T @ (w * r0))
        self._ZWX = jnp.asarray(np.asarray(Zi.T @ (w[:, None] * X)).reshape(lay.q, self.p))
        self._const = float(model.n * _LOG2PI - np.log(w).sum())
        self._raw = bc.raw_crossprods(lay, w)
        self.n = model.n

    def _solve(self, beta, Ls, sigma):
        lay = self.lay
        L0, Lr = lay.lambdas(Ls)
        s2 = sigma * sigma
        C00, Cpair, Crr = bc.scale_crossprods(lay, self._raw, L0, Lr, 1.0 / s2)
        F = bc.factor(lay, C00, Cpair, Crr)
        delta = beta - self._beta0
        a = (self._ZWr0 - self._ZWX @ delta) / s2
        c0, cr = bc.apply_lambda_t(lay, L0, Lr, a[: lay.q0].reshape(lay.nlev0, lay.k0), a[lay.q0:])
        v0, vr = bc.forward(lay, F, c0, cr)
        return L0, Lr, F, delta, v0, vr, s2

    def _loglik(self, beta, Ls, sigma):
        L0, Lr, F, delta, v0, vr, s2 = self._solve(beta, Ls, sigma)
        rWr = self._r0Wr0 + delta @ self._XWX @ delta
        m2ll = (self._const + self.n * jnp.log(s2) + F.logdet() + rWr / s2 - jnp.sum(v0 * v0) - jnp.sum(vr * vr))
        return -0.5 * m2ll

    def _draw_info(self, rng_key, beta, Ls, sigma):
        return self._draw(rng_key, beta, Ls, sigma), jnp.ones(())

    def noise_spec(self):
        return {"e": ((self.lay.q,), "normal")}

    def _draw_noise(self, noise, beta, Ls, sigma):
        return self._draw(None, beta, Ls, sigma, noise["e"])

    def _draw(self, rng_key, beta, Ls, sigma, e=None):
        lay = self.lay
        L0, Lr, F, delta, v0, vr, s2 = self._solve(beta, Ls, sigma)
        if e is None:
            e = jax.random.normal(rng_key, (lay.q,))
        u0, ur = bc.backward(lay, F, v0 + e[: lay.q0].reshape(lay.nlev0, lay.k0), vr + e[lay.q0:])
        return self._to_model(*bc.apply_lambda(lay, L0, Lr, u0, ur))

    def cond_moments(self, beta, L_list, sigma):
        """cond_moments(beta, L_list, sigma) -> (mean (q,), covariance (q, q)) of b | y, dense (for tests)."""
        beta, Ls, sigma = self._check(beta, L_list, sigma)
        return jax.jit(self._cond_moments)(beta, Ls, sigma)

    def _cond_moments(self, beta, Ls, sigma):
        lay = self.lay
        L0, Lr, F, delta, v0, vr, s2 = self._solve(beta, Ls, sigma)

        def x_of(y):
            u0, ur = bc.backward(lay, F, y[: lay.q0].reshape(lay.nlev0, lay.k0), y[lay.q0:])
            return self._to_model(*bc.apply_lambda(lay, L0, Lr, u0, ur))

        mean = x_of(jnp.concatenate([v0.reshape(-1), vr]))
        Bt = jax.vmap(x_of)(jnp.eye(lay.q))  # rows: columns of Λ L_M^{-T}
        return mean, Bt.T @ Bt


# ---------------------------------------------------------------------------------------------
# GLMMs: shared pieces
# ---------------------------------------------------------------------------------------------
class _GlmmBase(MarginalLik):
    def __init__(self, model: Any, lay: bc.Layout, fam: Any, mh_steps: int, newton_maxiter: int) -> None:
        super().__init__(model, lay)
        self.family = fam
        self._kern = kernel(fam)
        self._X = jnp.asarray(model.X, dtype=jnp.float64)
        self._y = jnp.asarray(model.y, dtype=jnp.float64)
        self._wt = jnp.asarray(model.weights, dtype=jnp.float64)
        self._off = jnp.asarray(model.offset, dtype=jnp.float64)
        self._const = float(np.sum(fam.constant(model)))
        self._Z0 = jnp.asarray(lay.Z0)
        self._Zr = [jnp.asarray(z) for z in lay.rest_z]
        self.mh_steps = mh_steps
        self.newton_maxiter = newton_maxiter
        self.nu = _NU

    def _ell(self, eta, order=0):
        return derivs(self._kern, self._y if eta.ndim == 1 else self._y[:, None], eta,
                      self._wt if eta.ndim == 1 else self._wt[:, None], order)


def _newton(step_fn, u0, maxiter: int, tol: float = 1e-11):
    """Damped Newton to the maximum of a concave objective made of independent blocks, no gradient.

    ``step_fn(u) -> (h, δ)``: the objective of each block (shape (B,)) and its Newton step at ``u``
    (shape (B, ...)). One evaluation per iteration: the step proposed at the last accepted point is
    evaluated; a block whose objective did not decrease takes it (and its new Newton step), the others
    halve it and try again next iteration.
    """
    bshape = (-1,) + (1,) * (u0.ndim - 1)
    h0, d0 = step_fn(u0)

    def body(state):
        u, h, d, s, it, _ = state
        uc = u + s.reshape(bshape) * d
        hc, dc = step_fn(uc)
        ok = hc >= h - 1e-12 * (1.0 + jnp.abs(h))
        okb = ok.reshape(bshape)
        u = jnp.where(okb, uc, u)
        h = jnp.where(ok, hc, h)
        d = jnp.where(okb, dc, d)
        s = jnp.where(ok, 1.0, 0.5 * s)
        nxt = jnp.where(s < 1e-10, 0.0, jnp.max(jnp.abs(s.reshape(bshape) * d).reshape(d.shape[0], -1), axis=1))
        return u, h, d, s, it + 1, jnp.max(nxt)

    def cond(state):
        return (state[4] < maxiter) & (state[5] > tol)

    init = (u0, h0, d0, jnp.ones(h0.shape), 0, jnp.max(jnp.abs(d0)))
    return jax.lax.while_loop(cond, body, init)[0]


def _spd_solve(H, g):
    """H⁻¹g for a batch of small SPD blocks (nlev, k, k) and (nlev, k)."""
    Li = bc.tril_inv_small(bc.chol_small(H))
    return jnp.sum(Li * jnp.sum(Li * g[:, None, :], axis=2)[:, :, None], axis=1)


def _t_draws(key, shape, k):
    """Standard multivariate t₄ draws, shape + (k,) (:func:`_t_draws_and_logu` without the log-uniforms)."""
    return _t_draws_and_logu(key, shape, k)[0]


def _t_draws_and_logu(key, shape, k):
    """Standard multivariate t₄ draws, shape + (k,), and log-uniforms of ``shape`` (Metropolis
    acceptance), from one normal and one uniform call (:func:`_t_from_noise`)."""
    kz, ku = jax.random.split(key)
    z = jax.random.normal(kz, shape + (k,))
    uu = jax.random.uniform(ku, (3,) + shape, minval=jnp.finfo(jnp.float64).tiny)
    return _t_from_noise(z, uu)


def _t_from_noise(z, uu):
    """t₄ draws z / √(χ²₄/4), χ²₄ = −2 log(U₁U₂) (exact, no gamma sampler), and log U₃, from normals
    z (..., k) and uniforms uu (3, ...)."""
    uu = jnp.maximum(uu, jnp.finfo(jnp.float64).tiny)
    chi2 = -2.0 * (jnp.log(uu[0]) + jnp.log(uu[1]))
    return z / jnp.sqrt(chi2 / _NU)[..., None], jnp.log(uu[2])


# ---------------------------------------------------------------------------------------------
# GLMMs with one grouping factor: adaptive Gauss–Hermite quadrature per level
# ---------------------------------------------------------------------------------------------
class _AgqMarginal(_GlmmBase):
    def __init__(self, model, lay, fam, nagq, mh_steps, newton_maxiter):
        super().__init__(model, lay, fam, mh_steps, newton_maxiter)
        from ..deterministic.quadrature import tensor_rule

        rule = tensor_rule(nagq, lay.k0)
        self.nagq = nagq
        self.kind = f"agq({nagq})"
        self._zk = jnp.asarray(rule.nodes)
        self._logw = jnp.asarray(np.log(rule.weights) + 0.5 * np.sum(rule.nodes**2, axis=1))
        self._refs = jnp.asarray(lay.refs0)
        self.u_start = None

    def set_start(self, b: Any, L_list: Any) -> None:
        """set_start(b, L_list) — start the Newton iterations for the conditional modes from the spherical
        effects of ``b`` (``model.Z`` order) under ``L_list`` (the ML fit's modes: near every posterior draw,
        a gradient then takes fewer iterations; on cbpp 98 µs instead of 140). Call before the first use."""
        lay = self.lay
        blk = np.empty(lay.q)
        blk[lay.from_model] = np.asarray(b, dtype=float)
        L0 = np.asarray(lay.lambdas(L_list)[0])
        b0 = blk[: lay.q0].reshape(lay.nlev0, lay.k0)
        try:
            with np.errstate(all="ignore"):
                u0 = np.linalg.solve(L0, b0.T).T
        except np.linalg.LinAlgError:
            return
        if np.all(np.isfinite(u0)):
            self.u_start = jnp.asarray(u0)

    # per-level pieces at spherical u (nlev, k)
    def _seg(self, x):
        return jax.ops.segment_sum(x, self._refs, num_segments=self.lay.nlev0)

    def _h(self, base, zt, u):
        eta = base + jnp.sum(zt * u[self._refs], axis=1)
        return self._seg(self._ell(eta, 0)[0]) - 0.5 * jnp.sum(u * u, axis=1)

    def _hgH(self, base, zt, u):
        eta = base + jnp.sum(zt * u[self._refs], axis=1)
        v, d1, d2 = self._ell(eta, 2)
        h = self._seg(v) - 0.5 * jnp.sum(u * u, axis=1)
        g = self._seg(d1[:, None] * zt) - u
        H = self._seg(-d2[:, None, None] * zt[:, :, None] * zt[:, None, :]) + jnp.eye(self.lay.k0)
        return h, g, H

    def _mode(self, base, zt):
        """Conditional modes û (nlev, k) with the implicit-function derivative, and H at û."""
        k = self.lay.k0
        bs, zs = jax.lax.stop_gradient(base), jax.lax.stop_gradient(zt)

        def step_fn(u):
            h, g, H = self._hgH(bs, zs, u)
            return h, _spd_solve(H, g)

        u0 = jnp.zeros((self.lay.nlev0, k)) if self.u_start is None else self.u_start
        u_sg = _newton(step_fn, u0, self.newton_maxiter)
        u_sg = jax.lax.stop_gradient(u_sg)
        _, g, H = self._hgH(base, zt, u_sg)
        Hs = jax.lax.stop_gradient(H)
        u = u_sg + _spd_solve(Hs, g)
        _, _, H = self._hgH(base, zt, u)
        return u, H

    def _setup(self, beta, Ls):
        L0, _ = self.lay.lambdas(Ls)
        base = self._X @ beta + self._off
        zt = self._Z0 @ L0  # rows z̃_i' = z_i'Λ0
        return L0, base, zt

    def _loglik(self, beta, Ls, sigma):
        L0, base, zt = self._setup(beta, Ls)
        u, H = self._mode(base, zt)
        Linv = bc.tril_inv_small(bc.chol_small(H))
        Rz = jnp.sum(Linv[:, None, :, :] * self._zk[None, :, :, None], axis=2)  # R z_k, R = L^{-T}: (nlev, K, k)
        logdetR = jnp.sum(jnp.log(jnp.diagonal(Linv, axis1=1, axis2=2)), axis=1)
        U = u[:, None, :] + Rz  # (nlev, K, k)
        # η_ik = base_i + z̃_i·û_l + (L_l⁻¹ z̃_i)·z_k: an (n, k) × (k, K) product, no (n, K, k) gather
        C = jnp.sum(Linv[self._refs] * zt[:, None, :], axis=2)  # (n, k)
        eta = (base + jnp.sum(zt * u[self._refs], axis=1))[:, None] + C @ self._zk.T
        hk = self._seg(self._ell(eta, 0)[0]) - 0.5 * jnp.sum(U * U, axis=2)
        return jnp.sum(logdetR + logsumexp(hk + self._logw[None, :], axis=1)) + self._const

    def _draw(self, rng_key, beta, Ls, sigma):
        return self._draw_info(rng_key, beta, Ls, sigma)[0]

    def noise_spec(self):
        S, nlev, k = self.mh_steps, self.lay.nlev0, self.lay.k0
        return {"z": ((S + 1, nlev, k), "normal"), "u": ((3, S + 1, nlev), "uniform")}

    def _draw_noise(self, noise, beta, Ls, sigma):
        return self._draw_info(None, beta, Ls, sigma, noise=_t_from_noise(noise["z"], noise["u"]))[0]

    def _draw_info(self, rng_key, beta, Ls, sigma, noise=None):
        L0, base, zt = self._setup(beta, Ls)
        L0, base, zt = (jax.lax.stop_gradient(a) for a in (L0, base, zt))
        u, H = self._mode(base, zt)
        k, nlev, nu = self.lay.k0, self.lay.nlev0, self.nu
        Linv = bc.tril_inv_small(bc.chol_small(H))

        def point(tau):  # u = û + L_H^{-T} τ
            return u + jnp.sum(Linv * tau[:, :, None], axis=1)

        def logw(tau):
            return self._h(base, zt, point(tau)) + 0.5 * (nu + k) * jnp.log1p(jnp.sum(tau * tau, axis=1) / nu)

        S = self.mh_steps
        T, logu = noise if noise is not None else _t_draws_and_logu(rng_key, (S + 1, nlev), k)
        tau = T[0]
        lw = logw(tau)

        def body(i, st):
            tau, lw, nacc = st
            prop = T[i + 1]
            lwp = logw(prop)
            acc = logu[i + 1] < lwp - lw
            return jnp.where(acc[:, None], prop, tau), jnp.where(acc, lwp, lw), nacc + jnp.mean(acc)

        tau, lw, nacc = jax.lax.fori_loop(0, S, body, (tau, lw, 0.0))
        b0 = point(tau) @ L0.T
        return self._to_model(b0, jnp.zeros(0)), nacc / self.mh_steps


# ---------------------------------------------------------------------------------------------
# GLMMs with crossed/nested factors: Laplace at the joint mode (an approximation)
# ---------------------------------------------------------------------------------------------
class _LaplaceMarginal(_GlmmBase):
    kind = "laplace"

    def __init__(self, model, lay, fam, mh_steps, newton_maxiter):
        super().__init__(model, lay, fam, mh_steps, newton_maxiter)
        self._refs0 = jnp.asarray(lay.refs0)
        self._rrefs = [jnp.asarray(r) for r in lay.rest_refs]

    def _split(self, u):
        lay = self.lay
        return u[: lay.q0].reshape(lay.nlev0, lay.k0), u[lay.q0:]

    def _eta(self, base, zt0, ztr, u):
        lay = self.lay
        u0, ur = self._split(u)
        eta = base + jnp.sum(zt0 * u0[self._refs0], axis=1)
        for j, (z, refs, kj) in enumerate(zip(ztr, self._rrefs, lay.rest_k)):
            uj = ur[lay.rest_off[j]: lay.rest_off[j] + lay.rest_nlev[j] * kj].reshape(-1, kj)
            eta = eta + jnp.sum(z * uj[refs], axis=1)
        return eta

    def _zt_d(self, zt0, ztr, d):
        """Z̃'d in the internal order."""
        lay = self.lay
        g0 = jax.ops.segment_sum(d[:, None] * zt0, self._refs0, num_segments=lay.nlev0).reshape(-1)
        parts = [jax.ops.segment_sum(d[:, None] * z, refs, num_segments=nl).reshape(-1)
                 for z, refs, nl in zip(ztr, self._rrefs, lay.rest_nlev)]
        return jnp.concatenate([g0] + parts)

    def _hgF(self, base, zt0, ztr, u):
        v, d1, d2 = self._ell(self._eta(base, zt0, ztr, u), 2)
        h = jnp.sum(v) - 0.5 * jnp.sum(u * u)
        g = self._zt_d(zt0, ztr, d1) - u
        F = bc.factor(self.lay, *bc.weighted_crossprods(self.lay, -d2, zt0, ztr))
        return h, g, F

    def _hsolve(self, F, g):
        lay = self.lay
        g0, gr = self._split(g)
        v0, vr = bc.forward(lay, F, g0, gr)
        x0, xr = bc.backward(lay, F, v0, vr)
        return jnp.concatenate([x0.reshape(-1), xr])

    def _setup(self, beta, Ls):
        L0, Lr = self.lay.lambdas(Ls)
        base = self._X @ beta + self._off
        return L0, Lr, base, self._Z0 @ L0, [z @ Lj for z, Lj in zip(self._Zr, Lr)]

    def _mode(self, base, zt0, ztr):
        sg = jax.lax.stop_gradient
        bs, z0s, zrs = sg(base), sg(zt0), [sg(z) for z in ztr]

        def step_fn(u):
            h, g, F = self._hgF(bs, z0s, zrs, u[0])
            return h[None], self._hsolve(F, g)[None]

        u_sg = sg(_newton(step_fn, jnp.zeros((1, self.lay.q)), self.newton_maxiter)[0])
        _, g, F = self._hgF(base, zt0, ztr, u_sg)
        Fs = jax.tree_util.tree_map(sg, F)
        u = u_sg + self._hsolve(Fs, g)
        return u

    def _loglik(self, beta, Ls, sigma):
        L0, Lr, base, zt0, ztr = self._setup(beta, Ls)
        u = self._mode(base, zt0, ztr)
        h, _, F = self._hgF(base, zt0, ztr, u)
        return h - 0.5 * F.logdet() + self._const

    def _draw(self, rng_key, beta, Ls, sigma):
        return self._draw_info(rng_key, beta, Ls, sigma)[0]

    def _draw_info(self, rng_key, beta, Ls, sigma):
        """Metropolis-within-Gibbs over the grouping factors, started from the joint Laplace Gaussian.

        Given the other factors' effects, the levels of one factor are independent: each is updated by
        an independence-MH step from a t₄ proposal centred at the Laplace (Gaussian) conditional mean
        û_b − M_bb⁻¹ M_b,−b (u_−b − û_−b) with scale M_bb^{-1/2} (M_bb per level; both computed by
        segment sums over the observations), against the exact conditional density.
        """
        sg = jax.lax.stop_gradient
        L0, Lr, base, zt0, ztr = jax.tree_util.tree_map(sg, self._setup(beta, Ls))
        lay, nu = self.lay, self.nu
        u = self._mode(base, zt0, ztr)
        eta_hat = self._eta(base, zt0, ztr, u)
        w = -self._ell(eta_hat, 2)[2]
        F = bc.factor(lay, *bc.weighted_crossprods(lay, w, zt0, ztr))
        # blocks: (transformed z, level codes, number of levels, k, mode)
        u0, ur = self._split(u)
        blocks = [(zt0, self._refs0, lay.nlev0, lay.k0, u0)]
        for j, (z, refs, kj, nl) in enumerate(zip(ztr, self._rrefs, lay.rest_k, lay.rest_nlev)):
            blocks.append((z, refs, nl, kj, ur[lay.rest_off[j]: lay.rest_off[j] + nl * kj].reshape(nl, kj)))
        chol = []
        for z, refs, nl, kb, _ in blocks:
            Mbb = jax.ops.segment_sum(w[:, None, None] * z[:, :, None] * z[:, None, :], refs, num_segments=nl)
            Lb = bc.chol_small(Mbb + jnp.eye(kb))
            chol.append((Lb, bc.tril_inv_small(Lb)))
        key0, key = jax.random.split(rng_key)
        e = jax.random.normal(key0, (lay.q,))
        x0, xr = bc.backward(lay, F, e[: lay.q0].reshape(lay.nlev0, lay.k0), e[lay.q0:])
        start = u + jnp.concatenate([x0.reshape(-1), xr])
        s0, sr = self._split(start)
        U = [s0] + [sr[lay.rest_off[j]: lay.rest_off[j] + nl * kj].reshape(nl, kj)
                    for j, (kj, nl) in enumerate(zip(lay.rest_k, lay.rest_nlev))]

        def contrib(b, Ub):
            z, refs = blocks[b][0], blocks[b][1]
            return jnp.sum(z * Ub[refs], axis=1)

        def sweep(i, st):
            U, key, acc = st
            U = list(U)
            eta = base + sum(contrib(b, U[b]) for b in range(len(blocks)))
            for b, (z, refs, nl, kb, ub_hat) in enumerate(blocks):
                key, kp, ka = jax.random.split(key, 3)
                own = contrib(b, U[b])
                eta_minus = eta - own
                e_other = eta_minus - eta_hat + contrib(b, ub_hat)  # Σ_{c≠b} z̃_c·(u_c − û_c)
                rhs = jax.ops.segment_sum((w * e_other)[:, None] * z, refs, num_segments=nl)
                Lb, Lbi = chol[b]
                sol = jnp.sum(Lbi * jnp.sum(Lbi * rhs[:, None, :], axis=2)[:, :, None], axis=1)  # M_bb⁻¹ rhs
                mu = ub_hat - sol

                tau_cur = jnp.sum(Lb * (U[b] - mu)[:, :, None], axis=1)  # L_b'(u − μ)
                tau = _t_draws(kp, (nl,), kb)
                prop = mu + jnp.sum(Lbi * tau[:, :, None], axis=1)  # μ + L_b^{-T} τ
                # log target (exact conditional of each level) minus log t₄ proposal, proposed − current
                both = jnp.stack([prop, U[b]])  # (2, nl, k)
                ll = self._ell(eta_minus[:, None] + jnp.sum(z[None] * both[:, refs], axis=2).T, 0)[0]  # (n, 2)
                tgt = jax.ops.segment_sum(ll, refs, num_segments=nl).T - 0.5 * jnp.sum(both * both, axis=2)
                taus = jnp.stack([tau, tau_cur])
                logt = -0.5 * (nu + kb) * jnp.log1p(jnp.sum(taus * taus, axis=2) / nu)
                logr = (tgt[0] - logt[0]) - (tgt[1] - logt[1])
                ok = jnp.log(jax.random.uniform(ka, (nl,))) < logr
                U[b] = jnp.where(ok[:, None], prop, U[b])
                eta = eta_minus + contrib(b, U[b])
                acc = acc + jnp.mean(ok)
            return tuple(U), key, acc

        U, _, acc = jax.lax.fori_loop(0, self.mh_steps, sweep, (tuple(U), key, 0.0))
        ur_new = jnp.concatenate([x.reshape(-1) for x in U[1:]])
        b = self._to_model(*bc.apply_lambda(lay, L0, Lr, U[0], ur_new))
        return b, acc / (self.mh_steps * len(blocks))


_ = SUPPORTED  # re-exported for messages
