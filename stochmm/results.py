"""One results vocabulary for every estimation path.

:class:`MixedModelResults` holds what every fit reports — ``objective``,
``loglik``, ``aic``, ``bic``, ``fixef``, ``vcov``, ``se``, ``theta``, ``sigma``,
``varcorr``, ``ranef``, ``fitted``, ``residuals``, ``is_singular``, ``optsum`` —
and the pieces of an lme4-style ``summary()``. Paths subclass it
(:class:`stochmm.deterministic.lmm.LmmResults`, the GLMM results) and fill the fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .builder.model import Model
from .deterministic.optsummary import OptSummary

__all__ = ["MixedModelResults", "Summary", "varcorr_table", "format_coef_table"]


@dataclass
class Summary:
    """Printable summary; ``str(summary)`` is the lme4-style text."""

    text: str
    tables: dict[str, pd.DataFrame]

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:  # notebooks: keep the monospace layout
        import html

        return f"<pre>{html.escape(self.text)}</pre>"


def unique_group_names(groups: list[str]) -> list[str]:
    """R's ``make.unique``: the second 'Subject' becomes 'Subject.1'."""
    seen: dict[str, int] = {}
    out = []
    for g in groups:
        if g in seen:
            seen[g] += 1
            out.append(f"{g}.{seen[g]}")
        else:
            seen[g] = 0
            out.append(g)
    return out


def varcorr_table(model: Model, theta: np.ndarray, sigma: float | None) -> pd.DataFrame:
    """varcorr_table(model, theta, sigma) -> DataFrame

    Tidy variance components (lme4's ``as.data.frame(VarCorr(fit))``): one row per
    variance (``term2`` empty, ``corr`` NaN) then per covariance of each term, and a
    ``Residual`` row when ``sigma`` is given. The scale is σ² (1 for GLMMs without
    a dispersion parameter: pass ``sigma=None`` and variances use σ = 1).
    """
    s = 1.0 if sigma is None else float(sigma)
    rows = []
    names = unique_group_names([t.group for t in model.terms])
    for name, t, T in zip(names, model.terms, model.lambda_blocks(theta)):
        cov = s * s * (T @ T.T)
        sd = np.sqrt(np.diag(cov))
        for a in range(t.k):
            rows.append((name, t.cnames[a], None, cov[a, a], sd[a], np.nan))
        for a in range(t.k):
            for b in range(a + 1, t.k):
                denom = sd[a] * sd[b]
                rows.append((name, t.cnames[a], t.cnames[b], cov[a, b], np.nan, cov[a, b] / denom if denom > 0 else np.nan))
    if sigma is not None:
        rows.append(("Residual", None, None, s * s, s, np.nan))
    return pd.DataFrame(rows, columns=["group", "term1", "term2", "variance", "sd", "corr"])


def _decimals(values, digits: int) -> int:
    """Decimals R's ``format(x, digits)`` would use so the smallest |x| shows ``digits`` significant digits."""
    v = np.abs(np.asarray([x for x in values if x is not None and np.isfinite(x) and x != 0], dtype=float))
    if v.size == 0:
        return 0
    return int(min(max(digits - 1 - np.floor(np.log10(v.min())), 0), 10))


def format_coef_table(df: pd.DataFrame, digits: int = 4) -> str:
    """format_coef_table(df, digits=4) -> str

    Coefficient table laid out as R's ``printCoefmat``: estimate and standard
    error share decimals chosen so the standard errors show ``digits`` significant
    digits; test statistics with 2 (lme4 prints 3 for z) decimals; p-values in 3 digits.
    """
    est_cols = [c for c in df.columns if c in ("Estimate", "Std. Error")]
    dec = _decimals(df["Std. Error"] if "Std. Error" in df else df[est_cols[0]], digits)
    cells = []
    for i in df.index:
        row = [str(i)]
        for c in df.columns:
            v = df.loc[i, c]
            if v is None or not np.isfinite(v):
                row.append("NA")
            elif c in est_cols:
                row.append(f"{v:.{dec}f}")
            elif c == "t value":
                row.append(f"{v:.2f}")
            elif c == "z value":
                row.append(f"{v:.3f}")
            elif c.startswith("Pr("):
                row.append("< 2e-16" if v < 2e-16 else f"{v:.3g}")
            else:
                row.append(f"{v:.{digits}g}")
        cells.append(row)
    header = [""] + list(df.columns)
    widths = [max(len(r[j]) for r in cells + [header]) for j in range(len(header))]
    lines = [" ".join(h.rjust(w) if j else h.ljust(w) for j, (h, w) in enumerate(zip(header, widths)))]
    for r in cells:
        lines.append(" ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


class MixedModelResults:
    """Fitted mixed model: the shared vocabulary.

    Attributes
    ----------
    model : Model
        The builder output the fit used.
    method : str
        ``"REML"``, ``"ML"``, ``"Laplace"``, ``"AGQ(25)"``, ...
    objective : float
        The minimised criterion on lme4's scale (−2 log-likelihood, or the REML criterion).
    loglik : float
        Log-likelihood (REML fits: −REMLcrit/2, as lme4's ``logLik``).
    nobs : int
    df : int
        Number of estimated parameters (fixed effects, θ and any dispersion).
    aic, bic : float
    fixef : pandas.Series
        Fixed effects in model-matrix column order.
    vcov : pandas.DataFrame
        Their covariance matrix.
    se : pandas.Series
        Standard errors.
    theta : numpy.ndarray
        Relative covariance parameters in lme4's order (``theta_names``).
    sigma : float
        Residual standard deviation (1 for families without dispersion).
    varcorr : pandas.DataFrame
        Tidy variance components (group, term1, term2, variance, sd, corr).
    ranef : dict of str -> DataFrame
        Conditional modes of the random effects by grouping factor (levels × terms).
    ranef_condvar : dict of str -> ndarray
        Their conditional covariance matrices, (levels, k, k) per grouping factor.
    fitted, residuals : numpy.ndarray
    is_singular : bool
        Some variance component estimated on its boundary.
    optsum : OptSummary
    ngroups : dict of str -> int
    """

    family_label = "Linear"

    def __init__(self, model: Model, method: str, objective: float, beta: np.ndarray, vcov: np.ndarray,
                 theta: np.ndarray, sigma: float, b: np.ndarray, b_condvar: list[np.ndarray] | None,
                 optsum: OptSummary | None, *, loglik: float, df: int, dispersion: bool = True) -> None:
        self.model = model
        self.method = method
        self.objective = float(objective)
        self.theta = np.asarray(theta, dtype=float)
        self.theta_names = model.theta_names
        self.sigma = float(sigma)
        self._beta = np.asarray(beta, dtype=float)
        self._vcov = np.asarray(vcov, dtype=float)
        self._b = np.asarray(b, dtype=float)
        self._b_condvar = b_condvar
        self.optsum = optsum
        self.loglik = float(loglik)
        self.df = int(df)
        self.nobs = model.n
        self._dispersion = dispersion
        self.is_singular = bool(np.any(self.theta[self._diag_theta] < 1e-4))
        self.warnings: list[str] = []

    # -- parameters ---------------------------------------------------------------------------
    @property
    def _diag_theta(self) -> np.ndarray:
        return np.concatenate([t.diag_index + s.start for t, s in zip(self.model.terms, self.model.theta_slices)])

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.df

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + self.df * np.log(self.nobs)

    @property
    def deviance(self) -> float:
        return -2.0 * self.loglik

    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self._beta, index=self.model.xnames, name="fixef")

    @property
    def vcov(self) -> pd.DataFrame:
        return pd.DataFrame(self._vcov, index=self.model.xnames, columns=self.model.xnames)

    @property
    def se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self._vcov)), index=self.model.xnames, name="se")

    @property
    def ngroups(self) -> dict[str, int]:
        return self.model.ngroups

    @property
    def varcorr(self) -> pd.DataFrame:
        return varcorr_table(self.model, self.theta, self.sigma if self._dispersion else None)

    # -- random effects -----------------------------------------------------------------------
    @property
    def b(self) -> np.ndarray:
        """Random effects b = Λu, stacked in Z's column order."""
        return self._b

    def _by_group(self):
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.model.terms):
            groups.setdefault(t.group, []).append(i)
        return groups

    @property
    def ranef(self) -> dict[str, pd.DataFrame]:
        out = {}
        for g, idx in self._by_group().items():
            frames = []
            for i in idx:
                t, sl = self.model.terms[i], self.model.z_slices[i]
                frames.append(pd.DataFrame(self._b[sl].reshape(t.nlev, t.k), index=pd.Index(t.levels, name=g),
                                           columns=t.cnames))
            out[g] = pd.concat(frames, axis=1) if len(frames) > 1 else frames[0]
        return out

    @property
    def ranef_condvar(self) -> dict[str, np.ndarray]:
        if self._b_condvar is None:
            raise AttributeError("conditional variances were not computed for this fit")
        if callable(self._b_condvar):
            self._b_condvar = self._b_condvar()
        out = {}
        for g, idx in self._by_group().items():
            ks = [self.model.terms[i].k for i in idx]
            nlev = self.model.terms[idx[0]].nlev
            cv = np.zeros((nlev, sum(ks), sum(ks)))
            off = 0
            for i, k in zip(idx, ks):
                cv[:, off : off + k, off : off + k] = self._b_condvar[i]
                off += k
            out[g] = cv
        return out

    def ranef_table(self) -> pd.DataFrame:
        """Tidy random effects (lme4's ``as.data.frame(ranef(fit, condVar=TRUE))``)."""
        rows = []
        cv = self.ranef_condvar if self._b_condvar is not None else None  # noqa: F841 (computed once)
        for g, df in self.ranef.items():
            sds = np.sqrt(np.diagonal(cv[g], axis1=1, axis2=2)) if cv is not None else np.full(df.shape, np.nan)
            for j, term in enumerate(df.columns):
                rows.append(pd.DataFrame({"group": g, "term": term, "level": df.index.astype(str),
                                          "condval": df.iloc[:, j].to_numpy(), "condsd": sds[:, j]}))
        return pd.concat(rows, ignore_index=True)

    # -- predictions ----------------------------------------------------------------------------
    @property
    def linear_predictor(self) -> np.ndarray:
        m = self.model
        return m.X @ self._beta + m.Z @ self._b + m.offset

    def _linkinv(self, eta: np.ndarray) -> np.ndarray:
        return eta

    @property
    def fitted(self) -> np.ndarray:
        return self._linkinv(self.linear_predictor)

    @property
    def residuals(self) -> np.ndarray:
        return self.model.y - self.fitted

    def predict(self, newdata: pd.DataFrame | None = None, type: str = "response", re_form: str | None = "full",
                offset: np.ndarray | str | None = None) -> np.ndarray:
        """predict(newdata=None, type="response", re_form="full", offset=None) -> ndarray

        Predictions on the link (``type="link"``) or response scale. ``re_form=None``
        (or ``"~0"``) gives population-level predictions (random effects set to
        zero); levels not seen in the fit get zero random effects. ``offset()`` terms
        of the formula are evaluated on ``newdata``; an offset given to the fit as
        ``offset=`` must be given again here for new data (values or a column name).
        """
        if type not in ("link", "response"):
            raise ValueError(f"type must be 'link' or 'response', not {type!r}")
        m = self.model
        if newdata is None:
            eta = m.X @ self._beta + m.offset
            if re_form not in (None, "~0", "NA"):
                eta = eta + m.Z @ self._b
        else:
            X, re = m.new_design(newdata)
            eta = X @ self._beta
            if m.parsed.offsets:
                from .builder.model import eval_numeric

                for expr in m.parsed.offsets:
                    eta = eta + eval_numeric(expr, newdata)
            if offset is not None:
                eta = eta + (newdata[offset].to_numpy(dtype=float) if isinstance(offset, str)
                             else np.asarray(offset, dtype=float))
            if re_form not in (None, "~0", "NA"):
                for (refs, z), t, sl in zip(re, m.terms, m.z_slices):
                    bt = self._b[sl].reshape(t.nlev, t.k)
                    known = refs >= 0
                    contrib = np.zeros(len(refs))
                    contrib[known] = np.einsum("ij,ij->i", z[known], bt[refs[known]])
                    eta = eta + contrib
        return eta if type == "link" else self._linkinv(eta)

    def confint(self, level: float = 0.95) -> pd.DataFrame:
        """confint(level=0.95) -> DataFrame

        Wald intervals for the fixed effects (lme4's ``confint(fit, method = "Wald")``).
        """
        from scipy.stats import norm

        z = norm.ppf(0.5 + level / 2)
        lo, hi = f"{100 * (1 - level) / 2:.1f} %", f"{100 * (1 + level) / 2:.1f} %"
        return pd.DataFrame({lo: self.fixef - z * self.se, hi: self.fixef + z * self.se})

    # -- inference (stochmm.inference, through stochmm.api) --------------------------------------

    # -- approximation audit (stochmm.stochastic, through stochmm.api) ----------------------------
    def check_approximation(self, draws: int = 10_000, seed: int | None = None, **options):
        """check_approximation(draws=10000, seed=None, **options) -> ApproximationCheck

        How far this GLMM fit's log-likelihood is from an importance-sampling estimate at the same
        estimates, and whether the estimates move under an accurate refit (AGQ for one grouping
        factor, Monte Carlo ML otherwise); see :func:`stochmm.stochastic.compare.check_approximation`.
        Linear mixed models have an exact likelihood: there is nothing to check (ValueError).
        """
        if not hasattr(self, "family"):
            raise ValueError("check_approximation is for GLMM fits: a linear mixed model's likelihood is exact "
                             "(no Laplace or quadrature approximation is involved)")
        from . import api

        return api.resolve("check_approximation")(self, draws=draws, seed=seed, **options)


    # -- summary pieces -------------------------------------------------------------------------
    def coef_table(self) -> pd.DataFrame:
        """Estimate, Std. Error and t (LMM) or z value with Pr(>|z|) (GLMM)."""
        est, se = self.fixef, self.se
        df = pd.DataFrame({"Estimate": est, "Std. Error": se})
        if self._dispersion:
            df["t value"] = est / se
        else:
            from scipy.stats import norm

            df["z value"] = est / se
            df["Pr(>|z|)"] = 2 * norm.sf(np.abs(df["z value"]))
        return df

    def _random_effects_text(self) -> str:
        """The 'Random effects:' block of lme4's summary."""
        s = self.sigma if self._dispersion else 1.0
        entries = []  # (group label, name, variance, sd, correlations)
        for t, T in zip(self.model.terms, self.model.lambda_blocks(self.theta)):
            cov = s * s * (T @ T.T)
            sd = np.sqrt(np.diag(cov))
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = cov / np.outer(sd, sd)
            label = t.group
            for a in range(t.k):
                entries.append((label if a == 0 else "", t.cnames[a], cov[a, a], sd[a], [corr[a, b] for b in range(a)]))
        if self._dispersion:
            entries.append(("Residual", "", self.sigma**2, self.sigma, []))
        dv = _decimals([e[2] for e in entries], 4)
        ds = _decimals([e[3] for e in entries], 4)
        has_corr = any(t.k > 1 for t in self.model.terms)
        rows = [[g, nm, f"{v:.{dv}f}", f"{sd:.{ds}f}", " ".join("  NaN" if not np.isfinite(c) else f"{c:5.2f}" for c in cs)]
                for g, nm, v, sd, cs in entries]
        header = ["Groups", "Name", "Variance", "Std.Dev.", "Corr" if has_corr else ""]
        widths = [max(len(r[j]) for r in rows + [header]) for j in range(5)]
        just = [str.ljust, str.ljust, str.rjust, str.rjust, str.ljust]
        lines = [(" " + " ".join(just[j](r[j], widths[j]) for j in range(5))).rstrip() for r in [header] + rows]
        ng = ", ".join(f"{g}, {n}" for g, n in self.model.ngroups.items())
        lines.append(f"Number of obs: {self.nobs}, groups:  {ng}")
        return "\n".join(lines)

    def _fixef_corr_text(self) -> str:
        p = len(self._beta)
        if p < 2:
            return ""
        sd = np.sqrt(np.diag(self._vcov))
        corr = self._vcov / np.outer(sd, sd)
        names = self.model.xnames
        abbr = [_abbrev(n) for n in names]
        w0 = max(len(n) for n in names[1:])
        colw = max(6, max(len(a) for a in abbr[:-1]))
        lines = ["Correlation of Fixed Effects:", " " * (w0 + 1) + " ".join(a.ljust(colw) for a in abbr[:-1]).rstrip()]
        for i in range(1, p):
            cells = " ".join(f"{corr[i, j]:.3f}".replace("0.", ".", 1).rjust(colw) if corr[i, j] >= 0 else f"{corr[i, j]:.3f}".replace("-0.", "-.", 1).rjust(colw) for j in range(i))
            lines.append(f"{names[i]:<{w0}} {cells}")
        return "\n".join(lines) if p <= 12 else f"Correlation matrix not shown by default, as p = {p} > 12."

    def _ic_lines(self, deviance: float) -> list[str]:
        """The AIC / BIC / logLik / deviance / df.resid lines of lme4's summary."""
        labels = ["AIC", "BIC", "logLik", "deviance", "df.resid"]
        vals = [f"{self.aic:.1f}", f"{self.bic:.1f}", f"{self.loglik:.1f}", f"{deviance:.1f}", f"{self.nobs - self.df}"]
        w = max(len(s) for s in vals + labels) + 1
        return ["".join(lab.rjust(w) for lab in labels), "".join(v.rjust(w) for v in vals)]

    def _residual_quantiles(self, r: np.ndarray) -> str:
        q = np.quantile(r, [0, 0.25, 0.5, 0.75, 1.0])
        labels = ["Min", "1Q", "Median", "3Q", "Max"]
        vals = [f"{v:.4f}" for v in q]
        w = max(len(s) for s in vals + labels)
        return " ".join(lab.rjust(w) for lab in labels) + "\n" + " ".join(v.rjust(w) for v in vals)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__}: {self.model.formula!r}, {self.method}, "
                f"objective={self.objective:.4f}, n={self.nobs}>")


def _abbrev(name: str, minlength: int = 6) -> str:
    """R's ``abbreviate(name, minlength=6)``, roughly: drop lower-case vowels from the end."""
    if name == "(Intercept)":
        return "(Intr)"
    if len(name) <= minlength:
        return name
    chars = list(name)
    i = len(chars) - 1
    while len(chars) > minlength and i > 0:
        if chars[i] in "aeiou" and chars[i - 1] != " ":
            del chars[i]
        i -= 1
    i = len(chars) - 1
    while len(chars) > minlength and i > 0:
        if chars[i].islower():
            del chars[i]
        i -= 1
    return "".join(chars[:minlength]) if len(chars) > minlength else "".join(chars)
