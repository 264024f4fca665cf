"""Host CPU devices for NumPyro's parallel chains (see :mod:`stochmm.stochastic`); imports nothing heavy."""

from __future__ import annotations

import os
import sys

FLAG = "xla_force_host_platform_device_count"


def set_host_devices() -> int | None:
    """set_host_devices() -> int | None

    Before JAX is imported, ask XLA for ``max(CPU count, 4)`` host devices (``STOCHMM_HOST_DEVICES``
    overrides the count; ``0`` or ``1`` leaves XLA alone) so that ``sm.sample`` can run its chains in
    parallel. Does nothing when JAX is already imported or ``XLA_FLAGS`` already names a device count.
    Returns the count set, or None.
    """
    if "jax" in sys.modules or FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    want = os.environ.get("STOCHMM_HOST_DEVICES", "").strip()
    try:
        n = int(want) if want else max(os.cpu_count() or 1, 4)
    except ValueError:
        n = max(os.cpu_count() or 1, 4)
    if n <= 1:
        return None
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{FLAG}={n}").strip()
    return n
