"""The blocked factorization against a dense brute force on small problems."""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.deterministic.blocks import BlockedSystem


def dense_reference(m, theta, w, X, y):
    Z = m.Z.toarray()
    ZL = Z @ m.Lambda(np.asarray(theta)).toarray()
    A = np.column_stack([ZL, X, y])
    M = A.T @ (w[:, None] * A)
    M[: m.q, : m.q] += np.eye(m.q)
    L = np.linalg.cholesky(M)
    q, p = m.q, X.shape[1]
    ld = 2 * np.log(np.diag(L)[:q]).sum()
    ldx = 2 * np.log(np.diag(L)[q : q + p]).sum()
    r2 = L[-1, -1] ** 2
    # β̂ and u from the normal equations
    sol = np.linalg.solve(M[:-1, :-1], M[:-1, -1])
    Cu = np.linalg.inv(M[:q, :q])
    return ld, ldx, r2, sol[q:], sol[:q], Cu


def synthetic():
    rng = np.random.default_rng(7)
    n = 400
    a = rng.integers(0, 25, n)
    b = rng.integers(0, 9, n)
    d = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "z": rng.normal(size=n),
                      "a": pd.Categorical(a), "b": pd.Categorical(b)})
    return d, rng.uniform(0.5, 2.0, n)


@pytest.mark.parametrize("formula,theta", [
    ("y ~ x + (1 | a) + (1 | b)", [0.7, 1.3]),
    ("y ~ x + (x | a) + (1 | b)", [0.9, 0.3, 0.6, 1.1]),
    ("y ~ x + (1 + x | a) + (z | b)", [0.9, -0.3, 0.6, 1.1, 0.2, 0.4]),
    ("y ~ x + (1 | a) + (0 + z | b) + (1 | b)", [0.5, 0.8, 1.2]),
    ("y ~ x + (1 + x + z | a)", [1.0, 0.1, -0.2, 0.7, 0.3, 0.5]),
])
@pytest.mark.parametrize("weighted", [False, True])
def test_factor_matches_dense(formula, theta, weighted):
    d, w = synthetic()
    m = sm.Model(formula, d)
    ww = w if weighted else np.ones(m.n)
    bs = BlockedSystem(m.terms, m.X, m.y, weights=ww if weighted else None)
    bs.factor(m.lambda_blocks(theta))
    ld, ldx, r2, beta, u, Cu = dense_reference(m, theta, ww, m.X, m.y)
    assert bs.logdet_L == pytest.approx(ld, rel=1e-12)
    assert bs.logdet_RX == pytest.approx(ldx, rel=1e-12)
    assert bs.pwrss == pytest.approx(r2, rel=1e-10)
    np.testing.assert_allclose(bs.beta(), beta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bs.u(), u, rtol=1e-8, atol=1e-11)
    # conditional covariance blocks of u
    blocks = bs.cond_cov_u()
    for t, sl, B in zip(m.terms, m.z_slices, blocks):
        full = Cu[sl, sl]
        for lev in (0, t.nlev - 1):
            np.testing.assert_allclose(B[lev], full[lev * t.k:(lev + 1) * t.k, lev * t.k:(lev + 1) * t.k], rtol=1e-9, atol=1e-13)


def test_no_fixed_effects_and_update():
    """p = 0 (PIRLS with β held fixed) and new weights / response via update()."""
    d, w = synthetic()
    m = sm.Model("y ~ x + (1 | a) + (1 | b)", d)
    X0 = np.zeros((m.n, 0))
    bs = BlockedSystem(m.terms, X0, m.y)
    bs.update(weights=w, y=d["z"].to_numpy())
    bs.factor(m.lambda_blocks([0.4, 0.9]))
    ld, _, r2, _, u, _ = dense_reference(m, [0.4, 0.9], w, X0, d["z"].to_numpy())
    assert bs.logdet_L == pytest.approx(ld, rel=1e-12)
    assert bs.pwrss == pytest.approx(r2, rel=1e-10)
    np.testing.assert_allclose(bs.u(), u, rtol=1e-8, atol=1e-11)


def test_singular_theta_is_fine():
    d, _ = synthetic()
    m = sm.Model("y ~ x + (x | a) + (1 | b)", d)
    bs = BlockedSystem(m.terms, m.X, m.y).factor(m.lambda_blocks([0.0, 0.0, 0.0, 0.0]))
    assert bs.logdet_L == pytest.approx(0.0, abs=1e-12)
    ols = np.linalg.lstsq(m.X, m.y, rcond=None)
    np.testing.assert_allclose(bs.beta(), ols[0], rtol=1e-10)
    assert bs.pwrss == pytest.approx(float(ols[1][0]), rel=1e-10)


@pytest.mark.parametrize("formula,theta", [
    ("y ~ x + (1 | a) + (1 | b)", [0.7, 1.3]),
    ("y ~ x + (1 + x | a) + (z | b)", [0.9, -0.3, 0.6, 1.1, 0.2, 0.4]),
])
def test_reweight_matches_update_and_dense(formula, theta):
    """reweight(w, Wy, y'Wy) (PIRLS) and update(weights=, y=) share the scatter maps; zero weights are fine."""
    d, w = synthetic()
    w[::7] = 0.0
    m = sm.Model(formula, d)
    y = d["z"].to_numpy()
    rs = BlockedSystem(m.terms, m.X).reweight(w, w * y, float(np.sum(w * y * y))).factor(m.lambda_blocks(theta))
    us = BlockedSystem(m.terms, m.X, m.y).update(weights=w, y=y).factor(m.lambda_blocks(theta))
    ld, ldx, r2, beta, u, _ = dense_reference(m, theta, w, m.X, y)
    for bs in (rs, us):
        assert bs.S_A.nnz == rs.S_A.nnz  # the sparsity pattern does not depend on the weights
        assert bs.logdet_L == pytest.approx(ld, rel=1e-12)
        assert bs.logdet_RX == pytest.approx(ldx, rel=1e-12)
        assert bs.pwrss == pytest.approx(r2, rel=1e-10)
        np.testing.assert_allclose(bs.beta(), beta, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(bs.u(), u, rtol=1e-8, atol=1e-11)


def test_update_new_X():
    d, w = synthetic()
    m = sm.Model("y ~ x + (1 | a) + (x | b)", d)
    bs = BlockedSystem(m.terms, np.zeros((m.n, 0)), m.y, weights=w).update(X=m.X)
    bs.factor(m.lambda_blocks([0.6, 0.8, 0.1, 0.5]))
    ld, ldx, r2, beta, _, _ = dense_reference(m, [0.6, 0.8, 0.1, 0.5], w, m.X, m.y)
    assert bs.p == m.X.shape[1]
    assert bs.logdet_RX == pytest.approx(ldx, rel=1e-12)
    assert bs.pwrss == pytest.approx(r2, rel=1e-10)
    np.testing.assert_allclose(bs.beta(), beta, rtol=1e-9, atol=1e-12)


def test_dense_copy_path_equals_sparse_path():
    """Scalar terms with a dense-ish off-diagonal block factor on a dense copy Sd: same result as the sparse path."""
    d, w = synthetic()
    m = sm.Model("y ~ x + (1 | a) + (0 + z | b) + (1 | b)", d)
    Ts = m.lambda_blocks([0.5, 0.8, 1.2])
    dense = BlockedSystem(m.terms, m.X, m.y, weights=w)
    assert dense._dense_S
    sparse = BlockedSystem(m.terms, m.X, m.y, weights=w)
    sparse._dense_S = False
    dense.factor(Ts)
    sparse.factor(Ts)
    assert dense.Sd is not None and sparse.Sd is None
    np.testing.assert_allclose(dense.Sd, sparse.S.toarray(), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dense.Ld, sparse.Ld, rtol=1e-10, atol=1e-12)
    assert dense.logdet_L == pytest.approx(sparse.logdet_L, rel=1e-13)
    np.testing.assert_allclose(dense.u(), sparse.u(), rtol=1e-10, atol=1e-12)
    for a, b in zip(dense.cond_cov_u(), sparse.cond_cov_u()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
