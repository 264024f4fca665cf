"""Response families in JAX: the per-observation log-likelihood kernel ℓ_i(η) and its η-derivatives.

The same conventions as :mod:`stochmm.builder.families` (``y`` is the proportion of successes for
binomial models, ``wt`` the number of trials × prior weight, or the prior weight), written as pure,
elementwise JAX functions so that they can be jit-compiled, vmapped and differentiated to any order.
The normalising constants (binomial coefficients, ``log y!``) do not depend on a parameter: they are
taken from :meth:`Family.constant` once, in NumPy, by the caller.

Examples
--------
>>> import numpy as np
>>> from stochmm.builder.families import get_family
>>> kern = kernel(get_family("binomial", "probit"))
>>> d0, d1, d2 = derivs(kern, np.array([1.0]), np.array([0.0]), np.array([1.0]))
>>> round(float(d0[0]), 6), round(float(d1[0]), 6)
(-0.693147, 0.797885)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ._jax import configure

configure()  # float64, persistent compilation cache

import jax.numpy as jnp  # noqa: E402
from jax.scipy.special import log_ndtr  # noqa: E402

from ..errors import DesignError  # noqa: E402

__all__ = ["kernel", "derivs", "SUPPORTED"]

SUPPORTED = {"binomial": ("logit", "probit", "cloglog"), "poisson": ("log",)}


def _xmul(y, v):
    """y·v with 0·(−∞) = 0."""
    return jnp.where(y == 0, 0.0, y * jnp.where(y == 0, 0.0, v))


def _logit(y, eta, wt):
    return wt * (y * eta - jax.nn.softplus(eta))


def _probit(y, eta, wt):
    return wt * (_xmul(y, log_ndtr(eta)) + _xmul(1.0 - y, log_ndtr(-eta)))


def _cloglog(y, eta, wt):
    # log μ = log(1 − exp(−e^η)); below η = −30 its expansion η − e^η/2 (as the NumPy family does)
    small = eta < -30.0
    es = jnp.where(small, -30.0, eta)
    logmu = jnp.where(small, eta - 0.5 * jnp.exp(eta), jnp.log(-jnp.expm1(-jnp.exp(es))))
    return wt * (_xmul(y, logmu) - (1.0 - y) * jnp.exp(eta))


def _poisson_log(y, eta, wt):
    return wt * (y * eta - jnp.exp(eta))


_KERNELS = {("binomial", "logit"): _logit, ("binomial", "probit"): _probit, ("binomial", "cloglog"): _cloglog,
            ("poisson", "log"): _poisson_log}


def kernel(family: Any) -> Callable:
    """kernel(family) -> callable(y, eta, wt) -> per-observation ℓ kernel (no constant)

    The JAX kernel of a :class:`~stochmm.builder.families.Family` (binomial with logit, probit or
    cloglog link; Poisson with log link).

    Raises
    ------
    DesignError
        A family or link without a JAX kernel (custom family objects).

    Examples
    --------
    >>> from stochmm.builder.families import get_family
    >>> float(kernel(get_family("poisson"))(2.0, 0.0, 1.0))
    -1.0
    """
    name = getattr(family, "name", None)
    link = getattr(getattr(family, "link", None), "name", None)
    fn = _KERNELS.get((name, link))
    if fn is None:
        ok = "; ".join(f"{f}: {', '.join(lk)}" for f, lk in SUPPORTED.items())
        raise DesignError(f"no JAX log-likelihood for family {name!r} with link {link!r}; supported: {ok}")
    return fn


def derivs(kern: Callable, y, eta, wt, order: int = 2) -> tuple:
    """derivs(kern, y, eta, wt, order=2) -> (ℓ, ∂ℓ/∂η[, ∂²ℓ/∂η²])

    Kernel values and η-derivatives by forward-mode differentiation of the elementwise kernel
    (exact; differentiable again).
    """
    def f(e):
        return kern(y, e, wt)

    if order == 0:
        return (f(eta),)
    one = jnp.ones_like(eta)
    if order == 1:
        return jax.jvp(f, (eta,), (one,))

    def f1(e):
        return jax.jvp(f, (e,), (one,))

    (v, d1), (_, d2) = jax.jvp(f1, (eta,), (one,))
    return v, d1, d2
