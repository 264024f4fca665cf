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
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["process_context", "map_chunks"]


def process_context() -> mp.context.BaseContext:
    """process_context() -> multiprocessing context

    ``fork`` when it is safe (available, and JAX not imported), else ``forkserver`` or ``spawn``.
    """
    methods = mp.get_all_start_methods()
    if "fork" in methods and "jax" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def map_chunks(fn: Callable[..., Any], args: tuple, chunks: Sequence[Sequence], *, n_jobs: int = 1,
               client: Any = None, bar: Any = None) -> list:
    """map_chunks(fn, args, chunks, *, n_jobs=1, client=None, bar=None) -> list

    ``[fn(*args, chunk) for chunk in chunks]``, in order, run serially, in ``n_jobs`` local processes
    (:func:`process_context`) or on a ``dask.distributed`` client (``args`` scattered once); results
    stream back as they finish and advance ``bar`` (anything with ``update(n)``) by the chunk's length.
    ``fn`` must be a module-level function so that it pickles.

    Examples
    --------
    >>> map_chunks(sum, (), [[1, 2], [3]])
    [3, 3]
    """
    out: list = [None] * len(chunks)

    def done(i: int, value: Any) -> None:
        out[i] = value
        if bar is not None:
            bar.update(len(chunks[i]))

    if client is not None:
        from dask.distributed import as_completed

        scattered = [client.scatter(a, broadcast=True) for a in args]
        futs = [client.submit(fn, *scattered, c, pure=False) for c in chunks]
        index = {f.key: i for i, f in enumerate(futs)}
        for fut in as_completed(futs):
            done(index[fut.key], fut.result())
    elif n_jobs > 1:
        import concurrent.futures as cf

        with cf.ProcessPoolExecutor(n_jobs, mp_context=process_context()) as ex:
            futs = {ex.submit(fn, *args, c): i for i, c in enumerate(chunks)}
            for fut in cf.as_completed(futs):
                done(futs[fut], fut.result())
    else:
        for i, c in enumerate(chunks):
            done(i, fn(*args, c))
    return out
