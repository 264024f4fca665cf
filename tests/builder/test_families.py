"""Response families and links (stochmm.builder.families), and the bad-input errors of glmer.

Reference numbers: lme4 1.1-31 via tests/reference/lme4_results.json and
lme4_extra_results.json (``saturated_minus2logLik``, ``sum_lgamma_y_plus_1``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

import stochmm as sm
from stochmm.builder.families import Binomial, Family, FamilyError, Poisson, get_family
from stochmm.errors import DataError, MissingDataWarning

REF = Path(__file__).resolve().parents[1] / "reference"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


def _ref(name):
    return {e["id"]: e for e in json.loads((REF / name).read_text())}


@pytest.fixture(scope="module")
def cbpp():
    return sm.datasets.load("cbpp")


FAMILIES = [Binomial("logit"), Binomial("probit"), Binomial("cloglog"), Poisson()]


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.label)
def test_derivatives_match_finite_differences(fam):
    rng = np.random.default_rng(1)
    eta = rng.normal(size=400) * 3.0
    wt = rng.integers(1, 6, size=400).astype(float)
    y = rng.integers(0, 6, size=400).astype(float)
    if fam.name == "binomial":
        y = np.minimum(y, wt) / wt
    d = fam.derivs(y, eta, wt, 3)
    h = 1e-5
    for j in range(3):
        fd = (fam.derivs(y, eta + h, wt, 3)[j] - fam.derivs(y, eta - h, wt, 3)[j]) / (2 * h)
        np.testing.assert_allclose(fd, d[j + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.label)
def test_closed_forms_match_generic_chain_rule(fam):
    # the closed forms are what a new link would get from Family.derivs via Link.mu_derivs
    rng = np.random.default_rng(2)
    eta = rng.normal(size=300)
    wt = rng.integers(1, 6, size=300).astype(float)
    y = rng.integers(0, 6, size=300).astype(float)
    if fam.name == "binomial":
        y = np.minimum(y, wt) / wt
    for a, b in zip(Family.derivs(fam, y, eta, wt, 3), fam.derivs(y, eta, wt, 3)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10)


def test_extreme_linear_predictors_stay_finite():
    eta = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    y, wt = np.array([1.0, 0.0, 1.0, 1.0, 0.0]), np.ones(5)
    for fam in FAMILIES[:3]:
        out = fam.derivs(y, eta, wt, 3)
        assert all(np.all(np.isfinite(v[1:4])) for v in out), fam.label
    # log-likelihood kernel of a certain event is 0, of an impossible one very negative
    assert Binomial().derivs(np.array([1.0]), np.array([40.0]), np.ones(1), 0)[0][0] == pytest.approx(0.0, abs=1e-15)


def test_fisher_weights_equal_observed_for_canonical_links():
    rng = np.random.default_rng(3)
    eta, wt = rng.normal(size=50), rng.integers(1, 5, size=50).astype(float)
    for fam, y in ((Binomial(), rng.random(50)), (Poisson(), rng.integers(0, 5, 50).astype(float))):
        np.testing.assert_allclose(fam.fisher_weights(eta, wt), -fam.derivs(y, eta, wt, 2)[2], rtol=1e-12)
    probit = Binomial("probit")
    y = rng.random(50)
    assert not np.allclose(probit.fisher_weights(eta, wt), -probit.derivs(y, eta, wt, 2)[2])


def test_constants_and_saturated_loglik_match_lme4(cbpp):
    # lme4 1.1-31 (lme4_results.json cbpp_agq1: saturated_minus2logLik = 83.9567075378711;
    # lme4_extra_results.json cbpp_pois_agq1: saturated 91.17340964016282, sum lgamma(y+1) 86.6488874341181)
    ref = _ref("lme4_results.json")["cbpp_agq1"]["results"]
    m = sm.Model(CBPP, cbpp, family="binomial")
    fam = get_family("binomial")
    assert -2 * fam.saturated_loglik(m) == pytest.approx(ref["saturated_minus2logLik"], abs=1e-10)
    n, s = cbpp["size"].to_numpy(), cbpp["incidence"].to_numpy()
    np.testing.assert_allclose(fam.constant(m), special.gammaln(n + 1) - special.gammaln(s + 1) - special.gammaln(n - s + 1))
    pref = _ref("lme4_extra_results.json")["cbpp_pois_agq1"]["results"]
    mp = sm.Model("incidence ~ period + offset(log(size)) + (1 | herd)", cbpp, family="poisson")
    pois = get_family("poisson")
    assert -2 * pois.saturated_loglik(mp) == pytest.approx(pref["saturated_minus2logLik"], abs=1e-10)
    assert -pois.constant(mp).sum() == pytest.approx(pref["sum_lgamma_y_plus_1"], abs=1e-10)


def test_proportions_with_weights_have_the_cbind_constants(cbpp):
    prop = cbpp.assign(prop=cbpp["incidence"] / cbpp["size"])
    m1 = sm.Model(CBPP, cbpp, family="binomial")
    m2 = sm.Model("prop ~ period + (1 | herd)", prop, family="binomial", weights="size")
    fam = get_family("binomial")
    np.testing.assert_allclose(fam.constant(m1), fam.constant(m2))
    np.testing.assert_allclose(m1.weights, m2.weights)


def test_get_family_names_links_and_errors():
    assert get_family("binomial").link.name == "logit"
    assert get_family("binomial", "probit").label == "binomial  ( probit )"
    assert get_family("binomial(link = 'cloglog')").link.name == "cloglog"
    assert get_family("poisson").canonical
    fam = Binomial("probit")
    assert get_family(fam) is fam
    assert get_family(fam, "cloglog").link.name == "cloglog"
    with pytest.raises(FamilyError, match="link 'log' is not supported for the binomial family"):
        get_family("binomial", "log")
    with pytest.raises(FamilyError, match="link 'sqrt' is not supported for the poisson family"):
        get_family("poisson", "sqrt")
    with pytest.raises(FamilyError, match="unsupported family 'Gamma'"):
        get_family("Gamma")
    with pytest.raises(FamilyError, match="lmer"):
        get_family("gaussian")
    with pytest.raises(FamilyError):
        get_family(3.0)


# ------------------------------------------------------------------------------- bad input
def test_bad_binomial_responses(cbpp):
    df = cbpp.assign(p=cbpp["incidence"] / cbpp["size"])
    with pytest.raises(DataError, match="must be 0/1"):
        sm.glmer("p ~ period + (1 | herd)", df)  # proportions without weights
    with pytest.raises(DataError, match=r"proportions must lie in \[0, 1\]"):
        sm.glmer("p2 ~ period + (1 | herd)", df.assign(p2=df["p"] + 1.0), weights="size")
    with pytest.raises(DataError, match="non-integer number of successes"):
        sm.glmer("p ~ period + (1 | herd)", df, weights=np.full(len(df), 2.5))
    with pytest.raises(DataError, match="non-negative"):
        sm.glmer("cbind(incidence - 5, size) ~ period + (1 | herd)", cbpp)
    with pytest.raises(DataError, match="factor with 3 levels"):
        sm.glmer("resp ~ Anger + (1 | id)", sm.datasets.load("VerbAgg"))


def test_bad_poisson_weights_and_family(cbpp):
    with pytest.raises(DataError, match="non-negative counts"):
        sm.glmer("y ~ period + (1 | herd)", cbpp.assign(y=cbpp["incidence"] - 3), family="poisson")
    with pytest.raises(DataError, match="whole-number counts"):
        sm.glmer("y ~ period + (1 | herd)", cbpp.assign(y=cbpp["incidence"] + 0.5), family="poisson")
    with pytest.raises(DataError, match="weights must be positive"):
        sm.glmer(CBPP, cbpp, weights=np.r_[0.0, np.ones(len(cbpp) - 1)])
    with pytest.raises(FamilyError, match="not supported"):
        sm.glmer(CBPP, cbpp, link="identity")
    with pytest.raises(FamilyError):
        sm.glmer(CBPP, cbpp, family="gaussian")


def test_missing_values_dropped_with_counted_warning(cbpp):
    df = cbpp.copy()
    df["incidence"] = df["incidence"].astype(float)
    df.loc[[0, 5, 9], "incidence"] = np.nan
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit = sm.glmer(CBPP, df)
    msgs = [str(w.message) for w in rec if issubclass(w.category, MissingDataWarning)]
    assert msgs and msgs[0].startswith("3 of 56 rows dropped")
    assert fit.nobs == 53


def test_binary_response_codings_agree(cbpp):
    # one Bernoulli row per animal: the same model as the cbind fit up to the binomial coefficients
    rows = []
    for _, r in cbpp.iterrows():
        rows += [(r["herd"], r["period"], 1)] * int(r["incidence"]) + [(r["herd"], r["period"], 0)] * int(r["size"] - r["incidence"])
    b = pd.DataFrame(rows, columns=["herd", "period", "y"])
    b["herd"] = pd.Categorical(b["herd"], categories=cbpp["herd"].cat.categories)
    b["period"] = pd.Categorical(b["period"], categories=cbpp["period"].cat.categories)
    f01 = sm.glmer("y ~ period + (1 | herd)", b)
    fbool = sm.glmer("y ~ period + (1 | herd)", b.assign(y=b["y"].astype(bool)))
    ffac = sm.glmer("y ~ period + (1 | herd)", b.assign(y=pd.Categorical(np.where(b["y"] == 1, "yes", "no"))))
    fcb = sm.glmer(CBPP, cbpp)
    for f in (fbool, ffac):
        assert f.objective == pytest.approx(f01.objective, abs=1e-8)
    lchoose = get_family("binomial").constant(sm.Model(CBPP, cbpp, family="binomial")).sum()
    assert fcb.objective == pytest.approx(f01.objective - 2 * lchoose, abs=1e-6)
    np.testing.assert_allclose(f01.fixef, fcb.fixef, rtol=1e-5)
