"""How the stochastic paths configure JAX, in one place: float64, and a persistent compilation cache.

float64
    Every stochastic path computes in float64 so that its numbers agree with the deterministic paths
    (``jax_enable_x64``). float32 would halve memory traffic on large data, at the price of log-likelihoods
    that differ from the ML paths' in the fifth digit on VerbAgg-sized sums.

Persistent compilation cache
    Compiling NumPyro's NUTS for a model takes seconds (a whole cbpp run on 2 cores, 2026-12-02: 3.0 s cold, 2.3 s
    with the cache warm) and is repeated in every new Python process. Unless JAX already has a cache
    directory, the stochastic paths use one at ``$STOCHMM_JAX_CACHE``, else ``$XDG_CACHE_HOME/stochmm/jax`` (``~/.cache/stochmm/jax``), so a
    script re-run on the same model shapes loads the compiled sampler instead (measured in
    ``benchmarks/bench_posterior.py``: cold and warm figures). Entries that compiled in under 0.1 s are not
    stored; with ``filelock`` installed (a dependency) the cache is locked across processes and kept under
    1 GiB, least recently used entries evicted first. ``STOCHMM_JAX_CACHE=0`` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

_DONE = False
CACHE_MAX_BYTES = 1 << 30


def cache_dir() -> Path | None:
    """cache_dir() -> Path | None — where compiled programs are kept (None: off)."""
    env = os.environ.get("STOCHMM_JAX_CACHE")
    if env is not None and env.strip().lower() in ("0", "off", "false", "no", ""):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stochmm" / "jax"


def configure() -> None:
    """configure() -> None — float64 and the persistent compilation cache (idempotent)."""
    global _DONE
    jax.config.update("jax_enable_x64", True)
    if _DONE:
        return
    _DONE = True
    if jax.config.jax_compilation_cache_dir:  # the user chose one: theirs
        return
    where = cache_dir()
    if where is None:
        return
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: no cache, nothing else changes
        return
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    try:
        import filelock  # noqa: F401  (JAX needs it to lock and evict)

        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    except ImportError:
        pass
