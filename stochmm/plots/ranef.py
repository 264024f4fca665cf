"""Caterpillar plots of the random effects (lme4's ``dotplot(ranef(fit, condVar = TRUE))``)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["caterpillar"]


def caterpillar(fit: Any, group: str | None = None, level: float = 0.95, max_levels: int = 60, ax=None):
    """caterpillar(fit, group=None, level=0.95, max_levels=60, ax=None) -> matplotlib Figure

    lme4's ``dotplot(ranef(fit, condVar = TRUE))``: conditional modes of the random
    effects of one grouping factor, sorted, with ±z·conditional-SD intervals, one
    panel per term. With more than ``max_levels`` levels the most extreme are shown.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import stochmm as sm
    >>> fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    >>> fig = caterpillar(fit, "Subject")
    >>> len(fig.axes)
    2
    """
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    tab = fit.ranef_table()
    group = group or tab["group"].iloc[0]
    if group not in set(tab["group"]):
        raise KeyError(f"no grouping factor {group!r}; available: {sorted(set(tab['group']))}")
    sub = tab[tab["group"] == group]
    terms = list(dict.fromkeys(sub["term"]))
    z = norm.ppf(0.5 + level / 2)
    if ax is None:
        fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), max(3.0, 0.18 * min(max_levels, sub["level"].nunique()) + 1)),
                                 sharey=False, squeeze=False)
        axes = axes[0]
    else:
        axes, fig = np.atleast_1d(ax), np.atleast_1d(ax)[0].figure
    for a, term in zip(axes, terms):
        t = sub[sub["term"] == term].sort_values("condval")
        if len(t) > max_levels:
            half = max_levels // 2
            t = t.iloc[np.r_[0:half, len(t) - half : len(t)]]
        y = np.arange(len(t))
        a.errorbar(t["condval"], y, xerr=z * t["condsd"], fmt="o", ms=3, lw=1, capsize=0)
        a.axvline(0.0, color="0.6", lw=0.8)
        a.set_yticks(y, t["level"], fontsize=7)
        a.set_title(f"{group}: {term}", fontsize=9)
    fig.tight_layout()
    return fig
