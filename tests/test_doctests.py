"""The examples in the docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import stochmm

MODULES = sorted({m.name for m in pkgutil.walk_packages(stochmm.__path__, "stochmm.")} | {"stochmm"})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0
