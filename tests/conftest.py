"""Shared fixtures: pinned lme4 reference values (tests never need R)."""

import json
from pathlib import Path

import pytest

REF_DIR = Path(__file__).parent / "reference"


def _load(name):
    data = json.loads((REF_DIR / name).read_text())
    return {r["id"]: r for r in data} if isinstance(data, list) else data


@pytest.fixture(scope="session")
def lme4_refs():
    """lme4 1.1-31 fits: the shared set plus models/reference/make_extra_refs.R."""
    refs = _load("lme4_results.json")
    refs.update(_load("lme4_extra_results.json"))
    return refs


@pytest.fixture(scope="session")
def devfun_points():
    pts = _load("lme4_devfun_points.json")
    pts.update(_load("lme4_extra_devfun_points.json"))
    return pts
