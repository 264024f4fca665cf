"""Comparing fits: likelihood-ratio tests as lme4's ``anova(fit0, fit1)``, parametric-bootstrap
LRTs as pbkrtest's ``PBmodcomp``, and F tests of one LMM's fixed-effects terms with denominator
df as lmerTest's ``anova(fit, type=, ddf=)``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2

from ..errors import check_flag
from ..parallel import map_chunks
from ..results import MixedModelResults

__all__ = ["anova"]


def _ml(fit: MixedModelResults) -> MixedModelResults:
    """lme4 refits REML fits by ML before comparing likelihoods ("refitting model(s) with ML")."""
    if getattr(fit, "reml", False):
        from ..deterministic.lmm import fit_lmm

        return fit_lmm(fit.model, reml=False, start=fit.theta)
    return fit


def _check_comparable(fits: tuple[MixedModelResults, ...]) -> None:
    """Refuse what R refuses: nested-model tests need the same response on the same observations."""
    n = [f.nobs for f in fits]
    if len(set(n)) > 1:
        raise ValueError(f"models were not all fitted to the same size of dataset: numbers of observations "
                         f"{n}; a likelihood-ratio test needs the same observations (drop missing values "
                         "before fitting)")
    fam = {f.model.family_name for f in fits}
    if len(fam) > 1:
        raise ValueError(f"models have different families ({', '.join(sorted(fam))}); their likelihoods "
                         "do not compare")
    y0, r0 = fits[0].model.y, fits[0].model.parsed.response
    for f in fits[1:]:
        m = f.model
        if not np.allclose(m.y, y0, rtol=1e-12, atol=0) or not np.allclose(m.prior_weights, fits[0].model.prior_weights):
            what = (f"different responses ({r0!r} vs {m.parsed.response!r})" if m.parsed.response != r0
                    else f"the same response name {r0!r} with different values (different data?)")
            raise ValueError(f"models were fitted to {what}; likelihood-ratio tests compare models of the "
                             "same response on the same data")


def anova(*fits: MixedModelResults, refit: bool = True, ddf: str | None = "satterthwaite", type: int | str = 3,
          method: str = "lrt", nsim: int = 1000, seed: int | None = 0, progress: bool = True,
          client: Any = None, n_jobs: int = 1) -> pd.DataFrame:
    """anova(*fits, refit=True, ddf="satterthwaite", type=3, method="lrt", nsim=1000, seed=0, ...) -> DataFrame

    **Several fits**: likelihood-ratio tests between nested models, ordered by number
    of parameters, with lme4's columns: npar, AIC, BIC, logLik, deviance, Chisq, Df,
    Pr(>Chisq). REML fits are refitted by ML first (as lme4 does) unless
    ``refit=False``. The fits must share the response and the observations (as R
    requires). ``method="pboot"`` adds the parametric-bootstrap p-value of the LRT
    (pbkrtest's ``PBmodcomp``): ``nsim`` responses simulated from the smaller model,
    both models refitted to each, p = (1 + #{LRT* ≥ LRT}) / (1 + nsim); the χ² and
    bootstrap p-values are reported side by side (column ``Pr(>Chisq) pboot``).

    **One LMM**: F tests of each fixed-effects term, as lmerTest's
    ``anova(fit, type=3, ddf="Satterthwaite")``: Sum Sq, Mean Sq, NumDF, DenDF,
    F value, Pr(>F), Type III (default) or Type I, with ``ddf="satterthwaite"``,
    ``"kenward-roger"`` or ``"between-within"``.

    Examples
    --------
    >>> import stochmm as sm
    >>> d = sm.datasets.load("sleepstudy")
    >>> f0 = sm.lmer("Reaction ~ Days + (Days || Subject)", d, reml=False)
    >>> f1 = sm.lmer("Reaction ~ Days + (Days | Subject)", d, reml=False)
    >>> round(float(anova(f0, f1)["Chisq"].iloc[1]), 4)
    0.0639
    >>> round(float(anova(f1, ddf="satterthwaite")["DenDF"].iloc[0]), 3)
    18.0
    """
    if not fits:
        raise ValueError("anova needs a fit (F tests of its terms) or several fits to compare")
    for f in fits:
        if not isinstance(f, MixedModelResults):
            raise TypeError(f"anova takes fitted models (results of lmer/glmer), got {type_name(f)}")
    if len(fits) == 1:
        fit = fits[0]
        if fit.model.family_name != "gaussian":
            raise ValueError("F tests with denominator df are not defined for a GLMM; compare nested fits with "
                             "sm.anova(fit0, fit1) (LRT) or sm.anova(fit0, fit1, method='pboot') (parametric "
                             "bootstrap)")
        if ddf is None:
            raise ValueError("anova of one fit needs ddf= ('satterthwaite', 'kenward-roger' or 'between-within')")
        from .ddf import ddf_anova

        return ddf_anova(fit, ddf, type)
    check_flag(refit, "refit")
    if method not in ("lrt", "pboot"):
        raise ValueError(f"method must be 'lrt' or 'pboot', not {method!r}")
    _check_comparable(fits)
    fits = tuple(_ml(f) if refit else f for f in fits)
    order = np.argsort([f.df for f in fits], kind="stable")
    rows, prev = [], None
    for i in order:
        f = fits[i]
        row = {"model": f.model.formula, "npar": f.df, "AIC": f.aic, "BIC": f.bic, "logLik": f.loglik,
               "deviance": -2 * f.loglik, "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan}
        if prev is not None:
            stat = max(2 * (f.loglik - prev.loglik), 0.0)
            df = f.df - prev.df
            row.update({"Chisq": stat, "Df": df, "Pr(>Chisq)": chi2.sf(stat, df) if df > 0 else np.nan})
            if method == "pboot":
                # pbkrtest's getLRT: the bootstrap statistics are ML LRTs, so the observed one is too
                # (with refit=False REML fits the chi-square columns stay on the REML criterion)
                s0, s1 = _ml(prev), _ml(f)
                pb, nok = pboot_pvalue(s0, s1, max(2 * (s1.loglik - s0.loglik), 0.0), nsim=nsim, seed=seed,
                                       progress=progress, client=client, n_jobs=n_jobs)
                row.update({"Pr(>Chisq) pboot": pb, "nsim": nok})
        elif method == "pboot":
            row.update({"Pr(>Chisq) pboot": np.nan, "nsim": np.nan})
        rows.append(row)
        prev = f
    return pd.DataFrame(rows).set_index("model")


def type_name(x: Any) -> str:
    return type(x).__name__


def _pb_chunk(small: dict, large: dict, seeds: list) -> np.ndarray:
    from ..deterministic.pirls import blas_threads
    from .bootstrap import _draw, _Refitter

    with blas_threads(1):
        rs, rl = _Refitter(small), _Refitter(large)
        out = np.empty((len(seeds), 2))
        for i, ss in enumerate(seeds):
            y, _ = _draw(small, "parametric", np.random.default_rng(ss))
            a, b = rs.refit_y(y), rl.refit_y(y)
            ok = bool(a[-1]) and bool(b[-1])
            out[i] = (max(a[-3] - b[-3], 0.0), float(ok))
    return out


def pboot_pvalue(small: MixedModelResults, large: MixedModelResults, stat: float, nsim: int = 1000,
                 seed: int | None = 0, progress: bool = True, client: Any = None,
                 n_jobs: int = 1) -> tuple[float, int]:
    """pboot_pvalue(small, large, stat, nsim=1000, seed=0, ...) -> (p, replicates used)

    Parametric-bootstrap p-value of the LRT statistic ``stat`` (pbkrtest's
    ``PBmodcomp``): responses simulated from the ML fit ``small``, both models refitted
    by ML (warm-started, nothing rebuilt); p = (1 + #{LRT* ≥ stat}) / (1 + nsim_used).
    """
    from .bootstrap import _check, _check_run, _payload, _progress

    _check(small, nsim, "parametric", n_jobs)
    _check_run(progress, seed)
    if client is not None and not hasattr(client, "submit"):
        raise TypeError(f"client must be a dask.distributed.Client (or None), got {client.__class__.__name__}")
    pls, pll = _payload(small, "parametric", None), _payload(large, "parametric", None)
    pls["reml"] = pll["reml"] = False
    seeds = np.random.SeedSequence(seed).spawn(int(nsim))
    size = 50 if (client is None and n_jobs == 1) else max(1, -(-int(nsim) // (4 * max(n_jobs, 2))))
    chunks = [seeds[i : i + size] for i in range(0, int(nsim), size)]
    bar = _progress(int(nsim), progress, "parametric-bootstrap LRT")
    try:
        res = map_chunks(_pb_chunk, (pls, pll), chunks, n_jobs=n_jobs, client=client, bar=bar)
    finally:
        bar.close()
    tab = np.vstack(res)
    ok = tab[:, 1] > 0
    ref = tab[ok, 0]
    return float((1 + np.sum(ref >= stat - 1e-10)) / (1 + ref.size)), int(ref.size)
