"""``sm.mom``: moment fits of one-factor and two-factor crossed random-intercept models
from a pandas or a Dask DataFrame."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from ..builder.model import Model
from ..errors import DataError, DesignError, OptionError, check_flag
from ._common import MomentResults, independent_from_gram, lme4_order, require_intercept_terms, require_variation
from .crossed import (
    CrossedStats,
    crossed_arrays_fit,
    crossed_pass1,
    crossed_pass2,
    fit_crossed,
    pigeonhole_bootstrap,
)
from .distributed import compute, is_dask, prepare, rank_keep, tree_reduce, warn_na
from .randomn import ClusterTable, fit_oneway

__all__ = ["mom", "MomentFit", "model_varcomp"]


class MomentFit(MomentResults):
    """Result of :func:`stochmm.mom`: the attributes of
    :class:`~stochmm.moments._common.MomentResults` and those below.

    Attributes
    ----------
    boot : pandas.DataFrame or None
        Bootstrap replicates (variance components, then fixed effects).
    chunks : pandas.DataFrame or None
        Per-chunk estimates of the software-alchemy estimator.
    size_moments : pandas.Series or None
        One-factor model: number of clusters and mean, variance, min and max of the
        cluster sizes N_i (the random N of Matloff's model).
    info : dict
        ``backend`` (pandas / dask), ``npartitions``, ``elapsed_s``, ``cells_exact``, ...
    """

    def __init__(self, *, boot: pd.DataFrame | None = None, chunks: pd.DataFrame | None = None,
                 size_moments: pd.Series | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.boot = boot
        self.chunks = chunks
        self.size_moments = size_moments

    def __repr__(self) -> str:
        out = super().__repr__()
        if self.size_moments is not None:
            out += "\n\nCluster sizes (random N):\n" + self.size_moments.to_string(float_format=lambda v: f"{v:.6g}")
        return out


_ONE = ("matloff", "anova")
_CROSSED = ("ustat",)


def mom(formula: str, data, *, method: str = "auto", size_effect: bool = False, se: str | None = "auto",
        nboot: int = 200, seed: int | None = None, alchemy: bool = False, chunks: int | None = None,
        split_every: int = 8, progress: bool = True) -> MomentFit:
    """mom(formula, data, *, method="auto", size_effect=False, se="auto", nboot=200, seed=None, alchemy=False, chunks=None, split_every=8, progress=True) -> MomentFit

    Method-of-moments fit of a random-intercept model, from a pandas or a Dask
    DataFrame: one factor ``y ~ fixed + (1 | g)`` (Matloff's random-N estimators)
    or two crossed factors ``y ~ fixed + (1 | a) + (1 | b)`` (Gao–Owen U-statistics).

    Parameters
    ----------
    formula : str
        lme4 formula with one or two ``(1 | g)`` terms.
    data : pandas.DataFrame or dask.dataframe.DataFrame
        Not modified. On Dask the fit is computed from per-partition sufficient
        statistics combined exactly (runs on whatever Dask scheduler/cluster is current).
    method : {"auto", "matloff", "anova", "ustat"}
        One factor: ``"matloff"`` (default; law-of-total-variance equations on
        cluster sums) or ``"anova"`` (Henderson III; equals REML on balanced data
        when positive, and is more efficient for σ²_ε). Two factors: ``"ustat"``.
        See :mod:`stochmm.moments.randomn` and :mod:`stochmm.moments.crossed`.
    size_effect : bool
        One factor: add the cluster size N_i as a covariate, the random-N effect
        model ``Y_ij = c1 + c2 N_i + x'β + α_i + ε_ij``; its coefficient is named
        ``"N(g)"``.
    se : {"auto", "delta", "bootstrap", None}
        Standard errors of the variance components. ``"auto"``: the delta method
        for one factor, none for two (fixed-effects SEs are always given: GLS for
        one factor, the OLS sandwich for two). ``"bootstrap"``: the cluster
        bootstrap (one factor; also on Dask, from the cluster summaries) or the
        pigeonhole bootstrap (two factors; pandas data only). With ``alchemy=True``
        the SEs come from the spread of the chunk estimates.
    nboot, seed : int
        Bootstrap replicates and random seed.
    alchemy : bool
        Matloff's "software alchemy": estimate on each chunk (each Dask partition,
        or ``chunks`` pieces of a pandas DataFrame — whole clusters for one factor,
        random rows for two) and average; SE = sd(chunk estimates)/√chunks.
    chunks : int, optional
        Number of chunks for ``alchemy`` on pandas data (default 10).
    split_every : int
        Fan-in of the tree that combines Dask partition summaries.
    progress : bool
        Progress bar for the bootstrap.

    Returns
    -------
    MomentFit
        ``.varcomp`` (named as ``varcorr``'s ``group`` column, plus ``Residual``),
        ``.fixef``, ``.se``, ``.varcomp_se``, ``.theta``/``.sigma`` (start values for
        :func:`stochmm.lmer`), ``.size_moments`` (one factor).

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.mom("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> fit.varcomp.round(1).to_dict()
    {'Batch': 1764.0, 'Residual': 2451.2}
    >>> import dask.dataframe as dd
    >>> ddf = dd.from_pandas(sm.datasets.load("dyestuff"), npartitions=3)
    >>> sm.mom("Yield ~ 1 + (1 | Batch)", ddf).varcomp.round(1).to_dict()
    {'Batch': 1764.0, 'Residual': 2451.2}
    """
    t0 = time.perf_counter()
    for flag, value in (("size_effect", size_effect), ("alchemy", alchemy), ("progress", progress)):
        check_flag(value, flag)
    for name, value in (("nboot", nboot), ("split_every", split_every)) + ((("chunks", chunks),) if chunks is not None else ()):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OptionError(f"{name} must be a positive integer, got {value!r}")
    if se not in ("auto", "delta", "bootstrap", None):
        raise ValueError(f"se must be 'auto', 'delta', 'bootstrap' or None, got {se!r}")
    if method not in ("auto",) + _ONE + _CROSSED:
        raise ValueError(f"method must be 'auto', 'matloff', 'anova' or 'ustat', got {method!r}")
    if is_dask(data):
        fit = _mom_dask(formula, data, method, size_effect, se, nboot, seed, alchemy, split_every, progress)
    elif isinstance(data, pd.DataFrame):
        fit = _mom_pandas(formula, data, method, size_effect, se, nboot, seed, alchemy, chunks, progress)
    else:
        raise DataError(f"data must be a pandas or a Dask DataFrame, got {type(data).__name__}")
    fit.info["elapsed_s"] = time.perf_counter() - t0
    return fit


# ---------------------------------------------------------------------------------------------
# checks shared by both back ends
# ---------------------------------------------------------------------------------------------
def _check_method(nterms: int, method: str, size_effect: bool) -> str:
    if nterms == 1:
        method = "matloff" if method == "auto" else method
        if method not in _ONE:
            raise DesignError(f"method {method!r} is for two crossed factors; one factor takes 'matloff' or 'anova'")
    elif nterms == 2:
        method = "ustat" if method == "auto" else method
        if method not in _CROSSED:
            raise DesignError(f"method {method!r} is for one factor; two crossed factors take 'ustat'")
        if size_effect:
            raise DesignError("size_effect is for the one-factor model y ~ fixed + (1 | g)")
    else:
        raise DesignError(f"mom fits one '(1 | g)' term or two crossed ones, not {nterms}; "
                          "use sm.anova_components for nested and multi-stratum designs")
    return method


def _size_moments(N: np.ndarray) -> pd.Series:
    return pd.Series({"clusters": float(len(N)), "mean_N": N.mean(), "var_N": N.var(ddof=1) if len(N) > 1 else np.nan,
                      "min_N": N.min(), "max_N": N.max()})


def _with_size(ct: ClusterTable, xnames: list[str], group: str) -> tuple[ClusterTable, list[str]]:
    ct = ct.with_size()
    xnames = list(xnames) + [f"N({group})"]
    if not independent_from_gram(ct.XtX)[-1]:
        raise DesignError(f"the cluster sizes N({group}) are constant or collinear with the fixed effects: "
                          "their effect is not estimable")
    return ct, xnames


def _result_oneway(out: dict, formula: str, method: str, group: str, xnames: list[str], ct: ClusterTable,
                   info: dict) -> MomentFit:
    names = [group, "Residual"]
    raw = pd.Series([out["s2a"], out["s2e"]], index=names)
    vse = None if out["varcomp_se"] is None else pd.Series(out["varcomp_se"], index=names)
    boot = None
    if out.get("boot") is not None:
        boot = pd.DataFrame(out["boot"], columns=names + list(xnames))
    return MomentFit(formula=formula, method=method, varcomp_raw=raw,
                     fixef=pd.Series(out["beta"], index=xnames, dtype=float),
                     vcov=pd.DataFrame(out["vcov"], index=xnames, columns=xnames), nobs=int(ct.N.sum()),
                     ngroups={group: ct.G}, varcomp_se=vse, se_method=out["se_method"], boot=boot,
                     size_moments=_size_moments(ct.N), info=info)


def _result_crossed(out: dict, formula: str, groups: list[str], nlev: list[int], xnames: list[str], nobs: int,
                    info: dict, boot: np.ndarray | None) -> MomentFit:
    names = list(groups) + ["Residual"]
    raw = pd.Series(out["sig"], index=names)
    vse = None
    bdf = None
    se_method = "fixed effects: OLS with the model-based sandwich covariance (Gao & Owen)"
    if boot is not None:
        bdf = pd.DataFrame(boot, columns=names + list(xnames))
        vse = bdf[names].std(ddof=1)
        se_method += f"; variance components: pigeonhole bootstrap ({len(bdf)} replicates)"
    return MomentFit(formula=formula, method="ustat (Gao-Owen U-statistics)", varcomp_raw=raw,
                     fixef=pd.Series(out["beta"], index=xnames, dtype=float),
                     vcov=pd.DataFrame(out["vcov"], index=xnames, columns=xnames), nobs=nobs,
                     ngroups=dict(zip(groups, nlev)), varcomp_se=vse, se_method=se_method, boot=bdf, info=info)


def _result_alchemy(est: np.ndarray, formula: str, method: str, names: list[str], xnames: list[str], nobs: int,
                    ngroups: dict, info: dict) -> MomentFit:
    k = est.shape[0]
    if k < 2:
        raise DataError("software alchemy needs at least two chunks")
    cols = list(names) + list(xnames)
    cdf = pd.DataFrame(est, columns=cols)
    mean = cdf.mean(skipna=True)
    cov = cdf[xnames].cov() / k
    vse = cdf[names].std(ddof=1) / np.sqrt(k)
    info = dict(info, chunks=k)
    return MomentFit(formula=formula, method=f"{method} + software alchemy ({k} chunks)",
                     varcomp_raw=mean[names], fixef=mean[xnames].astype(float), vcov=cov, nobs=nobs, ngroups=ngroups,
                     varcomp_se=vse, se_method=f"software alchemy: sd of {k} chunk estimates / sqrt({k})",
                     chunks=cdf, info=info)


# ---------------------------------------------------------------------------------------------
# pandas
# ---------------------------------------------------------------------------------------------
def model_varcomp(m: Model) -> pd.Series:
    """model_varcomp(m) -> Series

    Moment estimates of the variance components of an already built
    random-intercept :class:`~stochmm.Model` (nothing re-parsed, no Z rebuilt):
    Henderson III for one term, Gao–Owen U-statistics for two crossed terms, the
    ANOVA (Type I, Henderson III) equations for more. Negative estimates are
    truncated to 0 (with a warning). Indexed like ``varcorr``'s ``group`` column,
    plus ``Residual``; used by ``sm.lmer``'s moment start values.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> model_varcomp(m).round(2).to_dict()
    {'Batch': 1764.05, 'Residual': 2451.25}
    """
    require_intercept_terms(m, "model_varcomp")
    y = m.y - m.offset
    if len(m.terms) <= 2:
        method = "anova" if len(m.terms) == 1 else "ustat"
        vec, names, _ = _fit_arrays(m.X, y, [(t.refs, pd.Index(t.levels)) for t in m.terms],
                                    [t.group for t in m.terms], list(m.xnames), method, False)
        return pd.Series(np.maximum(vec[: len(names)], 0.0), index=names)
    from ._common import fixed_term_columns
    from .anova import _anova, _fit_order

    return _anova(m, y, fixed_term_columns(m), _fit_order(m, None)).varcomp


def _mom_pandas(formula, data, method, size_effect, se, nboot, seed, alchemy, chunks, progress) -> MomentFit:
    m = Model(formula, data)
    require_intercept_terms(m, "mom")
    method = _check_method(len(m.terms), method, size_effect)
    X, y = m.X, m.y - m.offset
    require_variation(m, y)
    xnames = list(m.xnames)
    info: dict[str, Any] = {"backend": "pandas"}
    if alchemy:
        return _alchemy_pandas(m, X, y, xnames, method, size_effect, chunks or 10, seed, info)
    if len(m.terms) == 1:
        t = m.terms[0]
        se1 = "delta" if se == "auto" else se
        ct = ClusterTable.from_arrays(X, y, t.refs, pd.Index(t.levels), per_cluster_xx=se1 is not None)
        if size_effect:
            ct, xnames = _with_size(ct, xnames, t.group)
        out = fit_oneway(ct, method=method, se=se1, nboot=nboot, seed=seed, progress=progress)
        return _result_oneway(out, m.formula, method, t.group, xnames, ct, info)
    if se == "delta":
        raise DesignError("se='delta' is for the one-factor model; two crossed factors take se='bootstrap'")
    ta, tb = m.terms
    keys_a, keys_b = pd.Index(ta.levels), pd.Index(tb.levels)
    out = crossed_arrays_fit(X, y, ta.refs, keys_a, tb.refs, keys_b, xnames)
    boot = None
    if se == "bootstrap":
        boot = pigeonhole_bootstrap(X, y, ta.refs, keys_a, tb.refs, keys_b, xnames, nboot, seed, progress)
    info["cells_exact"] = "in memory"
    return _result_crossed(out, m.formula, [ta.group, tb.group], [ta.nlev, tb.nlev], xnames, m.n, info, boot)


def _alchemy_pandas(m, X, y, xnames, method, size_effect, k, seed, info) -> MomentFit:
    rng = np.random.default_rng(seed)
    n = len(y)
    if len(m.terms) == 1:
        t = m.terms[0]
        chunk = rng.permutation(t.nlev)[t.refs] % k  # whole clusters per chunk
    else:
        chunk = rng.permutation(n) % k
    est, names, xn = [], None, None
    for c in range(k):  # k chunks (not groups, not observations)
        rows = np.flatnonzero(chunk == c)
        r, names, xn = _fit_arrays(X[rows], y[rows], [(tt.refs[rows], pd.Index(tt.levels)) for tt in m.terms],
                                   [tt.group for tt in m.terms], xnames, method, size_effect)
        est.append(r)
    ngroups = {tt.group: tt.nlev for tt in m.terms}
    return _result_alchemy(np.vstack(est), m.formula, method, names, xn, n, ngroups, info)


def _fit_arrays(X, y, codes, groups, xnames, method, size_effect):
    """Fit one chunk in memory; returns (vector, component names, fixed-effects names)."""
    keep = independent_from_gram(X.T @ X)
    if not keep.all():
        raise DataError(f"a chunk's fixed-effects design is rank deficient (columns "
                        f"{[n for n, k in zip(xnames, keep) if not k]}): use fewer, larger chunks")
    if len(codes) == 1:
        (c, keys), = codes
        ct = ClusterTable.from_arrays(X, y, c, keys, per_cluster_xx=False)
        xn = list(xnames)
        if size_effect:
            ct, xn = _with_size(ct, xn, groups[0])
        out = fit_oneway(ct, method=method, se=None)
        return np.r_[out["s2a"], out["s2e"], out["beta"]], [groups[0], "Residual"], xn
    (ca, ka), (cb, kb) = codes
    Na, Nb = np.bincount(ca, minlength=len(ka)), np.bincount(cb, minlength=len(kb))
    order = [0, 1] if (Na > 0).sum() >= (Nb > 0).sum() else [1, 0]
    (ca, ka), (cb, kb) = codes[order[0]], codes[order[1]]
    g = [groups[order[0]], groups[order[1]]]
    out = crossed_arrays_fit(X, y, ca, ka, cb, kb, xnames)
    sig = out["sig"]
    # report in the caller's order of groups
    sig_named = dict(zip(g + ["Residual"], sig))
    return np.r_[[sig_named[gg] for gg in groups], sig_named["Residual"], out["beta"]], list(groups) + ["Residual"], list(xnames)


# ---------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------
def _oneway_chunk(df, design, per_cluster_xx):
    X, y, codes, n_na = design.arrays(df)
    if len(y) == 0:
        return None, n_na, 0
    c, keys = codes[0]
    return ClusterTable.from_arrays(X, y, c, keys, per_cluster_xx=per_cluster_xx), n_na, len(y)


def _merge_oneway(items):
    return (ClusterTable.merge([it[0] for it in items if it[0] is not None]) if any(it[0] is not None for it in items) else None,
            sum(it[1] for it in items), sum(it[2] for it in items))


def _crossed_chunk(df, design):
    X, y, codes, n_na = design.arrays(df)
    if len(y) == 0:
        return None, n_na, 0
    (ca, ka), (cb, kb) = codes
    return crossed_pass1(X, y, ca, ka, cb, kb), n_na, len(y)


def _merge_crossed(items):
    sts = [it[0] for it in items if it[0] is not None]
    return (CrossedStats.merge(sts) if sts else None, sum(it[1] for it in items), sum(it[2] for it in items))


def _crossed_chunk2(df, design, keep, ia, ib, tables):
    X, y, codes, _ = design.arrays(df)
    if len(y) == 0:
        return None
    a, b = tables
    (ca, ka), (cb, kb) = codes[ia], codes[ib]
    ga = a.keys.get_indexer(ka)[ca]
    gb = b.keys.get_indexer(kb)[cb]
    return crossed_pass2(X[:, keep], y, ga, gb, a, b)


def _sum_dicts(items):
    items = [d for d in items if d is not None]
    return {k: sum(d[k] for d in items) for k in items[0]} if items else None


def _alchemy_chunk(df, design, method, size_effect):
    X, y, codes, _ = design.arrays(df)
    if len(y) == 0:
        return None, 0
    try:
        r, _, _ = _fit_arrays(X, y, codes, design.groups, design.xnames_all, method, size_effect)
    except (DataError, DesignError, np.linalg.LinAlgError):
        return None, len(y)
    return r, len(y)


def _reduce_and_select(tasks, merge, split_every, design):
    """Tree-reduce per-partition statistics, warn about dropped rows, drop rank-deficient columns."""
    (stats, n_na, n), = compute(tree_reduce(tasks, merge, split_every))
    if stats is None:
        raise DataError("no rows left after dropping rows with missing values")
    warn_na(n_na, n + n_na)
    keep = rank_keep(stats.XtX, design.xnames_all)
    return stats.select(keep), [nm for nm, k in zip(design.xnames_all, keep) if k], keep


def _mom_dask(formula, data, method, size_effect, se, nboot, seed, alchemy, split_every, progress) -> MomentFit:
    from dask import delayed

    ddf, design = prepare(formula, data)
    method = _check_method(len(design.groups), method, size_effect)
    parts = ddf.to_delayed()
    info: dict[str, Any] = {"backend": "dask", "npartitions": len(parts)}
    if alchemy:
        ests = compute(*[delayed(_alchemy_chunk)(p, design, method, size_effect) for p in parts])
        good = [e for e, _ in ests if e is not None]
        info["chunks_failed"] = len(ests) - len(good)
        if not good:
            raise DataError("software alchemy: no partition could be fitted on its own")
        names = list(design.groups) + ["Residual"]
        xn = list(design.xnames_all) + ([f"N({design.groups[0]})"] if size_effect else [])
        n_rows = sum(k for _, k in ests)
        return _result_alchemy(np.vstack(good), design.formula, method, names, xn, n_rows, {}, info)

    if len(design.groups) == 1:
        se1 = "delta" if se == "auto" else se
        per_xx = se1 is not None
        ct, xnames, _ = _reduce_and_select([delayed(_oneway_chunk)(p, design, per_xx) for p in parts], _merge_oneway,
                                        split_every, design)
        group = design.groups[0]
        if size_effect:
            ct, xnames = _with_size(ct, xnames, group)
        out = fit_oneway(ct, method=method, se=se1, nboot=nboot, seed=seed, progress=progress)
        info["max_partitions_per_cluster"] = float(ct.parts.max())
        return _result_oneway(out, design.formula, method, group, xnames, ct, info)

    if se in ("delta", "bootstrap"):
        raise DesignError(f"se={se!r} is not available for two crossed factors on Dask data; "
                          "use alchemy=True (chunk-to-chunk spread) or a pandas DataFrame (pigeonhole bootstrap)")
    st, xnames, keep = _reduce_and_select([delayed(_crossed_chunk)(p, design) for p in parts], _merge_crossed, split_every,
                                    design)
    # lme4 order: the factor with more levels first
    nl = [len(st.a.N), len(st.b.N)]
    order = lme4_order(design.groups, nl)
    if order != [0, 1]:
        st.a, st.b = st.b, st.a
    groups = [design.groups[i] for i in order]
    # Σ n_c² is exact from the partitions if every level of one factor lives in one partition
    aligned = bool(st.a.parts.max() <= 1 or st.b.parts.max() <= 1)
    info["cells_exact"] = "partition-aligned" if aligned else "global groupby"
    if not aligned:
        gcols = [v for i in order for v in design.group_vars[i]]
        sub = ddf.dropna()
        sizes = sub.groupby(gcols, observed=True).size(split_out=max(1, len(parts) // 16))
        st.cells_n2 = float((sizes.astype("float64") ** 2).sum().compute())
    if xnames != ["(Intercept)"]:
        tables = delayed((st.a, st.b), pure=True)
        sums = compute(tree_reduce([delayed(_crossed_chunk2)(p, design, keep, order[0], order[1], tables)
                                    for p in parts], _sum_dicts, split_every))[0]
        st.p2 = sums
    out = fit_crossed(st, xnames)
    return _result_crossed(out, design.formula, groups, [len(st.a.N), len(st.b.N)], xnames, int(st.n), info, None)


def fit_parquet(path: str | list[str], formula: str, *, read_kwargs: dict | None = None, **kwargs: Any):
    """fit_parquet(path, formula, *, read_kwargs=None, **kwargs) -> MomentFit

    Moment fit of data in parquet files, read partition by partition with Dask
    (only the columns the formula uses are read): memory is bounded by the
    number of levels of the grouping factors, not by the number of rows.

    Parameters
    ----------
    path : str or list of str
        A parquet file, directory or glob, as :func:`dask.dataframe.read_parquet` takes.
    formula : str
        ``y ~ fixed + (1 | g)`` or ``y ~ fixed + (1 | a) + (1 | b)``.
    read_kwargs : dict, optional
        Passed to :func:`dask.dataframe.read_parquet` (e.g. ``blocksize``,
        ``filesystem``, ``storage_options``).
    **kwargs
        Passed to :func:`stochmm.mom` (``method``, ``se``, ``alchemy``, ...).

    Examples
    --------
    >>> import stochmm as sm, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> sm.datasets.load("dyestuff").to_parquet(os.path.join(d, "dye.parquet"))
    >>> fit = sm.moments.fit_parquet(os.path.join(d, "dye.parquet"), "Yield ~ 1 + (1 | Batch)", method="anova")
    >>> fit.varcomp.round(2).to_dict()
    {'Batch': 1764.05, 'Residual': 2451.25}
    """
    import dask.dataframe as dd

    ddf = dd.read_parquet(path, **(read_kwargs or {}))
    return mom(formula, ddf, **kwargs)
