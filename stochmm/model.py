"""The builder: formula + DataFrame → X, y, Z, Λ(θ) template, θ bounds and names.

:class:`Model` is the only place a formula is parsed and a model matrix built.
Every estimation path (LMM profiled deviance, GLMM PIRLS/Laplace/AGQ, NumPyro,
importance sampling, moments) starts from a :class:`Model`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import formulaic
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import (
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
    ``service[T.1]:dept[T.5]`` → ``service1:dept5``.
    """
    if name == "Intercept":
        return "(Intercept)"
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
def _required(expr: str, formula_text: str) -> set[str]:
    try:
        return set(formulaic.Formula(expr).required_variables)
    except Exception as exc:  # formulaic's parse errors are opaque; show the formula
        raise FormulaError(f"cannot parse {expr!r}: {exc}", formula_text) from None


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
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object:
            raise DataError(f"{e!r} is not numeric (dtype {col.dtype})")
        return col.to_numpy(dtype=float)
    if _SIMPLE_ARITH.match(e) and all(_is_name(v, frame.columns) for v in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", e)):
        # `size - incidence`: plain arithmetic of numeric columns, no formula machinery needed
        return np.asarray(frame.eval(e), dtype=float)
    mm = formulaic.model_matrix(f"0 + I({e})", frame, na_action="ignore")
    return np.asarray(mm, dtype=float)[:, 0]


def _as_factor(col: pd.Series) -> pd.Categorical:
    """A grouping variable as a categorical with unused levels dropped.

    Categoricals keep their level order; numbers sort numerically and strings
    lexically, as R's ``factor()`` does.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.remove_unused_categories().array
    vals = col.to_numpy()
    cats = np.unique(vals)
    return pd.Categorical(vals, categories=cats)


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
        self.frame = frame
        self.row_index = row_index
        self.n = len(frame)
        self._build_response(frame, weights)
        self._build_fixed(frame)
        self._build_offset(frame, offset)
        self._build_terms(frame)
        self._check_design()

    # ----------------------------------------------------------------------------- frame
    def _variables(self) -> tuple[list[str], dict[str, str]]:
        """Columns the model uses, and where each is used (for messages)."""
        pf = self.parsed
        where: dict[str, str] = {}
        resp = pf.response
        if resp.startswith("cbind(") and resp.endswith(")"):
            parts = _split_args(resp[len("cbind(") : -1])
            if len(parts) != 2:
                raise FormulaError("cbind() response needs exactly two arguments: cbind(successes, failures)", pf.text, 0)
            for p in parts:
                for v in _required(f"0 + I({p})", pf.text):
                    where.setdefault(v, "response")
        else:
            for v in _required(f"{resp} ~ 1", pf.text):
                where.setdefault(v, "response")
        for v in _required(pf.fixed, pf.text):
            where.setdefault(v, "fixed-effects term")
        for off in pf.offsets:
            for v in _required(f"0 + I({off})", pf.text):
                where.setdefault(v, "offset")
        for b in pf.bars:
            for v in _required(b.lhs, pf.text):
                where.setdefault(v, f"random-effects term {b.text}")
            for v in b.group_vars:
                where.setdefault(v, f"grouping factor of {b.text}")
        return list(where), where

    def _model_frame(self, data, weights, offset) -> tuple[pd.DataFrame, np.ndarray]:
        names, where = self._variables()
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
            mm = formulaic.model_matrix(_poly_ordered(self.parsed.fixed, frame), frame, na_action="ignore")
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
        labels = np.asarray(facs[0].categories.astype(str))
        for f in facs[1:]:
            nb = len(f.categories)
            codes = codes * nb + np.asarray(f.codes, dtype=np.int64)
            labels = np.char.add(np.char.add(np.repeat(labels, nb).astype(str), ":"),
                                 np.tile(np.asarray(f.categories.astype(str)), len(labels)))
        used, refs = np.unique(codes, return_inverse=True)
        return ":".join(gvars), np.asarray(labels[used], dtype=object), refs.astype(np.int32)

    def _build_terms(self, frame: pd.DataFrame) -> None:
        terms, specs = [], []
        for bar in self.parsed.bars:
            group, levels, refs = self._grouping(bar, frame)
            if bar.lhs.strip() == "1":  # the common (1 | g): no model matrix to build
                cnames, z, spec = ["(Intercept)"], np.ones((self.n, 1)), None
            else:
                try:
                    mm = formulaic.model_matrix(_poly_ordered(bar.lhs, frame), frame, na_action="ignore")
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
        (nAGQ = 0); see :func:`stochmm.glmm.fit_glmm`.
        """
        if self.family_name == "gaussian":
            from .lmm import fit_lmm

            m = (method or "REML").upper()
            if m not in ("REML", "ML"):
                raise ValueError(f"method for a linear mixed model is 'REML' or 'ML', not {method!r}")
            return fit_lmm(self, reml=(m == "REML"), **options)
        from .glmm import fit_glmm

        return fit_glmm(self, method=method, **options)

    # ----------------------------------------------------------------------------- new data
    def new_design(self, newdata: pd.DataFrame) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """new_design(newdata) -> (X, [(refs, z), ...])

        Fixed-effects matrix and each term's (level index, model matrix) for new
        data, encoded exactly as the fitted data were. Levels not seen in the fit
        get index -1 (their random effects are zero).
        """
        mm = self._fixed_spec.get_model_matrix(newdata, na_action="ignore")
        X = np.asarray(mm, dtype=float)[:, self._fixed_keep]
        out = []
        for t, spec, bar in zip(self.terms, self._term_specs, self._term_bars):
            if spec is None:
                z = np.ones((len(newdata), 1))
            else:
                z = np.asarray(spec.get_model_matrix(newdata, na_action="ignore"), dtype=float)
            labels = newdata[bar.group_vars[0]].astype(str).to_numpy(dtype=object)
            for g in bar.group_vars[1:]:
                labels = labels + ":" + newdata[g].astype(str).to_numpy(dtype=object)
            lookup = pd.Index(t.levels)
            out.append((lookup.get_indexer(labels).astype(np.int64), z))
        return X, out

    def __repr__(self) -> str:
        terms = ", ".join(f"{t.text or t.lhs} [{t.group}: {t.nlev}x{t.k}]" for t in self.terms)
        return f"Model({self.formula!r}, family={self.family_name!r}, n={self.n}, p={self.p}, q={self.q}; {terms})"


def _family_name(family: Any) -> str:
    """Family name for the builder's response checks.

    Strings must name a built-in family; a family object (anything with a ``name``,
    e.g. a subclass of :class:`stochmm.families.Family`) may define a new one, whose
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

    Like R's ``qr()`` with its limited pivoting, a column that is (numerically)
    in the span of earlier ones is dropped, so later columns go first.
    """
    n, p = X.shape
    keep = np.zeros(p, dtype=bool)
    if p == 0:
        return keep
    # Cholesky-style Gram–Schmidt on the p×p cross-product (cost O(np² ) once)
    scale = np.sqrt(np.einsum("ij,ij->j", X, X))
    scale[scale == 0] = 1.0
    G = (X.T @ X) / np.outer(scale, scale)
    R = np.zeros((p, p))
    kept: list[int] = []
    for j in range(p):
        r = np.zeros(p)
        if kept:
            Rk = R[np.ix_(kept, kept)]
            r_k = np.linalg.solve(Rk.T, G[kept, j])
            resid = G[j, j] - r_k @ r_k
        else:
            r_k = np.zeros(0)
            resid = G[j, j]
        if resid > tol * max(G[j, j], 1e-300) and resid > 1e-14:
            keep[j] = True
            R[kept, j] = r_k
            R[j, j] = np.sqrt(resid)
            kept.append(j)
            del r
    return keep
