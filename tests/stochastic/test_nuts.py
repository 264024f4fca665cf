"""The NUTS driver (stochmm.stochastic.nuts): exact Gaussian targets, chain methods, thinning, progress,
compiler options."""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stochmm.stochastic import nuts  # isort: skip

MU = np.array([1.0, -2.0, 0.5])
COV = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 2.0]])
PREC = np.linalg.inv(COV)


def gaussian(y):
    """Potential of N(y, COV): y is the mean (the 'response' argument of the compiled program)."""
    P = jnp.asarray(PREC)
    return lambda x: 0.5 * (x - y) @ P @ (x - y)


def run(**kw):
    args = dict(seed=3, warmup=500, draws=2000, chain_method="vectorized")
    args.update(kw)
    return nuts.run_chains(gaussian, np.zeros((4, 3)), jnp.asarray(MU), **args)


@pytest.mark.parametrize("dense", [False, True])
def test_exact_gaussian_means_and_sds_within_mcse(dense):
    out = run(nuts_options={"dense_mass": dense})
    assert out.z.shape == (4, 2000, 3)
    ds = az.convert_to_dataset({"x": out.z})
    mean = ds["x"].mean(("chain", "draw")).values
    mcse_mean = az.mcse(ds, method="mean")["x"].values
    sd = ds["x"].std(("chain", "draw")).values
    mcse_sd = az.mcse(ds, method="sd")["x"].values
    # 3 parameters x 2 statistics: 3.5 MCSE keeps the family-wise false alarm rate below 0.3 %
    assert np.all(np.abs(mean - MU) <= 3.5 * mcse_mean), (mean, mcse_mean)
    assert np.all(np.abs(sd - np.sqrt(np.diag(COV))) <= 3.5 * mcse_sd), (sd, mcse_sd)
    assert not out.fields["diverging"].any()
    assert out.step_size.shape == (4,)
    assert out.inverse_mass_matrix.shape == ((4, 3, 3) if dense else (4, 3))
    # the adapted inverse mass matrix estimates the covariance
    imm = out.inverse_mass_matrix.mean(0)
    np.testing.assert_allclose(np.diagonal(imm) if dense else imm, np.diag(COV), rtol=0.35)


def test_chain_methods_give_the_same_chains():
    # the same keys and arithmetic; rounding differs in the last bits (vectorised code associates sums
    # differently), which chaotic trajectories amplify over hundreds of iterations: compare a short run
    a = run(warmup=10, draws=10, chain_method="vectorized")
    b = run(warmup=10, draws=10, chain_method="sequential")
    np.testing.assert_allclose(a.z, b.z, atol=1e-9)
    np.testing.assert_array_equal(a.fields["num_steps"], b.fields["num_steps"])
    if jax.local_device_count() >= 4:  # stochmm asks XLA for host devices unless JAX came first
        c = run(warmup=10, draws=10, chain_method="parallel")
        np.testing.assert_allclose(a.z, c.z, atol=1e-9)
        np.testing.assert_array_equal(a.fields["num_steps"], c.fields["num_steps"])


def test_thinning_keeps_every_kth_draw_of_the_same_chain():
    full = run(warmup=100, draws=60)
    thin = run(warmup=100, draws=60, thinning=3)
    assert thin.z.shape == (4, 20, 3)
    np.testing.assert_allclose(thin.z, full.z[:, ::3], atol=1e-12)
    np.testing.assert_array_equal(thin.fields["diverging"], full.fields["diverging"][:, ::3])


@pytest.mark.parametrize("method", ["vectorized", "sequential", "parallel"])
def test_progress_counts_every_iteration(monkeypatch, method):
    if method == "parallel" and jax.local_device_count() < 4:
        pytest.skip("JAX was imported before stochmm: one host device")
    seen = []
    monkeypatch.setattr(nuts._Progress, "__call__", lambda self, n: seen.append(int(n)))
    run(warmup=37, draws=41, progress=True, chain_method=method)
    assert sum(seen) == 4 * (37 + 41)


def test_compiler_options_by_size():
    assert nuts.compiler_options(56, 5) == nuts.FAST_COMPILE
    assert nuts.compiler_options(56, 45, marginal=True) == nuts.MEDIUM_COMPILE
    assert nuts.compiler_options(73_421, 5) is None
    assert nuts.compiler_options(7_584, 8) is None


def test_unknown_compiler_options_are_dropped():
    lowered = jax.jit(lambda x: 2.0 * x).lower(jnp.ones(3))
    run = nuts.compile_with(lowered, {"xla_no_such_option_anywhere": True, "xla_backend_optimization_level": 0})
    np.testing.assert_allclose(run(jnp.ones(3)), 2.0)
    assert "xla_no_such_option_anywhere" in nuts._UNSUPPORTED
