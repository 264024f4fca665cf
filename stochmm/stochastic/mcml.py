"""Monte Carlo maximum likelihood for GLMMs: ``Model.fit(method="is")``.

Sung & Geyer (2007): with a fixed set of importance draws u_s from a proposal q,

    L̂(φ) = Π_b (1/S) Σ_s f(y_b, u_bs; φ) φ(u_bs) / q(u_bs),      φ = (θ, β),

is a smooth function of φ (common random numbers: the draws do not change with φ), and its
maximiser converges to the MLE as S grows. Here ``b`` runs over the levels of a single
grouping factor (the integral factorises; the draws are per level) or is one joint block
(crossed factors: draws from the joint proposal of :mod:`stochmm.stochastic.importance`).
The log weights depend on φ only through η = Xβ + ZΛ(θ)u + offset, so the exact gradient is a
weighted average of Σ_i ∂ℓ_i/∂η · ∂η_i/∂φ over the draws (∂η/∂β = x, ∂η/∂θ_j = z_r u_c).

The proposal is the Laplace approximation at the current estimate (t or Gaussian, as in
:func:`~stochmm.stochastic.importance.importance_sample`). The fit runs in rounds: optimise
L̂ with the proposal fixed (L-BFGS-B on the exact gradient), then rebuild the proposal at the
new modes with the *same* standardised base draws, until the estimates move by less than
``tol`` standard errors (normally 2–3 rounds) — so the final weights are centred at the estimate.

Standard errors come from the Hessian of −2 log L̂ (finite differences of the exact gradient).
The **Monte Carlo error of the estimates** is the sandwich of Sung & Geyer: with H the Hessian
of −2 log L̂ and V the MC variance of its gradient at φ̂ (from the per-level self-normalised
weights, group by group), Cov_MC(φ̂) ≈ H⁻¹ V H⁻¹. ``fit.mc_se`` reports its square roots: the
distance the estimates could move with another set of draws.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.optimize as so

from ..builder.families import get_family
from ..deterministic.glmm import GlmmResults
from ..errors import ConvergenceWarning
from .importance import _LOG2PI, ImportanceWarning, _check_draws, _plan, _sobol_sets, _std_draws, importance_sample

__all__ = ["fit_is", "IsResults"]


class IsResults(GlmmResults):
    """Results of Monte Carlo maximum likelihood (``Model.fit(method="is")``): the :class:`GlmmResults`
    vocabulary, plus ``mc_se`` (Monte Carlo SE of every estimate, θ then β), ``mc_se_ratio`` (the same in
    units of the estimates' standard errors), ``loglik_is`` (the importance-sampling log-likelihood at
    the estimates, a :class:`~stochmm.stochastic.importance.LogLik`), ``se_all`` (SEs of θ and β),
    ``vcov_theta``, ``rounds`` (the estimates after each proposal rebuild), ``loglik_start`` (the IS
    log-likelihood at the starting estimates) and ``mcml_failed`` (True when the estimates' IS log-likelihood
    is significantly below the start's: a warning says so)."""

    @property
    def method_title(self) -> str:
        per = "" if getattr(self, "joint", False) else " per level"
        return f"Monte Carlo ML by importance sampling, {getattr(self, 'draws', 0)} draws{per}"

    @property
    def lme4_objective(self) -> float:
        return self.objective

    def summary(self):
        s = super().summary()
        ll = self.loglik_is
        s.text += (f"\nMonte Carlo SE of -2 log L: {ll.deviance_mcse:.3g} (Pareto k-hat {ll.khat:.2f}); "
                   f"largest MC SE of an estimate: {np.nanmax(self.mc_se_ratio.to_numpy()):.3f} SE")
        return s


# =============================================================================================
# fixed draws and the objective
# =============================================================================================
class _Objective:
    """−2 log L̂(φ) with its exact gradient, for draws fixed at a proposal."""

    def __init__(self, eng, U: np.ndarray, logq: np.ndarray, joint: bool, plan) -> None:
        self.eng = eng
        self.joint = joint
        self.plan = plan
        self.U = U  # levels: (nlev, S, k); joint: (q, S)
        model = eng.model
        self.nt = eng.ntheta
        self.p = eng.p
        self.S = U.shape[1]
        if joint:
            self.const_w = -0.5 * np.einsum("qs,qs->s", U, U)[None, :] - 0.5 * eng.q * _LOG2PI - logq
            self.X, self.y, self.wt, self.off = eng.X, eng.y, eng.wt, eng.off
            self.Z = model.Z.tocsr()
            self.theta_cols = []
            for ti, r, c in eng.theta_map:
                t = eng.terms[ti]
                self.theta_cols.append((t.z[:, r], eng.J[:, eng.slot_of[ti][c]]))
        else:
            self.const_w = -0.5 * np.einsum("lsk,lsk->ls", U, U) - 0.5 * eng.k * _LOG2PI - logq
            self.X, self.y, self.wt, self.off = eng.X, eng.y, eng.wt, eng.off
            self.Ur = U[eng.refs]  # n × S × k (engine order)
        self.nblock = self.const_w.shape[0]

    def _eta(self, phi: np.ndarray) -> np.ndarray:
        eng = self.eng
        theta, beta = phi[: self.nt], phi[self.nt :]
        base = self.X @ beta + self.off
        if self.joint:
            ZL = (self.Z @ eng.model.Lambda(theta)).tocsr()
            return base[:, None] + np.asarray(ZL @ self.U)
        A = eng.Z @ eng.T(theta)  # n × k
        return base[:, None] + np.einsum("ik,isk->is", A, self.Ur)

    def _blocksum(self, a: np.ndarray) -> np.ndarray:
        return a.sum(0, keepdims=True) if self.joint else self.eng.ls(a)

    def value_and_grad(self, phi: np.ndarray, per_draw: bool = False):
        eng = self.eng
        eta = self._eta(phi)
        ll, d1 = eng.family.derivs(self.y[:, None], eta, self.wt[:, None], 1)
        lw = self._blocksum(ll) + self.const_w  # nblock × S
        mx = lw.max(axis=1, keepdims=True)
        e = np.exp(lw - mx)
        tot = e.sum(axis=1, keepdims=True)
        wbar = e / tot  # self-normalised weights per block
        val = float(-2.0 * np.sum(np.log(tot[:, 0] / self.S) + mx[:, 0]) - 2.0 * eng.const)
        if not np.isfinite(val):
            return np.inf, np.full(phi.size, np.nan), None
        W = (wbar[0][None, :] if self.joint else wbar[eng.refs]) * d1  # n × S
        Dn = W.sum(1)
        g_beta = self.X.T @ Dn
        g_theta = np.empty(self.nt)
        if self.joint:
            for j, (zr, col) in enumerate(self.theta_cols):
                g_theta[j] = np.sum(zr * np.einsum("is,is->i", W, self.U[col]))
        else:
            for j, (r, c) in enumerate(eng.theta_map):
                g_theta[j] = np.sum(eng.Z[:, r] * np.einsum("is,is->i", W, self.Ur[:, :, c]))
        grad = -2.0 * np.concatenate([g_theta, g_beta])
        extra = None
        if per_draw:  # per-block, per-draw gradients of Σ ℓ (for the MC variance of the gradient)
            extra = (wbar, self._per_draw_grad(phi, d1))
        return val, grad, extra

    def _per_draw_grad(self, phi: np.ndarray, d1: np.ndarray) -> np.ndarray:
        """G (nblock, S, nφ): ∂ log f(y_b, u_bs; φ)/∂φ."""
        eng = self.eng
        cols = []
        if self.joint:
            for zr, col in self.theta_cols:
                cols.append((d1 * zr[:, None] * self.U[col]).sum(0)[None, :])
            for a in range(self.p):
                cols.append((d1 * self.X[:, a][:, None]).sum(0)[None, :])
        else:
            for r, c in eng.theta_map:
                cols.append(eng.ls(d1 * eng.Z[:, r][:, None] * self.Ur[:, :, c]))
            for a in range(self.p):
                cols.append(eng.ls(d1 * self.X[:, a][:, None]))
        return np.stack(cols, axis=2)

    def mc_grad_cov(self, phi: np.ndarray) -> np.ndarray:
        """MC covariance of the gradient of −2 log L̂ at φ: 4 Σ_b Var(Σ_s w̄_bs g_bs), from group sums."""
        _, _, (wbar, G) = self.value_and_grad(phi, per_draw=True)
        gbar = np.einsum("bs,bsf->bf", wbar, G)
        C = wbar[:, :, None] * (G - gbar[:, None, :])  # nblock × S × nφ
        Gr = self.plan.groups
        Cg = C.reshape(C.shape[0], Gr, self.plan.per_group, -1).sum(2)  # nblock × G × nφ
        V = np.einsum("bga,bgc->ac", Cg, Cg) * (Gr / max(Gr - 1, 1))
        return 4.0 * V


def _draws_at(eng, phi: np.ndarray, plan, base: dict, rng, joint: bool):
    """Draws u of the Laplace proposal at φ from the fixed standardised base draws (common random numbers)."""
    nt = eng.ntheta
    st = eng.pirls(phi[:nt], phi[nt:])
    if not joint:
        k = eng.k
        Lc = st.extra["L"]
        R = (1.0 / Lc[:, 0, 0])[:, None, None] if k == 1 else np.transpose(np.linalg.inv(Lc), (0, 2, 1))
        logdetL = np.log(np.diagonal(Lc, axis1=1, axis2=2)).sum(1)
        if "z" not in base:
            base["z"], base["logqz"] = _std_draws(plan, eng.nlev, k, rng, sobol_sets=_sobol_sets(plan, k, rng))
        z = base["z"]
        U = st.u[:, None, :] + np.einsum("lab,lsb->lsa", R, z)
        return U, base["logqz"] + logdetL[:, None]
    import scipy.linalg as sla

    sysu = eng.sys_u
    q0, qr, k0, nlev0 = sysu.q0, sysu.q_rest, sysu.k0, sysu.nlev0
    S = plan.size
    if "zr" not in base:
        if qr:
            zr, lq = _std_draws(plan, 1, qr, rng, sobol_sets=_sobol_sets(plan, qr, rng))
            base["zr"], base["logqr"] = zr[0].T, lq[0]
        else:
            base["zr"], base["logqr"] = np.zeros((0, S)), np.zeros(S)
        base["z0"] = rng.standard_normal((q0, S))
    zr, z0 = base["zr"], base["z0"]
    rhs0 = z0.copy()
    logdet = 0.0
    xr = np.zeros((qr, S))
    if qr:
        Lrr = sysu.Ld[:qr, :qr]
        xr = sla.solve_triangular(Lrr, zr, lower=True, trans="T", check_finite=False)
        rhs0 -= np.asarray((sysu.S if sysu.Sd is None else sysu.Sd).T @ xr)
        logdet += float(np.log(np.diag(Lrr)).sum())
    if k0 == 1:
        x0 = rhs0 / sysu.L0[:, 0, 0][:, None]
    else:
        Linv = np.linalg.inv(sysu.L0)
        x0 = np.einsum("lba,lbm->lam", Linv, rhs0.reshape(nlev0, k0, -1)).reshape(q0, -1)
    logdet += float(np.log(np.diagonal(sysu.L0, axis1=1, axis2=2)).sum())
    U = st.u[:, None] + np.vstack([x0, xr])
    logq = base["logqr"] - 0.5 * q0 * _LOG2PI - 0.5 * np.einsum("qs,qs->s", z0, z0) + logdet
    return U, logq[None, :]


# =============================================================================================
# the fit
# =============================================================================================
def fit_is(model: Any, method: str = "is", *, draws: int = 1000, seed: Any = None, proposal: str = "t",
           df: float = 7.0, qmc: bool | None = None, start: Any = None, rounds: int = 6, tol: float = 0.02,
           eval_draws: int | None = None, progress: bool | None = None, check_derivatives: bool = True,
           **options: Any):
    """fit_is(model, method="is", *, draws=1000, seed=None, proposal="t", df=7.0, qmc=None, start=None, ...) -> IsResults

    Monte Carlo maximum likelihood of a GLMM by importance sampling (see the module docstring).

    Parameters
    ----------
    model : Model
        A binomial or Poisson GLMM (any random-effects structure).
    draws : int
        Importance draws per level (one grouping factor) or in total (crossed factors), fixed
        through the optimisation (common random numbers).
    seed : int or numpy.random.Generator, optional
    proposal, df, qmc
        As in :func:`~stochmm.stochastic.importance.importance_sample`.
    start : results object, optional
        Starting fit (default: the Laplace fit of ``model``).
    rounds : int
        Largest number of proposal rebuilds.
    tol : float
        Stop when no estimate moves by more than ``tol`` standard errors between rounds (or when the
        moves stop shrinking: the Monte Carlo noise floor, with a warning).
    eval_draws : int, optional
        Draws for the final importance-sampling log-likelihood at the estimates (independent
        of the fitting draws; default ``max(10 * draws, 10000)`` per level, or ``draws`` outer joint draws).
    progress : bool, optional
        Progress bar over rounds.

    Returns
    -------
    IsResults
        The :class:`~stochmm.deterministic.glmm.GlmmResults` vocabulary with ``method="IS"``;
        ``objective`` is −2 × the importance-sampling log-likelihood at the estimates
        (``loglik_is`` carries its MC SE and k̂), ``mc_se`` the Monte Carlo SE of each estimate.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> fit = m.fit(method="is", draws=500, seed=1)
    >>> fit.method, round(float(fit.theta[0]), 1)
    ('IS', 0.6)
    """
    from ..deterministic.glmm import fit_glmm
    from ..deterministic.pirls import BlockedEngine, make_engine

    t_start = time.perf_counter()
    if model.family_name == "gaussian":
        raise ValueError("method='is' is for GLMMs; a linear mixed model's likelihood is exact: use 'REML' or 'ML'")
    if options:
        raise TypeError(f"unexpected option(s) for method='is': {', '.join(sorted(options))}")
    draws = _check_draws(draws)
    if proposal not in ("t", "normal"):
        raise ValueError(f"proposal must be 't' or 'normal', not {proposal!r}")
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    rng = np.random.default_rng(seed)
    fam = get_family(model.family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit0 = start if start is not None else fit_glmm(model, method="laplace")
    if fit0.model is not model and list(fit0.model.theta_names) != list(model.theta_names):
        raise ValueError("start is a fit of a different model")
    eng = make_engine(model, fam, hessian="observed")
    joint = isinstance(eng, BlockedEngine)
    if qmc is None:
        qmc = not joint
    plan = _plan(draws, proposal, df, qmc, False, 16)
    nt, p = eng.ntheta, eng.p
    lower = np.concatenate([np.asarray(model.lower, dtype=float), np.full(p, -np.inf)])
    phi = np.concatenate([fit0.theta, fit0._beta])
    scale = _scales(fit0, nt)
    base: dict = {}
    history = [phi.copy()]
    nfev = 0
    from .importance import _progress

    bar = _progress(int(rounds), progress, "Monte Carlo ML")
    converged = False
    moves: list[float] = []
    status = "MAXROUNDS"
    for _ in range(int(rounds)):
        U, logq = _draws_at(eng, phi, plan, base, rng, joint)
        obj = _Objective(eng, U, logq, joint, plan)
        x0 = np.zeros(phi.size)
        phi_ref = phi.copy()

        def fun(x, obj=obj, phi_ref=phi_ref):
            f, g, _ = obj.value_and_grad(phi_ref + x * scale)
            if not np.isfinite(f):
                return 1e300, np.zeros_like(x)
            return f, g * scale

        bounds = [((lo - r) / s if np.isfinite(lo) else None, None) for lo, r, s in zip(lower, phi_ref, scale)]
        res = so.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 500, "ftol": 1e-13, "gtol": 1e-7})
        nfev += res.nfev
        phi = phi_ref + res.x * scale
        history.append(phi.copy())
        bar.update(1)
        moves.append(float(np.max(np.abs(res.x))))
        if moves[-1] < tol:
            converged = True
            break
        if len(moves) >= 3 and moves[-1] >= moves[-2]:  # moves stopped shrinking: the Monte Carlo noise floor
            status = "NOISE FLOOR"
            break
    bar.close()
    # final proposal at φ̂ (same base draws): Hessian, SEs and the MC error of the estimates
    U, logq = _draws_at(eng, phi, plan, base, rng, joint)
    obj = _Objective(eng, U, logq, joint, plan)
    f_hat, g_hat, _ = obj.value_and_grad(phi)
    H = _fd_hessian(obj, phi, lower)
    free = ~(np.isfinite(lower) & (phi - lower < 1e-6))
    fi = np.flatnonzero(free)
    Hf = H[np.ix_(fi, fi)]
    cov_full = np.full((phi.size, phi.size), np.nan)
    mc_cov = np.full((phi.size, phi.size), np.nan)
    try:
        Hinv = np.linalg.inv(Hf)
        cov_full[np.ix_(fi, fi)] = 2.0 * Hinv
        V = obj.mc_grad_cov(phi)[np.ix_(fi, fi)]
        mc_cov[np.ix_(fi, fi)] = Hinv @ V @ Hinv
    except np.linalg.LinAlgError:
        pass
    vcov = cov_full[nt:, nt:]
    if not np.all(np.isfinite(vcov)):
        vcov = eng.rx_vcov(phi[:nt], phi[nt:])
    # the log-likelihood at the estimates from independent draws
    ev = eval_draws if eval_draws is not None else (draws if joint else max(10 * draws, 10_000))
    ll_is = importance_sample(model, phi[nt:], phi[:nt], None, draws=int(ev), seed=rng, proposal=proposal, df=df,
                              family=fam, warn=True)
    # guard: the MC ML estimates must not have a lower (accurately estimated) likelihood than the start
    ll_start = importance_sample(model, history[0][nt:], history[0][:nt], None, draws=int(ev), seed=rng,
                                 proposal=proposal, df=df, family=fam, warn=False)
    st = eng.pirls(phi[:nt], phi[nt:])
    b = eng.b_from_u(phi[:nt], st.u)
    from ..deterministic.optsummary import OptSummary

    optsum = OptSummary(optimizer="L-BFGS-B on the importance-sampling likelihood (exact gradient)", x0=history[0],
                        lower=lower, upper=np.full(phi.size, np.inf), xfinal=phi.copy(), fmin=float(f_hat),
                        feval=int(nfev), returnvalue="CONVERGED" if converged else status,
                        elapsed=time.perf_counter() - t_start, ftol_rel=0.0, ftol_abs=0.0, xtol_abs=tol,
                        names=list(model.theta_names) + list(model.xnames), fitlog=[])
    theta, beta = phi[:nt].copy(), phi[nt:].copy()

    def b_condvar():
        return eng.cond_cov_b(theta, beta)

    res = IsResults(model, "IS", -2.0 * float(ll_is), beta, vcov, theta, 1.0, b, b_condvar, optsum, loglik=float(ll_is),
              df=p + nt, dispersion=False, family=fam, nagq=1, rule=None, vcov_source="hessian")
    res.engine = eng
    res.draws = plan.size
    res.joint = joint
    res.loglik_is = ll_is
    res.rounds = pd.DataFrame(history, columns=optsum.names).rename_axis("round")
    names = optsum.names
    with np.errstate(invalid="ignore"):  # NaN where the Hessian of the fixed-draw likelihood is not definite
        res.mc_se = pd.Series(np.sqrt(np.diag(mc_cov)), index=names, name="mc_se")
        se_all = np.sqrt(np.diag(cov_full))
    res.se_all = pd.Series(se_all, index=names, name="se")
    res.mc_se_ratio = pd.Series(np.sqrt(np.diag(mc_cov)) / se_all, index=names, name="mc_se/se")
    res.vcov_theta = pd.DataFrame(cov_full[:nt, :nt], index=model.theta_names, columns=model.theta_names)
    res.derivs = {"free": free, "gradient": g_hat[fi], "Hessian": Hf}
    res.elapsed = time.perf_counter() - t_start
    res.timing = {"total_s": res.elapsed, "rounds": len(history) - 1, "evaluations": nfev}
    res.moves = moves
    if not converged:
        msg = (f"Monte Carlo ML: the estimates still moved by {moves[-1]:.3g} SE in the last proposal rebuild "
               f"(tolerance {tol}; {status.lower()}): use more draws")
        res.warnings.append(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    res.loglik_start = ll_start
    gap = float(ll_is) - float(ll_start)
    res.mcml_failed = bool(gap < -2.0 * np.hypot(ll_is.mcse, ll_start.mcse))
    if res.mcml_failed:
        msg = (f"Monte Carlo ML failed: the importance-sampling log-likelihood at its estimates is {-gap:.3f} "
               f"(± {np.hypot(ll_is.mcse, ll_start.mcse):.3f}) BELOW that at the starting estimates: with "
               f"{draws} draws the fixed-draw likelihood is dominated by Monte Carlo noise (effective sample size "
               "of the weights too small); use many more draws")
        res.warnings.append(msg)
        warnings.warn(msg, ImportanceWarning, stacklevel=3)
    ratio = np.nanmax(res.mc_se_ratio.to_numpy()) if np.any(np.isfinite(res.mc_se_ratio)) else np.nan
    if np.isfinite(ratio) and ratio > 0.25:
        msg = (f"Monte Carlo error of the estimates is {ratio:.2f} standard errors "
               f"({res.mc_se_ratio.idxmax()}): use more draws")
        res.warnings.append(msg)
        warnings.warn(msg, ImportanceWarning, stacklevel=3)
    return res


def _scales(fit0, nt: int) -> np.ndarray:
    """Optimisation scale per parameter: θ by its SE where the Laplace Hessian has one, β by its SE."""
    se_b = np.sqrt(np.diag(fit0._vcov)) if fit0._vcov.size else np.zeros(0)
    se_t = np.full(nt, 0.1)
    d = getattr(fit0, "derivs", None)
    if d is not None and d.get("Hessian") is not None and np.size(d["Hessian"]):
        try:
            C = 2.0 * np.linalg.inv(d["Hessian"])
            fi = np.flatnonzero(d["free"])
            for a, i in enumerate(fi):
                if i < nt and C[a, a] > 0:
                    se_t[i] = np.sqrt(C[a, a])
        except np.linalg.LinAlgError:
            pass
    out = np.concatenate([se_t, se_b])
    return np.where(np.isfinite(out) & (out > 0), out, 0.1)


def _fd_hessian(obj: _Objective, phi: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Hessian of −2 log L̂ (fixed draws) by central differences of the exact gradient."""
    n = phi.size
    H = np.zeros((n, n))
    for i in range(n):
        h = 1e-4 * max(1.0, abs(phi[i]))
        e = np.zeros(n)
        e[i] = h
        if np.isfinite(lower[i]) and phi[i] - h < lower[i]:
            gp, g0 = obj.value_and_grad(phi + e)[1], obj.value_and_grad(phi)[1]
            H[:, i] = (gp - g0) / h
        else:
            H[:, i] = (obj.value_and_grad(phi + e)[1] - obj.value_and_grad(phi - e)[1]) / (2 * h)
    return 0.5 * (H + H.T)
