"""Simulation-based calibration of the posterior sampler (Talts, Betancourt, Simpson, Vehtari & Gelman 2018).

Draw parameters from the prior, a response from the model at them, sample the posterior of that response,
and record the rank of the true value among (thinned) posterior draws. If the sampler is right, each
parameter's rank is uniform on 0..L; a χ² test over equal-width bins checks it.

Full NUTS: every replication is its own NUTS chain (own warm-up, step size and mass matrix), and the
replications are vmapped through NumPyro's functional ``hmc`` kernels with the response an argument: one
compilation for all of them. Marginal
NUTS builds its marginal likelihood around each response, so each replication is its own run (and
compilation) — slower; use fewer replications there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..builder.model import Model

__all__ = ["sbc", "SBCResults"]


@dataclass
class SBCResults:
    """Ranks and uniformity tests of a simulation-based calibration.

    Attributes
    ----------
    ranks : pandas.DataFrame
        One row per replication, one column per parameter: the rank of the true value among ``L`` posterior
        draws (0..L).
    L : int
        Posterior draws per replication after thinning.
    table : pandas.DataFrame
        Per parameter: χ² statistic over ``bins`` equal-width bins, its degrees of freedom and p-value.
    divergences : int
        Divergent transitions summed over replications.
    """

    ranks: pd.DataFrame
    L: int
    table: pd.DataFrame
    divergences: int

    def uniform(self, level: float = 0.01) -> bool:
        """uniform(level=0.01) -> bool — no parameter's χ² test rejects at ``level``."""
        return bool((self.table["p_value"] > level).all())


def _chi2(ranks: np.ndarray, L: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import chi2

    edges = np.linspace(0, L + 1, bins + 1)
    stats = []
    for col in ranks.T:
        counts, _ = np.histogram(col, bins=edges)
        expected = len(col) * np.diff(edges) / (L + 1)
        stats.append(float(np.sum((counts - expected) ** 2 / expected)))
    stats = np.asarray(stats)
    return stats, chi2.sf(stats, bins - 1)


def sbc(model: Model, *, reps: int = 200, draws: int = 400, warmup: int = 300, thin: int = 4, bins: int = 10,
        seed: int = 0, priors: dict[str, Any] | None = None, marginalize: bool = False,
        nuts_options: dict[str, Any] | None = None) -> SBCResults:
    """sbc(model, *, reps=200, draws=400, warmup=300, thin=4, bins=10, seed=0, priors=None, marginalize=False) -> SBCResults

    Simulation-based calibration of :func:`stochmm.stochastic.posterior.sample_model` on ``model``'s design
    (X, Z, weights, offset, family): ``reps`` replications, one chain of ``warmup`` + ``draws`` iterations
    each, thinned by ``thin`` (L = draws // thin), ranks of every scalar parameter (fixed effects, SDs,
    correlations, σ) tested for uniformity by χ² over ``bins`` bins.

    Examples
    --------
    >>> import stochmm as sm  # doctest: +SKIP
    >>> m = sm.Model("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff"))  # doctest: +SKIP
    >>> sbc(m, reps=100).table  # doctest: +SKIP
    """
    import jax
    import jax.numpy as jnp

    from . import posterior as P
    from .idata import group_dataset
    from .priors import resolve_priors

    for nm, v, lo in (("reps", reps, 2), ("draws", draws, 1), ("warmup", warmup, 0), ("thin", thin, 1),
                      ("bins", bins, 2)):
        P._posint(nm, v, lo)
    L = draws // thin
    if L < bins - 1:
        raise P.SamplingError(f"draws // thin = {L} posterior draws per replication; need at least bins - 1 = {bins - 1}")
    prior = P.sample_prior(model, priors=priors, draws=reps, seed=seed)
    pdens = prior._dens
    yrep = np.asarray(group_dataset(prior.idata, "prior_predictive")["y"].values)[0]  # (reps, n)
    d = pdens.d
    if d.cbind:
        yrep = yrep / d.trials
    truth = prior._scalar_draws()
    names = list(truth)
    true = np.stack([np.asarray(truth[k])[0] for k in names], axis=1)  # (reps, P)
    pri, user = resolve_priors(model, priors)
    rng = np.random.default_rng(seed + 1)
    ranks = np.zeros((reps, len(names)), dtype=int)
    div = 0

    def true_values(dens, r):
        Ls = [np.asarray(prior._draws["sd"][0, r][sl])[:, None] * np.eye(k) for sl, k in zip(dens.sd_slices, d.ks)]
        off = 0
        for j in pdens.lay.cor_terms:  # the true correlation factors
            k = d.ks[j]
            C = np.eye(k)
            for b in range(k):
                for a in range(b + 1, k):
                    C[a, b] = C[b, a] = prior._draws["cor"][0, r][off]
                    off += 1
            Ls[j] = np.diag(Ls[j])[:, None] * np.linalg.cholesky(C)
        sig = float(prior._draws["sigma"][0, r]) if "sigma" in prior._draws else 1.0
        return prior._draws["fixef"][0, r], Ls, sig, prior._draws["b"][0, r]

    def columns(dens, cons):
        cols = []
        for nm in names:
            if nm in dens.lay.fixef:
                cols.append(np.asarray(cons["fixef"])[..., dens.lay.fixef.index(nm)])
            elif nm in dens.lay.sd:
                cols.append(np.asarray(cons["sd"])[..., dens.lay.sd.index(nm)])
            elif nm == "sigma":
                cols.append(np.asarray(cons["sigma"]))
            else:
                cols.append(np.asarray(cons["cor"])[..., dens.lay.cor.index(nm)])
        return np.stack(cols, axis=-1)

    if not marginalize:
        from numpyro.infer.hmc import hmc

        dens = P._Density(model, pri, user, centered=[False] * len(model.terms), clones=1)
        inits = [P._start(dens, None, 1, rng, values=true_values(dens, r)) for r in range(reps)]
        init = {k: jnp.concatenate([i[k] for i in inits]) for k in inits[0]}  # (reps, ...)
        opts = dict(nuts_options or {})
        opts.setdefault("dense_mass", P._Flat(init).dim <= P.DENSE_MAX)  # the mass matrix sample() would use

        def potential_gen(y):
            return lambda params: -dens.log_density(params, y)

        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

        def one(key, y, z0):  # one replication: its own warm-up and adaptation, then `draws` iterations
            state = init_kernel(z0, num_warmup=warmup, model_args=(y,), rng_key=key, **opts)

            def step(st, _):
                st = sample_kernel(st, model_args=(y,))
                return st, (st.z, st.diverging)

            _, (zs, dv) = jax.lax.scan(step, state, None, length=warmup + draws)
            keep = jax.tree_util.tree_map(lambda a: a[warmup::thin], zs)
            return jax.vmap(dens.constrain)(keep), jnp.sum(dv[warmup:])

        keys = jax.random.split(jax.random.PRNGKey(seed + 1000), reps)
        cons, dv = jax.jit(jax.vmap(one))(keys, jnp.asarray(yrep), init)
        div = int(np.asarray(dv).sum())
        draws_all = columns(dens, cons)  # (reps, L, P)
        ranks = np.sum(draws_all[:, :L] < true[:, None, :], axis=1)
    else:
        for r in range(reps):
            y = yrep[r]
            m_r = model.with_response(y * d.trials if d.cbind else y)
            dens = P._Density(m_r, pri, user, centered=[False] * len(model.terms), clones=1,
                              marginal=P._marginal(m_r, True, 1)[0])
            init = P._start(dens, None, 1, rng, values=true_values(dens, r))
            smp, fields, _ = P._chains(dens, init, seed=seed + 1000 + r, warmup=warmup, draws=draws,
                                       chain_method="sequential", progress=False, thinning=thin,
                                       nuts_options=dict(nuts_options or {}), y=jnp.asarray(y))
            div += int(np.asarray(fields["diverging"]).sum())
            cons = jax.vmap(dens.constrain)({k: v[0] for k, v in smp.items()})
            ranks[r] = np.sum(columns(dens, cons)[:L] < true[r], axis=0)
    stat, pval = _chi2(ranks, L, bins)
    table = pd.DataFrame({"chi2": stat, "df": bins - 1, "p_value": pval}, index=pd.Index(names, name="parameter"))
    return SBCResults(pd.DataFrame(ranks, columns=names), L, table, div)
