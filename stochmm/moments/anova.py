"""ANOVA tables with expected mean squares and moment estimates of variance components.

For ``y = Xβ + Σ_j Z_j u_j + e`` with ``Var(u_j) = σ²_j I`` and ``Var(e) = σ² I``,
the sequential (Type I) sum of squares of a term is ``y'A_k y`` with
``A_k = P_k − P_{k−1}``, the difference of the projections on the columns fitted up
to and before it. Its expectation is exact for any design, balanced or not::

    E[y'A_k y] = Σ_j σ²_j tr(Z_j' A_k Z_j) + σ² rank(A_k) + β'X'A_k Xβ

The fixed-effects terms are fitted first and the random terms after them (outer
factors before nested ones), so the random rows carry no ``β`` and the random
rows and the residual form a triangular system ``E[MS] = C σ²`` which the mean
squares solve: Henderson's method III with sequential (Type I) reductions. On
balanced data these are the classical ANOVA estimators, equal to REML whenever
all are positive. The expected mean squares are those of the *unrestricted*
mixed model (the one lme4 fits).

Everything is computed from the cross-product matrix of ``[X, Z_1, ..., Z_K]``
(its size is p + the total number of levels; never n × n) by a block
Gram–Schmidt in the order of fitting.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from scipy.linalg import solve_triangular
from scipy.linalg.lapack import dpstrf

from ..builder.model import Model, split_colon
from ..builder.terms import ReTerm
from ..errors import DesignError
from ._common import MomentResults, fixed_term_columns, fmt_num, require_intercept_terms, require_variation

__all__ = ["anova_components", "AnovaComponents"]

_EIG_TOL = 1e-9


class AnovaComponents(MomentResults):
    """Result of :func:`anova_components`.

    Attributes
    ----------
    table : pandas.DataFrame
        The ANOVA table, one row per source in order of fitting (index ``source``):
        ``kind`` (fixed / random / residual), ``df``, ``SS``, ``MS``, ``EMS`` (the
        expected mean square as an expression), ``F``, ``df_den``, ``p_value`` and
        ``error`` (the denominator: a row of the table, or a Satterthwaite
        combination of rows when no single row has the right expectation).
    ems : pandas.DataFrame
        The EMS coefficients: one column per variance component (in order of
        fitting, then ``Residual``) and ``Q``, the fixed-effects terms in each row's
        non-centrality ``β'X'A Xβ``.
    varcomp, varcomp_raw, truncated, fixef, se, vcov, theta, sigma, varcorr
        See :class:`~stochmm.moments._common.MomentResults`. ``fixef``/``se`` are the
        generalized least squares estimates given the variance components (from
        Henderson's mixed-model equations): the REML ones when the variance
        components are.
    model : stochmm.Model
    """

    def __init__(self, *, table: pd.DataFrame, ems: pd.DataFrame, model: Model, **kw) -> None:
        super().__init__(**kw)
        self.table = table
        self.ems = ems
        self.model = model

    def __repr__(self) -> str:
        tab = self.table.copy()
        fmt = {"SS": "{:.6g}", "MS": "{:.6g}", "F": "{:.4g}", "df_den": "{:.4g}", "p_value": "{:.4g}"}
        for c, f in fmt.items():
            tab[c] = [("" if not np.isfinite(v) else f.format(v)) for v in tab[c]]
        tab["error"] = tab["error"].fillna("")
        return "\n".join([self._header(), "", tab.drop(columns=["kind"]).to_string(), "",
                          super().__repr__().split("\n", 2)[2]])


def anova_components(formula: str, data: pd.DataFrame, *, order: Sequence[str] | None = None) -> AnovaComponents:
    """anova_components(formula, data, *, order=None) -> AnovaComponents

    ANOVA table with expected mean squares, and method-of-moments (Henderson III /
    Type I) estimates of the variance components of a linear mixed model with
    random intercepts, for balanced and unbalanced designs.

    Parameters
    ----------
    formula : str
        lme4 formula whose random part is made of ``(1 | g)`` terms: one-way
        ``y ~ 1 + (1 | g)``, nested ``y ~ 1 + (1 | a/b)``, crossed
        ``y ~ 1 + (1 | a) + (1 | b)``, mixed ``y ~ A + (1 | B) + (1 | A:B)``, or a
        split plot ``y ~ N * V + (1 | Block/V)``.
    data : pandas.DataFrame
        Not modified. Rows with missing values are dropped (with a warning).
    order : sequence of str, optional
        Order in which the random terms are fitted, by grouping-factor name. By
        default the coarser factor (fewer levels) first, so that nesting factors
        come before the factors nested in them.

    Returns
    -------
    AnovaComponents
        ``.table`` (the ANOVA table with EMS), ``.varcomp`` (variance estimates
        named as ``varcorr``'s ``group`` column, plus ``Residual``), ``.fixef``/``.se``.

    Raises
    ------
    DesignError
        Random slopes; a random term confounded with the fixed effects or with
        the terms fitted before it (zero degrees of freedom).

    Warns
    -----
    NegativeEstimateWarning
        For each negative estimate, which is set to 0 (``varcomp_raw`` keeps it).

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.anova_components("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> fit.varcomp.round(2).to_dict()
    {'Batch': 1764.05, 'Residual': 2451.25}
    >>> fit.table.loc["Batch", "EMS"]
    'σ² + 5·σ²(Batch)'
    """
    m = Model(formula, data)
    require_intercept_terms(m, "anova_components")
    rterms = _fit_order(m, order)
    fixed = fixed_term_columns(m)
    y = m.y - m.offset
    require_variation(m, y)
    return _anova(m, y, fixed, rterms)


def _fit_order(m: Model, order: Sequence[str] | None) -> list[ReTerm]:
    terms = list(m.terms)
    if order is not None:
        order = list(order)
        names = [t.group for t in terms]
        if sorted(order) != sorted(names):
            raise DesignError(f"order must name each random term once: {names}, got {order}")
        return [terms[names.index(g)] for g in order]
    formula_pos = {}
    for i, b in enumerate(m.parsed.bars):
        formula_pos.setdefault(":".join(b.group_vars), i)
    return sorted(terms, key=lambda t: (t.nlev, formula_pos.get(t.group, 0)))


def _indicator(t: ReTerm, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(n), (np.arange(n), t.refs)), shape=(n, t.nlev))


def _sequential(C: np.ndarray, My: np.ndarray, blocks: list[np.ndarray], n_fixed: int) -> list[np.ndarray]:
    """Block Gram–Schmidt on the cross-product matrix, in the order of ``blocks``.

    Returns, for each block, the coordinates (rows) of the targets ``[y, M]`` on the
    orthonormal directions the block adds to the span of the blocks before it; the
    squared norms of a target's coordinates in block k are ``w'(P_k − P_{k−1})w``.

    Only the coordinates that are used are computed: ``y``, the fixed-effects
    columns, and the columns of the random blocks *after* block k (a block's own
    columns and those of earlier blocks are in the span; ``_anova`` gets their
    traces from ``tr(Z'Z) − ‖P_{k−1} Z‖²``). Other entries are left at 0. Each block's
    new directions come from a pivoted Cholesky factorization (LAPACK ``dpstrf``)
    of the block's Schur complement, which also finds its rank.
    """
    dg = np.sqrt(np.diag(C))
    dg[dg == 0] = 1.0
    Cs = C / np.outer(dg, dg)
    d = C.shape[0]
    T = np.empty((d, d + 1))  # inner products of the scaled columns with the targets [y, M]
    T[:, 0] = My / dg
    T[:, 1:] = Cs
    F = np.zeros((0, d + 1))
    fixed_cols = np.concatenate([blocks[i] for i in range(n_fixed)] + [np.zeros(0, dtype=int)]).astype(int)
    out = []
    for k, idx in enumerate(blocks):
        later = [blocks[j] for j in range(max(k + 1, n_fixed), len(blocks))]
        tgt = np.concatenate([[0], 1 + fixed_cols] + [1 + b for b in later]).astype(int)
        E = F[:, 1 + idx]
        S = Cs[np.ix_(idx, idx)] - E.T @ E
        if S.size == 0 or np.max(np.diag(S)) <= _EIG_TOL:  # dpstrf applies tol from its 2nd pivot on
            U, piv, rank = S, np.zeros(0, dtype=int), 0
        else:
            U, piv, rank, _ = dpstrf((S + S.T) / 2, tol=_EIG_TOL, lower=0)
        piv = piv[:rank] - 1
        Fk = np.zeros((rank, d + 1))
        if rank:
            rhs = T[np.ix_(idx[piv], tgt)] - E[:, piv].T @ F[:, tgt]
            Fk[:, tgt] = solve_triangular(np.triu(U[:rank, :rank]), rhs, trans="T", lower=False)
        out.append(Fk)
        F = np.vstack([F, Fk])
    for Fk in out:  # coordinates of the unscaled columns
        Fk[:, 1:] *= dg
    return out


def _anova(m: Model, y: np.ndarray, fixed: list[tuple[str, np.ndarray]], rterms: list[ReTerm]) -> AnovaComponents:
    n, p = m.X.shape
    X = m.X
    Zs = [_indicator(t, n) for t in rterms]
    M = sp.hstack([sp.csr_matrix(X)] + Zs, format="csr")
    C = (M.T @ M).toarray()
    My = M.T @ y
    yty = float(y @ y)
    offs = np.cumsum([0, p] + [t.nlev for t in rterms])
    zcols = [np.arange(offs[j + 1], offs[j + 2]) for j in range(len(rterms))]
    blocks = [cols for _, cols in fixed] + zcols
    coords = _sequential(C, My, blocks, len(fixed))

    # the non-centrality of a fixed term counts its effects net of the terms marginal to it
    # (sum-to-zero style: Q(nf) rather than Q(nf, nf:Variety) on balanced data)
    F_all = np.vstack(coords)
    rstart = np.cumsum([0] + [Fk.shape[0] for Fk in coords])
    perps = []
    for fname, fcols in fixed:
        marg = [c for g, cc in fixed if _marginal(g, fname) for c in cc]
        P = F_all[:, 1 + fcols]
        if marg:
            marg = np.asarray(marg)
            coef = np.linalg.pinv(C[np.ix_(marg, marg)], hermitian=True) @ C[np.ix_(marg, fcols)]
            P = P - F_all[:, 1 + marg] @ coef
        perps.append(P)

    comp_names = [t.group for t in rterms] + ["Residual"]
    K = len(rterms)
    rows, coef, qsets, kinds = [], [], [], []
    for b, Fk in enumerate(coords):
        is_fixed = b < len(fixed)
        name = fixed[b][0] if is_fixed else rterms[b - len(fixed)].group
        df = Fk.shape[0]
        if is_fixed and name == "(Intercept)":
            continue
        if df == 0:
            if is_fixed:
                continue
            raise DesignError(
                f"random term (1 | {name}) adds no degrees of freedom once the fixed effects and the terms "
                f"fitted before it are in the model (it is confounded with them): its variance is not estimable"
            )
        ss = float(Fk[:, 0] @ Fk[:, 0])
        c = np.ones(K + 1)
        for j, zc in enumerate(zcols):
            jb = len(fixed) + j  # block of random term j
            if jb > b:
                c[j] = float(np.sum(Fk[:, 1 + zc] ** 2)) / df
            elif jb == b:  # tr(Z'(P_b − P_{b−1})Z) = tr(Z'Z) − ‖P_{b−1} Z‖² (Z is in the span at b)
                prev = F_all[:rstart[b], 1 + zc]
                c[j] = (float(np.trace(C[np.ix_(zc, zc)])) - float(np.sum(prev**2))) / df
            else:  # fitted before: already in the span
                c[j] = 0.0
        q = []
        for (fname, _), perp in zip(fixed, perps):
            mass = float(np.sum(perp[rstart[b]:rstart[b] + df] ** 2))
            if mass > 1e-10 * max(float(np.sum(perp**2)), 1e-300):
                q.append(fname)
        rows.append((name, df, ss))
        coef.append(c)
        qsets.append(q)
        kinds.append("fixed" if is_fixed else "random")
    rank = sum(Fk.shape[0] for Fk in coords)
    df_e = n - rank
    if df_e <= 0:
        raise DesignError(f"no residual degrees of freedom: the model has rank {rank} and {n} observations")
    ss_e = max(yty - float(sum(Fk[:, 0] @ Fk[:, 0] for Fk in coords)), 0.0)
    rows.append(("Residual", df_e, ss_e))
    coef.append(np.r_[np.zeros(K), 1.0])
    qsets.append([])
    kinds.append("residual")

    src = [r[0] for r in rows]
    dfs = np.array([r[1] for r in rows], dtype=float)
    ss = np.array([r[2] for r in rows])
    ms = ss / dfs
    Cm = np.vstack(coef)
    Cm[np.abs(Cm) < 1e-9 * np.abs(Cm).max(axis=1, keepdims=True)] = 0.0  # round-off of exact zeros
    ems_df = pd.DataFrame(Cm, index=pd.Index(src, name="source"), columns=comp_names)
    ems_df["Q"] = [", ".join(q) for q in qsets]

    # the random rows and the residual: an upper-triangular system E[MS] = A σ²
    rix = [i for i, k in enumerate(kinds) if k != "fixed"]
    A = Cm[rix]
    raw = np.linalg.solve(A, ms[rix])
    names_lme4 = [t.group for t in m.terms]
    raw_s = pd.Series(dict(zip(comp_names, raw))).reindex(names_lme4 + ["Residual"])

    # F tests: the denominator is the combination of random/residual rows with the expectation
    # of the row under its null hypothesis
    F = np.full(len(rows), np.nan)
    df_den = np.full(len(rows), np.nan)
    pv = np.full(len(rows), np.nan)
    err: list[str | None] = [None] * len(rows)
    for i, k in enumerate(kinds):
        if k == "residual":
            continue
        v = Cm[i].copy()
        if k == "random":
            v[comp_names.index(src[i])] = 0.0
        w = np.linalg.solve(A.T, v)
        w[np.abs(w) < 1e-10] = 0.0
        nz = np.flatnonzero(w)
        den = float(w @ ms[rix])
        if len(nz) == 1 and abs(w[nz[0]] - 1.0) < 1e-8:
            j = rix[nz[0]]
            err[i], dd = src[j], dfs[j]
        else:
            terms = [f"{fmt_num(w[j])}·MS({src[rix[j]]})" for j in nz]
            err[i] = " + ".join(terms).replace("+ -", "- ") + " (Satterthwaite)"
            parts = (w * ms[rix]) ** 2 / dfs[rix]
            dd = den**2 / parts.sum() if den > 0 else np.nan
        if den > 0:
            F[i] = ms[i] / den
            df_den[i] = dd
            pv[i] = stats.f.sf(F[i], dfs[i], dd)

    table = pd.DataFrame(
        {"kind": kinds, "df": dfs.astype(int), "SS": ss, "MS": ms,
         "EMS": [_ems_text(Cm[i], qsets[i], comp_names) for i in range(len(rows))],
         "F": F, "df_den": df_den, "p_value": pv, "error": err},
        index=pd.Index(src, name="source"),
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is reported by MomentResults below
        vc_trunc = raw_s.clip(lower=0.0)
    beta, vcov = _gls_mme(C, My, p, offs, rterms, vc_trunc)
    fixef = pd.Series(beta, index=m.xnames, dtype=float)
    return AnovaComponents(
        table=table, ems=ems_df, model=m, formula=m.formula, method="anova (Henderson III, Type I SS)",
        varcomp_raw=raw_s, fixef=fixef, vcov=pd.DataFrame(vcov, index=m.xnames, columns=m.xnames),
        nobs=n, ngroups={t.group: t.nlev for t in m.terms}, se_method="GLS given the variance components",
    )


def _factors(term: str) -> frozenset[str]:
    if term == "(Intercept)":
        return frozenset()
    return frozenset(p.strip() for p in split_colon(term))


def _marginal(a: str, b: str) -> bool:
    """Whether fixed term ``a`` is marginal to ``b`` (its factors a proper subset of b's)."""
    return _factors(a) < _factors(b)


def _ems_text(c: np.ndarray, q: list[str], comp_names: list[str]) -> str:
    parts = []
    # residual first, then the components from the innermost (fitted last) outwards
    for j in [len(comp_names) - 1] + list(range(len(comp_names) - 2, -1, -1)):
        if abs(c[j]) < 1e-10:
            continue
        lab = "σ²" if comp_names[j] == "Residual" else f"σ²({comp_names[j]})"
        coef = fmt_num(c[j])
        parts.append(lab if coef == "1" else f"{coef}·{lab}")
    if q:
        parts.append(f"Q({', '.join(q)})")
    return " + ".join(parts)


def _gls_mme(C: np.ndarray, My: np.ndarray, p: int, offs: np.ndarray, rterms: list[ReTerm],
             vc: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Henderson's mixed-model equations: GLS fixed effects and their covariance."""
    s2 = float(vc["Residual"])
    keep = [np.arange(p)]
    pen = [np.zeros(p)]
    for j, t in enumerate(rterms):
        v = float(vc[t.group])
        if v > 0:
            keep.append(np.arange(offs[j + 1], offs[j + 2]))
            pen.append(np.full(t.nlev, s2 / v))
    idx = np.concatenate(keep)
    H = C[np.ix_(idx, idx)] + np.diag(np.concatenate(pen))
    rhs = My[idx]
    Hinv = np.linalg.pinv(H, hermitian=True) if s2 == 0 else np.linalg.inv(H)
    sol = Hinv @ rhs
    return sol[:p], s2 * Hinv[:p, :p]
