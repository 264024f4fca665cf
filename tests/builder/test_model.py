"""The builder: X, y, Z, Λ(θ), θ bounds and names, and every bad-input message."""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import stochmm as sm
from stochmm.builder.model import r_column_name
from stochmm.errors import (
    DataError,
    DesignError,
    FormulaError,
    MissingColumnError,
    MissingDataWarning,
    RankDeficiencyWarning,
)


@pytest.fixture(scope="module")
def sleep():
    return sm.datasets.load("sleepstudy")


def test_sleepstudy_structures(sleep):
    m = sm.Model("Reaction ~ Days + (Days | Subject)", sleep)
    assert m.X.shape == (180, 2) and m.xnames == ["(Intercept)", "Days"]
    np.testing.assert_array_equal(m.y, sleep["Reaction"].to_numpy())
    assert sp.isspmatrix_csc(m.Z) and m.Z.shape == (180, 36)
    # Khatri–Rao, level-major within the term: row i has (1, Days_i) in columns 2*level, 2*level+1
    Zd = m.Z.toarray()
    lev = sleep["Subject"].cat.codes.to_numpy()
    for i in (0, 17, 179):
        expected = np.zeros(36)
        expected[2 * lev[i]], expected[2 * lev[i] + 1] = 1.0, sleep["Days"][i]
        np.testing.assert_array_equal(Zd[i], expected)
    assert m.theta_names == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]
    np.testing.assert_array_equal(m.theta0, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(m.lower, [0.0, -np.inf, 0.0])
    T = m.lambda_blocks([2.0, 0.5, 3.0])[0]
    np.testing.assert_array_equal(T, [[2.0, 0.0], [0.5, 3.0]])
    L = m.Lambda(np.array([2.0, 0.5, 3.0]))
    assert sp.issparse(L) and L.shape == (36, 36)
    np.testing.assert_array_equal(L.toarray(), np.kron(np.eye(18), T))
    assert m.ngroups == {"Subject": 18}


def test_insteval_names_match_lme4(lme4_refs):
    m = sm.Model("y ~ service * dept + (1 | s) + (1 | d)", sm.datasets.load("insteval"))
    assert m.xnames == list(lme4_refs["insteval_ML"]["results"]["fixef"])
    assert [t.group for t in m.terms] == ["s", "d"] and m.q == 2972 + 1128


def test_terms_sorted_by_levels_stably():
    ie = sm.datasets.load("penicillin")
    m = sm.Model("diameter ~ 1 + (1 | sample) + (1 | plate)", ie)
    assert [t.group for t in m.terms] == ["plate", "sample"]  # 24 before 6
    assert m.theta_names == ["plate.(Intercept)", "sample.(Intercept)"]


def test_double_bar_nesting_and_interaction(sleep):
    m = sm.Model("Reaction ~ Days + (Days || Subject)", sleep)
    assert [(t.group, t.cnames) for t in m.terms] == [("Subject", ["(Intercept)"]), ("Subject", ["Days"])]
    assert m.theta_names == ["Subject.(Intercept)", "Subject.Days"]
    p = sm.datasets.load("pastes")
    m = sm.Model("strength ~ 1 + (1 | batch/cask)", p)
    assert [(t.group, t.nlev) for t in m.terms] == [("cask:batch", 30), ("batch", 10)]
    assert list(m.terms[0].levels[:3]) == ["a:A", "a:B", "a:C"]  # lme4's level order
    m2 = sm.Model("strength ~ 1 + (1 | cask:batch) + (1 | batch)", p)
    np.testing.assert_array_equal(m2.Z.toarray(), m.Z.toarray())


def test_factor_slopes_and_numeric_grouping():
    ob = sm.datasets.load("oats")
    m = sm.Model("yield ~ 1 + (0 + Variety | Block)", ob)
    assert m.terms[0].cnames == ["VarietyGolden Rain", "VarietyMarvellous", "VarietyVictory"]
    assert m.terms[0].ntheta == 6
    d = pd.DataFrame({"y": np.arange(12.0), "g": np.repeat([10, 2, 33], 4), "x": np.tile([0.0, 1, 2, 3], 3)})
    m = sm.Model("y ~ x + (1 | g)", d)
    assert list(m.terms[0].levels) == ["2", "10", "33"]  # numeric levels sort numerically, as factor() does


def test_binomial_responses():
    cb = sm.datasets.load("cbpp")
    m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", cb, family="binomial")
    np.testing.assert_allclose(m.y, cb["incidence"] / cb["size"])
    np.testing.assert_array_equal(m.weights, cb["size"].to_numpy(float))
    assert m.xnames == ["(Intercept)", "period2", "period3", "period4"]
    cb2 = cb.assign(prop=cb["incidence"] / cb["size"])
    m2 = sm.Model("prop ~ period + (1 | herd)", cb2, family="binomial", weights="size")
    np.testing.assert_allclose(m2.y, m.y)
    np.testing.assert_array_equal(m2.weights, m.weights)
    va = sm.datasets.load("verbagg")
    m = sm.Model("r2 ~ Anger + (1 | id)", va, family="binomial")  # two-level factor: first level = failure
    np.testing.assert_array_equal(m.y, (va["r2"] == "Y").to_numpy(float))
    m = sm.Model("yb ~ Anger + (1 | id)", va.assign(yb=va["r2"] == "Y"), family="binomial")
    assert m.y.sum() == (va["r2"] == "Y").sum()


def test_offsets():
    cb = sm.datasets.load("cbpp")
    m = sm.Model("incidence ~ period + offset(log(size)) + (1 | herd)", cb, family="poisson")
    np.testing.assert_allclose(m.offset, np.log(cb["size"]))
    m2 = sm.Model("incidence ~ period + (1 | herd)", cb, family="poisson", offset=np.log(cb["size"]))
    np.testing.assert_allclose(m2.offset, m.offset)


def test_new_design(sleep):
    m = sm.Model("Reaction ~ Days + (Days | Subject)", sleep)
    nd = pd.DataFrame({"Days": [0.0, 3.0], "Subject": ["309", "999"]})
    X, re = m.new_design(nd)
    np.testing.assert_array_equal(X, [[1.0, 0.0], [1.0, 3.0]])
    refs, z = re[0]
    assert list(refs) == [1, -1]  # an unseen level gets -1
    np.testing.assert_array_equal(z, [[1.0, 0.0], [1.0, 3.0]])


# ------------------------------------------------------------------------------------- bad input
def test_misspelt_column_names_near_match(sleep):
    with pytest.raises(MissingColumnError, match="'Reactoin'.*Did you mean 'Reaction'"):
        sm.Model("Reactoin ~ Days + (Days | Subject)", sleep)
    with pytest.raises(MissingColumnError, match="grouping factor.*'subject'.*Did you mean 'Subject'"):
        sm.Model("Reaction ~ Days + (Days | subject)", sleep)


def test_malformed_bar_term_shows_where(sleep):
    with pytest.raises(FormulaError, match=r"nothing before '\|'") as ei:
        sm.Model("Reaction ~ Days + ( | Subject)", sleep)
    assert "^" in str(ei.value)


def test_single_level_grouping_factor(sleep):
    d = sleep[sleep["Subject"] == "308"]
    with pytest.raises(DesignError, match="'Subject'.*single level.*'308'"):
        sm.Model("Reaction ~ Days + (1 | Subject)", d)


def test_more_random_effects_than_observations():
    d = pd.DataFrame({"y": np.arange(10.0), "x": np.arange(10.0), "g": list("aabbccddee")})
    with pytest.raises(DesignError, match=r"number of observations \(10\) <= number of random effects \(10\)"):
        sm.Model("y ~ 1 + (x | g)", d)
    d2 = d.assign(g=list("abcdefghij"))
    with pytest.raises(DesignError, match="levels of grouping factor 'g' \\(10\\) must be less"):
        sm.Model("y ~ 1 + (1 | g)", d2)


def test_nas_dropped_with_counted_warning(sleep):
    d = sleep.copy()
    d.loc[[0, 5, 7], "Reaction"] = np.nan
    d.loc[[9], "Days"] = np.nan
    with pytest.warns(MissingDataWarning, match=r"4 of 180 rows dropped.*Reaction: 3, Days: 1"):
        m = sm.Model("Reaction ~ Days + (Days | Subject)", d)
    assert m.n == 176 and m.n_dropped_na == 4


def test_rank_deficient_X_drops_named_columns(sleep):
    d = sleep.assign(Days2=2 * sleep["Days"], c=3.0)
    with pytest.warns(RankDeficiencyWarning, match="dropping 1 column.*Days2"):
        m = sm.Model("Reaction ~ Days + Days2 + (1 | Subject)", d)
    assert m.xnames == ["(Intercept)", "Days"] and m.dropped_columns == ["Days2"]
    fit = sm.lmer("Reaction ~ Days + (1 | Subject)", sleep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit2 = sm.lmer("Reaction ~ Days + Days2 + (1 | Subject)", d)
    assert fit2.objective == pytest.approx(fit.objective, abs=1e-8)


def test_no_random_effects_names_alternative(sleep):
    with pytest.raises(DesignError, match="no random-effects terms.*statsmodels.formula.api.ols"):
        sm.lmer("Reaction ~ Days", sleep)
    with pytest.raises(DesignError, match="statsmodels.formula.api.glm"):
        sm.Model("incidence ~ period", sm.datasets.load("cbpp"), family="poisson")


def test_empty_data_and_not_a_dataframe(sleep):
    with pytest.raises(DataError, match="no rows"):
        sm.Model("Reaction ~ Days + (1 | Subject)", sleep.iloc[:0])
    with pytest.raises(DataError, match="pandas DataFrame"):
        sm.Model("Reaction ~ Days + (1 | Subject)", sleep.to_dict())


def test_bad_binomial_and_poisson_responses():
    cb = sm.datasets.load("cbpp")
    with pytest.raises(DataError, match=r"must be 0/1.*found \[2\.0, 3\.0"):
        sm.Model("incidence ~ period + (1 | herd)", cb, family="binomial")
    with pytest.raises(DataError, match="non-integer number of successes"):
        sm.Model("p ~ period + (1 | herd)", cb.assign(p=cb["incidence"] / cb["size"]), family="binomial",
                 weights=cb["size"] + 0.5)
    with pytest.raises(DataError, match=r"proportions must lie in \[0, 1\]"):
        sm.Model("p ~ period + (1 | herd)", cb.assign(p=cb["incidence"] * 1.0), family="binomial", weights="size")
    with pytest.raises(DataError, match="non-negative"):
        sm.Model("cbind(incidence, incidence - size) ~ period + (1 | herd)", cb, family="binomial")
    va = sm.datasets.load("verbagg")
    with pytest.raises(DataError, match="factor with 3 levels"):
        sm.Model("resp ~ Anger + (1 | id)", va, family="binomial")
    with pytest.raises(DataError, match="Poisson response must be non-negative"):
        sm.Model("y ~ period + (1 | herd)", cb.assign(y=cb["incidence"] - 1), family="poisson")
    with pytest.raises(DataError, match="weights must be positive"):
        sm.Model("incidence ~ period + (1 | herd)", cb, family="poisson", weights=np.zeros(56))
    with pytest.raises(DataError, match="unsupported family 'gamma'"):
        sm.Model("incidence ~ period + (1 | herd)", cb, family="gamma")
    with pytest.raises(DataError, match="use family='binomial'"):
        sm.Model("r2 ~ Anger + (1 | id)", va)


def test_callers_dataframe_is_never_mutated(sleep):
    d = sleep.copy()
    d.loc[3, "Reaction"] = np.nan
    d["Subject"] = d["Subject"].cat.add_categories(["unused"])
    before = d.copy(deep=True)
    dtypes = d.dtypes.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm.lmer("Reaction ~ Days + (Days | Subject)", d)
        sm.Model("Reaction ~ Days + (Days || Subject)", d)
    pd.testing.assert_frame_equal(d, before)
    pd.testing.assert_series_equal(d.dtypes, dtypes)
    assert "unused" in d["Subject"].cat.categories


def test_r_column_names():
    assert r_column_name("Intercept") == "(Intercept)"
    assert r_column_name("period[T.2]") == "period2"
    assert r_column_name("service[T.1]:dept[T.5]") == "service1:dept5"
    assert r_column_name("f[a]") == "fa"
    assert r_column_name("I(x ** 2)") == "I(x^2)"
    assert r_column_name("I(`my.x` ** 2)") == "I(my.x^2)"


def test_xterms_and_fixed_spec():
    m = sm.Model("yield ~ nf * Variety + (1 | Block/Variety)", sm.datasets.load("oats"))
    assert m.xterms == ["(Intercept)"] + ["nf"] * 3 + ["Variety"] * 2 + ["nf:Variety"] * 6
    assert len(m.fixed_keep) == len(m.fixed_spec.column_names) == 12
    ie = sm.Model("y ~ studage + (1 | s)", sm.datasets.load("insteval"))
    assert ie.xterms == ["(Intercept)", "studage", "studage", "studage"]  # contr.poly, named for the factor


# ---------------------------------------------------------------- review findings (each was a bug)
def _toy(n=300, seed=0):
    rng = np.random.default_rng(seed)
    d = pd.DataFrame({"y": rng.normal(size=n) + 2.0, "x": rng.normal(size=n), "z": rng.normal(size=n),
                      "a": rng.integers(0, 10, n), "b": rng.integers(0, 4, n), "g": rng.integers(0, 12, n)})
    d["y"] += 2.0 * rng.normal(size=12)[d["g"]]
    return d


def test_rank_check_uses_r_tolerance_on_the_residual_norm():
    """R's qr() keeps I(yr^2) for uncentred calendar years (|R_jj|/|x_j| ~ 8e-6 > 1e-7)."""
    rng = np.random.default_rng(0)
    d = pd.DataFrame({"y": rng.normal(size=200), "yr": 2000 + rng.integers(0, 21, 200).astype(float),
                      "g": rng.integers(0, 10, 200)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sm.Model("y ~ yr + I(yr^2) + (1 | g)", d).xnames == ["(Intercept)", "yr", "I(yr^2)"]


def test_predict_matches_levels_by_value_and_handles_missing():
    d = _toy()
    f = sm.lmer("y ~ x + (1 | g)", d)
    nd = d.head(4).assign(g=lambda t: t["g"].astype(float))  # int in the fit, float here
    np.testing.assert_allclose(f.predict(nd), f.fitted[:4], atol=1e-12)
    f2 = sm.lmer("y ~ x + (1 | a:b)", d)
    nd = d.head(3).assign(b=lambda t: t["b"].astype(float))
    nd.loc[0, "b"] = np.nan
    p = f2.predict(nd)
    np.testing.assert_allclose(p[1:], f2.fitted[1:3], atol=1e-12)
    with pytest.warns(UserWarning, match="none of the 'a:b' levels"):
        p0 = f2.predict(nd.head(1))
    assert p[0] == pytest.approx(p0[0]) == pytest.approx(f2.predict(nd.head(1), re_form=None)[0])  # no random effect
    with pytest.warns(UserWarning, match="none of the 'g' levels"):
        f.predict(d.head(2).assign(g=[99, 98]))


def test_nonfinite_transformed_response_rows_are_dropped_and_counted():
    d = _toy().assign(y=lambda t: t["y"] - 2.0)
    with pytest.warns(MissingDataWarning, match=r"rows dropped because a transformation is not finite.*log\(y\)"):
        m = sm.Model("log(y) ~ x + (1 | g)", d)
    assert m.n == int((d["y"] > 0).sum()) and np.all(np.isfinite(m.y))


def test_double_bar_splits_formula_terms_like_lme4():
    m = sm.Model("y ~ x + (x * z || g)", _toy())
    assert [t.cnames for t in m.terms] == [["(Intercept)"], ["x"], ["z"], ["x:z"]]
    assert len(m.theta0) == 4


def test_dotted_column_names_as_in_data_from_r():
    d = _toy().rename(columns={"x": "my.x", "g": "my.g"})
    d["succ.n"] = (d["a"] % 5).astype(float)
    assert sm.Model("y ~ my.x + (1 | my.g)", d).xnames == ["(Intercept)", "my.x"]
    assert sm.Model("y ~ `my.x` + (my.x | my.g)", d).terms[0].cnames == ["(Intercept)", "my.x"]
    m = sm.Model("cbind(succ.n, 5 - succ.n) ~ my.x + (1 | my.g)", d, family="binomial")
    np.testing.assert_allclose(m.y, d["succ.n"] / 5)
    with pytest.raises(MissingColumnError, match="'my.z'.*Did you mean 'my.x'"):
        sm.Model("y ~ my.z + (1 | my.g)", d)


def test_mixed_type_grouping_column_and_logical_columns():
    d = _toy()
    d["gm"] = d["g"].astype(object)
    d.loc[3, "gm"] = "x"
    m = sm.Model("y ~ x + (1 | gm)", d)
    assert "x" in list(m.terms[0].levels) and m.terms[0].nlev == 13
    m = sm.Model("y ~ x + bb + (1 | g)", d.assign(bb=d["x"] > 0))
    assert m.xnames == ["(Intercept)", "x", "bbTRUE"]  # R's name for a logical column


# -- issue 8 (reliability): one rule for NA and non-finite values, numeric roles, odd columns ------------
def test_nonfinite_values_drop_rows_like_nas_counted_by_column(sleep):
    d = sleep.assign(Days=sleep["Days"].astype(float))
    d.loc[3, "Reaction"] = np.inf
    d.loc[5, "Days"] = -np.inf
    d.loc[7, "Days"] = np.nan
    w = np.ones(180)
    w[9] = np.inf
    off = np.zeros(180)
    off[11] = -np.inf
    with pytest.warns(MissingDataWarning, match=r"5 of 180 rows dropped because of missing or non-finite values "
                      r"\(Reaction: 1 infinite, Days: 1 NA \+ 1 infinite, weights: 1 infinite, offset: 1 infinite\)"):
        m = sm.Model("Reaction ~ Days + (1 | Subject)", d, weights=w, offset=off)
    assert m.n == 175 and m.n_dropped_na == 5
    np.testing.assert_array_equal(m.row_index, np.setdiff1d(np.arange(180), [3, 5, 7, 9, 11]))
    assert np.all(np.isfinite(m.X)) and np.all(np.isfinite(m.y)) and np.all(np.isfinite(m.offset))
    # a Poisson response with inf is dropped the same way, not reported as a PIRLS failure
    cb = sm.datasets.load("cbpp").assign(incidence=lambda t: t["incidence"].astype(float))
    cb.loc[0, "incidence"] = np.inf
    with pytest.warns(MissingDataWarning, match="incidence: 1 infinite"):
        assert sm.Model("incidence ~ period + (1 | herd)", cb, family="poisson").n == 55


def test_weights_and_offsets_must_be_numbers_aligned_to_the_data(sleep):
    f = "Reaction ~ Days + (1 | Subject)"
    for arg in ("weights", "offset"):
        with pytest.raises(DataError, match=f"{arg} column 'Subject' is not numeric .*not category labels"):
            sm.Model(f, sleep, **{arg: "Subject"})
        with pytest.raises(DataError, match=f"{arg} must be numbers"):
            sm.Model(f, sleep, **{arg: sleep["Subject"].astype(str).to_numpy()})
    with pytest.raises(DataError, match=r"weights must be one-dimensional.*shape \(180, 1\)"):
        sm.Model(f, sleep, weights=np.ones((180, 1)))
    with pytest.raises(DataError, match="weights has 179 values, but the data have 180 rows"):
        sm.Model(f, sleep, weights=np.ones(179))
    # a Series is aligned by index, as pandas aligns ...
    w = pd.Series(np.arange(1.0, 181.0), index=sleep.index)
    m = sm.Model(f, sleep, weights=w.iloc[::-1])
    np.testing.assert_array_equal(m.prior_weights, w.to_numpy())
    # ... and one whose index is not the data's is refused, never read by position
    with pytest.raises(DataError, match="index does not match the data's index"):
        sm.Model(f, sleep, offset=pd.Series(np.zeros(180), index=sleep.index + 1000))
    d = sleep.copy()
    sm.Model(f, d, weights=w, offset=w)
    pd.testing.assert_frame_equal(d, sleep)  # caller's data untouched


def test_dates_duplicate_columns_and_single_level_factors(sleep):
    d = sleep.assign(date=pd.Timestamp("2020-01-01") + pd.to_timedelta(sleep["Days"], unit="D"))
    with pytest.raises(DataError, match=r"column 'date' .*dates/times.*\.dt\.days"):
        sm.Model("Reaction ~ date + (1 | Subject)", d)
    dup = pd.concat([sleep, sleep[["Days"]]], axis=1)
    with pytest.raises(DataError, match="more than one column named 'Days'"):
        sm.Model("Reaction ~ Days + (1 | Subject)", dup)
    # a one-level factor and a constant numeric column are reported alike
    one = sleep.assign(site="A", k=2.0)
    with pytest.warns(RankDeficiencyWarning, match=r"dropping 1 column\(s\): site \(a factor with a single level"):
        m = sm.Model("Reaction ~ Days + site + (1 | Subject)", one)
    assert m.xnames == ["(Intercept)", "Days"] and m.dropped_columns == ["site"]
    with pytest.warns(RankDeficiencyWarning, match=r"dropping 1 column\(s\): k"):
        assert sm.Model("Reaction ~ Days + k + (1 | Subject)", one).dropped_columns == ["k"]


def test_any_valid_column_name_is_a_grouping_factor(sleep):
    d = sleep.rename(columns={"Subject": "группа", "Days": "дни"})
    f1 = sm.lmer("Reaction ~ дни + (дни | группа)", d)
    f2 = sm.lmer("Reaction ~ Days + (Days | Subject)", sleep)
    assert f1.objective == pytest.approx(f2.objective, abs=1e-10)
    assert list(f1.ranef) == ["группа"]


def test_predict_re_form_forms_and_refusals():
    pen = sm.datasets.load("penicillin")
    fit = sm.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", pen)
    m = fit.model
    plate = m.Z[:, m.z_slices[0]] @ fit.b[m.z_slices[0]]
    base = fit.fixef.iloc[0]
    np.testing.assert_allclose(fit.predict(re_form="~(1 | plate)"), base + plate)
    np.testing.assert_allclose(fit.predict(pen, re_form="~ (1|plate)"), base + plate)
    np.testing.assert_allclose(fit.predict(re_form="~(1|plate) + (1|sample)"), fit.fitted)
    for none in (None, "NA", "~0", np.nan):
        np.testing.assert_allclose(fit.predict(pen.head(3), re_form=none), [base] * 3)
    for bad, msg in (("none", "re_form must be"), ("~(1 | batch)", "not a random-effects term of the model"),
                     ("~ x + (1 | plate)", "names fixed-effects terms"), (0, "re_form must be")):
        with pytest.raises(DataError, match=re.escape(msg)):
            fit.predict(re_form=bad)
    # re_form=None needs no grouping column
    np.testing.assert_allclose(fit.predict(pen[[]].head(2).assign(x=1), re_form=None), [base] * 2)


def test_predict_bad_newdata_is_named(sleep):
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sleep)
    with pytest.raises(MissingColumnError, match=r"grouping factor 'Subject' is not a column.*re_form=None"):
        fit.predict(sleep.drop(columns="Subject"))
    with pytest.raises(MissingColumnError, match="fixed-effects variable 'Days'"):
        fit.predict(sleep.drop(columns="Days"))
    with pytest.raises(DataError, match="newdata must be a pandas DataFrame"):
        fit.predict(sleep.to_numpy())
    np.testing.assert_allclose(fit.predict(sleep.drop(columns="Subject"), re_form=None),
                               fit.fixef.iloc[0] + fit.fixef.iloc[1] * sleep["Days"])


def test_predict_unseen_fixed_level_is_nan_with_a_counted_warning():
    cb = sm.datasets.load("cbpp")
    fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", cb)
    nd = cb.head(3).assign(period=lambda t: t["period"].astype(str))
    nd.loc[0, "period"] = "5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"1 of 3 rows of newdata .*period: 1 row\(s\) with level\(s\) \['5'\]"):
            fit.predict(nd)
    with pytest.warns(UserWarning, match="not seen in the fit"):
        p = fit.predict(nd)
    assert np.isnan(p[0]) and np.allclose(p[1:], fit.fitted[1:3])


def test_predict_warns_when_the_fit_offset_is_not_in_newdata(sleep):
    d = sleep.assign(o=3.0)
    fit = sm.lmer("Reaction ~ Days + (1 | Subject)", d, offset="o")
    np.testing.assert_allclose(fit.predict(d.head(4)), fit.fitted[:4])  # the column is in newdata: used
    with pytest.warns(UserWarning, match="offset= argument that newdata does not provide"):
        p = fit.predict(sleep.head(4))
    np.testing.assert_allclose(p, fit.fitted[:4] - 3.0)
    fv = sm.lmer("Reaction ~ Days + (1 | Subject)", sleep, offset=np.full(180, 3.0))
    with pytest.warns(UserWarning, match="offset="):
        fv.predict(sleep.head(2))
    np.testing.assert_allclose(fv.predict(sleep.head(2), offset=[3.0, 3.0]), fv.fitted[:2])


def test_re_form_terms_match_by_their_effects(sleep):
    m = sm.Model("Reaction ~ Days + (Days || Subject)", sleep)
    assert m.re_terms("~(Days || Subject)") == [0, 1] and m.re_terms("~(0 + Days | Subject)") == [1]
    m = sm.Model("Reaction ~ Days + (Days | Subject)", sleep)
    assert m.re_terms("~(1 + Days | Subject)") == m.re_terms("~(Days|Subject)") == [0]
    with pytest.raises(DataError, match="not a random-effects term"):
        m.re_terms("~(0 + Days | Subject)")


def test_nonfinite_transformed_predictors_follow_the_same_rule(sleep):
    for f in ("Reaction ~ log(Days) + (1 | Subject)", "Reaction ~ Days + (log(Days) | Subject)"):
        with pytest.warns(MissingDataWarning, match=r"18 of 180 rows dropped .*log\(Days\): 18"):
            m = sm.Model(f, sleep)
        assert m.n == 162 and np.all(np.isfinite(m.X)) and np.all(np.isfinite(m.Z.data))
