"""Classic mixed-model data sets shipped with stochmm.

``load(name)`` returns a fresh :class:`pandas.DataFrame` whose factor columns are
pandas categoricals in R's level order, so model matrices and coefficient names
line up with lme4's. ``list()`` names what is available.

Examples
--------
>>> import stochmm as sm
>>> df = sm.datasets.load("sleepstudy")
>>> df.shape
(180, 3)
>>> df["Subject"].cat.categories[:3].tolist()
['308', '309', '310']
"""

from __future__ import annotations

import builtins
import json
from functools import cache, lru_cache
from importlib import resources

import pandas as pd

__all__ = ["load", "list", "describe"]

# public name -> (file stem, one-line description)
_CATALOGUE: dict[str, tuple[str, str]] = {
    "sleepstudy": ("sleepstudy", "Reaction times under sleep deprivation (18 subjects x 10 days); lme4."),
    "dyestuff": ("Dyestuff", "Yield of dyestuff by batch of intermediate product (6 x 5); lme4."),
    "dyestuff2": ("Dyestuff2", "Simulated Dyestuff-like data with zero batch variance; lme4."),
    "cbpp": ("cbpp", "Contagious bovine pleuropneumonia incidence by herd and period; lme4."),
    "verbagg": ("VerbAgg", "Verbal aggression item responses (316 persons x 24 items); lme4."),
    "insteval": ("InstEval", "ETH Zurich lecture evaluations (73421 ratings, crossed s x d); lme4."),
    "pastes": ("Pastes", "Paste strength by batch and cask (nested, 10 x 3 x 2); lme4."),
    "penicillin": ("Penicillin", "Penicillin assay diameters (24 plates x 6 samples, crossed); lme4."),
    "cake": ("cake", "Breakage angle of chocolate cakes by recipe, replicate and baking temperature; lme4."),
    "oats": ("Oats", "Split-plot oats yield trial (6 blocks, 3 varieties, 4 nitrogen levels); nlme."),
}


def _data_dir():
    return resources.files(__name__) / "data"


@lru_cache(maxsize=1)
def _levels() -> dict:
    return json.loads((_data_dir() / "levels.json").read_text())


@lru_cache(maxsize=1)
def _ordered() -> dict:
    return json.loads((_data_dir() / "ordered_factors.json").read_text())


def list() -> builtins.list[str]:  # noqa: A001 - mirrors statsmodels/seaborn naming
    """list() -> list[str]

    Names of the bundled data sets that :func:`load` accepts.
    """
    return [n for n, (stem, _) in _CATALOGUE.items() if _path(stem) is not None]


def describe() -> pd.DataFrame:
    """describe() -> DataFrame

    One row per bundled data set: name, rows, columns and a description.
    """
    rows = []
    for name in list():
        df = load(name)
        rows.append({"name": name, "rows": len(df), "columns": ", ".join(df.columns),
                     "description": _CATALOGUE[name][1]})
    return pd.DataFrame(rows)


def _path(stem: str):
    d = _data_dir()
    for suffix in (".csv", ".csv.gz"):
        p = d / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


@cache
def _load_cached(name: str) -> pd.DataFrame:
    stem = _CATALOGUE[name][0]
    path = _path(stem)
    levels = _levels().get(stem, {})
    ordered = set(_ordered().get(stem, []))
    with resources.as_file(path) as p:
        df = pd.read_csv(p, dtype={c: str for c in levels})
    for col, lev in levels.items():
        df[col] = pd.Categorical(df[col], categories=lev, ordered=col in ordered)
    return df


def load(name: str) -> pd.DataFrame:
    """load(name) -> DataFrame

    Load a bundled data set by (case-insensitive) name.

    Parameters
    ----------
    name : str
        One of :func:`list`, e.g. ``"sleepstudy"`` or ``"InstEval"``.

    Returns
    -------
    pandas.DataFrame
        A new copy each call: factor columns are categoricals with R's level order
        (ordered categoricals where R uses ordered factors).

    Examples
    --------
    >>> import stochmm as sm
    >>> cbpp = sm.datasets.load("cbpp")
    >>> cbpp["period"].cat.categories.tolist(), cbpp.shape
    (['1', '2', '3', '4'], (56, 4))
    """
    key = name.lower()
    if key not in _CATALOGUE or _path(_CATALOGUE[key][0]) is None:
        import difflib

        near = difflib.get_close_matches(key, list(), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise KeyError(f"no bundled data set named {name!r}.{hint} Available: {', '.join(list())}")
    return _load_cached(key).copy()
