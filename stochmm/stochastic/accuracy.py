"""Accuracy studies: simulate from a design, fit by every method, report bias, RMSE and coverage.

:func:`accuracy_study` builds the :class:`~stochmm.builder.model.Model` once from the user's
formula and design, draws responses at the true parameters (``Model.simulate``; one random
stream per replicate from ``numpy.random.SeedSequence(seed).spawn``, so any replicate can be
redrawn alone: :func:`replicate_response`), fits each replicate with each method of the
method table (:mod:`stochmm.stochastic.accuracy_methods`) and returns an
:class:`AccuracyStudy`: a tidy per-replicate table and a summary per method × parameter
(bias and its Monte Carlo SE, relative bias, RMSE, coverage and its Monte Carlo SE, failure,
singular and non-convergence rates, median time).

Replicates run in local processes (``n_jobs``) or on a ``dask.distributed`` cluster
(``client=``); results stream back as they finish, optionally into a parquet checkpoint
directory from which a later call with the same seed resumes.

The Monte Carlo SEs follow Morris, White & Crowther (2019), "Using simulation studies to
evaluate statistical methods", Stat. Med. 38:2074–2102, Table 6.

Examples
--------
>>> import numpy as np, pandas as pd
>>> import stochmm as sm
>>> d = pd.DataFrame({"g": np.repeat(np.arange(20), 5), "x": np.tile(np.linspace(-1, 1, 5), 20)})
>>> st = sm.accuracy_study("y ~ x + (1 | g)", d, {"beta": [1.0, 0.5], "sd(g)": 1.0, "sigma": 0.5},
...                        methods=("REML", "ML"), nsim=4, seed=1, n_jobs=1, progress=False)
>>> st.summary[["method", "parameter", "n"]].head(3)
  method    parameter  n
0   REML  (Intercept)  4
1   REML            x  4
2   REML        sd(g)  4
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import time
import uuid
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..builder.model import Model
from ..parallel import process_context
from ..results import unique_group_names
from .accuracy_methods import (
    StudyContext,
    StudyInputError,
    StudyMethod,
    methods_offering,
    parameter_names,
    parse_method,
    vc_layout,
)

__all__ = ["accuracy_study", "AccuracyStudy", "truth_to_parameters", "replicate_response", "summarize",
           "StudyInputError"]

_COLUMNS = ["replicate", "method", "parameter", "truth", "estimate", "se", "lower", "upper", "converged",
            "singular", "failed", "error", "warnings", "seconds"]
_META = "_study.json"


# =============================================================================================
# truth -> (β, θ, σ)
# =============================================================================================
@dataclass(frozen=True)
class TrueParameters:
    """The truth of a study: β, θ (relative to σ for Gaussian models), σ, and the reported values."""

    beta: np.ndarray
    theta: np.ndarray
    sigma: float | None
    names: tuple[str, ...]
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.values))


def _suggest(name: str, valid: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if not near:
        low = {v.lower(): v for v in valid}
        near = [low[name.lower()]] if name.lower() in low else []
    return f" Did you mean {near[0]!r}?" if near else ""


def _number(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StudyInputError(f"{what} must be a number, got {value!r}") from None
    if not np.isfinite(v):
        raise StudyInputError(f"{what} must be finite, got {v}")
    return v


def _chol_psd(S: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L Lᵀ = S for a positive semi-definite S (zero pivots give zero columns)."""
    k = S.shape[0]
    L = np.zeros_like(S)
    for j in range(k):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        if d <= 1e-14 * max(1.0, S[j, j]):
            continue
        L[j, j] = np.sqrt(d)
        for i in range(j + 1, k):
            L[i, j] = (S[i, j] - L[i, :j] @ L[j, :j]) / L[j, j]
    return L


def truth_to_parameters(model: Model, truth: Mapping[Any, Any]) -> TrueParameters:
    """truth_to_parameters(model, truth) -> TrueParameters

    Check a study's truth against the model and convert it to (β, θ, σ).

    ``truth`` holds ``"beta"`` (a dict by fixed-effect name or an array in model-matrix
    column order), each random-effect SD by its name (``"sd(g)"`` for an intercept,
    ``"sd(Subject:Days)"``, or the ``varcorr`` columns as a tuple ``("Subject", "Days")``), correlations
    (``"cor(Subject:(Intercept),Days)"`` or ``("Subject", "(Intercept)", "Days")``; 0 when
    not given) and ``"sigma"`` for Gaussian models. θ is Cholesky(Σ_j)/σ per term, in lme4's order.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> tp = truth_to_parameters(m, {"beta": [250, 10], "sd(Subject)": 25, "sd(Subject:Days)": 6,
    ...                              "cor(Subject:(Intercept),Days)": 0.0, "sigma": 25})
    >>> tp.theta.round(3).tolist()
    [1.0, 0.0, 0.24]
    """
    if not isinstance(truth, Mapping):
        raise StudyInputError(f"truth must be a dict ({{'beta': ..., 'sd(g)': ..., ...}}), got {type(truth).__name__}")
    gaussian = model.family_name == "gaussian"
    layout = vc_layout(model)
    vc_names = [v[0] for v in layout]
    by_tuple: dict[tuple, str] = {}
    gnames = unique_group_names([t.group for t in model.terms])
    for name, kind, j, a, b in layout:
        t, g = model.terms[j], gnames[j]
        by_tuple[(g, t.cnames[a]) if kind == "sd" else (g, t.cnames[a], t.cnames[b])] = name
        if kind == "sd":
            by_tuple[(g, t.cnames[a], None)] = name
            by_tuple.setdefault((f"sd({g}:{t.cnames[a]})",), name)  # sd(g:(Intercept)), sd(g.1:x)
    valid = ["beta"] + vc_names + (["sigma"] if gaussian else [])
    given: dict[str, float] = {}
    beta_raw = None
    for key, value in truth.items():
        if key == "beta":
            beta_raw = value
            continue
        if key == "sigma":
            if not gaussian:
                raise StudyInputError(f"a {model.family_name} model has no residual SD: remove 'sigma' from truth")
            given["sigma"] = _number(value, "truth['sigma']")
            continue
        name = None
        if isinstance(key, tuple):
            name = by_tuple.get(key)
        elif isinstance(key, str):
            name = key if key in vc_names else by_tuple.get((key,))
        if name is None:
            shown = key if isinstance(key, str) else str(key)
            raise StudyInputError(f"truth names {key!r}, which is not a parameter of {model.formula!r}."
                                  f"{_suggest(shown, valid)} Valid names: {', '.join(valid)}")
        if name in given:
            raise StudyInputError(f"truth gives {name!r} twice")
        given[name] = _number(value, f"truth[{key!r}]")
    # β
    if beta_raw is None:
        raise StudyInputError(f"truth needs 'beta': the fixed effects {', '.join(model.xnames)}")
    if isinstance(beta_raw, Mapping):
        unknown = [k for k in beta_raw if k not in model.xnames]
        if unknown:
            raise StudyInputError(f"truth['beta'] names {unknown[0]!r}, which is not a fixed effect of "
                                  f"{model.formula!r}.{_suggest(str(unknown[0]), model.xnames)} "
                                  f"Fixed effects: {', '.join(model.xnames)}")
        missing = [k for k in model.xnames if k not in beta_raw]
        if missing:
            raise StudyInputError(f"truth['beta'] lacks {', '.join(map(repr, missing))}; fixed effects: "
                                  f"{', '.join(model.xnames)}")
        beta = np.array([_number(beta_raw[k], f"truth['beta'][{k!r}]") for k in model.xnames])
    else:
        arr = np.asarray(beta_raw, dtype=object).ravel()
        if arr.size != model.p:
            raise StudyInputError(f"truth['beta'] has {arr.size} values; the model has {model.p} fixed effects "
                                  f"({', '.join(model.xnames)})")
        beta = np.array([_number(v, "truth['beta']") for v in arr])
    # SDs, correlations
    missing = [n for n, kind, *_ in layout if kind == "sd" and n not in given]
    if missing:
        raise StudyInputError(f"truth lacks the random-effect SD(s) {', '.join(map(repr, missing))}; "
                              f"parameters: {', '.join(valid)}")
    for n, kind, *_ in layout:
        v = given.get(n, 0.0)
        if kind == "sd" and v < 0:
            raise StudyInputError(f"truth[{n!r}] = {v}: a standard deviation cannot be negative")
        if kind == "cor" and not -1.0 <= v <= 1.0:
            raise StudyInputError(f"truth[{n!r}] = {v}: a correlation lies in [-1, 1]")
    sigma = None
    if gaussian:
        if "sigma" not in given:
            raise StudyInputError("truth needs 'sigma', the residual SD of the linear mixed model")
        sigma = given["sigma"]
        if sigma <= 0:
            raise StudyInputError(f"truth['sigma'] = {sigma}: the residual SD must be positive")
    scale = sigma if gaussian else 1.0
    thetas = []
    for j, t in enumerate(model.terms):
        sd = np.zeros(t.k)
        C = np.eye(t.k)
        for n, kind, jj, a, b in layout:
            if jj != j:
                continue
            if kind == "sd":
                sd[a] = given[n]
            else:
                C[a, b] = C[b, a] = given.get(n, 0.0)
        if t.k > 1 and np.linalg.eigvalsh(C).min() < -1e-10:
            pairs = ", ".join(f"{n}={given.get(n, 0.0)}" for n, kind, jj, *_ in layout if jj == j and kind == "cor")
            raise StudyInputError(f"the correlations of term {t.text or t.group} ({pairs}) do not form a valid "
                                  "correlation matrix (it is not positive semi-definite)")
        S = np.outer(sd, sd) * C
        L = _chol_psd(S) / scale
        thetas.append(np.array([L[r, c] for r, c in t.tril]))
    theta = np.concatenate(thetas)
    values = list(beta) + [given.get(n, 0.0) for n in vc_names] + ([sigma] if gaussian else [])
    return TrueParameters(beta, theta, sigma, tuple(parameter_names(model)), tuple(float(v) for v in values))


# =============================================================================================
# one replicate
# =============================================================================================
def _data_seed(seed: int, replicate: int) -> np.random.SeedSequence:
    """The response stream of a replicate: child 0 of ``SeedSequence(seed).spawn(nsim)[replicate]``
    (built directly; ``.spawn(2)`` of that sequence gives the same two children)."""
    return np.random.SeedSequence(seed, spawn_key=(replicate, 0))


def _method_seed(seed: int, replicate: int, label: str) -> int:
    """The integer seed of one method in one replicate: from child 1 of the replicate's sequence and
    the method's name (so neither the order nor the set of methods changes it)."""
    ss = np.random.SeedSequence(seed, spawn_key=(replicate, 1, zlib.crc32(label.encode())))
    return int(ss.generate_state(1, np.uint32)[0])


def replicate_response(model: Model, truth: TrueParameters, seed: int, replicate: int) -> np.ndarray:
    """replicate_response(model, truth, seed, replicate) -> ndarray (n,)

    The response of one replicate, drawn alone: exactly what replicate ``replicate`` of a study
    with this ``seed`` fits (its stream is ``SeedSequence(seed).spawn(nsim)[replicate]``).
    """
    rng = np.random.default_rng(_data_seed(seed, replicate))
    return model.simulate(truth.beta, truth.theta, truth.sigma, nsim=1, seed=rng)[:, 0]


@dataclass
class _Payload:
    """Everything a worker needs (sent once per worker)."""

    model: Model
    truth: TrueParameters
    seed: int
    context: StudyContext
    methods: dict[str, StudyMethod]
    options: dict[str, dict] = field(default_factory=dict)


def _run_tasks(payload: _Payload, tasks: Sequence[tuple[int, tuple[str, ...]]]) -> dict[str, list]:
    """Simulate and fit the replicates ``tasks`` = [(replicate, methods), ...]; columns of the tidy table."""
    from ..builder.families import get_family
    from ..deterministic.pirls import blas_threads
    from ..errors import ConvergenceWarning

    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    names, truth_vals = payload.truth.names, payload.truth.values
    npar = len(names)
    nan = np.full(npar, np.nan)

    def emit(rep, label, est, se, lo, hi, conv, sing, failed, err, warns, secs):
        cols["replicate"] += [rep] * npar
        cols["method"] += [label] * npar
        cols["parameter"] += names
        cols["truth"] += truth_vals
        cols["estimate"] += est.tolist()
        cols["se"] += se.tolist()
        cols["lower"] += lo.tolist()
        cols["upper"] += hi.tolist()
        cols["converged"] += [conv] * npar
        cols["singular"] += [sing] * npar
        cols["failed"] += [failed] * npar
        cols["error"] += [err] * npar
        cols["warnings"] += [warns] * npar
        cols["seconds"] += [secs] * npar

    model, truth = payload.model, payload.truth
    profiled = payload.context.interval == "profile"
    family = None if model.family_name == "gaussian" else get_family(model.family)  # resolved once
    with blas_threads(1):
        for rep, labels in tasks:
            try:
                y = model.simulate(truth.beta, truth.theta, truth.sigma, nsim=1, family=family,
                                   seed=np.random.default_rng(_data_seed(payload.seed, rep)))[:, 0]
                mi = model.with_response(y)
            except Exception as e:  # noqa: BLE001 - recorded, the study goes on
                for label in labels:
                    emit(rep, label, nan, nan, nan, nan, False, False, True,
                         f"simulation failed: {type(e).__name__}: {e}", "", np.nan)
                continue
            for label in labels:
                m = payload.methods[label]
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        fit = m.fit(mi, _method_seed(payload.seed, rep, label) if m.seeded else None,
                                    **payload.options.get(label, {}))
                        secs = time.perf_counter() - t0
                        r = m.read(fit, payload.context, caught)
                        if profiled:  # the profile is part of what the row cost
                            secs = time.perf_counter() - t0
                    except Exception as e:  # noqa: BLE001 - a failed fit is a result of the study
                        secs = time.perf_counter() - t0
                        emit(rep, label, nan, nan, nan, nan, False, False, True, f"{type(e).__name__}: {e}",
                             " | ".join(dict.fromkeys(str(w.message) for w in caught)), secs)
                        continue
                msgs = " | ".join(dict.fromkeys(str(w.message) for w in caught))
                conv = r.converged and not any(issubclass(w.category, ConvergenceWarning) for w in caught)
                emit(rep, label, r.estimate, r.se, r.lower, r.upper, bool(conv), bool(r.singular), False, "",
                     msgs, secs)
    return cols


# worker-side state for the local process pool (the payload is sent once per process)
_WORKER_PAYLOAD: _Payload | None = None


def _init_worker(payload: _Payload) -> None:
    global _WORKER_PAYLOAD
    _WORKER_PAYLOAD = payload


def _run_in_worker(tasks):
    assert _WORKER_PAYLOAD is not None
    return _run_tasks(_WORKER_PAYLOAD, tasks)


# =============================================================================================
# summary
# =============================================================================================
def summarize(replicates: pd.DataFrame, level: float = 0.95, scale: str = "sd") -> pd.DataFrame:
    """summarize(replicates, level=0.95, scale="sd") -> DataFrame

    Summary per method × parameter of a per-replicate table (see :class:`AccuracyStudy`).

    Columns: ``truth``; ``n`` (fits that returned); ``mean``; ``bias`` = mean − truth and
    ``bias_mcse`` = SD/√n; ``rel_bias`` = bias/truth (NaN when the truth is 0); ``rmse`` and
    ``rmse_mcse``; ``emp_se`` (SD of the estimates) and ``mean_se`` (mean reported SE);
    ``coverage`` (share of intervals that contain the truth, among fits with an interval),
    ``coverage_mcse`` = √(c(1 − c)/n_cov) and ``n_cov``; ``fail_rate``, ``singular_rate``,
    ``nonconverged_rate`` (over all replicates) and ``median_seconds`` per fit.

    ``scale="variance"`` reports variances instead of SDs (``var(g)``, ``sigma^2``): estimates
    and truths squared, SEs by the delta method, interval ends squared (the lower end at 0 when
    the SD interval reaches below 0, so coverage is unchanged); correlations stay.
    """
    if scale not in ("sd", "variance"):
        raise StudyInputError(f"scale is 'sd' or 'variance', not {scale!r}")
    df = replicates
    if scale == "variance":
        df = _to_variance(df)
    order_m = list(dict.fromkeys(df["method"]))
    order_p = list(dict.fromkeys(df["parameter"]))
    ok = ~df["failed"].to_numpy()
    est = df["estimate"].to_numpy(dtype=float)
    tru = df["truth"].to_numpy(dtype=float)
    lo, hi = df["lower"].to_numpy(dtype=float), df["upper"].to_numpy(dtype=float)
    has_ci = ok & np.isfinite(lo) & np.isfinite(hi)
    work = pd.DataFrame({
        "method": df["method"], "parameter": df["parameter"], "truth": tru,
        "ok": ok, "est": np.where(ok, est, np.nan), "err": np.where(ok, est - tru, np.nan),
        "sq": np.where(ok, (est - tru) ** 2, np.nan), "se": np.where(ok, df["se"].to_numpy(dtype=float), np.nan),
        "has_ci": has_ci, "cover": np.where(has_ci, (lo <= tru) & (tru <= hi), np.nan),
        "failed": ~ok, "singular": df["singular"].to_numpy(dtype=bool) & ok,
        "nonconv": ~df["converged"].to_numpy(dtype=bool) & ok, "seconds": df["seconds"].to_numpy(dtype=float),
    })
    g = work.groupby(["method", "parameter"], sort=False)
    out = pd.DataFrame({
        "truth": g["truth"].first(),
        "n": g["ok"].sum().astype(int),
        "mean": g["est"].mean(),
        "sd": g["est"].std(ddof=1),
        "bias": g["err"].mean(),
        "mse": g["sq"].mean(),
        "sq_sd": g["sq"].std(ddof=1),
        "mean_se": g["se"].mean(),
        "coverage": g["cover"].mean(),
        "n_cov": g["has_ci"].sum().astype(int),
        "fail_rate": g["failed"].mean(),
        "singular_rate": g["singular"].mean(),
        "nonconverged_rate": g["nonconv"].mean(),
        "median_seconds": g["seconds"].median(),
    }).reset_index()
    n = out["n"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["bias_mcse"] = out["sd"] / np.sqrt(n)
        truth = out["truth"].to_numpy(dtype=float)
        out["rel_bias"] = np.where(truth != 0, out["bias"] / truth, np.nan)
        out["rmse"] = np.sqrt(out["mse"])
        # MCSE of RMSE: delta method on MSE, whose MCSE is SD((θ̂ − θ)²)/√n (Morris et al. 2019)
        out["rmse_mcse"] = out["sq_sd"] / np.sqrt(n) / (2 * out["rmse"])
        c = out["coverage"].to_numpy(dtype=float)
        out["coverage_mcse"] = np.sqrt(c * (1 - c) / out["n_cov"].to_numpy(dtype=float))
    out["emp_se"] = out["sd"]
    out["method"] = pd.Categorical(out["method"], order_m, ordered=True)
    out["parameter"] = pd.Categorical(out["parameter"], order_p, ordered=True)
    out = out.sort_values(["method", "parameter"]).reset_index(drop=True)
    out["method"] = out["method"].astype(str)
    out["parameter"] = out["parameter"].astype(str)
    cols = ["method", "parameter", "truth", "n", "mean", "bias", "bias_mcse", "rel_bias", "rmse", "rmse_mcse",
            "emp_se", "mean_se", "coverage", "coverage_mcse", "n_cov", "fail_rate", "singular_rate",
            "nonconverged_rate", "median_seconds"]
    out = out[cols]
    out.attrs["level"] = level
    out.attrs["scale"] = scale
    return out


def _to_variance(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    p = df["parameter"].astype(str)
    is_sd = p.str.startswith("sd(").to_numpy() | (p == "sigma").to_numpy()
    if not is_sd.any():
        return df
    est, se = df["estimate"].to_numpy(dtype=float), df["se"].to_numpy(dtype=float)
    lo, hi = df["lower"].to_numpy(dtype=float), df["upper"].to_numpy(dtype=float)
    df.loc[is_sd, "truth"] = df.loc[is_sd, "truth"].to_numpy(dtype=float) ** 2
    df.loc[is_sd, "estimate"] = est[is_sd] ** 2
    df.loc[is_sd, "se"] = 2 * np.abs(est[is_sd]) * se[is_sd]
    lo2 = np.where(hi < 0, np.nan, np.maximum(lo, 0.0) ** 2)  # an interval wholly below 0 covers no variance
    df.loc[is_sd, "lower"] = np.where(hi[is_sd] < 0, 1.0, lo2[is_sd])
    df.loc[is_sd, "upper"] = np.where(hi[is_sd] < 0, 0.0, hi[is_sd] ** 2)
    names = p.to_numpy().copy()
    names[is_sd] = [("sigma^2" if n == "sigma" else "var(" + n[3:]) for n in names[is_sd]]
    df["parameter"] = names
    return df


# =============================================================================================
# the study
# =============================================================================================
@dataclass
class AccuracyStudy:
    """Result of :func:`accuracy_study`.

    Attributes
    ----------
    replicates : pandas.DataFrame
        One row per replicate × method × parameter: ``replicate``, ``method``, ``parameter``,
        ``truth``, ``estimate``, ``se``, ``lower``/``upper`` (the method's interval at
        ``level``), ``converged``, ``singular``, ``failed``, ``error`` (the message of a fit that
        raised), ``warnings`` (those the fit issued, joined by `` | ``) and ``seconds`` (the fit;
        with ``interval="profile"`` the fit and its profile).
        Sorted by replicate, method (as given) and parameter (model order).
    summary : pandas.DataFrame
        :func:`summarize` of ``replicates`` (SD scale); ``summarize(st.replicates, scale="variance")``
        gives variances.
    truth : dict
        The true values by parameter name.
    model : Model
        The design (the response is replaced in every replicate).
    methods, seed, nsim, level, interval, checkpoint
        As called.
    seconds : float
        Wall time of the call; ``timing`` splits it into ``setup_s`` (model, checks, checkpoint),
        ``run_s`` (the replicates) and ``tables_s`` (ordering and summary).
    n_run : int
        Replicates fitted by this call (the rest came from the checkpoint).
    """

    replicates: pd.DataFrame
    summary: pd.DataFrame
    truth: dict[str, float]
    model: Model
    methods: tuple[str, ...]
    seed: int
    nsim: int
    level: float
    interval: str
    seconds: float
    checkpoint: str | None = None
    n_run: int = 0
    timing: dict[str, float] = field(default_factory=dict)

    def summarize(self, scale: str = "sd") -> pd.DataFrame:
        """summarize(scale="sd") -> DataFrame — the summary on the SD or variance scale (see :func:`summarize`)."""
        return summarize(self.replicates, self.level, scale)

    def plot(self, parameters: Sequence[str] | None = None, scale: str = "sd"):
        """plot(parameters=None, scale="sd") -> matplotlib Figure — :func:`stochmm.plots.bias_coverage`."""
        from ..plots.accuracy import bias_coverage

        return bias_coverage(self.summarize(scale), parameters=parameters)

    def __repr__(self) -> str:
        cols = ["method", "parameter", "truth", "bias", "bias_mcse", "rmse", "coverage", "coverage_mcse",
                "fail_rate", "median_seconds"]
        with pd.option_context("display.width", 140, "display.max_columns", 20):
            tab = self.summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
        return (f"Accuracy study: {self.model.formula} ({self.model.family_name}), n = {self.model.n}, "
                f"nsim = {self.nsim}, seed = {self.seed}, {self.level:.0%} {self.interval} intervals\n{tab}")


def _design_hash(model: Model) -> str:
    h = hashlib.sha1()
    for a in (model.X, model.Z.indices, model.Z.indptr, model.Z.data, model.weights, model.offset):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _read_checkpoint(path: Path, meta: dict) -> pd.DataFrame | None:
    mfile = path / _META
    if not mfile.exists():
        if path.exists() and any(path.glob("*.parquet")):
            raise StudyInputError(f"checkpoint {str(path)!r} holds parquet files but no {_META}: not a study "
                                  "checkpoint")
        return None
    old = json.loads(mfile.read_text())
    diff = [k for k in meta if old.get(k) != meta[k]]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {meta[k]!r} now" for k in diff)
        raise StudyInputError(f"checkpoint {str(path)!r} belongs to another study ({shown}); use a new path")
    parts = sorted(path.glob("part-*.parquet"))
    if not parts:
        return None
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def _order(df: pd.DataFrame, methods: Sequence[str], params: Sequence[str]) -> pd.DataFrame:
    mpos = {m: i for i, m in enumerate(methods)}
    ppos = {p: i for i, p in enumerate(params)}
    key = (df["replicate"].to_numpy(dtype=np.int64) * (len(methods) + 1) + df["method"].map(mpos).to_numpy()) \
        * (len(params) + 1) + df["parameter"].map(ppos).to_numpy()
    return df.iloc[np.argsort(key, kind="stable")].reset_index(drop=True)


_DTYPES = {"replicate": np.int64, "converged": bool, "singular": bool, "failed": bool, "truth": float,
           "estimate": float, "se": float, "lower": float, "upper": float, "seconds": float}


def _frame(cols: dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame({c: np.asarray(cols[c], dtype=_DTYPES.get(c, object)) for c in _COLUMNS})


def _chunks(tasks: list, size: int) -> Iterable[list]:
    for i in range(0, len(tasks), size):
        yield tasks[i : i + size]


def _progress_bar(total: int, progress: bool):
    from tqdm import tqdm

    # progress=True: a bar on a terminal, quiet otherwise (tqdm's disable=None); False: never
    return tqdm(total=total, desc="replicates", unit="rep", disable=None if progress else True, leave=False,
                file=sys.stderr)


def accuracy_study(formula: str, data: pd.DataFrame, truth: Mapping[Any, Any], family: Any = None, *,
                   methods: Sequence[str] | None = None, nsim: int = 200, seed: int | None = 0, level: float = 0.95,
                   interval: str = "auto", client: Any = None, n_jobs: int | None = None,
                   chunksize: int | None = None, checkpoint: str | os.PathLike | None = None,
                   progress: bool = True, method_options: Mapping[str, Mapping[str, Any]] | None = None,
                   weights: Any = None, offset: Any = None) -> AccuracyStudy:
    """accuracy_study(formula, data, truth, family=None, *, methods=None, nsim=200, seed=0, level=0.95, interval="auto", client=None, n_jobs=None, chunksize=None, checkpoint=None, progress=True, method_options=None, weights=None, offset=None) -> AccuracyStudy

    Simulate responses from a design at known parameters, fit every replicate by every
    method, and report how each method's estimates and intervals behave.

    Parameters
    ----------
    formula : str
        lme4-style formula, e.g. ``"y ~ x + (1 | g)"``.
    data : pandas.DataFrame
        The design: covariates and grouping factors as in the real data. The response column
        may be absent (a placeholder is used; it is replaced in every replicate). Not modified.
    truth : dict
        ``"beta"`` (dict by name or array), every random-effect SD by its name (``"sd(g)"``,
        ``"sd(Subject:Days)"``, or the ``varcorr`` columns as a tuple ``("Subject", "Days")``),
        correlations (``"cor(Subject:(Intercept),Days)"``; 0 when omitted), and ``"sigma"``
        for Gaussian models. See :func:`truth_to_parameters`.
    family : str or Family, optional
        As for :class:`~stochmm.builder.model.Model` (``None``: Gaussian).
    methods : sequence of str, optional
        From the method table (:mod:`stochmm.stochastic.accuracy_methods`): GLMMs ``"laplace"``,
        ``"agq:K"`` (K quadrature nodes), ``"fast"`` (nAGQ = 0), ``"is"`` or ``"is:D"`` (Monte Carlo
        ML by importance sampling, D draws; ``Model.fit(method="is")``); linear mixed models
        ``"REML"``, ``"ML"``; any model ``"nuts"`` (the posterior by NUTS, ``Model.sample``:
        posterior means, SDs and intervals). Default: ``("laplace", "agq:9")`` for GLMMs,
        ``("REML", "ML")`` for LMMs. Stochastic methods get their own seed per replicate, from the
        replicate's stream and the method's name.
    nsim : int
        Number of replicates (≥ 1).
    seed : int, optional
        Replicate ``i`` uses ``SeedSequence(seed).spawn(nsim)[i]`` (:func:`replicate_response`
        redraws it alone). ``None`` draws a fresh seed (recorded in the result).
    level : float
        Nominal level of the intervals.
    interval : {"auto", "wald", "profile", "posterior"}
        ``"auto"``: each method's own interval (Wald, estimate ± z·SE, for ML/REML/IS fits;
        equal-tailed posterior quantiles for NUTS); ``"wald"``: estimate ± z·SE for every method
        (NUTS: posterior mean ± z·posterior SD); ``"posterior"``: quantile intervals (NUTS only).
        Wald intervals for SDs and correlations exist where the fit has a Hessian in θ (GLMMs
        with nAGQ ≥ 1 and IS, delta method); elsewhere (LMM variance components, nAGQ = 0,
        parameters on a bound) the interval is NaN, as in lme4's ``confint(method = "Wald")``.
        ``"profile"``: profile-likelihood intervals of every parameter (β, SDs, correlations, σ),
        as ``fit.confint(method="profile")`` on each replicate's fit
        (:func:`~stochmm.stochastic.accuracy_methods.profile_interval`); offered by ``"laplace"``,
        ``"REML"`` and ``"ML"`` (REML fits are profiled on the ML deviance, as lme4 does, so
        their intervals are ML's). Profiling is not defined for ``"agq:K"``, ``"fast"``, ``"is"``
        and ``"nuts"``: a study listing any of them with ``interval="profile"`` is refused up
        front (an error naming the methods that offer it), never silently given another kind
        of interval. A replicate whose profile fails is recorded as failed with the message; its
        ``seconds`` include the profiling. Estimates and SEs are those of the fit, whatever the interval.
    client : dask.distributed.Client, optional
        Run the replicates on this cluster (the design is sent once to each worker).
    n_jobs : int, optional
        Local processes when no client is given (default: the CPUs available); 1 runs in this process.
    chunksize : int, optional
        Replicates per task (default: about 8 tasks per worker, at most 50 replicates).
    checkpoint : path, optional
        A directory of parquet parts written as tasks finish. Calling again with the same
        study (formula, design, truth, seed, level, interval) skips the (replicate, method)
        pairs already there, so a killed study resumes; a larger ``nsim`` extends it.
    progress : bool
        A progress bar over replicates (shown on a terminal only).
    method_options : dict, optional
        Keyword arguments for a method's fit, by method name: ``{"laplace": {"optimizer": "bobyqa"}}``,
        ``{"nuts": {"draws": 500, "warmup": 500, "chains": 2}}``, ``{"is": {"draws": 2000}}``.
    weights, offset : optional
        As for :class:`~stochmm.builder.model.Model`.

    Returns
    -------
    AccuracyStudy
        ``.replicates`` (tidy, per replicate × method × parameter), ``.summary`` (per method ×
        parameter), ``.plot()``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> import stochmm as sm
    >>> rng = np.random.default_rng(0)
    >>> d = pd.DataFrame({"g": np.repeat(np.arange(30), 4), "x": rng.standard_normal(120)})
    >>> st = sm.accuracy_study("y ~ x + (1 | g)", d, {"beta": {"(Intercept)": -0.5, "x": 1.0}, "sd(g)": 1.0},
    ...                        family="binomial", methods=("laplace", "agq:9"), nsim=3, n_jobs=1, progress=False)
    >>> st.replicates.shape, sorted(st.summary["method"].unique())
    ((18, 14), ['agq:9', 'laplace'])
    """
    t_start = time.perf_counter()
    # ------------------------------------------------------------------ validation
    if not isinstance(nsim, (int, np.integer)) or isinstance(nsim, bool):
        raise StudyInputError(f"nsim must be an integer, got {nsim!r}")
    if nsim < 1:
        raise StudyInputError(f"nsim must be at least 1, got {nsim}")
    nsim = int(nsim)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise StudyInputError(f"seed must be a non-negative integer (or None), got {seed!r}")
    seed = int(seed)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise StudyInputError(f"level must be a number in (0, 1), got {level!r}")
    level = float(level)
    if not isinstance(progress, bool):
        raise StudyInputError(f"progress must be True or False, got {progress!r}")
    if n_jobs is not None and (not isinstance(n_jobs, (int, np.integer)) or isinstance(n_jobs, bool) or n_jobs < 1):
        raise StudyInputError(f"n_jobs must be a positive integer, got {n_jobs!r}")
    if chunksize is not None and (not isinstance(chunksize, (int, np.integer)) or chunksize < 1):
        raise StudyInputError(f"chunksize must be a positive integer, got {chunksize!r}")
    if client is not None and not (hasattr(client, "submit") and hasattr(client, "scatter")):
        raise StudyInputError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    if not isinstance(formula, str):
        raise StudyInputError(f"formula must be a string, got {type(formula).__name__}")
    if not isinstance(data, pd.DataFrame):
        raise StudyInputError(f"data must be a pandas DataFrame (the design), got {type(data).__name__}")
    model = _build_model(formula, data, family, weights, offset)
    if methods is None:
        methods = ("REML", "ML") if model.family_name == "gaussian" else ("laplace", "agq:9")
    if isinstance(methods, str) or not isinstance(methods, Sequence) or len(methods) == 0:
        raise StudyInputError(f"methods must be a non-empty sequence of method names, got {methods!r}")
    table: dict[str, StudyMethod] = {}
    for name in methods:
        m = parse_method(name, model.family_name)
        if m.label in table:
            raise StudyInputError(f"method {m.label!r} is listed twice")
        table[m.label] = m
    labels = tuple(table)
    if interval not in ("auto", "wald", "profile", "posterior"):
        near = difflib.get_close_matches(str(interval), ["auto", "wald", "profile", "posterior"], n=1, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise StudyInputError(f"interval is 'auto', 'wald', 'profile' or 'posterior', not {interval!r}.{hint}")
    if interval != "auto":
        lacking = [lab for lab, m in table.items() if interval not in m.intervals]
        if lacking:
            offering = methods_offering(interval, model.family_name)
            raise StudyInputError(f"interval={interval!r} is not available for method(s) "
                                  + ", ".join(f"{lab!r} (offers {', '.join(table[lab].intervals)})" for lab in lacking)
                                  + f"; methods of a {model.family_name} model that offer it: "
                                  + (", ".join(offering) if offering else "none")
                                  + ". Run those methods in a study of their own")
    options: dict[str, dict] = {}
    for key, opts in (method_options or {}).items():
        lab = parse_method(key, model.family_name).label
        if lab not in table:
            raise StudyInputError(f"method_options names {key!r}, which is not among the methods ({', '.join(labels)})")
        if not isinstance(opts, Mapping):
            raise StudyInputError(f"method_options[{key!r}] must be a dict of keyword arguments")
        options[lab] = dict(opts)
    tp = truth_to_parameters(model, truth)
    interval_label = interval
    payload = _Payload(model, tp, seed, StudyContext.build(model, level, interval), table, options)
    # ------------------------------------------------------------------ checkpoint
    done: pd.DataFrame | None = None
    path = None
    if checkpoint is not None:
        path = Path(checkpoint)
        meta = {"formula": model.formula, "family": model.family_name, "design": _design_hash(model),
                "truth": tp.as_dict(), "seed": seed, "level": level, "interval": interval,
                "method_options": {k: repr(sorted(v.items())) for k, v in options.items()}}
        done = _read_checkpoint(path, meta)
        path.mkdir(parents=True, exist_ok=True)
        (path / _META).write_text(json.dumps(meta, indent=1))
    have: set[tuple[int, str]] = set()
    frames = []
    if done is not None:
        keep = done[(done["replicate"] < nsim) & done["method"].isin(labels)]
        frames.append(keep)
        have = set(zip(keep["replicate"].tolist(), keep["method"].tolist()))
    tasks = []
    for rep in range(nsim):
        todo = tuple(lab for lab in labels if (rep, lab) not in have)
        if todo:
            tasks.append((rep, todo))
    # ------------------------------------------------------------------ run
    t_run = time.perf_counter()
    if tasks:
        frames.extend(_execute(payload, tasks, client, n_jobs, chunksize, path, progress))
    t_tables = time.perf_counter()
    reps = pd.concat(frames, ignore_index=True) if frames else _frame({c: [] for c in _COLUMNS})
    reps = _order(reps, labels, tp.names)
    summary = summarize(reps, level)
    t_end = time.perf_counter()
    timing = {"setup_s": t_run - t_start, "run_s": t_tables - t_run, "tables_s": t_end - t_tables}
    return AccuracyStudy(replicates=reps, summary=summary, truth=tp.as_dict(), model=model,
                         methods=labels, seed=seed, nsim=nsim, level=level, interval=interval_label,
                         seconds=t_end - t_start, checkpoint=None if path is None else str(path),
                         n_run=len(tasks), timing=timing)


def _build_model(formula: str, data: pd.DataFrame, family: Any, weights: Any, offset: Any) -> Model:
    """The Model of the design; a response variable absent from ``data`` gets a placeholder column."""
    from ..builder.formula import parse_formula

    resp = parse_formula(formula).response
    if isinstance(resp, str) and resp.isidentifier() and resp not in data.columns:
        # any valid response will do: every replicate replaces it (Model.with_response)
        data = data.assign(**{resp: np.tile([0.0, 1.0], len(data) // 2 + 1)[: len(data)]})
    return Model(formula, data, family=family, weights=weights, offset=offset)


def _execute(payload: _Payload, tasks: list, client: Any, n_jobs: int | None, chunksize: int | None,
             path: Path | None, progress: bool) -> list[pd.DataFrame]:
    """Run the tasks serially, in local processes or on Dask; stream chunks back (and to the checkpoint)."""
    if client is not None:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
    else:
        avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = n_jobs or avail
        workers = min(workers, len(tasks))
    size = chunksize or max(1, min(50, -(-len(tasks) // (8 * workers))))
    chunks = list(_chunks(tasks, size))
    frames: list[pd.DataFrame] = []
    bar = None

    def collect(cols: dict[str, list], n: int) -> None:
        df = _frame(cols)
        frames.append(df)
        if path is not None:  # one part per finished chunk, written atomically
            tmp = path / f".tmp-{uuid.uuid4().hex}.parquet"
            df.to_parquet(tmp, index=False)
            reps = df["replicate"]
            os.replace(tmp, path / f"part-{reps.min():07d}-{reps.max():07d}-{uuid.uuid4().hex[:8]}.parquet")
        bar.update(n)

    try:
        if client is not None:
            from distributed import as_completed

            pf = client.scatter(payload, broadcast=True, hash=False)
            futs = {client.submit(_run_tasks, pf, ch, pure=False): len(ch) for ch in chunks}
            bar = _progress_bar(len(tasks), progress)
            try:
                for fut in as_completed(futs):
                    collect(fut.result(), futs[fut])
            except BaseException:  # a lost worker, Ctrl-C: what finished is kept (checkpoint), the rest cancelled
                client.cancel(list(futs))
                raise
        elif workers <= 1:
            bar = _progress_bar(len(tasks), progress)
            for ch in chunks:
                collect(_run_tasks(payload, ch), len(ch))
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # the workers start before the progress bar's thread exists
            with ProcessPoolExecutor(workers, mp_context=process_context(), initializer=_init_worker,
                                     initargs=(payload,)) as ex:
                futs = {ex.submit(_run_in_worker, ch): len(ch) for ch in chunks}
                bar = _progress_bar(len(tasks), progress)
                try:
                    for fut in as_completed(futs):
                        collect(fut.result(), futs[fut])
                except BaseException:
                    ex.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        if bar is not None:
            bar.close()
    return frames
