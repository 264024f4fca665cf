"""Blocked cross-products of ``[Z X y]`` and their Cholesky factor.

The penalised least-squares system of a mixed model,

    [ Λ'Z'WZΛ + I   Λ'Z'WX   Λ'Z'Wy ]
    [   X'WZΛ        X'WX     X'Wy  ]   =  L L',
    [   y'WZΛ        y'WX     y'Wy  ]

is factored blockwise, as MixedModels.jl does:

* block 0, the first random-effects term (lme4 puts the term with the most
  levels first), is **diagonal** (scalar term) or **uniform block diagonal**
  (k × k blocks, vector term) and stays so in L: its factor is computed level by
  level, vectorised;
* the off-diagonal block below it is **sparse** (one nonzero per pair of levels
  that share observations);
* everything after it — later terms, then X and y — is one **dense** block that
  absorbs the fill-in, factored by LAPACK.

The cross-products are computed once per weight vector (once per model for an
LMM, once per PIRLS iteration for a GLMM) by scatter-adds (``np.bincount``) over
index maps built once from the terms: each observation's products of Z columns
go to fixed positions of the per-level blocks, of the values of the sparse block
(whose sparsity pattern, and so the symbolic part of its products, never changes)
and of the dense block. Per θ only Λ is applied and L refactored. No dense q × q
matrix is formed: the largest block is never dense. When every term is scalar
and the sparse block is dense-ish (e.g. fully crossed factors), its products run
on a dense copy instead, one BLAS call for the whole downdate.

From the factor: ``log|L_Z|²``, the fixed-effects factor R_X (``log|R_X|²``),
the penalised residual sum of squares r², β̂, the spherical conditional modes u
and their conditional covariance blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from ..builder.terms import ReTerm

__all__ = ["BlockedSystem"]


class _GramProduct:
    """S ↦ dense S S' for matrices sharing one CSR sparsity pattern.

    The symbolic work of the sparse product (its size bound, the transpose's
    pattern) is done once; each call runs only the numeric product. Falls back to
    the public scipy product where the private kernel is unavailable.
    """

    def __init__(self, S: sp.csr_matrix) -> None:
        S = S.tocsr()
        St = S.T.tocsr()
        # permutation taking S.data to St.data (same pattern every call)
        marker = S.copy()
        marker.data = np.arange(S.nnz, dtype=float)
        self._perm = marker.T.tocsr().data.astype(np.intp)
        self._St = St
        self.shape = (S.shape[0], S.shape[0])
        try:
            from scipy.sparse import _sparsetools as st

            self._kernel = st.csr_matmat
            nmax = st.csr_matmat_maxnnz(S.shape[0], S.shape[0], S.indptr, S.indices, St.indptr, St.indices)
            idx = S.indices.dtype
            self._Cp = np.empty(S.shape[0] + 1, dtype=idx)
            self._Cj = np.empty(nmax, dtype=idx)
            self._Cx = np.empty(nmax, dtype=float)
        except Exception:  # pragma: no cover - depends on scipy internals
            self._kernel = None

    def __call__(self, S: sp.csr_matrix) -> np.ndarray:
        St = self._St
        St.data = S.data[self._perm]
        if self._kernel is None:  # pragma: no cover
            return (S @ St).toarray()
        n = self.shape[0]
        self._kernel(n, n, S.indptr, S.indices, S.data, St.indptr, St.indices, St.data, self._Cp, self._Cj, self._Cx)
        nnz = int(self._Cp[-1])
        C = sp.csr_matrix((self._Cx[:nnz], self._Cj[:nnz], self._Cp), shape=self.shape)
        return C.toarray()


def _bsr_blockdiag(blocks: np.ndarray) -> sp.bsr_matrix:
    """Block-diagonal sparse matrix from an (nlev, k, k) array."""
    nlev, k, _ = blocks.shape
    idx = np.arange(nlev, dtype=np.int32)
    return sp.bsr_matrix((blocks, idx, np.arange(nlev + 1, dtype=np.int32)), shape=(nlev * k, nlev * k))


def _dpotrf(a, **kw):
    from scipy.linalg.lapack import dpotrf

    return dpotrf(a, **kw)


def _trsv(L: np.ndarray, b: np.ndarray, trans: bool = False) -> np.ndarray:
    """Solve L x = b or L' x = b for lower-triangular L (LAPACK dtrtrs, no wrapper overhead)."""
    from scipy.linalg.lapack import dtrtrs

    x, info = dtrtrs(L, b, lower=1, trans=1 if trans else 0)
    if info != 0:  # pragma: no cover - singular factor
        raise np.linalg.LinAlgError("singular triangular factor")
    return x


def _centre_scale(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(b0, s, (y - X b0)/s): y less its weighted least-squares fit on X, scaled to unit RMS.

    r² read off the factor of ``[ZΛ X y]`` is y'Wy minus what the other columns
    explain: with y far from 0 (``Reaction + 1e8``) that difference cancels every
    digit. The profiled deviance depends on y only through y − Xβ, so the system
    is built for the residual of y's least-squares fit on X (computed by an
    orthogonal factorization, refined once), scaled to RMS 1; β̂, u and r² are
    mapped back (β̂ = b0 + s β̂', u = s u', r² = s² r²'). Exact algebra, digits kept.
    """
    n, p = X.shape
    sw = np.sqrt(w)
    b0 = np.zeros(p)
    y = np.asarray(y, dtype=float)
    r = y.copy()
    if p and np.any(r) and np.all(np.isfinite(r)):
        # normal equations with iterative refinement on the residual: each step uses the residual
        # computed from the data, so b0 converges to the least-squares fit while cond(X)² eps < 1;
        # an orthogonal factorization (4-30x slower on tall X) only where that fails
        Xw = X * w[:, None]
        try:
            c = sla.cho_factor(Xw.T @ X, lower=True, check_finite=False)
            solve = lambda v: sla.cho_solve(c, Xw.T @ v, check_finite=False)  # noqa: E731
            steps = 4
        except np.linalg.LinAlgError:
            Q, R = np.linalg.qr(X * sw[:, None])
            solve = lambda v: sla.solve_triangular(R, Q.T @ (sw * v), check_finite=False)  # noqa: E731
            steps = 2
        for _ in range(steps):
            b0 += solve(r)
            r_new = y - X @ b0
            # r² depends on r only through its size next to the true residual: stop once a step
            # no longer changes it
            done = np.linalg.norm(r_new - r) <= 1e-6 * np.linalg.norm(r_new)
            r = r_new
            if done:
                break
    ss = float(np.sum(w * r * r))
    s = np.sqrt(ss / n) if ss > 0 and np.isfinite(ss) else 1.0
    return b0, s, r / s


class BlockedSystem:
    """BlockedSystem(terms, X, y=None, weights=None)

    Cross-products of ``[Z X y]`` for the given terms and their blocked Cholesky
    factor as a function of θ.

    The cross-products are scatter-adds (``np.bincount``) over index maps built
    once from the terms, so new weights (:meth:`reweight`, PIRLS) or a new X, y or
    weights (:meth:`update`) cost no sparse matrix product, and the sparsity
    pattern of the off-diagonal block ``S_A`` never changes.

    Parameters
    ----------
    terms : sequence of ReTerm
        In lme4 order (the first gets the diagonal/block-diagonal block).
    X : ndarray (n, p)
        Fixed-effects matrix (p may be 0, as PIRLS with β held fixed needs).
    y : ndarray (n,), optional
        Response (or working response); zeros if omitted (PIRLS then calls
        :meth:`reweight`).
    weights : ndarray (n,), optional
        Observation weights W (prior weights for an LMM, IRLS weights for PIRLS).

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> bs = BlockedSystem(m.terms, m.X, m.y)
    >>> round(bs.factor(m.lambda_blocks([1.0, 0.0, 1.0])).pwrss, 4)
    105615.621
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> bs = BlockedSystem(m.terms, m.X).reweight(np.ones(m.n), m.y, float(m.y @ m.y))
    >>> round(bs.factor(m.lambda_blocks([1.0])).logdet_L, 6)
    23.002134
    """

    def __init__(self, terms: Sequence[ReTerm], X: np.ndarray, y: np.ndarray | None = None,
                 weights: np.ndarray | None = None):
        self.terms = list(terms)
        n = X.shape[0]
        self.n = n
        t0 = self.terms[0]
        self.k0 = t0.k
        self.nlev0 = t0.nlev
        self.q0 = t0.q
        rest = self.terms[1:]
        self.q_rest = int(sum(t.q for t in rest))
        self.q = self.q0 + self.q_rest
        self._rest_scalar = all(t.is_scalar for t in rest)
        self._set_X(X)
        self._build_maps()
        self._y = np.zeros(n) if y is None else np.asarray(y, dtype=float)
        self._w = None
        self.Sd = None
        self.update(weights=weights)

    # ------------------------------------------------------------------ scatter maps
    def _set_X(self, X: np.ndarray) -> None:
        self._X = np.ascontiguousarray(X, dtype=float)
        self.p = self._X.shape[1]
        self._F1 = np.column_stack([self._X, np.ones(self.n)])  # [X 1]: weighted in one contiguous pass

    def _build_maps(self) -> None:
        """Index maps of the cross-products, computed once: the scatter targets of each
        observation's products of Z columns and the fixed pattern of ``S_A``."""
        n, q0, qr = self.n, self.q0, self.q_rest
        t0 = self.terms[0]
        k0 = t0.k
        self._refs0 = np.asarray(t0.refs, dtype=np.intp)
        self._pairs0 = [(a, b) for a in range(k0) for b in range(a, k0)]
        self._z0prod = [t0.z[:, a] * t0.z[:, b] for a, b in self._pairs0]
        self._Z0t = t0.Z().T.tocsr()
        rest = self.terms[1:]
        self._dense_S = False
        if not rest:
            self.S_A = None
            return
        self._Zrt = sp.hstack([t.Z() for t in rest], format="csc").T.tocsr()
        # per-observation rest columns (global index within the rest block) and values
        cols, vals = [], []
        off = 0
        for t in rest:
            for b in range(t.k):
                cols.append(off + np.asarray(t.refs, dtype=np.int64) * t.k + b)
                vals.append(t.z[:, b])
            off += t.q
        Jr = np.column_stack(cols)  # n × m_r
        Vr = np.column_stack(vals)
        J0 = self._refs0.astype(np.int64)[:, None] * k0 + np.arange(k0)[None, :]  # n × k0
        mr = Jr.shape[1]
        # S_A = Zr' W Z0: pattern from index pairs (values may cancel; keep the pattern fixed)
        keys = (Jr[:, :, None] * q0 + J0[:, None, :]).reshape(n, mr * k0)
        prod = (Vr[:, :, None] * t0.z[:, None, :]).reshape(n, mr * k0)
        ukeys, inv = np.unique(keys.ravel(), return_inverse=True)
        self._S_pos = inv.astype(np.intp).ravel()
        self._S_val = prod.ravel()
        self._S_obs = None if mr * k0 == 1 else np.repeat(np.arange(n), mr * k0)
        rows = ukeys // q0
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=qr))]).astype(np.int32)
        self.S_A = sp.csr_matrix((np.zeros(ukeys.size), (ukeys % q0).astype(np.int32), indptr), shape=(qr, q0))
        self._S_rows = rows.astype(np.intp)
        self._sst = _GramProduct(self.S_A)
        self._S_work = self.S_A.copy()  # S = Λr' S_A R0 shares the pattern: values overwritten per θ
        # Zr' W Zr, dense (q_rest is the dense block anyway)
        self._R_pos = (Jr[:, :, None] * qr + Jr[:, None, :]).reshape(n * mr * mr).astype(np.intp)
        self._R_diag = Jr[:, 0].astype(np.intp) if mr == 1 else None
        self._R_val = (Vr[:, :, None] * Vr[:, None, :]).reshape(n * mr * mr)
        self._R_obs = None if mr == 1 else np.repeat(np.arange(n), mr * mr)
        # a dense copy of the off-diagonal block pays when it is dense-ish (VerbAgg: 100 %)
        self._dense_S = (self._rest_scalar and k0 == 1
                         and (qr * q0 <= 3 * self.S_A.nnz or qr * q0 <= 200_000))
        if self._dense_S:
            self._S_flat = (self._S_rows * q0 + self.S_A.indices).astype(np.intp)
            self._lam_idx = np.concatenate([np.full(t.nlev, i) for i, t in enumerate(rest)]).astype(np.intp)

    # ------------------------------------------------------------------ cross-products
    def update(self, X: np.ndarray | None = None, y: np.ndarray | None = None, weights: np.ndarray | None = None) -> BlockedSystem:
        """update(X=None, y=None, weights=None) -> self

        Recompute the cross-products for new weights and/or a new X or y (the
        others are kept); :meth:`reweight` on the stored X, y and weights.
        """
        if X is not None:
            self._set_X(X)
        if y is not None:
            self._y = np.asarray(y, dtype=float)
        if weights is not None:
            self._w = np.asarray(weights, dtype=float)
        w = np.ones(self.n) if self._w is None else self._w
        shift, scale, yc = _centre_scale(self._X, self._y, w)
        wy = w * yc
        self._reweight(w, wy, float(wy @ yc))
        self._yshift, self._yscale = shift, scale
        #: RMS of y's weighted least-squares residual on X (0: y has no variation beyond X)
        self.y_residual_rms = float(scale * np.sqrt(np.mean(w * yc * yc)))
        return self

    def reweight(self, w: np.ndarray, wy: np.ndarray, ywy: float) -> BlockedSystem:
        """reweight(w, wy, ywy) -> self

        Cross-products for observation weights ``w`` and weighted response
        ``wy = W y`` (given directly, so zero weights are harmless) with
        ``ywy = y'Wy`` (only the penalised residual sum of squares uses it), by
        scatter-adds over the precomputed index maps (PIRLS calls this once per
        iteration with IRLS weights and working response). The response is used
        as given (:meth:`update` centres and scales it first).
        """
        self._reweight(w, wy, ywy)
        self._yshift, self._yscale = np.zeros(self.p), 1.0
        return self

    def _reweight(self, w: np.ndarray, wy: np.ndarray, ywy: float) -> None:
        nlev, k = self.nlev0, self.k0
        refs0 = self._refs0
        if k == 1:
            self.A00 = np.bincount(refs0, w * self._z0prod[0], minlength=nlev).reshape(nlev, 1, 1)
        else:
            A00 = np.empty((nlev, k, k))
            for (a, b), zz in zip(self._pairs0, self._z0prod):
                A00[:, a, b] = A00[:, b, a] = np.bincount(refs0, w * zz, minlength=nlev)
            self.A00 = A00
        p = self.p
        Fw = self._F1 * w[:, None]
        Fw[:, p] = wy
        self.G_A = np.asarray(self._Z0t @ Fw).T  # (p+1) × q0, F'WZ0
        if p:
            XwX = self._X.T @ Fw
            FWF = np.empty((p + 1, p + 1))
            FWF[:p, :] = XwX
            FWF[p, :p] = XwX[:, p]
            FWF[p, p] = ywy
        else:
            FWF = np.array([[ywy]])
        if self.S_A is not None:
            qr = self.q_rest
            wS = w if self._S_obs is None else w[self._S_obs]
            self.S_A.data = np.bincount(self._S_pos, wS * self._S_val, minlength=self.S_A.nnz)
            if self._R_diag is not None:
                RR = np.diag(np.bincount(self._R_diag, w * self._R_val, minlength=qr))
            else:
                RR = np.bincount(self._R_pos, w[self._R_obs] * self._R_val, minlength=qr * qr).reshape(qr, qr)
            ZrWF = np.asarray(self._Zrt @ Fw)
            self.A_rr = np.block([[RR, ZrWF], [ZrWF.T, FWF]])
        else:
            self.A_rr = FWF
        self._w = w

    # ------------------------------------------------------------------ factorization
    def _lambda_rest(self, Ts: Sequence[np.ndarray]):
        if self._rest_scalar:
            lam = np.concatenate([np.full(t.nlev, T[0, 0]) for t, T in zip(self.terms[1:], Ts[1:])]
                                 + [np.ones(self.p + 1)])
            return lam
        blocks = [sp.kron(sp.identity(t.nlev), sp.csr_matrix(T)) for t, T in zip(self.terms[1:], Ts[1:])]
        blocks.append(sp.identity(self.p + 1))
        return sp.block_diag(blocks, format="csr")

    def factor(self, Ts: Sequence[np.ndarray]) -> BlockedSystem:
        """factor(Ts) -> self

        Factor the system at Λ given by the per-term factors ``Ts``
        (:meth:`Model.lambda_blocks`). Sets ``L0`` (level blocks of block 0),
        ``S`` (sparse block below it), ``G`` (X/y rows below it) and ``Ld``
        (dense factor of everything after block 0). When every term is scalar
        and the off-diagonal block is dense-ish, its products run on a dense copy
        ``Sd`` of ``S`` (same result); otherwise ``Sd`` is None.
        """
        if self._dense_S:
            return self._factor_dense(Ts)
        self.Sd = None
        T0 = Ts[0]
        k, nlev = self.k0, self.nlev0
        # --- block 0: L0_l = chol(T0' A_l T0 + I), per level
        if k == 1:
            t = T0[0, 0]
            l0 = np.sqrt(t * t * self.A00[:, 0, 0] + 1.0)
            self.L0 = l0.reshape(nlev, 1, 1)
            scale0 = t / l0  # right factor Λ0 L0^{-T} is diagonal
            R0 = None
        else:
            M = np.einsum("ba,lbc,cd->lad", T0, self.A00, T0)
            M[:, np.arange(k), np.arange(k)] += 1.0
            self.L0 = np.linalg.cholesky(M)
            # R0_l = T0 L0_l^{-T}
            Linv = np.linalg.inv(self.L0)
            R0 = np.einsum("ab,lcb->lac", T0, Linv)
            scale0 = None
        self._R0 = R0
        # --- blocks below block 0: (rest rows) S = Λr' S_A R0 and (F rows) G = G_A R0
        if scale0 is not None:
            G = self.G_A * scale0[None, :]
        else:
            G = np.einsum("rla,lab->rlb", self.G_A.reshape(-1, nlev, k), R0).reshape(self.G_A.shape)
        self.G = G
        lam = self._lambda_rest(Ts)
        if self.S_A is not None and self._rest_scalar and scale0 is not None:
            # same sparsity as S_A: scale its values in place of two sparse products
            S = self._S_work
            np.multiply(self.S_A.data, lam[: self.q_rest][self._S_rows] * scale0[S.indices], out=S.data)
            self.S = S
            same_pattern = True
        elif self.S_A is not None:
            same_pattern = False
            S = self.S_A
            if self._rest_scalar:
                S = sp.diags(lam[: self.q_rest]) @ S
            else:
                S = lam[: self.q_rest, : self.q_rest].T @ S
            S = S @ sp.diags(scale0) if scale0 is not None else S @ _bsr_blockdiag(R0)
            self.S = S.tocsr()
        else:
            self.S = None
        # --- dense remainder: Λ' A_rr Λ + I - [S;G][S;G]'
        qr = self.q_rest
        if self._rest_scalar:
            D = self.A_rr * np.outer(lam, lam)
        else:
            D = np.asarray(lam.T @ np.asarray(lam.T @ self.A_rr).T)
        D[np.arange(qr), np.arange(qr)] += 1.0
        if self.S is not None:
            SG = np.asarray(self.S @ G.T)  # q_rest × (p+1)
            D[:qr, :qr] -= self._sst(self.S) if same_pattern else (self.S @ self.S.T).toarray()
            D[:qr, qr:] -= SG
            D[qr:, :qr] -= SG.T
        D[qr:, qr:] -= G @ G.T
        self.Ld = sla.cholesky(D, lower=True, overwrite_a=True, check_finite=False)
        return self

    def _factor_dense(self, Ts: Sequence[np.ndarray]) -> BlockedSystem:
        """:meth:`factor` for scalar terms with a dense-ish off-diagonal block: the products
        with S run on a dense copy ``Sd`` (one BLAS call for the whole downdate)."""
        t = float(Ts[0][0, 0])
        nlev, qr, q0 = self.nlev0, self.q_rest, self.q0
        l0 = np.sqrt(t * t * self.A00[:, 0, 0] + 1.0)
        self.L0 = l0.reshape(nlev, 1, 1)
        self._R0 = None
        scale0 = t / l0
        G = self.G_A * scale0[None, :]
        self.G = G
        lam_r = np.array([float(T[0, 0]) for T in Ts[1:]])[self._lam_idx]
        S = self._S_work  # same pattern every time: overwrite the values
        np.multiply(self.S_A.data, lam_r[self._S_rows] * scale0[S.indices], out=S.data)
        self.S = S
        Sd = np.zeros(qr * q0)
        Sd[self._S_flat] = S.data
        Sd = Sd.reshape(qr, q0)
        self.Sd = Sd
        lam = np.concatenate([lam_r, np.ones(self.p + 1)])
        D = self.A_rr * np.outer(lam, lam)
        D[np.arange(qr), np.arange(qr)] += 1.0
        SG = np.vstack([Sd, G])
        D -= SG @ SG.T
        Ld, info = _dpotrf(D, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"{info}-th leading minor of the dense block is not positive definite")
        self.Ld = Ld
        return self

    # ------------------------------------------------------------------ quantities
    @property
    def logdet_L(self) -> float:
        """log|L_Z|² = log det(Λ'Z'WZΛ + I)."""
        d0 = np.log(np.diagonal(self.L0, axis1=1, axis2=2)).sum()
        dr = np.log(np.diag(self.Ld)[: self.q_rest]).sum()
        return float(2.0 * (d0 + dr))

    @property
    def RX(self) -> np.ndarray:
        """Lower-triangular p × p fixed-effects factor (R_X' in lme4's notation)."""
        a = self.q_rest
        return self.Ld[a : a + self.p, a : a + self.p]

    @property
    def logdet_RX(self) -> float:
        """log|R_X|²."""
        return float(2.0 * np.log(np.diag(self.RX)).sum())

    @property
    def pwrss(self) -> float:
        """Penalised weighted residual sum of squares r²."""
        return float(self._yscale**2 * self.Ld[-1, -1] ** 2)

    def beta(self) -> np.ndarray:
        """β̂ at the current θ."""
        if self.p == 0:
            return np.zeros(0)
        a = self.q_rest
        return self._yshift + self._yscale * _trsv(self.RX, self.Ld[-1, a : a + self.p], trans=True)

    def u(self, beta: np.ndarray | None = None) -> np.ndarray:
        """Spherical conditional modes u (Λu = b), given β (default β̂)."""
        if beta is None:
            beta = self.beta()
        s = self._yscale
        beta = (np.asarray(beta, dtype=float) - self._yshift) / s  # on the internal (centred, scaled) y scale
        qr, p = self.q_rest, self.p
        # right-hand side c - L_XZ' β, for the Z columns
        rhs0 = self.G[-1] - self.G[:p].T @ beta if p else self.G[-1].copy()
        ur = np.zeros(0)
        if qr:
            rhs_r = self.Ld[-1, :qr] - self.Ld[qr : qr + p, :qr].T @ beta if p else self.Ld[-1, :qr].copy()
            ur = _trsv(self.Ld[:qr, :qr], rhs_r, trans=True)
            rhs0 -= (self.S if self.Sd is None else self.Sd).T @ ur
        u0 = self._solve_L0t(rhs0)
        return s * np.concatenate([u0, ur])

    def _solve_L0t(self, v: np.ndarray) -> np.ndarray:
        nlev, k = self.nlev0, self.k0
        if k == 1:
            return v / self.L0[:, 0, 0]
        Linv = np.linalg.inv(self.L0)
        return np.einsum("lba,lb->la", Linv, v.reshape(nlev, k)).ravel()

    def cond_cov_u(self) -> list[np.ndarray]:
        """Diagonal blocks of (L_Z L_Z')^{-1}, one (nlev, k, k) array per term.

        Var(u | y) = σ² (L_Z L_Z')^{-1}; lme4's ``condVar`` is Λ of this Λ'.
        """
        k, qr = self.k0, self.q_rest
        L0inv = np.linalg.inv(self.L0)  # (nlev, k, k)
        out0 = np.einsum("lba,lbc->lac", L0inv, L0inv)
        res: list[np.ndarray] = []
        if qr:
            Lrr = self.Ld[:qr, :qr]
            # W = -Lrr^{-1} S L0^{-1}; add W_l'W_l to block l, in column chunks
            SL = (self.S @ _bsr_blockdiag(L0inv)).tocsc() if k > 1 else (self.S @ sp.diags(L0inv[:, 0, 0])).tocsc()
            chunk = max(1, int(2e7 // max(qr, 1)) // k * k)
            for c0 in range(0, self.q0, chunk):
                c1 = min(self.q0, c0 + chunk)
                W = sla.solve_triangular(Lrr, SL[:, c0:c1].toarray(), lower=True, check_finite=False)
                Wl = W.reshape(qr, (c1 - c0) // k, k)
                out0[c0 // k : c1 // k] += np.einsum("rla,rlb->lab", Wl, Wl)
            Linv = sla.solve_triangular(Lrr, np.eye(qr), lower=True, check_finite=False)
            off = 0
            for t in self.terms[1:]:
                cols = Linv[:, off : off + t.q].reshape(qr, t.nlev, t.k)
                res.append(np.einsum("rla,rlb->lab", cols, cols))
                off += t.q
        return [out0, *res]
