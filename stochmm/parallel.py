"""Local worker processes for the paths that run many independent fits (bootstraps, accuracy studies).

One rule for the start method, shared by every path: ``fork`` where it is safe (POSIX, and JAX not
loaded — its threads do not survive a fork, and a forked child can deadlock), else ``forkserver``
(or ``spawn``), which need the usual ``if __name__ == "__main__":`` guard in scripts.

Examples
--------
>>> from stochmm.parallel import process_context
>>> process_context().get_start_method() in ("fork", "forkserver", "spawn")
True
"""

from __future__ import annotations

import multiprocessing as mp
import sys

__all__ = ["process_context"]


def process_context() -> mp.context.BaseContext:
    """process_context() -> multiprocessing context

    ``fork`` when it is safe (available, and JAX not imported), else ``forkserver`` or ``spawn``.
    """
    methods = mp.get_all_start_methods()
    if "fork" in methods and "jax" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")
