"""Response families and link functions for generalized linear mixed models.

A :class:`Family` is everything the GLMM fitting code knows about the
conditional distribution of the response: the per-observation log-likelihood
kernel and its first three derivatives with respect to the linear predictor η,
the normalising constants (binomial coefficients, ``log y!``), the expected
(Fisher) weights, the variance function, Pearson residuals and random draws.
The fitting code (:mod:`stochmm.deterministic.pirls`, :mod:`stochmm.deterministic.quadrature`,
:mod:`stochmm.deterministic.glmm`) calls only this interface, so a new family is a new
subclass: nothing else changes.

Conventions
-----------
For observation *i* with response ``y`` (for binomial models the proportion of
successes), weight ``wt`` (binomial: number of trials × prior weight; otherwise
the prior weight) and linear predictor ``η``, the log-likelihood is

    ℓ_i(η) = kernel_i(η) + constant_i,

``kernel`` carries all dependence on η; ``constant`` does not depend on any
parameter and is what lme4 drops from its nAGQ > 1 deviance (together with the
saturated kernel, see :meth:`Family.saturated_loglik`). The derivatives are
``d1 = ∂ℓ/∂η``, ``d2 = ∂²ℓ/∂η²`` (so the observed weight is ``-d2``) and
``d3 = ∂³ℓ/∂η³``.

Examples
--------
>>> fam = get_family("binomial", "probit")
>>> fam.label
'binomial  ( probit )'
>>> ll, d1, d2 = fam.derivs(np.array([1.0]), np.array([0.0]), np.array([1.0]), order=2)
>>> round(float(ll[0]), 6), round(float(d1[0]), 6)
(-0.693147, 0.797885)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from ..errors import DataError

__all__ = [
    "Link",
    "LogitLink",
    "ProbitLink",
    "CloglogLink",
    "LogLink",
    "Family",
    "Binomial",
    "Poisson",
    "FamilyError",
    "get_family",
    "binomial",
    "poisson",
]


class FamilyError(DataError):
    """FamilyError(message) — an unsupported family or link, or a family object that lacks the interface.

    Examples
    --------
    >>> try:
    ...     get_family("binomial", "log")
    ... except FamilyError as err:
    ...     print(err)
    link 'log' is not supported for the binomial family; supported: logit, probit, cloglog
    """


# ---------------------------------------------------------------------------------------------
# links
# ---------------------------------------------------------------------------------------------
class Link:
    """Link(name)

    A link function g with μ = g⁻¹(η). Subclasses implement :meth:`linkfun`,
    :meth:`linkinv` and :meth:`mu_derivs` (dμ/dη, d²μ/dη², d³μ/dη³), which is all
    the generic chain-rule code in :class:`Family` needs.

    Examples
    --------
    >>> LogitLink().linkinv(np.array([0.0]))
    array([0.5])
    """

    name = "link"

    def linkfun(self, mu: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def linkinv(self, eta: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def mu_derivs(self, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def mu_eta(self, eta: np.ndarray) -> np.ndarray:
        """dμ/dη."""
        return self.mu_derivs(eta)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LogitLink(Link):
    """LogitLink() — logit: μ = 1 / (1 + e^{-η}).

    Examples
    --------
    >>> [round(float(v[0]), 4) for v in LogitLink().mu_derivs(np.array([0.0]))]
    [0.25, 0.0, -0.125]
    """

    name = "logit"

    def linkfun(self, mu):
        return special.logit(mu)

    def linkinv(self, eta):
        return special.expit(eta)

    def mu_derivs(self, eta):
        mu = special.expit(eta)
        v = mu * (1.0 - mu)
        return v, v * (1.0 - 2.0 * mu), v * (1.0 - 6.0 * v)


class ProbitLink(Link):
    """ProbitLink() — probit: μ = Φ(η).

    Examples
    --------
    >>> round(float(ProbitLink().linkinv(np.array([1.0]))[0]), 6)
    0.841345
    """

    name = "probit"

    def linkfun(self, mu):
        return special.ndtri(mu)

    def linkinv(self, eta):
        return special.ndtr(eta)

    def mu_derivs(self, eta):
        phi = np.exp(-0.5 * eta * eta) / np.sqrt(2.0 * np.pi)
        return phi, -eta * phi, (eta * eta - 1.0) * phi


class CloglogLink(Link):
    """CloglogLink() — complementary log-log: μ = 1 − exp(−e^η).

    Examples
    --------
    >>> round(float(CloglogLink().linkfun(np.array([0.5]))[0]), 6)
    -0.366513
    """

    name = "cloglog"

    def linkfun(self, mu):
        return np.log(-np.log1p(-mu))

    def linkinv(self, eta):
        return -np.expm1(-np.exp(eta))

    def mu_derivs(self, eta):
        t = np.exp(eta)
        d1 = t * np.exp(-t)
        d2 = d1 * (1.0 - t)
        d3 = d1 * ((1.0 - t) ** 2 - t)
        return d1, d2, d3


class LogLink(Link):
    """LogLink() — log: μ = e^η.

    Examples
    --------
    >>> float(LogLink().linkinv(np.array([0.0]))[0])
    1.0
    """

    name = "log"

    def linkfun(self, mu):
        return np.log(mu)

    def linkinv(self, eta):
        return np.exp(eta)

    def mu_derivs(self, eta):
        mu = np.exp(eta)
        return mu, mu, mu


_LINKS: dict[str, type[Link]] = {"logit": LogitLink, "probit": ProbitLink, "cloglog": CloglogLink, "log": LogLink}


# ---------------------------------------------------------------------------------------------
# families
# ---------------------------------------------------------------------------------------------
class Family:
    """Family(link=None)

    Base class of GLMM response families. A subclass sets ``name``, ``links``
    (supported link names, the first being the default) and implements
    :meth:`mu_loglik` (the kernel and its μ-derivatives), :meth:`constant`,
    :meth:`variance`, :meth:`simulate` and :meth:`saturated_kernel`. Links with a
    closed-form kernel in η (canonical or numerically delicate ones) may be
    special-cased in :meth:`derivs`; everything else goes through the chain rule.

    Attributes
    ----------
    name : str
        ``"binomial"``, ``"poisson"``.
    link : Link
    dispersion : bool
        False: the scale is fixed at 1 (no residual variance is estimated).

    Examples
    --------
    A new family needs only the kernel of ℓ in μ, its normalising constant, the
    variance function and a sampler; derivatives in η follow from the link:

    >>> class Bernoulli(Family):
    ...     name, links = "binomial", ("logit",)
    ...     def mu_loglik(self, y, mu, wt, order):
    ...         out = [wt * (y * np.log(mu) + (1 - y) * np.log1p(-mu)), wt * (y / mu - (1 - y) / (1 - mu))]
    ...         out.append(-wt * (y / mu**2 + (1 - y) / (1 - mu) ** 2))
    ...         return tuple(out[: order + 1])
    ...     def variance(self, mu):
    ...         return mu * (1 - mu)
    >>> d = Bernoulli().derivs(np.array([1.0]), np.array([0.0]), np.array([1.0]), order=2)
    >>> [round(float(v[0]), 6) for v in d]
    [-0.693147, 0.5, -0.25]
    """

    name = "family"
    links: tuple[str, ...] = ()
    dispersion = False

    def __init__(self, link: str | Link | None = None) -> None:
        if link is None:
            link = self.links[0]
        if isinstance(link, Link):
            self.link = link
        else:
            if not isinstance(link, str):
                raise FamilyError(f"link must be a name or a Link object, got {link!r}")
            lk = link.lower()
            if lk not in self.links:
                raise FamilyError(
                    f"link {link!r} is not supported for the {self.name} family; supported: {', '.join(self.links)}"
                )
            self.link = _LINKS[lk]()

    # -- description -----------------------------------------------------------------------
    @property
    def label(self) -> str:
        """``"binomial  ( logit )"`` as glmer's summary prints it."""
        return f"{self.name}  ( {self.link.name} )"

    @property
    def canonical(self) -> bool:
        """Whether the link is the family's canonical link (observed = expected information)."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(link={self.link.name!r})"

    # -- the log-likelihood ------------------------------------------------------------------
    def linkinv(self, eta: np.ndarray) -> np.ndarray:
        return self.link.linkinv(eta)

    def mu_loglik(self, y: np.ndarray, mu: np.ndarray, wt: np.ndarray, order: int) -> tuple[np.ndarray, ...]:
        """Kernel of ℓ as a function of μ and its first ``order`` μ-derivatives."""
        raise NotImplementedError  # pragma: no cover - abstract

    def derivs(self, y: np.ndarray, eta: np.ndarray, wt: np.ndarray, order: int = 2) -> tuple[np.ndarray, ...]:
        """derivs(y, eta, wt, order=2) -> (kernel, d1[, d2[, d3]])

        Log-likelihood kernel per observation and its first ``order`` derivatives
        with respect to η, by the chain rule through the link.
        """
        m = self.link.mu_derivs(eta)
        mu = self.link.linkinv(eta)
        L = self.mu_loglik(y, mu, wt, order)
        out = [L[0]]
        if order >= 1:
            out.append(L[1] * m[0])
        if order >= 2:
            out.append(L[2] * m[0] ** 2 + L[1] * m[1])
        if order >= 3:
            out.append(L[3] * m[0] ** 3 + 3.0 * L[2] * m[0] * m[1] + L[1] * m[2])
        return tuple(out)

    def fisher_weights(self, eta: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """Expected-information (IRLS) weights wt·(dμ/dη)²/V(μ), as lme4's PIRLS uses."""
        mu = self.link.linkinv(eta)
        return wt * self.link.mu_eta(eta) ** 2 / self.variance(mu)

    def variance(self, mu: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def constant(self, model: Any) -> np.ndarray:  # pragma: no cover - abstract
        """Per-observation normalising constant of ℓ (no parameter dependence)."""
        raise NotImplementedError

    def saturated_kernel(self, y: np.ndarray, wt: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def saturated_loglik(self, model: Any) -> float:
        """saturated_loglik(model) -> float

        Log-likelihood of the saturated model (μ = y), constants included. lme4's
        nAGQ > 1 deviance is the full −2 log-likelihood *minus* −2 × this value
        (lme4 issues #161, #567): add ``-2 * saturated_loglik`` back to compare.
        """
        return float(np.sum(self.saturated_kernel(model.y, model.weights)) + np.sum(self.constant(model)))

    def pearson_residuals(self, y: np.ndarray, mu: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """(y − μ)·√wt / √V(μ)."""
        return (y - mu) * np.sqrt(wt) / np.sqrt(self.variance(mu))

    def simulate(self, mu: np.ndarray, model: Any, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def validate_response(self, y: np.ndarray, wt: np.ndarray) -> None:
        """Raise :class:`DataError` on responses the family cannot have (the builder checks first)."""


class Binomial(Family):
    """Binomial(link="logit")

    Binomial responses: 0/1, booleans, two-level factors, ``cbind(successes,
    failures)`` or proportions with ``weights`` = number of trials. Links logit
    (default), probit and cloglog; the three have closed-form, overflow-safe
    derivatives.

    Examples
    --------
    >>> fam = Binomial("cloglog")
    >>> round(float(fam.linkinv(np.array([0.0]))[0]), 6)  # 1 − e^{−1}
    0.632121
    """

    name = "binomial"
    links = ("logit", "probit", "cloglog")

    @property
    def canonical(self) -> bool:
        """Whether the link is the family's canonical link (observed = expected information)."""
        return self.link.name == "logit"

    def variance(self, mu):
        return mu * (1.0 - mu)

    def mu_loglik(self, y, mu, wt, order):
        mu = np.clip(mu, 1e-300, 1.0 - 1e-16)
        out = [wt * (special.xlogy(y, mu) + special.xlog1py(1.0 - y, -mu))]
        if order >= 1:
            out.append(wt * (y / mu - (1.0 - y) / (1.0 - mu)))
        if order >= 2:
            out.append(-wt * (y / mu**2 + (1.0 - y) / (1.0 - mu) ** 2))
        if order >= 3:
            out.append(wt * (2.0 * y / mu**3 - 2.0 * (1.0 - y) / (1.0 - mu) ** 3))
        return tuple(out)

    def derivs(self, y, eta, wt, order=2):
        name = self.link.name
        if name == "logit":
            # one exp and one log: e = exp(−|η|), log(1 + e^η) = max(η, 0) + log(1 + e)
            e = np.exp(-np.abs(eta))
            op = 1.0 + e
            out = [wt * (y * eta - np.maximum(eta, 0.0) - np.log(op))]
            if order >= 1:
                mu = np.where(eta >= 0, 1.0, e) / op
                out.append(wt * (y - mu))
                if order >= 2:
                    v = wt * e / (op * op)  # μ(1 − μ)
                    out.append(-v)
                    if order >= 3:
                        out.append(-v * (1.0 - 2.0 * mu))
            return tuple(out)
        if name == "probit":
            return _probit_derivs(y, eta, wt, order)
        if name == "cloglog":
            return _cloglog_derivs(y, eta, wt, order)
        return super().derivs(y, eta, wt, order)  # pragma: no cover - custom Link objects

    def _trials(self, model: Any) -> tuple[np.ndarray, np.ndarray]:
        """(number of trials, multiplicity) per observation, as R's binomial()$aic sees them."""
        prior = np.asarray(model.prior_weights, dtype=float)
        if str(model.parsed.response).startswith("cbind("):
            return np.asarray(model.weights, dtype=float) / prior, prior
        return np.asarray(model.weights, dtype=float), np.ones_like(prior)

    def constant(self, model):
        n, mult = self._trials(model)
        s = np.round(np.asarray(model.y, dtype=float) * n)
        n = np.round(n)
        return mult * (special.gammaln(n + 1.0) - special.gammaln(s + 1.0) - special.gammaln(n - s + 1.0))

    def saturated_kernel(self, y, wt):
        return wt * (special.xlogy(y, y) + special.xlogy(1.0 - y, 1.0 - y))

    def simulate(self, mu, model, rng):
        """Draws on the scale of the response: successes for ``cbind`` models, proportions with weights, else 0/1."""
        n, mult = self._trials(model)
        counts = rng.binomial(np.round(n).astype(np.int64), np.clip(mu, 0.0, 1.0))
        if str(model.parsed.response).startswith("cbind("):
            return counts.astype(float)
        return counts / n

    def validate_response(self, y, wt):
        if np.any((y < 0) | (y > 1)):
            raise DataError(f"binomial response must lie in [0, 1]; found {y[(y < 0) | (y > 1)][:5].tolist()}")


class Poisson(Family):
    """Poisson(link="log")

    Poisson counts with the log link; ``offset`` terms carry exposures
    (``offset(log(size))``).

    Examples
    --------
    >>> fam = Poisson()
    >>> [round(float(v[0]), 6) for v in fam.derivs(np.array([2.0]), np.array([0.0]), np.array([1.0]), order=2)]
    [-1.0, 1.0, -1.0]
    """

    name = "poisson"
    links = ("log",)

    @property
    def canonical(self) -> bool:
        """Whether the link is the family's canonical link (observed = expected information)."""
        return self.link.name == "log"

    def variance(self, mu):
        return mu

    def mu_loglik(self, y, mu, wt, order):  # pragma: no cover - only reached by custom links
        mu = np.maximum(mu, 1e-300)
        out = [wt * (special.xlogy(y, mu) - mu)]
        if order >= 1:
            out.append(wt * (y / mu - 1.0))
        if order >= 2:
            out.append(-wt * y / mu**2)
        if order >= 3:
            out.append(2.0 * wt * y / mu**3)
        return tuple(out)

    def derivs(self, y, eta, wt, order=2):
        if self.link.name != "log":  # pragma: no cover - custom Link objects
            return super().derivs(y, eta, wt, order)
        mu = np.exp(eta)
        wmu = wt * mu
        out = [wt * y * eta - wmu]
        if order >= 1:
            out.append(wt * y - wmu)
        if order >= 2:
            out.append(-wmu)
        if order >= 3:
            out.append(-wmu)
        return tuple(out)

    def constant(self, model):
        return -np.asarray(model.weights, dtype=float) * special.gammaln(np.asarray(model.y, dtype=float) + 1.0)

    def saturated_kernel(self, y, wt):
        return wt * (special.xlogy(y, y) - y)

    def simulate(self, mu, model, rng):
        return rng.poisson(mu).astype(float)

    def validate_response(self, y, wt):
        if np.any(y < 0):
            raise DataError(f"Poisson response must be non-negative counts; found {y[y < 0][:5].tolist()}")


# ---------------------------------------------------------------------------------------------
# closed forms for the non-canonical binomial links
# ---------------------------------------------------------------------------------------------
def _probit_parts(eta: np.ndarray, order: int):
    """log Φ(η) and its derivatives, through the inverse Mills ratio r = φ/Φ."""
    A = special.log_ndtr(eta)
    out = [A]
    if order >= 1:
        r = np.exp(-0.5 * eta * eta - 0.5 * np.log(2.0 * np.pi) - A)
        out.append(r)
        if order >= 2:
            s = eta + r
            out.append(-r * s)
            if order >= 3:
                out.append(r * (s * s + r * s - 1.0))
    return out


def _probit_derivs(y, eta, wt, order):
    P = _probit_parts(eta, order)
    N = _probit_parts(-eta, order)
    yc = 1.0 - y
    out = [wt * (_xmul(y, P[0]) + _xmul(yc, N[0]))]
    sign = -1.0
    for j in range(1, order + 1):
        out.append(wt * (y * P[j] + sign * yc * N[j]))
        sign = -sign
    return tuple(out)


def _cloglog_derivs(y, eta, wt, order):
    t = np.exp(np.minimum(eta, 700.0))
    with np.errstate(over="ignore"):
        em1 = np.expm1(t)
    with np.errstate(divide="ignore"):
        A = np.log(-np.expm1(-t))  # log μ
    A = np.where(eta < -30.0, eta - 0.5 * t, A)  # log(1 − e^{−t}) = η − t/2 + O(t²) for tiny t
    out = [wt * (_xmul(y, A) - (1.0 - y) * t)]
    if order >= 1:
        s = np.where(t < 1e-300, 1.0, t / np.where(t < 1e-300, 1.0, em1))
        out.append(wt * (y * s - (1.0 - y) * t))
        if order >= 2:
            a = 1.0 - t - s
            A2 = s * a
            out.append(wt * (y * A2 - (1.0 - y) * t))
            if order >= 3:
                A3 = s * a * a - s * t - s * A2
                out.append(wt * (y * A3 - (1.0 - y) * t))
    return tuple(out)


def _xmul(y: np.ndarray, v: np.ndarray) -> np.ndarray:
    """y·v with 0·(−∞) = 0."""
    return np.where(y == 0, 0.0, y * v)


# ---------------------------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------------------------
_FAMILIES: dict[str, type[Family]] = {"binomial": Binomial, "poisson": Poisson}


def get_family(family: Any = "binomial", link: str | Link | None = None) -> Family:
    """get_family(family="binomial", link=None) -> Family

    A :class:`Family` from a name (``"binomial"``, ``"poisson"``), a family object
    (returned as is, or re-linked when ``link`` is given) or an R-style call
    string such as ``"binomial(link='probit')"``.

    Raises
    ------
    FamilyError
        Unknown family or link; ``"gaussian"`` (use :func:`stochmm.lmer`).

    Examples
    --------
    >>> get_family("poisson")
    Poisson(link='log')
    >>> get_family("binomial(link = \\"cloglog\\")").link.name
    'cloglog'
    """
    if isinstance(family, Family):
        if link is None:
            return family
        return type(family)(link)
    if not isinstance(family, str):
        needed = ("derivs", "constant", "linkinv", "variance")
        if all(hasattr(family, a) for a in needed) and isinstance(getattr(family, "name", None), str):
            return family  # duck-typed family object
        raise FamilyError(f"family must be a name or a Family object, got {family!r}")
    text = family.strip()
    if "(" in text and text.endswith(")"):
        name, arg = text[: text.index("(")].strip(), text[text.index("(") + 1 : -1].strip()
        if arg:
            arg = arg.split("=", 1)[1] if "=" in arg else arg
            arg = arg.strip().strip("'\"")
            if link is not None and link != arg:
                raise FamilyError(f"link given twice: {family!r} and link={link!r}")
            link = arg
        text = name
    key = text.lower()
    if key in ("gaussian", "normal"):
        raise FamilyError("family 'gaussian' is a linear mixed model: use stochmm.lmer (or Model(...).fit(method='REML'))")
    if key not in _FAMILIES:
        raise FamilyError(f"unsupported family {text!r}; supported: {', '.join(_FAMILIES)}")
    return _FAMILIES[key](link)


def binomial(link: str = "logit") -> Binomial:
    """binomial(link="logit") -> Binomial — R-style constructor.

    Examples
    --------
    >>> binomial("probit")
    Binomial(link='probit')
    """
    return Binomial(link)


def poisson(link: str = "log") -> Poisson:
    """poisson(link="log") -> Poisson — R-style constructor.

    Examples
    --------
    >>> poisson().label
    'poisson  ( log )'
    """
    return Poisson(link)
