"""Parsing lme4-style mixed-model formulas.

``parse_formula("Reaction ~ Days + (Days | Subject)")`` splits a formula into its
response, the fixed-effects part (handed to formulaic unchanged), the
random-effects bar terms and any ``offset()`` terms. Bar terms are expanded the
way lme4 expands them: ``(x || g)`` becomes ``(1 | g) + (0 + x | g)`` and
``(1 | a/b)`` becomes ``(1 | a) + (1 | a:b)``.

Only this module reads formula text; everything downstream works on the
:class:`ParsedFormula` it returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import FormulaError

__all__ = ["BarTerm", "ParsedFormula", "parse_formula", "clean_message"]

# a variable name: a Python identifier in any script (``группа``), possibly with R's dots, or a backquoted name
_NAME = r"(?:[^\W\d]|\.)[\w.]*|`[^`]+`"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean_message(exc: BaseException) -> str:
    """clean_message(exc) -> str

    An exception's text without terminal colour codes (formulaic colours its
    parse errors), for embedding in stochmm's own messages.
    """
    return _ANSI.sub("", str(exc))
_GROUP_RE = re.compile(rf"^\s*({_NAME})(\s*[:/]\s*({_NAME}))*\s*$")


@dataclass(frozen=True)
class BarTerm:
    """One random-effects term ``(lhs | group)`` after expansion.

    Attributes
    ----------
    lhs : str
        The term's model formula, e.g. ``"1 + Days"`` or ``"0 + Days"``.
    group : str
        Grouping factor; an interaction of factors is written ``"a:b"``.
    text : str
        The bar term as the user wrote it (before expansion), for messages.
    """

    lhs: str
    group: str
    text: str

    @property
    def group_vars(self) -> list[str]:
        """The variables of the grouping factor (``a:b`` → ``['a', 'b']``)."""
        return [g.strip().strip("`") for g in self.group.split(":")]


@dataclass(frozen=True)
class ParsedFormula:
    """A mixed-model formula split into its parts.

    Attributes
    ----------
    text : str
        The formula as given.
    response : str
        Left-hand side text (may be ``cbind(s, f)``).
    fixed : str
        Right-hand side fixed-effects formula for formulaic (``"1"`` if empty).
    bars : tuple of BarTerm
        Random-effects terms, expanded, in formula order.
    offsets : tuple of str
        Expressions found inside ``offset(...)``.
    """

    text: str
    response: str
    fixed: str
    bars: tuple[BarTerm, ...]
    offsets: tuple[str, ...]


def _check_parens(s: str) -> None:
    depth = 0
    for i, ch in enumerate(s):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FormulaError("unmatched ')' in formula", s, i)
    if depth > 0:
        # point at the last unclosed '('
        stack = []
        for i, ch in enumerate(s):
            if ch == "(":
                stack.append(i)
            elif ch == ")":
                stack.pop()
        raise FormulaError("unclosed '(' in formula", s, stack[-1])


def _split_top(s: str, seps: str) -> list[tuple[str, int, str]]:
    """Split ``s`` at depth-0 characters in ``seps``.

    Returns (separator, start offset, piece) triples; the first separator is ''.
    """
    out, depth, start, sep = [], 0, 0, ""
    for i, ch in enumerate(s):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch in seps:
            out.append((sep, start, s[start:i]))
            sep, start = ch, i + 1
    out.append((sep, start, s[start:]))
    return out


def _find_bar(inner: str) -> tuple[int, int] | None:
    """Position and width of the depth-0 ``|`` or ``||`` inside a parenthesised term."""
    depth = 0
    for i, ch in enumerate(inner):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch == "|":
            return (i, 2) if inner[i + 1 : i + 2] == "|" else (i, 1)
    return None


def _strip_outer(s: str) -> str:
    s = s.strip()
    while s.startswith("(") and s.endswith(")"):
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(s) - 1:
                return s
        s = s[1:-1].strip()
    return s


def _double_bar_terms(lhs: str, formula: str, pos: int) -> list[str]:
    """``(lhs || g)`` → one term per formula term of ``lhs``, as lme4's ``expandDoubleVerts``:
    ``x*z`` gives ``1``, ``0 + x``, ``0 + z``, ``0 + x:z``; ``0 +`` / ``- 1`` drop the intercept."""
    import formulaic

    try:
        labels = [str(t) for t in formulaic.Formula(lhs)]
    except Exception as exc:
        raise FormulaError(f"cannot read the terms of {lhs!r}: {clean_message(exc)}", formula, pos) from None
    return ["1" if t == "1" else f"0 + {t}" for t in labels]


def _expand_group(group: str, formula: str, pos: int) -> list[str]:
    g = _strip_outer(group)
    if not _GROUP_RE.match(g):
        raise FormulaError(
            f"grouping factor {group.strip()!r} is not a variable name or a nesting "
            "('a/b') or interaction ('a:b') of variable names",
            formula,
            pos,
        )
    # lme4's expansion: a/b/c -> a, b:a, c:b:a (the inner factor first, as lme4 names it)
    parts = [p.strip() for p in g.split("/")]
    return [":".join(reversed(parts[: i + 1])) for i in range(len(parts))]


def _check_term_shape(p: str, text: str, pos: int) -> None:
    """Errors in a term holding a parenthesised bar: text after it (``(1 | g) @``, caret on the
    stray text) or an operator combining it with other terms (``Days * (1 | g)``)."""
    depth, opened = 0, None
    for i, ch in enumerate(p):
        if ch == "(":
            if depth == 0:
                opened = i
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0 and opened is not None and _find_bar(p[opened + 1 : i]) is not None:
                before, after = p[:opened].strip(), p[i + 1 :]
                if after.strip():
                    j = i + 1 + len(after) - len(after.lstrip())
                    raise FormulaError(f"unexpected {after.strip()!r} after the random-effects term "
                                       f"{p[opened : i + 1]!r}; terms are joined by '+'", text, pos + j)
                if before and not before.endswith(tuple("(,")) and not re.search(r"[\w.`]$", before):
                    op = before[-1]
                    raise FormulaError(
                        f"a random-effects term {p[opened : i + 1]!r} cannot be combined with other terms by "
                        f"{op!r}; add it as a separate term, e.g. 'y ~ x + (1 | g)' (lme4's rule too)",
                        text, pos + len(before) - 1)


def parse_formula(formula: str) -> ParsedFormula:
    """parse_formula(formula) -> ParsedFormula

    Split an lme4-style formula into response, fixed part, bar terms and offsets.

    Parameters
    ----------
    formula : str
        For example ``"Reaction ~ Days + (Days | Subject)"``.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    FormulaError
        With the formula and a caret under the offending position.

    Examples
    --------
    >>> pf = parse_formula("y ~ x + (x || g) + (1 | a/b)")
    >>> [(b.lhs, b.group) for b in pf.bars]
    [('1', 'g'), ('0 + x', 'g'), ('1', 'a'), ('1', 'b:a')]
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    text = formula.strip()
    if not text:
        raise FormulaError("empty formula")
    _check_parens(text)
    sides = _split_top(text, "~")
    if len(sides) == 1:
        raise FormulaError("formula has no '~': write it as 'response ~ terms'", text, 0)
    if len(sides) > 2:
        raise FormulaError("formula has more than one '~'", text, sides[2][1] - 1)
    response = sides[0][2].strip()
    rhs_start, rhs = sides[1][1], sides[1][2]
    if not response:
        raise FormulaError("formula has no response on the left of '~'", text, 0)
    if not rhs.strip():
        raise FormulaError("formula has nothing on the right of '~'", text, len(text) - 1)

    top = _find_bar(rhs)
    if top is not None and len(_split_top(rhs[: top[0]].strip(), "+-")) == 1:
        # `Yield ~ 1 | Batch`: R reads a bar at the top of the right-hand side as one term
        # (`~` binds loosest), lme4 as (1 | Batch) with an intercept-only fixed part. With a sum
        # before the bar (`y ~ x + 1 | g`, which R reads as (x + 1 | g)) the intent is unclear: refused below
        lead = len(rhs) - len(rhs.lstrip())
        rhs_start, rhs = rhs_start + lead - 1, "(" + rhs.strip() + ")"

    fixed_parts: list[str] = []
    bars: list[BarTerm] = []
    offsets: list[str] = []
    for sep, start, piece in _split_top(rhs, "+-"):
        p = piece.strip()
        pos = rhs_start + start + (len(piece) - len(piece.lstrip()))
        if not p:
            if sep or start > 0:
                raise FormulaError("empty term in formula", text, max(pos - 1, 0))
            continue
        _check_term_shape(p, text, pos)
        inner = p[1:-1] if p.startswith("(") and p.endswith(")") else None
        bar = _find_bar(inner) if inner is not None else None
        if bar is None and "|" in p:
            raise FormulaError(
                "random-effects term must be enclosed in parentheses, as in '(1 | g)' (without them R "
                "would read every term before '|' as part of it)",
                text,
                pos + p.index("|"),
            )
        if bar is not None:
            if sep == "-":
                raise FormulaError("a random-effects term cannot be subtracted", text, pos)
            i, width = bar
            lhs, grp = inner[:i].strip(), inner[i + width :].strip()
            if not lhs:
                raise FormulaError(
                    f"random-effects term {p!r} has nothing before '|' (use '1' for an intercept)",
                    text,
                    pos + 1 + i,
                )
            if not grp:
                raise FormulaError(
                    f"random-effects term {p!r} has no grouping factor after '|'", text, pos + 1 + i
                )
            groups = _expand_group(grp, text, pos + 1 + i + width)
            if width == 2:  # (x || g): one uncorrelated term per formula term, intercept separate
                lhss = _double_bar_terms(lhs, text, pos + 1)
                if not lhss:
                    raise FormulaError(f"random-effects term {p!r} has no effects", text, pos)
            else:
                lhss = [lhs]
            for g in groups:
                for lh in lhss:
                    bars.append(BarTerm(lhs=lh, group=g, text=p))
        elif p.startswith("offset(") and p.endswith(")"):
            if sep == "-":
                raise FormulaError("an offset cannot be subtracted", text, pos)
            offsets.append(p[len("offset(") : -1].strip())
        else:
            fixed_parts.append(f"{sep} {p}" if sep else p)
    fixed = " ".join(fixed_parts).strip()
    if fixed.startswith("+"):
        fixed = fixed[1:].strip()
    if not fixed:
        fixed = "1"
    elif fixed.startswith("-"):
        fixed = "1 " + fixed
    return ParsedFormula(text=text, response=response, fixed=fixed, bars=tuple(bars), offsets=tuple(offsets))
