"""Stochastic paths: posterior sampling, importance-sampling likelihoods, Monte Carlo ML and
accuracy studies, all starting from the builder's :class:`~stochmm.builder.model.Model`.

JAX, NumPyro and ArviZ are imported by these modules only, never by ``import stochmm``.

Host devices for parallel chains
--------------------------------
JAX sees one CPU device unless told otherwise *before it is imported*, and NumPyro can only run chains in
parallel (one per device) when there are enough devices. So when stochmm is imported (``import stochmm``, or this package) and JAX
is not yet, :mod:`stochmm._hostdevices` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` with N = max(CPU count, 4) (what
``numpyro.set_host_device_count`` does), and ``sm.sample(chain_method="auto")`` then runs the default four
chains in parallel: on cbpp that removes the 7 s compilation of the vectorised sampler, and on VerbAgg it
uses both cores of a 2-core machine (``benchmarks/bench_posterior.py``). It changes nothing for a process
that imported JAX first, set the flag itself, or set ``STOCHMM_HOST_DEVICES=0`` (or another count).
Accelerators (GPU) are unaffected: the flag concerns the CPU platform only.
"""

from __future__ import annotations

from .._hostdevices import set_host_devices

set_host_devices()
