"""Profile-zeta plots (lme4's ``xyplot(profile(fit))``) and bootstrap replicate distributions."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["profile_zeta", "bootstrap_hist"]


def _grid(n: int, ncol: int | None):
    import matplotlib.pyplot as plt

    ncol = ncol or min(n, 3)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax in axes.ravel()[n:]:
        fig.delaxes(ax)
    return fig, axes.ravel()[:n]


def profile_zeta(prof: Any, level: float = 0.95, ncol: int | None = None):
    """profile_zeta(prof, level=0.95, ncol=None) -> matplotlib Figure

    lme4's ``xyplot(profile(fit))``: ζ against each parameter, one panel per
    parameter, with the ±z lines of ``level`` and the interval endpoints marked.
    A straight line means a quadratic log-likelihood (Wald intervals would do).

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stochmm as sm
    >>> fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), reml=False)
    >>> len(profile_zeta(fit.profile()).axes)
    3
    """
    from scipy.stats import norm

    z = norm.ppf(0.5 + level / 2)
    pars = list(prof.estimates.index)
    ci = prof.confint(level)
    fig, axes = _grid(len(pars), ncol)
    for ax, par in zip(axes, pars):
        t = prof.table[prof.table.parameter == par].sort_values("value")
        ax.plot(t["value"], t["zeta"], "-o", ms=2.5, lw=1.2, color="C0")
        for s in (-z, z):
            ax.axhline(s, color="0.6", lw=0.8, ls="--")
        for v in ci.loc[par]:
            if np.isfinite(v):
                ax.axvline(v, color="C3", lw=0.8)
        ax.axhline(0, color="0.8", lw=0.6)
        ax.set_title(par, fontsize=9)
        ax.set_ylabel("ζ")
    fig.tight_layout()
    return fig


def bootstrap_hist(boot: Any, level: float = 0.95, bins: int = 30, ncol: int | None = None):
    """bootstrap_hist(boot, level=0.95, bins=30, ncol=None) -> matplotlib Figure

    Histograms of the bootstrap replicates of each parameter, with the original
    estimate and the percentile interval.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stochmm as sm
    >>> fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    >>> len(bootstrap_hist(fit.bootstrap(nsim=20, progress=False)).axes)
    3
    """
    pars = boot.params
    ci = boot.confint(level, "percentile")
    ok = boot.replicates[boot.replicates["converged"]]
    fig, axes = _grid(len(pars), ncol)
    for ax, par in zip(axes, pars):
        ax.hist(ok[par].dropna(), bins=bins, color="C0", alpha=0.7)
        ax.axvline(boot.estimates[par], color="k", lw=1.2)
        for v in ci.loc[par]:
            ax.axvline(v, color="C3", lw=0.8, ls="--")
        ax.set_title(par, fontsize=9)
    fig.tight_layout()
    return fig
