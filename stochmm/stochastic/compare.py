"""How good is the approximation? One-scale likelihood comparisons and the audit of a GLMM fit.

:func:`compare_likelihoods` evaluates several methods (Laplace, AGQ, importance sampling, nAGQ = 0,
exact for LMMs) at the same parameters — the fit's estimates by default — and returns a tidy
table with each log-likelihood, its Monte Carlo SE, its difference from the most accurate method
available and the time it took. With ``profile=`` it evaluates every method along a grid of one
parameter (a random-effect SD, say) with the others held at their estimates: the
approximation-error curves :func:`stochmm.plots.approximation_error` draws.

:func:`check_approximation` (``fit.check_approximation()``) is the audit: the importance-sampling
log-likelihood at the fit's estimates against the fit's own value (with MC SE and Pareto k̂),
and whether the estimates move when the likelihood is computed accurately — one refit by AGQ
(one grouping factor) or Monte Carlo ML (crossed factors), reporting the change in each θ and β
in units of its standard error.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from .importance import LogLik, loglik, parse_params

__all__ = ["compare_likelihoods", "check_approximation", "ApproximationCheck", "ACCURACY_RANK"]

#: methods from most to least accurate (AGQ ranks by its number of nodes; "is" by its MC SE)
ACCURACY_RANK = ("exact", "agq", "is", "laplace", "fast")


def _method_key(m: str) -> tuple[str, int | None]:
    key = m.strip().lower()
    if key.startswith("agq"):
        rest = key[3:].lstrip(":=(").rstrip(")")
        return "agq", int(rest) if rest else 9
    return key, None


def _model_of(fit_or_model: Any):
    from ..builder.model import Model
    from ..results import MixedModelResults

    if isinstance(fit_or_model, MixedModelResults):
        return fit_or_model.model, fit_or_model
    if isinstance(fit_or_model, Model):
        return fit_or_model, None
    raise TypeError(f"expected a fitted results object or a Model, got {type(fit_or_model).__name__}")


def _evaluate(model, params, methods, draws, seed, options) -> list[dict]:
    from ..deterministic.pirls import single_factor

    rows = []
    ss = np.random.SeedSequence(seed if not isinstance(seed, np.random.Generator) else None)
    for m in methods:
        key, nq = _method_key(m)
        label = f"agq({nq})" if key == "agq" else key
        if key == "agq" and not single_factor(model):
            rows.append({"method": label, "loglik": np.nan, "mcse": np.nan, "seconds": 0.0, "khat": np.nan,
                         "note": "not available: crossed or several grouping factors"})
            continue
        t0 = time.perf_counter()
        if key == "is":
            sd = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(ss.spawn(1)[0])
            ll = loglik(model, params, "is", draws=draws, seed=sd, **options)
        else:
            ll = loglik(model, params, m)
        rows.append({"method": ll.method, "loglik": float(ll), "mcse": ll.mcse, "seconds": time.perf_counter() - t0,
                     "khat": ll.khat if key == "is" else np.nan, "note": ""})
    return rows


def _reference(rows: list[dict]) -> int | None:
    """Index of the most accurate available method."""
    best, best_rank = None, None
    for i, r in enumerate(rows):
        if not np.isfinite(r["loglik"]):
            continue
        key, nq = _method_key(r["method"])
        rank = (ACCURACY_RANK.index(key), -(nq or 0), r["mcse"])
        if key == "agq" and (nq or 0) < 9:  # a few nodes are not more accurate than good IS
            rank = (ACCURACY_RANK.index("is") + 0.5, -(nq or 0), 0.0)
        if best_rank is None or rank < best_rank:
            best, best_rank = i, rank
    return best


def compare_likelihoods(fit_or_model: Any, params: Any = None,
                        methods: tuple[str, ...] | list[str] | None = None, *, draws: int = 10_000,
                        seed: Any = None, profile: str | None = None, values: Any = None,
                        **options: Any) -> pd.DataFrame:
    """compare_likelihoods(fit_or_model, params=None, methods=("laplace", "agq:5", "agq:25", "is"), *, draws=10000, seed=None, profile=None, values=None) -> DataFrame

    The log-likelihood by several methods at the same parameters, on the one full scale.

    Parameters
    ----------
    fit_or_model : results object or Model
    params : results object or dict, optional
        Default: the fit's estimates (required when a Model is given).
    methods : sequence of str
        From ``"laplace"``, ``"agq:<nodes>"``, ``"fast"``, ``"is"``, ``"exact"`` (LMMs). Default
        ``("laplace", "agq:5", "agq:25", "is")`` for GLMMs (AGQ rows say "not available" for crossed
        factors) and ``("exact", "is")`` for LMMs.
    draws, seed, **options
        For ``"is"`` (see :func:`stochmm.stochastic.importance.loglik`).
    profile : str, optional
        A θ or β name (``fit.theta_names``, ``model.xnames``): evaluate every method along ``values``
        of that parameter, the others held at ``params``.
    values : array-like, optional
        The grid for ``profile`` (default: 9 points from 0.25× to 2× the current value).

    Returns
    -------
    DataFrame
        Columns ``method, loglik, mcse, difference, seconds, khat, note`` (and ``parameter, value``
        in profile mode): ``difference`` is loglik minus that of the most accurate method available
        (exact > AGQ with ≥ 9 nodes > IS > Laplace > nAGQ = 0) at the same parameters.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    >>> tab = sm.compare_likelihoods(fit, draws=2000, seed=1)
    >>> tab["method"].tolist()
    ['laplace', 'agq(5)', 'agq(25)', 'is']
    >>> bool(abs(tab.set_index("method").loc["is", "difference"]) < 0.01)
    True
    """
    model, fit = _model_of(fit_or_model)
    if params is None:
        if fit is None:
            raise ValueError("params is required when a Model (not a fit) is given")
        params = fit
    gaussian = model.family_name == "gaussian"
    if methods is None:
        methods = ("exact", "is") if gaussian else ("laplace", "agq:5", "agq:25", "is")
    if isinstance(methods, str):
        methods = (methods,)
    methods = list(methods)
    if not methods:
        raise ValueError("methods is empty")
    from .importance import _check_draws, _check_method

    for m in methods:
        _check_method(m, model)
    draws = _check_draws(draws)
    beta, theta, sigma = parse_params(model, params)
    base = {"beta": beta, "theta": theta}
    if gaussian:
        base["sigma"] = sigma
    if profile is None:
        rows = _evaluate(model, base, methods, draws, seed, options)
        return _finish(rows)
    names = list(model.theta_names) + list(model.xnames)
    if profile not in names:
        import difflib

        near = difflib.get_close_matches(profile, names, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise DataError(f"profile parameter {profile!r} is not a θ or β name.{hint} Names: {', '.join(names)}")
    j = names.index(profile)
    cur = float(np.concatenate([theta, beta])[j])
    if values is None:
        values = np.linspace(0.25, 2.0, 9) * (cur if cur != 0 else 1.0)
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("values must be a non-empty array of finite numbers")
    out = []
    rng = np.random.default_rng(seed)
    for v in values:
        p = {k: np.array(x, dtype=float, copy=True) if k != "sigma" else x for k, x in base.items()}
        if j < theta.size:
            p["theta"][j] = v
        else:
            p["beta"][j - theta.size] = v
        tab = _finish(_evaluate(model, p, methods, draws, rng, options))
        tab.insert(0, "value", v)
        tab.insert(0, "parameter", profile)
        out.append(tab)
    return pd.concat(out, ignore_index=True)


def _finish(rows: list[dict]) -> pd.DataFrame:
    ref = _reference(rows)
    df = pd.DataFrame(rows, columns=["method", "loglik", "mcse", "seconds", "khat", "note"])
    df.insert(3, "difference", df["loglik"] - (df["loglik"].iloc[ref] if ref is not None else np.nan))
    if ref is not None:
        df.loc[ref, "note"] = (df.loc[ref, "note"] + " reference").strip()
    return df


# =============================================================================================
# the audit
# =============================================================================================
class ApproximationCheck:
    """ApproximationCheck — the result of ``fit.check_approximation()``.

    Attributes
    ----------
    loglik : pandas.DataFrame
        The fit's log-likelihood and the importance-sampling one at the same estimates
        (difference, MC SE, Pareto k̂).
    estimates : pandas.DataFrame
        Each θ and β: the fit's estimate, the accurate refit's, the change and the change in SEs.
    refit_method : str
        ``"agq(25)"``-style or ``"IS"`` (Monte Carlo ML).
    flags : list of str
        "Laplace error in log-likelihood > 0.5", "estimates move > 0.1 SE" (when they apply; for a Monte
        Carlo refit, moves beyond 0.1 SE + 2 MC SE of the refit).
    notes : list of str
    is_loglik : LogLik
    refit : results object or None
    """

    def __init__(self, fit, is_ll: LogLik, estimates: pd.DataFrame | None, refit, refit_method: str | None,
                 seconds: float) -> None:
        self.fit = fit
        self.is_loglik = is_ll
        diff = float(fit.loglik) - float(is_ll)
        self.loglik = pd.DataFrame({"method": [fit.method, "IS"], "loglik": [fit.loglik, float(is_ll)],
                                    "mcse": [0.0, is_ll.mcse], "khat": [np.nan, is_ll.khat]})
        self.error = diff
        self.estimates = estimates
        self.refit = refit
        self.refit_method = refit_method
        self.seconds = seconds
        self.flags: list[str] = []
        self.notes: list[str] = []
        if abs(diff) > 0.5 + 2.0 * is_ll.mcse:
            self.flags.append(f"{fit.method} error in log-likelihood > 0.5 ({diff:+.3f} ± {is_ll.mcse:.3f})")
        if refit is not None and getattr(refit, "mcml_failed", False):
            self.notes.append("the Monte Carlo ML refit did not reach a higher likelihood than this fit's estimates "
                              f"(IS log-lik {float(refit.loglik_is):.3f} vs {float(refit.loglik_start):.3f}): how far "
                              "the estimates move is not resolved; use a larger refit_draws")
            estimates = None
        if estimates is not None:
            # a Monte Carlo refit moves by its own MC error too: flag only moves beyond 2 MC SE of it
            beyond = estimates["change_se"].abs() - 2.0 * estimates["mc_se_in_se"].fillna(0.0)
            if np.nanmax(beyond.to_numpy()) > 0.1:
                worst = beyond.idxmax()
                mc = estimates.loc[worst, "mc_se_in_se"]
                extra = f", MC SE {mc:.2f} SE" if np.isfinite(mc) and mc > 0 else ""
                self.flags.append(f"estimates move > 0.1 SE ({worst}: {estimates.loc[worst, 'change_se']:+.2f} SE"
                                  f"{extra})")
            elif np.nanmax(estimates["mc_se_in_se"].fillna(0.0).to_numpy()) > 0.05:
                self.notes.append("the Monte Carlo refit's own error is "
                                  f"{np.nanmax(estimates['mc_se_in_se']):.2f} SE: moves below that are not resolved "
                                  "(use a larger refit_draws)")
        if is_ll.khat > 0.7:
            self.flags.append(f"importance weights unreliable (Pareto k-hat {is_ll.khat:.2f} > 0.7)")

    @property
    def ok(self) -> bool:
        """No flag raised."""
        return not self.flags

    def __str__(self) -> str:
        f = self.fit
        ll = self.is_loglik
        lines = [f"Approximation check: {f.method} fit of {f.model.formula}",
                 f"  log-likelihood  {f.method:>8}: {f.loglik:12.4f}",
                 f"                  {'IS':>8}: {float(ll):12.4f}  (MC SE {ll.mcse:.4f}, k-hat {ll.khat:.2f}, "
                 f"{ll.draws} draws)",
                 f"  error ({f.method} - IS): {self.error:+.4f} ± {ll.mcse:.4f}"]
        if self.estimates is not None:
            lines.append(f"  estimates under the accurate refit ({self.refit_method}):")
            e = self.estimates
            w = max(len(str(i)) for i in e.index)
            mc = self.refit_method == "IS"
            lines.append(f"    {'':<{w}} {'fit':>10} {'refit':>10} {'change/SE':>10}" + (f" {'MC SE/SE':>9}" if mc else ""))
            for name, r in e.iterrows():
                lines.append(f"    {name:<{w}} {r['estimate']:10.4f} {r['refit']:10.4f} {r['change_se']:10.3f}"
                             + (f" {r['mc_se_in_se']:9.3f}" if mc else ""))
        lines.append("  FLAGS: " + "; ".join(self.flags) if self.flags else "  OK: no flag (error <= 0.5, moves "
                     "<= 0.1 SE)")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  ({self.seconds:.1f} s)")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"


def _theta_se(fit) -> np.ndarray:
    nt = len(fit.theta)
    out = np.full(nt, np.nan)
    d = getattr(fit, "derivs", None)
    if d is None or d.get("Hessian") is None or not np.size(d["Hessian"]):
        return out
    try:
        C = 2.0 * np.linalg.inv(d["Hessian"])
    except np.linalg.LinAlgError:
        return out
    for a, i in enumerate(np.flatnonzero(d["free"])):
        if i < nt and C[a, a] > 0:
            out[i] = np.sqrt(C[a, a])
    return out


def check_approximation(fit: Any, draws: int = 10_000, seed: Any = None, *, refit: bool | str = True,
                        nagq: int | None = None, refit_draws: int = 1000, **options: Any) -> ApproximationCheck:
    """check_approximation(fit, draws=10000, seed=None, *, refit=True, nagq=None, refit_draws=1000) -> ApproximationCheck

    Audit a GLMM fit: the importance-sampling log-likelihood at its estimates against its own
    value, and (``refit=True``) the change of every estimate under an accurate refit — AGQ with
    ``nagq`` nodes (default 25 for one random effect per level, fewer for vector-valued ones) for
    one grouping factor, Monte Carlo ML with ``refit_draws`` draws otherwise — in units of its SE.
    Flags "error in log-likelihood > 0.5" and "estimates move > 0.1 SE".

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    >>> chk = fit.check_approximation(draws=2000, seed=1)
    >>> chk.refit_method, abs(chk.error) < 0.5
    ('agq(25)', True)
    """
    from ..deterministic.glmm import fit_glmm
    from ..deterministic.pirls import single_factor

    t0 = time.perf_counter()
    if not hasattr(fit, "family"):
        raise ValueError("check_approximation is for GLMM fits: a linear mixed model's likelihood is exact")
    model = fit.model
    is_ll = loglik(model, fit, "is", draws=draws, seed=seed, **options)
    estimates, refit_obj, how = None, None, None
    if refit:
        single = single_factor(model)
        if single and refit != "is":
            k = int(sum(t.k for t in model.terms))
            nq = nagq if nagq is not None else {1: 25, 2: 9, 3: 5}.get(k, 3)
            if nq < 2:
                raise ValueError(f"nagq must be >= 2, got {nagq!r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                refit_obj = fit_glmm(model, method="agq", nagq=nq,
                                     start={"theta": fit.theta, "beta": fit._beta})
            how = f"agq({nq})"
        else:
            from .mcml import fit_is

            rseed = np.random.default_rng(seed).integers(2**32) if not isinstance(seed, np.random.Generator) else seed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                refit_obj = fit_is(model, draws=refit_draws, seed=rseed, start=fit)
            how = "IS"
        names = list(model.theta_names) + list(model.xnames)
        est = np.concatenate([fit.theta, fit._beta])
        new = np.concatenate([refit_obj.theta, refit_obj._beta])
        se = np.concatenate([_theta_se(fit), np.sqrt(np.diag(fit._vcov))])
        mc = refit_obj.mc_se_ratio.to_numpy() if how == "IS" else np.zeros(len(names))
        estimates = pd.DataFrame({"estimate": est, "refit": new, "change": new - est, "se": se,
                                  "change_se": (new - est) / se, "mc_se_in_se": mc},
                                 index=pd.Index(names, name="parameter"))
    return ApproximationCheck(fit, is_ll, estimates, refit_obj, how, time.perf_counter() - t0)
