"""The builder: formula + DataFrame → X, y, Z, Λ(θ) template, θ bounds and names.

:class:`Model` is the only place a formula is parsed and a model matrix built.
Every estimation path (LMM profiled deviance, GLMM PIRLS/Laplace/AGQ, NumPyro,
importance sampling, moments) starts from a :class:`Model`.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence
from typing import Any

import formulaic
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import api
from ..errors import (
    DataError,
    DesignError,
    FormulaError,
    MissingColumnError,
    MissingDataWarning,
    RankDeficiencyWarning,
)
from .formula import BarTerm, ParsedFormula, parse_formula
from .terms import ReTerm

__all__ = ["Model", "r_column_name", "eval_numeric"]

_FAMILIES = ("gaussian", "binomial", "poisson")


# ---------------------------------------------------------------------------------------------
# naming
# ---------------------------------------------------------------------------------------------
_FACTOR_COL = re.compile(r"^(?P<var>.*)\[(?:T\.)?(?P<level>.*)\]$")
_POLY_COL = re.compile(r"^C\((?P<var>[^,]+), contr\.poly\)\[(?P<level>.*)\]$")


def split_colon(name: str) -> list[str]:
    """Split a term or column name at the ``:`` outside brackets (``f[a:b]:x`` → ``["f[a:b]", "x"]``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(name):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == ":" and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    parts.append(name[start:])
    return parts


def r_column_name(name: str) -> str:
    """r_column_name(name) -> str

    Translate a formulaic column name to the name R's ``model.matrix`` gives it:
    ``Intercept`` → ``(Intercept)``, ``period[T.2]`` → ``period2``,
    ``service[T.1]:dept[T.5]`` → ``service1:dept5``, ``I(x ** 2)`` → ``I(x^2)``.
    """
    if name == "Intercept":
        return "(Intercept)"
    name = name.replace("`", "").replace(" ** ", "^")  # I(`my.x` ** 2) -> I(my.x^2), as R writes it
    out = []
    for part in split_colon(name):
        poly = _POLY_COL.match(part)
        if poly:  # ordered factor, polynomial contrasts: studage.L, studage.Q, studage^4
            lev = poly.group("level")
            out.append(f"{poly.group('var').strip().strip('`')}{lev}")
            continue
        m = _FACTOR_COL.match(part)
        out.append(f"{m.group('var')}{m.group('level')}" if m else part)
    return ":".join(out)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _quote_dotted(expr: str, columns) -> str:
    """Backquote column names with dots (``my.x`` → ```my.x```), common in data from R, so that
    formulaic and pandas read them as one name rather than attribute access."""
    for c in sorted((str(c) for c in columns if "." in str(c)), key=len, reverse=True):
        expr = re.sub(rf"(?<![\w.`]){re.escape(c)}(?![\w.`(])", f"`{c}`", expr)
    return expr


def _required(expr: str, formula_text: str, columns=()) -> set[str]:
    quoted = _quote_dotted(_r_power(expr), columns)
    try:
        found = set(formulaic.Formula(quoted).required_variables)
    except Exception as exc:  # formulaic's parse errors are opaque; show the formula
        hint = " (R's x^2 is x**2 here)" if "^" in expr else ""
        raise FormulaError(f"cannot parse {expr!r}{hint}: {exc}", formula_text) from None
    dotted = {c for c in map(str, columns) if "." in c and f"`{c}`" in quoted}
    # formulaic reports `my.x` as 'my' (attribute access): put the real column (or the name as typed) back
    out = set(dotted)
    for v in found:
        if any(c.startswith(v + ".") for c in dotted):
            continue
        typed = re.search(rf"(?<![\w.`]){re.escape(v)}\.[A-Za-z_][\w.]*", quoted)
        out.add(typed.group(0) if typed and v not in set(map(str, columns)) else v)
    return out


def _r_power(expr: str) -> str:
    """Inside ``I(...)`` R's ``^`` is a power: ``I(x^2)`` → ``I(x**2)`` (Python's ``^`` is xor)."""
    out, i = [], 0
    while True:
        j = expr.find("I(", i)
        if j < 0 or (j > 0 and (expr[j - 1].isalnum() or expr[j - 1] in "._")):
            if j < 0:
                out.append(expr[i:])
                return "".join(out)
            out.append(expr[i : j + 2])
            i = j + 2
            continue
        depth, k = 0, j + 1
        while k < len(expr):
            depth += expr[k] == "("
            depth -= expr[k] == ")"
            if depth == 0:
                break
            k += 1
        out.append(expr[i:j] + expr[j : k + 1].replace("^", "**"))
        i = k + 1


def _split_args(s: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(s[start:i].strip())
            start = i + 1
    out.append(s[start:].strip())
    return out


def _r_logicals(frame: pd.DataFrame) -> pd.DataFrame:
    """Boolean columns as R's logicals enter a model matrix: a factor FALSE/TRUE (column ``bTRUE``)."""
    bools = [c for c in frame.columns if pd.api.types.is_bool_dtype(frame[c].dtype)]
    if not bools:
        return frame
    out = frame.copy(deep=False)
    for c in bools:
        out[c] = pd.Categorical(np.where(frame[c].to_numpy(), "TRUE", "FALSE"), categories=["FALSE", "TRUE"])
    return out


def _poly_ordered(formula: str, frame: pd.DataFrame) -> str:
    """Give ordered factors R's default contrasts (``contr.poly``), as ``model.matrix`` does.

    Bare names of ordered categorical columns are wrapped as ``C(name, contr.poly)``; names
    already inside ``C(...)`` keep the contrasts the user chose.
    """
    ordered = [c for c in frame.columns
               if isinstance(frame[c].dtype, pd.CategoricalDtype) and frame[c].cat.ordered]
    for c in ordered:
        formula = re.sub(rf"(?<![\w.`])(?<!C\(){re.escape(c)}(?![\w.`(])", f"C({c}, contr.poly)", formula)
    return formula


_SIMPLE_ARITH = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(\s*[-+*/]\s*([A-Za-z_][A-Za-z0-9_.]*|[0-9.]+))*$")


def _is_name(expr: str, columns) -> bool:
    return expr.strip("`") in columns


def eval_numeric(expr: str, frame: pd.DataFrame) -> np.ndarray:
    """eval_numeric(expr, frame) -> ndarray

    Evaluate a numeric expression of columns (``size - incidence``, ``log(n)``) the
    way the builder evaluates responses and offsets.
    """
    e = expr.strip()
    if _is_name(e, frame.columns):
        col = frame[e.strip("`")]
        if pd.api.types.is_bool_dtype(col.dtype):
            return col.to_numpy(dtype=float)
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object:
            raise DataError(f"{e!r} is not numeric (dtype {col.dtype})")
        return col.to_numpy(dtype=float)
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", e)
    if _SIMPLE_ARITH.match(e) and all(_is_name(v, frame.columns) for v in names):
        # `size - incidence`: names, numbers and + - * / only (the regex guarantees it), so evaluate it
        # directly on the column arrays: no formula machinery, no pandas.eval parser (~2 ms a call)
        cols = {f"_c{i}": frame[v].to_numpy(dtype=float) for i, v in enumerate(dict.fromkeys(names))}
        alias = {v: f"_c{i}" for i, v in enumerate(dict.fromkeys(names))}
        code = re.sub(r"[A-Za-z_][A-Za-z0-9_.]*", lambda mt: alias[mt.group(0)], e)
        with np.errstate(all="ignore"):
            return np.asarray(eval(code, {"__builtins__": {}}, cols), dtype=float)  # noqa: S307
    mm = formulaic.model_matrix(f"0 + I({_quote_dotted(_r_power(e), frame.columns)})", frame, na_action="ignore")
    return np.asarray(mm, dtype=float)[:, 0]


def _as_factor(col: pd.Series) -> pd.Categorical:
    """A grouping variable as a categorical with unused levels dropped.

    Categoricals keep their level order; numbers sort numerically and strings
    lexically, as R's ``factor()`` does.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.remove_unused_categories().array
    vals = col.to_numpy()
    try:
        cats = np.unique(vals)
    except TypeError:  # mixed types in an object column: R's factor() would see strings
        vals = col.astype(str).to_numpy()
        cats = np.unique(vals)
    return pd.Categorical(vals, categories=cats)


def _level_labels(cats: pd.Index) -> np.ndarray:
    """Level labels as R prints them: whole-number floats without '.0' (a column with NAs is float)."""
    if pd.api.types.is_float_dtype(cats.dtype) and np.all(np.isfinite(cats)) and np.all(np.mod(cats, 1) == 0):
        return np.asarray(cats.astype(np.int64).astype(str), dtype=object)
    return np.asarray(cats.astype(str), dtype=object)


def _codes_in(cats: pd.Index, values: pd.Series) -> np.ndarray:
    """Index of each value among the fitted categories (-1: unseen or missing), by value, not by text:
    an int column matches a float one; strings match strings."""
    if pd.api.types.is_numeric_dtype(cats.dtype) and not pd.api.types.is_bool_dtype(cats.dtype):
        v = pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce")
        return cats.get_indexer(v).astype(np.int64)
    s = pd.Series(values).astype(object)
    return cats.get_indexer(s.where(s.isna(), s.astype(str))).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class Model:
    """Model(formula, data, family=None, weights=None, offset=None)

    Parse an lme4-style formula against a DataFrame and build every structure the
    estimation paths use. The caller's DataFrame is never modified.

    Parameters
    ----------
    formula : str
        lme4 syntax, e.g. ``"Reaction ~ Days + (Days | Subject)"``. Random-effects
        terms ``(x | g)``, ``(x || g)``, ``(1 | a/b)``, ``(1 | a:b)``; fixed part in
        formulaic (Wilkinson) syntax with ``I()``, ``C()``, interactions and
        transformations; ``offset(expr)`` terms. Binomial responses may be
        ``cbind(successes, failures)``.
    data : pandas.DataFrame
    family : str or Family, optional
        ``None``/``"gaussian"`` for linear mixed models, ``"binomial"``,
        ``"poisson"``, or a family object with a ``name`` attribute.
    weights : str or array-like, optional
        Prior weights (column name or values); for binomial proportions, the
        number of trials.
    offset : str or array-like, optional
        Added to the linear predictor (column name or values), on top of any
        ``offset()`` terms in the formula.

    Attributes
    ----------
    X : numpy.ndarray
        n × p fixed-effects model matrix (rank-deficient columns dropped).
    xnames : list of str
        Its column names, as R names them (``"(Intercept)"``, ``"period2"``).
    xterms : list of str
        The formula term of each column of X (``"(Intercept)"``, ``"period"``, ``"nf:Variety"``).
    fixed_spec : formulaic.ModelSpec
        The fixed-effects encoding (contrasts, levels), to encode new data identically.
    y : numpy.ndarray
        Response; for binomial families the proportion of successes.
    weights : numpy.ndarray
        Prior weights (for binomial: number of trials × prior weights).
    offset : numpy.ndarray
    terms : list of ReTerm
        Random-effects terms, sorted as lme4 sorts them (decreasing number of levels).
    Z : scipy.sparse.csc_matrix
        n × q random-effects model matrix.
    theta0, lower : numpy.ndarray
        θ start values and lower bounds.
    theta_names : list of str
    dropped_columns : list of str
        Fixed-effects columns dropped for rank deficiency.
    n_dropped_na : int
        Rows removed because of missing values.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> m.X.shape, m.Z.shape, m.theta_names
    ((180, 2), (180, 36), ['Subject.(Intercept)', 'Subject.Days.(Intercept)', 'Subject.Days'])
    """

    def __init__(
        self,
        formula: str,
        data: pd.DataFrame,
        family: Any = None,
        weights: str | Sequence[float] | np.ndarray | None = None,
        offset: str | Sequence[float] | np.ndarray | None = None,
    ) -> None:
        self.parsed: ParsedFormula = parse_formula(formula)
        self.formula = self.parsed.text
        self.family = family
        self.family_name = _family_name(family)
        if not isinstance(data, pd.DataFrame):
            raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
        if len(data) == 0:
            raise DataError("data has no rows")
        if not self.parsed.bars:
            alt = "statsmodels.formula.api.ols" if self.family_name == "gaussian" else "statsmodels.formula.api.glm"
            raise DesignError(
                f"no random-effects terms in formula {self.formula!r}: a mixed model needs at least one "
                f"'(expr | group)' term; for a fixed-effects-only model use {alt}"
            )
        frame, row_index = self._model_frame(data, weights, offset)
        frame, row_index = self._drop_nonfinite_transforms(frame, row_index)
        self.frame = frame
        self.row_index = row_index
        self.n = len(frame)
        self._build_response(frame, weights)
        self._build_fixed(frame)
        self._build_offset(frame, offset)
        self._build_terms(frame)
        self._check_design()

    # ----------------------------------------------------------------------------- frame
    def _variables(self, columns=()) -> tuple[list[str], dict[str, str]]:
        """Columns the model uses, and where each is used (for messages)."""
        pf = self.parsed
        where: dict[str, str] = {}
        resp = pf.response
        if resp.startswith("cbind(") and resp.endswith(")"):
            parts = _split_args(resp[len("cbind(") : -1])
            if len(parts) != 2:
                raise FormulaError("cbind() response needs exactly two arguments: cbind(successes, failures)", pf.text, 0)
            for p in parts:
                for v in _required(f"0 + I({p})", pf.text, columns):
                    where.setdefault(v, "response")
        else:
            for v in _required(f"{resp} ~ 1", pf.text, columns):
                where.setdefault(v, "response")
        for v in _required(pf.fixed, pf.text, columns):
            where.setdefault(v, "fixed-effects term")
        for off in pf.offsets:
            for v in _required(f"0 + I({off})", pf.text, columns):
                where.setdefault(v, "offset")
        for b in pf.bars:
            for v in _required(b.lhs, pf.text, columns):
                where.setdefault(v, f"random-effects term {b.text}")
            for v in b.group_vars:
                where.setdefault(v, f"grouping factor of {b.text}")
        return list(where), where

    def _model_frame(self, data, weights, offset) -> tuple[pd.DataFrame, np.ndarray]:
        names, where = self._variables(data.columns)
        extra = [a for a in (weights, offset) if isinstance(a, str)]
        for nm in names + extra:
            if nm not in data.columns:
                what = where.get(nm, "weights/offset column")
                raise MissingColumnError(nm, data.columns, what=f"{what} variable" if nm in where else what)
        cols = list(dict.fromkeys(names + extra))
        frame = data.loc[:, cols].copy()
        mask = frame.isna().any(axis=1).to_numpy().copy()
        for arg in (weights, offset):
            if arg is not None and not isinstance(arg, str):
                arr = np.asarray(arg, dtype=float)
                if arr.shape != (len(data),):
                    raise DataError(f"weights/offset has length {arr.size}, data has {len(data)} rows")
                mask |= np.isnan(arr)
        row_index = np.flatnonzero(~mask)
        n_na = int(mask.sum())
        self.n_dropped_na = n_na
        if n_na:
            by_col = frame.isna().sum()
            detail = ", ".join(f"{c}: {k}" for c, k in by_col.items() if k)
            warnings.warn(
                f"{n_na} of {len(data)} rows dropped because of missing values ({detail or 'weights/offset'})",
                MissingDataWarning,
                stacklevel=3,
            )
            frame = frame.iloc[row_index].reset_index(drop=True)
            if len(frame) == 0:
                raise DataError("no rows left after dropping rows with missing values")
        else:
            frame = frame.reset_index(drop=True)
        # drop unused levels (lme4's model.frame(drop.unused.levels = TRUE))
        for c in frame.columns:
            if isinstance(frame[c].dtype, pd.CategoricalDtype):
                frame[c] = frame[c].cat.remove_unused_categories()
        return frame, row_index

    def _drop_nonfinite_transforms(self, frame: pd.DataFrame, row_index: np.ndarray):
        """Rows where a transformed response or offset (``log(y)``, ``offset(log(n))``) is not finite
        are dropped with a counted warning, as R's model.frame + na.omit do."""
        resp = self.parsed.response
        exprs = list(_split_args(resp[len("cbind(") : -1])) if resp.startswith("cbind(") and resp.endswith(")") else [resp]
        exprs = [e for e in exprs if not _is_name(e, frame.columns)] + list(self.parsed.offsets)
        if not exprs:
            return frame, row_index
        bad = np.zeros(len(frame), dtype=bool)
        culprits = []
        for e in exprs:
            with np.errstate(all="ignore"):
                v = eval_numeric(e, frame)
            nf = ~np.isfinite(v)
            if nf.any():
                culprits.append(f"{e}: {int(nf.sum())}")
                bad |= nf
        if not bad.any():
            return frame, row_index
        keep = np.flatnonzero(~bad)
        warnings.warn(f"{int(bad.sum())} of {len(frame) + self.n_dropped_na} rows dropped because a transformation "
                      f"is not finite there ({', '.join(culprits)})", MissingDataWarning, stacklevel=4)
        self.n_dropped_na += int(bad.sum())
        if keep.size == 0:
            raise DataError(f"no rows left: {', '.join(culprits)} is not finite in every row")
        frame = frame.iloc[keep].reset_index(drop=True)
        for c in frame.columns:
            if isinstance(frame[c].dtype, pd.CategoricalDtype):
                frame[c] = frame[c].cat.remove_unused_categories()
        return frame, row_index[keep]

    # ----------------------------------------------------------------------------- response
    def _build_response(self, frame: pd.DataFrame, weights) -> None:
        resp = self.parsed.response
        prior = self._vector_arg(weights, frame, "weights")
        if prior is not None:
            if not np.all(np.isfinite(prior)) or np.any(prior <= 0):
                bad = prior[~(np.isfinite(prior) & (prior > 0))]
                raise DataError(f"weights must be positive and finite; found {bad[:5].tolist()}")
        self.prior_weights = np.ones(self.n) if prior is None else prior
        fam = self.family_name
        if resp.startswith("cbind(") and resp.endswith(")"):
            if fam != "binomial":
                raise DataError(f"cbind() responses are for binomial models, not {fam}")
            s_expr, f_expr = _split_args(resp[len("cbind(") : -1])
            s, f = eval_numeric(s_expr, frame), eval_numeric(f_expr, frame)
            for arr, lab in ((s, s_expr), (f, f_expr)):
                if np.any(arr < 0):
                    raise DataError(f"binomial counts must be non-negative; {lab!r} has {arr[arr < 0][:5].tolist()}")
                if np.any(np.abs(arr - np.round(arr)) > 1e-8):
                    raise DataError(f"binomial counts must be whole numbers; {lab!r} has {arr[np.abs(arr - np.round(arr)) > 1e-8][:5].tolist()}")
            trials = s + f
            if np.any(trials == 0):
                raise DataError(f"{int((trials == 0).sum())} rows have zero binomial trials (cbind({s_expr}, {f_expr}) sums to 0)")
            self.y = s / trials
            self.weights = trials * self.prior_weights
            self.response_name = s_expr
            return
        self.response_name = resp
        if _is_name(resp, frame.columns):
            col = frame[resp.strip("`")]
        else:
            col = pd.Series(eval_numeric(resp, frame))
        if fam == "binomial":
            self.y = self._binary(col, resp, prior)
            self.weights = self.prior_weights.copy()
            return
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_string_dtype(col.dtype):
            raise DataError(
                f"response {resp!r} is a factor/string column; for a binary response use family='binomial'"
            )
        y = col.to_numpy(dtype=float)
        if fam == "poisson":
            if np.any(y < 0):
                raise DataError(f"Poisson response must be non-negative counts; {resp!r} has {y[y < 0][:5].tolist()}")
            if np.any(np.abs(y - np.round(y)) > 1e-8):
                raise DataError(f"Poisson response must be whole-number counts; {resp!r} has {y[np.abs(y - np.round(y)) > 1e-8][:5].tolist()}")
        self.y = y
        self.weights = self.prior_weights.copy()

    def _binary(self, col: pd.Series, name: str, prior) -> np.ndarray:
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_string_dtype(col.dtype):
            cat = _as_factor(col)
            if len(cat.categories) > 2:
                raise DataError(
                    f"binomial response {name!r} is a factor with {len(cat.categories)} levels "
                    f"({list(cat.categories)[:5]}); it needs two (the first is failure)"
                )
            return (np.asarray(cat.codes) > 0).astype(float)
        if col.dtype == bool:
            return col.to_numpy(dtype=float)
        y = col.to_numpy(dtype=float)
        if prior is None:
            bad = ~np.isin(y, (0.0, 1.0))
            if bad.any():
                vals = np.unique(y[bad])[:5].tolist()
                raise DataError(
                    f"binomial response {name!r} must be 0/1, TRUE/FALSE or a two-level factor; found {vals}. "
                    "For counts use cbind(successes, failures); for proportions give weights= the number of trials"
                )
            return y
        if np.any((y < 0) | (y > 1)):
            raise DataError(f"binomial proportions must lie in [0, 1]; {name!r} has {y[(y < 0) | (y > 1)][:5].tolist()}")
        succ = y * prior
        if np.any(np.abs(succ - np.round(succ)) > 1e-7):
            raise DataError(
                f"non-integer number of successes: {name!r} × weights is not a whole number "
                f"(e.g. {succ[np.abs(succ - np.round(succ)) > 1e-7][:3].tolist()})"
            )
        return y

    def _vector_arg(self, arg, frame: pd.DataFrame, what: str) -> np.ndarray | None:
        if arg is None:
            return None
        if isinstance(arg, str):
            return frame[arg].to_numpy(dtype=float)
        return np.asarray(arg, dtype=float)[self.row_index]

    # ----------------------------------------------------------------------------- fixed part
    def _build_fixed(self, frame: pd.DataFrame) -> None:
        try:
            mm = formulaic.model_matrix(_quote_dotted(_poly_ordered(_r_power(self.parsed.fixed), frame), frame.columns),
                                        _r_logicals(frame), na_action="ignore")
        except Exception as exc:
            raise FormulaError(f"cannot build the fixed-effects model matrix: {exc}", self.formula) from None
        self._fixed_spec = mm.model_spec
        names = [r_column_name(c) for c in mm.columns]
        X = np.asarray(mm, dtype=float)
        keep = _independent_columns(X)
        self.dropped_columns = [nm for nm, k in zip(names, keep) if not k]
        if self.dropped_columns:
            warnings.warn(
                f"fixed-effect model matrix is rank deficient so dropping {len(self.dropped_columns)} "
                f"column(s): {', '.join(self.dropped_columns)}",
                RankDeficiencyWarning,
                stacklevel=3,
            )
        self._fixed_keep = keep
        self.X = np.ascontiguousarray(X[:, keep])
        self.xnames = [nm for nm, k in zip(names, keep) if k]
        col_term = np.empty(len(names), dtype=object)
        for term, idx in mm.model_spec.term_indices.items():
            name = re.sub(r"C\((`?[^,()]+`?), contr\.poly\)", r"\1", str(term))  # ordered factors: their name
            col_term[idx] = "(Intercept)" if name == "1" else name
        self.xterms: list[str] = [str(t) for t, k in zip(col_term, keep) if k]

    def _build_offset(self, frame: pd.DataFrame, offset) -> None:
        off = np.zeros(self.n)
        for expr in self.parsed.offsets:
            off += eval_numeric(expr, frame)
        extra = self._vector_arg(offset, frame, "offset")
        if extra is not None:
            off += extra
        self.offset = off

    # ----------------------------------------------------------------------------- random part
    def _grouping(self, bar: BarTerm, frame: pd.DataFrame) -> tuple[str, np.ndarray, np.ndarray]:
        gvars = bar.group_vars
        facs = [_as_factor(frame[g]) for g in gvars]
        codes = np.asarray(facs[0].codes, dtype=np.int64)
        labels = _level_labels(facs[0].categories)
        for f in facs[1:]:
            nb = len(f.categories)
            codes = codes * nb + np.asarray(f.codes, dtype=np.int64)
            labels = np.char.add(np.char.add(np.repeat(labels, nb).astype(str), ":"),
                                 np.tile(_level_labels(f.categories).astype(str), len(labels)))
        used, refs = np.unique(codes, return_inverse=True)
        # how new data are encoded (predict): each variable's categories and the combined codes in use
        self._group_encoding.append(([pd.Index(f.categories) for f in facs], used))
        return ":".join(gvars), np.asarray(labels[used], dtype=object), refs.astype(np.int32)

    def _build_terms(self, frame: pd.DataFrame) -> None:
        terms, specs = [], []
        self._group_encoding: list = []
        for bar in self.parsed.bars:
            group, levels, refs = self._grouping(bar, frame)
            if bar.lhs.strip() == "1":  # the common (1 | g): no model matrix to build
                cnames, z, spec = ["(Intercept)"], np.ones((self.n, 1)), None
            else:
                try:
                    mm = formulaic.model_matrix(_quote_dotted(_poly_ordered(_r_power(bar.lhs), frame), frame.columns),
                                                _r_logicals(frame), na_action="ignore")
                except Exception as exc:
                    raise FormulaError(f"cannot build the model matrix of {bar.text}: {exc}", self.formula) from None
                cnames = [r_column_name(c) for c in mm.columns]
                z, spec = np.ascontiguousarray(np.asarray(mm, dtype=float)), mm.model_spec
            if z.shape[1] == 0:
                raise FormulaError(f"random-effects term {bar.text} has no effects", self.formula)
            terms.append(ReTerm(group=group, lhs=bar.lhs, cnames=cnames, levels=levels, refs=refs, z=z, text=bar.text))
            specs.append(spec)
        # lme4 order: decreasing number of levels, stable
        order = sorted(range(len(terms)), key=lambda i: -terms[i].nlev)
        self.terms: list[ReTerm] = [terms[i] for i in order]
        self._term_specs = [specs[i] for i in order]
        self._group_encoding = [self._group_encoding[i] for i in order]
        self._term_bars = [self.parsed.bars[i] for i in order]
        offs = np.cumsum([0] + [t.ntheta for t in self.terms])
        self.theta_slices = [slice(int(a), int(b)) for a, b in zip(offs[:-1], offs[1:])]
        qoffs = np.cumsum([0] + [t.q for t in self.terms])
        self.z_slices = [slice(int(a), int(b)) for a, b in zip(qoffs[:-1], qoffs[1:])]
        self.Z = sp.hstack([t.Z() for t in self.terms], format="csc")

    def _check_design(self) -> None:
        for t in self.terms:
            if t.nlev < 2:
                raise DesignError(
                    f"grouping factor {t.group!r} of {t.text} has a single level "
                    f"({t.levels[0]!r}): a variance cannot be estimated from one group"
                )
        if self.family_name == "gaussian":
            for t in self.terms:
                if t.nlev >= self.n:
                    raise DesignError(
                        f"number of levels of grouping factor {t.group!r} ({t.nlev}) must be less than the "
                        f"number of observations ({self.n}) in a linear mixed model"
                    )
                if t.q >= self.n:
                    raise DesignError(
                        f"number of observations ({self.n}) <= number of random effects ({t.q}) for term "
                        f"{t.text}; the random-effects parameters and the residual variance are unidentifiable"
                    )
        if self.n <= self.p and self.family_name == "gaussian":
            raise DesignError(f"{self.n} observations cannot estimate {self.p} fixed effects and a residual variance")

    # ----------------------------------------------------------------------------- θ and Λ
    @property
    def fixed_spec(self):
        """The formulaic ``ModelSpec`` of the fixed part (before rank-deficient columns are dropped)."""
        return self._fixed_spec

    @property
    def fixed_keep(self) -> np.ndarray:
        """Keep-mask over ``fixed_spec``'s columns (False where dropped for rank deficiency)."""
        return self._fixed_keep

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def q(self) -> int:
        return self.Z.shape[1]

    @property
    def theta0(self) -> np.ndarray:
        return np.concatenate([t.theta_start for t in self.terms])

    @property
    def lower(self) -> np.ndarray:
        return np.concatenate([t.theta_lower for t in self.terms])

    @property
    def theta_names(self) -> list[str]:
        return [nm for t in self.terms for nm in t.theta_names]

    @property
    def ngroups(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.terms:
            out.setdefault(t.group, t.nlev)
        return out

    def lambda_blocks(self, theta: np.ndarray) -> list[np.ndarray]:
        """lambda_blocks(theta) -> list of ndarray

        The k × k lower-triangular factor T_j(θ) of each term; Λ is
        ``blockdiag(I_{nlev_j} ⊗ T_j)``.
        """
        theta = np.asarray(theta, dtype=float)
        return [t.T(theta[s]) for t, s in zip(self.terms, self.theta_slices)]

    def Lambda(self, theta: np.ndarray) -> sp.csc_matrix:
        """Lambda(theta) -> scipy.sparse.csc_matrix (q, q)

        The relative covariance factor Λ(θ), block diagonal.
        """
        blocks = [sp.kron(sp.identity(t.nlev, format="csc"), sp.csc_matrix(T), format="csc")
                  for t, T in zip(self.terms, self.lambda_blocks(theta))]
        return sp.block_diag(blocks, format="csc")

    # ----------------------------------------------------------------------------- fitting
    def fit(self, method: str | None = None, **options: Any):
        """fit(method=None, **options) -> results

        Fit the model. Linear mixed models: ``method="REML"`` (default) or ``"ML"``.
        GLMMs: ``method="laplace"`` (default), ``"agq"`` (with ``nagq=``) or ``"fast"``
        (nAGQ = 0); see :func:`stochmm.deterministic.glmm.fit_glmm`. The builder
        knows no estimation path: :func:`stochmm.api.fit` dispatches.
        """
        return api.fit(self, method, **options)

    def with_response(self, y: Any) -> Model:
        """with_response(y) -> Model

        The same model (X, Z, terms, weights, offset, family, names: nothing is
        re-parsed or rebuilt) with a new response, for simulation studies and
        parametric bootstraps. ``y`` is on the scale :meth:`simulate`-style draws
        use: values (Gaussian), counts (Poisson), 0/1 (binary), numbers of
        successes (``cbind`` responses) or proportions (proportions with weights).

        Examples
        --------
        >>> import stochmm as sm
        >>> m = sm.Model("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
        >>> m2 = m.with_response(m.y + 1.0)
        >>> m2.Z is m.Z, float(m2.y[0] - m.y[0])
        (True, 1.0)
        """
        y = np.asarray(y, dtype=float)
        if y.shape != (self.n,):
            raise DataError(f"the new response must have shape ({self.n},), one value per observation; got {y.shape}")
        if not np.all(np.isfinite(y)):
            raise DataError(f"the new response has {int((~np.isfinite(y)).sum())} non-finite values")
        if self.family_name == "binomial" and str(self.parsed.response).startswith("cbind("):
            y = y / (self.weights / self.prior_weights)  # successes -> proportions of the trials
        if self.family_name == "binomial" and np.any((y < 0) | (y > 1)):
            raise DataError(f"binomial responses must lie in [0, 1] (or be counts of successes for cbind); "
                            f"found {y[(y < 0) | (y > 1)][:5].tolist()}")
        if self.family_name == "poisson" and np.any((y < 0) | (np.abs(y - np.round(y)) > 1e-8)):
            raise DataError("Poisson responses must be non-negative whole numbers")
        new = copy.copy(self)
        new.y = y
        return new

    def simulate(self, beta: Any, theta: Any, sigma: float | None = None, nsim: int = 1,
                 seed: int | np.random.Generator | None = None, *, family: Any = None,
                 b: np.ndarray | None = None) -> np.ndarray:
        """simulate(beta, theta, sigma=None, nsim=1, seed=None, *, family=None, b=None) -> ndarray (n, nsim)

        Responses drawn from the model at given parameters, as lme4's ``simulate``:
        new random effects b = Λ(θ)u with u ~ N(0, I) (or the given ``b``), then
        y = Xβ + Zb + offset + σε/√w (Gaussian) or the family's draws on
        μ = g⁻¹(Xβ + Zb + offset): numbers of successes for ``cbind`` responses,
        proportions with weights, 0/1 for binary data, counts for Poisson —
        the scale :meth:`with_response` takes back.

        Parameters
        ----------
        beta : array-like (p,)
            Fixed effects in ``xnames`` order.
        theta : array-like
            Relative covariance parameters in ``theta_names`` order (Gaussian: relative to σ).
        sigma : float, optional
            Residual SD; required for Gaussian models, ignored otherwise.
        nsim : int
            Number of responses.
        seed : int or numpy.random.Generator, optional
        family : Family, optional
            For GLMMs, the family object (default: ``get_family(self.family)``).
        b : ndarray (q,), optional
            Keep these random effects instead of drawing new ones.

        Examples
        --------
        >>> import stochmm as sm
        >>> m = sm.Model("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
        >>> m.simulate([1500.0], [0.8], sigma=50.0, nsim=3, seed=1).shape
        (30, 3)
        """
        from .families import get_family

        if int(nsim) != nsim or nsim < 1:
            raise ValueError(f"nsim must be a positive integer, got {nsim!r}")
        beta = np.asarray(beta, dtype=float)
        theta = np.asarray(theta, dtype=float)
        if beta.shape != (self.p,):
            raise DataError(f"beta must have {self.p} values ({', '.join(self.xnames)}); got shape {beta.shape}")
        if theta.shape != (len(self.theta_names),):
            raise DataError(f"theta must have {len(self.theta_names)} values ({', '.join(self.theta_names)}); "
                            f"got shape {theta.shape}")
        gaussian = self.family_name == "gaussian"
        if gaussian and (sigma is None or not np.isfinite(sigma) or sigma <= 0):
            raise DataError(f"a Gaussian model needs a positive residual SD sigma; got {sigma!r}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        fam = None if gaussian else (family if family is not None else get_family(self.family))
        base = self.X @ beta + self.offset
        Ts = self.lambda_blocks(theta)
        out = np.empty((self.n, int(nsim)))
        for s in range(int(nsim)):
            if b is None:
                bs = np.concatenate([(rng.standard_normal((t.nlev, t.k)) @ T.T).ravel() for t, T in zip(self.terms, Ts)])
            else:
                bs = np.asarray(b, dtype=float)
            if gaussian:
                e = rng.standard_normal(self.n) / np.sqrt(self.prior_weights)
                out[:, s] = base + sigma * (self.Z @ bs + e)
            else:
                out[:, s] = fam.simulate(fam.linkinv(base + self.Z @ bs), self, rng)
        return out

    # ----------------------------------------------------------------------------- stochastic paths (stochmm.api)
    def loglik(self, params: Any, method: str = "is", **options: Any):
        """loglik(params, method="is", **options) -> LogLik

        The log-likelihood at ``params`` (a fit or ``{"beta": ..., "theta": ..., "sigma": ...}``) on the
        package's one full scale: importance sampling (``"is"``, with ``draws=``, ``seed=``,
        ``proposal=``, ``df=``), ``"laplace"``, ``"agq"`` (``nagq=``), ``"fast"``, or ``"exact"`` (LMMs);
        see :func:`stochmm.stochastic.importance.loglik`.
        """
        return api.resolve("Model.loglik")(self, params, method, **options)

    def sample(self, **options: Any):
        """sample(**options) -> PosteriorResults

        The posterior of this model by NUTS (:func:`stochmm.stochastic.posterior.sample_model`: priors,
        draws, warmup, chains, seed, progress, clones, marginalize, ...).
        """
        return api.resolve("Model.sample")(self, **options)

    # ----------------------------------------------------------------------------- new data
    def new_design(self, newdata: pd.DataFrame) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """new_design(newdata) -> (X, [(refs, z), ...])

        Fixed-effects matrix and each term's (level index, model matrix) for new
        data, encoded exactly as the fitted data were. Levels not seen in the fit
        get index -1 (their random effects are zero).
        """
        newdata = _r_logicals(newdata)
        mm = self._fixed_spec.get_model_matrix(newdata, na_action="ignore")
        X = np.asarray(mm, dtype=float)[:, self._fixed_keep]
        out = []
        for t, spec, bar, (cats, used) in zip(self.terms, self._term_specs, self._term_bars, self._group_encoding):
            if spec is None:
                z = np.ones((len(newdata), 1))
            else:
                z = np.asarray(spec.get_model_matrix(newdata, na_action="ignore"), dtype=float)
            code = np.zeros(len(newdata), dtype=np.int64)
            missing = np.zeros(len(newdata), dtype=bool)
            for g, c in zip(bar.group_vars, cats):
                k = _codes_in(c, newdata[g])
                missing |= k < 0
                code = code * len(c) + np.maximum(k, 0)
            pos = np.searchsorted(used, code)
            pos = np.minimum(pos, len(used) - 1)
            refs = np.where(~missing & (used[pos] == code), pos, -1).astype(np.int64)
            if len(refs) and np.all(refs < 0):
                warnings.warn(f"none of the {t.group!r} levels in newdata were seen in the fit; their random "
                              "effects are set to 0 (population-level predictions)", UserWarning, stacklevel=3)
            out.append((refs, z))
        return X, out

    def __repr__(self) -> str:
        terms = ", ".join(f"{t.text or t.lhs} [{t.group}: {t.nlev}x{t.k}]" for t in self.terms)
        return f"Model({self.formula!r}, family={self.family_name!r}, n={self.n}, p={self.p}, q={self.q}; {terms})"


def _family_name(family: Any) -> str:
    """Family name for the builder's response checks.

    Strings must name a built-in family; a family object (anything with a ``name``,
    e.g. a subclass of :class:`stochmm.builder.families.Family`) may define a new one, whose
    response is taken as numeric.
    """
    if family is None:
        return "gaussian"
    name = family if isinstance(family, str) else getattr(family, "name", None)
    if not isinstance(name, str):
        raise DataError(f"family must be a name or a family object, got {family!r}")
    name = name.lower()
    if isinstance(family, str) and name not in _FAMILIES:
        raise DataError(f"unsupported family {name!r}; supported: {', '.join(_FAMILIES)}")
    return name


def _independent_columns(X: np.ndarray, tol: float = 1e-7) -> np.ndarray:
    """Keep-mask of columns linearly independent of the columns before them.

    Like R's ``qr()`` (tolerance 1e-7, limited pivoting): after scaling each column
    to unit length, a Householder QR gives |R_jj| = the norm of column j's residual
    on the columns before it; a column with |R_jj| < tol is dropped, so later
    columns go first. One O(np²) factorization; no cross-product (that would
    square the condition number).
    """
    n, p = X.shape
    if p == 0:
        return np.zeros(0, dtype=bool)
    scale = np.linalg.norm(X, axis=0)
    scale[scale == 0] = 1.0
    R = np.linalg.qr(X / scale, mode="r")
    d = np.abs(np.diag(R)) if R.shape[0] >= p else np.r_[np.abs(np.diag(R)), np.zeros(p - R.shape[0])]
    return d > tol
