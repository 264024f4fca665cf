"""Moment estimators of variance components: ANOVA/EMS tables and sm.mom on pandas data.

Pinned numbers and their sources:

* lme4 1.1-31 REML fits (``lme4_refs`` fixture: tests/reference/*.json, made by R scripts);
* R 4.x ``summary(aov(yield ~ nf * Variety + Error(Block/Variety), Oats))`` (in the Oats entry);
* R 4.x ``anova(lm(terms(yield ~ nf + Variety + nf:Variety + Block + Block:Variety,
  keep.order = TRUE), data = Oats[-c(1, 5, 10, 22, 40, 41, 60), ]))`` — Type I SS of an
  unbalanced split plot — and ``anova(lm(Yield ~ Batch, Dyestuff[-c(1, 2, 3, 7, 20), ]))``;
* closed forms (balanced ANOVA algebra; the unbalanced one-way n₀ formula) and brute-force
  dense-matrix implementations written here, independent of the package code.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.errors import DataError, DesignError, MissingColumnError, MissingDataWarning
from stochmm.moments import NegativeEstimateWarning


def vc_ref(refs, key):
    return {v["group"]: v["vcov"] for v in refs[key]["results"]["varcorr"]}


# ------------------------------------------------------------------------------------------
# ANOVA / expected mean squares
# ------------------------------------------------------------------------------------------
def test_dyestuff_oneway_equals_reml(lme4_refs):
    fit = sm.anova_components("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    tab = fit.table
    # balanced one-way: MS_B = 56357.5/5, MS_E = 58830/24 (R: anova(lm(Yield ~ Batch)))
    assert tab.loc["Batch", "df"] == 5 and tab.loc["Residual", "df"] == 24
    assert tab.loc["Batch", "SS"] == pytest.approx(56357.5, rel=1e-12)
    assert tab.loc["Residual", "SS"] == pytest.approx(58830.0, rel=1e-12)
    assert tab.loc["Batch", "EMS"] == "σ² + 5·σ²(Batch)"
    assert tab.loc["Residual", "EMS"] == "σ²"
    assert tab.loc["Batch", "error"] == "Residual"
    assert tab.loc["Batch", "F"] == pytest.approx(11271.5 / 2451.25, rel=1e-12)
    exact = {"Batch": (11271.5 - 2451.25) / 5, "Residual": 2451.25}
    assert fit.varcomp.to_dict() == pytest.approx(exact, rel=1e-12)
    ref = vc_ref(lme4_refs, "dyestuff_REML")  # lme4 1.1-31 REML: 1764.0500064, 2451.2499986
    assert fit.varcomp.to_dict() == pytest.approx(ref, rel=1e-6)
    assert fit.fixef["(Intercept)"] == pytest.approx(1527.5, rel=1e-12)
    assert fit.se["(Intercept)"] == pytest.approx(lme4_refs["dyestuff_REML"]["results"]["se"]["(Intercept)"], rel=1e-6)
    reml = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))
    assert fit.varcomp["Batch"] == pytest.approx(reml.varcorr["variance"].iloc[0], rel=1e-6)
    assert fit.theta == pytest.approx(reml.theta, rel=1e-5)
    assert list(fit.varcorr["group"]) == list(reml.varcorr["group"])


def test_oats_split_plot_textbook_table(lme4_refs):
    oats = sm.datasets.load("oats")
    before = oats.copy()
    fit = sm.anova_components("yield ~ nf * Variety + (1 | Block/Variety)", oats)
    pd.testing.assert_frame_equal(oats, before)  # caller's data untouched
    tab = fit.table
    # the textbook split-plot EMS table (unrestricted mixed model, sum-to-zero effects)
    assert tab["EMS"].to_dict() == {
        "nf": "σ² + Q(nf)",
        "Variety": "σ² + 4·σ²(Variety:Block) + Q(Variety)",
        "nf:Variety": "σ² + Q(nf:Variety)",
        "Block": "σ² + 4·σ²(Variety:Block) + 12·σ²(Block)",
        "Variety:Block": "σ² + 4·σ²(Variety:Block)",
        "Residual": "σ²",
    }
    assert tab.loc["Variety", "error"] == "Variety:Block" and tab.loc["nf", "error"] == "Residual"
    # R: summary(aov(yield ~ nf * Variety + Error(Block/Variety)))
    aov = {(r["stratum"], r["source"]): r for r in lme4_refs["oats_splitplot_REML"]["aov"]["table"]}
    ours = {("Block", "Residuals"): "Block", ("Block:Variety", "Variety"): "Variety",
            ("Block:Variety", "Residuals"): "Variety:Block", ("Within", "nf"): "nf",
            ("Within", "nf:Variety"): "nf:Variety", ("Within", "Residuals"): "Residual"}
    for key, row in ours.items():
        r = aov[key]
        assert tab.loc[row, "df"] == r["Df"]
        assert tab.loc[row, "SS"] == pytest.approx(r["SumSq"], rel=1e-10)
        assert tab.loc[row, "MS"] == pytest.approx(r["MeanSq"], rel=1e-10)
        if r.get("F") is not None:
            assert tab.loc[row, "F"] == pytest.approx(r["F"], rel=1e-10)
            assert tab.loc[row, "p_value"] == pytest.approx(r["p"], rel=1e-8)
    # variance components: the balanced ANOVA algebra, = REML (lme4 to its optimizer tolerance)
    ms = tab["MS"]
    exact = {"Variety:Block": (ms["Variety:Block"] - ms["Residual"]) / 4,
             "Block": (ms["Block"] - ms["Variety:Block"]) / 12, "Residual": ms["Residual"]}
    assert fit.varcomp.to_dict() == pytest.approx(exact, rel=1e-12)
    assert fit.varcomp.to_dict() == pytest.approx(
        {"Variety:Block": 106.0618055555, "Block": 214.4770833333, "Residual": 177.0833333333}, rel=1e-10)
    assert fit.varcomp.to_dict() == pytest.approx(vc_ref(lme4_refs, "oats_splitplot_REML"), rel=1e-4)
    reml = sm.lmer("yield ~ nf * Variety + (1 | Block/Variety)", oats)
    assert fit.varcomp.to_numpy() == pytest.approx(reml.varcorr["variance"].to_numpy(), rel=1e-5)
    assert list(fit.varcomp.index[:-1]) == [t.group for t in reml.model.terms]
    # GLS fixed effects and SEs given the variance components = lme4's
    ref = lme4_refs["oats_splitplot_REML"]["results"]
    assert fit.fixef.to_dict() == pytest.approx(ref["fixef"], rel=1e-6, abs=1e-8)
    assert fit.se.to_dict() == pytest.approx(ref["se"], rel=1e-4)
    assert fit.ems.loc["Block", "Block"] == pytest.approx(12) and fit.ems.loc["Block", "Variety:Block"] == pytest.approx(4)


def test_pastes_nested_and_penicillin_crossed_equal_reml(lme4_refs):
    pastes = sm.anova_components("strength ~ 1 + (1 | batch/cask)", sm.datasets.load("pastes"))
    ref = vc_ref(lme4_refs, "pastes_nested_REML")  # lme4 1.1-31: cask:batch 8.4337, batch 1.6573, 0.6780
    assert set(pastes.varcomp.index) == set(ref)
    assert pastes.varcomp.to_dict() == pytest.approx(ref, rel=1e-5)
    assert pastes.table.loc["batch", "EMS"] == "σ² + 2·σ²(cask:batch) + 6·σ²(batch)"
    assert pastes.table.loc["batch", "error"] == "cask:batch"
    assert pastes.se["(Intercept)"] == pytest.approx(lme4_refs["pastes_nested_REML"]["results"]["se"]["(Intercept)"], rel=1e-5)
    reml = sm.lmer("strength ~ 1 + (1 | batch/cask)", sm.datasets.load("pastes"))
    assert pastes.varcomp.to_numpy() == pytest.approx(reml.varcorr["variance"].to_numpy(), rel=1e-5)

    pen = sm.anova_components("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"))
    ref = vc_ref(lme4_refs, "penicillin_crossed_REML")  # lme4: plate 0.71691, sample 3.73113, 0.30241
    assert pen.varcomp.to_dict() == pytest.approx(ref, rel=1e-4)
    assert pen.table.loc["plate", "EMS"] == "σ² + 6·σ²(plate)"
    assert pen.table.loc["sample", "EMS"] == "σ² + 24·σ²(sample)"
    reml = sm.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"))
    assert pen.varcomp.to_numpy() == pytest.approx(reml.varcorr["variance"].to_numpy(), rel=1e-5)


def test_mixed_two_way_unrestricted_ems():
    # fixed A (3 levels) x random B (8 levels), 2 replicates: the unrestricted mixed model lme4 fits
    rng = np.random.default_rng(5)
    A = np.tile(np.repeat(["a1", "a2", "a3"], 2), 8)
    B = np.repeat([f"b{i}" for i in range(8)], 6)
    ai, bi = pd.factorize(A)[0], pd.factorize(B)[0]
    y = (10 + np.array([0, 1, 2])[ai] + rng.normal(0, 1, 8)[bi] + rng.normal(0, 0.8, 24)[bi * 3 + ai]
         + rng.normal(0, 0.5, 48))
    d = pd.DataFrame({"y": y, "A": A, "B": B})
    fit = sm.anova_components("y ~ A + (1 | B) + (1 | A:B)", d)
    assert fit.table["EMS"].to_dict() == {
        "A": "σ² + 2·σ²(A:B) + Q(A)", "B": "σ² + 2·σ²(A:B) + 6·σ²(B)", "A:B": "σ² + 2·σ²(A:B)", "Residual": "σ²"}
    assert fit.table.loc["A", "error"] == "A:B" and fit.table.loc["B", "error"] == "A:B"
    ms = fit.table["MS"]
    assert fit.varcomp["B"] == pytest.approx((ms["B"] - ms["A:B"]) / 6, rel=1e-12)
    reml = sm.lmer("y ~ A + (1 | B) + (1 | A:B)", d)
    assert fit.varcomp.to_numpy() == pytest.approx(reml.varcorr["variance"].to_numpy(), rel=1e-5)
    assert fit.se.to_numpy() == pytest.approx(reml.se.to_numpy(), rel=1e-5)


def test_unbalanced_oneway_closed_form():
    d = sm.datasets.load("dyestuff").drop(index=[0, 1, 2, 6, 19])  # R: Dyestuff[-c(1,2,3,7,20), ]
    fit = sm.anova_components("Yield ~ 1 + (1 | Batch)", d)
    # R anova(lm(Yield ~ Batch)): SS 56942.5 (5 df), 41057.5 (19 df)
    assert fit.table.loc["Batch", "SS"] == pytest.approx(56942.5, rel=1e-12)
    assert fit.table.loc["Residual", "SS"] == pytest.approx(41057.5, rel=1e-12)
    N = d.groupby("Batch", observed=True).size().to_numpy().astype(float)
    n, G = N.sum(), len(N)
    n0 = (n - (N**2).sum() / n) / (G - 1)  # = 4.112
    assert n0 == pytest.approx(4.112)
    assert fit.ems.loc["Batch", "Batch"] == pytest.approx(n0, rel=1e-12)
    assert fit.varcomp["Batch"] == pytest.approx((56942.5 / 5 - 41057.5 / 19) / n0, rel=1e-12)
    assert fit.varcomp["Batch"] == pytest.approx(2244.061028, rel=1e-9)


def _projection(M):
    U, s, _ = np.linalg.svd(M, full_matrices=False)
    U = U[:, s > 1e-9 * s[0]]
    return U @ U.T


def test_unbalanced_split_plot_type1_and_ems_brute_force():
    oats = sm.datasets.load("oats")
    ou = oats.drop(index=np.array([1, 5, 10, 22, 40, 41, 60]) - 1)
    fit = sm.anova_components("yield ~ nf * Variety + (1 | Block/Variety)", ou)
    # R: anova(lm(terms(yield ~ nf + Variety + nf:Variety + Block + Block:Variety, keep.order=TRUE)))
    r_ss = {"nf": 22194.473504273526, "Variety": 1800.4666753872148, "nf:Variety": 567.34443572389341,
            "Block": 10395.034555108687, "Variety:Block": 6327.7605074247813, "Residual": 6797.904937466551}
    assert fit.table["SS"].to_dict() == pytest.approx(r_ss, rel=1e-10)
    assert fit.table["df"].tolist() == [3, 2, 6, 5, 10, 38]
    # brute force: EMS coefficient of σ²_j in row k = tr(Z_j' (P_k - P_{k-1}) Z_j) / df_k
    m = sm.Model("yield ~ nf * Variety + (1 | Block/Variety)", ou)
    X = m.X
    cols = {"nf": [1, 2, 3], "Variety": [4, 5], "nf:Variety": list(range(6, 12))}
    Z = {t.group: np.eye(t.nlev)[t.refs] for t in m.terms}
    seq = [X[:, [0]]]
    for k in ("nf", "Variety", "nf:Variety"):
        seq.append(np.hstack([seq[-1], X[:, cols[k]]]))
    seq.append(np.hstack([seq[-1], Z["Block"]]))
    seq.append(np.hstack([seq[-1], Z["Variety:Block"]]))
    P = [_projection(M) for M in seq]
    y = m.y
    for i, row in enumerate(["nf", "Variety", "nf:Variety", "Block", "Variety:Block"]):
        A = P[i + 1] - P[i]
        df = round(np.trace(A))
        assert fit.table.loc[row, "df"] == df
        assert fit.table.loc[row, "SS"] == pytest.approx(y @ A @ y, rel=1e-9)
        for g, Zg in Z.items():
            assert fit.ems.loc[row, g] == pytest.approx(np.trace(Zg.T @ A @ Zg) / df, rel=1e-8, abs=1e-10)
    # the random rows solve E[MS] = C σ²
    rows = ["Block", "Variety:Block", "Residual"]
    C = fit.ems.loc[rows, ["Block", "Variety:Block", "Residual"]].to_numpy(dtype=float)
    sol = np.linalg.solve(C, fit.table.loc[rows, "MS"].to_numpy())
    assert fit.varcomp_raw[["Block", "Variety:Block", "Residual"]].to_numpy() == pytest.approx(sol, rel=1e-12)
    # no single row has the null expectation of Block any more: a Satterthwaite denominator
    assert "Satterthwaite" in fit.table.loc["Block", "error"]
    assert fit.table.loc["Variety:Block", "error"] == "Residual"


def test_negative_estimate_truncated_with_warning():
    with pytest.warns(NegativeEstimateWarning, match=r"'Batch' variance is negative \(-1\.3219"):
        fit = sm.anova_components("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff2"))
    assert fit.varcomp["Batch"] == 0.0
    assert fit.varcomp_raw["Batch"] == pytest.approx((41.6816 / 5 - 358.70135 / 24) / 5, rel=1e-4)
    assert fit.truncated == ["Batch"]
    assert fit.varcomp["Residual"] == pytest.approx(358.701 / 24, rel=1e-5)
    assert isinstance(NegativeEstimateWarning("x"), sm.SingularFitWarning)


def test_anova_bad_input():
    ss = sm.datasets.load("sleepstudy")
    with pytest.raises(DesignError, match="random intercepts"):
        sm.anova_components("Reaction ~ Days + (Days | Subject)", ss)
    with pytest.raises(DesignError, match="confounded"):
        sm.anova_components("Yield ~ Batch + (1 | Batch)", sm.datasets.load("dyestuff"))
    with pytest.raises(MissingColumnError, match="Did you mean 'Reaction'"):
        sm.anova_components("reaction ~ Days + (1 | Subject)", ss)
    with pytest.raises(DesignError, match="confounded"):
        sm.anova_components("yield ~ nf + (1 | Block/Variety)", sm.datasets.load("oats"),
                            order=["Variety:Block", "Block"])
    with pytest.raises(DesignError, match="order must name"):
        sm.anova_components("yield ~ nf + (1 | Block/Variety)", sm.datasets.load("oats"), order=["Block"])
    d = sm.datasets.load("dyestuff")
    d.loc[3, "Yield"] = np.nan
    with pytest.warns(MissingDataWarning):
        fit = sm.anova_components("Yield ~ 1 + (1 | Batch)", d)
    assert fit.nobs == 29
    assert fit.varcomp.to_dict() == pytest.approx(
        sm.anova_components("Yield ~ 1 + (1 | Batch)", d.dropna()).varcomp.to_dict(), rel=1e-12)


# ------------------------------------------------------------------------------------------
# sm.mom on pandas data
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["matloff", "anova"])
def test_mom_oneway_balanced_equals_reml(method, lme4_refs):
    ss = sm.datasets.load("sleepstudy")
    fit = sm.mom("Reaction ~ Days + (1 | Subject)", ss, method=method)
    ref = lme4_refs["sleepstudy_intercept_REML"]["results"]
    # balanced clusters, covariate varying within: both estimators equal the ANOVA/REML values
    assert fit.varcomp.to_dict() == pytest.approx(vc_ref(lme4_refs, "sleepstudy_intercept_REML"), rel=1e-7)
    assert fit.fixef.to_dict() == pytest.approx(ref["fixef"], rel=1e-9)
    assert fit.se.to_dict() == pytest.approx(ref["se"], rel=1e-6)
    assert fit.size_moments["clusters"] == 18 and fit.size_moments["mean_N"] == 10
    assert fit.varcomp_se is not None and (fit.varcomp_se > 0).all()


def _minque0(X, y, g):
    """Brute force: the Matloff/MINQUE(0) equations with dense n×n matrices."""
    n = len(y)
    Z = np.eye(g.max() + 1)[g]
    K = Z @ Z.T
    M = np.eye(n) - X @ np.linalg.solve(X.T @ X, X.T)
    q = np.array([y @ M @ K @ M @ y, y @ M @ y])
    T = np.array([[np.trace(M @ K @ M @ K), np.trace(M @ K)], [np.trace(M @ K), np.trace(M)]])
    return np.linalg.solve(T, q)


def test_mom_matloff_with_covariates_matches_dense_algebra():
    rng = np.random.default_rng(3)
    G = 25
    N = rng.poisson(4, G) + 1
    g = np.repeat(np.arange(G), N)
    n = len(g)
    x = rng.normal(size=n)
    z = rng.normal(size=G)[g]
    y = 1 + 0.5 * x - z + rng.normal(0, 1, G)[g] + rng.normal(0, 0.6, n)
    df = pd.DataFrame({"y": y, "x": x, "z": z, "g": g.astype(str)})
    fit = sm.mom("y ~ x + z + (1 | g)", df)
    X = np.column_stack([np.ones(n), x, z])
    m = sm.Model("y ~ x + z + (1 | g)", df)
    dense = _minque0(X, y, m.terms[0].refs)
    assert fit.varcomp_raw.to_numpy() == pytest.approx(dense, rel=1e-9)
    # the random-N effect model: size_effect=True is the same as a column N_i in the data
    df["Ng"] = pd.Series(g).map(pd.Series(N)).to_numpy().astype(float)
    a = sm.mom("y ~ x + z + (1 | g)", df, size_effect=True, se=None)
    b = sm.mom("y ~ x + z + Ng + (1 | g)", df, se=None)
    assert list(a.fixef.index) == ["(Intercept)", "x", "z", "N(g)"]
    assert a.varcomp.to_numpy() == pytest.approx(b.varcomp.to_numpy(), rel=1e-10)
    assert a.fixef.to_numpy() == pytest.approx(b.fixef.to_numpy(), rel=1e-10)
    assert a.se.to_numpy() == pytest.approx(b.se.to_numpy(), rel=1e-10)


def _ustat_brute(y, a, b):
    """Brute force over all pairs: Σ (y - y')²/2 for pairs sharing a, sharing b, all."""
    D = (y[:, None] - y[None, :]) ** 2 / 2
    sa = a[:, None] == a[None, :]
    sb = b[:, None] == b[None, :]
    iu = np.triu_indices(len(y), 1)
    U = np.array([D[sa][...].sum() / 2, D[sb].sum() / 2, D[iu].sum()])
    cnt = lambda S: (S.sum() - len(y)) / 2  # noqa: E731 - pairs o < o'
    Pa, Pb, Pab, P = cnt(sa), cnt(sb), cnt(sa & sb), len(iu[0])
    A = np.array([[0, Pa - Pab, Pa], [Pb - Pab, 0, Pb], [P - Pa, P - Pb, P]], dtype=float)
    return np.linalg.solve(A, U)


def test_mom_crossed_penicillin_and_brute_force(lme4_refs):
    pen = sm.datasets.load("penicillin")
    fit = sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", pen)
    # balanced complete crossing: U-statistics = ANOVA = REML (lme4 1.1-31 to 1e-4)
    anova = sm.anova_components("diameter ~ 1 + (1 | plate) + (1 | sample)", pen)
    assert fit.varcomp.to_dict() == pytest.approx(anova.varcomp.to_dict(), rel=1e-10)
    assert fit.varcomp.to_dict() == pytest.approx(vc_ref(lme4_refs, "penicillin_crossed_REML"), rel=1e-4)
    assert fit.se["(Intercept)"] == pytest.approx(lme4_refs["penicillin_crossed_REML"]["results"]["se"]["(Intercept)"], rel=1e-4)
    assert list(fit.varcomp.index) == ["plate", "sample", "Residual"]
    # an unbalanced, replicated subset of InstEval against the pairwise definition
    ie = sm.datasets.load("insteval").iloc[:400]
    with pytest.warns(NegativeEstimateWarning, match="'d' variance is negative"):
        fit = sm.mom("y ~ 1 + (1 | s) + (1 | d)", ie)
    m = sm.Model("y ~ 1 + (1 | s) + (1 | d)", ie)
    refs = {t.group: t.refs for t in m.terms}
    brute = _ustat_brute(m.y, refs["s"], refs["d"])  # (σ²_s, σ²_d, σ²_e) order of the rows
    got = fit.varcomp_raw[["s", "d", "Residual"]].to_numpy()
    assert got == pytest.approx(brute, rel=1e-8)


def test_mom_crossed_bootstrap_and_alchemy():
    pen = sm.datasets.load("penicillin")
    f1 = sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, se="bootstrap", nboot=40, seed=5, progress=False)
    f2 = sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, se="bootstrap", nboot=40, seed=5, progress=False)
    pd.testing.assert_frame_equal(f1.boot, f2.boot)  # reproducible
    assert f1.boot.shape == (40, 4) and (f1.varcomp_se > 0).all()
    assert "pigeonhole" in f1.se_method
    al = sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, alchemy=True, chunks=3, seed=1)
    assert al.chunks.shape == (3, 4)
    assert al.varcomp_raw.to_numpy() == pytest.approx(al.chunks.iloc[:, :3].mean().to_numpy())
    assert al.varcomp_se.to_numpy() == pytest.approx(al.chunks.iloc[:, :3].std().to_numpy() / np.sqrt(3))


def test_mom_bootstrap_oneway_reproducible_and_close_to_delta():
    rng = np.random.default_rng(11)
    G = 400
    N = rng.poisson(6, G) + 2
    g = np.repeat(np.arange(G), N)
    y = 2 + rng.normal(0, 1, G)[g] + rng.normal(0, 1, len(g))
    df = pd.DataFrame({"y": y, "g": g})
    d = sm.mom("y ~ 1 + (1 | g)", df, se="delta")
    b1 = sm.mom("y ~ 1 + (1 | g)", df, se="bootstrap", nboot=300, seed=2, progress=False)
    b2 = sm.mom("y ~ 1 + (1 | g)", df, se="bootstrap", nboot=300, seed=2, progress=False)
    pd.testing.assert_frame_equal(b1.boot, b2.boot)
    assert list(b1.boot.columns) == ["g", "Residual", "(Intercept)"]
    # two estimates of the same standard error (300 replicates: ~4% Monte Carlo error)
    assert b1.varcomp_se.to_numpy() == pytest.approx(d.varcomp_se.to_numpy(), rel=0.2)
    assert b1.boot["(Intercept)"].std() == pytest.approx(d.se["(Intercept)"], rel=0.2)


def test_mom_start_values_for_lmer():
    pen = sm.datasets.load("penicillin")
    f = sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", pen)
    assert f.theta == pytest.approx(np.sqrt(f.varcomp[["plate", "sample"]].to_numpy()) / f.sigma)
    base = sm.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", pen)
    warm = sm.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, start=f.theta)
    assert warm.objective == pytest.approx(base.objective, abs=1e-6)
    assert warm.theta == pytest.approx(base.theta, rel=1e-3)


def test_mom_bad_input():
    ss = sm.datasets.load("sleepstudy")
    with pytest.raises(DesignError, match="random intercepts"):
        sm.mom("Reaction ~ Days + (Days | Subject)", ss)
    with pytest.raises(DesignError, match="not 3"):
        sm.mom("strength ~ 1 + (1 | batch) + (1 | cask) + (1 | sample)", sm.datasets.load("pastes"))
    with pytest.raises(DesignError, match="size_effect is for the one-factor"):
        sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"), size_effect=True)
    with pytest.raises(DesignError, match="constant"):
        sm.mom("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), size_effect=True)
    with pytest.raises(DesignError, match="se='delta'"):
        sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"), se="delta")
    with pytest.raises(DesignError, match="'ustat'"):
        sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"), method="matloff")
    with pytest.raises(ValueError, match="method must be"):
        sm.mom("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"), method="reml")
    with pytest.raises(DataError, match="pandas or a Dask"):
        sm.mom("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff").to_dict())
    with pytest.raises(MissingColumnError):
        sm.mom("Yield ~ x + (1 | Batch)", sm.datasets.load("dyestuff"))
    one = pd.DataFrame({"y": np.arange(10.0), "g": np.arange(10)})
    with pytest.raises(DesignError):
        sm.mom("y ~ 1 + (1 | g)", one)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sm.mom("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))  # a clean fit warns nothing


def test_degenerate_responses_are_refused_or_warned():
    """issue 8: a constant response gives θ = 0/0; say so instead of returning NaN silently."""
    d = sm.datasets.load("dyestuff").assign(Yield=5.0)
    for fn in (sm.mom, sm.anova_components):
        with pytest.raises(DataError, match="'Yield' is constant"):
            fn("Yield ~ 1 + (1 | Batch)", d)
    p = sm.datasets.load("penicillin").assign(diameter=1.0)
    with pytest.raises(DataError, match="'diameter' is constant"):
        sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", p)
    # a zero residual variance that is not a constant response: θ is NaN with a warning naming the cause
    d2 = sm.datasets.load("dyestuff")
    d2["Yield"] = d2.groupby("Batch", observed=True)["Yield"].transform("mean")
    fit = sm.mom("Yield ~ 1 + (1 | Batch)", d2)
    with pytest.warns(NegativeEstimateWarning, match="residual variance is estimated as 0"):
        assert np.isnan(fit.theta).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(sm.mom("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff")).theta).all()


def test_mom_flags_are_checked_at_the_entry_point():
    d = sm.datasets.load("dyestuff")
    with pytest.raises(sm.OptionError, match="size_effect must be True or False, got 'yes'"):
        sm.mom("Yield ~ 1 + (1 | Batch)", d, size_effect="yes")
    with pytest.raises(sm.OptionError, match="nboot must be a positive integer"):
        sm.mom("Yield ~ 1 + (1 | Batch)", d, nboot=0)
