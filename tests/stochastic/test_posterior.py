"""Posterior by NUTS (stochmm.stochastic.posterior): exact checks, peers with the same priors, data
cloning against the AGQ MLE, the ArviZ container, bad input.

Tolerances are Monte Carlo standard errors: for a family of m statistics the bound is the two-sided
Bonferroni normal quantile at family level 1 % (so a fixed seed that passes is not a tuned constant).
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

import stochmm as sm

pytest.importorskip("numpyro")

import arviz as az
import numpyro.distributions as dist

from stochmm.stochastic import diagnostics as diag
from stochmm.stochastic.idata import group_dataset, group_names, is_arviz_1
from stochmm.stochastic.posterior import SamplingError
from stochmm.stochastic.priors import PriorError

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
PEER_PRIORS = {**{n: dist.Normal(0.0, 5.0) for n in ("(Intercept)", "period2", "period3", "period4")},
               "sd(herd)": dist.HalfNormal(1.0)}


def zcrit(m: int, family: float = 0.01) -> float:
    """Two-sided Bonferroni bound for m statistics at the given family-wise level."""
    return float(norm.ppf(1.0 - family / (2 * m)))


def mc_z(f: np.ndarray, expected: float) -> float:
    """(mean of f − expected) in Monte Carlo SEs; f shaped (chains, draws)."""
    se = f.std(ddof=1) / np.sqrt(float(diag.ess_mean(f)))
    return float((f.mean() - expected) / se)


@pytest.fixture(scope="module")
def cbpp():
    return sm.datasets.load("cbpp")


@pytest.fixture(scope="module")
def cbpp_post(cbpp):
    with warnings.catch_warnings():
        warnings.simplefilter("error", diag.SamplerWarning)  # a clean run: no diagnostic fails
        return sm.sample(CBPP, cbpp, family="binomial", priors=PEER_PRIORS, seed=3, progress=False,
                         posterior_predictive=True, marginalize=False)


@pytest.fixture(scope="module")
def cbpp_marginal(cbpp):
    with warnings.catch_warnings():
        warnings.simplefilter("error", diag.SamplerWarning)
        return sm.sample(CBPP, cbpp, family="binomial", priors=PEER_PRIORS, seed=4, progress=False,
                         marginalize=True)


# --------------------------------------------------------------------------------------------------
# exact: an LMM with its variance components held fixed has a Gaussian posterior for (β, b)
# --------------------------------------------------------------------------------------------------
def test_exact_gaussian_posterior():
    dye = sm.datasets.load("dyestuff")
    fit = sm.lmer("Yield ~ 1 + (1 | Batch)", dye)
    sb, s = float(fit.varcorr["sd"][0]), float(fit.sigma)
    m0, s0 = 1500.0, 200.0
    post = sm.sample("Yield ~ 1 + (1 | Batch)", dye, priors={"(Intercept)": dist.Normal(m0, s0)},
                     fixed={"sd(Batch)": sb, "sigma": s}, draws=600, warmup=300, chains=4, seed=11,
                     progress=False)
    m = post.model
    A = np.hstack([m.X, m.Z.toarray()])  # 30 x 7: small enough for the closed form
    prec = A.T @ A / s**2 + np.diag([1 / s0**2] + [1 / sb**2] * m.q)
    mu = np.linalg.solve(prec, A.T @ m.y / s**2 + np.r_[m0 / s0**2, np.zeros(m.q)])
    R = np.linalg.cholesky(prec)
    x = np.concatenate([post._draws["fixef"], post.b_draws], axis=-1)  # (chains, draws, 7)
    w = (x - mu) @ R  # whitened: N(0, I) exactly when the sampler is right
    d = w.shape[-1]
    stats = [(w[..., i], 0.0) for i in range(d)] + [(w[..., i] ** 2, 1.0) for i in range(d)]
    stats += [(w[..., i] * w[..., j], 0.0) for i in range(d) for j in range(i)]
    z = np.array([mc_z(f, e) for f, e in stats])
    assert np.all(np.abs(z) < zcrit(len(stats))), np.round(z, 2)
    assert np.allclose(post.draws("sigma"), s) and np.allclose(post.draws("sd(Batch)"), sb)


# --------------------------------------------------------------------------------------------------
# peers with the same priors: the hand-written NumPyro model of ../shared/baselines/nuts_handwritten.py
# --------------------------------------------------------------------------------------------------
# `python /work/shared/baselines/nuts_handwritten.py cbpp 0` and `... cbpp 1` (4 chains x 1000 + 1000,
# numpyro 0.22, this machine, 2026-12-02): posterior means, SDs and the min bulk ESS of each run.
HANDWRITTEN = [
    {"seed": 0, "min_ess_bulk": 1469.3,
     "post_mean": {"(Intercept)": -1.4207, "period2": -0.9906, "period3": -1.135, "period4": -1.6219, "sd_herd": 0.722},
     "post_sd": {"(Intercept)": 0.2488, "period2": 0.3053, "period3": 0.3264, "period4": 0.437, "sd_herd": 0.2073}},
    {"seed": 1, "min_ess_bulk": 1295.0,
     "post_mean": {"(Intercept)": -1.4188, "period2": -0.9957, "period3": -1.1371, "period4": -1.6133,
                   "sd_herd": 0.7354},
     "post_sd": {"(Intercept)": 0.2574, "period2": 0.3012, "period3": 0.3308, "period4": 0.4419, "sd_herd": 0.2085}},
]


@pytest.mark.parametrize("which", ["full", "marginal"])
def test_cbpp_matches_handwritten_numpyro(cbpp_post, cbpp_marginal, which):
    post = cbpp_post if which == "full" else cbpp_marginal
    assert post.sampler.startswith(which)
    t = post.summary_table()
    for name, key in [("(Intercept)", "(Intercept)"), ("period2", "period2"), ("period3", "period3"),
                      ("period4", "period4"), ("sd(herd)", "sd_herd")]:
        theirs = np.mean([r["post_mean"][key] for r in HANDWRITTEN])
        # their MCSE from their SD and (conservatively) their smallest ESS; the two runs are independent
        se_theirs = np.sqrt(sum((r["post_sd"][key] / np.sqrt(r["min_ess_bulk"])) ** 2 for r in HANDWRITTEN)) / 2
        se = np.hypot(t.loc[name, "mcse_mean"], se_theirs)
        assert abs(t.loc[name, "mean"] - theirs) < 3 * se, (name, t.loc[name, "mean"], theirs, se)
        # posterior SDs agree too (relative MC error of an SD ≈ 1/sqrt(2 ESS))
        sd_theirs = np.mean([r["post_sd"][key] for r in HANDWRITTEN])
        rel = np.sqrt(1 / (2 * t.loc[name, "ess_bulk"]) + 1 / (2 * 2 * 1295.0))
        assert abs(t.loc[name, "sd"] / sd_theirs - 1) < 3 * rel, (name, t.loc[name, "sd"], sd_theirs)


# `python /work/shared/baselines/nuts_handwritten.py verbagg 0 --center` and `... verbagg 1 --center`
# (4 chains x 1000 + 1000, numpyro 0.22, this machine, 2026-12-02, 131.5 s and 127.3 s on a shared machine)
HANDWRITTEN_VERBAGG = [
    {"seed": 0, "min_ess_bulk": 851.9,
     "post_mean": {"(Intercept)": 0.1647, "Anger": 0.0589, "GenderM": 0.3106, "btypescold": -1.0469,
                   "btypeshout": -2.0898, "situself": -1.0524, "sd_id": 1.3593, "sd_item": 0.5778},
     "post_sd": {"(Intercept)": 0.4256, "Anger": 0.017, "GenderM": 0.1913, "btypescold": 0.2977,
                 "btypeshout": 0.2967, "situself": 0.2419, "sd_id": 0.071, "sd_item": 0.1028}},
    {"seed": 1, "min_ess_bulk": 891.0,
     "post_mean": {"(Intercept)": 0.2024, "Anger": 0.0571, "GenderM": 0.3144, "btypescold": -1.0475,
                   "btypeshout": -2.098, "situself": -1.0587, "sd_id": 1.36, "sd_item": 0.5757},
     "post_sd": {"(Intercept)": 0.4214, "Anger": 0.0167, "GenderM": 0.1911, "btypescold": 0.2998,
                 "btypeshout": 0.3002, "situself": 0.2429, "sd_id": 0.0685, "sd_item": 0.1017}},
]


def test_verbagg_matches_handwritten_numpyro():
    """Crossed binary GLMM (7,584 obs, 316 x 24 levels): posterior means within 3 MC SEs of the peer's."""
    df = sm.datasets.load("verbagg")
    m = sm.Model("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", df, family="binomial")
    priors = {n: dist.Normal(0.0, 5.0) for n in m.xnames}
    priors.update({"sd(id)": dist.HalfNormal(1.0), "sd(item)": dist.HalfNormal(1.0)})
    post = m.sample(priors=priors, warmup=500, draws=1000, seed=11, progress=False, warn=False,
                    log_likelihood=False)
    t = post.summary_table()
    assert t["r_hat"].max() < 1.01 and post.diagnose().attrs["chains"]["divergences"].sum() == 0
    names = [(n, n) for n in m.xnames] + [("sd(id)", "sd_id"), ("sd(item)", "sd_item")]
    z = []
    for name, key in names:
        theirs = np.mean([r["post_mean"][key] for r in HANDWRITTEN_VERBAGG])
        se_theirs = np.sqrt(sum((r["post_sd"][key] / np.sqrt(r["min_ess_bulk"])) ** 2
                                for r in HANDWRITTEN_VERBAGG)) / 2
        z.append((t.loc[name, "mean"] - theirs) / np.hypot(t.loc[name, "mcse_mean"], se_theirs))
    # 8 comparisons, Bonferroni at a 1 % family-wise level (|z| < 3.23); the seed is fixed, so this is deterministic
    assert np.all(np.abs(z) < zcrit(len(names))), dict(zip([n for n, _ in names], np.round(z, 2)))


# --------------------------------------------------------------------------------------------------
# the results vocabulary and the ArviZ container
# --------------------------------------------------------------------------------------------------
def test_results_vocabulary(cbpp_post, cbpp):
    post = cbpp_post
    fit = sm.glmer(CBPP, cbpp)
    assert list(post.fixef.index) == list(fit.fixef.index)
    assert list(post.varcorr.columns) == list(fit.varcorr.columns)
    assert post.varcorr["group"].tolist() == ["herd"] and post.sigma == 1.0
    assert list(post.ranef["herd"].index) == list(fit.ranef["herd"].index)
    # posterior means of the random effects close to the conditional modes (same sign, same order)
    r = np.corrcoef(post.ranef["herd"].iloc[:, 0], fit.ranef["herd"].iloc[:, 0])[0, 1]
    assert r > 0.95
    p = post.predict()
    assert p.shape == (post.model.n,) and np.all((p > 0) & (p < 1))
    pop = post.predict(cbpp.iloc[:3], re_form=None, type="link")
    assert np.allclose(pop, post._draws["fixef"].reshape(-1, 4).mean(0) @ post.model.X[:3].T)
    s = post.summary()
    assert "sd(herd)" in str(s) and "HalfNormal(1)" in str(s) and "r_hat" in str(s)
    tab = s.tables["params"]
    assert {"mean", "median", "sd", "2.5%", "97.5%", "ess_bulk", "ess_tail", "r_hat", "prior"} <= set(tab.columns)
    ps = post.prior_summary()
    assert ps.set_index("parameter").loc["sd(herd)", "source"] == "user"


def test_inference_data(cbpp_post):
    idata = cbpp_post.idata
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data", "posterior_predictive"} <= set(
        group_names(idata))
    post = group_dataset(idata, "posterior")
    assert list(post["fixef"].coords["coef"].values) == ["(Intercept)", "period2", "period3", "period4"]
    assert list(post["sd"].coords["component"].values) == ["sd(herd)"]
    assert post["ranef_herd"].dims == ("chain", "draw", "herd", "herd_term")
    assert post["ranef_herd"].coords["herd"].values[0] == "1"
    ss = group_dataset(idata, "sample_stats")
    assert {"diverging", "energy", "tree_depth", "step_size", "lp", "n_steps"} <= set(ss.data_vars)
    obs = group_dataset(idata, "observed_data")["y"].values
    assert np.array_equal(obs, sm.datasets.load("cbpp")["incidence"].to_numpy(dtype=float))
    pp = group_dataset(idata, "posterior_predictive")["y"].values
    assert pp.shape == (4, 1000, 56) and np.all(pp == np.round(pp))  # counts, as observed
    loo = az.loo(idata)
    elpd = float(loo["elpd"] if is_arviz_1() else loo["elpd_loo"])
    assert -130 < elpd < -80


def test_diagnostics_agree_with_arviz():
    rng = np.random.default_rng(5)
    e = rng.standard_normal((4, 800, 3))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0]
    for t in range(1, 800):  # AR(1) chains with different autocorrelations
        x[:, t] = np.array([0.0, 0.5, 0.9]) * x[:, t - 1] + e[:, t]
    x[2] += 0.3  # one chain off
    ds = az.convert_to_dataset({"a": x})
    ref_bulk = np.asarray(az.ess(ds, method="bulk")["a"].values)
    ref_tail = np.asarray(az.ess(ds, method="tail")["a"].values)
    ref_rhat = np.asarray(az.rhat(ds)["a"].values)
    # the vectorised screening versions: the same algorithm up to the autocorrelation truncation
    assert np.allclose(diag.ess_bulk(x), ref_bulk, rtol=1e-2)
    assert np.allclose(diag.rhat(x), ref_rhat, rtol=1e-4)
    if not is_arviz_1():  # ArviZ 1.x (arviz-stats) computes the tail ESS differently from Vehtari et al.'s
        assert np.allclose(diag.ess_tail(x), ref_tail, rtol=1e-2)
    # the table is ArviZ's own numbers
    t = diag.param_table({"a": x[..., 0], "b": x[..., 1], "c": x[..., 2]})
    assert np.allclose(t["ess_bulk"], ref_bulk, rtol=1e-10) and np.allclose(t["r_hat"], ref_rhat, rtol=1e-10)
    assert np.allclose(t["ess_tail"], ref_tail, rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# every model the deterministic paths accept
# --------------------------------------------------------------------------------------------------
SHORT = dict(draws=60, warmup=60, chains=2, seed=1, progress=False, warn=False)


@pytest.mark.parametrize("formula,family,kw", [
    ("Reaction ~ Days + (Days || Subject)", "gaussian", {"marginalize": False}),
    ("incidence ~ period + offset(log(size)) + (1 | herd)", "poisson", {"marginalize": False}),
    (CBPP, "binomial(link='probit')", {"marginalize": False}),
    (CBPP, "binomial(link='cloglog')", {"marginalize": True}),
    ("incidence / size ~ period + (1 | herd)", "binomial", {"weights": "size"}),
    ("strength ~ 1 + (1 | batch/cask)", "gaussian", {}),  # nested: two terms, crossed codes
])
def test_models_run(formula, family, kw):
    data = {"Reaction": "sleepstudy", "incidence": "cbpp", "cbind": "cbpp", "diameter": "penicillin",
            "strength": "pastes"}
    name = next(v for k, v in data.items() if formula.startswith(k))
    df = sm.datasets.load(name)
    post = sm.sample(formula, df, family=family, posterior_predictive=True, **SHORT, **kw)
    marginal = kw.get("marginalize") is True or (family == "gaussian" and kw.get("marginalize") is not False)
    assert post.sampler.startswith("marginal" if marginal else "full")  # "auto": marginal for LMMs only
    wts = {k: v for k, v in kw.items() if k == "weights"}
    fit = (sm.lmer(formula, df) if family == "gaussian" else
           sm.glmer(formula, df, family=family, **wts))
    assert list(post.fixef.index) == list(fit.fixef.index)
    assert post.varcorr[["group", "term1", "term2"]].fillna("").equals(fit.varcorr[["group", "term1", "term2"]]
                                                                      .fillna(""))
    assert set(post.ranef) == set(fit.ranef)
    for g in fit.ranef:
        assert post.ranef[g].shape == fit.ranef[g].shape
    # the posterior sits where the likelihood is: fixed effects within a few posterior SDs of the ML fit
    assert np.all(np.abs(post.fixef - fit.fixef) < 4 * post.se + 1e-9)
    pp = group_dataset(post.idata, "posterior_predictive")["y"].values
    assert pp.shape == (2, 60, post.model.n) and np.all(np.isfinite(pp))
    ll = group_dataset(post.idata, "log_likelihood")["y"].values
    assert ll.shape == (2, 60, post.model.n) and np.all(np.isfinite(ll))


def test_posterior_predictive_method(cbpp, cbpp_marginal):
    """The method equals the flag (same keys), and replicated counts have the model's mean: the binomial noise
    given each draw is independent, so mean(y_rep) - mean(size·μ) has a known MC standard error."""
    pp = cbpp_marginal.posterior_predictive()["y"].values
    size = cbpp["size"].to_numpy()
    C, N, n = pp.shape
    assert (C, N, n) == (4, 1000, 56) and np.all(pp >= 0) and np.all(pp <= size) and np.all(pp == np.round(pp))
    assert "posterior_predictive" in group_names(cbpp_marginal.idata)
    assert np.array_equal(cbpp_marginal.posterior_predictive()["y"].values, pp)  # drawn once
    mu = cbpp_marginal.predict(summary=False)  # (draws, n), response scale
    diff = pp.reshape(C * N, n).mean() - (size * mu).mean()
    se = np.sqrt(np.mean(size * mu * (1 - mu)) / (C * N * n))
    assert abs(diff) < 4 * se, (diff, se)
    m = sm.Model(CBPP, cbpp, family="binomial")
    a = m.sample(**SHORT, posterior_predictive=True)
    b = m.sample(**SHORT)
    assert np.array_equal(group_dataset(a.idata, "posterior_predictive")["y"].values,
                          b.posterior_predictive()["y"].values)


def test_model_sample_reproducible_and_warns(cbpp):
    before = cbpp.copy()
    m = sm.Model(CBPP, cbpp, family="binomial")
    short = {**SHORT, "draws": 30, "warmup": 30, "warn": True, "marginalize": False}
    with pytest.warns(diag.SamplerWarning, match=r"bulk ESS of .* is \d+ \(< 400\)"):
        a = m.sample(**short)
    with pytest.warns(diag.SamplerWarning):
        b = sm.sample(CBPP, cbpp, family="binomial", **short)
    assert np.array_equal(a._draws["fixef"], b._draws["fixef"])  # reproducible by seed
    pd.testing.assert_frame_equal(cbpp, before)  # the caller's data untouched
    table = sm.diagnose(a, warn=False)
    assert {"r_hat", "ess_bulk", "ess_tail", "mcse_mean"} <= set(table.columns)
    assert list(table.attrs["chains"].columns[:2]) == ["divergences", "ebfmi"]
    assert any("bulk ESS" in msg for msg in a.warnings) and a.warnings == table.attrs["warnings"]


def test_sample_prior(cbpp):
    pr = sm.sample_prior(CBPP, cbpp, family="binomial", priors=PEER_PRIORS, draws=4000, seed=2)
    assert {"prior", "prior_predictive", "observed_data"} <= set(group_names(pr.idata))
    sd = pr.draws("sd(herd)")
    # HalfNormal(1): mean sqrt(2/pi), independent draws
    assert abs(sd.mean() - np.sqrt(2 / np.pi)) < 3.5 * sd.std() / np.sqrt(sd.size)
    ic = pr.draws("(Intercept)")
    assert abs(ic.mean()) < 3.5 * 5 / np.sqrt(ic.size) and abs(ic.std() / 5 - 1) < 3.5 / np.sqrt(2 * ic.size)
    yrep = group_dataset(pr.idata, "prior_predictive")["y"].values
    assert yrep.shape == (1, 4000, 56) and np.all(yrep <= cbpp["size"].to_numpy())
    post = sm.sample(CBPP, cbpp, family="binomial", prior=True, draws=100, chains=2)
    assert "prior" in group_names(post.idata)


# --------------------------------------------------------------------------------------------------
# marginal NUTS against full NUTS
# --------------------------------------------------------------------------------------------------
def _agree(a, b, names):
    """|mean_a − mean_b| in combined MCSEs, for each name (Bonferroni bound at family level 1 %)."""
    ta, tb = a.summary_table(), b.summary_table()
    z = {n: (ta.loc[n, "mean"] - tb.loc[n, "mean"]) / np.hypot(ta.loc[n, "mcse_mean"], tb.loc[n, "mcse_mean"])
         for n in names}
    assert all(abs(v) < zcrit(len(names)) for v in z.values()), z


def test_marginal_agrees_with_full_cbpp(cbpp_post, cbpp_marginal):
    assert "quadrature" in cbpp_marginal.sampler and "agq(9)" in cbpp_marginal.sampler
    _agree(cbpp_post, cbpp_marginal, cbpp_post.layout.scalar_names)
    # the random effects drawn after the fact agree with the sampled ones
    rf, rm = cbpp_post._draws["b"].reshape(-1, 15), cbpp_marginal._draws["b"].reshape(-1, 15)
    se = np.sqrt(rf.var(0) / float(np.min(diag.ess_bulk(cbpp_post._draws["b"])))
                 + rm.var(0) / float(np.min(diag.ess_bulk(cbpp_marginal._draws["b"]))))
    assert np.all(np.abs(rf.mean(0) - rm.mean(0)) < zcrit(15) * se)


def test_marginal_agrees_with_full_sleepstudy():
    sleep = sm.datasets.load("sleepstudy")
    f = "Reaction ~ Days + (Days | Subject)"
    kw = dict(draws=600, warmup=400, chains=4, progress=False)
    full = sm.sample(f, sleep, marginalize=False, seed=5, **kw)
    marg = sm.sample(f, sleep, seed=6, **kw)
    assert marg.sampler.startswith("marginal NUTS") and "exactly" in marg.sampler
    _agree(full, marg, full.layout.scalar_names)
    assert {"posterior", "log_likelihood"} <= set(group_names(marg.idata))
    assert marg.ranef["Subject"].shape == (18, 2)


def test_marginalize_where_it_cannot_apply():
    pen = sm.datasets.load("cbpp")
    pen["g2"] = np.arange(len(pen)) % 4
    with pytest.raises(SamplingError, match=r"marginalize=True cannot apply.*crossed or nested"):
        sm.sample("cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | g2)", pen, family="binomial",
                  marginalize=True)
    with pytest.raises(SamplingError, match=r"marginalize='exact' cannot apply"):
        sm.sample(CBPP, pen, family="binomial", marginalize="exact")
    with pytest.raises(SamplingError, match="marginalize must be"):
        sm.sample(CBPP, pen, family="binomial", marginalize="yes")


# --------------------------------------------------------------------------------------------------
# data cloning: the posterior of K copies concentrates at the MLE with K × variance → Wald variance
# --------------------------------------------------------------------------------------------------
def test_data_cloning_cbpp(cbpp):
    fit = sm.glmer(CBPP, cbpp, nagq=25)
    K = 32
    post = sm.sample(CBPP, cbpp, family="binomial", clones=K, seed=7, progress=False, draws=500, warmup=500)
    assert post.clones == K and post.sampler.startswith("marginal")
    dc = post.dclone()
    mle = np.r_[fit.fixef.to_numpy(), fit.theta]
    assert np.all(np.abs(dc["estimate"].to_numpy() - mle) < 0.02), dc["estimate"].to_numpy() - mle
    ratio = dc["se"].to_numpy()[:4] ** 2 / np.diag(fit.vcov.to_numpy())
    assert np.all(np.abs(ratio - 1) < 0.10), ratio


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_unknown_prior_name_lists_valid_names(cbpp):
    with pytest.raises(PriorError, match=r"unknown prior name 'sd\(hed\)'. Did you mean 'sd\(herd\)'\?.*"
                                         r"Valid names: \(Intercept\), period2, period3, period4, sd\(herd\)"):
        sm.sample(CBPP, cbpp, family="binomial", priors={"sd(hed)": dist.HalfNormal(1)})


def test_prior_support_checked(cbpp):
    with pytest.raises(PriorError, match=r"'sd\(herd\)' must have positive support.*Normal"):
        sm.sample(CBPP, cbpp, family="binomial", priors={"sd(herd)": dist.Normal(0, 1)})
    with pytest.raises(PriorError, match=r"fixed effect 'period2' must have support on the real line"):
        sm.sample(CBPP, cbpp, family="binomial", priors={"period2": dist.Gamma(2.0, 1.0)})
    with pytest.raises(PriorError, match="must be a numpyro distribution"):
        sm.sample(CBPP, cbpp, family="binomial", priors={"period2": 5.0})
    sleep = sm.datasets.load("sleepstudy")
    with pytest.raises(PriorError, match=r"cor\(Subject\).*LKJ"):
        sm.sample("Reaction ~ Days + (Days | Subject)", sleep, priors={"cor(Subject)": dist.Normal(0, 1)})


@pytest.mark.parametrize("kw,match", [
    ({"draws": 0}, "draws must be an integer ≥ 1"),
    ({"chains": -1}, "chains must be an integer ≥ 1"),
    ({"warmup": -5}, "warmup must be an integer ≥ 0"),
    ({"draws": 10.5}, "draws must be an integer"),
    ({"seed": "a"}, "seed must be an integer"),
    ({"clones": 0}, "clones must be an integer ≥ 1"),
    ({"chain_method": "threads"}, "chain_method must be one of"),
    ({"progress": "yes"}, "progress must be True or False"),
    ({"target_acept_prob": 0.9}, "unknown option"),
    ({"fixed": {"sigma": 1.0}}, "cannot be held fixed"),
    ({"fixed": {"sd(herd)": -1.0}}, "must be positive"),
])
def test_bad_arguments(cbpp, kw, match):
    with pytest.raises(SamplingError, match=match):
        sm.sample(CBPP, cbpp, family="binomial", **kw)


def test_parallel_chains_need_devices(cbpp):
    import jax

    chains = jax.local_device_count() + 1  # one more chain than this process has devices
    with pytest.raises(SamplingError, match="set_host_device_count"):
        sm.sample(CBPP, cbpp, family="binomial", chain_method="parallel", chains=chains)


def test_not_finite_at_start_names_the_term(cbpp):
    # a prior whose support excludes the ML start value of sd(herd) (0.64)
    with pytest.raises(SamplingError, match=r"not finite at the initial point: the prior of 'sd\(herd\)'"):
        sm.sample(CBPP, cbpp, family="binomial", priors={"sd(herd)": dist.Uniform(5.0, 6.0)}, **SHORT)
