"""Bootstraps: parametric (LMM, GLMM), residual and case; reproducibility (serial = processes = Dask);
statistical agreement with the Wald standard errors within Monte Carlo error."""

import numpy as np
import pytest

import stochmm as sm


@pytest.fixture(scope="module")
def sleep():
    return sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))


@pytest.fixture(scope="module")
def boot(sleep):
    return sleep.bootstrap(nsim=200, seed=11, progress=False)


def test_parametric_table_and_intervals(sleep, boot):
    r = boot.replicates
    assert r.shape == (200, 9)
    assert list(r.columns) == ["(Intercept)", "Days", "sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject",
                               "sd_Days|Subject", "sigma", "objective", "singular", "converged"]
    assert r["converged"].all()
    for method in ("percentile", "basic", "normal"):
        ci = boot.confint(method=method)
        assert np.all(ci.iloc[:, 0] < boot.estimates) and np.all(ci.iloc[:, 1] > boot.estimates)
    assert set(boot.tidy().columns) == {"replicate", "parameter", "value"}
    ci = sleep.confint(method="boot", nsim=20, seed=1, progress=False, ci="basic")
    assert ci.shape == (6, 2)


def test_bootstrap_se_agrees_with_wald_within_mc_error(sleep, boot):
    """A well-specified LMM: the SD of 200 bootstrap β's estimates the Wald SE; the relative MC error of an
    SD from m draws is about 1/sqrt(2(m-1)), so 3 MC SEs is 15 %."""
    rel = boot.se[["(Intercept)", "Days"]].to_numpy() / sleep.se.to_numpy()
    assert np.all(np.abs(rel - 1) < 3 / np.sqrt(2 * 199))
    # the bootstrap distribution of beta is centred on the estimate (3 MC SEs)
    bias = boot.replicates[["(Intercept)", "Days"]].mean() - sleep.fixef
    assert np.all(np.abs(bias) < 3 * sleep.se / np.sqrt(200))


def test_reproducible_serial_processes_and_dask(sleep, boot):
    a = sleep.bootstrap(nsim=24, seed=11, progress=False)
    np.testing.assert_array_equal(a.replicates.to_numpy(float), boot.replicates.iloc[:24].to_numpy(float))
    b = sleep.bootstrap(nsim=24, seed=11, progress=False, n_jobs=2)
    np.testing.assert_array_equal(a.replicates.to_numpy(float), b.replicates.to_numpy(float))
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client:
        c = sleep.bootstrap(nsim=24, seed=11, progress=False, client=client)
    np.testing.assert_array_equal(a.replicates.to_numpy(float), c.replicates.to_numpy(float))
    assert not np.array_equal(a.replicates.to_numpy(float),
                              sleep.bootstrap(nsim=24, seed=12, progress=False).replicates.to_numpy(float))


def test_glmm_parametric_bootstrap():
    fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    bt = fit.bootstrap(nsim=30, seed=2, progress=False)
    assert list(bt.replicates.columns[:5]) == ["(Intercept)", "period2", "period3", "period4", "sd_(Intercept)|herd"]
    assert "sigma" not in bt.replicates and bt.replicates["converged"].all()
    rel = bt.se[fit.fixef.index].to_numpy() / fit.se.to_numpy()
    assert np.all(np.abs(rel - 1) < 3 / np.sqrt(2 * 29))


def test_residual_and_case_bootstraps(sleep):
    r = sleep.bootstrap(nsim=30, seed=1, type="residual", progress=False)
    c = sleep.bootstrap(nsim=30, seed=1, type="case", resample="Subject", progress=False)
    for bt in (r, c):
        assert bt.replicates["converged"].all()
        assert np.all(np.abs(bt.replicates["Days"].mean() - sleep.fixef["Days"]) < 3 * sleep.se["Days"])
    # the case bootstrap resamples subjects: the intercept SE is near the Wald one (between-subject data)
    assert 0.5 < c.se["(Intercept)"] / sleep.se["(Intercept)"] < 1.5


def test_bad_bootstrap_inputs(sleep):
    with pytest.raises(ValueError, match="nsim must be a positive integer"):
        sleep.bootstrap(nsim=0)
    with pytest.raises(ValueError, match="Did you mean 'parametric'"):
        sleep.bootstrap(nsim=5, type="parametrc")
    with pytest.raises(ValueError, match="not a grouping factor of the model.*Did you mean 'Subject'"):
        sleep.bootstrap(nsim=5, type="case", resample="Subjct")
    with pytest.raises(ValueError, match="not a grouping factor"):
        sleep.bootstrap(nsim=5, type="case", resample="Days")
    g = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    with pytest.raises(ValueError, match="parametric"):
        g.bootstrap(nsim=5, type="residual")
    with pytest.raises(ValueError, match="method must be"):
        sleep.bootstrap(nsim=3, seed=1, progress=False).confint(method="bca")


def test_dense_refit_gradient_is_exact_and_refits_match_full_fits(sleep):
    """The bootstrap's refit path (y-independent cross-products kept, exact gradient, L-BFGS from θ̂)
    against central differences and against a full fit_lmm of the same simulated response."""
    from stochmm.deterministic.lmm import fit_lmm
    from stochmm.inference.bootstrap import _DenseDeviance, _payload, _Refitter

    y = sleep.simulate(1, seed=3).to_numpy()[:, 0]
    for reml in (True, False):
        dd = _DenseDeviance(sleep.model, reml, sleep.fixef.to_numpy())
        dd.set_y(y)
        th = sleep.theta * 1.1 + 0.01
        v, g = dd.value_and_grad(th)
        assert v == pytest.approx(dd(th), abs=1e-9)
        h = 1e-6
        gfd = [(dd(th + h * e) - dd(th - h * e)) / (2 * h) for e in np.eye(th.size)]
        np.testing.assert_allclose(g, gfd, rtol=1e-5, atol=1e-5)
    row = _Refitter(_payload(sleep, "parametric", None)).refit_y(y)
    full = fit_lmm(sleep.model.with_response(y), reml=True)
    np.testing.assert_allclose(row[:2], full.fixef, rtol=1e-7)
    assert row[-3] == pytest.approx(full.objective, abs=1e-6)


def test_glmm_refits_match_full_fits():
    """The GLMM refit path (Laplace deviance in (θ, β) from the estimates, exact gradient, no bounds:
    the deviance is symmetric in θ's sign) against full fit_glmm fits of the same simulated responses,
    including replicates whose variance goes to 0."""
    from stochmm.deterministic.glmm import fit_glmm
    from stochmm.inference.bootstrap import _draw, _payload, _Refitter

    fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
    pl = _payload(fit, "parametric", None)
    ref = _Refitter(pl)
    for ss in np.random.SeedSequence(1).spawn(20)[10:16]:
        y, _ = _draw(pl, "parametric", np.random.default_rng(ss))
        row = ref.refit_y(y)
        with _quiet():
            full = fit_glmm(fit.model.with_response(y))
        assert row[-3] == pytest.approx(full.objective, abs=1e-5)
        np.testing.assert_allclose(row[:4], full.fixef, atol=2e-4)


class _quiet:
    def __enter__(self):
        import warnings

        self._c = warnings.catch_warnings()
        self._c.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        return self._c.__exit__(*a)


def test_nested_case_bootstrap():
    """lmeresampler-style nested resampling: batches, then casks within each drawn batch; with '.obs'
    observations within each drawn subject. Each drawn cluster is a new level."""
    from stochmm.inference.bootstrap import _resample_rows

    d = sm.datasets.load("pastes")
    rng = np.random.default_rng(0)
    idx, lab = _resample_rows(d, ["batch", "cask"], np.arange(len(d)), rng)
    assert idx.size == len(d) and set(lab) == {"batch", "cask"}
    assert len(set(lab["batch"])) == 10 and len(set(lab["cask"])) == 30
    fit = sm.lmer("strength ~ 1 + (1 | batch/cask)", d)
    bt = fit.bootstrap(nsim=12, seed=1, type="case", resample=("batch", "cask"), progress=False)
    assert bt.replicates["converged"].all()
    sleep = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"))
    b2 = sleep.bootstrap(nsim=8, seed=1, type="case", resample=("Subject", ".obs"), progress=False)
    assert b2.replicates.shape[0] == 8
    with pytest.raises(ValueError, match="innermost"):
        sleep.bootstrap(nsim=2, type="case", resample=(".obs", "Subject"))


def test_bootstrap_run_options_are_checked(sleep):
    """progress, seed and chunk are validated at the entry point (a string flag is not silently true)."""
    with pytest.raises(TypeError, match="progress must be True or False"):
        sleep.bootstrap(nsim=2, progress="no")
    with pytest.raises(ValueError, match="seed must be"):
        sleep.bootstrap(nsim=2, seed="a", progress=False)
    with pytest.raises(ValueError, match="seed must be"):
        sleep.bootstrap(nsim=2, seed=1.5, progress=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive integer"):
            sleep.bootstrap(nsim=2, chunk=bad, progress=False)
    d = sm.datasets.load("sleepstudy")
    f0 = sm.lmer("Reaction ~ Days + (1 | Subject)", d, reml=False)
    with pytest.raises(TypeError, match="refit must be True or False"):
        sm.anova(f0, sleep, refit="no")
    with pytest.raises(TypeError, match="progress must be True or False"):
        sm.anova(f0, sleep, method="pboot", nsim=2, progress="no")
    with pytest.raises(ValueError, match="seed must be"):
        sm.anova(f0, sleep, method="pboot", nsim=2, seed="a", progress=False)


def test_case_bootstrap_keeps_an_offset_argument_next_to_formula_offsets():
    """A fit with offset(o1) in the formula and offset="o2": the rebuilt replicates must keep both (o2 was
    dropped, shifting every intercept by its value)."""
    import warnings

    d = sm.datasets.load("sleepstudy")
    d["o1"], d["o2"] = 0.5 * d["Days"], 100.0
    fit = sm.lmer("Reaction ~ Days + offset(o1) + (1 | Subject)", d, offset="o2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = fit.bootstrap(nsim=10, seed=1, type="case", progress=False)
    # the replicate intercepts scatter around the estimate within a few standard errors, not 100 away
    assert abs(bt.replicates["(Intercept)"].mean() - fit.fixef["(Intercept)"]) < 3 * fit.se["(Intercept)"]


def test_bootstrap_resample_and_client_are_checked(sleep):
    """resample= must be names of grouping factors, none repeated; client= a dask Client."""
    for bad in ([], ()):
        with pytest.raises(ValueError, match="resample must name at least one"):
            sleep.bootstrap(nsim=2, type="case", resample=bad, progress=False)
    with pytest.raises(TypeError, match="resample must be"):
        sleep.bootstrap(nsim=2, type="case", resample=3, progress=False)
    with pytest.raises(ValueError, match="more than once"):
        sleep.bootstrap(nsim=2, type="case", resample=("Subject", "Subject"), progress=False)
    with pytest.raises(TypeError, match="client must be a dask.distributed.Client"):
        sleep.bootstrap(nsim=2, client="x", progress=False)
