"""Matloff's random-N moment estimators for the one-factor model.

Model: ``Y_ij = x_ij'β + α_i + ε_ij`` for clusters ``i = 1..G`` of sizes ``N_i``, with
``α_i ~ (0, σ²_α)`` and ``ε_ij ~ (0, σ²_ε)``, and — Matloff's point of view (JSM 2016)
— the cluster sizes ``N_i`` themselves random, i.i.d. across clusters and
independent of the ``α_i``. Everything the estimators need is a sum over
clusters of a cluster summary ``(N_i, S_i = Σ_j Y_ij, Q_i = Σ_j Y_ij², s_i = Σ_j x_ij, ...)``;
combining chunks of data is adding their summaries by cluster.

Law of total variance (no covariates). With ``S_i`` the cluster sum,
``E[S | N] = μN`` and ``Var(S | N) = σ²_α N² + σ²_ε N``, so

* ``E[S − μN]² = σ²_α E[N²] + σ²_ε E[N]``  (the cluster-sum equation) and
* ``E[Y − μ]² = σ²_α + σ²_ε``  (one observation).

``method="matloff"`` solves these two equations with the sample sums in place of
the expectations, ``μ`` (or ``β``) by ordinary least squares and the residual
``r = y − Xβ̂``::

    Σ_i R_i² = σ²_α T11 + σ²_ε T12,    Σ r² = σ²_α T12 + σ²_ε (n − p),
    R_i = Σ_j r_ij,  T11 = ΣN_i² − 2 tr(G C) + tr(G B G B),  T12 = n − tr(G B),

with ``G = (X'X)⁻¹``, ``B = Σ s_i s_i'`` and ``C = Σ N_i s_i s_i'``. The ``T``'s are the
exact expectations given the sizes and covariates (they account for ``β̂``), so
the estimator is unbiased conditionally on the ``N_i`` and hence also under
random ``N``. (In matrix form these are the quadratic forms ``r'ZZ'r`` and ``r'r``:
the MINQUE(0) equations.) Without covariates ``T11 = ΣN² − 2ΣN³/n + (ΣN²)²/n²``
and ``T12 = n − ΣN²/n``.

``method="anova"`` is Henderson's method III (the ANOVA estimator: within-cluster
and between-cluster sums of squares after the fixed effects); on balanced data
it equals REML when positive. Both need only the cluster summaries.

The random-N effect model ``Y_ij = c1 + c2 N_i + α_i + ε_ij`` (``size_effect=True``)
adds ``N_i`` as a cluster-level covariate — again computable from the summaries
(``Σ_j N_i = N_i²``, ``Σ_j N_i Y_ij = N_i S_i``, ...).

Standard errors
---------------
* fixed effects: generalized least squares given the variance estimates, in
  closed form per cluster (``V_i⁻¹ = (I − γ_i 11')/σ²_ε``, ``γ_i = σ²_α/(σ²_ε + N_iσ²_α)``):
  the model-based GLS covariance.
* variance components, ``se="delta"``: the delta method with the clusters as
  i.i.d. draws of ``(N_i, α_i, ε_i)`` — the estimator is a smooth function of a
  sum of i.i.d. cluster vectors ``v_i``, so ``Var ≈ J Var(Σ v_i) J'`` with
  ``Var(Σ v_i)`` estimated by the sum of centred outer products and ``J`` by
  central differences. It is distribution-free (no normality) and accounts for
  the randomness of the ``N_i``.
* ``se="bootstrap"``: the cluster bootstrap (clusters resampled with
  replacement), computed exactly and vectorised on the cluster summaries; it
  also gives bootstrap SEs of the GLS fixed effects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..errors import DataError, DesignError

__all__ = ["ClusterTable", "fit_oneway"]


@dataclass
class ClusterTable:
    """Per-cluster sufficient statistics of the one-factor model.

    Attributes
    ----------
    keys : pandas.Index
        Cluster labels.
    N, S, Q : numpy.ndarray
        Size, sum of y and sum of y² of each cluster.
    s, xy : numpy.ndarray
        G × p sums of x and of x·y in each cluster.
    xx : numpy.ndarray or None
        G × p × p per-cluster X'X (needed for standard errors), or ``None``.
    XtX : numpy.ndarray
        p × p total X'X.
    parts : numpy.ndarray
        Number of chunks each cluster was seen in.
    """

    keys: pd.Index
    N: np.ndarray
    S: np.ndarray
    Q: np.ndarray
    s: np.ndarray
    xy: np.ndarray
    xx: np.ndarray | None
    XtX: np.ndarray
    parts: np.ndarray

    @classmethod
    def from_arrays(cls, X: np.ndarray, y: np.ndarray, codes: np.ndarray, keys: pd.Index,
                    per_cluster_xx: bool = True) -> ClusterTable:
        """from_arrays(X, y, codes, keys, per_cluster_xx=True) -> ClusterTable

        Cluster sums by ``np.bincount`` (no loop over clusters); ``codes`` index ``keys``.
        Clusters without rows are dropped.
        """
        G = len(keys)
        codes = np.asarray(codes, dtype=np.intp)
        p = X.shape[1]
        N = np.bincount(codes, minlength=G).astype(float)
        S = np.bincount(codes, weights=y, minlength=G)
        Q = np.bincount(codes, weights=y * y, minlength=G)
        s = np.empty((G, p))
        xy = np.empty((G, p))
        for k in range(p):  # p columns, each a single O(n) pass
            s[:, k] = np.bincount(codes, weights=X[:, k], minlength=G)
            xy[:, k] = np.bincount(codes, weights=X[:, k] * y, minlength=G)
        xx = None
        if per_cluster_xx:
            xx = np.empty((G, p, p))
            for k in range(p):
                for j in range(k, p):
                    xx[:, k, j] = xx[:, j, k] = np.bincount(codes, weights=X[:, k] * X[:, j], minlength=G)
        tab = cls(keys=keys, N=N, S=S, Q=Q, s=s, xy=xy, xx=xx, XtX=X.T @ X, parts=np.ones(G))
        return tab.take(np.flatnonzero(N > 0)) if np.any(N == 0) else tab

    def take(self, idx: np.ndarray) -> ClusterTable:
        return replace(self, keys=self.keys[idx], N=self.N[idx], S=self.S[idx], Q=self.Q[idx], s=self.s[idx],
                       xy=self.xy[idx], xx=None if self.xx is None else self.xx[idx], parts=self.parts[idx])

    @property
    def G(self) -> int:
        return len(self.N)

    @property
    def p(self) -> int:
        return self.s.shape[1]

    @staticmethod
    def merge(tables: list[ClusterTable]) -> ClusterTable:
        """merge(tables) -> ClusterTable

        Add the summaries of chunks cluster by cluster (exact: every statistic is a sum).
        """
        tables = [t for t in tables if t is not None and t.G > 0]
        if not tables:
            raise DataError("no rows in any chunk")
        if len(tables) == 1:
            return tables[0]
        keys = tables[0].keys.append([t.keys for t in tables[1:]])
        codes, uniq = keys.factorize()
        p = tables[0].p
        has_xx = all(t.xx is not None for t in tables)
        cols = [np.concatenate([t.N for t in tables]), np.concatenate([t.S for t in tables]),
                np.concatenate([t.Q for t in tables]), np.concatenate([t.parts for t in tables])]
        mats = [np.vstack([t.s for t in tables]), np.vstack([t.xy for t in tables])]
        if has_xx:
            mats.append(np.vstack([t.xx.reshape(t.G, p * p) for t in tables]))
        big = np.column_stack(cols + mats)
        summed = pd.DataFrame(big).groupby(codes, sort=False).sum().to_numpy()
        G = len(uniq)
        xx = summed[:, 4 + 2 * p:].reshape(G, p, p) if has_xx else None
        return ClusterTable(keys=uniq, N=summed[:, 0], S=summed[:, 1], Q=summed[:, 2], parts=summed[:, 3],
                            s=summed[:, 4:4 + p], xy=summed[:, 4 + p:4 + 2 * p], xx=xx,
                            XtX=sum(t.XtX for t in tables))

    def select(self, keep: np.ndarray) -> ClusterTable:
        """Keep fixed-effects columns ``keep`` (a boolean mask)."""
        k = np.flatnonzero(keep)
        return replace(self, s=self.s[:, k], xy=self.xy[:, k], XtX=self.XtX[np.ix_(k, k)],
                       xx=None if self.xx is None else self.xx[:, k][:, :, k])

    def with_size(self) -> ClusterTable:
        """Append the cluster size ``N_i`` as a covariate (constant within cluster)."""
        N = self.N
        s = np.column_stack([self.s, N * N])
        xy = np.column_stack([self.xy, N * self.S])
        Ns = (N[:, None] * self.s)
        XtX = np.block([[self.XtX, Ns.sum(0)[:, None]], [Ns.sum(0)[None, :], np.array([[np.sum(N**3)]])]])
        xx = None
        if self.xx is not None:
            G, p = self.G, self.p
            xx = np.empty((G, p + 1, p + 1))
            xx[:, :p, :p] = self.xx
            xx[:, :p, p] = xx[:, p, :p] = Ns
            xx[:, p, p] = N**3
        return replace(self, s=s, xy=xy, XtX=XtX, xx=xx)


# ---------------------------------------------------------------------------------------------
# cluster contributions and their (weighted) totals
# ---------------------------------------------------------------------------------------------
def _contributions(ct: ClusterTable) -> dict[str, np.ndarray]:
    """Per-cluster vectors whose sums are every total the estimators use (G leading)."""
    N, S, s = ct.N, ct.S, ct.s
    ss = s[:, :, None] * s[:, None, :]
    xx = ct.xx if ct.xx is not None else None
    out = {
        "one": np.ones_like(N), "n": N, "n2": N * N, "yy": ct.Q, "S2": S * S, "S2N": S * S / N,
        "Xty": ct.xy, "sS": s * S[:, None], "sSN": s * (S / N)[:, None],
        "B": ss, "C": ss * N[:, None, None], "BN": ss / N[:, None, None],
    }
    if xx is not None:
        out["XtX"] = xx
    return out


def _totals(contrib: dict[str, np.ndarray], W: np.ndarray | None, XtX: np.ndarray) -> dict[str, np.ndarray]:
    """Batched totals ``Σ_i w_bi v_i`` (leading batch axis); ``W=None`` is the data itself."""
    if W is None:
        W = np.ones((1, len(contrib["n"])))
    tot = {k: np.tensordot(W, v, axes=(1, 0)) for k, v in contrib.items()}
    if "XtX" not in tot:
        tot["XtX"] = np.broadcast_to(XtX, (W.shape[0],) + XtX.shape).copy()
    return tot


def _tr(a: np.ndarray) -> np.ndarray:
    return np.trace(a, axis1=-2, axis2=-1)


def _bdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("bi,bi->b", a, b)


def _quad(A: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.einsum("bi,bij,bj->b", v, A, v)


def _ols(T: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    Ginv = np.linalg.inv(T["XtX"])
    beta = np.einsum("bij,bj->bi", Ginv, T["Xty"])
    return Ginv, beta


def _est_matloff(T: dict[str, np.ndarray], p: int, rw: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Ginv, beta = _ols(T)
    rr = T["yy"] - _bdot(beta, T["Xty"])
    q1 = T["S2"] - 2 * _bdot(beta, T["sS"]) + _quad(T["B"], beta)
    GB = Ginv @ T["B"]
    t11 = T["n2"] - 2 * _tr(Ginv @ T["C"]) + np.einsum("bij,bji->b", GB, GB)
    t12 = T["n"] - _tr(GB)
    t22 = T["n"] - p
    det = t11 * t22 - t12 * t12
    s2a = (q1 * t22 - rr * t12) / det
    s2e = (t11 * rr - t12 * q1) / det
    return s2a, s2e, beta


def _within_rank(T: dict[str, np.ndarray]) -> int:
    Xw = T["XtX"][0] - T["BN"][0]
    lam = np.linalg.eigvalsh((Xw + Xw.T) / 2)
    scale = max(float(np.max(np.abs(np.diag(T["XtX"][0])))), 1e-300)
    return int(np.sum(lam > 1e-9 * scale))


def _est_anova(T: dict[str, np.ndarray], p: int, rw: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Ginv, beta = _ols(T)
    if rw is None:
        rw = _within_rank(T)
    Xw = T["XtX"] - T["BN"]
    Xwy = T["Xty"] - T["sSN"]
    scale = np.max(np.abs(np.diagonal(T["XtX"], axis1=1, axis2=2)), axis=1)
    lam, U = np.linalg.eigh((Xw + np.swapaxes(Xw, 1, 2)) / 2)
    # keep the rw largest eigen-directions (the within-cluster rank is a property of the design)
    inv = np.where(np.arange(p)[None, :] >= p - rw, 1.0 / np.where(lam == 0, 1.0, lam), 0.0)
    inv = np.where(lam > 1e-12 * scale[:, None], inv, 0.0)
    Pw = np.einsum("bij,bj,bkj->bik", U, inv, U)
    bw = np.einsum("bij,bj->bi", Pw, Xwy)
    sse = T["yy"] - T["S2N"] - _bdot(bw, Xwy)
    df_e = T["n"] - T["one"] - rw
    R = T["S2N"] + _bdot(bw, Xwy) - _bdot(beta, T["Xty"])
    df_a = T["one"] + rw - p
    s2e = sse / df_e
    s2a = (R - s2e * df_a) / (T["n"] - _tr(Ginv @ T["B"]))
    return s2a, s2e, beta


_ESTIMATORS = {"matloff": _est_matloff, "anova": _est_anova}


def _gls(ct: ClusterTable, s2a: np.ndarray, s2e: np.ndarray, W: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batched GLS fixed effects and covariance given (truncated) variance estimates."""
    s2a = np.clip(np.atleast_1d(s2a), 0.0, None)
    s2e = np.atleast_1d(s2e)
    weighted = W is not None
    if W is None:
        W = np.ones((1, ct.G))
    gam = s2a[:, None] / (s2e[:, None] + ct.N[None, :] * s2a[:, None])  # (b, G)
    Wg = W * gam
    p = ct.p
    ss = (ct.s[:, :, None] * ct.s[:, None, :]).reshape(ct.G, p * p)
    if weighted:
        if ct.xx is None:
            raise DataError("resampling needs per-cluster cross-products (per_cluster_xx=True)")
        XtX = np.tensordot(W, ct.xx, axes=(1, 0))
    else:
        XtX = ct.XtX[None]
    Xty = W @ ct.xy
    A = (XtX - (Wg @ ss).reshape(-1, p, p)) / s2e[:, None, None]
    rhs = (Xty - Wg @ (ct.s * ct.S[:, None])) / s2e[:, None]
    vcov = np.linalg.inv(A)
    beta = np.einsum("bij,bj->bi", vcov, rhs)
    return beta, vcov


def fit_oneway(ct: ClusterTable, *, method: str = "matloff", se: str | None = "delta", nboot: int = 200,
               seed: int | None = None, progress: bool = True) -> dict:
    """fit_oneway(ct, *, method="matloff", se="delta", nboot=200, seed=None, progress=True) -> dict

    Moment estimates of ``(σ²_α, σ²_ε)``, GLS fixed effects and standard errors from a
    :class:`ClusterTable` (fixed-effects columns already chosen). Returns a dict with
    ``s2a, s2e, beta, vcov, varcomp_se (2,), boot (nboot × (2+p) or None), se_method``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(300), 5); y = rng.normal(size=300)[g] + rng.normal(size=g.size)
    >>> ct = ClusterTable.from_arrays(np.ones((g.size, 1)), y, g, pd.RangeIndex(300))
    >>> out = fit_oneway(ct, se=None)
    >>> round(float(out["s2a"]), 2), round(float(out["s2e"]), 2)
    (1.01, 1.0)
    """
    if method not in _ESTIMATORS:
        raise ValueError(f"method must be one of {list(_ESTIMATORS)}, got {method!r}")
    if ct.G < 2:
        raise DesignError(f"{ct.G} cluster(s): a between-cluster variance needs at least two")
    if np.all(ct.N == 1):
        raise DesignError("every cluster has a single observation: σ²_α and σ²_ε are not separately identifiable")
    est = _ESTIMATORS[method]
    p = ct.p
    contrib = _contributions(ct)
    T = _totals(contrib, None, ct.XtX)
    rw = _within_rank(T) if method == "anova" else None
    s2a, s2e, _ = est(T, p, rw)
    s2a, s2e = float(s2a[0]), float(s2e[0])
    if not np.isfinite(s2a) or not np.isfinite(s2e):
        raise DesignError("the moment equations are singular for this design (too few clusters or observations)")
    if s2e > 0:
        beta, vcov = _gls(ct, np.array([s2a]), np.array([s2e]))
        beta, vcov = beta[0], vcov[0]
        fx = "fixed effects: GLS (model-based) given the moment variance estimates"
    else:  # σ²_ε truncated to 0: GLS is degenerate; OLS with its model-based covariance
        Ginv = np.linalg.inv(ct.XtX)
        beta = Ginv @ ct.xy.sum(axis=0)
        B = ct.s.T @ ct.s
        vcov = Ginv @ (max(s2a, 0.0) * B) @ Ginv
        fx = "fixed effects: OLS (σ²_ε estimate not positive) with model-based covariance"
    out = {"s2a": s2a, "s2e": s2e, "beta": beta, "vcov": vcov, "varcomp_se": None, "boot": None, "se_method": fx}
    if se is None:
        return out
    if ct.xx is None:
        raise DataError("standard errors need per-cluster cross-products (build the ClusterTable with per_cluster_xx=True)")
    if se == "delta":
        out["varcomp_se"] = _delta_se(contrib, T, lambda TT: est(TT, p, rw)[:2])
        out["se_method"] += "; variance components: delta method over i.i.d. clusters (random N)"
    elif se == "bootstrap":
        boot = _cluster_bootstrap(ct, contrib, est, p, rw, nboot, seed, progress)
        out["boot"] = boot
        out["varcomp_se"] = boot[:, :2].std(axis=0, ddof=1)
        out["boot_fixef_se"] = boot[:, 2:].std(axis=0, ddof=1)
        out["se_method"] = f"cluster bootstrap ({nboot} resamples of whole clusters)"
    else:
        raise ValueError(f"se must be 'delta', 'bootstrap' or None, got {se!r}")
    return out


def _delta_se(contrib: dict[str, np.ndarray], T: dict[str, np.ndarray], f) -> np.ndarray:
    """Delta-method standard errors of ``f(totals)`` with i.i.d. cluster contributions."""
    keys = list(contrib)
    shapes = [contrib[k].shape[1:] for k in keys]
    sizes = [int(np.prod(sh)) for sh in shapes]
    G = len(contrib["n"])
    t0 = np.hstack([T[k][0].reshape(-1) for k in keys])
    k = len(t0)
    h = 1e-5 * np.maximum(np.abs(t0), 1e-8 * max(np.max(np.abs(t0)), 1.0))
    pert = np.vstack([t0 + np.diag(h), t0 - np.diag(h)])  # (2k, k)
    TT = {}
    off = 0
    for key, sh, sz in zip(keys, shapes, sizes):
        TT[key] = pert[:, off:off + sz].reshape((2 * k,) + sh)
        off += sz
    vals = np.column_stack(f(TT))  # (2k, m)
    J = ((vals[:k] - vals[k:]) / (2 * h)[:, None]).T  # (m, k)
    # Var(Σ v_i) = G/(G-1) Σ (v_i - v̄)(v_i - v̄)', accumulated over blocks of clusters (bounded memory)
    vbar = t0 / G
    cov_t = np.zeros((k, k))
    step = max(1, int(2**22 // max(k, 1)))
    for a in range(0, G, step):
        Vc = np.hstack([contrib[key][a:a + step].reshape(-1, sz) for key, sz in zip(keys, sizes)]) - vbar
        cov_t += Vc.T @ Vc
    cov_t *= G / (G - 1)
    var = np.einsum("mi,ij,mj->m", J, cov_t, J)
    return np.sqrt(np.clip(var, 0, None))


def _cluster_bootstrap(ct: ClusterTable, contrib, est, p: int, rw, nboot: int, seed, progress: bool) -> np.ndarray:
    from ._common import progress_bar

    rng = np.random.default_rng(seed)
    G = ct.G
    batch = int(max(1, min(nboot, 2e7 // max(G * max(p * p, 4), 1))))
    out = []
    with progress_bar(nboot, "cluster bootstrap", not progress) as bar:
        done = 0
        while done < nboot:
            b = min(batch, nboot - done)
            W = rng.multinomial(G, np.full(G, 1.0 / G), size=b).astype(float)
            T = _totals(contrib, W, ct.XtX)
            s2a, s2e, beta_ols = est(T, p, rw)
            ok = s2e > 0
            beta = beta_ols.copy()
            if ok.any():
                beta[ok], _ = _gls(ct, s2a[ok], s2e[ok], W[ok])
            out.append(np.column_stack([s2a, s2e, beta]))
            done += b
            bar.update(b)
    return np.vstack(out)
