"""run_chains(potential_gen, x0, y, *, seed, warmup, draws, ...) -> ChainsOutput

NumPyro's NUTS kernel (``numpyro.infer.hmc.hmc``: the same iterative NUTS, step-size and mass-matrix
adaptation as ``numpyro.infer.NUTS``) driven by one compiled program per run: every chain's warm-up and
draws in one ``fori_loop``, the chains one per JAX device (``shard_map``: each device runs its own chain to its
own tree depths), vectorised (``vmap``: the chains in lock step) or one after another.

Why not ``numpyro.infer.MCMC``: owning the program lets it be compiled with XLA options chosen for the
model's size. For a small model NUTS costs far more to compile than to run (cbpp, 4 x 2000 iterations:
3.5 s of XLA compilation, 0.4 s of sampling), and XLA's unoptimised CPU back end compiles the same program
in 1.4 s (:data:`FAST_COMPILE`, measured 2026-12-02, four fresh processes each); for a big model the
optimised code's speed matters more (:func:`compiler_options`).

The potential is a function of one flat vector (:class:`stochmm.stochastic.posterior._Flat`); ``potential_gen(y)``
makes it from the response, which stays an argument of the program.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._jax import configure

configure()  # float64, persistent compilation cache

#: XLA options for a program that runs briefly: no LLVM optimisation, XLA's older elemental CPU emitters
#: (measured on cbpp: compile 3.5 s → 1.4 s; sampling time unchanged at 0.4 s)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

#: XLA options for a small marginal NUTS program (quadrature inside, whose arithmetic wants LLVM's
#: optimisation): the older elemental CPU emitters (cbpp: compile 4.6 s → 3.5 s, sampling 1.0 s → 1.07 s)
MEDIUM_COMPILE = {"xla_cpu_use_fusion_emitters": False}

#: fast compilation when observations x (fixed + random-effect columns) is at most this: the density's own
#: arithmetic is then small beside NUTS's bookkeeping (cbpp: 56 x 5; sleepstudy 180 x 4)
FAST_COMPILE_MAX_WORK = 20_000

#: the sampler statistics kept per draw (NumPyro's names)
FIELDS = ("diverging", "energy", "num_steps", "adapt_state.step_size", "potential_energy", "accept_prob")


_UNSUPPORTED: set[str] = set()  # options this jaxlib rejected ("No such compile option")


def compile_with(lowered: Any, options: dict[str, Any] | None) -> Any:
    """compile_with(lowered, options) -> compiled

    ``lowered.compile(compiler_options=options)``, dropping any option this jaxlib does not know (XLA
    renames and retires its flags: ``xla_cpu_use_fusion_emitters`` is gone in jaxlib 0.12) and remembering
    it for the rest of the process.
    """
    opts = {k: v for k, v in (options or {}).items() if k not in _UNSUPPORTED}
    while True:
        try:
            return lowered.compile(compiler_options=opts or None)
        except Exception as err:  # noqa: BLE001 - jaxlib raises JaxRuntimeError (INVALID_ARGUMENT)
            bad = [k for k in opts if f"No such compile option: '{k}'" in str(err)]
            if not bad:
                raise
            _UNSUPPORTED.update(bad)
            opts = {k: v for k, v in opts.items() if k not in bad}


def compiler_options(n: int, width: int, marginal: bool = False) -> dict[str, Any] | None:
    """compiler_options(n, width, marginal=False) -> dict or None

    XLA options for the sampler of a model with ``n`` observations and ``width`` columns (fixed effects plus
    random-effect terms; for marginal NUTS times the quadrature nodes): :data:`FAST_COMPILE` for full NUTS
    when ``n * width`` ≤ :data:`FAST_COMPILE_MAX_WORK`, :data:`MEDIUM_COMPILE` for marginal NUTS under the
    same bound, XLA's defaults otherwise (on InstEval the older emitters made each gradient 1.5x slower) and
    on every back end but the CPU.
    """
    if jax.default_backend() != "cpu" or n * width > FAST_COMPILE_MAX_WORK:
        return None
    return MEDIUM_COMPILE if marginal else FAST_COMPILE


@dataclass
class ChainsOutput:
    """What :func:`run_chains` returns (NumPy arrays, chains first).

    Attributes
    ----------
    z : ndarray (chains, draws, dim)
        The draws of the flat parameter vector.
    fields : dict of str -> ndarray (chains, draws)
        :data:`FIELDS`.
    step_size : ndarray (chains,)
        The adapted step sizes.
    inverse_mass_matrix : ndarray (chains, dim) or (chains, dim, dim)
        The adapted inverse mass matrices.
    compile_s, run_s : float
        Seconds spent tracing and compiling (or loading from the compilation cache), and sampling.
    """

    z: np.ndarray
    fields: dict[str, np.ndarray]
    step_size: np.ndarray
    inverse_mass_matrix: np.ndarray
    compile_s: float = 0.0
    run_s: float = 0.0


class _Progress:
    """A tqdm bar fed from inside the compiled loop (``jax.debug.callback``), shared by the chains."""

    def __init__(self, total: int, show: bool) -> None:
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="sampling", leave=False, file=sys.stderr)
        self.lock = threading.Lock()

    def __call__(self, n) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(int(n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _chain_fn(potential_gen: Callable, *, warmup: int, draws: int, thinning: int, nuts: dict[str, Any],
              progress: _Progress | None, per_call: int = 1) -> Callable:
    """One chain: (key, x0, y) -> (draws of z, fields, last step size, last inverse mass matrix).
    ``per_call``: chains advanced by one progress callback (vectorised chains share theirs)."""
    from numpyro.infer.hmc import hmc

    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")
    total = warmup + draws
    keep = -(-draws // thinning)
    every = max(total // 50, 1)

    def chain(key, x0, y):
        state = init_kernel(x0, num_warmup=warmup, model_args=(y,), rng_key=key, **nuts)

        def pick(st):
            return (st.z, st.diverging, st.energy, st.num_steps, st.adapt_state.step_size, st.potential_energy,
                    st.accept_prob)

        bufs = jax.tree_util.tree_map(lambda a: jnp.zeros((keep, *jnp.shape(a)), jnp.result_type(a)), pick(state))

        def body(i, carry):
            st, bufs = carry
            st = sample_kernel(st, model_args=(y,))
            j = i - warmup
            slot = jnp.clip(j // thinning, 0, keep - 1)
            write = (j >= 0) & (j % thinning == 0)
            bufs = jax.tree_util.tree_map(
                lambda b, v: jax.lax.dynamic_update_index_in_dim(
                    b, jnp.where(write, v, jax.lax.dynamic_index_in_dim(b, slot, keepdims=False)), slot, 0),
                bufs, pick(st))
            if progress is not None:
                jax.lax.cond(((i + 1) % every == 0) | (i + 1 == total),
                             lambda: jax.debug.callback(progress, per_call * jnp.where((i + 1) % every == 0, every,
                                                                                       (i + 1) % every)),
                             lambda: None)
            return st, bufs

        st, bufs = jax.lax.fori_loop(0, total, body, (state, bufs))
        return bufs, st.adapt_state.step_size, st.adapt_state.inverse_mass_matrix

    return chain


def run_chains(potential_gen: Callable, x0: Any, y: Any, *, seed: int, warmup: int, draws: int, thinning: int = 1,
               chain_method: str = "parallel", nuts_options: dict[str, Any] | None = None, progress: bool = False,
               compiler_options: dict[str, Any] | None = None) -> ChainsOutput:
    """run_chains(potential_gen, x0, y, *, seed, warmup, draws, thinning=1, chain_method="parallel", nuts_options=None, progress=False, compiler_options=None) -> ChainsOutput

    NUTS chains started at ``x0`` (chains, dim) on the potential ``potential_gen(y)``: ``warmup`` adaptation
    iterations (NumPyro's windowed adaptation), then ``draws`` iterations of which every ``thinning``-th is
    kept. Chain ``c`` uses the PRNG key ``split(PRNGKey(seed), chains)[c]`` whatever ``chain_method``, so
    parallel, vectorised and sequential runs make the same chains, up to rounding in the last bits (which
    long trajectories amplify: the draws agree at first, then become different draws of the same law).

    Parameters
    ----------
    nuts_options : dict
        Passed to NumPyro's NUTS initialisation (``target_accept_prob``, ``max_tree_depth``, ``dense_mass``,
        ``step_size``, ``adapt_step_size``, ``adapt_mass_matrix``, ``find_heuristic_step_size``,
        ``regularize_mass_matrix``).
    progress : bool
        A tqdm bar over all chains' iterations.
    compiler_options : dict, optional
        XLA options for the compiled program (:func:`compiler_options`).

    Examples
    --------
    >>> import jax.numpy as jnp, numpy as np
    >>> from stochmm.stochastic.nuts import run_chains
    >>> out = run_chains(lambda y: (lambda x: 0.5 * jnp.sum((x - y) ** 2)), np.zeros((2, 3)), jnp.ones(3),
    ...                  seed=0, warmup=200, draws=500, chain_method="vectorized")
    >>> out.z.shape
    (2, 500, 3)
    >>> bool(np.all(np.abs(out.z.mean(axis=(0, 1)) - 1) < 0.25))
    True
    """
    x0 = jnp.asarray(x0)
    y = jnp.asarray(y)
    chains = x0.shape[0]
    nuts = dict(nuts_options or {})
    bar = _Progress(chains * (warmup + draws), progress)
    chain = _chain_fn(potential_gen, warmup=warmup, draws=draws, thinning=thinning, nuts=nuts,
                      progress=bar if progress else None, per_call=chains if chain_method == "vectorized" else 1)
    keys = jax.random.split(jax.random.PRNGKey(int(seed)), chains)
    opts = compiler_options or None
    t0 = time.perf_counter()
    try:
        if chain_method == "parallel":
            from jax.sharding import Mesh, PartitionSpec

            mesh = Mesh(np.array(jax.local_devices()[:chains]), ("chain",))

            def local(k, x, yy):  # this device's chain (a block of one)
                out = chain(k[0], x[0], yy)
                return jax.tree_util.tree_map(lambda a: a[None], out)

            spec = PartitionSpec("chain")
            fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=spec,
                               check_vma=False)
            run = compile_with(jax.jit(fn).lower(keys, x0, y), opts)
            t1 = time.perf_counter()
            res = run(keys, x0, y)
        elif chain_method == "vectorized":
            run = compile_with(jax.jit(jax.vmap(chain, in_axes=(0, 0, None))).lower(keys, x0, y), opts)
            t1 = time.perf_counter()
            res = run(keys, x0, y)
        else:
            run = compile_with(jax.jit(chain).lower(keys[0], x0[0], y), opts)
            t1 = time.perf_counter()
            outs = [run(keys[c], x0[c], y) for c in range(chains)]
            res = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
        res = jax.tree_util.tree_map(np.asarray, res)
    finally:
        bar.close()
    t2 = time.perf_counter()
    (z, *vals), step, imm = res
    return ChainsOutput(z=z, fields=dict(zip(FIELDS, vals)), step_size=step, inverse_mass_matrix=imm,
                        compile_s=t1 - t0, run_s=t2 - t1)
