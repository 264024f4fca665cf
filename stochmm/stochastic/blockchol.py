"""The penalised random-effects system M = I + Λ'Z'WZΛ in JAX, factored blockwise (never n × n).

M is the q × q precision of the spherical random effects u (b = Λu) given y in a Gaussian model, and the
Hessian of the penalised log-likelihood in u for a GLMM. Its structure is that of
:class:`stochmm.deterministic.blocks.BlockedSystem`:

* block 0 — every term on the first grouping factor (the one with most levels), merged into one
  k0 × k0 block per level — is **block diagonal** and factored level by level, vectorised;
* the block below it is **sparse**: one k_j × k0 block per pair (level of a later term, level of the
  first factor) that shares observations, kept as a list of pairs (COO);
* the rest (later terms, q_rest columns) is one **dense** block that absorbs the Schur-complement
  downdate Σ_l S_l M00_l⁻¹ S_l'; the downdate is either a scatter-add over the pairs of pairs that
  share a first-factor level (Σ_l deg_l² products, for sparse crossings such as InstEval's: 2.5 M) or,
  when that is cheaper (VerbAgg, Penicillin: every level meets every other), one dense product
  S̃S̃' (q_rest² q0 flops by BLAS); then one dense Cholesky of size q_rest.

With one grouping factor q_rest = 0 and everything is per-level k0 × k0 algebra, O(q k0²).

:class:`Layout` holds the static index maps (NumPy, built once per model); the functions below are
pure JAX (jit-able, differentiable, vmappable). Internal order of u: block 0 level-major
(``l * k0 + c``), then each later term level-major; :attr:`Layout.to_model` maps it to ``model.Z``'s
column order.

Examples
--------
>>> import stochmm as sm
>>> m = sm.Model("diameter ~ 1 + (1 | plate) + (1 | sample)", sm.datasets.load("penicillin"))
>>> lay = Layout(m)
>>> lay.k0, lay.nlev0, lay.q_rest, [p.size for p in lay.pair_l]
(1, 24, 6, [144])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from ._jax import configure

configure()  # float64, persistent compilation cache

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from jax.scipy.linalg import block_diag, solve_triangular  # noqa: E402

__all__ = ["Layout", "Factor", "factor", "forward", "backward", "raw_crossprods", "scale_crossprods",
           "weighted_crossprods", "apply_lambda", "chol_small", "tril_inv_small", "MAX_DENSE"]

MAX_DENSE = 4000
"""Largest dense block (q_rest, the random effects of all terms after the first factor). Its Cholesky
costs q_rest³/3 flops and q_rest² doubles: 1,156 for InstEval (≈ 0.5 GFlop, 11 MB); 4,000 is
≈ 21 GFlop and 128 MB per factorisation, seconds per gradient on a laptop core."""


class Layout:
    """Layout(model)

    Static index maps of the blocked system of ``model``'s random effects: which terms form block 0,
    the per-observation level indices and model-matrix columns, the (later-term level, first-factor
    level) pairs, the pairs of pairs sharing a first-factor level, and the map to ``model.Z``'s order.
    """

    def __init__(self, model: Any) -> None:
        terms = model.terms
        t0 = terms[0]
        r0 = np.asarray(t0.refs)
        self.block0 = [i for i, t in enumerate(terms)
                       if t.group == t0.group and t.nlev == t0.nlev and np.array_equal(np.asarray(t.refs), r0)]
        self.rest = [i for i in range(len(terms)) if i not in self.block0]
        self.n = model.n
        self.nterms = len(terms)
        self.ks = [t.k for t in terms]
        self.k0 = int(sum(terms[i].k for i in self.block0))
        self.nlev0 = t0.nlev
        self.q0 = self.nlev0 * self.k0
        self.refs0 = r0.astype(np.int32)
        self.Z0 = np.ascontiguousarray(np.column_stack([terms[i].z for i in self.block0]))
        self.rest_k = [terms[i].k for i in self.rest]
        self.rest_nlev = [terms[i].nlev for i in self.rest]
        self.rest_refs = [np.asarray(terms[i].refs).astype(np.int32) for i in self.rest]
        self.rest_z = [np.ascontiguousarray(terms[i].z) for i in self.rest]
        qs = [k * nl for k, nl in zip(self.rest_k, self.rest_nlev)]
        self.rest_off = [int(v) for v in np.cumsum([0] + qs)[:-1]]
        self.q_rest = int(sum(qs))
        self.q = self.q0 + self.q_rest
        if self.q_rest > MAX_DENSE:
            from ..errors import DesignError

            raise DesignError(
                f"the random effects after the first grouping factor number {self.q_rest} (terms "
                f"{', '.join(terms[i].text or terms[i].group for i in self.rest)}); the dense block of the "
                f"blocked Cholesky is limited to {MAX_DENSE} (its factorisation would cost "
                f"{self.q_rest ** 3 / 3e9:.0f} GFlop and {self.q_rest ** 2 * 8 / 2**20:.0f} MB per evaluation)")
        # -- pairs (level m of rest term j, level l of the first factor) sharing observations
        self.pair_m, self.pair_l, self.obs_pair = [], [], []
        for refs in self.rest_refs:
            code = refs.astype(np.int64) * self.nlev0 + self.refs0
            uniq, inv = np.unique(code, return_inverse=True)
            self.pair_m.append((uniq // self.nlev0).astype(np.int32))
            self.pair_l.append((uniq % self.nlev0).astype(np.int32))
            self.obs_pair.append(inv.astype(np.int32))
        # -- pairs of pairs sharing a first-factor level, for every ordered pair of rest terms
        self.pp = []
        for j, kj in enumerate(self.rest_k):
            for j2, kj2 in enumerate(self.rest_k):
                P1, P2 = _pair_pairs(self.pair_l[j], self.pair_l[j2], self.nlev0)
                rows = (self.rest_off[j] + self.pair_m[j][P1].astype(np.int64)[:, None, None] * kj
                        + np.arange(kj)[None, :, None] + np.zeros((1, 1, kj2), dtype=np.int64))
                cols = (self.rest_off[j2] + self.pair_m[j2][P2].astype(np.int64)[:, None, None] * kj2
                        + np.arange(kj2)[None, None, :] + np.zeros((1, kj, 1), dtype=np.int64))
                self.pp.append((j, j2, P1.astype(np.int32), P2.astype(np.int32),
                                rows.astype(np.int32), cols.astype(np.int32)))
        # -- the downdate Σ_l S̃_l S̃_l' as one dense product when that is cheaper than the scatter over the
        #    pairs of pairs (BLAS flops are ~10x cheaper than scattered ones); memory bound 2e7 entries
        npp = sum(P1.size * self.rest_k[j] * self.rest_k[j2] for j, j2, P1, *_ in self.pp) * self.k0
        self.dense_S = bool(self.q_rest and self.q_rest * self.q0 <= 2e7
                            and self.q_rest**2 * self.q0 <= 10 * max(npp, 1))
        self.S_rows, self.S_cols = [], []
        for j, kj in enumerate(self.rest_k):
            r = self.rest_off[j] + self.pair_m[j].astype(np.int64)[:, None, None] * kj + np.arange(kj)[None, :, None]
            c = self.pair_l[j].astype(np.int64)[:, None, None] * self.k0 + np.arange(self.k0)[None, None, :]
            r, c = np.broadcast_arrays(r, c)
            self.S_rows.append(r.astype(np.int32))
            self.S_cols.append(c.astype(np.int32))
        # -- internal order -> model.Z column order
        to_model = np.empty(self.q, dtype=np.int64)
        coloff = np.cumsum([0] + [terms[i].k for i in self.block0])
        for a, i in enumerate(self.block0):
            t, s = terms[i], model.z_slices[i]
            lev, c = np.meshgrid(np.arange(t.nlev), np.arange(t.k), indexing="ij")
            to_model[(lev * self.k0 + coloff[a] + c).ravel()] = (s.start + lev * t.k + c).ravel()
        for j, i in enumerate(self.rest):
            s = model.z_slices[i]
            to_model[self.q0 + self.rest_off[j] + np.arange(s.stop - s.start)] = np.arange(s.start, s.stop)
        self.to_model = to_model
        self.from_model = np.argsort(to_model)

    # -- sparse Z in the internal column order (NumPy, for cross-products computed once)
    def Z_internal(self) -> sp.csc_matrix:
        n, k0 = self.Z0.shape
        rows = np.repeat(np.arange(n), k0)
        cols = (self.refs0[:, None].astype(np.int64) * k0 + np.arange(k0)).ravel()
        blocks = [sp.csc_matrix((self.Z0.ravel(), (rows, cols)), shape=(n, self.q0))]
        for refs, z, kj, nl in zip(self.rest_refs, self.rest_z, self.rest_k, self.rest_nlev):
            r = np.repeat(np.arange(n), kj)
            c = (refs[:, None].astype(np.int64) * kj + np.arange(kj)).ravel()
            blocks.append(sp.csc_matrix((z.ravel(), (r, c)), shape=(n, nl * kj)))
        return sp.hstack(blocks, format="csc")

    def lambdas(self, L_list):
        """(Λ0, [L_j for later terms]): the block-0 factor is the block diagonal of its terms' factors."""
        Ls = [jnp.tril(jnp.asarray(L, dtype=jnp.float64)) for L in L_list]
        L0 = Ls[self.block0[0]] if len(self.block0) == 1 else block_diag(*[Ls[i] for i in self.block0])
        return L0, [Ls[i] for i in self.rest]


def _pair_pairs(l1: np.ndarray, l2: np.ndarray, nlev0: int) -> tuple[np.ndarray, np.ndarray]:
    """All (p1, p2) with l1[p1] == l2[p2], vectorised (no loop over levels)."""
    o1 = np.argsort(l1, kind="stable")
    o2 = np.argsort(l2, kind="stable")
    c2 = np.bincount(l2, minlength=nlev0)
    s2 = np.concatenate([[0], np.cumsum(c2)[:-1]])
    rep = c2[l1[o1]]
    P1 = np.repeat(o1, rep)
    within = np.arange(int(rep.sum())) - np.repeat(np.cumsum(rep) - rep, rep)
    P2 = o2[np.repeat(s2[l1[o1]], rep) + within]
    return P1, P2


# ---------------------------------------------------------------------------------------------
# cross-products C = Λ'Z'WZΛ in blocks: (C00 per level, C_j0 per pair, C_rr dense)
# ---------------------------------------------------------------------------------------------
class RawCross(NamedTuple):
    A00: np.ndarray  # (nlev0, k0, k0)
    Apair: list  # [(npairs_j, k_j, k0)]
    Arr: np.ndarray  # (q_rest, q_rest)


def raw_crossprods(lay: Layout, w: np.ndarray) -> RawCross:
    """raw_crossprods(lay, w) -> RawCross — blocks of Z'WZ for fixed weights (NumPy, once)."""
    A00 = np.zeros((lay.nlev0, lay.k0, lay.k0))
    np.add.at(A00, lay.refs0, w[:, None, None] * lay.Z0[:, :, None] * lay.Z0[:, None, :])
    Apair = []
    for j, z in enumerate(lay.rest_z):
        A = np.zeros((lay.pair_m[j].size, z.shape[1], lay.k0))
        np.add.at(A, lay.obs_pair[j], w[:, None, None] * z[:, :, None] * lay.Z0[:, None, :])
        Apair.append(A)
    if lay.q_rest:
        Zr = lay.Z_internal()[:, lay.q0:]
        Arr = np.asarray((Zr.T @ sp.diags(w) @ Zr).toarray())
    else:
        Arr = np.zeros((0, 0))
    return RawCross(A00, Apair, Arr)


def scale_crossprods(lay: Layout, raw: RawCross, L0, Lr: list, s: Any = 1.0):
    """Blocks of Λ'Z'WZΛ·s from the raw blocks of Z'WZ (no pass over the observations)."""
    C00 = jnp.einsum("ba,lbc,cd->lad", L0, raw.A00, L0) * s
    Cpair = [jnp.einsum("ba,pbc,cd->pad", Lj, A, L0) * s for Lj, A in zip(Lr, raw.Apair)]
    if not lay.q_rest:
        return C00, Cpair, jnp.zeros((0, 0))
    rows = []
    for j, (Lj, kj, nj) in enumerate(zip(Lr, lay.rest_k, lay.rest_nlev)):
        cols = []
        for j2, (Lj2, kj2, nj2) in enumerate(zip(Lr, lay.rest_k, lay.rest_nlev)):
            a0, a1 = lay.rest_off[j], lay.rest_off[j] + nj * kj
            b0, b1 = lay.rest_off[j2], lay.rest_off[j2] + nj2 * kj2
            A = jnp.asarray(raw.Arr[a0:a1, b0:b1]).reshape(nj, kj, nj2, kj2)
            if kj == 1 and kj2 == 1:
                blk = A.reshape(nj, nj2) * (Lj[0, 0] * Lj2[0, 0])
            else:
                blk = jnp.einsum("ca,mcnd,db->manb", Lj, A, Lj2).reshape(nj * kj, nj2 * kj2)
            cols.append(blk)
        rows.append(jnp.concatenate(cols, axis=1))
    return C00, Cpair, jnp.concatenate(rows, axis=0) * s


def weighted_crossprods(lay: Layout, w, zt0, ztr: list):
    """Blocks of Λ'Z'WZΛ from per-observation weights ``w`` and the transformed rows z̃ = Λ'z
    (``zt0`` n × k0 for block 0, ``ztr`` one n × k_j per later term): segment sums, O(n k²)."""
    C00 = jax.ops.segment_sum(w[:, None, None] * zt0[:, :, None] * zt0[:, None, :], lay.refs0,
                              num_segments=lay.nlev0)
    Cpair = [jax.ops.segment_sum(w[:, None, None] * z[:, :, None] * zt0[:, None, :], op, num_segments=pm.size)
             for z, op, pm in zip(ztr, lay.obs_pair, lay.pair_m)]
    Crr = jnp.zeros((lay.q_rest, lay.q_rest))
    for j, (z, refs, kj) in enumerate(zip(ztr, lay.rest_refs, lay.rest_k)):
        for j2, (z2, refs2, kj2) in enumerate(zip(ztr, lay.rest_refs, lay.rest_k)):
            r = lay.rest_off[j] + refs[:, None, None] * kj + np.arange(kj)[None, :, None]
            c = lay.rest_off[j2] + refs2[:, None, None] * kj2 + np.arange(kj2)[None, None, :]
            r, c = np.broadcast_arrays(r, c)
            Crr = Crr.at[r, c].add(w[:, None, None] * z[:, :, None] * z2[:, None, :], mode="promise_in_bounds")
    return C00, Cpair, Crr


# ---------------------------------------------------------------------------------------------
# factor and solves
# ---------------------------------------------------------------------------------------------
class Factor(NamedTuple):
    L00: Any  # (nlev0, k0, k0) Cholesky factors of the block-0 level blocks
    L00inv: Any  # their inverses
    St: list  # per later term: S̃_p = S_p L00_l^{-T} per pair, (npairs_j, k_j, k0)
    LD: Any  # dense Cholesky factor of the Schur complement (q_rest, q_rest)
    Sd: Any  # S̃ as a dense (q_rest, q0) matrix when ``Layout.dense_S``, else (0, 0)

    def logdet(self):
        """log det M."""
        d0 = jnp.sum(jnp.log(jnp.diagonal(self.L00, axis1=1, axis2=2)))
        dr = jnp.sum(jnp.log(jnp.diagonal(self.LD))) if self.LD.shape[0] else 0.0
        return 2.0 * (d0 + dr)


def factor(lay: Layout, C00, Cpair: list, Crr) -> Factor:
    """factor(lay, C00, Cpair, Crr) -> Factor of M = I + C (blocks as from the crossprods functions)."""
    k0 = lay.k0
    M00 = C00 + jnp.eye(k0)
    L00 = chol_small(M00)
    L00inv = tril_inv_small(L00)
    St = [_bmm_t(Cp, L00inv[pl]) for Cp, pl in zip(Cpair, lay.pair_l)]
    none = jnp.zeros((0, 0))
    if not lay.q_rest:
        return Factor(L00, L00inv, St, none, none)
    D = Crr + jnp.eye(lay.q_rest)
    if lay.dense_S:
        Sd = jnp.zeros((lay.q_rest, lay.q0))
        for Sj, r, c in zip(St, lay.S_rows, lay.S_cols):
            Sd = Sd.at[r, c].add(Sj, mode="promise_in_bounds")
        D = D - Sd @ Sd.T
    else:
        Sd = none
        for j, j2, P1, P2, rows, cols in lay.pp:
            D = D.at[rows, cols].add(-_bmm_t(St[j][P1], St[j2][P2]), mode="promise_in_bounds")
    LD = jnp.linalg.cholesky(D)
    return Factor(L00, L00inv, St, LD, Sd)


# many tiny k × k factorisations, unrolled over k and vectorised over the batch (XLA's batched LAPACK
# calls loop over the batch on CPU); k > 4 falls back to LAPACK
_SMALL = 4


def chol_small(H):
    """chol_small(H) -> L: lower Cholesky factors of a batch (..., k, k)."""
    k = H.shape[-1]
    if k > _SMALL:
        return jnp.linalg.cholesky(H)
    L = [[None] * k for _ in range(k)]
    for j in range(k):
        d = H[..., j, j] - sum((L[j][m] ** 2 for m in range(j)), jnp.zeros(H.shape[:-2]))
        L[j][j] = jnp.sqrt(d)
        for i in range(j + 1, k):
            L[i][j] = (H[..., i, j] - sum((L[i][m] * L[j][m] for m in range(j)), jnp.zeros(H.shape[:-2]))) / L[j][j]
    zero = jnp.zeros(H.shape[:-2])
    return jnp.stack([jnp.stack([L[i][j] if j <= i else zero for j in range(k)], axis=-1) for i in range(k)],
                     axis=-2)


def tril_inv_small(L):
    """tril_inv_small(L) -> L⁻¹ for a batch of lower-triangular (..., k, k)."""
    k = L.shape[-1]
    if k > _SMALL:
        return jax.lax.linalg.triangular_solve(L, jnp.broadcast_to(jnp.eye(k), L.shape), left_side=True, lower=True)
    inv = [[None] * k for _ in range(k)]
    zero = jnp.zeros(L.shape[:-2])
    for i in range(k):
        inv[i][i] = 1.0 / L[..., i, i]
        for j in range(i - 1, -1, -1):
            acc = sum((L[..., i, m] * inv[m][j] for m in range(j, i)), zero)
            inv[i][j] = -acc * inv[i][i]
    return jnp.stack([jnp.stack([inv[i][j] if j <= i else zero for j in range(k)], axis=-1) for i in range(k)],
                     axis=-2)


# batched products of many tiny matrices as broadcast-multiply-sum (XLA's batched dot is slow on CPU for
# millions of 1 × 1 or 2 × 2 blocks)
def _bmm_t(A, B):
    """(P, a, b), (P, c, b) -> (P, a, c): A_p B_p'."""
    return jnp.sum(A[:, :, None, :] * B[:, None, :, :], axis=-1)


def _bmv(A, v):
    """(P, a, b), (P, b) -> (P, a): A_p v_p."""
    return jnp.sum(A * v[:, None, :], axis=-1)


def _bmtv(A, v):
    """(P, a, b), (P, a) -> (P, b): A_p' v_p."""
    return jnp.sum(A * v[:, :, None], axis=1)


def _rest_rows(lay: Layout, j: int) -> np.ndarray:
    kj = lay.rest_k[j]
    return lay.rest_off[j] + lay.pair_m[j].astype(np.int64)[:, None] * kj + np.arange(kj)[None, :]


def forward(lay: Layout, F: Factor, c0, cr):
    """forward(lay, F, c0, cr) -> (v0, vr): v = L_M⁻¹ c, with c0 (nlev0, k0) and cr (q_rest,)."""
    v0 = _bmv(F.L00inv, c0)
    if not lay.q_rest:
        return v0, cr
    if lay.dense_S:
        rhs = cr - F.Sd @ v0.reshape(-1)
    else:
        rhs = cr
        for j, St in enumerate(F.St):
            contrib = _bmv(St, v0[lay.pair_l[j]])
            rhs = rhs.at[_rest_rows(lay, j)].add(-contrib, mode="promise_in_bounds")
    return v0, solve_triangular(F.LD, rhs, lower=True)


def backward(lay: Layout, F: Factor, y0, yr):
    """backward(lay, F, y0, yr) -> (x0, xr): x = L_M⁻ᵀ y."""
    t = y0
    xr = yr
    if lay.q_rest:
        xr = solve_triangular(F.LD, yr, lower=True, trans="T")
        if lay.dense_S:
            t = t - (F.Sd.T @ xr).reshape(lay.nlev0, lay.k0)
        for j, St in enumerate(F.St if not lay.dense_S else []):
            xs = xr[_rest_rows(lay, j)]  # (npairs, k_j)
            t = t - jax.ops.segment_sum(_bmtv(St, xs), lay.pair_l[j], num_segments=lay.nlev0)
    x0 = _bmtv(F.L00inv, t)
    return x0, xr


def apply_lambda(lay: Layout, L0, Lr: list, u0, ur):
    """b = Λu in the internal order: (b0 (nlev0, k0), br (q_rest,))."""
    b0 = u0 @ L0.T
    parts = []
    for j, (Lj, kj, nj) in enumerate(zip(Lr, lay.rest_k, lay.rest_nlev)):
        seg = ur[lay.rest_off[j]: lay.rest_off[j] + nj * kj].reshape(nj, kj)
        parts.append((seg @ Lj.T).ravel())
    br = jnp.concatenate(parts) if parts else ur
    return b0, br


def apply_lambda_t(lay: Layout, L0, Lr: list, a0, ar):
    """Λ'a in the internal order (a0 (nlev0, k0), ar (q_rest,))."""
    c0 = a0 @ L0
    parts = []
    for j, (Lj, kj, nj) in enumerate(zip(Lr, lay.rest_k, lay.rest_nlev)):
        seg = ar[lay.rest_off[j]: lay.rest_off[j] + nj * kj].reshape(nj, kj)
        parts.append((seg @ Lj).ravel())
    cr = jnp.concatenate(parts) if parts else ar
    return c0, cr
