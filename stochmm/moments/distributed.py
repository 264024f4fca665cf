"""Out-of-core and distributed moment fits on Dask DataFrames.

The moment estimators need only sums: per-level sums of each grouping factor and
totals (and, for the crossed model with covariates, a second pass of sums of
products with the per-level totals). On a Dask DataFrame each partition is
reduced to these small summaries (``map`` over ``to_delayed()`` partitions), and
the summaries are combined exactly, level by level, in a tree (``split_every``
summaries at a time) — so memory is bounded by the number of levels, not of
rows, and the same code runs on the threaded scheduler, on a
``dask.distributed`` cluster (whatever client is current) or over parquet files
larger than memory (:func:`stochmm.moments.fit.fit_parquet`).

The fixed-effects design is built per partition from one formulaic model spec
taken from the head of the data (string/object factor columns are
``categorize``-d first so every partition encodes them alike); rank deficiency
is decided once, from the global X'X.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import formulaic
import numpy as np
import pandas as pd

from ..builder.model import Model, eval_numeric, r_column_name
from ..errors import DataError, DesignError, MissingDataWarning, RankDeficiencyWarning
from ._common import independent_from_gram, require_intercept_terms

__all__ = ["DaskDesign", "is_dask"]


def is_dask(data: Any) -> bool:
    try:
        import dask.dataframe as dd
    except ImportError:  # pragma: no cover - dask is a dependency
        return False
    return isinstance(data, dd.DataFrame)


@dataclass
class DaskDesign:
    """What a partition needs to build ``X``, ``y`` and the level codes."""

    formula: str
    columns: list[str]
    response: str
    offsets: tuple[str, ...]
    spec: Any  # formulaic ModelSpec of the fixed part
    xnames_all: list[str]
    groups: list[str]  # grouping-factor names (as the builder names them), formula order
    group_vars: list[list[str]]

    def arrays(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, pd.Index]], int]:
        """arrays(df) -> (X, y, [(codes, keys), ...], n_dropped)

        Rows with a missing value in a used column are dropped (counted).
        """
        df = df[self.columns]
        mask = df.isna().any(axis=1).to_numpy()
        n_na = int(mask.sum())
        if n_na:
            df = df.loc[~mask]
        if len(df) == 0:
            return np.zeros((0, len(self.xnames_all))), np.zeros(0), [], n_na
        X = np.asarray(self.spec.get_model_matrix(df, na_action="ignore"), dtype=float)
        r = self.response.strip("`")
        y = df[r].to_numpy(dtype=float) if r in df.columns else eval_numeric(self.response, df)
        for off in self.offsets:
            y = y - eval_numeric(off, df)
        codes = []
        for gv in self.group_vars:
            if len(gv) == 1:
                c, k = pd.factorize(df[gv[0]], sort=False)
                k = pd.Index(k)
            else:
                c, k = pd.MultiIndex.from_arrays([df[v] for v in gv]).factorize()
            codes.append((c.astype(np.intp), k))
        return X, y, codes, n_na


def prepare(formula: str, ddf) -> tuple[Any, DaskDesign]:
    """prepare(formula, ddf) -> (ddf, DaskDesign)

    Validate the formula against the columns, categorize string factor columns of
    the fixed part, and build the fixed-effects model spec from the head.
    """
    from ..builder.formula import parse_formula

    pf = parse_formula(formula)
    if not pf.bars:
        raise DesignError(f"no random-effects terms in formula {formula!r}: mom needs '(1 | g)' terms")
    fixed_vars = set(formulaic.Formula(pf.fixed).required_variables) if pf.fixed.strip() not in ("1", "0", "-1") else set()
    group_vars = {v for b in pf.bars for v in b.group_vars}
    missing = [v for v in sorted(fixed_vars | group_vars) if v not in ddf.columns]
    if missing:
        from ..errors import MissingColumnError

        raise MissingColumnError(missing[0], ddf.columns)
    to_cat = [c for c in fixed_vars if c in ddf.columns and not isinstance(ddf.dtypes[c], pd.CategoricalDtype)
              and not pd.api.types.is_numeric_dtype(ddf.dtypes[c]) and not pd.api.types.is_bool_dtype(ddf.dtypes[c])]
    unknown = [c for c in fixed_vars if isinstance(ddf.dtypes[c], pd.CategoricalDtype)
               and not ddf[c].cat.known]
    if to_cat or unknown:
        # one pass for the levels of string factor columns, sorted as R's factor() (and the builder) does;
        # (dask's categorize() trips over column projection in some dask-expr versions)
        cols = sorted(set(to_cat) | set(unknown))
        import dask

        uniq = dask.compute(*[ddf[c].dropna().unique() for c in cols])
        ddf = ddf.assign(**{c: ddf[c].astype(pd.CategoricalDtype(np.sort(np.asarray(u, dtype=object).astype(str))
                                                                 if c in to_cat else
                                                                 pd.Index(u).sort_values()))
                            for c, u in zip(cols, uniq)})
    head = ddf.head(2000, npartitions=min(ddf.npartitions, 8))
    if len(head) < 4:
        raise DataError(f"the data have {len(head)} rows in their first partitions: too few to set up the model")
    proto = head.copy()
    for v in group_vars - fixed_vars:  # so that the builder's design checks pass on a small head
        proto[v] = (np.arange(len(proto)) % 3).astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Model(formula, proto)
    require_intercept_terms(m, "mom")
    frame = m.frame
    # the builder's own fixed-effects spec (its contrasts, e.g. contr.poly for ordered factors, and its
    # column names); all of its columns: rank deficiency is decided later, on the global X'X
    spec = m.fixed_spec
    bars = {":".join(b.group_vars): b.group_vars for b in m.parsed.bars}
    groups = [":".join(b.group_vars) for b in m.parsed.bars]
    groups = list(dict.fromkeys(groups))
    design = DaskDesign(
        formula=m.formula, columns=list(frame.columns), response=m.parsed.response, offsets=m.parsed.offsets,
        spec=spec, xnames_all=[r_column_name(c) for c in spec.column_names], groups=groups,
        group_vars=[bars[g] for g in groups],
    )
    return ddf[design.columns], design


def tree_reduce(parts: list, merge, split_every: int = 8):
    """Combine delayed partition summaries ``split_every`` at a time; returns one delayed."""
    from dask import delayed

    parts = list(parts)
    while len(parts) > 1:
        parts = [delayed(merge)(parts[i:i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


def compute(*objs):
    import dask

    return dask.compute(*objs)


def warn_na(n_na: int, n_total: int) -> None:
    if n_na:
        from ._common import user_stacklevel

        warnings.warn(f"{n_na} of {n_total} rows dropped because of missing values", MissingDataWarning,
                      stacklevel=user_stacklevel())


def rank_keep(XtX: np.ndarray, xnames: list[str]) -> np.ndarray:
    keep = independent_from_gram(XtX)
    dropped = [nm for nm, k in zip(xnames, keep) if not k]
    if dropped:
        from ._common import user_stacklevel

        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column(s): "
                      f"{', '.join(dropped)}", RankDeficiencyWarning, stacklevel=user_stacklevel())
    return keep
