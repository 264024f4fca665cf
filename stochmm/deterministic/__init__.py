"""Deterministic maximum-likelihood paths.

* :mod:`~stochmm.deterministic.blocks` — :class:`BlockedSystem`: cross-products and the blocked Cholesky factor.
* :mod:`~stochmm.deterministic.lmm` — the profiled deviance of linear mixed models, ``lmer``.
* :mod:`~stochmm.deterministic.pirls` — penalised iteratively reweighted least squares engines.
* :mod:`~stochmm.deterministic.quadrature` — Gauss–Hermite rules and adaptive quadrature.
* :mod:`~stochmm.deterministic.glmm` — ``glmer``: nAGQ = 0, Laplace and adaptive quadrature.
* :mod:`~stochmm.deterministic.optsummary` — optimisers and the optimisation summary.
"""
