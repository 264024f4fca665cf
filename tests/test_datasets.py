import pandas as pd
import pytest

import stochmm as sm


def test_list_has_required_sets():
    names = sm.datasets.list()
    for n in ["sleepstudy", "dyestuff", "dyestuff2", "cbpp", "verbagg", "insteval", "pastes", "penicillin", "oats"]:
        assert n in names


@pytest.mark.parametrize("name,shape", [("sleepstudy", (180, 3)), ("dyestuff", (30, 2)), ("dyestuff2", (30, 2)),
                                        ("cbpp", (56, 4)), ("verbagg", (7584, 9)), ("insteval", (73421, 7)),
                                        ("pastes", (60, 4)), ("penicillin", (144, 3)), ("oats", (72, 5))])
def test_shapes(name, shape):
    assert sm.datasets.load(name).shape == shape


def test_factors_in_r_level_order():
    ie = sm.datasets.load("InstEval")  # case-insensitive
    assert isinstance(ie["dept"].dtype, pd.CategoricalDtype)
    # R's level order of dept is not sorted: 15, 5, 10, 12, ...
    assert list(ie["dept"].cat.categories[:4]) == ["15", "5", "10", "12"]
    assert ie["studage"].cat.ordered  # R ordered factor
    assert list(sm.datasets.load("sleepstudy")["Subject"].cat.categories[:2]) == ["308", "309"]


def test_load_returns_a_fresh_copy():
    a = sm.datasets.load("dyestuff")
    a.loc[0, "Yield"] = -1
    assert sm.datasets.load("dyestuff").loc[0, "Yield"] == 1545


def test_unknown_name_suggests():
    with pytest.raises(KeyError, match="sleepstudy"):
        sm.datasets.load("sleepstdy")


def test_describe():
    d = sm.datasets.describe()
    assert set(d.columns) == {"name", "rows", "columns", "description"}
    assert int(d.set_index("name").loc["insteval", "rows"]) == 73421
