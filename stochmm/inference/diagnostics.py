"""Diagnostics lme4 users reach for: ``rePCA``, ``allFit``, ``hatvalues`` and Cook's distance."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg as sla

__all__ = ["rePCA", "influence", "all_fit"]


def rePCA(fit: Any) -> pd.DataFrame:
    """rePCA(fit) -> DataFrame

    lme4's ``rePCA``: for each grouping factor, the singular values of its relative
    covariance factor (the block-diagonal of the T_j of its terms), i.e. the SDs of
    the principal components of the random effects relative to σ. A (near) zero
    value shows a singular fit's lost dimension. Columns: group, component, sdev,
    proportion (of the variance), cumulative.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> rePCA(fit)["sdev"].round(4).tolist()
    [0.9669, 0.2309]
    """
    model = fit.model
    rows = []
    blocks: dict[str, list[np.ndarray]] = {}
    for t, T in zip(model.terms, model.lambda_blocks(fit.theta)):
        blocks.setdefault(t.group, []).append(T)
    for g, Ts in blocks.items():
        s = sla.svdvals(sla.block_diag(*Ts))
        var = s**2
        tot = var.sum()
        prop = var / tot if tot > 0 else np.full(s.size, np.nan)
        for i, (sv, pr, cu) in enumerate(zip(s, prop, np.cumsum(prop))):
            rows.append((g, i + 1, sv, pr, cu))
    return pd.DataFrame(rows, columns=["group", "component", "sdev", "proportion", "cumulative"])


def influence(fit: Any, chunk: int = 4096) -> pd.DataFrame:
    """influence(fit) -> DataFrame

    Leverage and Cook's distance per observation of a linear mixed model, as lme4's
    ``hatvalues(fit)`` and ``cooks.distance(fit)``: the diagonal of the hat matrix of
    the penalised least-squares problem (``[W½ZΛ W½X]`` against ``[ZΛ X; I 0]``) at
    θ̂, and ``D_i = (r_i / (1 − h_i))² h_i / (σ² p)`` with Pearson residuals r_i and
    p the rank of X. Columns: hat, cooks, residual.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> round(float(influence(fit)["hat"].sum()), 4)
    4.9126
    """
    model = fit.model
    if model.family_name != "gaussian":
        raise ValueError("influence() is for linear mixed models (lme4 warns that the hat matrix may not make "
                         "sense for GLMMs)")
    q, p = model.q, model.p
    if q + p > 8000:
        raise ValueError(f"the hat values need a dense ({q + p} x {q + p}) factor here; too large")
    sw = np.sqrt(model.prior_weights)
    ZL = (model.Z @ model.Lambda(fit.theta)).tocsc()
    if q * model.n > 5e7:
        raise ValueError(f"influence() forms the dense n x q matrix ZΛ (n = {model.n}, q = {q}); too large")
    A = np.hstack([np.asarray(ZL.multiply(sw[:, None]).todense()), model.X * sw[:, None]])
    M = A.T @ A
    M[np.arange(q), np.arange(q)] += 1.0
    L = sla.cholesky(M, lower=True)
    h = np.empty(model.n)
    for s in range(0, model.n, chunk):
        C = sla.solve_triangular(L, A[s : s + chunk].T, lower=True)
        h[s : s + chunk] = np.sum(C * C, axis=0)
    res = (model.y - fit.fitted) * sw
    rank = np.linalg.matrix_rank(model.X)
    with np.errstate(divide="ignore", invalid="ignore"):
        cooks = (res / (1 - h)) ** 2 * h / (fit.sigma**2 * rank)
    cooks[np.isinf(cooks)] = np.nan
    return pd.DataFrame({"hat": h, "cooks": cooks, "residual": res})


# =============================================================================================
# all_fit
# =============================================================================================
_LMM_OPTIMIZERS = ("bobyqa", "nelder_mead", "lbfgsb")
_GLMM_OPTIMIZERS = ("newton", "lbfgs", "bobyqa")


def _lmm_fit(model: Any, reml: bool, optimizer: str, start: str):
    from ..deterministic.lmm import ProfiledDeviance, _results_at, fit_lmm, moment_start
    from ..deterministic.optsummary import OptSummary

    if optimizer == "bobyqa":
        return fit_lmm(model, reml=reml, start=start)
    dev = ProfiledDeviance(model, reml=reml)
    x0 = moment_start(model) if start == "moments" else model.theta0
    lower = model.lower
    t0 = time.perf_counter()
    if optimizer == "nelder_mead":
        import nlopt

        best = {"x": x0.copy(), "f": np.inf}

        def f(x, grad):
            v = dev(np.asarray(x))
            if v < best["f"]:
                best["x"], best["f"] = np.array(x), v
            return v

        opt = nlopt.opt(nlopt.LN_NELDERMEAD, x0.size)
        opt.set_lower_bounds(np.where(np.isfinite(lower), lower, -1e10))
        opt.set_min_objective(f)
        opt.set_initial_step(np.full(x0.size, 0.25))
        opt.set_ftol_rel(1e-15)
        opt.set_ftol_abs(1e-12)
        opt.set_xtol_abs(1e-12)
        opt.set_maxeval(20000)
        try:
            opt.optimize(x0)
            ret = str(opt.last_optimize_result())
        except Exception as exc:  # roundoff: keep the best point
            ret = type(exc).__name__
        x, fmin, nfev = best["x"], best["f"], dev.nfev
    else:
        import scipy.optimize as so

        r = so.minimize(dev, x0, method="L-BFGS-B",
                        bounds=[(lo if np.isfinite(lo) else None, None) for lo in lower],
                        options={"ftol": 1e-14, "gtol": 1e-8, "maxiter": 2000})
        x, fmin, nfev, ret = r.x, float(r.fun), int(r.nfev), str(r.message)
    osum = OptSummary(optimizer=optimizer, x0=x0, lower=lower, upper=np.full_like(x0, np.inf), xfinal=x,
                      fmin=fmin, feval=nfev, returnvalue=ret, elapsed=time.perf_counter() - t0, ftol_rel=1e-12,
                      ftol_abs=0.0, xtol_abs=1e-10, names=model.theta_names, fitlog=[])
    return _results_at(model, dev, x, osum, condvar=False)


def all_fit(formula: Any, data: pd.DataFrame | None = None, family: Any = None, reml: bool = True,
            method: str | None = None, nagq: int | None = None, tol: float = 1e-4, **model_options: Any) -> pd.DataFrame:
    """all_fit(formula, data=None, family=None, reml=True, method=None, nagq=None, tol=1e-4) -> DataFrame

    lme4's ``allFit``: refit a model with every available optimiser and starting
    rule and tabulate the objectives and estimates, flagging disagreement.

    LMMs: BOBYQA (stochmm's default), Nelder–Mead (NLopt) and L-BFGS-B on the
    profiled deviance, each from lme4's start (θ = 1 on the diagonals) and, for
    random-intercept models, from method-of-moments starts. GLMMs: the ``newton``,
    ``lbfgs`` and ``bobyqa`` optimisers of :func:`~stochmm.deterministic.glmm.fit_glmm`,
    from the default start and from lme4's θ start.

    Parameters
    ----------
    formula : str or fitted results
        A formula (with ``data``) or a fit whose model is refitted.
    tol : float
        A fit whose objective exceeds the best by more than ``tol`` or whose estimates
        differ from the best fit's by more than ``sqrt(tol)`` (relative) is flagged
        ``disagrees``.

    Returns
    -------
    DataFrame
        One row per (optimizer, start): objective, objective − best, converged,
        warnings, seconds, the fixed effects, θ and σ, and ``disagrees``.

    Examples
    --------
    >>> import stochmm as sm
    >>> t = sm.all_fit("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> bool(t["disagrees"].any()), len(t)
    (False, 6)
    """
    from ..builder.model import Model

    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not 0 < tol < np.inf:
        raise ValueError(f"tol must be a positive number (objective tolerance), got {tol!r}")
    if hasattr(formula, "model") and data is None:
        fit0 = formula
        model = fit0.model
        reml = bool(getattr(fit0, "reml", reml))
        if model.family_name != "gaussian" and method is None:
            method = "fast" if fit0.nagq == 0 else ("laplace" if fit0.nagq == 1 else "agq")
            nagq = fit0.nagq if fit0.nagq > 1 else None
    else:
        if not isinstance(formula, str):
            raise TypeError(f"all_fit takes a formula and data, or a fitted model; got {type(formula).__name__}")
        if not isinstance(data, pd.DataFrame):
            raise TypeError("all_fit needs data= (a pandas DataFrame) with a formula")
        model = Model(formula, data, family=family, **model_options)
    if not isinstance(reml, bool):
        raise TypeError(f"reml must be True or False, not {reml!r}")
    if model.family_name == "gaussian":
        for name, value in (("nagq", nagq), ("method", method)):
            if value is not None:
                raise ValueError(f"{name}={value!r} is a GLMM option; this is a linear mixed model (its "
                                 "optimisers run on the profiled deviance)")
    rows, fits = [], []
    if model.family_name == "gaussian":
        from ..deterministic.lmm import moment_start_applies

        starts = ["lme4"] + (["moments"] if moment_start_applies(model) else [])
        combos = [(o, s) for o in _LMM_OPTIMIZERS for s in starts]
    else:
        combos = [(o, s) for o in _GLMM_OPTIMIZERS for s in ("default", "lme4")]
    for opt, start in combos:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if model.family_name == "gaussian":
                    f = _lmm_fit(model, reml, opt, start)
                else:
                    from ..deterministic.glmm import fit_glmm

                    st = None if start == "default" else {"theta": model.theta0}
                    f = fit_glmm(model, method=method or "laplace", nagq=nagq, optimizer=opt, start=st)
                err = None
            except Exception as exc:  # an optimiser that fails is reported, not fatal
                f, err = None, f"{type(exc).__name__}: {exc}"
        msgs = [str(w.message) for w in caught] + ([err] if err else [])
        row = {"optimizer": opt, "start": start, "objective": np.nan if f is None else f.objective,
               "converged": f is not None and not any("converge" in m for m in msgs),
               "warnings": "; ".join(msgs), "seconds": time.perf_counter() - t0}
        if f is not None:
            row.update(dict(zip(model.xnames, f._beta)))
            row.update(dict(zip(model.theta_names, f.theta)))
            if model.family_name == "gaussian":
                row["sigma"] = f.sigma
        rows.append(row)
        fits.append(f)
    out = pd.DataFrame(rows)
    best = int(np.nanargmin(out["objective"].to_numpy()))
    out.insert(3, "delta", out["objective"] - out["objective"].iloc[best])
    pcols = list(model.xnames) + list(model.theta_names) + (["sigma"] if model.family_name == "gaussian" else [])
    P = out[pcols].to_numpy(dtype=float)
    scale = np.maximum(np.abs(P[best]), 1e-2)
    rel = np.nanmax(np.abs(P - P[best]) / scale, axis=1)
    out["disagrees"] = (out["delta"] > tol) | (rel > np.sqrt(tol)) | out["objective"].isna()
    if out["disagrees"].any():
        bad = out.loc[out["disagrees"], ["optimizer", "start"]].astype(str).agg("/".join, axis=1).tolist()
        warnings.warn(f"optimisers disagree: {', '.join(bad)} differ from the best fit by more than the tolerance "
                      f"(objective {tol:g}, estimates {np.sqrt(tol):.2g} relative)", UserWarning, stacklevel=2)
    return out
