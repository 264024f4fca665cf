"""Adaptive Gauss–Hermite quadrature (AGQ) for GLMMs with one grouping factor.

With a single grouping factor the marginal likelihood factorises over its levels,

    L(θ, β) = Π_l ∫ exp(h_l(u)) (2π)^{-k/2} du,
    h_l(u)  = Σ_{i ∈ l} ℓ_i(η_i(u)) − ½‖u‖²,

and each k-dimensional integral is approximated around the level's conditional
mode ũ_l with the Cholesky factor of the level's Hessian H_l = L_l L_l'
(R_l = L_l^{-T}, so R_l R_l' = H_l^{-1}):

    ∫ … ≈ |R_l| Σ_k w_k exp(h_l(ũ_l + R_l z_k) + ½‖z_k‖²),

where (z_k, w_k) is a rule for the standard normal weight (Σ w_k = 1). For k = 1
this is lme4's nAGQ rule (conditional mode, conditional SD); one node is the
Laplace approximation. Beyond lme4, k > 1 (a vector-valued term such as
``(1 + x | g)``, or several terms of the same factor) uses a tensor-product rule
(``nagq`` points per dimension, ``nagq**k`` nodes) or a Smolyak sparse grid of GH
rules (``rule="sparse"``), with a guard on the number of nodes. The value includes
every normalising constant (binomial coefficients, log y!), so it is on the same
scale as the Laplace value; lme4 reports nAGQ > 1 deviances *without* the
saturated log-likelihood (lme4 issue #161), which :meth:`Family.saturated_loglik`
restores.

The exact gradient in (θ, β) — through ũ(θ, β) and R(θ, β), including the
third derivative of ℓ in dH/dφ — is computed alongside the value.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import product
from math import comb

import numpy as np

from ..errors import DesignError

__all__ = ["gh_rule", "tensor_rule", "sparse_rule", "QuadratureRule", "make_rule", "agq", "QuadratureError", "MAX_NAGQ"]


class QuadratureError(DesignError):
    """QuadratureError(message) — adaptive quadrature is not possible for this model, or the rule is too large.

    Examples
    --------
    >>> try:
    ...     make_rule(25, 3)
    ... except QuadratureError as err:
    ...     print(str(err)[:62])
    a tensor-product rule with nagq=25 in 3 dimensions has 15625 n
    """


@lru_cache(maxsize=64)
def gh_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """gh_rule(n) -> (nodes, weights)

    n-point Gauss–Hermite rule for the standard normal density:
    Σ w_k f(z_k) ≈ E f(Z), Z ~ N(0, 1); exact for polynomials of degree 2n − 1.

    Examples
    --------
    >>> z, w = gh_rule(3)
    >>> np.round(z, 6).tolist(), round(float(w @ z**2), 12)
    ([-1.732051, 0.0, 1.732051], 1.0)
    """
    if n < 1:
        raise ValueError(f"a Gauss–Hermite rule needs at least one node, got {n}")
    if n == 1:
        return np.zeros(1), np.ones(1)
    z, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    z = 0.5 * (z - z[::-1])  # exact symmetry
    w = 0.5 * (w + w[::-1])
    if n % 2:
        z[n // 2] = 0.0
    return z, w


class QuadratureRule:
    """QuadratureRule(nodes, weights, kind, nagq) — a rule on R^k for the standard normal weight.

    ``nodes`` is K × k, ``weights`` has K entries summing to 1, ``kind`` is
    ``"tensor"`` or ``"sparse"``.

    Examples
    --------
    >>> tensor_rule(3, 2)
    QuadratureRule(tensor, nagq=3, dim=2, nodes=9)
    """

    def __init__(self, nodes: np.ndarray, weights: np.ndarray, kind: str, nagq: int) -> None:
        self.nodes = np.asarray(nodes, dtype=float)
        self.weights = np.asarray(weights, dtype=float)
        self.kind = kind
        self.nagq = nagq

    @property
    def size(self) -> int:
        return self.weights.size

    @property
    def dim(self) -> int:
        return self.nodes.shape[1]

    def __repr__(self) -> str:
        return f"QuadratureRule({self.kind}, nagq={self.nagq}, dim={self.dim}, nodes={self.size})"


def tensor_rule(n: int, d: int) -> QuadratureRule:
    """tensor_rule(n, d) -> QuadratureRule — the n^d-node product of n-point GH rules.

    Examples
    --------
    >>> r = tensor_rule(3, 2)
    >>> r.size, round(float(r.weights @ (r.nodes[:, 0] ** 2 * r.nodes[:, 1] ** 2)), 12)
    (9, 1.0)
    """
    z, w = gh_rule(n)
    if d == 1:
        return QuadratureRule(z[:, None], w, "tensor", n)
    grids = np.meshgrid(*([z] * d), indexing="ij")
    nodes = np.column_stack([g.ravel() for g in grids])
    wg = np.meshgrid(*([w] * d), indexing="ij")
    weights = np.prod(np.column_stack([g.ravel() for g in wg]), axis=1)
    return QuadratureRule(nodes, weights, "tensor", n)


def sparse_rule(level: int, d: int) -> QuadratureRule:
    """sparse_rule(level, d) -> QuadratureRule

    Smolyak sparse grid of GH rules (the 1-D rule of level i has i points):
    exact for polynomials of total degree 2·level − 1. The GH rules are not nested, so
    the grid only has fewer nodes than the tensor product from d = 4 on (level 5:
    385 vs 625 nodes in 4-D, 781 vs 3125 in 5-D). Some weights are negative.

    Examples
    --------
    >>> r = sparse_rule(5, 4)
    >>> r.size, tensor_rule(5, 4).size, round(float(r.weights @ (r.nodes[:, 0] ** 4)), 10)
    (385, 625, 3.0)
    """
    if d == 1:
        r = tensor_rule(level, 1)
        return QuadratureRule(r.nodes, r.weights, "sparse", level)
    acc: dict[tuple, float] = {}
    q = level + d - 1
    for idx in product(range(1, level + 1), repeat=d):
        s = sum(idx)
        if s < level or s > q:
            continue
        coef = (-1) ** (q - s) * comb(d - 1, q - s)
        rules = [gh_rule(i) for i in idx]
        for combo in product(*[range(i) for i in idx]):
            node = tuple(round(float(rules[j][0][c]), 12) for j, c in enumerate(combo))
            wt = coef * float(np.prod([rules[j][1][c] for j, c in enumerate(combo)]))
            acc[node] = acc.get(node, 0.0) + wt
    keys = [k for k, v in acc.items() if abs(v) > 1e-15]
    nodes = np.array(keys, dtype=float)
    weights = np.array([acc[k] for k in keys])
    return QuadratureRule(nodes, weights, "sparse", level)


#: the most nodes per dimension (lme4's ceiling on nAGQ); 25 Gauss–Hermite nodes integrate polynomials of
#: degree 49 exactly, and numpy's Hermite recurrences overflow for rules of a few hundred nodes
MAX_NAGQ = 25


def make_rule(nagq: int, dim: int, rule: str = "tensor", max_nodes: int = 10_000) -> QuadratureRule:
    """make_rule(nagq, dim, rule="tensor", max_nodes=10000) -> QuadratureRule

    The quadrature rule for ``dim`` random effects per level, refusing rules with
    more than ``max_nodes`` nodes per level.

    Raises
    ------
    QuadratureError
        Too many nodes (the message gives the count and the alternatives).

    Examples
    --------
    >>> make_rule(7, 2).size, make_rule(5, 4, rule="sparse").size
    (49, 385)
    """
    if rule not in ("tensor", "sparse"):
        raise ValueError(f"rule must be 'tensor' or 'sparse', not {rule!r}")
    if int(nagq) != nagq or nagq < 1:
        raise ValueError(f"nagq must be a positive integer, got {nagq!r}")
    nagq = int(nagq)
    if nagq > MAX_NAGQ:
        raise QuadratureError(f"nagq={nagq} is above the ceiling of {MAX_NAGQ} nodes per dimension (lme4's too)")
    if rule == "tensor":
        size = nagq**dim
        if size > max_nodes:
            raise QuadratureError(
                f"a tensor-product rule with nagq={nagq} in {dim} dimensions has {size} nodes per level, "
                f"more than max_nodes={max_nodes}; lower nagq, use rule='sparse', or raise max_nodes"
            )
        return tensor_rule(nagq, dim)
    r = sparse_rule(nagq, dim)
    if r.size > max_nodes:
        raise QuadratureError(
            f"a sparse-grid rule of level {nagq} in {dim} dimensions has {r.size} nodes per level, "
            f"more than max_nodes={max_nodes}; lower nagq or raise max_nodes"
        )
    return r


def agq(engine, theta: np.ndarray, beta: np.ndarray, rule: QuadratureRule, grad: bool = False,
        max_chunk: int = 20_000_000) -> tuple[float, np.ndarray | None]:
    """agq(engine, theta, beta, rule, grad=False) -> (value, gradient or None)

    Adaptive Gauss–Hermite approximation of −2 log L(θ, β) (constants included) for
    a :class:`~stochmm.deterministic.pirls.LevelEngine`, and its exact gradient in (θ, β).

    Examples
    --------
    >>> import stochmm as sm
    >>> from stochmm.builder.families import get_family
    >>> from stochmm.deterministic.pirls import LevelEngine
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> eng = LevelEngine(m, get_family("binomial"))
    >>> round(agq(eng, np.array([1.0]), np.array([-1.0, -1.0, -1.0, -1.0]), tensor_rule(25, 1))[0], 6)
    191.73226
    """
    eng = engine
    eng.n_eval += 1
    st = eng.pirls(theta, beta)
    if eng.k == 1 and rule.weights.min() > 0 and eng.n * rule.size <= max_chunk:
        return _agq_scalar(eng, st, rule, grad)
    fam, y, wt, refs = eng.family, eng.y, eng.wt, eng.refs
    k, nlev = eng.k, eng.nlev
    A, u, Lc = st.extra["A"], st.u, st.extra["L"]
    if eng.hessian != "observed":  # quadrature is always scaled by the observed Hessian
        Lc = np.linalg.cholesky(st.extra["Hobs"])
    Zk, wk = rule.nodes, rule.weights
    K = wk.size
    if k == 1:
        R = (1.0 / Lc[:, 0, 0])[:, None, None]
    else:
        R = np.transpose(np.linalg.inv(Lc), (0, 2, 1))  # L^{-T}
    AR = np.einsum("ia,iab->ib", A, R[refs])  # n × k
    logdetL = np.log(np.diagonal(Lc, axis1=1, axis2=2)).sum(1)  # ½ log det H per level
    sign = np.sign(wk)
    logw = np.log(np.abs(wk)) + 0.5 * np.einsum("kj,kj->k", Zk, Zk)
    # node chunks bounded in memory (n × chunk × k doubles)
    n = eng.n
    chunk = max(1, min(K, int(max_chunk // max(1, n * (k + 2)))))
    a = np.empty((nlev, K))
    RZ = np.einsum("lab,kb->lka", R, Zk)  # nlev × K × k : R_l z_k
    Ulk = u[:, None, :] + RZ
    for c0 in range(0, K, chunk):
        c1 = min(K, c0 + chunk)
        eta = st.eta[:, None] + AR @ Zk[c0:c1].T
        ll = fam.derivs(y[:, None], eta, wt[:, None], 0)[0]
        a[:, c0:c1] = eng.ls(ll) - 0.5 * np.einsum("lkj,lkj->lk", Ulk[:, c0:c1], Ulk[:, c0:c1]) + logw[c0:c1]
    M = a.max(axis=1)
    E = sign[None, :] * np.exp(a - M[:, None])
    S = E.sum(axis=1)
    if np.any(S <= 0):
        raise QuadratureError("the sparse-grid rule gave a non-positive integral at some level; use rule='tensor'")
    lse = M + np.log(S)
    val = float(-2.0 * np.sum(lse - logdetL) - 2.0 * eng.const)
    if not grad:
        return val, None
    eng.n_grad += 1
    return val, _agq_gradient(eng, st, R, Lc, Zk, E / S[:, None], AR, Ulk, chunk)


def _agq_gradient(eng, st, R, Lc, Zk, pi, AR, Ulk, chunk):
    fam, y, wt, refs, X, Z = eng.family, eng.y, eng.wt, eng.refs, eng.X, eng.Z
    k, nt = eng.k, eng.ntheta
    ls = eng.ls
    A, u, T = st.extra["A"], st.u, st.extra["T"]
    tr, tc = eng._tr, eng._tc
    K = Zk.shape[0]
    # -- node sums: d̄1_i = Σ_k π d1_ik, q_i = Σ_k π d1_ik z_k, m1, m2 ------------------------------
    d1bar = np.zeros(eng.n)
    qv = np.zeros((eng.n, k))
    G = np.zeros((eng.nlev, K, k))
    pir = pi[refs]
    for c0 in range(0, K, chunk):
        c1 = min(K, c0 + chunk)
        eta = st.eta[:, None] + AR @ Zk[c0:c1].T
        d1 = fam.derivs(y[:, None], eta, wt[:, None], 1)[1]
        pd = pir[:, c0:c1] * d1
        d1bar += pd.sum(1)
        qv += pd @ Zk[c0:c1]
        G[:, c0:c1, :] = ls(d1[:, :, None] * A[:, None, :])
    grad_h = G - Ulk  # ∇h at the nodes
    m1 = np.einsum("lk,lka->la", pi, grad_h)
    m2 = np.einsum("lk,lka,kb->lab", pi, grad_h, Zk)
    # -- derivatives of the mode and of H ------------------------------------------------------
    d = fam.derivs(y, st.eta, wt, 3)
    d1u, w, wp = d[1], -d[2], -d[3]
    zeta = Z[:, tr] * u[refs][:, tc]  # ∂η/∂θ_j at fixed u, n × nθ
    c_beta = -ls((w[:, None, None] * A[:, :, None]) * X[:, None, :])  # nlev × k × p
    c_theta = np.zeros((eng.nlev, k, nt))
    zd = ls(Z[:, tr] * d1u[:, None])  # nlev × nθ
    c_theta[:, tc, np.arange(nt)] += zd
    c_theta -= ls((w[:, None, None] * A[:, :, None]) * zeta[:, None, :])
    cphi = np.concatenate([c_theta, c_beta], axis=2)  # nlev × k × nφ
    Hinv = np.linalg.inv(st.extra["Hobs"])
    du = np.einsum("lab,lbf->laf", Hinv, cphi)
    deta = np.concatenate([zeta, X], axis=1) + np.einsum("ia,iaf->if", A, du[refs])  # total dη/dφ
    AA = A[:, :, None] * A[:, None, :]
    dH = ls((wp[:, None] * deta)[:, :, None, None] * AA[:, None, :, :])  # nlev × nφ × k × k
    Mz = ls(w[:, None, None] * Z[:, :, None] * Z[:, None, :])  # Σ w z z'
    for j in range(nt):
        E = np.zeros((k, k))
        E[tr[j], tc[j]] = 1.0
        P = np.einsum("ba,lbc,cd->lad", E, Mz, T)
        dH[:, j] += P + np.transpose(P, (0, 2, 1))
    HinvL = np.linalg.inv(np.einsum("lab,lcb->lac", Lc, Lc))  # inverse of the scaling Hessian
    trace = np.einsum("lab,lfba->f", HinvL, dH)
    Linv = np.transpose(R, (0, 2, 1))  # L^{-1}
    Phi = np.einsum("lab,lfbc,ldc->lfad", Linv, dH, Linv)
    Phi = np.tril(Phi)
    Phi[..., np.arange(k), np.arange(k)] *= 0.5
    dR = -np.einsum("lab,lfcb->lfac", R, Phi)  # −R Φ'
    corr = np.einsum("la,laf->f", m1, du) + np.einsum("lab,lfab->f", m2, dR)
    Rq = np.einsum("iab,ib->ia", R[refs], qv)
    g_theta = (Z[:, tr] * (d1bar[:, None] * u[refs][:, tc] + Rq[:, tc])).sum(0)
    g_beta = X.T @ d1bar
    return trace - 2.0 * np.concatenate([g_theta, g_beta]) - 2.0 * corr


def _agq_scalar(eng, st, rule: QuadratureRule, grad: bool):
    """lme4's case — one scalar random effect per level — without the k × k machinery."""
    fam, y, wt, refs, X, ls = eng.family, eng.y, eng.wt, eng.refs, eng.X, eng.ls
    z = eng.Z[:, 0]
    a = st.extra["A"][:, 0]
    u = st.u[:, 0]
    H = st.extra["Hobs"][:, 0, 0]
    hinv = 1.0 / H
    R = np.sqrt(hinv)
    zk = rule.nodes[:, 0]
    Rr = R[refs]
    eta = st.eta[:, None] + np.multiply.outer(a * Rr, zk)
    U = u[:, None] + np.multiply.outer(R, zk)
    d = fam.derivs(y[:, None], eta, wt[:, None], 1 if grad else 0)
    A_ = ls(d[0]) - 0.5 * U * U + (np.log(rule.weights) + 0.5 * zk * zk)
    M = A_.max(axis=1)
    E = np.exp(A_ - M[:, None])
    S = E.sum(axis=1)
    val = float(-2.0 * (M.sum() + np.log(S).sum() + 0.5 * np.log(hinv).sum()) - 2.0 * eng.const)
    if not grad:
        return val, None
    eng.n_grad += 1
    d1k = d[1]
    pi = E / S[:, None]
    pd = pi[refs] * d1k
    d1bar = pd.sum(1)
    qv = pd @ zk
    pgh = pi * (ls(a[:, None] * d1k) - U)  # π × ∇h at the nodes
    m1 = pgh.sum(1)
    m2 = pgh @ zk
    w, wp = st.w, -fam.derivs(y, st.eta, wt, 3)[3]
    theta = st.extra["T"][0, 0]
    ur = u[refs]
    zeta = z * ur
    wa = w * a
    # dũ/dφ (θ, then β) and the total dη/dφ; tangent kept for the next warm start
    du = np.column_stack([ls(z * st.d1 - wa * zeta), -ls(wa[:, None] * X)]) * hinv[:, None]
    eng._tangent = (np.concatenate([st.extra["theta"], st.beta]), u.copy(), du)
    deta = np.column_stack([zeta, X]) + a[:, None] * du[refs]
    dH = ls((wp * a * a)[:, None] * deta)
    dH[:, 0] += 2.0 * theta * ls(w * z * z)
    trace = hinv @ dH
    corr = m1 @ du - 0.5 * (m2 * R * hinv) @ dH  # dR = −½ R dH / H
    g_h = np.concatenate([[np.sum(z * (d1bar * ur + Rr * qv))], X.T @ d1bar])
    return val, trace - 2.0 * g_h - 2.0 * corr
