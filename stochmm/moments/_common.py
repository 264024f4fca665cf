"""Shared pieces of the moment estimators: results, truncation, design checks.

Every moment path reports a :class:`MomentResults`: variance components as a
:class:`pandas.Series` named as ``varcorr``'s ``group`` column names them (plus
``Residual``), fixed effects and their standard errors, and the lme4-style
``theta``/``sigma`` pair that :func:`stochmm.lmer` accepts as start values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..builder.model import Model
from ..errors import DataError, DesignError, NegativeEstimateWarning

__all__ = ["MomentResults", "NegativeEstimateWarning", "truncate_negative"]


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside stochmm."""
    import os
    import sys

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level, f = 1, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg):
        level += 1
        f = f.f_back
    return level


def truncate_negative(raw: pd.Series, stacklevel: int | None = None) -> tuple[pd.Series, list[str]]:
    """truncate_negative(raw) -> (truncated, names)

    Set negative variance estimates to 0 with a :class:`NegativeEstimateWarning`
    that names each component and its raw value.
    """
    stacklevel = user_stacklevel() if stacklevel is None else stacklevel
    out = raw.astype(float).copy()
    names = [str(k) for k, v in raw.items() if np.isfinite(v) and v < 0]
    for k in names:
        warnings.warn(
            f"moment estimate of the {k!r} variance is negative ({raw[k]:.6g}); truncated to 0",
            NegativeEstimateWarning,
            stacklevel=stacklevel,
        )
        out[k] = 0.0
    return out, names


# ---------------------------------------------------------------------------------------------
# design helpers shared by the ANOVA and moment paths
# ---------------------------------------------------------------------------------------------
def require_intercept_terms(m: Model, what: str) -> None:
    """Moment estimators here cover variance components of random intercepts only."""
    for t in m.terms:
        if t.k != 1 or t.cnames != ["(Intercept)"]:
            raise DesignError(
                f"{what} estimates variance components of random intercepts '(1 | g)' only; "
                f"term {t.text or t.lhs!r} has effects {t.cnames}. Use sm.lmer for random slopes"
            )
    if m.family_name != "gaussian":
        raise DesignError(f"{what} is for linear (gaussian) models, not family {m.family_name!r}")
    if np.any(m.prior_weights != 1.0):
        raise DesignError(f"{what} does not support prior weights")


def fixed_term_columns(m: Model) -> list[tuple[str, np.ndarray]]:
    """Fixed-effects terms and their columns of ``m.X``, in model-matrix order.

    The intercept is named ``"(Intercept)"``; columns dropped for rank deficiency are
    left out, and a term with no columns left is omitted.
    """
    xterms = np.asarray(m.xterms, dtype=object)
    return [(nm, np.flatnonzero(xterms == nm)) for nm in dict.fromkeys(m.xterms)]


def independent_from_gram(G: np.ndarray, tol: float = 1e-7) -> np.ndarray:
    """Keep-mask of columns independent of the columns before them, from their Gram matrix.

    The same rule as the builder's rank check on ``X`` (R's ``qr()`` tolerance): a
    column whose residual norm on the earlier kept columns is below ``tol`` times its
    norm — squared residual below ``tol²`` times the squared norm — is dropped (so
    later columns go first). From X'X only (what Dask partitions give), so columns
    within about 1e-8 of dependence are judged less reliably than from X itself.
    """
    p = G.shape[0]
    keep = np.zeros(p, dtype=bool)
    d = np.sqrt(np.clip(np.diag(G), 0, None))
    d[d == 0] = 1.0
    Gs = G / np.outer(d, d)
    kept: list[int] = []
    L = np.zeros((0, 0))
    for j in range(p):  # p is the number of fixed-effects columns: small
        if kept:
            r = np.linalg.solve(L, Gs[kept, j]) if L.size else np.zeros(0)
            resid = Gs[j, j] - r @ r
        else:
            r, resid = np.zeros(0), Gs[j, j]
        if resid > tol * tol * max(Gs[j, j], 1e-300) and np.diag(G)[j] > 0:
            k = len(kept)
            L2 = np.zeros((k + 1, k + 1))
            L2[:k, :k] = L
            L2[k, :k] = r
            L2[k, k] = np.sqrt(resid)
            L = L2
            kept.append(j)
            keep[j] = True
    return keep


def require_variation(m: Model, y: np.ndarray) -> None:
    """Refuse a response with no variation (every moment estimate would be 0 and θ = 0/0),
    with the same message as :func:`stochmm.lmer`."""
    if y.size and np.ptp(y) == 0:
        raise DataError(f"the response {m.response_name!r} is constant (no residual variation): "
                        "there is no variance to estimate")


def progress_bar(total: int, desc: str, disable: bool):
    """A tqdm progress bar (a notebook widget where ipywidgets is installed, text otherwise).

    ``disable=True`` (``progress=False``) switches it off; otherwise it shows in a
    notebook or on a terminal and stays quiet when stderr is not a terminal (logs,
    CI), so no carriage returns end up in files.
    """
    import sys

    with warnings.catch_warnings():  # tqdm.auto warns once when it falls back from widgets to text
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    kernel = "ipykernel" in sys.modules and type(sys.stderr).__module__.startswith("ipykernel")
    return tqdm(total=total, desc=desc, disable=True if disable else (False if kernel else None), leave=False)


def fmt_num(c: float) -> str:
    """A coefficient for an expected-mean-square expression: integers exactly, else 4 digits."""
    r = round(c)
    if abs(c - r) <= 1e-8 * max(1.0, abs(c)):
        return str(int(r))
    return f"{c:.4g}"


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
class MomentResults:
    """Common results of the moment estimators.

    Attributes
    ----------
    formula : str
    method : str
        Estimator used (``"anova"``, ``"matloff"``, ``"ustat"``, ...).
    varcomp : pandas.Series
        Variance estimates (negative ones truncated to 0), indexed by the
        grouping-factor names as ``varcorr``'s ``group`` column names them, in lme4's
        term order, then ``"Residual"``.
    varcomp_raw : pandas.Series
        The same before truncation.
    truncated : list of str
        Components whose raw estimate was negative.
    fixef, se : pandas.Series
        Fixed-effects estimates and standard errors.
    vcov : pandas.DataFrame
        Their covariance matrix.
    varcomp_se : pandas.Series or None
        Standard errors of the variance estimates, where the method gives them.
    nobs : int
    ngroups : dict
        Number of levels of each grouping factor.
    """

    def __init__(self, *, formula: str, method: str, varcomp_raw: pd.Series, fixef: pd.Series,
                 vcov: pd.DataFrame, nobs: int, ngroups: dict[str, int], varcomp_se: pd.Series | None = None,
                 se_method: str | None = None, warn: bool = True, info: dict[str, Any] | None = None) -> None:
        self.formula = formula
        self.method = method
        self.varcomp_raw = varcomp_raw.astype(float)
        if warn:
            self.varcomp, self.truncated = truncate_negative(self.varcomp_raw)
        else:
            self.varcomp = self.varcomp_raw.clip(lower=0.0)
            self.truncated = [str(k) for k, v in self.varcomp_raw.items() if v < 0]
        self.fixef = fixef
        self.vcov = vcov
        self.se = pd.Series(np.sqrt(np.clip(np.diag(vcov.to_numpy()), 0, None)), index=fixef.index, dtype=float)
        self.varcomp_se = varcomp_se
        self.se_method = se_method
        self.nobs = int(nobs)
        self.ngroups = dict(ngroups)
        self.info = dict(info or {})

    # -- the lme4 parametrisation ------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        """Grouping factors in lme4's term order (decreasing number of levels)."""
        return [g for g in self.varcomp.index if g != "Residual"]

    @property
    def sigma(self) -> float:
        """Residual standard deviation."""
        return float(np.sqrt(self.varcomp["Residual"]))

    @property
    def theta(self) -> np.ndarray:
        """θ = σ_g / σ for each grouping factor in lme4's term order: start values for :func:`stochmm.lmer`."""
        s = self.sigma
        v = self.varcomp[self.groups].to_numpy(dtype=float)
        if not s > 0:
            warnings.warn(f"the residual variance is estimated as {s * s:.3g}: θ = σ_g/σ is undefined (NaN)",
                          NegativeEstimateWarning, stacklevel=2)
            return np.full(len(v), np.nan)
        return np.sqrt(v) / s

    @property
    def varcorr(self) -> pd.DataFrame:
        """Tidy variance components with lmer's columns (group, term1, term2, variance, sd, corr)."""
        rows = [(g, "(Intercept)" if g != "Residual" else np.nan, np.nan, v, np.sqrt(v), np.nan)
                for g, v in self.varcomp.items()]
        out = pd.DataFrame(rows, columns=["group", "term1", "term2", "variance", "sd", "corr"])
        return out.astype({"term1": object, "term2": object})

    def coef_table(self) -> pd.DataFrame:
        """Estimate, standard error and z value of each fixed effect."""
        return pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.se, "z value": self.fixef / self.se})

    def varcomp_table(self) -> pd.DataFrame:
        """Variance, standard deviation, standard error (if any) and truncation flag per component."""
        df = pd.DataFrame({"variance": self.varcomp, "sd": np.sqrt(self.varcomp), "raw": self.varcomp_raw})
        if self.varcomp_se is not None:
            df["se"] = self.varcomp_se.reindex(df.index)
        df["truncated"] = [g in self.truncated for g in df.index]
        return df

    def _header(self) -> str:
        grp = ", ".join(f"{g}: {k}" for g, k in self.ngroups.items())
        return f"{type(self).__name__}: {self.formula}\n  method: {self.method}; nobs: {self.nobs}; groups: {grp}"

    def __repr__(self) -> str:
        out = [self._header(), "", "Variance components:", self.varcomp_table().to_string(float_format=lambda v: f"{v:.6g}")]
        if len(self.fixef):
            out += ["", "Fixed effects:", self.coef_table().to_string(float_format=lambda v: f"{v:.6g}")]
        if self.se_method:
            out += ["", f"standard errors: {self.se_method}"]
        return "\n".join(out)


def lme4_order(groups: Sequence[str], nlev: Sequence[int]) -> list[int]:
    """Indices sorting terms as lme4 does: decreasing number of levels, stable."""
    return sorted(range(len(groups)), key=lambda i: -nlev[i])
