"""Native BLAS for benchmarks: import this first, before numpy.

The development and CI machines of this project set ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` (older OpenBLAS builds misdetect their processors). With
them a current numpy's OpenBLAS runs a generic kernel, about 2× slower (InstEval
ML: 2.1 s with them, 0.95 s without). A user's machine does not set them, so a
benchmark re-executes itself once with both removed from *its own* environment
(its children — Rscript, worker processes — inherit that). Tests and CI never do
this. :func:`report` prints which BLAS kernel actually ran (threadpoolctl).
"""

from __future__ import annotations

import os
import sys

VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_FLAG = "STOCHMM_BENCH_UNSET_BLAS_VARS"


def use_native_blas() -> None:
    """Re-execute this script without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (once)."""
    found = {k: os.environ[k] for k in VARS if k in os.environ}
    if found and "numpy" in sys.modules:
        raise RuntimeError("import _blas and call use_native_blas() before numpy is imported")
    if found:
        env = {k: v for k, v in os.environ.items() if k not in VARS}
        env[_FLAG] = ",".join(f"{k}={v}" for k, v in found.items())
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def report() -> str:
    """One line: the environment variables removed and the BLAS kernel(s) loaded."""
    removed = os.environ.get(_FLAG) or "none were set"
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return f"BLAS: removed {removed}; threadpoolctl not installed (pip install threadpoolctl)"
    import numpy  # noqa: F401  (load numpy's BLAS so it is listed)
    import scipy.linalg  # noqa: F401

    libs = [f"{i.get('internal_api')} {i.get('version')} kernel={i.get('architecture')} threads={i.get('num_threads')}"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return f"BLAS: removed {removed} for this process; loaded: " + "; ".join(sorted(set(libs)))
