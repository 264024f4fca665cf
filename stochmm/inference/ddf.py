"""Denominator degrees of freedom for linear mixed models: Satterthwaite, Kenward–Roger, between–within.

What lmerTest (Kuznetsova, Brockhoff & Christensen 2017, JSS 82(13)) and pbkrtest
(Halekoh & Højsgaard 2014, JSS 59(9)) compute, with exact derivatives:

* **Satterthwaite** (lmerTest): the variance parameters are ``varpar = (θ, σ)``;
  ``A = 2 H⁻¹`` with H the Hessian of the deviance −2ℓ(θ, σ) (REML or ML, β
  profiled out) at the optimum, and ``J_i = ∂ Var(β̂)/∂varpar_i``. For a contrast
  L, ``df = 2 (L'CL)² / (g'Ag)``, ``g_i = L'J_iL``. lmerTest differentiates by
  numDeriv (Richardson extrapolation); here H and J are exact (JAX automatic
  differentiation of the deviance and of σ²(X'V⁻¹X)⁻¹ written in the q-dimensional
  random-effects space). Multi-row contrasts (F tests) follow lmerTest's
  ``contestMD``: eigen-contrasts of L C L', one df each, combined as
  ``2E/(E − q)``, ``E = Σ ν/(ν − 2)``.
* **Kenward–Roger** (pbkrtest's ``vcovAdj`` / ``Lb_ddf`` / ``KRmodcomp``): the
  covariance V = Σ_r γ_r G_r is linear in the variance components (the elements
  of each term's covariance matrix and σ²); the adjusted covariance Φ_A = Φ + 2Λ
  and the df and F scaling of Kenward & Roger (1997). The matrices are formed on
  the n × n scale, as pbkrtest does, so this path is for n up to a few thousand.
* **Between–within** (SAS's DDFM=BW, nlme's rule for nested designs): a fixed
  effect that is constant within the levels of the grouping factor(s) gets the
  between-group residual df, others the within-group residual df.

Type III contrasts are lmerTest's (treatment-coded contrasts orthogonalised to the
terms that contain them, mapped to the model's coding); Type I contrasts are rows
of the Doolittle factor of X'X.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg as sla
import scipy.sparse as sp
from scipy import stats

from ..errors import DesignError

__all__ = ["DDF_METHODS", "check_ddf", "ddf_coef_table", "ddf_anova", "vcov_kr", "contrasts"]

#: accepted spellings -> canonical method name
DDF_METHODS = {
    "satterthwaite": "satterthwaite", "kenward-roger": "kenward-roger", "kenward_roger": "kenward-roger",
    "kr": "kenward-roger", "between-within": "between-within", "between_within": "between-within",
    "bw": "between-within",
}

_KR_MAX_Q = 6000


def check_ddf(fit: Any, ddf: Any) -> str:
    """check_ddf(fit, ddf) -> str

    Validate a ``ddf=`` argument for ``fit``: the canonical method name, or a clear
    error (unknown name with a suggestion; a GLMM, whose df are not defined).
    """
    if not isinstance(ddf, str):
        raise TypeError(f"ddf must be a string ('satterthwaite', 'kenward-roger', 'between-within') or None, "
                        f"not {type(ddf).__name__}")
    key = ddf.strip().lower().replace(" ", "-")
    if key not in DDF_METHODS:
        import difflib

        near = difflib.get_close_matches(key, list(DDF_METHODS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown ddf method {ddf!r}.{hint} Choose 'satterthwaite', 'kenward-roger' or "
                         "'between-within' (or None for Wald z/t without df)")
    if not getattr(fit, "_dispersion", True) or getattr(fit.model, "family_name", "gaussian") != "gaussian":
        raise ValueError("denominator degrees of freedom are not defined for a generalized linear mixed model "
                         "(its tests are asymptotic z tests); for a small-sample test of nested GLMMs use "
                         "sm.anova(fit0, fit1, method='pboot') (parametric bootstrap)")
    method = DDF_METHODS[key]
    if method == "kenward-roger" and not getattr(fit, "reml", False):
        raise ValueError("Kenward-Roger's method is defined for REML fits (as in pbkrtest/lmerTest); refit with "
                         "reml=True or use ddf='satterthwaite'")
    return method


# =============================================================================================
# Satterthwaite: exact derivatives of the deviance and of Var(β̂) in varpar = (θ, σ)
# =============================================================================================
def _cross_products(model: Any, beta: np.ndarray) -> dict:
    """Dense q-space cross-products of the (weighted) model; y centred at Xβ̂ (exact cancellation)."""
    w = np.asarray(model.prior_weights, dtype=float)
    sw = np.sqrt(w)
    Z = sp.csc_matrix(model.Z)
    Zw = sp.diags(sw) @ Z
    Xw = model.X * sw[:, None]
    yc = (model.y - model.offset - model.X @ beta) * sw
    return {"ZtZ": (Zw.T @ Zw).toarray(), "ZtX": np.asarray(Zw.T @ Xw), "Zty": np.asarray(Zw.T @ yc).ravel(),
            "XtX": Xw.T @ Xw, "Xty": Xw.T @ yc, "yty": float(yc @ yc)}


def _lambda_index(model: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, theta index) of the nonzeros of Λ(θ) (q × q)."""
    rows, cols, idx = [], [], []
    for t, zs, ts in zip(model.terms, model.z_slices, model.theta_slices):
        lev = np.arange(t.nlev) * t.k + zs.start
        for m, (r, c) in enumerate(t.tril):
            rows.append(lev + r)
            cols.append(lev + c)
            idx.append(np.full(t.nlev, ts.start + m))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(idx)


def _satterthwaite_parts(fit: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, J, H) for Satterthwaite's df, cached on the fit (see :func:`_satterthwaite_compute`)."""
    cache = fit.__dict__.setdefault("_inference_cache", {})
    if "satterthwaite" not in cache:
        with _threads(fit.model):
            cache["satterthwaite"] = _satterthwaite_compute(fit)
    return cache["satterthwaite"]


def _satterthwaite_compute(fit: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, J): vcov of varpar = (θ, σ) (2 H⁻¹, lmerTest's) and ∂Var(β̂)/∂varpar (p, p, nvarpar).

    Exact first and second derivatives in the random-effects space. With
    V₀ = I + ZΛΛ'Z' (relative to σ²), Λ = Σ_i θ_i E_i, D_i = E_iΛ' + ΛE_i',
    K = Z'V₀⁻¹Z, B = Z'V₀⁻¹X, C = X'V₀⁻¹X, K_P = K − BC⁻¹B' (= Z'PZ) and
    a = Z'Py (P the REML projection):

    * ∂ log|V₀| = tr(D_iK), ∂² = tr(D_ijK) − tr(D_iKD_jK) (REML adds log|C|:
      replace K by K_P), D_ij = E_iE_j' + E_jE_i';
    * r² = y'Py: ∂ = −a'D_ia, ∂² = 2a'D_iK_PD_ja − a'D_ija;
    * ∂Var(β̂)/∂θ_i = σ²C⁻¹B'D_iBC⁻¹, ∂Var(β̂)/∂σ = 2σC⁻¹.
    """
    model = fit.model
    cp = _cross_products(model, fit._beta)
    rows, cols, idx = _lambda_index(model)
    q, p, n = model.q, model.p, model.n
    theta, sigma = fit.theta, fit.sigma
    nt = theta.size
    E = [sp.csr_matrix((np.ones(int(np.sum(idx == i))), (rows[idx == i], cols[idx == i])), shape=(q, q))
         for i in range(nt)]
    Lam = sp.csr_matrix((theta[idx], (rows, cols)), shape=(q, q))
    A = cp["ZtZ"]
    LtA = np.asarray(Lam.T @ A)  # Λ'A (q × q)
    M = np.asarray(LtA @ Lam) + np.eye(q)
    cf = sla.cho_factor(M, lower=True)
    # V₀⁻¹ pieces: K = A − AΛM⁻¹Λ'A, B = Z'X − AΛM⁻¹Λ'Z'X, ...
    LtZX = np.asarray(Lam.T @ cp["ZtX"])
    LtZy = np.asarray(Lam.T @ cp["Zty"]).ravel()
    Minv_LtA = sla.cho_solve(cf, LtA)
    Minv_LtZX = sla.cho_solve(cf, LtZX)
    Minv_LtZy = sla.cho_solve(cf, LtZy)
    K = A - LtA.T @ Minv_LtA
    B = cp["ZtX"] - LtA.T @ Minv_LtZX
    C = cp["XtX"] - LtZX.T @ Minv_LtZX
    by = cp["Zty"] - LtA.T @ Minv_LtZy
    cy = cp["Xty"] - LtZX.T @ Minv_LtZy
    Cinv = np.linalg.inv(C)
    a = by - B @ (Cinv @ cy)
    KP = K - B @ Cinv @ B.T
    r2 = float(cp["yty"] - LtZy @ Minv_LtZy - cy @ Cinv @ cy)
    Kd = KP if fit.reml else K
    m = n - p if fit.reml else n
    # D_i as sparse, D_i K_d dense
    D = [E[i] @ Lam.T + Lam @ E[i].T for i in range(nt)]
    DK = [np.asarray(Di @ Kd) for Di in D]
    Da = [np.asarray(Di @ a).ravel() for Di in D]
    Eta = [np.asarray(E[i].T @ a).ravel() for i in range(nt)]
    r2_1 = np.array([-(a @ Da[i]) for i in range(nt)])
    H = np.empty((nt + 1, nt + 1))
    for i in range(nt):
        for j in range(i, nt):
            Dij = E[i] @ E[j].T + E[j] @ E[i].T
            ld = float(np.sum(Dij.multiply(Kd.T))) - float(np.sum(DK[i] * DK[j].T))
            rr = 2.0 * float(Da[i] @ KP @ Da[j]) - 2.0 * float(Eta[i] @ Eta[j])
            H[i, j] = H[j, i] = ld + rr / sigma**2
        H[i, nt] = H[nt, i] = -2.0 * r2_1[i] / sigma**3
    H[nt, nt] = 6.0 * r2 / sigma**4 - 2.0 * m / sigma**2
    J = np.empty((p, p, nt + 1))
    CB = Cinv @ B.T  # p × q
    for i in range(nt):
        J[:, :, i] = sigma**2 * np.asarray(CB @ (D[i] @ CB.T))
    J[:, :, nt] = 2.0 * sigma * Cinv
    # the near-zero test runs on the Hessian in (θ, σ/σ̂), which is free of the units of y (H's σ row
    # scales as 1/σ); for a nonsingular H the result is the same 2 H⁻¹
    dsc = np.ones(nt + 1)
    dsc[nt] = sigma
    evals, evecs = np.linalg.eigh(H * np.outer(dsc, dsc))
    tol = 1e-8
    if np.any(evals < -tol):
        warnings.warn(f"the Hessian of the deviance in (θ, σ/σ̂) has {int((evals < -tol).sum())} negative "
                      f"eigenvalue(s) ({', '.join(f'{v:.1e}' for v in evals[evals < -tol])}): the fit may not "
                      "have converged; Satterthwaite df use its positive part", UserWarning, stacklevel=4)
    zero = np.abs(evals) <= tol
    if zero.any():
        warnings.warn(f"the Hessian of the deviance in (θ, σ/σ̂) has {int(zero.sum())} eigenvalue(s) close to zero "
                      f"({', '.join(f'{v:.1e}' for v in evals[zero])}), e.g. a variance on its boundary; "
                      "Satterthwaite df use its positive part", UserWarning, stacklevel=4)
    pos = evals > tol
    Avp = 2.0 * (evecs[:, pos] / evals[pos]) @ evecs[:, pos].T
    Avp = Avp * np.outer(dsc, dsc)
    return Avp, J, H


def _satt_df_1d(fit: Any, l: np.ndarray) -> tuple[float, float]:
    A, J, _ = _satterthwaite_parts(fit)
    var = float(l @ fit._vcov @ l)
    g = np.einsum("a,abk,b->k", l, J, l)
    return var, float(2.0 * var**2 / (g @ A @ g))


# =============================================================================================
# Kenward–Roger (pbkrtest's vcovAdj, Lb_ddf, KRmodcomp)
# =============================================================================================
def _threads(model: Any):
    """One BLAS thread for small random-effects spaces (thread hand-off costs more than the work)."""
    from ..deterministic.pirls import blas_threads

    return blas_threads(1 if model.q + model.p <= 600 else None)


def _kr_parts(fit: Any) -> dict:
    cache = fit.__dict__.setdefault("_inference_cache", {})
    if "kr" not in cache:
        with _threads(fit.model):
            cache["kr"] = _kr_compute(fit)
    return cache["kr"]


def _kr_compute(fit: Any) -> dict:
    """pbkrtest's ``vcovAdj`` in the random-effects space (no n × n matrix).

    With Z̃ = W½Z, X̃ = W½X, V̄ = I + Z̃ΛΛ'Z̃' (Σ = σ²W^-½V̄W^-½), the covariance components
    G_r = Z̃D_rZ̃' (D_r = I ⊗ (e_ae_b' + e_be_a') on the term's block) and G_σ² = I,
    everything pbkrtest forms from Σ⁻¹ is a q × q or p × p product of A = Z̃'Z̃,
    F = Z̃'X̃ and R = ΛM⁻¹Λ' (M = Λ'AΛ + I): V̄⁻¹ = I − Z̃RZ̃'.
    """
    model = fit.model
    n, p, q = model.n, model.p, model.q
    if q > _KR_MAX_Q:
        raise DesignError(f"Kenward-Roger here forms q x q matrices; q = {q} > {_KR_MAX_Q}. "
                          "Use ddf='satterthwaite'")
    sw = np.sqrt(model.prior_weights)
    Zt = sp.diags(sw) @ sp.csc_matrix(model.Z)
    Xt = model.X * sw[:, None]
    A = (Zt.T @ Zt).toarray()
    F = np.asarray(Zt.T @ Xt)
    XX = Xt.T @ Xt
    s2 = fit.sigma**2
    rows, cols, idx = _lambda_index(model)
    Lam = sp.csr_matrix((fit.theta[idx], (rows, cols)), shape=(q, q)).toarray()
    M = Lam.T @ A @ Lam + np.eye(q)
    cf = sla.cho_factor(M, lower=True)
    R = Lam @ sla.cho_solve(cf, Lam.T)
    I_AR = np.eye(q) - A @ R
    K1 = A - A @ R @ A                      # Z̃'V̄⁻¹Z̃
    K2 = I_AR @ A @ I_AR.T                   # Z̃'V̄⁻²Z̃
    B1 = I_AR @ F                            # Z̃'V̄⁻¹X̃
    B2 = I_AR @ B1                           # Z̃'V̄⁻²X̃
    FRF = F.T @ R @ F
    C2 = XX - 2 * FRF + F.T @ R @ A @ R @ F  # X̃'V̄⁻²X̃
    C3 = C2 - B1.T @ R @ B1                  # X̃'V̄⁻³X̃  (Y = V̄⁻¹X̃: Y'Y − (Z̃'Y)'R(Z̃'Y))
    RA = R @ A
    trV2 = n - 2 * np.trace(RA) + np.sum(RA * RA.T)
    # covariance components: per term, the lower-triangle elements of its covariance, then σ²
    Ds = []
    for t, zs in zip(model.terms, model.z_slices):
        for a_, b_ in t.tril:
            E = np.zeros((t.k, t.k))
            E[a_, b_] = E[b_, a_] = 1.0
            D = sp.lil_matrix((q, q))
            D[zs, zs] = sp.kron(sp.identity(t.nlev), sp.csr_matrix(E))
            Ds.append(D.tocsr())
    m = len(Ds) + 1
    DB = [np.asarray(D @ B1) for D in Ds]
    DK = [np.asarray(D @ K1) for D in Ds]
    P = [-(B1.T @ d) / s2**2 for d in DB] + [-C2 / s2**2]
    P = [(x + x.T) / 2 for x in P]
    Q: dict[tuple[int, int], np.ndarray] = {}
    Kt = np.empty((m, m))
    for r in range(m - 1):
        for s_ in range(r, m - 1):
            Q[r, s_] = DB[r].T @ K1 @ DB[s_] / s2**3
            Kt[r, s_] = Kt[s_, r] = float(np.sum(DK[r] * DK[s_].T)) / s2**2
        Q[r, m - 1] = DB[r].T @ B2 / s2**3
        Kt[r, m - 1] = Kt[m - 1, r] = float(np.sum(Ds[r].multiply(K2.T))) / s2**2
    Q[m - 1, m - 1] = C3 / s2**3
    Kt[m - 1, m - 1] = trV2 / s2**2
    Phi = fit._vcov
    IE2 = np.empty((m, m))
    for r in range(m):
        for s_ in range(r, m):
            IE2[r, s_] = IE2[s_, r] = Kt[r, s_] - 2 * np.sum(Phi * Q[r, s_]) + np.sum((Phi @ P[r]) * (P[s_] @ Phi))
    condi = float(np.min(np.abs(np.linalg.eigvalsh(IE2))))
    W = 2 * (np.linalg.inv(IE2) if condi > 1e-10 else np.linalg.pinv(IE2))
    W = (W + W.T) / 2
    U = np.zeros((p, p))
    for r in range(m - 1):
        for s_ in range(r + 1, m):
            U += W[r, s_] * (Q[r, s_] - P[r] @ Phi @ P[s_])
    U = U + U.T
    for r in range(m):
        U += W[r, r] * (Q[r, r] - P[r] @ Phi @ P[r])
    PhiA = Phi + 2 * Phi @ U @ Phi
    return {"PhiA": (PhiA + PhiA.T) / 2, "P": P, "W": W, "Phi": Phi}


def _kr_adjust(fit: Any, Lm: np.ndarray) -> dict:
    """pbkrtest's ``.KR_adjust``: df, F scaling and the unscaled Wald F of H0: Lβ = 0."""
    kr = _kr_parts(fit)
    Phi, P, W = kr["Phi"], kr["P"], kr["W"]
    Lm = np.atleast_2d(Lm)
    Theta = Lm.T @ np.linalg.solve(Lm @ Phi @ Lm.T, Lm)
    TP = Theta @ Phi
    m = len(P)
    A1 = A2 = 0.0
    us = [TP @ P[r] @ Phi for r in range(m)]
    for r in range(m):
        for s in range(r, m):
            e = 1.0 if r == s else 2.0
            A1 += e * W[r, s] * np.trace(us[r]) * np.trace(us[s])
            A2 += e * W[r, s] * np.sum(us[r] * us[s].T)
    q = int(np.linalg.matrix_rank(Lm))
    B = (A1 + 6 * A2) / (2 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    den = 3 * q + 2 * (1 - g)
    c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
    V0 = 1 + c1 * B
    V0 = 0.0 if abs(V0) < 1e-10 else V0
    V1, V2 = 1 - c2 * B, 1 - c3 * B
    ratio = (1 - A2 / q) / V1 if V1 != 0 else 0.0
    rho = ratio**2 * V0 / V2 / q
    df2 = 4 + (q + 2) / (q * rho - 1)
    scaling = 1.0 if abs(df2 - 4) < 1e-2 else df2 * (1 - A2 / q) / (df2 - 2)
    b = Lm @ fit._beta
    wald = float(b @ np.linalg.solve(Lm @ kr["PhiA"] @ Lm.T, b))
    return {"ddf": float(df2), "scaling": float(scaling), "FU": wald / q, "ndf": q}


def vcov_kr(fit: Any) -> pd.DataFrame:
    """vcov_kr(fit) -> DataFrame

    The Kenward–Roger adjusted covariance matrix of the fixed effects (pbkrtest's
    ``vcovAdj``) of a REML linear mixed model fit.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> round(float(vcov_kr(fit).iloc[0, 0]), 4)
    375.7167
    """
    check_ddf(fit, "kenward-roger")
    names = fit.model.xnames
    return pd.DataFrame(_kr_parts(fit)["PhiA"], index=names, columns=names)


# =============================================================================================
# between-within
# =============================================================================================
def _between_within_df(fit: Any) -> np.ndarray:
    """Per-coefficient df by the between–within rule (nlme's ``getFixDF``, SAS DDFM=BW).

    Grouping factors are ordered from the coarsest (fewest levels) to the finest;
    a coefficient whose column is constant within the levels of a grouping factor
    belongs to the coarsest such level, any other to the residual level. The df of
    level j is ``N_j − N_{j−1} − p_j`` (N_j levels, N_0 = 1, N_{J+1} = n, p_j
    coefficients other than the intercept at that level); the intercept gets the
    residual level's df, as nlme prints it.
    """
    model = fit.model
    X = model.X
    groups: dict[str, np.ndarray] = {}
    for t in model.terms:
        groups.setdefault(t.group, np.asarray(t.refs))
    order = sorted(groups, key=lambda g: int(groups[g].max()) + 1)
    J = len(order)
    level = np.full(model.p, J + 1)
    is_icpt = np.array([nm == "(Intercept)" for nm in model.xnames])
    for j, col in enumerate(X.T):
        if is_icpt[j]:
            continue
        for gi, g in enumerate(order):
            refs = groups[g]
            mn = np.full(refs.max() + 1, np.inf)
            mx = np.full(refs.max() + 1, -np.inf)
            np.minimum.at(mn, refs, col)
            np.maximum.at(mx, refs, col)
            # constant within every level, to rounding of the column's own size (no absolute
            # tolerance: a column's units must not decide between-group vs within-group)
            if np.all(mx - mn <= 64 * np.finfo(float).eps * np.abs(col).max()):
                level[j] = gi + 1
                break
    N = [1] + [int(groups[g].max()) + 1 for g in order] + [model.n]
    dfl = {lv: N[lv] - N[lv - 1] - int(np.sum((level == lv) & ~is_icpt)) for lv in range(1, J + 2)}
    return np.array([float(dfl[int(lv)]) for lv in level])


# =============================================================================================
# coefficient tables and F tests
# =============================================================================================
def ddf_coef_table(fit: Any, ddf: str) -> pd.DataFrame:
    """ddf_coef_table(fit, ddf) -> DataFrame

    lmerTest's coefficient table: Estimate, Std. Error, df, t value, Pr(>|t|), with
    Satterthwaite, Kenward–Roger (standard errors from the adjusted covariance) or
    between–within df.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> ddf_coef_table(fit, "satterthwaite")["df"].round(3).tolist()
    [17.0, 17.0]
    """
    method = check_ddf(fit, ddf)
    p = fit.model.p
    est = fit._beta
    if method == "satterthwaite":
        res = [_satt_df_1d(fit, np.eye(p)[j]) for j in range(p)]
        se = np.sqrt([r[0] for r in res])
        df = np.array([r[1] for r in res])
    elif method == "kenward-roger":
        kr = _kr_parts(fit)
        se = np.sqrt(np.diag(kr["PhiA"]))
        df = np.array([_kr_adjust(fit, np.eye(p)[j])["ddf"] for j in range(p)])
    else:
        se = np.sqrt(np.diag(fit._vcov))
        df = _between_within_df(fit)
    t = est / se
    out = pd.DataFrame({"Estimate": est, "Std. Error": se, "df": df, "t value": t,
                        "Pr(>|t|)": 2 * stats.t.sf(np.abs(t), df)}, index=fit.model.xnames)
    out.attrs["ddf"] = method
    return out


def _contest(fit: Any, Lm: np.ndarray, method: str) -> tuple[float, float, float, float]:
    """(F, NumDF, DenDF, p) for H0: Lβ = 0, as lmerTest's contestMD."""
    Lm = np.atleast_2d(np.asarray(Lm, dtype=float))
    if method == "kenward-roger":
        a = _kr_adjust(fit, Lm)
        F = a["FU"] * a["scaling"]
        return F, a["ndf"], a["ddf"], float(stats.f.sf(F, a["ndf"], a["ddf"]))
    C = fit._vcov
    if method == "between-within":
        df_coef = _between_within_df(fit)
        b = Lm @ fit._beta
        q = int(np.linalg.matrix_rank(Lm))
        F = float(b @ np.linalg.pinv(Lm @ C @ Lm.T) @ b) / q
        used = np.flatnonzero(np.any(np.abs(Lm) > 1e-10, axis=0))
        den = float(np.min(df_coef[used]))
        return F, q, den, float(stats.f.sf(F, q, den))
    d, V = np.linalg.eigh(Lm @ C @ Lm.T)
    order = np.argsort(d)[::-1]
    d, V = d[order], V[:, order]
    pos = d > max(np.sqrt(np.finfo(float).eps) * d[0], 0)
    q = int(pos.sum())
    PtL = V[:, :q].T @ Lm
    if q == 1:
        var, nu = _satt_df_1d(fit, PtL[0])
        F = float((PtL[0] @ fit._beta) ** 2 / var)
        return F, 1, nu, float(stats.f.sf(F, 1, nu))
    t2 = (PtL @ fit._beta) ** 2 / d[:q]
    F = float(t2.sum() / q)
    nu = np.array([_satt_df_1d(fit, PtL[m])[1] for m in range(q)])
    if np.all(np.abs(np.diff(nu)) < 1e-8):
        den = float(nu.mean())
    elif np.any(nu <= 2):
        den = 2.0
    else:
        E = float(np.sum(nu / (nu - 2)))
        den = 2 * E / (E - q)
    return F, q, den, float(stats.f.sf(F, q, den))


def ddf_anova(fit: Any, ddf: str = "satterthwaite", type: int | str = 3) -> pd.DataFrame:
    """ddf_anova(fit, ddf="satterthwaite", type=3) -> DataFrame

    F tests of the fixed-effects terms with numerator and denominator df, as
    lmerTest's ``anova(fit, type=, ddf=)``: columns Sum Sq, Mean Sq, NumDF, DenDF,
    F value, Pr(>F); Type III (lmerTest's default) or Type I (sequential).

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> round(float(ddf_anova(fit)["F value"].iloc[0]), 3)
    45.853
    """
    method = check_ddf(fit, ddf)
    rows = {}
    for term, Lm in contrasts(fit, type).items():
        F, q, den, pval = _contest(fit, Lm, method)
        ms = (_kr_adjust(fit, Lm)["FU"] if method == "kenward-roger" else F) * fit.sigma**2
        rows[term] = {"Sum Sq": ms * q, "Mean Sq": ms, "NumDF": q, "DenDF": den, "F value": F, "Pr(>F)": pval}
    out = pd.DataFrame.from_dict(rows, orient="index",
                                 columns=["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"])
    label = {"satterthwaite": "Satterthwaite's", "kenward-roger": "Kenward-Roger's",
             "between-within": "between-within"}[method]
    out.attrs["heading"] = f"Type {_type_label(type)} Analysis of Variance Table with {label} method"
    return out


# =============================================================================================
# contrasts: Type I (Doolittle) and Type III (lmerTest's)
# =============================================================================================
def _type_label(type: int | str) -> str:
    t = str(type).upper()
    if t in ("1", "I"):
        return "I"
    if t in ("3", "III"):
        return "III"
    raise ValueError(f"type must be 1 ('I') or 3 ('III'), not {type!r}")


def _term_columns(model: Any) -> dict[str, np.ndarray]:
    cols: dict[str, list[int]] = {}
    for j, t in enumerate(model.xterms):
        if t != "(Intercept)":
            cols.setdefault(t, []).append(j)
    return {t: np.asarray(v) for t, v in cols.items()}


def _doolittle_Lt(XtX: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """t(L) of lmerTest's Doolittle factorisation X'X = L U (L unit lower triangular)."""
    n = XtX.shape[0]
    L = np.eye(n)
    U = np.zeros((n, n))
    for i in range(n):
        U[i, i:] = XtX[i, i:] - L[i, :i] @ U[:i, i:]
        if i + 1 < n:
            col = XtX[i + 1 :, i] - L[i + 1 :, :i] @ U[:i, i]
            L[i + 1 :, i] = 0.0 if abs(U[i, i]) < eps else col / U[i, i]
    L[np.abs(L) < eps] = 0.0
    return L.T


def contrasts(fit: Any, type: int | str = 3) -> dict[str, np.ndarray]:
    """contrasts(fit, type=3) -> dict term -> L (rows × p)

    The contrast matrix of each fixed-effects term that lmerTest's ``anova`` tests:
    Type I rows of the Doolittle factor of X'X; Type III its ``get_contrasts_type3``
    (treatment-coded contrasts orthogonalised against the terms containing the term,
    mapped to the model's coding).
    """
    label = _type_label(type)
    model = fit.model
    tc = _term_columns(model)
    X = model.X
    if label == "I" or len(tc) <= 1 or model.p <= 1:
        if model.p > 1:
            # Doolittle of the unit-diagonal D X'X D (L = D⁻¹ L_S D): its near-zero tests are then free of
            # the columns' units; otherwise the same factor as lmerTest's
            XtX = X.T @ X
            dg = np.sqrt(np.diag(XtX))
            dsc = np.where(dg > 0, 1.0 / np.where(dg > 0, dg, 1.0), 1.0)
            Lt = dsc[:, None] * _doolittle_Lt(XtX * np.outer(dsc, dsc)) / dsc[None, :]
        else:
            Lt = np.ones((1, 1))
        return {t: Lt[c] for t, c in tc.items()}
    return _type3(model, tc)


def _term_vars(term: str) -> list[str]:
    from ..builder.model import split_colon

    return [v.strip().strip("`") for v in split_colon(term)]


def _is_factor(frame: pd.DataFrame, v: str) -> bool:
    col = frame[v]
    return not (pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype))


def _type3(model: Any, tc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import formulaic

    from ..builder.model import _independent_columns, _quote_dotted, _r_logicals, _r_power

    frame = _r_logicals(model.frame)
    terms = list(tc)
    tvars = {t: _term_vars(t) for t in terms}
    # treatment-coded full-rank X (formulaic's default coding for every factor)
    ff = _quote_dotted(_r_power(model.parsed.fixed), frame.columns)
    Xt = np.asarray(formulaic.model_matrix(ff, frame, na_action="ignore"), dtype=float)
    Xt = Xt[:, _independent_columns(Xt)]
    tnames_t = formulaic.model_matrix(ff, frame, na_action="ignore").model_spec.term_indices
    keep = _independent_columns(np.asarray(formulaic.model_matrix(ff, frame, na_action="ignore"), dtype=float))
    # columns of Xt per term
    col_term = np.empty(keep.size, dtype=object)
    for term, idx in tnames_t.items():
        col_term[idx] = "(Intercept)" if str(term) == "1" else str(term)
    col_term = col_term[keep]
    map_t = {t: np.flatnonzero(col_term == t) for t in terms}
    # rdX: '~ 0 + term' for each term (full indicator coding), intercept first
    blocks, owner = [np.ones((model.n, 1))], ["(Intercept)"]
    for t in terms:
        B = np.ones((model.n, 1))
        for v in tvars[t]:
            if v in frame.columns and _is_factor(frame, v):
                cat = pd.Categorical(frame[v])
                cats = [c for c in cat.categories if np.any(cat == c)]
                ind = np.column_stack([(cat == c).astype(float) for c in cats])
            else:
                ind = (frame[v].to_numpy(dtype=float) if v in frame.columns
                       else np.asarray(formulaic.model_matrix("0 + " + v, frame), dtype=float)[:, :1])[:, None]
            B = (B[:, :, None] * ind[:, None, :]).reshape(model.n, -1)
        blocks.append(B)
        owner += [t] * B.shape[1]
    rdX = np.hstack(blocks)
    L = (np.linalg.pinv(Xt) @ rdX).T  # (ncol rdX) × p_t
    L[np.abs(L) < 1e-7 * max(1.0, np.abs(L).max())] = 0.0
    # containment: A in B if vars(A) ⊂ vars(B) strictly and both have the same numeric variables
    def numerics(t):
        return {v for v in tvars[t] if not (v in frame.columns and _is_factor(frame, v))}

    contains = {a: [b for b in terms if set(tvars[a]) < set(tvars[b]) and numerics(a) == numerics(b)] for a in terms}
    order = sorted(terms, key=lambda t: -len(tvars[t]))
    for t in order:
        if contains[t]:
            Xc = L[:, np.concatenate([map_t[c] for c in contains[t]])]
            Y = L[:, map_t[t]]
            coef, *_ = np.linalg.lstsq(Xc, Y, rcond=None)
            R = Y - Xc @ coef
            R[np.abs(R) < 1e-7 * max(1.0, np.abs(R).max())] = 0.0
            L[:, map_t[t]] = R
    # rows of L kept: those that are columns of Xt (the 'rdX' columns matching Xt's names) -> use L' restricted
    # lmerTest keeps L[colnames(X), ]: the rdX columns that coincide with treatment-coded columns of X
    keep_rows = _matching_columns(rdX, Xt)
    Lk = L[keep_rows]
    mapping = np.linalg.pinv(Xt) @ model.X
    mapping[np.abs(mapping) < 1e-7 * max(1.0, np.abs(mapping).max())] = 0.0
    out = {}
    for t in terms:
        Lt = Lk[:, map_t[t]].T @ mapping
        Lt = Lt[np.sum(np.abs(Lt), axis=1) > 1e-8]
        out[t] = Lt
    return out


def _matching_columns(rdX: np.ndarray, Xt: np.ndarray) -> np.ndarray:
    """For each column of Xt, the index of the equal column of rdX (lmerTest matches them by name)."""
    idx = []
    for j in range(Xt.shape[1]):
        d = np.abs(rdX - Xt[:, [j]]).max(axis=0)
        k = int(np.argmin(d))
        if d[k] > 1e-10:
            raise DesignError("cannot form Type III contrasts for this fixed-effects coding; use type=1")
        idx.append(k)
    return np.asarray(idx)
