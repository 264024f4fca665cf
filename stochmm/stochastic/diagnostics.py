"""MCMC diagnostics: rank-normalised split R-hat, bulk and tail ESS, MCSE, divergences, E-BFMI, tree depth.

R-hat and the effective sample sizes are those of Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021).
The parameter table (:func:`param_table`) takes them from ArviZ (``az.rhat``, ``az.ess``; the same call on
ArviZ 0.23 and ≥ 1.0). The screening of every random effect (thousands of them on InstEval) uses the
vectorised versions here (:func:`rhat`, :func:`ess_bulk`, :func:`ess_tail`: split, rank-normalised chains,
NumPyro's Geyer-truncated autocorrelation ESS), which agree with ArviZ to within 1 %.

:func:`diagnose` returns a tidy table and warns, naming the parameter and the number, when R-hat > 1.01,
bulk ESS < 400, any transition diverged, E-BFMI < 0.3 or the tree depth saturated.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["SamplerWarning", "rhat", "ess_bulk", "ess_tail", "ess_mean", "diagnose", "chain_table",
           "RHAT_MAX", "ESS_MIN", "EBFMI_MIN"]

RHAT_MAX = 1.01
ESS_MIN = 400
EBFMI_MIN = 0.3


class SamplerWarning(UserWarning):
    """The sampler's output fails a convergence or efficiency check (R-hat, ESS, divergences, E-BFMI)."""


def _split(x: np.ndarray) -> np.ndarray:
    """(chains, draws, ...) -> (2·chains, draws // 2, ...): each chain cut in halves."""
    c, n = x.shape[:2]
    h = n // 2
    return np.concatenate([x[:, :h], x[:, n - h:]], axis=0)


def _z_ranks(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtri
    from scipy.stats import rankdata

    c, n = x.shape[:2]
    flat = x.reshape(c * n, -1)
    r = rankdata(flat, axis=0)
    return ndtri((r - 0.375) / (c * n + 0.25)).reshape(x.shape)


def _constant(flat: np.ndarray) -> np.ndarray:
    """Columns of (chains, draws, P) that do not vary (up to rounding): no R-hat or ESS there."""
    c, n = flat.shape[:2]
    f = flat.reshape(c * n, -1)
    return np.ptp(f, axis=0) <= 1e-12 * np.maximum(np.max(np.abs(f), axis=0), 1e-300)


def _ess(x: np.ndarray) -> np.ndarray:
    from numpyro.diagnostics import effective_sample_size

    c, n = x.shape[:2]
    flat = x.reshape(c, n, -1)
    const = _constant(flat)
    with np.errstate(all="ignore"):
        out = np.asarray(effective_sample_size(flat), dtype=float)
    out[const] = np.nan
    return out.reshape(x.shape[2:])


def _gr(x: np.ndarray) -> np.ndarray:
    from numpyro.diagnostics import gelman_rubin

    c, n = x.shape[:2]
    flat = x.reshape(c, n, -1)
    with np.errstate(all="ignore"):
        out = np.asarray(gelman_rubin(flat), dtype=float)
    out[_constant(flat)] = np.nan
    return out.reshape(x.shape[2:])


def rhat(x: np.ndarray) -> np.ndarray:
    """rhat(x) -> ndarray

    Rank-normalised split R-hat (the larger of the bulk and folded versions) of draws ``x`` shaped
    (chains, draws, ...).

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((4, 500))
    >>> bool(rhat(x) < 1.01)
    True
    """
    x = np.asarray(x, dtype=float)
    s = _split(x)
    folded = np.abs(s - np.median(s.reshape(-1, *s.shape[2:]), axis=0))
    return np.fmax(_gr(_z_ranks(s)), _gr(_z_ranks(folded)))


def ess_bulk(x: np.ndarray) -> np.ndarray:
    """ess_bulk(x) -> ndarray — bulk effective sample size (rank-normalised split chains)."""
    return _ess(_z_ranks(_split(np.asarray(x, dtype=float))))


def ess_tail(x: np.ndarray) -> np.ndarray:
    """ess_tail(x) -> ndarray — tail ESS: the smaller ESS of the 5 % and 95 % quantile indicators."""
    s = _split(np.asarray(x, dtype=float))
    flat = s.reshape(-1, *s.shape[2:])
    lo, hi = np.quantile(flat, 0.05, axis=0), np.quantile(flat, 0.95, axis=0)
    return np.fmin(_ess((s <= lo).astype(float)), _ess((s <= hi).astype(float)))


def ess_mean(x: np.ndarray) -> np.ndarray:
    """ess_mean(x) -> ndarray — ESS of the mean (split chains, no rank transform): for the MCSE of the mean."""
    return _ess(_split(np.asarray(x, dtype=float)))


def param_table(draws: dict[str, np.ndarray], fast: bool = False) -> pd.DataFrame:
    """param_table(draws, fast=False) -> DataFrame

    Posterior summary of scalar parameters given as name -> (chains, draws) arrays: mean, median, SD,
    2.5 % and 97.5 % quantiles, MCSE of the mean, bulk and tail ESS, R-hat (ArviZ's; ``fast=True``: the
    vectorised versions of this module, for thousands of parameters).
    """
    names = list(draws)
    if not names:
        return pd.DataFrame(columns=["mean", "median", "sd", "2.5%", "97.5%", "mcse_mean", "ess_bulk", "ess_tail",
                                     "r_hat"])
    x = np.stack([np.asarray(draws[k], dtype=float) for k in names], axis=-1)  # (C, N, P)
    flat = x.reshape(-1, x.shape[-1])
    sd = flat.std(axis=0, ddof=1)
    if fast:
        em, eb, et, rh = ess_mean(x), ess_bulk(x), ess_tail(x), rhat(x)
    else:
        em, eb, et, rh = _arviz(x)
    with np.errstate(all="ignore"):
        mcse = sd / np.sqrt(em)
    return pd.DataFrame({
        "mean": flat.mean(0), "median": np.median(flat, 0), "sd": sd,
        "2.5%": np.quantile(flat, 0.025, 0), "97.5%": np.quantile(flat, 0.975, 0),
        "mcse_mean": mcse, "ess_bulk": eb, "ess_tail": et, "r_hat": rh,
    }, index=pd.Index(names, name="parameter"))


def _arviz(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ESS of the mean, bulk ESS, tail ESS, R-hat) from ArviZ, for (chains, draws, P) draws."""
    import arviz as az
    import xarray as xr

    const = _constant(x)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        ds = xr.Dataset({"x": (("chain", "draw", "p"), x)})
        out = [np.asarray(az.ess(ds, method=m)["x"].values, dtype=float) for m in ("mean", "bulk", "tail")]
        out.append(np.asarray(az.rhat(ds)["x"].values, dtype=float))
    for a in out:
        a[const] = np.nan
    return tuple(out)


def chain_table(stats: dict[str, np.ndarray], max_tree_depth: int = 10) -> pd.DataFrame:
    """chain_table(stats, max_tree_depth=10) -> DataFrame

    Per chain: divergences, E-BFMI, mean tree depth, transitions at the maximum tree depth, step size,
    mean number of leapfrog steps. ``stats`` holds (chains, draws) arrays ``diverging``, ``energy``,
    ``n_steps`` and ``step_size``.
    """
    e = np.asarray(stats["energy"], dtype=float)
    with np.errstate(all="ignore"):
        ebfmi = np.sum(np.diff(e, axis=1) ** 2, axis=1) / np.sum((e - e.mean(1, keepdims=True)) ** 2, axis=1)
    steps = np.asarray(stats["n_steps"], dtype=float)
    depth = np.ceil(np.log2(steps + 1))
    return pd.DataFrame({
        "divergences": np.asarray(stats["diverging"]).sum(1).astype(int),
        "ebfmi": ebfmi,
        "mean_tree_depth": depth.mean(1),
        "max_depth_hits": (depth >= max_tree_depth).sum(1).astype(int),
        "step_size": np.asarray(stats["step_size"], dtype=float).mean(1),
        "mean_leapfrog": steps.mean(1),
    }, index=pd.Index(range(e.shape[0]), name="chain"))


def check(table: pd.DataFrame, chains: pd.DataFrame | None, *, extra_rhat: dict[str, float] | None = None,
          extra_ess: dict[str, float] | None = None, max_tree_depth: int = 10) -> list[str]:
    """check(table, chains, ...) -> list of messages (R-hat, bulk ESS, divergences, E-BFMI, tree depth)."""
    msgs = []
    bad = table["r_hat"][table["r_hat"] > RHAT_MAX]
    for nm, v in bad.items():
        msgs.append(f"R-hat of {nm} is {v:.3f} (> {RHAT_MAX}): chains have not mixed; run longer or reparameterise")
    low = table["ess_bulk"][table["ess_bulk"] < ESS_MIN]
    for nm, v in low.items():
        msgs.append(f"bulk ESS of {nm} is {v:.0f} (< {ESS_MIN}): posterior means and quantiles are unreliable; "
                    "draw more")
    if extra_rhat:
        msgs.append(f"R-hat > {RHAT_MAX} for {len(extra_rhat)} random effects (worst: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in sorted(extra_rhat.items(), key=lambda kv: -kv[1])[:3]) + ")")
    if extra_ess:
        msgs.append(f"bulk ESS < {ESS_MIN} for {len(extra_ess)} random effects (lowest: "
                    + ", ".join(f"{k} {v:.0f}" for k, v in sorted(extra_ess.items(), key=lambda kv: kv[1])[:3]) + ")")
    if chains is not None:
        nd = int(chains["divergences"].sum())
        if nd:
            per = ", ".join(f"chain {c}: {int(v)}" for c, v in chains["divergences"].items() if v)
            msgs.append(f"{nd} divergent transitions after warm-up ({per}): the posterior has regions the "
                        "sampler cannot explore; raise target_accept_prob (e.g. 0.95) or reparameterise")
        for c, v in chains["ebfmi"].items():
            if np.isfinite(v) and v < EBFMI_MIN:
                msgs.append(f"E-BFMI of chain {c} is {v:.3f} (< {EBFMI_MIN}): the momentum resampling explores "
                            "the energy poorly")
        hits = int(chains["max_depth_hits"].sum())
        if hits:
            msgs.append(f"{hits} transitions hit the maximum tree depth {max_tree_depth}: raise max_tree_depth")
    return msgs


def diagnose(obj: Any, *, ranef: bool = False, warn: bool = True) -> pd.DataFrame:
    """diagnose(obj, *, ranef=False, warn=True) -> DataFrame

    Convergence diagnostics of a :class:`~stochmm.stochastic.posterior.PosteriorResults` (or of its
    ``idata``): one row per parameter (fixed effects, SDs, correlations, σ; with ``ranef=True`` every random
    effect too) with R-hat, bulk and tail ESS and the MCSE of the mean; the per-chain sampler table
    (divergences, E-BFMI, tree depth, step size) is in ``table.attrs["chains"]`` and the messages in
    ``table.attrs["warnings"]``. Warns (:class:`SamplerWarning`) naming the parameter and the number whenever
    R-hat > 1.01, bulk ESS < 400, a transition diverged, E-BFMI < 0.3 or the tree depth saturated.

    Examples
    --------
    >>> import stochmm as sm  # doctest: +SKIP
    >>> post = sm.sample("cbind(incidence, size - incidence) ~ period + (1 | herd)",
    ...                  sm.datasets.load("cbpp"), family="binomial", progress=False)  # doctest: +SKIP
    >>> sm.diagnose(post)[["r_hat", "ess_bulk"]]  # doctest: +SKIP
    """
    from .idata import group_dataset

    if hasattr(obj, "idata"):
        idata = obj.idata
    else:
        idata = obj
    post = group_dataset(idata, "posterior")
    draws: dict[str, np.ndarray] = {}
    re_draws: dict[str, np.ndarray] = {}
    for var in post.data_vars:
        da = post[var]
        arr = np.asarray(da.values)
        target = re_draws if str(var).startswith("ranef_") else draws
        if str(var).startswith("ranef_") and not ranef and not warn:
            continue
        if arr.ndim == 2:
            target[str(var)] = arr
        else:
            other = [d for d in da.dims if d not in ("chain", "draw")]
            flat = arr.reshape(arr.shape[0], arr.shape[1], -1)
            labels = [np.asarray(da[d].values).astype(str) for d in other]
            grid = np.array(np.meshgrid(*labels, indexing="ij")).reshape(len(labels), -1).T
            for i, lab in enumerate(grid):
                name = str(lab[0]) if str(var) in ("fixef", "sd", "cor") else f"{var[6:]}[{','.join(lab)}]"
                target[name] = flat[:, :, i]
    table = param_table(draws)
    extra_r, extra_e = {}, {}
    if re_draws:
        rt = param_table(re_draws, fast=True)
        extra_r = {k: float(v) for k, v in rt["r_hat"].items() if v > RHAT_MAX}
        extra_e = {k: float(v) for k, v in rt["ess_bulk"].items() if v < ESS_MIN}
        if ranef:
            table = pd.concat([table, rt])
    chains = None
    try:
        ss = group_dataset(idata, "sample_stats")
    except KeyError:
        ss = None
    max_depth = 10
    if ss is not None and "diverging" in ss:
        max_depth = int(ss.attrs.get("max_tree_depth", 10))
        chains = chain_table({"diverging": ss["diverging"].values, "energy": ss["energy"].values,
                              "n_steps": ss["n_steps"].values, "step_size": ss["step_size"].values}, max_depth)
    msgs = check(table, chains, extra_rhat=extra_r, extra_ess=extra_e, max_tree_depth=max_depth)
    if warn:
        for m in msgs:
            warnings.warn(m, SamplerWarning, stacklevel=2)
    table.attrs["chains"] = chains
    table.attrs["warnings"] = msgs
    return table
