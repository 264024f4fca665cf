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

    def __init__(self, name: str, columns: Iterable[str], what: str = "variable", note: str = ""):
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
        super().__init__(f"{what} {name!r} is not a column of the data.{hint} Columns: {shown}.{note}")

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


class OptionError(StochmmError, TypeError, ValueError):
    """An unknown keyword argument, or a flag/choice argument of the wrong type or value, at an entry point.

    Both a ``TypeError`` (what Python raises for an unknown keyword) and a
    ``ValueError`` (what a bad choice used to raise).
    """


def check_keywords(given: Iterable[str], valid: Iterable[str], func: str, hints: dict[str, str] | None = None) -> None:
    """check_keywords(given, valid, func, hints=None)

    Refuse keyword arguments ``func`` does not take, naming the nearest valid one
    (or the hint given for it, e.g. ``family=`` → use ``glmer``) and listing the
    valid ones.

    Examples
    --------
    >>> check_keywords(["maxeval"], ["maxeval", "ftol_rel"], "lmer")
    >>> try:
    ...     check_keywords(["maxevals"], ["maxeval", "ftol_rel"], "lmer")
    ... except OptionError as e:
    ...     print(e)
    lmer() got an unexpected keyword argument 'maxevals'. Did you mean 'maxeval'? Valid keywords: ftol_rel, maxeval
    """
    valid = sorted(valid)
    for name in given:
        if name in valid:
            continue
        if hints and name in hints:
            raise OptionError(f"{func}() got an unexpected keyword argument {name!r}: {hints[name]}")
        near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        if not near:
            low = {v.lower(): v for v in valid}
            near = [low[name.lower()]] if name.lower() in low else []
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise OptionError(f"{func}() got an unexpected keyword argument {name!r}.{hint} "
                          f"Valid keywords: {', '.join(valid)}")


def check_flag(value: object, name: str, allow_none: bool = False) -> bool | None:
    """check_flag(value, name, allow_none=False) -> bool

    A True/False argument: ``bool`` or ``numpy.bool_`` only. A string (``reml="ML"``
    is true in Python) or a number is refused, naming the argument.

    Examples
    --------
    >>> check_flag(False, "reml")
    False
    """
    import numpy as np

    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise OptionError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_choice(value: object, name: str, choices: Iterable[str]) -> str:
    """check_choice(value, name, choices) -> str

    A string argument that must be one of ``choices`` (case as given).

    Examples
    --------
    >>> check_choice("sparse", "rule", ("tensor", "sparse"))
    'sparse'
    """
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6) if isinstance(value, str) else []
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise OptionError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.{hint}")
    return value
