"""Plots where a picture beats a table (matplotlib, an optional dependency: ``pip install stochmm[plots]``).

Each function takes a results object or a tidy table and returns a matplotlib Figure; matplotlib is
imported when a function is called.
"""

from .ranef import caterpillar

# -- inference
# isort: split
from .profile import bootstrap_hist, profile_zeta  # noqa: F401

# -- importance sampling
from .approximation import approximation_error

# -- accuracy studies
from .accuracy import bias_coverage as bias_coverage  # isort: skip

__all__ = ["caterpillar", "approximation_error"]
