"""Penalized iteratively reweighted least squares (PIRLS) and the Laplace approximation.

For a GLMM with linear predictor η = Xβ + ZΛ(θ)u + offset and spherical random
effects u ~ N(0, I), the conditional modes ũ(θ, β) minimise the penalised deviance

    D(u) = −2 Σ_i ℓ_i(η_i) + ‖u‖²,

and the Laplace approximation to the marginal deviance is

    −2 log L(θ, β) ≈ D(ũ) + log det H,      H = Λ'Z'WZΛ + I,

with W the *observed* information weights −∂²ℓ/∂η² at ũ (for the canonical logit
and log links they equal lme4's IRLS weights; for probit/cloglog lme4 uses the
expected weights instead — ``hessian="expected"`` reproduces that). ℓ includes
the normalising constants, so the value is the full −2 log-likelihood.

PIRLS is Newton's method on D: each iteration reweights the blocked system of
:mod:`stochmm.deterministic.blocks` (``[ZΛ X y]`` cross-products with W), factors it and solves
for the new u (β held fixed: a system with p = 0; nAGQ = 0: u and β jointly),
with step-halving and a Newton-decrement convergence test (λ² = δ'Hδ < 1e-22·D, so
log det H is evaluated at modes accurate to ~1e-10). Each evaluation starts from a
first-order prediction of the modes — the last converged modes plus the tangent
dũ/dφ (implicit function theorem, a few solves with the existing factor) times the
parameter change — which saves about one iteration per evaluation.

Two engines share that interface:

* :class:`BlockedEngine` – any random-effects structure (crossed, nested,
  several vector-valued terms) on :class:`~stochmm.deterministic.blocks.BlockedSystem`, whose
  cross-products are recomputed per iteration by
  :meth:`~stochmm.deterministic.blocks.BlockedSystem.reweight` with precomputed scatter-adds
  (no dense q × q matrix is ever formed);
* :class:`LevelEngine` – a single grouping factor (possibly several terms, e.g.
  ``(1 | g) + (0 + x | g)``, or one vector-valued term): H is block diagonal with
  one k × k block per level and everything is vectorised over levels. It is what
  adaptive Gauss–Hermite quadrature (:mod:`stochmm.deterministic.quadrature`) runs on.

Both give the exact gradient of the Laplace deviance with respect to (θ, β)
(envelope theorem for D, implicit differentiation of ũ and the adjoint trick for
log det H: one extra solve and the H⁻¹ entries on each observation's own random
effects), used by the optimizer and, by central differences, for the Hessian
behind the standard errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg as sla

from ..builder.families import Family
from ..errors import DesignError
from .blocks import BlockedSystem

__all__ = ["PirlsState", "BlockedEngine", "LevelEngine", "make_engine", "single_factor", "blas_threads"]


_TOL_DECREMENT = 1e-22  # Newton decrement λ² = δ'Hδ (relative to max(1, D)) at which PIRLS stops
_TOL_STAGNATE = 1e-12  # ... or below this, when λ² stops falling (round-off floor)
_MAXIT = 100
_MAX_HALVINGS = 40


@dataclass
class PirlsState:
    """PirlsState(u, beta, eta, d1, w, pdev, logdet, iterations, converged) — PIRLS at one (θ, β).

    Attributes
    ----------
    u : ndarray
        Spherical conditional modes (engine layout).
    beta : ndarray
    eta, d1, w : ndarray
        Linear predictor, ∂ℓ/∂η and the observed weights −∂²ℓ/∂η² at ũ (engine order).
    pdev : float
        −2 Σ kernel(ℓ) + ‖ũ‖² (constants excluded).
    logdet : float
        log det H.
    iterations : int
        PIRLS iterations used.
    converged : bool

    Examples
    --------
    >>> import stochmm as sm
    >>> from stochmm.builder.families import get_family
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> eng = LevelEngine(m, get_family("binomial"))
    >>> st = eng.pirls(np.array([0.64]), np.array([-1.4, -1.0, -1.1, -1.6]))
    >>> st.converged, st.u.shape, round(st.pdev + st.logdet - 2 * eng.const, 4)  # the Laplace −2 log L
    (True, (15, 1), 184.0664)
    """

    u: np.ndarray
    beta: np.ndarray
    eta: np.ndarray
    d1: np.ndarray
    w: np.ndarray
    pdev: float
    logdet: float
    iterations: int
    converged: bool
    extra: dict = field(default_factory=dict)


# =============================================================================================
# engines
# =============================================================================================
class _Engine:
    """Shared set-up: data, family, counters."""

    def __init__(self, model: Any, family: Family, hessian: str = "observed") -> None:
        if hessian not in ("observed", "expected"):
            raise ValueError(f"hessian must be 'observed' (exact Laplace) or 'expected' (lme4's), not {hessian!r}")
        self.model = model
        self.family = family
        self.hessian = hessian
        self.n, self.p = model.n, model.p
        self.ntheta = int(model.theta0.size)
        self.lower = np.asarray(model.lower, dtype=float)
        self.const = float(np.sum(family.constant(model)))
        self.n_pirls = 0
        self.n_eval = 0
        self.n_grad = 0
        self.t_pirls = 0.0
        self.nonconverged = 0
        self.state: PirlsState | None = None

    # -- interface ------------------------------------------------------------------------
    def objective(self, phi: np.ndarray) -> float:
        """Laplace deviance at φ = (θ, β), full −2 log L."""
        return self.laplace(phi[: self.ntheta], phi[self.ntheta :])[0]

    def value_and_grad(self, phi: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = self.laplace(phi[: self.ntheta], phi[self.ntheta :], grad=True)
        return v, g


def _solve_small(S: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Solve a small symmetric positive-definite system (least squares if singular)."""
    if S.shape[0] == 0:
        return np.zeros(0)
    try:
        return np.linalg.solve(S, r)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(S, r, rcond=None)[0]


# ---------------------------------------------------------------------------------------------
# any structure: the blocked engine
# ---------------------------------------------------------------------------------------------
class BlockedEngine(_Engine):
    """BlockedEngine(model, family, hessian="observed")

    PIRLS and the Laplace approximation (value and exact gradient) for any
    random-effects structure, on :class:`~stochmm.deterministic.blocks.BlockedSystem`.

    Examples
    --------
    >>> import stochmm as sm
    >>> from stochmm.builder.families import get_family
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> eng = BlockedEngine(m, get_family("binomial"))
    >>> round(eng.laplace(np.array([1.0]), np.array([-1.0, -1.0, -1.0, -1.0]))[0], 6)
    191.932535
    """

    def __init__(self, model: Any, family: Family, hessian: str = "observed") -> None:
        super().__init__(model, family, hessian)
        self.terms = model.terms
        self.X = model.X
        self.y = np.asarray(model.y, dtype=float)
        self.wt = np.asarray(model.weights, dtype=float)
        self.off = np.asarray(model.offset, dtype=float)
        self.q = model.q
        t0 = self.terms[0]
        self.q0, self.k0 = t0.q, t0.k
        self.qr = self.q - self.q0
        # per-observation columns ("slots") of ZΛ: term-major, k columns each
        J, Z, slot_of = [], [], []
        s = 0
        for t, zs in zip(self.terms, model.z_slices):
            slot_of.append(list(range(s, s + t.k)))
            for b in range(t.k):
                J.append(zs.start + np.asarray(t.refs, dtype=np.int64) * t.k + b)
                Z.append(t.z[:, b])
            s += t.k
        self.J = np.column_stack(J).astype(np.intp)
        self.m = self.J.shape[1]
        self.slot_of = slot_of
        self._Jflat = self.J.ravel()
        # θ_j -> (term, row, col)
        self.theta_map = []
        for ti, t in enumerate(self.terms):
            for r, c in t.tril:
                self.theta_map.append((ti, r, c))
        self.sys_u = BlockedSystem(self.terms, np.zeros((self.n, 0)))
        self.sys_j: BlockedSystem | None = None
        self._u = np.zeros(self.q)
        self._beta_j: np.ndarray | None = None
        self._u_j = np.zeros(self.q)
        self._tangent: tuple | None = None  # (φ, ũ, dũ/dφ) at the last gradient evaluation
        self._Zt = None
        self._tangent_j: tuple | None = None  # (θ, ũ, β̃, dũ/dθ, dβ̃/dθ)
        # observations grouped by level of term 0 (for chunked H⁻¹ entries)
        self._order0 = np.argsort(t0.refs, kind="stable")
        self._bounds0 = np.searchsorted(np.asarray(t0.refs)[self._order0], np.arange(t0.nlev + 1))

    # -- ZΛ products ----------------------------------------------------------------------
    def _A(self, Ts: list[np.ndarray]) -> np.ndarray:
        """Rows of ZΛ on each observation's slots (n × m)."""
        return np.column_stack([t.z @ T for t, T in zip(self.terms, Ts)])

    def _Zl(self, A: np.ndarray, v: np.ndarray) -> np.ndarray:
        """ZΛ v."""
        return np.einsum("ij,ij->i", A, v[self.J]) if self.m > 1 else A[:, 0] * v[self.J[:, 0]]

    def _Zlt(self, A: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Λ'Z' r."""
        return np.bincount(self._Jflat, (A * r[:, None]).ravel(), minlength=self.q)

    def _Zlt_mat(self, Ts: list[np.ndarray], R: np.ndarray) -> np.ndarray:
        """Λ'Z' R for a matrix R (n × c): one sparse product, then Λ' term by term."""
        if self._Zt is None:
            self._Zt = self.model.Z.T.tocsr()
        out = np.asarray(self._Zt @ R)
        for t, T, sl in zip(self.terms, Ts, self.model.z_slices):
            blk = out[sl].reshape(t.nlev, t.k, -1)
            out[sl] = np.einsum("ba,lbc->lac", T, blk).reshape(t.q, -1)
        return out

    # -- PIRLS, β fixed ---------------------------------------------------------------------
    def pirls(self, theta: np.ndarray, beta: np.ndarray, u0: np.ndarray | None = None) -> PirlsState:
        """pirls(theta, beta, u0=None) -> PirlsState

        Conditional modes ũ(θ, β) by Newton–PIRLS with step-halving; the system is
        left factored at ũ.
        """
        t_start = time.perf_counter()
        model, fam = self.model, self.family
        Ts = model.lambda_blocks(theta)
        A = self._A(Ts)
        eta0 = self.X @ beta + self.off
        u = (self._u if u0 is None else u0).copy()
        if u0 is None and self._tangent is not None:  # first-order prediction of ũ from the last gradient
            phi_ref, u_ref, tu = self._tangent
            u = _better_start(self, A, eta0, u, u_ref + tu @ (np.concatenate([theta, beta]) - phi_ref))
        Zu = self._Zl(A, u)
        eta = eta0 + Zu
        ll, d1, d2 = fam.derivs(self.y, eta, self.wt, 2)
        pdev = -2.0 * ll.sum() + u @ u
        sysu = self.sys_u
        converged = False
        it = 0
        prev = np.inf
        while it < _MAXIT:
            it += 1
            w = -d2
            wy = w * Zu + d1
            sysu.reweight(w, wy, float(np.sum(w * Zu * Zu) + 2.0 * Zu @ d1 + _ssq_ratio(d1, w) + 1.0))
            sysu.factor(Ts)
            delta = sysu.u(np.zeros(0)) - u
            Zd = self._Zl(A, delta)
            lam2 = float(np.sum(w * Zd * Zd) + delta @ delta)
            scale = max(1.0, abs(pdev))
            if lam2 < _TOL_DECREMENT * scale or not np.isfinite(lam2) or (lam2 < _TOL_STAGNATE * scale and lam2 > 0.25 * prev):
                converged = bool(np.isfinite(lam2))
                break
            prev = lam2
            step = 1.0
            for _ in range(_MAX_HALVINGS):
                un = u + step * delta
                Zun = Zu + step * Zd
                etan = eta0 + Zun
                lln, d1n, d2n = fam.derivs(self.y, etan, self.wt, 2)
                pn = -2.0 * lln.sum() + un @ un
                if pn <= pdev + 1e-13 * abs(pdev):
                    break
                step *= 0.5
            else:
                converged = True  # no decrease possible at working precision: at the mode
                break
            u, Zu, eta, ll, d1, d2, pdev = un, Zun, etan, lln, d1n, d2n, pn
        if self.hessian == "expected":
            wf = fam.fisher_weights(eta, self.wt)
            sysu.reweight(wf, wf * Zu, 1.0 + float(np.sum(wf * Zu * Zu)))
            sysu.factor(Ts)
        self._u = u
        self.n_pirls += it
        self.t_pirls += time.perf_counter() - t_start
        if not converged:
            self.nonconverged += 1
        st = PirlsState(u=u, beta=np.asarray(beta, dtype=float), eta=eta, d1=d1, w=-d2, pdev=float(pdev),
                        logdet=sysu.logdet_L, iterations=it, converged=converged)
        st.extra.update(A=A, Ts=Ts, theta=np.asarray(theta, dtype=float))
        self.state = st
        return st

    def laplace(self, theta: np.ndarray, beta: np.ndarray, grad: bool = False) -> tuple[float, np.ndarray | None]:
        """laplace(theta, beta, grad=False) -> (value, gradient or None)

        Laplace approximation to −2 log L(θ, β) (constants included) and, on
        request, its exact gradient in (θ, β).
        """
        self.n_eval += 1
        st = self.pirls(theta, beta)
        val = st.pdev + st.logdet - 2.0 * self.const
        if not np.isfinite(val):
            return np.inf, (np.full(self.ntheta + self.p, np.nan) if grad else None)
        if not grad:
            return val, None
        self.n_grad += 1
        return val, self._gradient(st)

    # -- gradient ------------------------------------------------------------------------
    def _solve(self, sysx: BlockedSystem, b_u: np.ndarray, b_x: np.ndarray | None = None):
        """Solve with the factored system: H x = b_u (``b_x`` None, β-free system) or the
        joint [u, β] system J [x_u; x_β] = [b_u; b_x] (``sysx`` with X). Right-hand sides
        may be vectors or matrices (one column each)."""
        k0, nlev0, q0, qr = self.k0, self.terms[0].nlev, self.q0, self.qr
        vec = b_u.ndim == 1
        Bu = b_u[:, None] if vec else b_u
        Bx = None if b_x is None else (b_x[:, None] if vec else b_x)
        p = 0 if Bx is None else sysx.p
        m = Bu.shape[1]
        L0inv = _inv_blocks(sysx.L0)
        y0 = np.einsum("lab,lbm->lam", L0inv, Bu[:q0].reshape(nlev0, k0, m)).reshape(q0, m)
        rhs = np.vstack([Bu[q0:], Bx]) if p else Bu[q0:].copy()
        Sop = sysx.S if sysx.Sd is None else sysx.Sd  # dense copy when there is one
        if qr:
            rhs[:qr] -= Sop @ y0
        if p:
            Gx = sysx.G[:p]
            rhs[qr:] -= Gx @ y0
        if qr + p:
            Lsub = sysx.Ld[: qr + p, : qr + p]
            x_rx = sla.solve_triangular(Lsub, sla.solve_triangular(Lsub, rhs, lower=True, check_finite=False),
                                        lower=True, trans="T", check_finite=False)
            if qr:
                y0 = y0 - Sop.T @ x_rx[:qr]
            if p:
                y0 = y0 - Gx.T @ x_rx[qr:]
        else:
            x_rx = np.zeros((0, m))
        x0 = np.einsum("lba,lbm->lam", L0inv, y0.reshape(nlev0, k0, m)).reshape(q0, m)
        xu, xx = np.vstack([x0, x_rx[:qr]]), x_rx[qr:]
        return (xu[:, 0], xx[:, 0]) if vec else (xu, xx)

    def _hinv_solve(self, b: np.ndarray) -> np.ndarray:
        """H⁻¹ b with the current (β-free) factor."""
        return self._solve(self.sys_u, b)[0]

    def hinv_rows(self, A: np.ndarray, sysx: BlockedSystem | None = None) -> np.ndarray:
        """c_i = H⁻¹_{J_i J_i} a_i for every observation (n × m): the entries of H⁻¹ on
        each observation's own random effects, chunked over levels of term 0. ``sysx``
        may be the joint system: its leading block is H's factor."""
        sysx = self.sys_u if sysx is None else sysx
        k0, q0, qr = self.k0, self.q0, self.qr
        t0 = self.terms[0]
        nlev0 = t0.nlev
        L0inv = _inv_blocks(sysx.L0)
        refs0 = np.asarray(t0.refs, dtype=np.intp)
        C = np.empty_like(A)
        if qr == 0:
            H00 = np.einsum("lba,lbc->lac", L0inv, L0inv)
            C[:] = np.einsum("nab,nb->na", H00[refs0], A)
            return C
        Lr = sysx.Ld[:qr, :qr]
        Lrinv = sla.solve_triangular(Lr, np.eye(qr), lower=True, check_finite=False)
        Q = Lrinv.T @ Lrinv
        rr_all = self.J[:, k0:] - q0
        Sd = sysx.Sd
        if Sd is not None and k0 == 1:  # dense off-diagonal block (VerbAgg): all in BLAS
            P = Sd.T @ Q  # q0 × qr
            l0 = L0inv[:, 0, 0]
            H0r = -(P * l0[:, None])
            H00 = l0 * l0 * (1.0 + np.einsum("lr,rl->l", P, Sd))
            Hg = H0r[refs0[:, None], rr_all]  # n × mr
            Qg = Q[rr_all[:, :, None], rr_all[:, None, :]]
            a0, ar = A[:, 0], A[:, 1:]
            C[:, 0] = H00[refs0] * a0 + np.einsum("ns,ns->n", Hg, ar)
            C[:, 1:] = Hg * a0[:, None] + np.einsum("nst,nt->ns", Qg, ar)
            return C
        St = sysx.S.T.tocsr()
        chunk = max(1, int(2e7 // max(1, k0 * qr)))
        for la in range(0, nlev0, chunk):
            lb = min(nlev0, la + chunk)
            Sc = St[la * k0 : lb * k0]
            P = np.asarray(Sc @ Q)  # (nl·k0) × qr
            nl = lb - la
            P3 = P.reshape(nl, k0, qr)
            L0c = L0inv[la:lb]
            H0r = -np.einsum("lba,lbr->lar", L0c, P3)
            # diagonal blocks of S'QS for these levels
            Sc = Sc.tocoo()
            lev, bcol = Sc.row // k0, Sc.row % k0
            B = np.zeros((nl, k0, k0))
            for a in range(k0):
                np.add.at(B, (lev, a, bcol), P[lev * k0 + a, Sc.col] * Sc.data)
            B[:, np.arange(k0), np.arange(k0)] += 1.0
            H00 = np.einsum("lba,lbc,lcd->lad", L0c, B, L0c)
            idx = self._order0[self._bounds0[la] : self._bounds0[lb]]
            lv = refs0[idx] - la
            rr = rr_all[idx]
            a0, ar = A[idx, :k0], A[idx, k0:]
            Hg = H0r[lv[:, None, None], np.arange(k0)[None, :, None], rr[:, None, :]]  # ni × k0 × mr
            Qg = Q[rr[:, :, None], rr[:, None, :]]
            C[idx, :k0] = np.einsum("nab,nb->na", H00[lv], a0) + np.einsum("nas,ns->na", Hg, ar)
            C[idx, k0:] = np.einsum("nas,na->ns", Hg, a0) + np.einsum("nst,nt->ns", Qg, ar)
        return C

    def _gradient(self, st: PirlsState, joint: bool = False) -> np.ndarray:
        """Exact gradient of the Laplace deviance: in (θ, β) at ũ(θ, β), or (``joint``) in θ
        of the nAGQ = 0 criterion at the joint modes (ũ(θ), β̃(θ))."""
        A = st.extra["A"]
        u, d1, w = st.u, st.d1, st.w
        sysx = self.sys_j if joint else self.sys_u
        d3 = self.family.derivs(self.y, st.eta, self.wt, 3)[3]
        if self.hessian == "expected":
            w_ld, wp = _expected_weight_derivs(self.family, st.eta, self.wt)
        else:
            w_ld, wp = w, -d3
        C = self.hinv_rows(A, sysx)
        h = np.einsum("ij,ij->i", A, C)
        v = wp * h
        if self.hessian == "expected":  # the modes' implicit derivative needs the observed Hessian
            lin = st.eta - self.off if joint else self._Zl(A, u)
            sysx.reweight(w, w * lin + d1, float(np.sum(w * lin * lin) + 2.0 * lin @ d1 + _ssq_ratio(d1, w) + 1.0))
            sysx.factor(st.extra["Ts"])
        if joint:
            s, sb = self._solve(sysx, self._Zlt(A, v), self.X.T @ v)
            e = self._Zl(A, s) + self.X @ sb
        else:
            s = self._solve(sysx, self._Zlt(A, v))[0]
            e = self._Zl(A, s)
        r = -2.0 * d1 + v - w * e
        g_theta = np.empty(self.ntheta)
        cu = np.empty((self.q, self.ntheta))  # ∂(∇ of −D/2)/∂θ_j, for the warm-start tangent
        cx = np.empty((self.p, self.ntheta))
        for j, (ti, ra, cb) in enumerate(self.theta_map):
            t = self.terms[ti]
            slot = self.slot_of[ti][cb]
            zr = t.z[:, ra]
            col = self.J[:, slot]
            zeta = zr * u[col]
            g_theta[j] = r @ zeta + d1 @ (zr * s[col]) + 2.0 * np.sum(w_ld * zr * C[:, slot])
            wz = w * zeta
            cu[:, j] = np.bincount(col, zr * d1, minlength=self.q) - self._Zlt(A, wz)
            if joint:
                cx[:, j] = -(self.X.T @ wz)
        theta = st.extra["theta"]
        if joint:
            tu, tb = self._solve(sysx, cu, cx)
            self._tangent_j = (theta.copy(), u.copy(), st.beta.copy(), tu, tb)
            return g_theta
        cb_ = -self._Zlt_mat(st.extra["Ts"], self.X * w[:, None]) if self.p else np.zeros((self.q, 0))
        tu = self._solve(sysx, np.hstack([cu, cb_]))[0]
        self._tangent = (np.concatenate([theta, st.beta]), u.copy(), tu)
        return np.concatenate([g_theta, self.X.T @ r])

    # -- nAGQ = 0: u and β jointly ------------------------------------------------------------
    def fast(self, theta: np.ndarray) -> float:
        """fast(theta) -> float

        lme4's nAGQ = 0 criterion: β and u jointly by PIRLS at θ, then the Laplace
        deviance at (θ, β̃(θ), ũ(θ)).
        """
        st = self.pirls_joint(theta)
        return st.pdev + st.logdet - 2.0 * self.const

    def fast_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """fast_grad(theta) -> (value, gradient in θ) of the nAGQ = 0 criterion."""
        st = self.pirls_joint(theta)
        val = st.pdev + st.logdet - 2.0 * self.const
        if not np.isfinite(val):
            return np.inf, np.full(self.ntheta, np.nan)
        self.n_grad += 1
        return val, self._gradient(st, joint=True)

    def pirls_joint(self, theta: np.ndarray) -> PirlsState:
        """pirls_joint(theta) -> PirlsState — modes of (u, β) jointly at θ; the joint system stays factored."""
        t_start = time.perf_counter()
        self.n_eval += 1
        model, fam = self.model, self.family
        if self.sys_j is None:
            self.sys_j = BlockedSystem(self.terms, self.X)
        sysj = self.sys_j
        Ts = model.lambda_blocks(theta)
        A = self._A(Ts)
        if self._beta_j is None:
            self._beta_j = _glm_start(self)
        beta = self._beta_j.copy()
        u = self._u_j.copy()
        if self._tangent_j is not None:  # first-order prediction of (ũ, β̃) from the last gradient
            th_ref, u_ref, b_ref, tu, tb = self._tangent_j
            dth = np.asarray(theta, dtype=float) - th_ref
            u_p, b_p = u_ref + tu @ dth, b_ref + tb @ dth
            off_p, off_w = self.X @ b_p + self.off, self.X @ beta + self.off
            if _pdev(self, A, off_p, u_p) < _pdev(self, A, off_w, u):
                u, beta = u_p, b_p
        Zu = self._Zl(A, u)
        Xb = self.X @ beta
        eta = Xb + Zu + self.off
        ll, d1, d2 = fam.derivs(self.y, eta, self.wt, 2)
        pdev = -2.0 * ll.sum() + u @ u
        converged = False
        it = 0
        prev = np.inf
        while it < _MAXIT:
            it += 1
            w = -d2
            lin = Xb + Zu
            wy = w * lin + d1
            sysj.reweight(w, wy, float(np.sum(w * lin * lin) + 2.0 * lin @ d1 + _ssq_ratio(d1, w) + 1.0))
            sysj.factor(Ts)
            bn = sysj.beta()
            db = bn - beta
            du = sysj.u(bn) - u
            Zd = self._Zl(A, du)
            Xd = self.X @ db
            lam2 = float(np.sum(w * (Zd + Xd) ** 2) + du @ du)
            scale = max(1.0, abs(pdev))
            if lam2 < _TOL_DECREMENT * scale or not np.isfinite(lam2) or (lam2 < _TOL_STAGNATE * scale and lam2 > 0.25 * prev):
                converged = bool(np.isfinite(lam2))
                break
            prev = lam2
            step = 1.0
            for _ in range(_MAX_HALVINGS):
                un, bnn = u + step * du, beta + step * db
                Zun, Xbn = Zu + step * Zd, Xb + step * Xd
                etan = Xbn + Zun + self.off
                lln, d1n, d2n = fam.derivs(self.y, etan, self.wt, 2)
                pn = -2.0 * lln.sum() + un @ un
                if pn <= pdev + 1e-13 * abs(pdev):
                    break
                step *= 0.5
            else:
                converged = True
                break
            u, beta, Zu, Xb, eta, ll, d1, d2, pdev = un, bnn, Zun, Xbn, etan, lln, d1n, d2n, pn
        if self.hessian == "expected":
            wf = fam.fisher_weights(eta, self.wt)
            lin = Xb + Zu
            sysj.reweight(wf, wf * lin, 1.0 + float(np.sum(wf * lin * lin)))
            sysj.factor(Ts)
        self._u_j, self._beta_j = u, beta
        self.n_pirls += it
        self.t_pirls += time.perf_counter() - t_start
        if not converged:
            self.nonconverged += 1
        st = PirlsState(u=u, beta=beta, eta=eta, d1=d1, w=-d2, pdev=float(pdev), logdet=sysj.logdet_L,
                        iterations=it, converged=converged)
        st.extra.update(A=A, Ts=Ts, theta=np.asarray(theta, dtype=float), RX=sysj.RX.copy())
        self.state = st
        return st

    # -- results ----------------------------------------------------------------------------
    def b_from_u(self, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
        """b = Λ(θ)u in the model's Z column order."""
        out = []
        for t, T, sl in zip(self.terms, self.model.lambda_blocks(theta), self.model.z_slices):
            out.append((u[sl].reshape(t.nlev, t.k) @ T.T).ravel())
        return np.concatenate(out)

    def rx_vcov(self, theta: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """(R_X'R_X)⁻¹ from the joint system at the weights of ũ(θ, β) — lme4's ``use.hessian = FALSE``."""
        st = self.pirls(theta, beta)
        if self.p == 0:
            return np.zeros((0, 0))
        if self.sys_j is None:
            self.sys_j = BlockedSystem(self.terms, self.X)
        w = st.w if self.hessian == "observed" else self.family.fisher_weights(st.eta, self.wt)
        lin = st.eta - self.off
        self.sys_j.reweight(w, w * lin, 1.0 + float(np.sum(w * lin * lin)))
        self.sys_j.factor(self.model.lambda_blocks(theta))
        RXinv = np.linalg.inv(self.sys_j.RX)
        return RXinv.T @ RXinv

    def cond_cov_b(self, theta: np.ndarray, beta: np.ndarray) -> list[np.ndarray]:
        """Conditional covariance blocks of b = Λu given (θ, β) at ũ, one (nlev, k, k) array per term."""
        self.pirls(theta, beta)
        Ts = self.model.lambda_blocks(theta)
        blocks = self.sys_u.cond_cov_u()
        return [np.einsum("ab,lbc,dc->lad", T, C, T) for T, C in zip(Ts, blocks)]


def _pdev(eng: BlockedEngine, A: np.ndarray, eta0: np.ndarray, u: np.ndarray) -> float:
    """Penalised deviance −2 Σ kernel + ‖u‖² at u."""
    ll = eng.family.derivs(eng.y, eta0 + eng._Zl(A, u), eng.wt, 0)[0]
    val = float(-2.0 * ll.sum() + u @ u)
    return val if np.isfinite(val) else np.inf


def _better_start(eng: BlockedEngine, A: np.ndarray, eta0: np.ndarray, u_warm: np.ndarray,
                  u_pred: np.ndarray) -> np.ndarray:
    """The predicted modes when they beat the plain warm start."""
    return u_pred if _pdev(eng, A, eta0, u_pred) < _pdev(eng, A, eta0, u_warm) else u_warm


def _inv_blocks(L0: np.ndarray) -> np.ndarray:
    """Inverses of the (nlev, k, k) diagonal blocks."""
    return 1.0 / L0 if L0.shape[1] == 1 else np.linalg.inv(L0)


def _inv_spd(H: np.ndarray) -> np.ndarray:
    """Inverses of (nlev, k, k) symmetric positive-definite blocks."""
    return 1.0 / H if H.shape[1] == 1 else np.linalg.inv(H)


def _ssq_ratio(d1: np.ndarray, w: np.ndarray) -> float:
    """Σ d1²/w with w = 0 terms capped (only the unused pwrss sees it)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.where(w > 0, d1 * d1 / np.where(w > 0, w, 1.0), 0.0)
        val = float(np.sum(r))
    return val if np.isfinite(val) else 1e300


def _expected_weight_derivs(family: Family, eta: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fisher weights and their η-derivative (central difference; smooth closed forms)."""
    h = 1e-5 * np.maximum(1.0, np.abs(eta))
    wf = family.fisher_weights(eta, wt)
    wp = (family.fisher_weights(eta + h, wt) - family.fisher_weights(eta - h, wt)) / (2.0 * h)
    return wf, wp


def _glm_start(eng: _Engine) -> np.ndarray:
    """β start for joint PIRLS: a few Newton steps of the fixed-effects GLM (random effects at 0)."""
    p = eng.p
    beta = np.zeros(p)
    if p == 0:
        return beta
    X, fam = eng.X, eng.family
    eta = X @ beta + eng.off
    ll, d1, d2 = fam.derivs(eng.y, eta, eng.wt, 2)
    f0 = ll.sum()
    for _ in range(25):  # a rough start is enough: joint PIRLS refines it
        step = _solve_small(X.T @ (X * (1e-10 - d2)[:, None]), X.T @ d1)
        t = 1.0
        for _ in range(30):
            bn = beta + t * step
            eta = X @ bn + eng.off
            ll, d1, d2 = fam.derivs(eng.y, eta, eng.wt, 2)
            if ll.sum() >= f0 - 1e-12 * abs(f0):
                break
            t *= 0.5
        beta, f0 = bn, ll.sum()
        if np.max(np.abs(t * step)) < 1e-4:
            break
    return beta


# ---------------------------------------------------------------------------------------------
# one grouping factor: the per-level engine
# ---------------------------------------------------------------------------------------------
class LevelEngine(_Engine):
    """LevelEngine(model, family, hessian="observed")

    PIRLS, Laplace and (through :mod:`stochmm.deterministic.quadrature`) adaptive Gauss–Hermite
    quadrature for models whose random-effects terms all share one grouping factor.
    H is block diagonal (one k × k block per level, k = total number of random
    effects per level), so every operation is a vectorised per-level reduction.

    Examples
    --------
    >>> import stochmm as sm
    >>> from stochmm.builder.families import get_family
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> eng = LevelEngine(m, get_family("binomial"))
    >>> round(eng.laplace(np.array([1.0]), np.array([-1.0, -1.0, -1.0, -1.0]))[0], 6)
    191.932535
    """

    def __init__(self, model: Any, family: Family, hessian: str = "observed") -> None:
        super().__init__(model, family, hessian)
        terms = model.terms
        refs = np.asarray(terms[0].refs)
        for t in terms[1:]:
            if not np.array_equal(np.asarray(t.refs), refs) or len(t.levels) != len(terms[0].levels):
                raise DesignError("LevelEngine needs all random-effects terms to share one grouping factor")
        self.terms = terms
        self.nlev = terms[0].nlev
        self.k = int(sum(t.k for t in terms))
        order = np.argsort(refs, kind="stable")
        self.order = order
        self.refs = refs[order].astype(np.intp)
        self.starts = np.searchsorted(self.refs, np.arange(self.nlev))
        self.X = np.ascontiguousarray(model.X[order])
        self.Z = np.ascontiguousarray(np.column_stack([t.z for t in terms])[order])
        self.y = np.asarray(model.y, dtype=float)[order]
        self.wt = np.asarray(model.weights, dtype=float)[order]
        self.off = np.asarray(model.offset, dtype=float)[order]
        # θ_j -> position (row, col) in the combined k × k factor
        self.theta_map = []
        self.col_off = []
        off = 0
        for t in terms:
            self.col_off.append(off)
            for r, c in t.tril:
                self.theta_map.append((off + r, off + c))
            off += t.k
        self._tr = np.array([r for r, _ in self.theta_map], dtype=np.intp)
        self._tc = np.array([c for _, c in self.theta_map], dtype=np.intp)
        self._u = np.zeros((self.nlev, self.k))
        self._u_j = np.zeros((self.nlev, self.k))
        self._beta_j: np.ndarray | None = None
        self._tangent: tuple | None = None
        self._tangent_j: tuple | None = None
        self._eye = np.eye(self.k)

    # -- helpers --------------------------------------------------------------------------
    def ls(self, x: np.ndarray) -> np.ndarray:
        """Per-level sums over the (sorted) observations."""
        return np.add.reduceat(x, self.starts, axis=0)

    def T(self, theta: np.ndarray) -> np.ndarray:
        """Combined k × k lower-triangular relative covariance factor."""
        T = np.zeros((self.k, self.k))
        T[self._tr, self._tc] = theta
        return T

    # -- PIRLS, β fixed ---------------------------------------------------------------------
    def pirls(self, theta: np.ndarray, beta: np.ndarray, u0: np.ndarray | None = None) -> PirlsState:
        """pirls(theta, beta, u0=None) -> PirlsState

        Conditional modes level by level (Newton with per-level step-halving).
        ``state.extra`` holds H (nlev × k × k) and its Cholesky factor.
        """
        t_start = time.perf_counter()
        fam, y, wt = self.family, self.y, self.wt
        k = self.k
        T = self.T(theta)
        A = self.Z @ T  # rows a_i' = z_i'T
        refs = self.refs
        eta0 = self.X @ beta + self.off
        u = (self._u if u0 is None else u0).copy()
        if u0 is None and self._tangent is not None and k == 1:  # first-order prediction from the last gradient
            phi_ref, u_ref, tu = self._tangent
            dphi = np.concatenate([theta, beta]) - phi_ref
            if np.max(np.abs(dphi)) < 0.5:
                u = (u_ref + tu @ dphi)[:, None]
        ls = self.ls
        converged = False
        it = 0
        prev = np.inf
        if k == 1:
            a = A[:, 0]
            a2 = a * a
            ul = u[:, 0]
            eta = eta0 + a * ul[refs]
            ll, d1, d2 = fam.derivs(y, eta, wt, 2)
            Dl = -2.0 * ls(ll) + ul * ul
            while it < _MAXIT:
                it += 1
                g = ls(a * d1) - ul
                H = 1.0 - ls(d2 * a2)
                delta = g / H
                lam2 = delta * g
                lmax = float(lam2.max())
                scale = max(1.0, float(np.abs(Dl).max()))
                if (lmax < _TOL_DECREMENT * scale or not np.isfinite(lmax)
                        or (lmax < _TOL_STAGNATE * scale and lmax > 0.25 * prev)):
                    converged = bool(np.isfinite(lmax))
                    break
                prev = lmax
                step = np.ones(self.nlev)
                for _ in range(_MAX_HALVINGS):
                    un = ul + step * delta
                    etan = eta0 + a * un[refs]
                    lln, d1n, d2n = fam.derivs(y, etan, wt, 2)
                    Dn = -2.0 * ls(lln) + un * un
                    bad = Dn > Dl + 1e-13 * np.abs(Dl)
                    if not bad.any():
                        break
                    step = np.where(bad, 0.5 * step, step)
                else:
                    step = np.where(bad, 0.0, step)
                    un = ul + step * delta
                    etan = eta0 + a * un[refs]
                    lln, d1n, d2n = fam.derivs(y, etan, wt, 2)
                    Dn = -2.0 * ls(lln) + un * un
                    if not np.any(step):
                        converged = True
                        break
                ul, eta, ll, d1, d2, Dl = un, etan, lln, d1n, d2n, Dn
            w = -d2
            Hobs = H.reshape(-1, 1, 1)
            if self.hessian == "expected":
                wl = fam.fisher_weights(eta, wt)
                H = 1.0 + ls(wl * a2)
            u = ul[:, None]
            Hm = H.reshape(-1, 1, 1)
            Lc = np.sqrt(Hm)
            logdet = float(np.log(H).sum())
        else:
            AA = (A[:, :, None] * A[:, None, :]).reshape(-1, k * k)
            eta = eta0 + np.einsum("ij,ij->i", A, u[refs])
            ll, d1, d2 = fam.derivs(y, eta, wt, 2)
            Dl = -2.0 * ls(ll) + np.einsum("lj,lj->l", u, u)
            while it < _MAXIT:
                it += 1
                g = ls(A * d1[:, None]) - u
                Hm = self._eye - ls(AA * d2[:, None]).reshape(-1, k, k)
                delta = np.linalg.solve(Hm, g[:, :, None])[:, :, 0]
                lam2 = np.einsum("lj,lj->l", delta, g)
                lmax = float(lam2.max())
                scale = max(1.0, float(np.abs(Dl).max()))
                if (lmax < _TOL_DECREMENT * scale or not np.isfinite(lmax)
                        or (lmax < _TOL_STAGNATE * scale and lmax > 0.25 * prev)):
                    converged = bool(np.isfinite(lmax))
                    break
                prev = lmax
                step = np.ones(self.nlev)
                for _ in range(_MAX_HALVINGS):
                    un = u + step[:, None] * delta
                    etan = eta0 + np.einsum("ij,ij->i", A, un[refs])
                    lln, d1n, d2n = fam.derivs(y, etan, wt, 2)
                    Dn = -2.0 * ls(lln) + np.einsum("lj,lj->l", un, un)
                    bad = Dn > Dl + 1e-13 * np.abs(Dl)
                    if not bad.any():
                        break
                    step = np.where(bad, 0.5 * step, step)
                else:
                    step = np.where(bad, 0.0, step)
                    un = u + step[:, None] * delta
                    etan = eta0 + np.einsum("ij,ij->i", A, un[refs])
                    lln, d1n, d2n = fam.derivs(y, etan, wt, 2)
                    Dn = -2.0 * ls(lln) + np.einsum("lj,lj->l", un, un)
                    if not np.any(step):
                        converged = True
                        break
                u, eta, ll, d1, d2, Dl = un, etan, lln, d1n, d2n, Dn
            w = -d2
            Hobs = Hm
            if self.hessian == "expected":
                wl = fam.fisher_weights(eta, wt)
                Hm = self._eye + ls(AA * wl[:, None]).reshape(-1, k, k)
            Lc = np.linalg.cholesky(Hm)
            logdet = float(2.0 * np.log(np.diagonal(Lc, axis1=1, axis2=2)).sum())
        self._u = u
        self.n_pirls += it
        self.t_pirls += time.perf_counter() - t_start
        if not converged:
            self.nonconverged += 1
        st = PirlsState(u=u, beta=np.asarray(beta, dtype=float), eta=eta, d1=d1, w=w, pdev=float(Dl.sum()),
                        logdet=logdet, iterations=it, converged=converged)
        st.extra.update(A=A, T=T, H=Hm, Hobs=Hobs, L=Lc, ll=ll, Dl=Dl, theta=np.asarray(theta, dtype=float))
        self.state = st
        return st

    def laplace(self, theta: np.ndarray, beta: np.ndarray, grad: bool = False) -> tuple[float, np.ndarray | None]:
        """laplace(theta, beta, grad=False) -> (value, gradient or None) — as :meth:`BlockedEngine.laplace`."""
        self.n_eval += 1
        st = self.pirls(theta, beta)
        val = st.pdev + st.logdet - 2.0 * self.const
        if not np.isfinite(val):
            return np.inf, (np.full(self.ntheta + self.p, np.nan) if grad else None)
        if not grad:
            return val, None
        self.n_grad += 1
        return val, self._gradient(st)

    def _gradient(self, st: PirlsState) -> np.ndarray:
        A, u, d1, w = st.extra["A"], st.u, st.d1, st.w
        refs = self.refs
        d3 = self.family.derivs(self.y, st.eta, self.wt, 3)[3]
        if self.hessian == "expected":
            w_ld, wp = _expected_weight_derivs(self.family, st.eta, self.wt)
        else:
            w_ld, wp = w, -d3
        if self.k == 1:
            a = A[:, 0]
            z = self.Z[:, 0]
            hi = 1.0 / st.extra["H"][:, 0, 0]
            c = a * hi[refs]
            v = wp * a * c
            hoi = hi if self.hessian == "observed" else 1.0 / st.extra["Hobs"][:, 0, 0]
            sl = self.ls(v * a) * hoi
            r = -2.0 * d1 + v - w * a * sl[refs]
            zeta = z * u[refs, 0]
            g_theta = np.array([r @ zeta + d1 @ (z * sl[refs]) + 2.0 * np.sum(w_ld * z * c)])
            self._store_tangent(st, zeta, w, d1, a, hoi)
            return np.concatenate([g_theta, self.X.T @ r])
        Hinv = _inv_spd(st.extra["H"])
        C = np.einsum("nab,nb->na", Hinv[refs], A)
        h = np.einsum("ij,ij->i", A, C)
        v = wp * h
        Hoinv = Hinv if self.hessian == "observed" else _inv_spd(st.extra["Hobs"])
        s = np.einsum("lab,lb->la", Hoinv, self.ls(A * v[:, None]))
        e = np.einsum("ij,ij->i", A, s[refs])
        r = -2.0 * d1 + v - w * e
        g_beta = self.X.T @ r
        Zr = self.Z[:, self._tr]  # n × nθ
        zeta = Zr * u[refs][:, self._tc]
        xi = Zr * s[refs][:, self._tc]
        tr = (w_ld[:, None] * Zr * C[:, self._tc]).sum(0)
        g_theta = r @ zeta + d1 @ xi + 2.0 * tr
        return np.concatenate([g_theta, g_beta])

    def _store_tangent(self, st: PirlsState, zeta: np.ndarray, w: np.ndarray, d1: np.ndarray, a: np.ndarray,
                       hoi: np.ndarray) -> None:
        """dũ/dφ per level (scalar case) for the next warm start: H⁻¹ ∂(∇h)/∂φ."""
        ls, z = self.ls, self.Z[:, 0]
        c_t = ls(z * d1) - ls(w * a * zeta)
        c_b = -ls((w * a)[:, None] * self.X)
        tu = np.column_stack([c_t, c_b]) * hoi[:, None]
        self._tangent = (np.concatenate([st.extra["theta"], st.beta]), st.u[:, 0].copy(), tu)

    # -- nAGQ = 0 ---------------------------------------------------------------------------
    def fast(self, theta: np.ndarray) -> float:
        """fast(theta) -> float — lme4's nAGQ = 0 criterion (u and β jointly by PIRLS)."""
        st = self.pirls_joint(theta)
        return st.pdev + st.logdet - 2.0 * self.const

    def pirls_joint(self, theta: np.ndarray) -> PirlsState:
        """pirls_joint(theta) -> PirlsState — joint modes of (u, β) at θ; ``extra["RX"]`` is the β factor."""
        t_start = time.perf_counter()
        self.n_eval += 1
        fam, y, wt, X = self.family, self.y, self.wt, self.X
        k, p = self.k, self.p
        T = self.T(theta)
        A = self.Z @ T
        refs = self.refs
        ls = self.ls
        if self._beta_j is None:
            self._beta_j = _glm_start(self)
        beta = self._beta_j.copy()
        u = self._u_j.copy()
        if self._tangent_j is not None and k == 1:
            th_ref, u_ref, b_ref, tu, tb = self._tangent_j
            dth = np.asarray(theta, dtype=float) - th_ref
            if np.max(np.abs(dth)) < 0.5:
                u, beta = (u_ref + tu * dth[0])[:, None], b_ref + tb * dth[0]
        AX = (A[:, :, None] * X[:, None, :]).reshape(self.n, k * p)
        AA = (A[:, :, None] * A[:, None, :]).reshape(-1, k * k)

        def lin_u(uu):
            return np.einsum("ij,ij->i", A, uu[refs]) if k > 1 else A[:, 0] * uu[refs, 0]

        Zu = lin_u(u)
        Xb = X @ beta
        eta = Xb + Zu + self.off
        ll, d1, d2 = fam.derivs(y, eta, wt, 2)
        pdev = -2.0 * ll.sum() + float(np.sum(u * u))
        converged = False
        it = 0
        prev = np.inf
        S = np.eye(p)
        a1 = A[:, 0]
        a2 = a1 * a1
        while it < _MAXIT:
            it += 1
            w = -d2
            gb = X.T @ d1
            Hbb = X.T @ (X * w[:, None])
            if k == 1:  # scalar: everything per level is a number
                gu1 = ls(a1 * d1) - u[:, 0]
                H1 = 1.0 + ls(w * a2)
                Hub1 = ls(AX * w[:, None])
                hi = 1.0 / H1
                HiHub1 = Hub1 * hi[:, None]
                S = Hbb - Hub1.T @ HiHub1
                Higu1 = gu1 * hi
                db = _solve_small(S, gb - Hub1.T @ Higu1)
                du = (Higu1 - HiHub1 @ db)[:, None]
                lam2 = float(du[:, 0] @ gu1 + db @ gb)
                Huu, Hub = H1.reshape(-1, 1, 1), Hub1.reshape(self.nlev, 1, p)
            else:
                gu = ls(A * d1[:, None]) - u
                Huu = self._eye + ls(AA * w[:, None]).reshape(-1, k, k)
                Hub = ls(AX * w[:, None]).reshape(self.nlev, k, p)
                HiHub = np.linalg.solve(Huu, Hub)
                Higu = np.linalg.solve(Huu, gu[:, :, None])[:, :, 0]
                S = Hbb - np.einsum("lka,lkb->ab", Hub, HiHub)
                rhs = gb - np.einsum("lka,lk->a", Hub, Higu)
                db = _solve_small(S, rhs)
                du = Higu - np.einsum("lka,a->lk", HiHub, db)
                lam2 = float(np.sum(du * gu) + db @ gb)
            scale = max(1.0, abs(pdev))
            if lam2 < _TOL_DECREMENT * scale or not np.isfinite(lam2) or (lam2 < _TOL_STAGNATE * scale and lam2 > 0.25 * prev):
                converged = bool(np.isfinite(lam2))
                break
            prev = lam2
            Zd, Xd = lin_u(du), X @ db
            step = 1.0
            for _ in range(_MAX_HALVINGS):
                un, bn = u + step * du, beta + step * db
                Zun, Xbn = Zu + step * Zd, Xb + step * Xd
                etan = Xbn + Zun + self.off
                lln, d1n, d2n = fam.derivs(y, etan, wt, 2)
                pn = -2.0 * lln.sum() + float(np.sum(un * un))
                if pn <= pdev + 1e-13 * abs(pdev):
                    break
                step *= 0.5
            else:
                converged = True
                break
            u, beta, Zu, Xb, eta, ll, d1, d2, pdev = un, bn, Zun, Xbn, etan, lln, d1n, d2n, pn
        w = -d2
        obs = (Huu, Hub, S)
        if self.hessian == "expected":
            wl = fam.fisher_weights(eta, wt)
            Huu = self._eye + ls(AA * wl[:, None]).reshape(-1, k, k)
            Hub = ls(AX * wl[:, None]).reshape(self.nlev, k, p)
            S = X.T @ (X * wl[:, None]) - np.einsum("lka,lkb->ab", Hub, np.linalg.solve(Huu, Hub))
        if k == 1:
            logdet = float(np.log(Huu[:, 0, 0]).sum())
        else:
            logdet = float(2.0 * np.log(np.diagonal(np.linalg.cholesky(Huu), axis1=1, axis2=2)).sum())
        self._u_j, self._beta_j = u, beta
        self.n_pirls += it
        self.t_pirls += time.perf_counter() - t_start
        if not converged:
            self.nonconverged += 1
        try:
            RX = np.linalg.cholesky(S) if p else np.zeros((0, 0))
        except np.linalg.LinAlgError:
            RX = np.full((p, p), np.nan)
        st = PirlsState(u=u, beta=beta, eta=eta, d1=d1, w=w, pdev=float(pdev), logdet=logdet, iterations=it,
                        converged=converged)
        st.extra.update(A=A, T=T, RX=RX, H=Huu, obs=obs, theta=np.asarray(theta, dtype=float))
        self.state = st
        return st

    def fast_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """fast_grad(theta) -> (value, gradient in θ) of the nAGQ = 0 criterion."""
        st = self.pirls_joint(theta)
        val = st.pdev + st.logdet - 2.0 * self.const
        if not np.isfinite(val):
            return np.inf, np.full(self.ntheta, np.nan)
        self.n_grad += 1
        A, u, d1, w = st.extra["A"], st.u, st.d1, st.w
        refs, X, ls = self.refs, self.X, self.ls
        d3 = self.family.derivs(self.y, st.eta, self.wt, 3)[3]
        if self.hessian == "expected":
            w_ld, wp = _expected_weight_derivs(self.family, st.eta, self.wt)
        else:
            w_ld, wp = w, -d3
        Huu, Hub, S = st.extra["obs"]
        if self.k == 1:
            a, z = A[:, 0], self.Z[:, 0]
            hi = 1.0 / st.extra["H"][:, 0, 0]
            c = a * hi[refs]
            v = wp * a * c
            hoi = hi if self.hessian == "observed" else 1.0 / Huu[:, 0, 0]
            Hub1 = Hub[:, 0, :]
            Hir = ls(v * a) * hoi
            sb = _solve_small(S, X.T @ v - Hub1.T @ Hir) if self.p else np.zeros(0)
            su = Hir - (Hub1 @ sb) * hoi
            r = -2.0 * d1 + v - w * (a * su[refs] + X @ sb)
            zeta = z * u[refs, 0]
            g = np.array([r @ zeta + d1 @ (z * su[refs]) + 2.0 * np.sum(w_ld * z * c)])
            # tangent d(ũ, β̃)/dθ = J⁻¹ ∂(∇ of −D/2)/∂θ, for the next warm start
            wz = w * zeta
            cu = ls(z * d1) - ls(a * wz)
            cxv = -(X.T @ wz)
            hcu = cu * hoi
            tb = _solve_small(S, cxv - Hub1.T @ hcu) if self.p else np.zeros(0)
            tu = hcu - (Hub1 @ tb) * hoi
            self._tangent_j = (np.asarray(theta, dtype=float).copy(), u[:, 0].copy(), st.beta.copy(), tu, tb)
            return val, g
        Hinv = _inv_spd(st.extra["H"])
        C = np.einsum("nab,nb->na", Hinv[refs], A)
        v = wp * np.einsum("ij,ij->i", A, C)
        Hoinv = Hinv if self.hessian == "observed" else _inv_spd(Huu)
        ru, rb = ls(A * v[:, None]), X.T @ v
        Hir = np.einsum("lab,lb->la", Hoinv, ru)
        sb = _solve_small(S, rb - np.einsum("lka,lk->a", Hub, Hir)) if self.p else np.zeros(0)
        su = Hir - np.einsum("lab,lbc,c->la", Hoinv, Hub, sb)
        e = np.einsum("ij,ij->i", A, su[refs]) + X @ sb
        r = -2.0 * d1 + v - w * e
        Zr = self.Z[:, self._tr]
        g = (r @ (Zr * u[refs][:, self._tc]) + d1 @ (Zr * su[refs][:, self._tc])
             + 2.0 * (w_ld[:, None] * Zr * C[:, self._tc]).sum(0))
        return val, g

    # -- results ----------------------------------------------------------------------------
    def b_from_u(self, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
        """b = Λ(θ)u in the model's Z column order (term-major, level-major)."""
        B = u @ self.T(theta).T  # nlev × k, combined columns
        out = []
        for t, off in zip(self.terms, self.col_off):
            out.append(B[:, off : off + t.k].ravel())
        return np.concatenate(out)

    def rx_vcov(self, theta: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """(R_X'R_X)⁻¹ at the weights of ũ(θ, β) — lme4's ``use.hessian = FALSE``."""
        st = self.pirls(theta, beta)
        p, k = self.p, self.k
        if p == 0:
            return np.zeros((0, 0))
        A, X = st.extra["A"], self.X
        w = st.w if self.hessian == "observed" else self.family.fisher_weights(st.eta, self.wt)
        Hub = self.ls((A[:, :, None] * X[:, None, :]).reshape(self.n, k * p) * w[:, None]).reshape(self.nlev, k, p)
        S = X.T @ (X * w[:, None]) - np.einsum("lka,lkb->ab", Hub, np.linalg.solve(st.extra["H"], Hub))
        return np.linalg.inv(S)

    def cond_cov_b(self, theta: np.ndarray, beta: np.ndarray) -> list[np.ndarray]:
        """Conditional covariance blocks of b = Λu at ũ(θ, β), one (nlev, k_t, k_t) array per term."""
        st = self.pirls(theta, beta)
        T = self.T(theta)
        V = np.einsum("ab,lbc,dc->lad", T, np.linalg.inv(st.extra["H"]), T)
        return [V[:, off : off + t.k, off : off + t.k] for t, off in zip(self.terms, self.col_off)]


# ---------------------------------------------------------------------------------------------
# BLAS threads
# ---------------------------------------------------------------------------------------------
_BLAS_LIBS: list | None = None


def _blas_libs() -> list:
    """(get, set) pairs for every OpenBLAS loaded in the process (numpy's and scipy's)."""
    global _BLAS_LIBS
    if _BLAS_LIBS is not None:
        return _BLAS_LIBS
    import ctypes

    out = []
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and ".so" in line})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pre, suf in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", "")):
            get = getattr(lib, f"{pre}get_num_threads{suf}", None)
            put = getattr(lib, f"{pre}set_num_threads{suf}", None)
            if get is not None and put is not None:
                put.argtypes = [ctypes.c_int]
                out.append((get, put))
                break
    _BLAS_LIBS = out
    return out


class blas_threads:
    """blas_threads(n) — context manager limiting OpenBLAS to ``n`` threads (restored on exit).

    PIRLS on small and medium models runs thousands of tiny BLAS/LAPACK calls; on a
    machine with few cores OpenBLAS's thread hand-off costs far more than the work
    (measured 3–10× on 2 cores, e.g. scipy's L-BFGS-B step on 5 parameters: 3 ms vs
    0.05 ms). A no-op where no OpenBLAS is found (threadpoolctl would be the general tool).

    Examples
    --------
    >>> with blas_threads(1):
    ...     _ = np.ones((3, 3)) @ np.ones(3)
    """

    def __init__(self, n: int | None) -> None:
        self.n = n
        self._saved: list = []

    def __enter__(self) -> blas_threads:
        if self.n is not None:
            for get, put in _blas_libs():
                try:
                    self._saved.append((put, int(get())))
                    put(int(self.n))
                except Exception:  # pragma: no cover - defensive
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for put, n in self._saved:
            try:
                put(n)
            except Exception:  # pragma: no cover - defensive
                pass
        self._saved = []


def single_factor(model: Any) -> bool:
    """single_factor(model) -> bool — every random-effects term shares one grouping factor (AGQ is possible).

    Examples
    --------
    >>> import stochmm as sm
    >>> v = sm.datasets.load("VerbAgg")
    >>> single_factor(sm.Model("r2 ~ Anger + (1 | id) + (0 + Anger | id)", v, family="binomial"))
    True
    >>> single_factor(sm.Model("r2 ~ Anger + (1 | id) + (1 | item)", v, family="binomial"))
    False
    """
    terms = model.terms
    r0 = np.asarray(terms[0].refs)
    return all(t.group == terms[0].group and np.array_equal(np.asarray(t.refs), r0) for t in terms[1:])


def make_engine(model: Any, family: Family, hessian: str = "observed", engine: str = "auto") -> _Engine:
    """make_engine(model, family, hessian="observed", engine="auto") -> engine

    :class:`LevelEngine` for a single grouping factor, else :class:`BlockedEngine`
    (``engine="blocked"`` forces the general one).

    Examples
    --------
    >>> import stochmm as sm
    >>> from stochmm.builder.families import get_family
    >>> m = sm.Model("r2 ~ Anger + (1 | id) + (1 | item)", sm.datasets.load("VerbAgg"), family="binomial")
    >>> type(make_engine(m, get_family("binomial"))).__name__
    'BlockedEngine'
    """
    if engine not in ("auto", "blocked", "level"):
        raise ValueError(f"engine must be 'auto', 'blocked' or 'level', not {engine!r}")
    if engine == "level" or (engine == "auto" and single_factor(model)):
        return LevelEngine(model, family, hessian)
    return BlockedEngine(model, family, hessian)
