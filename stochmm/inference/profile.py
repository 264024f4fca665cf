"""Profile likelihood of mixed models, as lme4's ``profile`` / ``confint(method = "profile")``.

Parameters are profiled on lme4's scale: the standard deviations and correlations
of the random effects (``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``),
the residual SD ``sigma`` (LMMs) and the fixed effects. For each parameter ψ, the
signed root of the likelihood-ratio statistic

    ζ(ψ) = sign(ψ − ψ̂) √(D(ψ) − D(ψ̂)),   D(ψ) = min over the other parameters of −2 log L,

is traced from the estimate outwards in both directions (each point warm-started
from its neighbour, steps chosen so that ζ moves by about 1/8 of the cutoff), and
the interval endpoints are the exact roots of ζ(ψ) = ±z (Brent's method on the
profile), not an interpolation. As lme4 does, REML fits are profiled on the ML
deviance (``refitML``); LMMs profile σ and the SDs jointly with β profiled out,
fixed effects by an offset with θ re-optimised. GLMMs are profiled on the fit's own
objective: the Laplace deviance (nAGQ = 1) or the AGQ deviance with the fit's nAGQ and rule
(as lme4's ``profile``), optimised over (θ, β) with its exact gradient where θ is the SD
(scalar terms); nAGQ = 0 fits, which lme4 1.1-31 cannot profile, on the nAGQ = 0 criterion
(a function of θ alone; β_j fixed through the offset). An SD whose profile stays below the
cutoff down to 0 gets the lower endpoint 0 (lme4's boundary rule; correlations ±1), with a note.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.optimize as so
from scipy import stats

from .bootstrap import param_names, sd_cor

__all__ = ["profile", "Profile"]

_LOG2PI = float(np.log(2 * np.pi))


class Profile:
    """Profile of a fit: a tidy table (parameter, value, zeta) and the intervals.

    Attributes
    ----------
    table : DataFrame
        One row per profile point: parameter, value, zeta.
    estimates : Series
        ML estimates on the profile scale.
    intervals : dict level -> DataFrame
        Exact profile intervals computed while profiling.
    notes : list of str
        Boundary cases (an endpoint set to a bound) and other remarks.
    """

    def __init__(self, table: pd.DataFrame, estimates: pd.Series, intervals: dict, notes: list[str],
                 bounds: dict) -> None:
        self.table = table
        self.estimates = estimates
        self.intervals = intervals
        self.notes = notes
        self.bounds = bounds

    def confint(self, level: float = 0.95) -> pd.DataFrame:
        """confint(level=0.95) -> DataFrame

        Profile intervals (lme4's ``confint(profile)``): exact roots of ζ = ±z for the
        level the profile was computed at, else monotone interpolation of the profile
        points; an endpoint beyond the profiled range is its bound (0 for an SD, ±1
        for a correlation) when the profile reaches it, else NaN.
        """
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"level must be a number in (0, 1), got {level!r}")
        if level in self.intervals:
            return self.intervals[level].copy()
        from scipy.interpolate import PchipInterpolator

        z = stats.norm.ppf(0.5 + level / 2)
        lo, hi = _labels(level)
        rows = {}
        for par in self.estimates.index:
            t = self.table[self.table.parameter == par].sort_values("value")
            zz, vv = t["zeta"].to_numpy(), t["value"].to_numpy()
            ok = np.concatenate([[True], np.diff(zz) > 0])
            f = PchipInterpolator(zz[ok], vv[ok], extrapolate=False) if ok.sum() > 1 else None
            a = float(f(-z)) if f is not None else np.nan
            b = float(f(z)) if f is not None else np.nan
            blo, bhi = self.bounds[par]
            if np.isnan(a) and np.isclose(vv.min(), blo):
                a = blo
            if np.isnan(b) and np.isclose(vv.max(), bhi):
                b = bhi
            rows[par] = (a, b)
        return pd.DataFrame.from_dict(rows, orient="index", columns=[lo, hi])

    def plot(self, **kw: Any):
        """ζ against each parameter (:func:`stochmm.plots.profile_zeta`)."""
        from ..plots.profile import profile_zeta

        return profile_zeta(self, **kw)

    def __repr__(self) -> str:
        return f"<Profile: {len(self.estimates)} parameters, {len(self.table)} points>"


def _labels(level: float) -> tuple[str, str]:
    a = (1 - level) / 2
    return f"{100 * a:.1f} %", f"{100 * (1 - a):.1f} %"


# =============================================================================================
# deviance on the profile scale
# =============================================================================================
def _theta_from(model: Any, vc: np.ndarray, sigma: float) -> np.ndarray | None:
    """θ from SDs/correlations (θ order) relative to ``sigma``; None if a correlation matrix is not PD."""
    out, off = [], 0
    for t in model.terms:
        k = t.k
        sd = np.zeros(k)
        R = np.eye(k)
        for m, (r, c) in enumerate(t.tril):
            v = vc[off + m]
            if r == c:
                sd[r] = v
            else:
                R[r, c] = R[c, r] = v
        off += t.ntheta
        if k == 1:
            out.append([sd[0] / sigma])
            continue
        S = R * np.outer(sd, sd) / sigma**2
        try:
            L = np.linalg.cholesky(S + 1e-300 * np.eye(k)) if np.all(sd > 0) else _chol_psd(S)
        except np.linalg.LinAlgError:
            return None
        out.append([L[r, c] for r, c in t.tril])
    return np.concatenate(out)


def _chol_psd(S: np.ndarray) -> np.ndarray:
    k = S.shape[0]
    L = np.zeros((k, k))
    for j in range(k):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        if d < -1e-12:
            raise np.linalg.LinAlgError("not PSD")
        L[j, j] = np.sqrt(max(d, 0.0))
        for i in range(j + 1, k):
            L[i, j] = (S[i, j] - L[i, :j] @ L[j, :j]) / L[j, j] if L[j, j] > 0 else 0.0
    return L


class _LmmDev:
    """ML deviance of an LMM in (SDs/correlations, σ) with β profiled out, and with β_j fixed."""

    def __init__(self, fit: Any) -> None:
        from ..deterministic.lmm import ProfiledDeviance

        self.model = fit.model
        self.pd = ProfiledDeviance(self.model, reml=False)
        self.n = self.model.n
        self._beta_sys: dict[int, Any] = {}

    def var(self, phi: np.ndarray) -> float:
        sigma = phi[-1]
        if sigma <= 0:
            return np.inf
        theta = _theta_from(self.model, phi[:-1], sigma)
        if theta is None:
            return np.inf
        bs = self.pd.system.factor(self.model.lambda_blocks(theta))
        s2 = sigma * sigma
        return float(bs.logdet_L - self.pd.ldW + bs.pwrss / s2 + self.n * (_LOG2PI + np.log(s2)))

    def beta(self, j: int, v: float, theta: np.ndarray) -> float:
        from ..deterministic.blocks import BlockedSystem

        m = self.model
        if j not in self._beta_sys:
            w = None if np.all(m.prior_weights == 1.0) else m.prior_weights
            Xd = np.delete(m.X, j, axis=1)
            self._beta_sys[j] = BlockedSystem(m.terms, Xd, m.y - m.offset, weights=w)
        sys_ = self._beta_sys[j]
        sys_.update(y=m.y - m.offset - m.X[:, j] * v)
        bs = sys_.factor(m.lambda_blocks(theta))
        return float(bs.logdet_L - self.pd.ldW + self.n * (1.0 + _LOG2PI + np.log(bs.pwrss / self.n)))


# =============================================================================================
# tracing one profile
# =============================================================================================
def _trace(zfun, est: float, step0: float, lo: float, hi: float, cutoff: float, zcrit: float,
           delta: float, max_points: int = 40) -> tuple[list, dict]:
    """Points (value, zeta) in both directions and the exact crossings of ±zcrit."""
    pts = [(est, 0.0)]
    cross: dict[int, float] = {}
    for d in (1, -1):
        zfun.reset()
        v_prev, z_prev = est, 0.0
        step = step0
        hit_bound = False
        for _ in range(max_points):
            v = v_prev + d * step
            if v <= lo or v >= hi:
                v = lo if d < 0 else hi
                hit_bound = True
            z = zfun(v)
            if not np.isfinite(z):
                break
            pts.append((v, z))
            if d * z >= zcrit and d not in cross:
                # exact crossing between v_prev and v
                cross[d] = _root(zfun, v_prev, v, z_prev, z, d * zcrit)
            if d * z >= cutoff or hit_bound:
                break
            slope = abs((z - z_prev) / (v - v_prev)) if v != v_prev else 0.0
            step = delta / slope if slope > 1e-12 else 2 * step
            step = min(max(step, 0.1 * abs(v - v_prev)), 4 * abs(v - v_prev) + 1e-12)
            v_prev, z_prev = v, z
    return pts, cross


def _root(zfun, a: float, b: float, za: float, zb: float, target: float) -> float:
    fa, fb = za - target, zb - target
    if fa == 0:
        return a
    if fb == 0:
        return b
    try:
        # tolerance on the scale of the bracket (about a standard error), not of the value: an intercept
        # near 1e8 (y far from 0) keeps its interval to the digits the data have
        return float(so.brentq(lambda v: zfun(v) - target, min(a, b), max(a, b), xtol=max(1e-9 * abs(b - a), 1e-300),
                               rtol=4 * np.finfo(float).eps))
    except ValueError:
        return float(a + (target - za) * (b - a) / (zb - za))


class _ZetaFree:
    """ζ of component ``i`` of a parameter vector φ whose other components are re-optimised at each point
    (warm-started from the previous point's optimum, :attr:`x`)."""

    def __init__(self, i: int, phi_hat: np.ndarray, lower: np.ndarray, upper: np.ndarray, base: float,
                 est: float) -> None:
        self.i, self.phi_hat = i, phi_hat
        self.free = np.arange(phi_hat.size) != i
        self.lower, self.upper = lower[self.free], upper[self.free]
        self.base, self.est = base, est
        self.reset()

    def reset(self) -> None:
        self.x = self.phi_hat[self.free].copy()

    def _at(self, v: float) -> np.ndarray:
        """φ̂ with component ``i`` set to ``v`` (the free components are filled in by the optimiser)."""
        phi = self.phi_hat.copy()
        phi[self.i] = v
        return phi


class _ZetaVar(_ZetaFree):
    """ζ of one component of the LMM's variance vector, inner BOBYQA warm-started."""

    def __init__(self, dev, i: int, phi_hat: np.ndarray, lower: np.ndarray, upper: np.ndarray, base: float,
                 est: float, unit: np.ndarray) -> None:
        from ..deterministic.optsummary import minimize_bounded

        self.min, self.dev = minimize_bounded, dev
        self.unit = unit[np.arange(phi_hat.size) != i]
        super().__init__(i, phi_hat, lower, upper, base, est)

    def __call__(self, v: float) -> float:
        phi = self._at(v)

        def f(x):
            phi[self.free] = x
            return self.dev(phi)

        x0 = np.clip(self.x, self.lower + 1e-10, self.upper - 1e-10)
        step = np.maximum(0.05 * np.abs(x0), 1e-3 * self.unit)
        opt = self.min(f, x0, self.lower, self.upper, initial_step=step, ftol_rel=1e-13, ftol_abs=1e-10,
                       xtol_abs=1e-9)
        self.x = opt.xfinal.copy()
        self.last = opt.fmin
        dd = max(opt.fmin - self.base, 0.0)
        return float(np.sign(v - self.est) * np.sqrt(dd))


class _ZetaBetaLmm:
    def __init__(self, dev: _LmmDev, j: int, theta_hat: np.ndarray, base: float, est: float) -> None:
        from ..deterministic.optsummary import minimize_bounded

        self.min = minimize_bounded
        self.dev, self.j, self.theta_hat, self.base, self.est = dev, j, theta_hat, base, est
        self.lower = dev.model.lower
        self.reset()

    def reset(self) -> None:
        self.th = self.theta_hat.copy()

    def __call__(self, v: float) -> float:
        step = np.maximum(0.05 * np.abs(self.th), 1e-3)
        opt = self.min(lambda th: self.dev.beta(self.j, v, th), self.th, self.lower, initial_step=step,
                       ftol_rel=1e-13, ftol_abs=1e-10, xtol_abs=1e-9)
        self.th = opt.xfinal.copy()
        dd = max(opt.fmin - self.base, 0.0)
        return float(np.sign(v - self.est) * np.sqrt(dd))


class _GlmmDev:
    """The GLMM fit's own objective on the profile scale φ = (SDs/correlations, β), with exact gradients.

    ``nagq = 1``: the Laplace deviance; ``nagq > 1``: the AGQ deviance with the fit's rule (as lme4's
    ``profile`` uses the fit's ``devfun`` with its nAGQ); ``nagq = 0``: lme4's nAGQ = 0 criterion, a
    function of θ alone (β and u at their joint PIRLS modes) — for a profile of β_j, the same criterion
    with β_j fixed through the offset (one engine per j, X without column j), as lme4 profiles the fixed
    effects of an LMM."""

    def __init__(self, fit: Any) -> None:
        from ..deterministic.glmm import glmm_engine

        self.fit, self.model, self.nq = fit, fit.model, int(fit.nagq)
        self.hessian = getattr(fit, "hessian_kind", "observed")
        self.eng = glmm_engine(self.model, fit.family, hessian=self.hessian)
        self.nt = int(fit.theta.size)
        self.scalar = all(t.k == 1 for t in self.model.terms)
        self._beta_eng: dict[int, Any] = {}

    def theta(self, vc: np.ndarray) -> np.ndarray | None:
        return vc.copy() if self.scalar else _theta_from(self.model, vc, 1.0)

    def base(self) -> float:
        fit = self.fit
        if self.nq == 0:
            return float(self.eng.fast(fit.theta))
        return float(self.value(np.concatenate([sd_cor(self.model, fit.theta, 1.0), fit._beta]), False)[0])

    def value(self, phi: np.ndarray, grad: bool) -> tuple[float, np.ndarray | None]:
        """Laplace / AGQ deviance at φ = (SDs/correlations, β)."""
        from ..deterministic.quadrature import agq

        nt = self.nt
        theta = self.theta(phi[:nt])
        if theta is None:
            return np.inf, None
        if self.nq == 1:
            return self.eng.laplace(theta, phi[nt:], grad=grad)
        return agq(self.eng, theta, phi[nt:], self.fit.rule, grad=grad)

    def fast(self, vc: np.ndarray, grad: bool) -> tuple[float, np.ndarray | None]:
        """nAGQ = 0 criterion at the SDs/correlations ``vc``."""
        theta = self.theta(vc)
        if theta is None:
            return np.inf, None
        if grad:
            return self.eng.fast_grad(theta)
        return self.eng.fast(theta), None

    def fast_beta(self, j: int, phi: np.ndarray, grad: bool) -> tuple[float, np.ndarray | None]:
        """nAGQ = 0 criterion with β_j = phi[-1] fixed, at the SDs/correlations phi[:-1]."""
        import copy

        from ..deterministic.glmm import glmm_engine

        if j not in self._beta_eng:
            m = copy.copy(self.model)
            m.X = np.ascontiguousarray(np.delete(self.model.X, j, axis=1))
            eng = glmm_engine(m, self.fit.family, hessian=self.hessian)
            xj = self.model.X[:, j]
            order = getattr(eng, "order", None)
            self._beta_eng[j] = (eng, eng.off.copy(), xj[order] if order is not None else xj.copy())
        eng, off0, xj = self._beta_eng[j]
        eng.off = off0 + phi[-1] * xj
        theta = self.theta(phi[:-1])
        if theta is None:
            return np.inf, None
        if grad:
            val, g = eng.fast_grad(theta)
            return val, np.append(g, 0.0)
        return eng.fast(theta), None


class _ZetaGlmm(_ZetaFree):
    """ζ of component ``i`` of a GLMM's profile vector φ; the other components minimise ``vg(φ, grad)``
    (the fit's own objective) by L-BFGS on its exact gradient when every term is scalar (θ = SD), BOBYQA
    otherwise. Each point is warm-started from its neighbour."""

    def __init__(self, vg, i: int, phi_hat: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                 base: float, est: float, scalar: bool, scale: np.ndarray) -> None:
        self.vg, self.scalar = vg, scalar
        self.scale = scale[np.arange(phi_hat.size) != i]
        super().__init__(i, phi_hat, lower, upper, base, est)

    def __call__(self, v: float) -> float:
        phi = self._at(v)
        sc = self.scale
        if not self.free.any():  # nothing left to optimise (one parameter, nAGQ = 0)
            fmin = self.vg(phi, False)[0]
        elif self.scalar:
            def fg(y):
                phi[self.free] = y * sc
                val, g = self.vg(phi, True)
                if not np.isfinite(val):
                    return 1e300, np.zeros_like(y)
                return val, g[self.free] * sc

            import nlopt

            best = {"f": np.inf, "x": self.x / sc}

            def obj(y, grad):
                val, g = fg(np.asarray(y))
                if grad.size:
                    grad[:] = g
                if val < best["f"]:
                    best["f"], best["x"] = val, np.array(y, copy=True)
                return float(val)

            opt = nlopt.opt(nlopt.LD_LBFGS, int(self.free.sum()))
            opt.set_lower_bounds(np.where(np.isfinite(self.lower), self.lower / sc, -1e30))
            opt.set_upper_bounds(np.where(np.isfinite(self.upper), self.upper / sc, 1e30))
            opt.set_min_objective(obj)
            opt.set_ftol_rel(1e-14)
            opt.set_xtol_rel(1e-10)
            opt.set_maxeval(1000)
            y0 = np.clip(self.x / sc, opt.get_lower_bounds(), opt.get_upper_bounds())
            try:
                opt.optimize(y0)
            except Exception:  # nlopt stops on roundoff or a failed line search: keep the best point
                pass
            self.x, fmin = best["x"] * sc, float(best["f"])
        else:
            from ..deterministic.optsummary import minimize_bounded

            def f(x):
                phi[self.free] = x
                return self.vg(phi, False)[0]

            opt = minimize_bounded(f, self.x, self.lower, self.upper, initial_step=np.maximum(0.05 * sc, 1e-3),
                                   ftol_rel=1e-13, ftol_abs=1e-10, xtol_abs=1e-9)
            self.x, fmin = opt.xfinal.copy(), opt.fmin
        dd = max(fmin - self.base, 0.0)
        return float(np.sign(v - self.est) * np.sqrt(dd))


# =============================================================================================
# entry point
# =============================================================================================
def profile(fit: Any, which: Any = None, level: float = 0.95, delta: float | None = None) -> Profile:
    """profile(fit, which=None, level=0.95) -> Profile

    Profile the likelihood of a fit (lme4's ``profile``) on the SD/correlation scale.

    Parameters
    ----------
    fit : LmmResults or GlmmResults
        A GLMM is profiled on its own objective: Laplace, AGQ with its nAGQ and rule (as
        lme4), or the nAGQ = 0 criterion (which lme4 cannot profile; a note says so).
    which : str or list of str, optional
        Parameters to profile, by name (``"sd_(Intercept)|Subject"``, ``"sigma"``,
        ``"Days"``), lme4's old names (``".sig01"``, ``".sigma"``) or ``"theta_"``
        (all variance parameters) / ``"beta_"`` (all fixed effects). Default: all.
    level : float
        Level of the exact intervals computed while profiling (``Profile.confint``).
    delta : float, optional
        Target change of ζ between points (default: cutoff / 8, lme4's).

    Returns
    -------
    Profile
        ``.table`` (parameter, value, zeta), ``.confint(level)``, ``.plot()``, ``.notes``.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), reml=False)
    >>> profile(fit).confint().round(2).iloc[:, 0].tolist()
    [12.2, 38.23, 1486.45]
    """
    from ..deterministic.pirls import blas_threads

    with blas_threads(1):  # thousands of tiny BLAS calls: one thread is fastest
        return _profile(fit, which, level, delta)


def _profile(fit: Any, which: Any, level: float, delta: float | None) -> Profile:
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    model = fit.model
    lmm = model.family_name == "gaussian"
    names = param_names(model, lmm) + list(model.xnames)
    chosen = _which(which, names, model, lmm)
    zcrit = float(stats.norm.ppf(0.5 + level / 2))
    cutoff = max(1.05 * zcrit, float(np.sqrt(stats.chi2.ppf(0.99, 1))))
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating))
                              or not 0 < delta < np.inf):
        raise ValueError(f"delta must be a positive number (the target change of ζ between points), got {delta!r}")
    delta = cutoff / 8 if delta is None else float(delta)
    notes: list[str] = []
    if lmm:
        if getattr(fit, "reml", False):
            from ..deterministic.lmm import fit_lmm

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = fit_lmm(model, reml=False, start=fit.theta)
            notes.append("REML fit: profiled on the ML deviance (lme4's refitML)")
        vc = np.concatenate([sd_cor(model, fit.theta, fit.sigma), [fit.sigma]])
        dev = _LmmDev(fit)
        base = min(fit.objective, dev.var(vc))
        est = np.concatenate([vc, fit._beta])
    else:
        gdev = _GlmmDev(fit)
        vc = sd_cor(model, fit.theta, 1.0)
        est = np.concatenate([vc, fit._beta])
        base = gdev.base()
        if fit.nagq == 0:
            notes.append("nAGQ = 0 fit: profiled on its own criterion (the Laplace deviance at the joint PIRLS "
                         "modes of β and u, a function of θ; β_j fixed through the offset); lme4 1.1-31 cannot "
                         "profile nAGQ = 0 fits")
        elif fit.nagq > 1:
            notes.append(f"profiled on the adaptive Gauss-Hermite deviance (nAGQ = {fit.nagq}), as lme4 does")
    lower, upper = _bounds(model, names, lmm)
    # SDs and σ are in the units of y (σ̂ is their unit), correlations and β's steps (Wald SEs) scale-free
    unit = np.array([fit.sigma if lmm and not nm.startswith("cor_") else 1.0 for nm in names])
    se = _scales(fit, est, names, model, lmm, unit)
    rows, ivals = [], {}
    nv = len(names) - model.p
    for par in chosen:
        i = names.index(par)
        if lmm and i < nv:
            zf = _ZetaVar(dev.var, i, est[:nv], lower[:nv], upper[:nv], base, est[i], unit[:nv])
        elif lmm:
            zf = _ZetaBetaLmm(dev, i - nv, fit.theta, base, est[i])
        elif fit.nagq > 0:
            zf = _ZetaGlmm(gdev.value, i, est, lower, upper, base, est[i], gdev.scalar, se)
        elif i < nv:  # nAGQ = 0: the criterion is a function of θ alone
            zf = _ZetaGlmm(gdev.fast, i, est[:nv], lower[:nv], upper[:nv], base, est[i], gdev.scalar, se[:nv])
        else:
            j = i - nv
            sub = np.append(est[:nv], est[i])
            zf = _ZetaGlmm(lambda phi, grad, j=j: gdev.fast_beta(j, phi, grad), nv, sub,
                           np.append(lower[:nv], -np.inf), np.append(upper[:nv], np.inf), base, est[i],
                           gdev.scalar, np.append(se[:nv], se[i]))
        step0 = delta * se[i]
        if i < nv and est[i] == 0 and lower[i] == 0:
            step0 = max(step0, 1e-3 * unit[i])
        pts, cross = _trace(zf, est[i], step0, lower[i], upper[i], cutoff, zcrit, delta)
        a = cross.get(-1, np.nan)
        b = cross.get(1, np.nan)
        if np.isnan(a):
            vmin = min(p[0] for p in pts)
            if np.isclose(vmin, lower[i]) and np.isfinite(lower[i]):
                a = lower[i]
                notes.append(f"{par}: the profile stays below ζ = {zcrit:.2f} down to its bound {lower[i]:g}; "
                             f"lower endpoint set to {lower[i]:g} (lme4's rule)")
        if np.isnan(b):
            vmax = max(p[0] for p in pts)
            if np.isclose(vmax, upper[i]) and np.isfinite(upper[i]):
                b = upper[i]
                notes.append(f"{par}: the profile stays below ζ = {zcrit:.2f} up to its bound {upper[i]:g}; "
                             f"upper endpoint set to {upper[i]:g} (lme4's rule)")
        ivals[par] = (a, b)
        for v, z in sorted(pts):
            rows.append((par, v, z))
    table = pd.DataFrame(rows, columns=["parameter", "value", "zeta"]).drop_duplicates()
    lo, hi = _labels(level)
    intervals = {level: pd.DataFrame.from_dict(ivals, orient="index", columns=[lo, hi])}
    estimates = pd.Series(est, index=names, name="estimate")[chosen]
    bounds = {n: (lower[names.index(n)], upper[names.index(n)]) for n in chosen}
    return Profile(table.reset_index(drop=True), estimates, intervals, notes, bounds)


def _which(which: Any, names: list[str], model: Any, lmm: bool) -> list[str]:
    nvar = len(names) - model.p
    old = {f".sig{j + 1:02d}": names[j] for j in range(nvar - (1 if lmm else 0))}
    if lmm:
        old[".sigma"] = "sigma"
    if which is None:
        return list(names)
    if isinstance(which, str):
        if which == "theta_":
            return names[:nvar]
        if which == "beta_":
            return names[nvar:]
        which = [which]
    if not isinstance(which, (list, tuple, pd.Index, np.ndarray)):
        raise TypeError(f"which must be a parameter name or a list of names, not {type(which).__name__}")
    out = []
    for w in which:
        w = old.get(w, w)
        if w not in names:
            import difflib

            near = difflib.get_close_matches(str(w), names + list(old), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{w!r} is not a parameter of the model.{hint} Parameters: {', '.join(names)} "
                             f"(or {', '.join(old)}, 'theta_', 'beta_')")
        out.append(w)
    return out


def _bounds(model: Any, names: list[str], lmm: bool) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = [], []
    for t in model.terms:
        for r, c in t.tril:
            lo.append(0.0 if r == c else -1.0)
            hi.append(np.inf if r == c else 1.0)
    if lmm:
        lo.append(0.0)
        hi.append(np.inf)
    lo += [-np.inf] * model.p
    hi += [np.inf] * model.p
    return np.asarray(lo), np.asarray(hi)


def _scales(fit: Any, est: np.ndarray, names: list[str], model: Any, lmm: bool, unit: np.ndarray) -> np.ndarray:
    """Step scales: Wald SEs for β; for variance parameters a fraction of the estimate (lme4 steps
    them by ~1 % first and adapts)."""
    nv = len(names) - model.p
    s = np.empty(est.size)
    s[nv:] = np.sqrt(np.diag(fit._vcov)) if model.p else []
    for i in range(nv):
        v = abs(est[i])
        s[i] = max(0.2 * v, 0.05 * unit[i]) if names[i].startswith("sd_") or names[i] == "sigma" else 0.25
    return s
