"""Every model of the models/ catalogue against its pinned reference."""

from pathlib import Path

import pytest

from stochmm.catalogue import compare, fit_entry, load_catalogue, to_toml

MODELS = Path(__file__).resolve().parent.parent / "models"
ENTRIES = load_catalogue(MODELS)


def test_catalogue_is_complete():
    ids = {e.id for e in ENTRIES}
    for required in ["sleepstudy_slopes_REML", "sleepstudy_slopes_ML", "sleepstudy_dblbar_ML", "dyestuff_ML",
                     "dyestuff_REML", "dyestuff2_ML", "insteval_ML", "insteval_REML", "pastes_nested_ML",
                     "penicillin_crossed_ML"]:
        assert required in ids
    for e in ENTRIES:
        assert e.source and "objective" in e.reference, e.id


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.id for e in ENTRIES])
def test_entry_matches_reference(entry):
    fit = fit_entry(entry)
    table = compare(entry, fit)
    assert table["pass"].all(), "\n" + table.to_string()


def test_toml_round_trip(tmp_path):
    import tomllib

    entry = {"id": "x", "source": "s", "reference": {"objective": 1.5, "fixef": {"(Intercept)": 2.0, "a:b": -1e-20}}}
    text = to_toml(entry)
    assert tomllib.loads(text) == entry
