"""Plots where a picture beats a table (matplotlib, an optional dependency: ``pip install stochmm[plots]``).

Each function takes a results object or a tidy table and returns a matplotlib Figure; matplotlib is
imported when a function is called.
"""

# -- inference
from .profile import bootstrap_hist as bootstrap_hist
from .profile import profile_zeta as profile_zeta
from .ranef import caterpillar

# -- importance sampling

# -- accuracy studies

__all__ = ["caterpillar"]
