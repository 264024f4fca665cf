"""Accuracy studies (issue 10): statistical claims in Monte Carlo SEs, reproducibility, bad input.

Every study here has a fixed seed. Tolerances are in Monte Carlo SEs (3 MCSE, or the combined
MCSE of two independent studies), or exact where the theory is exact.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.stochastic.accuracy import replicate_response, summarize, truth_to_parameters
from stochmm.stochastic.accuracy_methods import StudyInputError, parameter_names, vc_from_theta

REF = Path(__file__).resolve().parent.parent / "reference" / "lme4_accuracy_small_clusters.json"


def row(summary, method, parameter):
    r = summary[(summary["method"] == method) & (summary["parameter"] == parameter)]
    assert len(r) == 1, (method, parameter)
    return r.iloc[0]


# ------------------------------------------------------------------------------------------------
# issue §2: binary, 100 clusters of size 2, intercept -1, one covariate, random-intercept SD 2
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cluster_design():
    ref = json.loads(REF.read_text())
    d = pd.DataFrame({"g": np.repeat(np.arange(100), 2), "x": np.asarray(ref["design_x"], dtype=float)})
    return d, ref


@pytest.fixture(scope="module")
def small_cluster_study(small_cluster_design):
    d, _ = small_cluster_design
    return sm.accuracy_study("y ~ x + (1 | g)", d, {"beta": {"(Intercept)": -1.0, "x": 0.5}, "sd(g)": 2.0},
                             family="binomial", methods=("laplace", "agq:9"), nsim=500, seed=20261202, n_jobs=2,
                             progress=False)


def test_laplace_underestimates_the_sd_with_clusters_of_two(small_cluster_study):
    s = small_cluster_study.summary
    lap = row(s, "laplace", "sd(g)")
    # measured: bias -0.304 = -8.5 MCSE (nsim = 500); the classical finding (Breslow & Lin 1995)
    assert lap["n"] == 500
    assert lap["bias"] < -3 * lap["bias_mcse"]
    # paired (same responses): Laplace below AGQ in the mean by many MCSEs of the difference
    r = small_cluster_study.replicates
    sd = r[r["parameter"] == "sd(g)"].pivot(index="replicate", columns="method", values="estimate")
    diff = sd["laplace"] - sd["agq:9"]
    assert diff.mean() < -5 * diff.std(ddof=1) / np.sqrt(len(diff))


def test_biases_match_lme4_in_an_independent_study(small_cluster_study, small_cluster_design):
    """lme4 1.1-31 on the same design (R's RNG, 2000 replicates: models/reference/make_accuracy_refs.R):
    Laplace -0.252 (0.023), AGQ(9) +0.077 (0.013). AGQ's bias is the ML estimator's own small-sample
    bias, not approximation error: it is consistent with lme4's and far smaller than Laplace's."""
    _, ref = small_cluster_design
    s = small_cluster_study.summary
    for method in ("laplace", "agq:9"):
        ours, theirs = row(s, method, "sd(g)"), ref["results"][method]
        tol = 3 * np.hypot(ours["bias_mcse"], theirs["mcse"])
        assert abs(ours["bias"] - theirs["bias"]) <= tol, (method, ours["bias"], theirs["bias"], tol)
    assert abs(row(s, "agq:9", "sd(g)")["bias"]) < abs(row(s, "laplace", "sd(g)")["bias"])


def test_summary_is_consistent_with_the_replicates(small_cluster_study):
    st = small_cluster_study
    r = st.replicates
    assert list(r.columns) == ["replicate", "method", "parameter", "truth", "estimate", "se", "lower", "upper",
                               "converged", "singular", "failed", "error", "warnings", "seconds"]
    assert len(r) == 500 * 2 * 3
    sub = r[(r["method"] == "agq:9") & (r["parameter"] == "x")]
    e = sub["estimate"].to_numpy() - 0.5
    s = row(st.summary, "agq:9", "x")
    np.testing.assert_allclose([s["bias"], s["rmse"], s["bias_mcse"]],
                               [e.mean(), np.sqrt(np.mean(e**2)), e.std(ddof=1) / np.sqrt(e.size)], rtol=1e-12)
    cover = ((sub["lower"] <= 0.5) & (0.5 <= sub["upper"])).mean()
    assert s["coverage"] == pytest.approx(cover)
    assert s["coverage_mcse"] == pytest.approx(np.sqrt(cover * (1 - cover) / 500))
    # Wald intervals: estimate ± z·SE
    np.testing.assert_allclose(sub["upper"] - sub["estimate"], 1.959963984540054 * sub["se"], rtol=1e-12)
    assert "Accuracy study" in repr(st)


def test_any_replicate_is_reproducible_alone(small_cluster_study):
    st = small_cluster_study
    tp = truth_to_parameters(st.model, {"beta": [-1.0, 0.5], "sd(g)": 2.0})
    y = replicate_response(st.model, tp, st.seed, 123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = st.model.with_response(y).fit(method="agq", nagq=9)
    r = st.replicates
    got = r[(r["replicate"] == 123) & (r["method"] == "agq:9")].set_index("parameter")["estimate"]
    np.testing.assert_allclose(got[["(Intercept)", "x"]], fit.fixef, rtol=1e-12)
    assert got["sd(g)"] == pytest.approx(fit.theta[0], rel=1e-12)


def test_plot_draws_bias_and_coverage(small_cluster_study):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = small_cluster_study.plot()
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["(Intercept)", "x", "sd(g)"]
    assert len(fig.axes[0].containers) == 2  # one dot-and-whisker series per method
    fig2 = sm.plots.bias_coverage(small_cluster_study.summary, parameters=["sd(g)"], relative=True)
    assert "relative bias" in fig2.axes[0].get_xlabel()
    with pytest.raises(KeyError, match="sd\\(g\\)"):
        sm.plots.bias_coverage(small_cluster_study, parameters=["sd(h)"])
    plt.close("all")


# ------------------------------------------------------------------------------------------------
# LMM: REML unbiased for σ², ML biased by (n - p)/n
# ------------------------------------------------------------------------------------------------
def test_reml_unbiased_ml_biased_by_known_factor():
    """30 clusters of 4, nine covariates centred within clusters: σ² is estimated from the
    within-cluster stratum, n = 120 - 30 = 90 residual degrees of freedom before the p = 9 within
    effects; REML σ̂² = SSE/(n - p) (unbiased), ML σ̂² = SSE/n, so E[σ̂²_ML] = (n - p)/n σ² = 0.9 σ²
    (exactly, while the between-cluster variance is estimated inside its bound)."""
    rng = np.random.default_rng(11)
    a, m, pw = 30, 4, 9
    d = pd.DataFrame({"g": np.repeat(np.arange(a), m)})
    W = rng.standard_normal((a * m, pw))
    W -= pd.DataFrame(W).groupby(d["g"]).transform("mean").to_numpy()
    for j in range(pw):
        d[f"w{j}"] = W[:, j]
    formula = "y ~ " + " + ".join(f"w{j}" for j in range(pw)) + " + (1 | g)"
    truth = {"beta": [1.0] + [0.5] * pw, "sd(g)": 2.0, "sigma": 1.0}
    st = sm.accuracy_study(formula, d, truth, methods=("REML", "ML"), nsim=300, seed=7, n_jobs=2, progress=False)
    s = st.summarize(scale="variance")
    reml, ml = row(s, "REML", "sigma^2"), row(s, "ML", "sigma^2")
    n, p = a * m - a, pw
    assert abs(reml["bias"]) <= 3 * reml["bias_mcse"]
    assert ml["bias"] < -3 * ml["bias_mcse"]  # measured: -0.103 = -13 MCSE; REML -0.003 (0.4 MCSE)
    assert abs(ml["mean"] - (n - p) / n * 1.0) <= 3 * ml["bias_mcse"]
    # exact, replicate by replicate (no fit on the boundary here)
    r = st.replicates
    assert not r["singular"].any()
    sig = r[r["parameter"] == "sigma"].pivot(index="replicate", columns="method", values="estimate")
    np.testing.assert_allclose((sig["ML"] / sig["REML"]) ** 2, (n - p) / n, rtol=1e-6)
    # Wald intervals exist for β only in an LMM (lme4's confint(method = "Wald"))
    assert r.loc[r["parameter"].isin(["sd(g)", "sigma"]), "lower"].isna().all()
    assert np.isnan(row(s, "REML", "var(g)")["coverage"])


# ------------------------------------------------------------------------------------------------
# coverage of Wald intervals for β, well specified, large clusters
# ------------------------------------------------------------------------------------------------
def test_wald_coverage_of_beta_is_nominal_with_large_clusters():
    rng = np.random.default_rng(3)
    d = pd.DataFrame({"g": np.repeat(np.arange(60), 20), "x": rng.standard_normal(1200)})
    st = sm.accuracy_study("y ~ x + (1 | g)", d, {"beta": [-0.5, 0.5], "sd(g)": 1.0}, family="binomial",
                           methods=("laplace",), nsim=300, seed=5, n_jobs=2, progress=False)
    mcse = np.sqrt(0.95 * 0.05 / 300)
    for p in ("(Intercept)", "x"):
        c = row(st.summary, "laplace", p)
        assert c["n_cov"] == 300
        assert abs(c["coverage"] - 0.95) <= 3 * mcse, (p, c["coverage"])


# ------------------------------------------------------------------------------------------------
# execution: local processes, Dask, checkpoints, failures, warnings
# ------------------------------------------------------------------------------------------------
def _binary_design():
    rng = np.random.default_rng(1)
    return pd.DataFrame({"g": np.repeat(np.arange(40), 3), "x": rng.standard_normal(120)})


BIN = dict(formula="y ~ x + (1 | g)", truth={"beta": [-0.5, 1.0], "sd(g)": 1.0}, family="binomial")


def _run(**kw):
    args = dict(BIN, methods=("laplace", "agq:5", "fast"), nsim=12, seed=42, progress=False)
    args.update(kw)
    return sm.accuracy_study(args.pop("formula"), _binary_design(), args.pop("truth"), **args)


def _same(a, b):
    pd.testing.assert_frame_equal(a.replicates.drop(columns="seconds"), b.replicates.drop(columns="seconds"))
    cols = [c for c in a.summary.columns if c != "median_seconds"]
    pd.testing.assert_frame_equal(a.summary[cols], b.summary[cols])


def test_same_seed_same_tables_serial_processes_and_dask():
    distributed = pytest.importorskip("distributed")
    serial = _run(n_jobs=1)
    procs = _run(n_jobs=2, chunksize=2)
    _same(serial, procs)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        with distributed.Client(cl) as client:
            on_dask = _run(client=client, chunksize=3)
    _same(serial, on_dask)
    other = _run(n_jobs=1, seed=43)
    assert not np.allclose(other.replicates["estimate"], serial.replicates["estimate"])
    # the order of the methods changes neither the responses nor any fit
    swapped = _run(n_jobs=1, methods=("fast", "laplace", "agq:5"))
    pd.testing.assert_frame_equal(
        swapped.replicates.drop(columns="seconds").sort_values(["replicate", "method", "parameter"]).reset_index(drop=True),
        serial.replicates.drop(columns="seconds").sort_values(["replicate", "method", "parameter"]).reset_index(drop=True))


def test_checkpoint_resumes_by_seed(tmp_path):
    ck = tmp_path / "study"
    first = _run(n_jobs=1, nsim=6, checkpoint=ck)
    assert first.n_run == 6 and len(list(ck.glob("part-*.parquet"))) >= 1
    again = _run(n_jobs=1, nsim=6, checkpoint=ck)
    assert again.n_run == 0  # everything was there
    _same(first, again)
    # a killed study: drop the part holding replicate 0, then extend to 12 replicates
    for part in ck.glob("part-*.parquet"):
        if 0 in set(pd.read_parquet(part)["replicate"]):
            part.unlink()
    resumed = _run(n_jobs=1, nsim=12, checkpoint=ck)
    assert 6 < resumed.n_run < 12
    _same(resumed, _run(n_jobs=1, nsim=12))
    # another study may not write into this checkpoint
    with pytest.raises(StudyInputError, match="belongs to another study.*seed"):
        _run(n_jobs=1, nsim=12, seed=1, checkpoint=ck)


def test_a_failing_fit_is_recorded_and_the_study_goes_on():
    st = _run(n_jobs=1, nsim=3, method_options={"laplace": {"optimizer": "no-such-optimizer"}})
    r = st.replicates
    lap = r[r["method"] == "laplace"]
    assert lap["failed"].all() and lap["estimate"].isna().all()
    assert lap["error"].str.contains("no-such-optimizer").all()
    assert not r.loc[r["method"] != "laplace", "failed"].any()
    s = row(st.summary, "laplace", "x")
    assert s["fail_rate"] == 1.0 and s["n"] == 0


def test_a_new_row_in_the_method_table_joins_the_study(monkeypatch):
    """The method table is the only place a method is defined: a row whose fit fails on some
    replicates (odd number of successes) gets those recorded as failed, with the message."""
    from stochmm.stochastic import accuracy_methods as am

    def fit(model, seed, **options):
        if int(model.y.sum()) % 2:
            raise RuntimeError(f"odd response total {int(model.y.sum())}")
        return model.fit(method="laplace")

    row_ = am.StudyMethod("picky", "glmm", fit, am._read_ml, ("wald",), "Laplace on even totals only")
    monkeypatch.setitem(am.METHODS, "picky", lambda arg: row_)
    st = _run(n_jobs=1, nsim=12, methods=("laplace", "picky"))
    r = st.replicates[st.replicates["parameter"] == "x"].set_index(["replicate", "method"])
    totals = {i: int(replicate_response(st.model, truth_to_parameters(st.model, BIN["truth"]), 42, i).sum())
              for i in range(12)}
    odd = [i for i, t in totals.items() if t % 2]
    assert 0 < len(odd) < 12
    for i, t in totals.items():
        failed = bool(r.loc[(i, "picky"), "failed"])
        assert failed == (t % 2 == 1)
        if failed:
            assert r.loc[(i, "picky"), "error"] == f"RuntimeError: odd response total {t}"
        else:
            assert r.loc[(i, "picky"), "estimate"] == r.loc[(i, "laplace"), "estimate"]
    assert row(st.summary, "picky", "x")["fail_rate"] == pytest.approx(len(odd) / 12)


def test_progress_bar_is_quiet_when_not_a_terminal(capsys):
    _run(n_jobs=1, nsim=2, methods=("fast",), progress=True)
    assert capsys.readouterr().err == ""


def test_warnings_are_captured_per_replicate():
    # no random effect in truth: many fits land on the boundary
    st = _run(n_jobs=1, nsim=10, truth={"beta": [-0.5, 1.0], "sd(g)": 0.0}, methods=("laplace",))
    r = st.replicates
    sing = r[r["singular"]]
    assert len(sing) > 0 and sing["warnings"].str.contains("singular").all()
    s = row(st.summary, "laplace", "sd(g)")
    assert s["singular_rate"] == pytest.approx(r.groupby("replicate")["singular"].first().mean())
    assert s["rel_bias"] != s["rel_bias"]  # NaN: the truth is 0
    assert np.isnan(sing.loc[sing["parameter"] == "sd(g)", "se"]).all()  # no Wald interval on the bound


def test_vector_terms_truth_round_trip():
    m = sm.Model("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    truth = {"beta": {"(Intercept)": 250.0, "Days": 10.0}, ("Subject", "(Intercept)"): 25.0,
             "sd(Subject:Days)": 6.0, ("Subject", "(Intercept)", "Days"): 0.3, "sigma": 25.0}
    tp = truth_to_parameters(m, truth)
    np.testing.assert_allclose(vc_from_theta(m, tp.theta, tp.sigma), [25.0, 6.0, 0.3], rtol=1e-12)
    assert tp.names == tuple(parameter_names(m))
    assert tp.as_dict()["cor(Subject:(Intercept),Days)"] == 0.3
    # correlation ±1 (a singular Σ) is a valid truth
    tp1 = truth_to_parameters(m, {**truth, ("Subject", "(Intercept)", "Days"): -1.0})
    np.testing.assert_allclose(vc_from_theta(m, tp1.theta, tp1.sigma), [25.0, 6.0, -1.0], rtol=1e-12)


def test_parameter_names_follow_the_posterior_names():
    d = _binary_design()
    m = sm.Model("y ~ x + (x || g)", d.assign(y=0.0), family="binomial")
    assert parameter_names(m) == ["(Intercept)", "x", "sd(g)", "sd(g:x)"]
    tp = truth_to_parameters(m, {"beta": [0.0, 1.0], "sd(g)": 1.0, ("g.1", "x"): 0.5})  # varcorr's group name
    np.testing.assert_allclose(tp.theta, [1.0, 0.5])
    m2 = sm.Model("y ~ x + (1 | g) + (1 | g)", d.assign(y=0.0), family="binomial")
    assert parameter_names(m2)[2:] == ["sd(g)", "sd(g.1)"]


@pytest.mark.parametrize("formula", ["y ~ x + (x | g)", "y ~ x + (x || g)", "y ~ x + (1 | g) + (0 + x | g)",
                                     "y ~ x + (1 | g) + (1 | g)"])
def test_parameter_names_are_the_posterior_names(formula):
    pytest.importorskip("numpyro")
    from stochmm.stochastic.priors import layout

    m = sm.Model(formula, _binary_design().assign(y=0.0), family="binomial")
    assert sorted(parameter_names(m)) == sorted(layout(m).scalar_names)


def test_variance_scale_summary():
    st = _run(n_jobs=1, nsim=5, methods=("agq:5",))
    v = summarize(st.replicates, scale="variance")
    assert "var(g)" in set(v["parameter"]) and "sd(g)" not in set(v["parameter"])
    r = st.replicates[st.replicates["parameter"] == "sd(g)"]
    assert row(v, "agq:5", "var(g)")["mean"] == pytest.approx((r["estimate"] ** 2).mean())
    assert row(v, "agq:5", "var(g)")["coverage"] == row(st.summary, "agq:5", "sd(g)")["coverage"]


# ------------------------------------------------------------------------------------------------
# bad input (issue §1)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("truth, message", [
    ({"beta": [-0.5, 1.0], "sd(G)": 1.0}, r"'sd\(G\)'.*Did you mean 'sd\(g\)'\?.*Valid names: beta, sd\(g\)"),
    ({"beta": [-0.5, 1.0], "sd(g)": -1.0}, "cannot be negative"),
    ({"beta": [-0.5, 1.0]}, r"lacks the random-effect SD\(s\) 'sd\(g\)'"),
    ({"sd(g)": 1.0}, "needs 'beta'"),
    ({"beta": [-0.5], "sd(g)": 1.0}, "has 1 values; the model has 2 fixed effects"),
    ({"beta": {"(Intercept)": 0.0, "X": 1.0}, "sd(g)": 1.0}, "'X'.*Did you mean 'x'"),
    ({"beta": [-0.5, 1.0], "sd(g)": 1.0, "sigma": 1.0}, "no residual SD"),
    ({"beta": [-0.5, np.nan], "sd(g)": 1.0}, "must be finite"),
    ("sd(g)=1", "truth must be a dict"),
])
def test_bad_truth(truth, message):
    with pytest.raises(StudyInputError, match=message):
        sm.accuracy_study(BIN["formula"], _binary_design(), truth, family="binomial", nsim=2, n_jobs=1,
                          progress=False)


def test_bad_correlations():
    d = sm.datasets.load("sleepstudy")
    base = {"beta": [250.0, 10.0], "sd(Subject)": 25.0, "sd(Subject:Days)": 6.0, "sigma": 25.0}
    with pytest.raises(StudyInputError, match=r"cor\(Subject:\(Intercept\),Days\).*= 1.5: a correlation lies in"):
        sm.accuracy_study("Reaction ~ Days + (Days | Subject)", d, {**base, "cor(Subject:(Intercept),Days)": 1.5},
                          nsim=2, n_jobs=1, progress=False)
    d3 = d.assign(D2=d["Days"] ** 2)
    three = {"beta": [250.0, 10.0], "sd(Subject:(Intercept))": 1.0, "sd(Subject:Days)": 1.0,
             "sd(Subject:D2)": 1.0, "cor(Subject:(Intercept),Days)": 0.9, "cor(Subject:(Intercept),D2)": -0.9,
             "cor(Subject:Days,D2)": 0.9, "sigma": 1.0}
    with pytest.raises(StudyInputError, match="do not form a valid correlation matrix"):
        sm.accuracy_study("Reaction ~ Days + (1 + Days + D2 | Subject)", d3, three, nsim=2, n_jobs=1,
                          progress=False)
    with pytest.raises(StudyInputError, match="needs 'sigma'"):
        sm.accuracy_study("Reaction ~ Days + (Days | Subject)", d, {k: v for k, v in base.items() if k != "sigma"},
                          nsim=2, n_jobs=1, progress=False)


@pytest.mark.parametrize("kw, message", [
    ({"methods": ("lapalce",)}, r"unknown method 'lapalce'. Did you mean 'laplace'\? Methods for a binomial "
                                r"model: laplace, agq:K, fast, is\[:draws\], nuts"),
    ({"methods": ("REML",)}, "fits linear mixed models; methods for a binomial model"),
    ({"methods": ("agq",)}, "needs its number of nodes"),
    ({"methods": ("agq:1",)}, "use 'laplace'"),
    ({"methods": ("laplace", "Laplace")}, "listed twice"),
    ({"methods": "laplace"}, "non-empty sequence"),
    ({"methods": ()}, "non-empty sequence"),
    ({"nsim": 0}, "nsim must be at least 1"),
    ({"nsim": 2.5}, "nsim must be an integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"level": 1.5}, r"level must be a number in \(0, 1\)"),
    ({"interval": "profil"}, "interval is 'auto', 'wald', 'profile' or 'posterior', not 'profil'. Did you mean "
                             "'profile'"),
    ({"methods": ("laplace", "agq:5", "fast"), "interval": "profile"},
     r"interval='profile' is not available for method\(s\) 'agq:5' \(offers wald\), 'fast' \(offers wald\); "
     "methods of a binomial model that offer it: laplace"),
    ({"methods": ("is", "nuts"), "interval": "profile"}, r"'is' \(offers wald\), 'nuts' \(offers posterior, wald\)"),
    ({"interval": "posterior"}, "not available for method"),
    ({"n_jobs": 0}, "n_jobs must be a positive integer"),
    ({"client": "tcp://127.0.0.1:8786"}, "client must be a dask.distributed.Client"),
    ({"method_options": {"fast": {}}}, "not among the methods"),
    ({"progress": "yes"}, "progress must be True or False"),
])
def test_bad_arguments(kw, message):
    args = dict(methods=("laplace",), nsim=2, n_jobs=1, progress=False)
    args.update(kw)
    with pytest.raises(StudyInputError, match=message):
        sm.accuracy_study(BIN["formula"], _binary_design(), BIN["truth"], family="binomial", **args)


def test_caller_data_untouched_and_response_optional():
    d = _binary_design()
    before = d.copy()
    st = sm.accuracy_study(BIN["formula"], d, BIN["truth"], family="binomial", methods=("fast",), nsim=2, n_jobs=1,
                           progress=False)
    pd.testing.assert_frame_equal(d, before)
    assert st.nsim == 2 and list(st.summary["parameter"]) == ["(Intercept)", "x", "sd(g)"]
    with pytest.raises(StudyInputError, match="REML.*fits linear mixed models|fits GLMMs"):
        sm.accuracy_study("y ~ x + (1 | g)", d, {"beta": [0, 1], "sd(g)": 1.0, "sigma": 1.0}, methods=("laplace",),
                          nsim=2, n_jobs=1, progress=False)


# ------------------------------------------------------------------------------------------------
# Wald SEs of the SDs and correlations (GLMMs: delta method on the fit's Hessian in θ)
# ------------------------------------------------------------------------------------------------
def test_wald_se_of_the_sd_matches_glmmTMB():
    """glmmTMB 1.1.5 on cbpp (models/reference/accuracy_wald_se_glmmTMB.R): SD 0.6422616722,
    SE(SD) = SD·SE(log SD) = 0.1785622580; β SEs 0.2324720507 0.3066424950 0.3266378085 0.4274365967.
    Ours come from a finite-difference Hessian: agreement to 1e-3 relative."""
    from stochmm.stochastic.accuracy_methods import StudyContext, _read_ml

    m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
                 family="binomial")
    r = _read_ml(m.fit(method="laplace"), StudyContext.build(m, 0.95, "auto"), [])
    np.testing.assert_allclose(r.estimate[4], 0.6422616722, rtol=1e-5)
    np.testing.assert_allclose(r.se, [0.2324720507, 0.3066424950, 0.3266378085, 0.4274365967, 0.1785622580],
                               rtol=1e-3)


def test_delta_method_for_a_vector_term_matches_the_analytic_jacobian():
    from stochmm.stochastic.accuracy_methods import StudyContext, _vc_se_glmm

    rng = np.random.default_rng(4)
    d = pd.DataFrame({"g": np.repeat(np.arange(60), 10), "x": rng.standard_normal(600)})
    m = sm.Model("y ~ x + (x | g)", d.assign(y=0.0), family="binomial")
    tp = truth_to_parameters(m, {"beta": [0.0, 1.0], "sd(g)": 1.0, "sd(g:x)": 0.7,
                                 "cor(g:(Intercept),x)": 0.4})
    fit = m.with_response(m.simulate(tp.beta, tp.theta, nsim=1, seed=3)[:, 0]).fit(method="laplace")
    assert not fit.is_singular
    se = _vc_se_glmm(fit, StudyContext.build(m, 0.95, "auto"))
    t1, t2, t3 = fit.theta  # T = [[t1, 0], [t2, t3]]: sd1 = t1, sd2 = √(t2² + t3²), cor = t2/sd2
    s2 = np.hypot(t2, t3)
    J = np.array([[1.0, 0.0, 0.0], [0.0, t2 / s2, t3 / s2], [0.0, t3**2 / s2**3, -t2 * t3 / s2**3]])
    free = fit.derivs["free"]
    assert free[:3].all()
    cov_t = 2.0 * np.linalg.inv(fit.derivs["Hessian"])[:3, :3]
    np.testing.assert_allclose(se, np.sqrt(np.diag(J @ cov_t @ J.T)), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# stochastic methods: Monte Carlo ML by importance sampling ("is"), the posterior by NUTS ("nuts")
# ------------------------------------------------------------------------------------------------
def test_importance_sampling_row(small_cluster_design):
    """IS estimates the MLE: on a replicate of the reference scenario it agrees with AGQ(25) within
    4 Monte Carlo SEs of its own estimates; any replicate's IS fit is reproducible from its seed."""
    from stochmm.stochastic.accuracy import _method_seed

    d, _ = small_cluster_design
    truth = {"beta": [-1.0, 0.5], "sd(g)": 2.0}
    st = sm.accuracy_study("y ~ x + (1 | g)", d, truth, family="binomial", methods=("agq:25", "is:500"), nsim=2,
                           seed=3, n_jobs=1, progress=False)
    r = st.replicates
    assert not r["failed"].any()
    tp = truth_to_parameters(st.model, truth)
    y = replicate_response(st.model, tp, 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = st.model.with_response(y).fit(method="is", draws=500, seed=_method_seed(3, 1, "is:500"), progress=False)
    est = r[r["replicate"] == 1].pivot(index="parameter", columns="method", values="estimate")
    ours = est.loc[["(Intercept)", "x", "sd(g)"], "is:500"].to_numpy()
    np.testing.assert_allclose(ours, np.r_[fit.fixef.to_numpy(), fit.theta], rtol=1e-10)
    mc = fit.mc_se[["(Intercept)", "x", fit.model.theta_names[0]]].to_numpy()
    agq = est.loc[["(Intercept)", "x", "sd(g)"], "agq:25"].to_numpy()
    assert np.all(np.abs(ours - agq) <= 4 * mc), (ours, agq, mc)
    with pytest.raises(StudyInputError, match="fits GLMMs"):
        sm.accuracy_study("y ~ x + (1 | g)", d, {"beta": [0, 1], "sd(g)": 1.0, "sigma": 1.0}, methods=("is",),
                          nsim=1, n_jobs=1, progress=False)


def test_nuts_row_reports_posterior_means_sds_and_quantiles():
    pytest.importorskip("numpyro")
    d = _binary_design()
    opts = {"nuts": {"draws": 150, "warmup": 150, "chains": 2}}
    st = _run(n_jobs=1, nsim=1, methods=("laplace", "nuts"), method_options=opts)
    r = st.replicates.set_index(["method", "parameter"])
    nuts = r.loc["nuts"]
    assert not nuts["failed"].any()
    # the posterior of replicate 0, drawn alone with the method's seed
    from stochmm.stochastic.accuracy import _method_seed

    tp = truth_to_parameters(st.model, BIN["truth"])
    y = replicate_response(st.model, tp, 42, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = st.model.with_response(y).sample(seed=_method_seed(42, 0, "nuts"), progress=False, **opts["nuts"])
    for name in ("(Intercept)", "x", "sd(g)"):
        dr = post.draws(name).ravel()
        np.testing.assert_allclose(nuts.loc[name, ["estimate", "se"]].to_numpy(dtype=float),
                                   [dr.mean(), dr.std(ddof=1)], rtol=1e-10)
        np.testing.assert_allclose(nuts.loc[name, ["lower", "upper"]].to_numpy(dtype=float),
                                   np.quantile(dr, [0.025, 0.975]), rtol=1e-10)
    # sampler warnings (R-hat, ESS, ...) count as non-convergence and are kept
    assert bool(nuts["converged"].iloc[0]) == (nuts["warnings"].iloc[0] == "")
    assert d.shape == (120, 2)
    with pytest.raises(StudyInputError, match="'posterior' is not available for method.*'laplace' \\(offers wald, profile\\); "
                       "methods of a binomial model that offer it: nuts"):
        _run(n_jobs=1, nsim=1, methods=("laplace", "nuts"), interval="posterior")
    with pytest.raises(StudyInputError, match="settings from method_options"):
        _run(n_jobs=1, nsim=1, methods=("nuts:500",))


# ------------------------------------------------------------------------------------------------
# interval="profile": profile-likelihood intervals per replicate (fit.confint(method="profile"))
# ------------------------------------------------------------------------------------------------
def test_profile_intervals_are_the_fits_own_profile_intervals():
    """Each replicate's profile interval is exactly fit.confint(method="profile") of that replicate
    refitted alone: β, the SDs, the correlation (lme4's cor_b.a row) and σ; REML is profiled on the
    ML deviance (lme4's refitML), so its intervals are ML's."""
    from stochmm.stochastic.accuracy_methods import methods_offering

    assert methods_offering("profile", "gaussian") == ["REML", "ML"]
    assert methods_offering("profile", "poisson") == ["laplace"]
    rng = np.random.default_rng(7)
    d = pd.DataFrame({"g": np.repeat(np.arange(12), 6), "x": np.tile(np.linspace(-1, 1, 6), 12)})
    d["z"] = rng.standard_normal(len(d))
    truth = {"beta": [1.0, 0.5, -0.3], "sd(g)": 1.0, "sd(g:x)": 0.5, "cor(g:(Intercept),x)": 0.3, "sigma": 0.5}
    st = sm.accuracy_study("y ~ x + z + (x | g)", d, truth, methods=("REML", "ML"), nsim=2, seed=11,
                           interval="profile", n_jobs=1, progress=False)
    assert st.interval == "profile" and not st.replicates["failed"].any()
    tp = truth_to_parameters(st.model, truth)
    mi = st.model.with_response(replicate_response(st.model, tp, 11, 1))
    prof_names = {"(Intercept)": "(Intercept)", "x": "x", "z": "z", "sd(g)": "sd_(Intercept)|g",
                  "sd(g:x)": "sd_x|g", "cor(g:(Intercept),x)": "cor_x.(Intercept)|g", "sigma": "sigma"}
    r = st.replicates[st.replicates["replicate"] == 1]
    for method in ("REML", "ML"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = mi.fit(method=method)
            ci = fit.confint(method="profile")
        got = r[r["method"] == method].set_index("parameter")
        assert list(got.index) == list(prof_names)
        want = ci.loc[list(prof_names.values())].to_numpy()
        np.testing.assert_allclose(got[["lower", "upper"]].to_numpy(), want, rtol=1e-9)
        np.testing.assert_allclose(got["estimate"].iloc[:3], fit.fixef, rtol=1e-9)  # estimates: the fit's
    ml, reml = (r[r["method"] == m][["lower", "upper"]].to_numpy() for m in ("ML", "REML"))
    np.testing.assert_allclose(reml, ml, rtol=1e-6)


def test_profile_coverage_within_monte_carlo_error():
    """Poisson, 30 clusters of 8 (Laplace is accurate there): the profile intervals of the intercept,
    the slope and the SD cover at the nominal 95 % within 3 Monte Carlo SEs (3·√(0.95·0.05/n))."""
    d = pd.DataFrame({"g": np.repeat(np.arange(30), 8), "x": np.tile(np.linspace(-1, 1, 8), 30)})
    st = sm.accuracy_study("y ~ x + (1 | g)", d, {"beta": [1.0, 0.5], "sd(g)": 0.7}, family="poisson",
                           methods=("laplace",), nsim=120, seed=20261202, interval="profile", n_jobs=1,
                           progress=False)
    for par in ("(Intercept)", "x", "sd(g)"):
        s = row(st.summary, "laplace", par)
        assert s["n_cov"] == 120
        assert abs(s["coverage"] - 0.95) <= 3 * np.sqrt(0.95 * 0.05 / 120), (par, s["coverage"])
    r = st.replicates
    assert (r["lower"] < r["estimate"]).all() and (r["estimate"] < r["upper"]).all()


def test_a_failed_profile_is_recorded_and_the_study_goes_on(monkeypatch):
    # every GLMM fit can be profiled now (Laplace, AGQ, nAGQ = 0), so the failure is injected: a profile
    # that raises must be recorded per replicate with its message, and the study must go on
    from stochmm.deterministic.glmm import GlmmResults

    def broken(self, *args, **kwargs):
        raise FloatingPointError("deviance not finite at theta = 1e+08")

    monkeypatch.setattr(GlmmResults, "profile", broken)
    st = _run(methods=("laplace",), nsim=2, n_jobs=1, interval="profile")
    r = st.replicates
    assert r["failed"].all() and len(r) == 2 * 3
    assert r["error"].str.contains("profile likelihood interval failed: FloatingPointError: deviance not finite "
                                   "at theta = 1e\\+08").all()
    assert (st.summary["fail_rate"] == 1.0).all()
