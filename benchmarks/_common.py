"""Shared helpers for the benchmark scripts: timing, peak memory, and lme4 in the same run."""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REF = Path(__file__).resolve().parent.parent / "tests" / "reference"


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def r_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    out = subprocess.run(["Rscript", "-e", "cat(requireNamespace('lme4', quietly=TRUE))"], capture_output=True, text=True)
    return out.stdout.strip().endswith("TRUE")


def run_r(code: str, timeout: float = 600) -> dict[str, float]:
    """Run R code that prints `name=value` lines; return them as floats."""
    out = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    vals = {}
    for line in out.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            vals[k.strip()] = float(v)
    return vals


def pinned_lme4(ref_id: str) -> float | None:
    """lme4's median time pinned in the reference JSON (measured on a 2-core machine like CI's)."""
    for f in ("lme4_results.json", "lme4_extra_results.json"):
        for r in json.loads((REF / f).read_text()):
            if r["id"] == ref_id:
                return r["results"].get("elapsed_median_s")
    return None


def lme4_times(r_code: str, pinned: dict[str, str]) -> tuple[dict[str, float], str]:
    """lme4 timings: measured now when R + lme4 are here, else the pinned ones (and say so)."""
    if r_available():
        return run_r(r_code), "measured now with Rscript (lme4 installed)"
    return {k: pinned_lme4(v) for k, v in pinned.items()}, "R not found: lme4 times pinned in tests/reference (2-core machine)"


def row(name: str, ours: float, theirs: float | None, unit: str = "s") -> str:
    ratio = f"{theirs / ours:8.1f}x" if theirs else "      n/a"
    th = f"{theirs:10.4f}" if theirs else "       n/a"
    return f"{name:<44s} {ours:10.4f} {th} {ratio}   ({unit})"
