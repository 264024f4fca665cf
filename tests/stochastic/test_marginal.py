"""Marginal likelihoods in JAX (stochmm.stochastic.marginal) against the deterministic paths.

* LMM exact: equals the ML log-likelihood of stochmm.deterministic.lmm at its optimum (sleepstudy,
  crossed Penicillin) and a dense n × n multivariate-normal density at arbitrary parameters;
* GLMM AGQ: equals stochmm.deterministic.quadrature.agq (cbpp scalar with logit/probit/cloglog,
  proportions with weights, Poisson with an offset; the vector-valued (time | id) binary term);
* GLMM Laplace (crossed): equals the deterministic BlockedEngine Laplace value;
* gradients by jax.grad against central finite differences;
* draws of b | y: LMM — sample mean/covariance against the closed-form conditional Gaussian; GLMM —
  per-level sample mean/variance against moments from an independent numerical integration.
  Tolerances in Monte Carlo standard errors: with N independent draws, z = (estimate − truth)/MCSE,
  MCSE(mean) = sd/√N, MCSE(variance) = √((μ₄ − σ⁴)/N) (normal case: σ²√(2/N)); every |z| ≤ 4.5
  (over ≤ 100 statistics a correct sampler fails with probability < 1e-3; seeds fixed).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.builder.families import get_family
from stochmm.deterministic.pirls import BlockedEngine, LevelEngine
from stochmm.deterministic.quadrature import agq, tensor_rule
from stochmm.errors import DesignError
from stochmm.stochastic import marginal as mg

REF = Path(__file__).resolve().parents[1] / "reference"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
Z_MAX = 4.5


def _fd_grad(f, x, h=1e-6):
    x = np.asarray(x, dtype=float)
    return np.array([(f(x + e) - f(x - e)) / (2 * h) for e in np.eye(x.size) * h])


# ---------------------------------------------------------------------------------------------
# LMM exact
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sleep():
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", sm.datasets.load("sleepstudy"), reml=False)
    return fit, mg.build(fit.model)


def _dense_lmm(m, beta, Ls, sigma):
    """Dense reference: y ~ N(Xβ + offset, σ²W⁻¹ + Z G Z'), and b | y."""
    G = np.zeros((m.q, m.q))
    for t, s, L in zip(m.terms, m.z_slices, Ls):
        G[s, s] = np.kron(np.eye(t.nlev), L @ L.T)
    Z = m.Z.toarray()
    V = sigma**2 * np.diag(1.0 / m.prior_weights) + Z @ G @ Z.T
    r = m.y - m.offset - m.X @ beta
    sign, logdet = np.linalg.slogdet(V)
    ll = -0.5 * (m.n * np.log(2 * np.pi) + logdet + r @ np.linalg.solve(V, r))
    GZ = G @ Z.T
    mean = GZ @ np.linalg.solve(V, r)
    cov = G - GZ @ np.linalg.solve(V, GZ.T)
    return ll, mean, cov


def test_lmm_exact_equals_ml_loglik(sleep):
    fit, ml = sleep
    assert ml.kind == "exact" and mg.applies(fit.model)[0]
    val = float(ml.loglik(fit.fixef.to_numpy(), ml.L_list(fit.theta, fit.sigma), fit.sigma))
    assert val == pytest.approx(fit.loglik, abs=1e-8)


def test_lmm_crossed_penicillin_and_dense_reference():
    pen = sm.datasets.load("penicillin")
    fit = sm.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, reml=False)
    ml = mg.build(fit.model)
    assert ml.lay.q_rest == 6
    val = float(ml.loglik(fit.fixef.to_numpy(), ml.L_list(fit.theta, fit.sigma), fit.sigma))
    assert val == pytest.approx(fit.loglik, abs=1e-8)
    # away from the optimum, and with prior weights and an offset, against the dense density
    rng = np.random.default_rng(3)
    m = sm.Model("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, weights=rng.uniform(0.5, 2, len(pen)),
                 offset=rng.normal(size=len(pen)))
    ml = mg.build(m)
    Ls = [np.array([[0.7]]), np.array([[1.9]])]
    ref, mean, cov = _dense_lmm(m, np.array([22.5]), Ls, 0.6)
    assert float(ml.loglik(np.array([22.5]), Ls, 0.6)) == pytest.approx(ref, abs=1e-8)
    cm, cc = ml.cond_moments(np.array([22.5]), Ls, 0.6)  # the crossed factor's conditional Gaussian
    np.testing.assert_allclose(np.asarray(cm), mean, atol=1e-9)
    np.testing.assert_allclose(np.asarray(cc), cov, atol=1e-9)


def test_lmm_vector_rest_term_dense_reference():
    # a vector-valued term after the first factor (dense Schur block with 2 x 2 level blocks)
    df = sm.datasets.load("sleepstudy").copy()
    df["grp"] = (df.index % 7).astype(str)
    m = sm.Model("Reaction ~ Days + (1 | Subject) + (Days | grp)", df)
    ml = mg.build(m)
    assert ml.lay.q_rest == 14
    Ls = [np.array([[30.0]]), np.array([[10.0, 0.0], [-2.0, 4.0]])]
    beta = np.array([250.0, 9.0])
    ref = _dense_lmm(m, beta, Ls, 28.0)[0]
    assert float(ml.loglik(beta, Ls, 28.0)) == pytest.approx(ref, abs=1e-8)
    # both forms of the Schur downdate: one dense product (chosen here) and the scatter over pairs of pairs
    # (chosen for sparse crossings such as InstEval's)
    sparse = mg.build(m)
    assert ml.lay.dense_S
    sparse.lay.dense_S = False
    assert float(sparse.loglik(beta, Ls, 28.0)) == pytest.approx(ref, abs=1e-8)
    _, mean, cov = _dense_lmm(m, beta, Ls, 28.0)
    cm, cc = sparse.cond_moments(beta, Ls, 28.0)  # (the dense form: Penicillin above)
    np.testing.assert_allclose(np.asarray(cm), mean, atol=1e-8)
    np.testing.assert_allclose(np.asarray(cc), cov, atol=1e-8)


def test_lmm_gradient_matches_finite_differences(sleep):
    fit, ml = sleep
    x0 = np.array([250.0, 10.0, 24.0, 0.5, 5.5, 26.0])

    def f(x):
        return ml.loglik(x[:2], [jax.numpy.array([[x[2], 0.0], [x[3], x[4]]])], x[5])

    g = np.asarray(jax.grad(f)(x0))
    np.testing.assert_allclose(g, _fd_grad(lambda x: float(f(x)), x0, 1e-5), rtol=1e-6, atol=1e-7)


def test_lmm_draws_match_closed_form(sleep):
    fit, ml = sleep
    m = fit.model
    beta, sigma = fit.fixef.to_numpy(), fit.sigma
    Ls = ml.L_list(fit.theta, sigma)
    _, mean, cov = _dense_lmm(m, beta, [np.asarray(L) for L in Ls], sigma)
    cm, cc = ml.cond_moments(beta, Ls, sigma)
    np.testing.assert_allclose(np.asarray(cm), mean, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.asarray(cc), cov, rtol=1e-7, atol=1e-7)
    N = 4000
    keys = jax.random.split(jax.random.PRNGKey(11), N)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: ml.draw_ranef(k, beta, Ls, sigma)))(keys))
    sd = np.sqrt(np.diag(cov))
    z_mean = (draws.mean(0) - mean) / (sd / np.sqrt(N))
    S = np.cov(draws, rowvar=False)
    # within-level covariances (intercept, slope) and variances: MCSE √((σ_aa σ_bb + σ_ab²)/N)
    ia, ib = np.arange(0, m.q, 2), np.arange(1, m.q, 2)
    pairs = [(ia, ia), (ib, ib), (ia, ib)]
    z_cov = np.concatenate([(S[a, b] - cov[a, b]) / np.sqrt((cov[a, a] * cov[b, b] + cov[a, b] ** 2) / N)
                            for a, b in pairs])
    assert np.max(np.abs(z_mean)) < Z_MAX and np.max(np.abs(z_cov)) < Z_MAX


# ---------------------------------------------------------------------------------------------
# GLMM AGQ (one grouping factor)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cbpp():
    return sm.datasets.load("cbpp")


@pytest.mark.parametrize("link", ["logit", "probit", "cloglog"])
def test_agq_equals_deterministic_agq(cbpp, link):
    m = sm.Model(CBPP, cbpp, family="binomial")
    fam = get_family("binomial", link)
    ml = mg.build(m, nagq=25, family=fam)
    eng = LevelEngine(m, fam)
    for th, be in [(0.8, [-1.2, -1.0, -1.1, -1.5]), (1.6, [-0.3, 0.4, -2.0, -0.9])]:
        ref = agq(eng, np.array([th]), np.array(be), tensor_rule(25, 1))[0]
        assert -2 * float(ml.loglik(np.array(be), [np.array([[th]])])) == pytest.approx(ref, abs=1e-7)


def test_agq_at_the_package_mle(cbpp):
    # the package's cbpp AGQ-25 −2ℓ at its MLE (full scale) is 183.966738
    fit = sm.glmer(CBPP, cbpp, family="binomial", nagq=25)
    ml = mg.build(fit.model, nagq=25)
    val = -2 * float(ml.loglik(fit.fixef.to_numpy(), ml.L_list(fit.theta)))
    assert val == pytest.approx(-2 * fit.loglik, abs=1e-6)
    assert val == pytest.approx(183.966738, abs=1e-6)


def test_agq_proportions_with_weights_and_poisson_offset(cbpp):
    df = cbpp.assign(prop=cbpp.incidence / cbpp["size"])
    m1 = sm.Model(CBPP, cbpp, family="binomial")
    m2 = sm.Model("prop ~ period + (1 | herd)", df, family="binomial", weights="size")
    be, L = np.array([-1.3, -0.9, -1.0, -1.6]), [np.array([[0.7]])]
    v1, v2 = (float(mg.build(m, nagq=9).loglik(be, L)) for m in (m1, m2))
    eng = LevelEngine(m2, get_family("binomial"))
    assert v2 == pytest.approx(-0.5 * agq(eng, np.array([0.7]), be, tensor_rule(9, 1))[0], abs=1e-8)
    # same kernel; the binomial coefficients of cbind() and of proportions-with-weights agree here
    assert v1 == pytest.approx(v2, abs=1e-8)
    mp = sm.Model("incidence ~ period + offset(log(size)) + (1 | herd)", cbpp, family="poisson")
    engp = LevelEngine(mp, get_family("poisson"))
    ref = agq(engp, np.array([0.6]), np.array([-2.2, -1.0, -1.2, -1.7]), tensor_rule(9, 1))[0]
    mlp = mg.build(mp)
    assert mlp.kind == "agq(9)"
    # prior weights (Poisson: they multiply the log-likelihood and its constants)
    wts = np.random.default_rng(2).uniform(0.5, 2.0, len(cbpp))
    mw = sm.Model("incidence ~ period + offset(log(size)) + (1 | herd)", cbpp, family="poisson", weights=wts)
    refw = agq(LevelEngine(mw, get_family("poisson")), np.array([0.6]), np.array([-2.2, -1.0, -1.2, -1.7]),
               tensor_rule(9, 1))[0]
    assert -2 * float(mg.build(mw).loglik(np.array([-2.2, -1.0, -1.2, -1.7]), [np.array([[0.6]])])) == \
        pytest.approx(refw, abs=1e-7)
    assert -2 * float(mlp.loglik(np.array([-2.2, -1.0, -1.2, -1.7]), [np.array([[0.6]])])) == pytest.approx(ref,
                                                                                                          abs=1e-7)


@pytest.fixture(scope="module")
def slopes():
    d = json.loads((REF / "lme4_glmm_extra.json").read_text())["glmmadaptive_slopes"]
    D = d["data"]
    df = pd.DataFrame(dict(id=pd.Categorical([str(i) for i in D["id"]], categories=[str(i) for i in range(1, 101)]),
                           time=D["time"], sex=pd.Categorical(D["sex"], categories=["male", "female"]), y=D["y"]))
    return sm.Model("y ~ sex * time + (time | id)", df, family="binomial")


def test_vector_agq_equals_deterministic_vector_agq(slopes):
    m = slopes
    eng = LevelEngine(m, get_family("binomial"))
    th, be = np.array([0.6, 0.15, 0.15]), np.array([-2.0, -1.1, 0.25, 0.0])
    for nq in (1, 5):
        ml = mg.build(m, nagq=nq)
        val = -2 * float(ml.loglik(be, ml.L_list(th)))
        assert val == pytest.approx(agq(eng, th, be, tensor_rule(nq, 2))[0], abs=1e-7)
    assert mg.build(m).kind == "agq(5)"


def test_two_terms_on_one_factor_are_one_block():
    # (1 | id) + (0 + Anger | id): one 2-dimensional block per level, two factors in L_list, b in Z's order
    v = sm.datasets.load("VerbAgg")
    m = sm.Model("r2 ~ Anger + btype + (1 | id) + (0 + Anger | id)", v[v["id"].astype(int) <= 40], family="binomial")
    ml = mg.build(m, nagq=3)
    assert ml.lay.k0 == 2 and ml.lay.q_rest == 0 and mg.applies(m)[0]
    th, be = np.array([1.1, 0.07]), np.array([0.2, 0.05, -1.0, -2.0])
    ref = agq(LevelEngine(m, get_family("binomial")), th, be, tensor_rule(3, 2))[0]
    assert -2 * float(ml.loglik(be, ml.L_list(th))) == pytest.approx(ref, abs=1e-7)
    b = np.asarray(ml.draw_ranef(jax.random.PRNGKey(0), be, ml.L_list(th)))
    assert b.shape == (m.q,) and np.all(np.isfinite(b))
    # the slopes are the second term's columns: their scale follows its SD (0.07 × Anger), not the intercepts'
    assert np.std(b[m.z_slices[1]]) < 0.5 * np.std(b[m.z_slices[0]])


def test_vector_glmm_draws_match_importance_sampling(slopes):
    # (time | id), 2 random effects per level: per-level moments of b | y by self-normalised importance
    # sampling in NumPy (Bernoulli-logit likelihood written out here) from a widened Gaussian fitted to the
    # draws (consistent for any proposal); z uses both Monte Carlo errors
    m = slopes
    ml = mg.build(m)
    th, be = np.array([0.6, 0.15, 0.15]), np.array([-2.0, -1.1, 0.25, 0.0])
    Ls = ml.L_list(th)
    N = 1000
    keys = jax.random.split(jax.random.PRNGKey(7), N)
    b, acc = jax.jit(lambda ks: jax.lax.map(lambda k: ml.draw_info(k, be, Ls), ks))(keys)
    b = np.asarray(b).reshape(N, m.terms[0].nlev, 2)
    assert float(np.mean(acc)) > 0.8
    t = m.terms[0]
    S = Ls[0] @ Ls[0].T
    Sinv = np.linalg.inv(S)
    eta0 = m.X @ be
    rng = np.random.default_rng(3)
    M = 10_000
    zs = []
    for lev in range(t.nlev):
        rows = t.refs == lev
        mu, C = b[:, lev].mean(0), 2.0 * np.cov(b[:, lev], rowvar=False)
        Lc = np.linalg.cholesky(C)
        e = rng.standard_normal((M, 2))
        x = mu + e @ Lc.T
        eta = eta0[rows][None, :] + x @ t.z[rows].T
        lw = (m.y[rows] * eta - np.logaddexp(0, eta)).sum(1) - 0.5 * np.einsum("ma,ab,mb->m", x, Sinv, x)
        lw += 0.5 * np.sum(e * e, 1)
        w = np.exp(lw - lw.max())
        w /= w.sum()
        ess = 1.0 / np.sum(w**2)
        m_is = w @ x
        v_is = w @ (x - m_is) ** 2
        zs.append((b[:, lev].mean(0) - m_is) / np.sqrt(v_is / N + v_is / ess))
        zs.append((b[:, lev].var(0, ddof=1) - v_is) / (v_is * np.sqrt(2 / N + 2 / ess)))
    # 400 statistics: a correct sampler exceeds 4.5 with probability about 400 × 7e-6 = 3e-3
    assert np.max(np.abs(np.concatenate(zs))) < Z_MAX


def test_agq_gradients_match_finite_differences(cbpp, slopes):
    ml = mg.build(sm.Model(CBPP, cbpp, family="binomial"), nagq=9, family=get_family("binomial", "cloglog"))
    x0 = np.array([-1.2, -1.0, -1.1, -1.5, 0.8])

    def f(x):
        return ml.loglik(x[:4], [x[4:].reshape(1, 1)])

    g = np.asarray(jax.jit(jax.grad(f))(x0))
    np.testing.assert_allclose(g, _fd_grad(lambda x: float(f(x)), x0), rtol=1e-6, atol=1e-6)
    mlv = mg.build(slopes, nagq=3)
    x1 = np.array([-2.0, -1.1, 0.25, 0.0, 0.6, 0.15, 0.15])

    def fv(x):
        return mlv.loglik(x[:4], [jax.numpy.array([[x[4], 0.0], [x[5], x[6]]])])

    g = np.asarray(jax.jit(jax.grad(fv))(x1))
    np.testing.assert_allclose(g, _fd_grad(lambda x: float(fv(x)), x1), rtol=1e-6, atol=1e-6)


def _level_moments(m, fam, beta, L):
    """Per-level E(b | y), Var(b | y) and E(b − μ)⁴ by brute-force numerical integration on a grid."""
    t = m.terms[0]
    eta0 = m.X @ beta + m.offset
    out = []
    for lev in range(t.nlev):
        rows = t.refs == lev
        grid = np.linspace(-12, 12, 4801) * L  # b = L u, u ∈ [−12, 12]
        eta = eta0[rows][:, None] + t.z[rows, 0][:, None] * grid[None, :]
        ll = fam.derivs(m.y[rows][:, None], eta, m.weights[rows][:, None], 0)[0].sum(0) - 0.5 * (grid / L) ** 2
        p = np.exp(ll - ll.max())
        p /= p.sum()
        mu = p @ grid
        var = p @ (grid - mu) ** 2
        out.append((mu, var, p @ (grid - mu) ** 4))
    return np.array(out)


def test_glmm_draws_match_quadrature_moments(cbpp):
    m = sm.Model(CBPP, cbpp, family="binomial")
    ml = mg.build(m)
    beta, L = np.array([-1.4, -1.0, -1.1, -1.6]), 0.9
    mom = _level_moments(m, get_family("binomial"), beta, L)
    N = 4000
    keys = jax.random.split(jax.random.PRNGKey(5), N)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: ml.draw_ranef(k, beta, [np.array([[L]])])))(keys))
    mu, var, m4 = mom.T
    z_mean = (draws.mean(0) - mu) / np.sqrt(var / N)
    z_var = (draws.var(0, ddof=1) - var) / np.sqrt((m4 - var**2) / N)
    assert np.max(np.abs(z_mean)) < Z_MAX and np.max(np.abs(z_var)) < Z_MAX


# ---------------------------------------------------------------------------------------------
# crossed GLMM: Laplace
# ---------------------------------------------------------------------------------------------
def test_laplace_crossed_equals_deterministic_laplace():
    v = sm.datasets.load("VerbAgg")
    v = v[v["id"].astype(int) <= 60]
    m = sm.Model("r2 ~ Anger + btype + (1 | id) + (1 | item)", v, family="binomial")
    ok, why = mg.applies(m)
    assert not ok and "laplace" in why
    with pytest.raises(DesignError, match="crossed"):
        mg.build(m)
    ml = mg.build(m, kind="laplace")
    assert ml.kind == "laplace"
    eng = BlockedEngine(m, get_family("binomial"))
    th, be = np.array([1.2, 0.5]), np.array([0.3, 0.05, -0.9, -1.8])
    ref = eng.laplace(th, be)[0]
    assert -2 * float(ml.loglik(be, ml.L_list(th))) == pytest.approx(ref, abs=1e-7)
    x0 = np.concatenate([be, th])

    def f(x):
        return ml.loglik(x[:4], [x[4:5].reshape(1, 1), x[5:6].reshape(1, 1)])

    g = np.asarray(jax.jit(jax.grad(f))(x0))
    np.testing.assert_allclose(g, _fd_grad(lambda x: float(f(x)), x0), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input(sleep, cbpp, monkeypatch):
    fit, ml = sleep
    # the dense block (factors after the first) has a size limit, with the cost in the message
    pen = sm.Model("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"))
    monkeypatch.setattr(mg.bc, "MAX_DENSE", 5)
    ok, why = mg.applies(pen)
    assert not ok and "limited to 5" in why and "GFlop" in why
    with pytest.raises(DesignError, match="limited to 5"):
        mg.build(pen)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="kind"):
        mg.build(fit.model, kind="exactly")
    with pytest.raises(DesignError, match="GLMMs"):
        mg.build(fit.model, kind="agq")
    with pytest.raises(ValueError, match="beta must have shape"):
        ml.loglik(np.zeros(3), ml.L_list(fit.theta, fit.sigma), fit.sigma)
    with pytest.raises(ValueError, match="sigma"):
        ml.loglik(np.zeros(2), ml.L_list(fit.theta, fit.sigma))
    with pytest.raises(ValueError, match="2x2"):
        ml.loglik(np.zeros(2), [np.eye(3)], 1.0)
    mc = sm.Model(CBPP, cbpp, family="binomial")
    with pytest.raises(DesignError, match="closed-form"):
        mg.build(mc, kind="exact")
    with pytest.raises(ValueError, match="nagq"):
        mg.build(mc, nagq=0)
    with pytest.raises(TypeError):
        mg.applies("not a model")


def test_laplace_crossed_draws_match_importance_sampling():
    # reference moments of b | y by self-normalised importance sampling from a wide Gaussian (consistent for
    # any proposal), with the binary log-likelihood written out here in NumPy; z uses both MCSEs
    v = sm.datasets.load("VerbAgg")
    m = sm.Model("r2 ~ Anger + btype + (1 | id) + (1 | item)", v[v["id"].astype(int) <= 12], family="binomial")
    ml = mg.build(m, kind="laplace")
    th, be = np.array([1.2, 0.6]), np.array([0.3, 0.05, -0.9, -1.8])
    Ls = ml.L_list(th)
    N = 1000
    keys = jax.random.split(jax.random.PRNGKey(1), N)
    b, acc = jax.jit(lambda ks: jax.lax.map(lambda k: ml.draw_info(k, be, Ls), ks))(keys)  # (vmap compiles longer)
    b = np.asarray(b)
    assert float(np.mean(acc)) > 0.8
    Z = m.Z.toarray()
    prior_var = np.concatenate([np.full(t.nlev, L[0, 0] ** 2) for t, L in zip(m.terms, Ls)])
    rng = np.random.default_rng(0)
    mu, C = b.mean(0), 1.5 * np.cov(b, rowvar=False)
    Lc = np.linalg.cholesky(C)
    M = 100_000
    x = mu + rng.standard_normal((M, m.q)) @ Lc.T
    eta = (m.X @ be)[None, :] + x @ Z.T
    lw = (m.y * eta - np.logaddexp(0, eta)).sum(1) - 0.5 * np.sum(x**2 / prior_var, 1)
    lw += 0.5 * np.sum(np.linalg.solve(Lc, (x - mu).T) ** 2, 0)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)
    assert ess > 2000
    m_is = w @ x
    v_is = w @ (x - m_is) ** 2
    z = (b.mean(0) - m_is) / np.sqrt(v_is / N + v_is / ess)
    zv = (b.var(0, ddof=1) - v_is) / (v_is * np.sqrt(2 / N + 2 / ess))
    assert np.max(np.abs(z)) < Z_MAX and np.max(np.abs(zv)) < Z_MAX
