"""Two crossed random factors by moments: Gao–Owen style U-statistics.

Model: ``y = Xβ + a_{i(o)} + b_{j(o)} + e_o`` with ``a ~ (0, σ²_a)``, ``b ~ (0, σ²_b)`` and
``e ~ (0, σ²_e)``, any pattern of observed cells (unbalanced, replicated or not).
For two distinct observations o, o' the expected half squared difference of
``y − x'β`` is ``σ²_a [a differs] + σ²_b [b differs] + σ²_e``. Summing over pairs
sharing a level of ``a``, pairs sharing a level of ``b``, and all pairs gives three
U-statistics (Gao & Owen 2017, *Electronic Journal of Statistics* 11:1235–1296)::

    U_a = Σ_i (N_i Σ_{o∈i} r_o² − R_i²)     E = σ²_b (ΣN_i² − Σ_c n_c²) + σ²_e (ΣN_i² − n)
    U_b = Σ_j (M_j Σ_{o∈j} r_o² − R_j²)     E = σ²_a (ΣM_j² − Σ_c n_c²) + σ²_e (ΣM_j² − n)
    U_e = n Σ_o r_o² − (Σ_o r_o)²            E = σ²_a (n² − ΣN_i²) + σ²_b (n² − ΣM_j²) + σ²_e (n² − n)

(``N_i``, ``M_j``: level counts; ``n_c``: cell counts; ``R``: level sums.) With covariates
``r = y − Xβ̂`` are OLS residuals and the expectations get the exact corrections
``−2 tr(G X'AK X) + tr(G X'AX G X'KX)`` (``G = (X'X)⁻¹``, ``A`` the matrix of the
U-statistic, ``K`` the covariance pattern of a component), so the estimator is
unbiased given the design. Everything is a sum over observations or over levels:
one pass for per-level sums ``(N, Σy, Σy², Σx)`` and totals, and — only when X has
more than the intercept — a second pass for the products of per-observation and
per-level quantities. Cost O(n p²), memory O(levels · p).

Fixed effects are OLS; their covariance is the sandwich
``G (σ²_a Σ_i s_i s_i' + σ²_b Σ_j t_j t_j' + σ²_e X'X) G`` (``s_i``, ``t_j``: per-level
sums of x), as in Gao & Owen (2020, *Statistica Sinica*). Standard errors of the
variance components: the pigeonhole bootstrap (Owen 2007, *Annals of Applied
Statistics* 1:431–456; rows and columns resampled independently; mildly
conservative), on in-memory data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import DataError, DesignError

__all__ = ["LevelTable", "CrossedStats", "crossed_pass1", "crossed_pass2", "fit_crossed"]


@dataclass
class LevelTable:
    """Per-level sums of one grouping factor: count, Σy, Σy², Σx, and a multiplicity
    ``w`` (1 for the data; bootstrap copies otherwise) and ``parts`` (chunks seen in)."""

    keys: pd.Index
    N: np.ndarray
    S: np.ndarray
    Q: np.ndarray
    s: np.ndarray
    w: np.ndarray | None = None
    parts: np.ndarray | None = None

    def moments(self) -> dict[str, np.ndarray | float]:
        w = np.ones_like(self.N) if self.w is None else self.w
        ws = self.s * w[:, None]
        return {
            "n2": float(w @ (self.N**2)), "NQ": float(w @ (self.N * self.Q)), "NS": float(w @ (self.N * self.S)),
            "S2": float(w @ (self.S**2)), "sS": ws.T @ self.S, "B": ws.T @ self.s, "Ns": ws.T @ self.N,
        }

    @staticmethod
    def merge(tables: list[LevelTable]) -> LevelTable:
        if len(tables) == 1:
            return tables[0]
        keys = tables[0].keys.append([t.keys for t in tables[1:]])
        codes, uniq = keys.factorize()
        p = tables[0].s.shape[1]
        big = np.column_stack([np.concatenate([getattr(t, a) for t in tables]) for a in ("N", "S", "Q")]
                              + [np.concatenate([t.parts if t.parts is not None else np.ones(len(t.N)) for t in tables]),
                                 np.vstack([t.s for t in tables])])
        summed = pd.DataFrame(big).groupby(codes, sort=False).sum().to_numpy()
        return LevelTable(keys=uniq, N=summed[:, 0], S=summed[:, 1], Q=summed[:, 2], parts=summed[:, 3],
                          s=summed[:, 4:4 + p])


@dataclass
class CrossedStats:
    """Sufficient statistics of the two-factor crossed model (additive over chunks,
    level tables merged by key)."""

    a: LevelTable
    b: LevelTable
    n: float
    sy: float
    yy: float
    Xt1: np.ndarray
    XtX: np.ndarray
    Xty: np.ndarray
    cells_n2: float  # Σ_c n_c² over the cells seen within chunks
    p2: dict[str, np.ndarray] = field(default_factory=dict)  # second-pass products (covariates only)

    @staticmethod
    def merge(parts: list[CrossedStats]) -> CrossedStats:
        parts = [q for q in parts if q is not None]
        if not parts:
            raise DataError("no rows in any chunk")
        return CrossedStats(
            a=LevelTable.merge([q.a for q in parts]), b=LevelTable.merge([q.b for q in parts]),
            n=sum(q.n for q in parts), sy=sum(q.sy for q in parts), yy=sum(q.yy for q in parts),
            Xt1=sum(q.Xt1 for q in parts), XtX=sum(q.XtX for q in parts), Xty=sum(q.Xty for q in parts),
            cells_n2=sum(q.cells_n2 for q in parts),
        )

    def select(self, keep: np.ndarray) -> CrossedStats:
        k = np.flatnonzero(keep)
        return replace(self, a=replace(self.a, s=self.a.s[:, k]), b=replace(self.b, s=self.b.s[:, k]),
                       Xt1=self.Xt1[k], XtX=self.XtX[np.ix_(k, k)], Xty=self.Xty[k])


def _level_table(codes: np.ndarray, L: int, y: np.ndarray, X: np.ndarray, keys: pd.Index,
                 wobs: np.ndarray | None) -> LevelTable:
    w = np.ones_like(y) if wobs is None else wobs
    N = np.bincount(codes, weights=w, minlength=L)
    S = np.bincount(codes, weights=w * y, minlength=L)
    Q = np.bincount(codes, weights=w * y * y, minlength=L)
    s = np.column_stack([np.bincount(codes, weights=w * X[:, k], minlength=L) for k in range(X.shape[1])])
    return LevelTable(keys=keys, N=N, S=S, Q=Q, s=s, parts=(N > 0).astype(float))


def crossed_pass1(X: np.ndarray, y: np.ndarray, ca: np.ndarray, keys_a: pd.Index, cb: np.ndarray, keys_b: pd.Index,
                  wa: np.ndarray | None = None, wb: np.ndarray | None = None) -> CrossedStats:
    """crossed_pass1(X, y, ca, keys_a, cb, keys_b, wa=None, wb=None) -> CrossedStats

    First pass over a chunk: totals, per-level sums of both factors and the
    within-chunk cell sum Σ n_c². ``wa``/``wb`` are level multiplicities (bootstrap).
    """
    La, Lb = len(keys_a), len(keys_b)
    ca = np.asarray(ca, dtype=np.intp)
    cb = np.asarray(cb, dtype=np.intp)
    wo = None
    if wa is not None:
        wo = wa[ca] * wb[cb]
    a = _level_table(ca, La, y, X, keys_a, None if wb is None else wb[cb])
    b = _level_table(cb, Lb, y, X, keys_b, None if wa is None else wa[ca])
    if wa is not None:
        a.w, b.w = wa.astype(float), wb.astype(float)
    cell = ca.astype(np.int64) * Lb + cb
    if wo is None:
        _, cnt = np.unique(cell, return_counts=True)
        cells_n2 = float(np.sum(cnt.astype(float) ** 2))
        Xw = X
        w_ = np.ones_like(y)
    else:
        uc, inv, cnt = np.unique(cell, return_inverse=True, return_counts=True)
        cells_n2 = float(np.sum(wa[uc // Lb] * wb[uc % Lb] * cnt.astype(float) ** 2))
        Xw = X * wo[:, None]
        w_ = wo
    return CrossedStats(a=a, b=b, n=float(w_.sum()), sy=float(w_ @ y), yy=float(w_ @ (y * y)),
                        Xt1=Xw.sum(axis=0), XtX=Xw.T @ X, Xty=Xw.T @ y, cells_n2=cells_n2)


def crossed_pass2(X: np.ndarray, y: np.ndarray, ga: np.ndarray, gb: np.ndarray, a: LevelTable, b: LevelTable,
                  wobs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """crossed_pass2(X, y, ga, gb, a, b, wobs=None) -> dict

    Second pass (covariates only): sums over observations of products with the
    observation's level totals, ``Σ N_{a(o)} x x'``, ``Σ N_{a(o)} x y``, ``Σ N_{a(o)} x t_{b(o)}'``,
    ``Σ s_{a(o)} t_{b(o)}'`` and their mirror images. ``ga``/``gb`` index ``a``/``b``.
    """
    Na = a.N[ga]
    Mb = b.N[gb]
    sa = a.s[ga]
    tb = b.s[gb]
    Xw = X if wobs is None else X * wobs[:, None]
    XNa = Xw * Na[:, None]
    XMb = Xw * Mb[:, None]
    return {
        "Da_xx": XNa.T @ X, "Da_xy": XNa.T @ y, "Db_xx": XMb.T @ X, "Db_xy": XMb.T @ y,
        "DaKb": XNa.T @ tb, "DbKa": XMb.T @ sa, "KaKb": (sa if wobs is None else sa * wobs[:, None]).T @ tb,
    }


def _is_intercept_only(xnames: list[str]) -> bool:
    return list(xnames) == ["(Intercept)"]


def ustat_estimate(st: CrossedStats, intercept_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ustat_estimate(st, intercept_only) -> (sigma2 (a, b, e), beta, Ginv)

    Solve the three U-statistic moment equations (exact expectations given the design).
    """
    p = st.XtX.shape[0]
    Ginv = np.linalg.inv(st.XtX)
    beta = Ginv @ st.Xty
    A, B = st.a.moments(), st.b.moments()
    n = st.n
    if intercept_only:
        P = {"Da_xx": np.array([[A["n2"]]]), "Da_xy": np.array([A["NS"]]),
             "Db_xx": np.array([[B["n2"]]]), "Db_xy": np.array([B["NS"]]),
             "DaKb": np.zeros((1, 1)), "DbKa": np.zeros((1, 1)), "KaKb": np.zeros((1, 1))}
    else:
        if not st.p2:
            raise DataError("covariates need the second pass (crossed_pass2) statistics")
        P = st.p2
    rr = st.yy - 2 * beta @ st.Xty + beta @ st.XtX @ beta
    r1 = st.sy - beta @ st.Xt1
    Ra2 = A["S2"] - 2 * beta @ A["sS"] + beta @ A["B"] @ beta
    Rb2 = B["S2"] - 2 * beta @ B["sS"] + beta @ B["B"] @ beta
    DaR2 = A["NQ"] - 2 * beta @ P["Da_xy"] + beta @ P["Da_xx"] @ beta
    DbR2 = B["NQ"] - 2 * beta @ P["Db_xy"] + beta @ P["Db_xx"] @ beta
    q = np.array([n * rr - r1 * r1, DaR2 - Ra2, DbR2 - Rb2])
    cells = st.cells_n2
    trAK = np.array([[n * n - A["n2"], n * n - B["n2"], n * n - n],
                     [0.0, A["n2"] - cells, A["n2"] - n],
                     [B["n2"] - cells, 0.0, B["n2"] - n]])
    XKX = [A["B"], B["B"], st.XtX]
    XAX = [n * st.XtX - np.outer(st.Xt1, st.Xt1), P["Da_xx"] - A["B"], P["Db_xx"] - B["B"]]
    zero = np.zeros((p, p))
    XAKX = [[n * A["B"] - np.outer(st.Xt1, A["Ns"]), n * B["B"] - np.outer(st.Xt1, B["Ns"]), XAX[0]],
            [zero, P["DaKb"] - P["KaKb"], XAX[1]],
            [P["DbKa"] - P["KaKb"].T, zero, XAX[2]]]
    coef = np.empty((3, 3))
    for i in range(3):
        GA = Ginv @ XAX[i]
        for k in range(3):
            coef[i, k] = trAK[i, k] - 2 * np.trace(Ginv @ XAKX[i][k]) + np.trace(GA @ Ginv @ XKX[k])
    try:
        sig = np.linalg.solve(coef, q)
    except np.linalg.LinAlgError:
        raise DesignError("the crossed moment equations are singular: each factor needs levels with more than "
                          "one observation and the two factors must not coincide") from None
    return sig, beta, Ginv


def ols_sandwich(st: CrossedStats, sig: np.ndarray, Ginv: np.ndarray) -> np.ndarray:
    s = np.clip(sig, 0, None)
    meat = s[0] * st.a.moments()["B"] + s[1] * st.b.moments()["B"] + s[2] * st.XtX
    return Ginv @ meat @ Ginv


def fit_crossed(st: CrossedStats, xnames: list[str]) -> dict:
    """fit_crossed(st, xnames) -> dict

    Variance components (σ²_a, σ²_b, σ²_e), OLS fixed effects and their sandwich covariance.
    """
    if len(st.a.N) < 2 or len(st.b.N) < 2:
        raise DesignError("each grouping factor needs at least two levels")
    sig, beta, Ginv = ustat_estimate(st, _is_intercept_only(xnames))
    return {"sig": sig, "beta": beta, "vcov": ols_sandwich(st, sig, Ginv)}


def crossed_arrays_fit(X: np.ndarray, y: np.ndarray, ca: np.ndarray, keys_a: pd.Index, cb: np.ndarray,
                       keys_b: pd.Index, xnames: list[str], wa: np.ndarray | None = None,
                       wb: np.ndarray | None = None) -> dict:
    """crossed_arrays_fit(X, y, ca, keys_a, cb, keys_b, xnames, wa=None, wb=None) -> dict

    Both passes and the estimate on in-memory arrays (``wa``/``wb``: bootstrap
    multiplicities of the levels). Returns ``sig`` (σ²_a, σ²_b, σ²_e), ``beta``, ``vcov``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(1)
    >>> a, b = np.repeat(np.arange(200), 50), np.tile(np.arange(50), 200)
    >>> y = rng.normal(0, 1, 200)[a] + rng.normal(0, 0.5, 50)[b] + rng.normal(0, 0.3, a.size)
    >>> out = crossed_arrays_fit(np.ones((a.size, 1)), y, a, pd.RangeIndex(200), b, pd.RangeIndex(50), ["(Intercept)"])
    >>> np.round(out["sig"], 2)
    array([0.85, 0.2 , 0.09])
    """
    st = crossed_pass1(X, y, ca, keys_a, cb, keys_b, wa, wb)
    if not _is_intercept_only(xnames):
        wo = None if wa is None else wa[ca] * wb[cb]
        st.p2 = crossed_pass2(X, y, ca, cb, st.a, st.b, wo)
    return fit_crossed(st, xnames)


def pigeonhole_bootstrap(X: np.ndarray, y: np.ndarray, ca: np.ndarray, keys_a: pd.Index, cb: np.ndarray,
                         keys_b: pd.Index, xnames: list[str], nboot: int = 200, seed: int | None = None,
                         progress: bool = True) -> np.ndarray:
    """pigeonhole_bootstrap(...) -> ndarray (nboot, 3 + p)

    Owen's pigeonhole bootstrap: levels of both factors resampled independently
    with replacement; each replicate re-estimates (σ²_a, σ²_b, σ²_e, β) exactly (a
    replicated level counts as a new level). O(n p²) per replicate.
    """
    from ._common import progress_bar

    rng = np.random.default_rng(seed)
    La, Lb = len(keys_a), len(keys_b)
    out = []
    with progress_bar(nboot, "pigeonhole bootstrap", not progress) as bar:
        for _ in range(nboot):  # replicates; each is vectorised over observations and levels
            wa = rng.multinomial(La, np.full(La, 1.0 / La)).astype(float)
            wb = rng.multinomial(Lb, np.full(Lb, 1.0 / Lb)).astype(float)
            try:
                r = crossed_arrays_fit(X, y, ca, keys_a, cb, keys_b, xnames, wa, wb)
                out.append(np.r_[r["sig"], r["beta"]])
            except (np.linalg.LinAlgError, DesignError):
                out.append(np.full(3 + X.shape[1], np.nan))
            bar.update(1)
    return np.vstack(out)
