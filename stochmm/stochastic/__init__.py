"""Stochastic paths: posterior sampling, importance-sampling likelihoods, Monte Carlo ML and
accuracy studies, all starting from the builder's :class:`~stochmm.builder.model.Model`.

JAX, NumPyro and ArviZ are imported by these modules only, never by ``import stochmm``.
"""
