"""Approximation-error curves: each method's log-likelihood minus the most accurate one, along a parameter."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["approximation_error"]


def approximation_error(table: Any, ax=None, deviance: bool = True, band: float = 2.0):
    """approximation_error(table, ax=None, deviance=True, band=2.0) -> matplotlib Figure

    Draw the approximation-error curves of a profile table from
    ``sm.compare_likelihoods(fit, profile=..., values=...)``: for every method, its difference from
    the most accurate method available (AGQ with many nodes, or importance sampling), on the
    deviance scale (−2 × log-likelihood difference; ``deviance=False``: log-likelihood) against the
    profiled parameter; stochastic methods get ±``band`` Monte Carlo SE bands.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stochmm as sm
    >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    >>> tab = sm.compare_likelihoods(fit, methods=("laplace", "agq:25"), profile="herd.(Intercept)",
    ...                              values=[0.3, 0.6, 1.2])
    >>> fig = sm.plots.approximation_error(tab)
    >>> fig.axes[0].get_xlabel()
    'herd.(Intercept)'
    """
    import matplotlib.pyplot as plt

    need = {"parameter", "value", "method", "difference", "mcse"}
    if not hasattr(table, "columns") or not need <= set(table.columns):
        raise ValueError("table must be a profile table from compare_likelihoods(..., profile=...), with columns "
                         f"{sorted(need)}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
    else:
        fig = ax.figure
    s = -2.0 if deviance else 1.0
    for method, sub in table.groupby("method", sort=False):
        sub = sub.sort_values("value")
        if not np.any(np.isfinite(sub["difference"])):
            continue
        x, y = sub["value"].to_numpy(), s * sub["difference"].to_numpy()
        line = ax.plot(x, y, marker="o", ms=3, lw=1.2, label=method)[0]
        se = abs(s) * sub["mcse"].to_numpy()
        if np.any(se > 0):
            ax.fill_between(x, y - band * se, y + band * se, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel(str(table["parameter"].iloc[0]))
    ax.set_ylabel("−2 Δ log L vs reference" if deviance else "Δ log L vs reference")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
