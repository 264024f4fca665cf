"""The builder: formula + DataFrame → the structures every estimation path uses.

* :mod:`~stochmm.builder.formula` — lme4 formula syntax (bar terms, ``||``, ``/``, ``offset()``).
* :mod:`~stochmm.builder.terms` — :class:`ReTerm`, one random-effects term: its Z block and θ → T map.
* :mod:`~stochmm.builder.model` — :class:`Model`: X, y, sparse Z, the Λ(θ) template, θ bounds and
  lme4's names, weights, offset, family, and the checks on all of them.
* :mod:`~stochmm.builder.families` — the GLM families and links.

The builder imports no estimation path; ``Model.fit`` is dispatched by :mod:`stochmm.api`.
"""

from .families import Family, Link, get_family
from .formula import parse_formula
from .model import Model
from .terms import ReTerm

__all__ = ["Model", "ReTerm", "Family", "Link", "get_family", "parse_formula"]
