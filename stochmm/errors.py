"""Exceptions and warnings raised by stochmm.

Every bad-input path raises a specific subclass so that callers (and tests) can
tell a misspelt column from a malformed formula from a degenerate design.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class StochmmError(Exception):
    """Base class of all stochmm errors."""


class FormulaError(StochmmError, ValueError):
    """A formula that cannot be parsed; the message shows where."""

    def __init__(self, message: str, formula: str | None = None, position: int | None = None):
        if formula is not None and position is not None:
            message = f"{message}\n    {formula}\n    {' ' * position}^"
        elif formula is not None:
            message = f"{message}\n    {formula}"
        super().__init__(message)
        self.formula = formula
        self.position = position


class MissingColumnError(StochmmError, KeyError):
    """A variable named in the formula (or as weights/offset) is not a column of the data."""

    def __init__(self, name: str, columns: Iterable[str], what: str = "variable"):
        cols = [str(c) for c in columns]
        near = difflib.get_close_matches(name, cols, n=1, cutoff=0.6)
        if not near:  # case-insensitive fallback: 'reaction' -> 'Reaction'
            low = {c.lower(): c for c in cols}
            if name.lower() in low:
                near = [low[name.lower()]]
        hint = f" Did you mean {near[0]!r}?" if near else ""
        shown = ", ".join(cols[:12]) + (", ..." if len(cols) > 12 else "")
        self.name = name
        self.suggestion = near[0] if near else None
        super().__init__(f"{what} {name!r} is not a column of the data.{hint} Columns: {shown}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DataError(StochmmError, ValueError):
    """Data that cannot support the requested model (empty, bad response values, ...)."""


class DesignError(StochmmError, ValueError):
    """A random-effects design lme4 would also reject (single-level factor, too many effects)."""


class ConvergenceWarning(UserWarning):
    """The optimizer stopped without meeting its convergence criteria."""


class SingularFitWarning(UserWarning):
    """Some variance components are estimated on the boundary (a singular fit)."""


class NegativeEstimateWarning(SingularFitWarning):
    """A moment estimate of a variance came out negative and was set to 0.

    A subclass of :class:`SingularFitWarning`: the truncated estimate sits on the
    boundary of the parameter space, as a singular REML fit would.
    """


class RankDeficiencyWarning(UserWarning):
    """Fixed-effects model matrix is rank deficient; columns were dropped."""


class MissingDataWarning(UserWarning):
    """Rows with missing values in the model's variables were dropped."""
