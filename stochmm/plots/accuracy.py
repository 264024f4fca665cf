"""Bias and coverage of an accuracy study by method (dot-and-whisker with Monte Carlo error bars)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bias_coverage"]


def bias_coverage(study: Any, parameters: Sequence[str] | None = None, mc_level: float = 0.95, relative: bool = False):
    """bias_coverage(study, parameters=None, mc_level=0.95, relative=False) -> matplotlib Figure

    Two panels, one row per parameter and one dot per method: the bias (or, with
    ``relative=True``, the relative bias) and the empirical coverage of the nominal intervals,
    each with whiskers of ±z·(Monte Carlo SE) at ``mc_level``; reference lines at 0 and at the
    nominal level. A method without intervals for a parameter has no coverage dot.

    Parameters
    ----------
    study : AccuracyStudy or pandas.DataFrame
        A study (:func:`stochmm.accuracy_study`) or its summary table
        (:func:`stochmm.stochastic.accuracy.summarize`).
    parameters : sequence of str, optional
        Which parameters to show (default: all, in table order).
    mc_level : float
        Level of the Monte Carlo error bars.
    relative : bool
        Plot bias/truth instead of the bias.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> tab = pd.DataFrame({"method": ["laplace", "agq:9"], "parameter": ["sd(g)", "sd(g)"], "truth": [2.0, 2.0],
    ...                     "bias": [-0.3, 0.05], "bias_mcse": [0.05, 0.04], "rel_bias": [-0.15, 0.025],
    ...                     "coverage": [0.86, 0.94], "coverage_mcse": [0.02, 0.015]})
    >>> fig = bias_coverage(tab)
    >>> [a.get_xlabel() for a in fig.axes]
    ['bias (± 1.96 MC SE)', 'coverage of 95% intervals (± 1.96 MC SE)']
    """
    from statistics import NormalDist

    import matplotlib.pyplot as plt

    tab = getattr(study, "summary", study)
    level = tab.attrs.get("level", getattr(study, "level", 0.95))
    if parameters is not None:
        missing = [p for p in parameters if p not in set(tab["parameter"])]
        if missing:
            raise KeyError(f"no parameter {missing[0]!r} in the study; parameters: "
                           f"{', '.join(dict.fromkeys(tab['parameter']))}")
        tab = tab[tab["parameter"].isin(parameters)]
        params = list(parameters)
    else:
        params = list(dict.fromkeys(tab["parameter"]))
    methods = list(dict.fromkeys(tab["method"]))
    z = NormalDist().inv_cdf(0.5 + mc_level / 2)
    nm = len(methods)
    offsets = (np.arange(nm) - (nm - 1) / 2) * (0.7 / max(nm, 1))
    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(9.5, 0.55 * len(params) * max(1, nm / 2) + 1.6), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ypos = np.arange(len(params))[::-1]
    for k, m in enumerate(methods):
        sub = tab[tab["method"] == m].set_index("parameter").reindex(params)
        y = ypos - offsets[k]  # the first method on top
        c = colors[k % len(colors)]
        if relative:
            b = sub["rel_bias"].to_numpy(dtype=float)
            tr = sub["truth"].to_numpy(dtype=float)
            e = z * sub["bias_mcse"].to_numpy(dtype=float) / np.where(tr != 0, np.abs(tr), np.nan)
        else:
            b = sub["bias"].to_numpy(dtype=float)
            e = z * sub["bias_mcse"].to_numpy(dtype=float)
        ax_b.errorbar(b, y, xerr=e, fmt="o", color=c, ms=4, lw=1.2, capsize=2, label=m)
        cov = sub["coverage"].to_numpy(dtype=float)
        ax_c.errorbar(cov, y, xerr=z * sub["coverage_mcse"].to_numpy(dtype=float), fmt="o", color=c, ms=4, lw=1.2,
                      capsize=2)
    ax_b.axvline(0.0, color="0.5", lw=0.8)
    ax_c.axvline(level, color="0.5", lw=0.8, ls="--")
    ax_b.set_yticks(ypos, params)
    ax_b.set_xlabel(f"{'relative bias' if relative else 'bias'} (± {z:.2f} MC SE)")
    ax_c.set_xlabel(f"coverage of {level:.0%} intervals (± {z:.2f} MC SE)")
    for a in (ax_b, ax_c):
        a.grid(axis="x", color="0.92")
        for yy in ypos[:-1] - 0.5:
            a.axhline(yy, color="0.85", lw=0.6)
    ax_b.legend(fontsize=8, loc="best", frameon=False)
    fig.tight_layout()
    return fig
