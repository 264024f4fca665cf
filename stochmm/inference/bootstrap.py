"""Bootstraps of mixed models: parametric (any model), residual and case (LMMs).

* **parametric** (lme4's ``bootMer``, MixedModels.jl's ``parametricbootstrap``):
  responses drawn from the fitted model (:meth:`stochmm.Model.simulate`), refitted
  on the same built model — for an LMM only the y-dependent cross-products change
  (:meth:`BlockedSystem.update`), θ is re-optimised from θ̂; for a GLMM
  :func:`~stochmm.deterministic.glmm.fit_glmm` runs on ``Model.with_response(y)``
  started at (θ̂, β̂). Nothing is re-parsed or rebuilt.
* **residual** (lmeresampler's ``resid``): y* = Xβ̂ + Σ_j Z_j b*_j + e*, with the
  centred conditional modes of each term resampled by level and the centred
  conditional residuals resampled by observation.
* **case** (lmeresampler's ``case``): the levels of the named grouping factors are
  resampled with replacement, outermost first and nested (each draw of a level is a
  new level; ``".obs"`` resamples observations within the innermost drawn cluster);
  the model is rebuilt for each replicate, since its design changes.

Replicate ``i`` uses the ``i``-th child of ``numpy.random.SeedSequence(seed)``,
so results are identical serially, across processes (``n_jobs``) and on a Dask
client, and reproducible by seed.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..parallel import map_chunks

__all__ = ["bootstrap", "Bootstrap", "param_names"]

_TYPES = ("parametric", "residual", "case")


def param_names(model: Any, dispersion: bool = True) -> list[str]:
    """Names of the variance parameters on the SD/correlation scale, in θ order, as lme4's
    ``oldNames = FALSE`` (``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``), then ``sigma``."""
    from ..results import unique_group_names

    out = []
    for g, t in zip(unique_group_names([t.group for t in model.terms]), model.terms):
        for r, c in t.tril:
            out.append(f"sd_{t.cnames[r]}|{g}" if r == c else f"cor_{t.cnames[r]}.{t.cnames[c]}|{g}")
    if dispersion:
        out.append("sigma")
    return out


def sd_cor(model: Any, theta: np.ndarray, sigma: float) -> np.ndarray:
    """SDs and correlations in θ order (relative to ``sigma``)."""
    out = []
    for t, T in zip(model.terms, model.lambda_blocks(theta)):
        cov = sigma * sigma * (T @ T.T)
        sd = np.sqrt(np.diag(cov))
        for r, c in t.tril:
            if r == c:
                out.append(sd[r])
            else:
                den = sd[r] * sd[c]
                out.append(cov[r, c] / den if den > 0 else np.nan)
    return np.asarray(out)


# =============================================================================================
# refitting one replicate
# =============================================================================================
class _DenseDeviance:
    """The LMM profiled deviance for small random-effects dimension (q + p ≤ 400) with the
    y-independent cross-products Z'WZ, Z'WX, X'WX formed once: a new response changes only
    Z'Wy, X'Wy and y'Wy. The response is centred at Xβ̂ of the original fit (the criterion is
    invariant to that shift), so r² = y'y − ‖c‖² keeps its digits."""

    def __init__(self, model: Any, reml: bool, beta0: np.ndarray) -> None:
        import scipy.sparse as sp

        w = np.asarray(model.prior_weights, dtype=float)
        self.sw = np.sqrt(w)
        Zw = sp.diags(self.sw) @ sp.csc_matrix(model.Z)
        self.Zwt = Zw.T.tocsr()
        self.Xw = model.X * self.sw[:, None]
        self.ZtZ = (self.Zwt @ Zw).toarray()
        self.ZtX = np.asarray(self.Zwt @ self.Xw)
        self.XtX = self.Xw.T @ self.Xw
        self.ldW = float(np.log(w).sum())
        self.model, self.reml, self.beta0 = model, reml, beta0
        self.n, self.p, self.q = model.n, model.p, model.q
        from ..inference.ddf import _lambda_index

        self.rows, self.cols, self.idx = _lambda_index(model)
        self.nfev = 0

    def set_y(self, y: np.ndarray) -> None:
        yc = (y - self.model.offset - self.model.X @ self.beta0) * self.sw
        self.Zty = np.asarray(self.Zwt @ yc).ravel()
        self.Xty = self.Xw.T @ yc
        self.yty = float(yc @ yc)

    def _factor(self, theta: np.ndarray):
        """(Λ(θ), Λ'Z'Z, L) with LL' = Λ'Z'ZΛ + I, or None where the factorization fails."""
        from scipy.linalg.lapack import dpotrf

        q = self.q
        Lam = np.zeros((q, q))
        Lam[self.rows, self.cols] = theta[self.idx]
        LtA = Lam.T @ self.ZtZ
        M = LtA @ Lam
        M[np.diag_indices(q)] += 1.0
        L, info = dpotrf(M, lower=1, clean=1, overwrite_a=1)
        return None if info else (Lam, LtA, L)

    def parts(self, theta: np.ndarray):
        from scipy.linalg.lapack import dpotrf, dtrtrs

        fac = self._factor(theta)
        if fac is None:
            return None
        Lam, _, L = fac
        rzx, _ = dtrtrs(L, Lam.T @ self.ZtX, lower=1)
        cu, _ = dtrtrs(L, Lam.T @ self.Zty, lower=1)
        XVX = self.XtX - rzx.T @ rzx
        RX, info = dpotrf(XVX, lower=1, clean=1, overwrite_a=0)
        if info:
            return None
        cb, _ = dtrtrs(RX, self.Xty - rzx.T @ cu, lower=1)
        r2 = self.yty - cu @ cu - cb @ cb
        return L, RX, cb, max(float(r2), 1e-300)

    def __call__(self, theta: np.ndarray) -> float:
        self.nfev += 1
        pr = self.parts(np.asarray(theta, dtype=float))
        if pr is None:
            return np.inf
        L, RX, _, r2 = pr
        ld = 2.0 * float(np.log(np.diag(L)).sum()) - self.ldW
        if self.reml:
            nmp = self.n - self.p
            return ld + 2.0 * float(np.log(np.diag(RX)).sum()) + nmp * (1.0 + _LOG2PI + np.log(r2 / nmp))
        return ld + self.n * (1.0 + _LOG2PI + np.log(r2 / self.n))

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """The deviance and its exact gradient in θ: with D_i = E_iΛ' + ΛE_i' (Λ = Σθ_iE_i),
        K = Z'V₀⁻¹Z (REML: Z'PZ) and a = Z'Py, ∂/∂θ_i = tr(D_iK) − m·a'D_ia / r²."""
        from scipy.linalg.lapack import dpotrf, dtrtrs

        self.nfev += 1
        theta = np.asarray(theta, dtype=float)
        fac = self._factor(theta)
        if fac is None:
            return np.inf, np.zeros_like(theta)
        Lam, LtA, L = fac
        W1, _ = dtrtrs(L, LtA, lower=1)
        rzx, _ = dtrtrs(L, Lam.T @ self.ZtX, lower=1)
        cu, _ = dtrtrs(L, Lam.T @ self.Zty, lower=1)
        C = self.XtX - rzx.T @ rzx
        RX, info = dpotrf(C, lower=1, clean=1, overwrite_a=0)
        if info:
            return np.inf, np.zeros_like(theta)
        cb, _ = dtrtrs(RX, self.Xty - rzx.T @ cu, lower=1)
        r2 = max(float(self.yty - cu @ cu - cb @ cb), 1e-300)
        bc, _ = dtrtrs(RX, cb, lower=1, trans=1)
        K = self.ZtZ - W1.T @ W1
        B = self.ZtX - W1.T @ rzx
        a = (self.Zty - W1.T @ cu) - B @ bc
        if self.reml:
            G, _ = dtrtrs(RX, np.ascontiguousarray(B.T), lower=1)
            K = K - G.T @ G
        m = (self.n - self.p) if self.reml else self.n
        N = Lam.T @ K
        La = Lam.T @ a
        nt = theta.size
        tr = 2.0 * np.bincount(self.idx, N[self.cols, self.rows], minlength=nt)
        ada = 2.0 * np.bincount(self.idx, a[self.rows] * La[self.cols], minlength=nt)
        val = 2.0 * float(np.log(np.diag(L)).sum()) - self.ldW + m * (1.0 + _LOG2PI + np.log(r2 / m))
        if self.reml:
            val += 2.0 * float(np.log(np.diag(RX)).sum())
        return val, tr - m * ada / r2

    def beta_sigma(self, theta: np.ndarray) -> tuple[np.ndarray, float]:
        from scipy.linalg.lapack import dtrtrs

        L, RX, cb, r2 = self.parts(theta)
        b, _ = dtrtrs(RX, cb, lower=1, trans=1)
        return self.beta0 + b, float(np.sqrt(r2 / ((self.n - self.p) if self.reml else self.n)))


_LOG2PI = float(np.log(2.0 * np.pi))


def canonical_theta(model: Any, theta: np.ndarray) -> np.ndarray:
    """θ with non-negative diagonals: flipping the sign of a column of T_j leaves T_jT_j' (the
    model) unchanged, so θ can be optimised without bounds and mapped back here."""
    theta = np.array(theta, dtype=float, copy=True)
    for t, sl in zip(model.terms, model.theta_slices):
        th = theta[sl]
        for c in range(t.k):
            m = [i for i, (r, cc) in enumerate(t.tril) if cc == c]
            d = [i for i in m if t.tril[i][0] == c][0]
            if th[d] < 0:
                th[m] = -th[m]
        theta[sl] = th
    return theta


def _lbfgs(dev: _DenseDeviance, theta0: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """L-BFGS (NLopt) on the exact gradient from θ̂ of the original fit, without bounds (the deviance
    is symmetric in the sign of each column of T_j; :func:`canonical_theta` maps back), so a variance
    heading for 0 cannot stall on a bound; a stall on roundoff is polished by BOBYQA."""
    import nlopt

    best = {"f": np.inf, "x": np.asarray(theta0, dtype=float).copy()}

    def obj(x, grad):
        v, g = dev.value_and_grad(x)
        if grad.size:
            grad[:] = g
        if v < best["f"]:
            best["f"], best["x"] = v, np.array(x, copy=True)
        return float(v)

    opt = nlopt.opt(nlopt.LD_LBFGS, theta0.size)
    opt.set_min_objective(obj)
    opt.set_ftol_rel(1e-13)
    opt.set_xtol_abs(1e-9)
    opt.set_maxeval(500)
    ok = True
    try:
        opt.optimize(np.asarray(theta0, dtype=float))
        ok = opt.last_optimize_result() > 0 and opt.last_optimize_result() != 5
    except Exception:  # roundoff / line-search failure: fall back below
        ok = False
    best["x"] = canonical_theta(dev.model, best["x"])
    if not ok:
        from ..deterministic.optsummary import minimize_bounded

        step = np.maximum(0.1 * np.abs(theta0), 0.05)
        o = minimize_bounded(dev, best["x"], lower, initial_step=step, ftol_rel=1e-12, ftol_abs=1e-10,
                             xtol_abs=1e-9)
        ok = not str(o.returnvalue).startswith("MAXEVAL")
        if o.fmin < best["f"]:
            best["f"], best["x"] = o.fmin, o.xfinal
    return best["x"], float(best["f"]), ok


class _Refitter:
    """Refits of one fitted model to new responses, reusing everything built."""

    def __init__(self, payload: dict) -> None:
        self.p = payload
        model = payload["model"]
        self.model = model
        self.lmm = model.family_name == "gaussian"
        if self.lmm:
            from ..deterministic.lmm import ProfiledDeviance

            self.dense = model.q + model.p <= 400 and model.p > 0
            self.dev = (_DenseDeviance(model, payload["reml"], payload["beta"]) if self.dense
                        else ProfiledDeviance(model, reml=payload["reml"]))
            th = payload["theta"]
            self.step = np.where(np.isfinite(model.lower), np.maximum(0.25 * np.abs(th), 0.05), 0.1)

    def refit_y(self, y: np.ndarray) -> np.ndarray:
        if self.lmm:
            return self._lmm(y)
        return self._glmm(self.model.with_response(y))

    def _lmm(self, y: np.ndarray) -> np.ndarray:
        from ..deterministic.optsummary import minimize_bounded

        model, dev = self.model, self.dev
        if self.dense:
            dev.set_y(y)
            theta, fmin, conv = _lbfgs(dev, self.p["theta"], model.lower)
            beta, sigma = dev.beta_sigma(theta)
            return self._row(beta, theta, sigma, fmin, conv)
        dev.system.update(y=y - model.offset)
        opt = minimize_bounded(dev, self.p["theta"], model.lower, initial_step=self.step, ftol_rel=1e-10,
                               ftol_abs=1e-8, xtol_abs=1e-8)
        theta = opt.xfinal
        conv = not str(opt.returnvalue).startswith(("MAXEVAL", "ROUNDOFF"))
        bs = dev.system.factor(model.lambda_blocks(theta))
        n, p = model.n, model.p
        sigma = float(np.sqrt(bs.pwrss / ((n - p) if dev.reml else n)))
        return self._row(bs.beta(), theta, sigma, opt.fmin, conv)

    def _glmm(self, m: Any) -> np.ndarray:
        """Refit by the Laplace deviance (nAGQ ≤ 1) in (θ, β) from (θ̂, β̂) with its exact gradient
        (bounded L-BFGS, β scaled by its standard errors); AGQ fits go through ``fit_glmm``."""
        pl = self.p
        if pl["method"] == "agq":
            return self._glmm_full(m)
        import nlopt

        from ..deterministic.glmm import glmm_engine

        eng = glmm_engine(m, pl["family"], hessian=pl.get("hessian", "observed"))
        nt = len(pl["theta"])
        fast = pl["method"] == "fast"
        x0 = pl["theta"] if fast else np.concatenate([pl["theta"], pl["beta"]])
        sc = np.ones(nt) if fast else np.concatenate([np.ones(nt), pl["se"]])
        best = {"f": np.inf, "x": x0 / sc}

        def obj(y, grad):
            phi = np.asarray(y) * sc
            val, g = eng.fast_grad(phi) if fast else eng.laplace(phi[:nt], phi[nt:], grad=True)
            if not np.isfinite(val):
                val, g = 1e300, np.zeros_like(phi)
            if grad.size:
                grad[:] = g * sc
            if val < best["f"]:
                best["f"], best["x"] = float(val), np.array(y, copy=True)
            return float(val)

        opt = nlopt.opt(nlopt.LD_LBFGS, x0.size)  # no bounds: the deviance is symmetric in θ's column signs
        opt.set_min_objective(obj)
        opt.set_ftol_rel(1e-13)
        opt.set_xtol_abs(1e-9)
        opt.set_maxeval(1000)
        try:
            opt.optimize(x0 / sc)
            ok = 0 < opt.last_optimize_result() != 5
        except Exception:  # roundoff at a tight tolerance: the best point is kept
            ok = np.isfinite(best["f"])
        phi = best["x"] * sc
        phi[:nt] = canonical_theta(m, phi[:nt])
        if fast:
            st = eng.pirls_joint(phi)
            theta, beta = phi, st.beta.copy()
        else:
            theta, beta = phi[:nt], phi[nt:]
        return self._row(beta, theta, 1.0, best["f"], ok and eng.nonconverged == 0)

    def _glmm_full(self, m: Any) -> np.ndarray:
        from ..deterministic.glmm import fit_glmm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                f = fit_glmm(m, method=self.p["method"], nagq=self.p["nagq"],
                             start={"theta": self.p["theta"], "beta": self.p["beta"]},
                             hessian=self.p.get("hessian", "observed"), stage1=False, vcov="RX",
                             check_derivatives=False, condvar=False, threads=None)
            except Exception:  # a replicate the optimiser cannot fit: recorded as not converged
                k = len(self.p["beta"]) + len(self.p["theta"])
                return np.concatenate([np.full(k + 1, np.nan), [0.0, 0.0]])
        return self._row(f._beta, f.theta, 1.0, f.objective, not f.warnings)

    def _row(self, beta, theta, sigma, objective, converged) -> np.ndarray:
        model = self.model
        vc = sd_cor(model, theta, sigma)
        parts = [beta, vc]
        if self.lmm:
            parts.append([sigma])
        diag = np.concatenate([t.diag_index + s.start for t, s in zip(model.terms, model.theta_slices)])
        singular = float(np.any(theta[diag] < 1e-4))
        return np.concatenate([*parts, [objective, singular, float(converged)]])


def _draw(payload: dict, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    """One bootstrap response (parametric, residual) or a resampled data set (case)."""
    model = payload["model"]
    if kind == "parametric":
        sig = payload["sigma"] if model.family_name == "gaussian" else None
        fam = payload.get("family")
        return model.simulate(payload["beta"], payload["theta"], sig, 1, rng, family=fam)[:, 0], None
    if kind == "residual":
        y = model.X @ payload["beta"] + model.offset
        for t, sl in zip(model.terms, model.z_slices):
            bt = payload["b"][sl].reshape(t.nlev, t.k)
            bt = bt - bt.mean(axis=0)
            star = bt[rng.integers(0, t.nlev, t.nlev)]
            y = y + np.einsum("ij,ij->i", t.z, star[t.refs])
        e = payload["resid"] - payload["resid"].mean()
        return y + e[rng.integers(0, model.n, model.n)], None
    # case: nested resampling at the named levels (outermost first), clusters kept whole below the last
    frame = payload["frame"]
    idx, labels = _resample_rows(frame, list(payload["resample"]), np.arange(len(frame)), rng)
    new = frame.iloc[idx].reset_index(drop=True)
    for g, lab in labels.items():
        new[g] = pd.Categorical(lab)
    return None, (new, idx)


def _resample_rows(frame: pd.DataFrame, levels: list[str], rows: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Resample the clusters of ``levels[0]`` within ``rows`` with replacement, then recursively the
    clusters of the next level (or the observations, ``".obs"``) within each drawn cluster. Each draw
    of a cluster becomes a new level (labels ``"3"``, ``"3.1"``, ...)."""
    g = levels[0]
    if g == ".obs":
        return rng.choice(rows, rows.size, replace=True), {}
    codes = pd.Categorical(frame[g].to_numpy()[rows]).codes
    groups = [rows[codes == k] for k in range(int(codes.max()) + 1) if np.any(codes == k)]
    pick = rng.integers(0, len(groups), len(groups))
    out_idx, out_lab = [], {}
    for j, k in enumerate(pick):
        if len(levels) > 1:
            sub, lab = _resample_rows(frame, levels[1:], groups[k], rng)
        else:
            sub, lab = groups[k], {}
        out_idx.append(sub)
        out_lab.setdefault(g, []).append(np.full(sub.size, str(j), dtype=object))
        for h, v in lab.items():
            out_lab.setdefault(h, []).append(np.asarray([f"{j}.{x}" for x in v], dtype=object))
    return np.concatenate(out_idx), {h: np.concatenate(v) for h, v in out_lab.items()}


def _replicate(payload: dict, kind: str, ss: np.random.SeedSequence, refitter: _Refitter | None) -> np.ndarray:
    rng = np.random.default_rng(ss)
    y, case = _draw(payload, kind, rng)
    if case is None:
        return refitter.refit_y(y)
    from ..builder.model import Model

    new, idx = case
    m0 = payload["model"]
    w = m0.prior_weights[idx]
    # the offset= argument's part of the offset (offset() terms of the formula are re-evaluated on `new`)
    from ..builder.model import eval_numeric

    extra = m0.offset - sum((eval_numeric(e, m0.frame) for e in m0.parsed.offsets), np.zeros(m0.n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Model(m0.formula, new, family=m0.family, weights=None if np.all(w == 1.0) else w,
                  offset=extra[idx] if np.any(extra != 0) else None)
    sub = dict(payload, model=m)
    return _Refitter(sub).refit_y(m.y if m.family_name == "gaussian" else _response_scale(m))


def _response_scale(m: Any) -> np.ndarray:
    if m.family_name == "binomial" and str(m.parsed.response).startswith("cbind("):
        return m.y * (m.weights / m.prior_weights)
    return m.y


def _run_chunk(payload: dict, kind: str, seeds: list) -> np.ndarray:
    """Replicates of one chunk, one BLAS thread (thousands of tiny BLAS calls: thread hand-off
    costs more than the work on few cores)."""
    from ..deterministic.pirls import blas_threads

    with blas_threads(1):
        refitter = _Refitter(payload) if kind != "case" else None
        return np.vstack([_replicate(payload, kind, ss, refitter) for ss in seeds])


# =============================================================================================
# results
# =============================================================================================
class Bootstrap:
    """Bootstrap replicates of a fit.

    Attributes
    ----------
    replicates : DataFrame
        One row per replicate: fixed effects, SDs/correlations, ``sigma`` (LMMs),
        ``objective``, ``singular``, ``converged``.
    estimates : Series
        The original estimates of the same parameters.
    type : str
    seed : int
    """

    def __init__(self, replicates: pd.DataFrame, estimates: pd.Series, type: str, seed: Any) -> None:
        self.replicates = replicates
        self.estimates = estimates
        self.type = type
        self.seed = seed

    @property
    def params(self) -> list[str]:
        return list(self.estimates.index)

    @property
    def nsim(self) -> int:
        return len(self.replicates)

    @property
    def se(self) -> pd.Series:
        """Bootstrap standard errors (SD of the converged replicates)."""
        ok = self._ok()
        return ok[self.params].std(ddof=1).rename("se")

    def _ok(self) -> pd.DataFrame:
        r = self.replicates
        return r[r["converged"].astype(bool)]

    def confint(self, level: float = 0.95, method: str = "percentile") -> pd.DataFrame:
        """confint(level=0.95, method="percentile") -> DataFrame

        Bootstrap intervals (lme4's ``confint(fit, method = "boot", boot.type=)``):
        ``"percentile"``, ``"basic"`` (2θ̂ − quantiles) or ``"normal"`` (θ̂ − bias ±
        z·SE), from the converged replicates.
        """
        if not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"level must be a number in (0, 1), got {level!r}")
        if method not in ("percentile", "basic", "normal"):
            raise ValueError(f"method must be 'percentile', 'basic' or 'normal', not {method!r}")
        ok = self._ok()[self.params]
        a = (1 - level) / 2
        lo, hi = f"{100 * a:.1f} %", f"{100 * (1 - a):.1f} %"
        est = self.estimates
        if method == "normal":
            z = stats.norm.ppf(1 - a)
            bias = ok.mean() - est
            sd = ok.std(ddof=1)
            return pd.DataFrame({lo: est - bias - z * sd, hi: est - bias + z * sd})
        ql, qh = ok.quantile(a), ok.quantile(1 - a)
        if method == "percentile":
            return pd.DataFrame({lo: ql, hi: qh})
        return pd.DataFrame({lo: 2 * est - qh, hi: 2 * est - ql})

    def tidy(self) -> pd.DataFrame:
        """Long table (replicate, parameter, value)."""
        r = self.replicates[self.params].copy()
        r["replicate"] = np.arange(len(r))
        return r.melt(id_vars="replicate", var_name="parameter", value_name="value")

    def plot(self, **kw: Any):
        """Histograms of the replicate distributions (:func:`stochmm.plots.bootstrap_hist`)."""
        from ..plots.profile import bootstrap_hist

        return bootstrap_hist(self, **kw)

    def __repr__(self) -> str:
        nconv = int(self.replicates["converged"].sum())
        return (f"<Bootstrap: {self.type}, {self.nsim} replicates ({nconv} converged, "
                f"{int(self.replicates['singular'].sum())} singular), seed={self.seed}>")


# =============================================================================================
# entry point
# =============================================================================================
def _payload(fit: Any, kind: str, resample: tuple[str, ...] | None) -> dict:
    m = fit.model
    pl = {"model": m, "beta": np.asarray(fit._beta, dtype=float), "theta": np.asarray(fit.theta, dtype=float),
          "sigma": float(fit.sigma), "reml": bool(getattr(fit, "reml", False)), "resample": resample}
    if m.family_name != "gaussian":
        pl["family"] = fit.family
        pl["hessian"] = getattr(fit, "hessian_kind", "observed")
        pl["nagq"] = int(fit.nagq)
        pl["method"] = "fast" if fit.nagq == 0 else ("laplace" if fit.nagq == 1 else "agq")
        pl["se"] = np.maximum(np.sqrt(np.diag(fit._vcov)), 1e-8)
        if pl["method"] != "agq":
            pl["nagq"] = None
    if kind == "residual":
        pl["b"] = np.asarray(fit._b, dtype=float)
        pl["resid"] = np.asarray(fit.residuals, dtype=float)
    if kind == "case":
        pl["frame"] = m.frame
    return pl


def _progress(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    disable = (not progress) or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


def bootstrap(fit: Any, nsim: int = 1000, seed: int | None = 0, type: str = "parametric",
              resample: str | tuple[str, ...] | None = None, progress: bool = True, client: Any = None,
              n_jobs: int = 1, chunk: int | None = None) -> Bootstrap:
    """bootstrap(fit, nsim=1000, seed=0, type="parametric", resample=None, progress=True, client=None, n_jobs=1) -> Bootstrap

    Bootstrap a fitted mixed model.

    Parameters
    ----------
    fit : LmmResults or GlmmResults
    nsim : int
        Number of replicates (≥ 1).
    seed : int
        Replicate i draws from the i-th child of ``numpy.random.SeedSequence(seed)``:
        the same replicates serially, with ``n_jobs`` processes or on a Dask client.
    type : {"parametric", "residual", "case"}
        Parametric (any model); residual and case bootstraps for LMMs.
    resample : str or tuple of str
        Case bootstrap: the levels resampled, outermost first, as lmeresampler's
        ``resample``: ``"Subject"`` resamples subjects (their observations kept whole);
        ``("batch", "cask")`` resamples batches, then casks within each drawn batch;
        ``("Subject", ".obs")`` also resamples observations within each drawn subject.
        Default: the outermost grouping factor.
    progress : bool
        tqdm progress bar (quiet when not on a terminal).
    client : dask.distributed.Client, optional
        Run the replicates on this client (in chunks).
    n_jobs : int
        Processes to use without a client (1: in this process).
    chunk : int, optional
        Replicates per task (default: spread over the workers, at most 250).

    Returns
    -------
    Bootstrap
        ``.replicates`` (tidy, one row per replicate), ``.confint(method=)``, ``.se``, ``.plot()``.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> bt = bootstrap(fit, nsim=20, seed=1, progress=False)
    >>> bt.replicates.shape
    (20, 6)
    """
    kind = _check(fit, nsim, type, n_jobs)
    _check_run(progress, seed, chunk)
    resample = _check_resample(fit, kind, resample)
    nsim = int(nsim)
    seeds = np.random.SeedSequence(seed).spawn(nsim)
    payload = _payload(fit, kind, resample)
    if client is not None and not (hasattr(client, "submit") and hasattr(client, "scheduler_info")):
        raise TypeError(f"client must be a dask.distributed.Client (or None), got {client.__class__.__name__}")
    workers = 1
    if client is not None:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
    elif n_jobs > 1:
        workers = int(n_jobs)
    size = chunk or max(1, min(250, -(-nsim // (4 * workers)))) if workers > 1 or client is not None else (chunk or 50)
    chunks = [seeds[i : i + size] for i in range(0, nsim, size)]
    bar = _progress(nsim, progress, f"{kind} bootstrap")
    try:
        rows = map_chunks(_run_chunk, (payload, kind), chunks, n_jobs=workers, client=client, bar=bar)
    finally:
        bar.close()
    model = fit.model
    disp = model.family_name == "gaussian"
    names = list(model.xnames) + param_names(model, disp)
    cols = names + ["objective", "singular", "converged"]
    table = pd.DataFrame(np.vstack(rows), columns=cols)
    table["singular"] = table["singular"].astype(bool)
    table["converged"] = table["converged"].astype(bool)
    est = np.concatenate([fit._beta, sd_cor(model, fit.theta, fit.sigma if disp else 1.0)]
                         + ([[fit.sigma]] if disp else []))
    nbad = int((~table["converged"]).sum())
    if nbad:
        warnings.warn(f"{nbad} of {nsim} bootstrap replicates did not converge; intervals use the others",
                      UserWarning, stacklevel=2)
    return Bootstrap(table, pd.Series(est, index=names, name="estimate"), kind, seed)


def _check(fit: Any, nsim: Any, type: Any, n_jobs: Any) -> str:
    if isinstance(nsim, bool) or not isinstance(nsim, (int, np.integer)) or nsim < 1:
        raise ValueError(f"nsim must be a positive integer (number of bootstrap replicates), got {nsim!r}")
    if not isinstance(type, str) or type not in _TYPES:
        import difflib

        near = difflib.get_close_matches(str(type), _TYPES, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"type must be one of {', '.join(map(repr, _TYPES))}, not {type!r}.{hint}")
    if type != "parametric" and fit.model.family_name != "gaussian":
        raise ValueError(f"the {type} bootstrap is for linear mixed models; use type='parametric' for a GLMM")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive integer, got {n_jobs!r}")
    return type


def _check_run(progress: Any, seed: Any, chunk: Any = None) -> None:
    """The run options shared by the bootstraps: a True/False ``progress``, an integer ``seed``
    (≥ 0) or None, a positive integer ``chunk`` or None."""
    from ..errors import check_flag

    check_flag(progress, "progress")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer (replicates per task) or None, got {chunk!r}")


def _check_resample(fit: Any, kind: str, resample: Any) -> tuple[str, ...] | None:
    model = fit.model
    gvars = list(dict.fromkeys(v for b in model.parsed.bars for v in b.group_vars))
    if resample is None:
        if kind != "case":
            return None
        return (gvars[0] if len(model.terms[0].group.split(":")) == 1 else model.terms[-1].group.split(":")[0],)
    if isinstance(resample, str):
        resample = (resample,)
    if not isinstance(resample, (list, tuple)) or not all(isinstance(g, str) for g in resample):
        raise TypeError(f"resample must be a grouping factor's name or a tuple of names, got {resample!r}")
    resample = tuple(resample)
    if not resample:
        raise ValueError("resample must name at least one grouping factor (outermost first)")
    if len(set(resample)) < len(resample):
        raise ValueError(f"resample names a level more than once: {resample!r}")
    for g in resample:
        if g not in gvars and g != ".obs":
            import difflib

            near = difflib.get_close_matches(str(g), gvars, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"resample names {g!r}, which is not a grouping factor of the model "
                             f"(grouping factors: {', '.join(gvars)}; '.obs' for observations).{hint}")
    if kind != "case":
        raise ValueError(f"resample= applies to the case bootstrap; the {kind} bootstrap resamples every level")
    if ".obs" in resample[:-1] or resample == (".obs",):
        raise ValueError("'.obs' (observations) can only be the innermost level after a grouping factor, "
                         "e.g. resample=('Subject', '.obs')")
    return resample
