import re

import pytest

from stochmm.builder.formula import parse_formula
from stochmm.errors import FormulaError


def bars(f):
    return [(b.lhs, b.group) for b in parse_formula(f).bars]


def test_simple():
    pf = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert pf.response == "Reaction"
    assert pf.fixed == "Days"
    assert bars("Reaction ~ Days + (Days | Subject)") == [("Days", "Subject")]
    assert pf.offsets == ()


def test_double_bar_splits_like_lme4():
    assert bars("y ~ x + (x || g)") == [("1", "g"), ("0 + x", "g")]
    assert bars("y ~ x + (1 + x + z || g)") == [("1", "g"), ("0 + x", "g"), ("0 + z", "g")]
    assert bars("y ~ x + (0 + x + z || g)") == [("0 + x", "g"), ("0 + z", "g")]


def test_nesting_and_interaction():
    assert bars("y ~ 1 + (1 | a/b)") == [("1", "a"), ("1", "b:a")]
    assert bars("y ~ 1 + (1 | a/b/c)") == [("1", "a"), ("1", "b:a"), ("1", "c:b:a")]
    assert bars("y ~ 1 + (1 | a:b)") == [("1", "a:b")]


def test_several_terms_and_factor_slopes():
    assert bars("y ~ x + (1 | a) + (0 + f | b) + (x | a)") == [("1", "a"), ("0 + f", "b"), ("x", "a")]


def test_offset_and_cbind():
    pf = parse_formula("cbind(s, n - s) ~ period + offset(log(n)) + (1 | herd)")
    assert pf.response == "cbind(s, n - s)"
    assert pf.fixed == "period"
    assert pf.offsets == ("log(n)",)


def test_fixed_part_keeps_transformations_and_subtraction():
    pf = parse_formula("y ~ a*b + I(x**2) - 1 + (1|g)")
    assert pf.fixed == "a*b + I(x**2) - 1"
    assert parse_formula("y ~ (1|g)").fixed == "1"


@pytest.mark.parametrize(
    "formula,message,caret",
    [
        ("y ~ x + (1|g", "unclosed '('", 8),
        ("y ~ x)", "unmatched ')'", 5),
        ("y ~ x + 1|g", "enclosed in parentheses", 9),
        ("y ~ x + (|g)", "nothing before '|'", 9),
        ("y ~ x + (1|)", "no grouping factor", 10),
        ("y x", "no '~'", 0),
        ("y ~ x + (1|g+h)", "not a variable name", 11),
        ("~ x + (1|g)", "no response", 0),
        ("y ~ ", "nothing on the right", 2),
        ("y ~ x ~ z", "more than one '~'", 6),
    ],
)
def test_malformed_formulas_point_at_the_problem(formula, message, caret):
    with pytest.raises(FormulaError, match=re.escape(message)) as ei:
        parse_formula(formula)
    lines = str(ei.value).splitlines()
    assert lines[-2].strip() == formula.strip()
    assert lines[-1].index("^") - 4 == caret


def test_not_a_string():
    with pytest.raises(FormulaError):
        parse_formula(3)


# -- issue 8 (reliability): formula errors point at the problem, lme4's forms are accepted ---------------
def test_bare_bar_as_the_whole_right_hand_side_is_lme4s_term():
    pf = parse_formula("Yield ~ 1 | Batch")
    assert pf.fixed == "1" and bars("Yield ~ 1 | Batch") == [("1", "Batch")]
    assert bars("y ~ x || g") == [("1", "g"), ("0 + x", "g")]
    with pytest.raises(FormulaError, match="enclosed in parentheses"):  # R would read (x + 1 | g): refused
        parse_formula("y ~ x + 1 | g")


@pytest.mark.parametrize(
    "formula,message,caret",
    [
        ("y ~ x + (1 | g) @", "unexpected '@' after the random-effects term", 16),
        ("y ~ x * (1 | g)", "cannot be combined with other terms by '*'", 6),
        ("y ~ x + z:(1 | g)", "by ':'", 9),
    ],
)
def test_text_around_a_bar_term_is_pointed_at(formula, message, caret):
    with pytest.raises(FormulaError, match=re.escape(message)) as ei:
        parse_formula(formula)
    assert ei.value.position == caret


def test_non_ascii_and_backquoted_names_are_grouping_factors():
    assert bars("y ~ x + (1 | группа)") == [("1", "группа")]
    assert bars("y ~ x + (1 | `my group`)") == [("1", "`my group`")]
    assert bars("y ~ x + (1 | 学校/班级)") == [("1", "学校"), ("1", "班级:学校")]


def test_formulaic_messages_carry_no_terminal_colour_codes():
    with pytest.raises(FormulaError) as ei:
        parse_formula("y ~ x + (x +* 1 || g)")
    assert "\x1b[" not in str(ei.value) and "+*" in str(ei.value)
