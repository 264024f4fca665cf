"""Generalized linear mixed models by maximum likelihood: Laplace, nAGQ = 0 and AGQ.

:func:`glmer` (and ``Model(..., family=...).fit(method=...)``) fits a GLMM the way
lme4's ``glmer`` does, in two stages:

1. **nAGQ = 0** (``method="fast"``): θ alone is optimised; at each θ, PIRLS finds
   the modes of u and β jointly and the criterion is the Laplace deviance there.
2. **Laplace** (``method="laplace"``, nAGQ = 1) or **adaptive Gauss–Hermite
   quadrature** (``method="agq"``, nAGQ > 1): starting from stage 1, (θ, β) are
   optimised together; PIRLS (warm-started from a first-order prediction of the
   modes) updates only u.

Both stages use the *exact* gradient of their criterion (:mod:`stochmm.deterministic.pirls`,
:mod:`stochmm.deterministic.quadrature`). The default optimizer (``optimizer="newton"``) is a
quasi-Newton method seeded with a nearly exact Hessian — forward differences of the
gradient in the θ directions, 2·R_X R_X' for β — so its first steps are Newton
steps; stage 1 runs it on log θ when every term is scalar (variance components are
close to quadratic there). A variance parameter heading for its bound hands over
to L-BFGS-B, which reaches the bound exactly. ``optimizer="lbfgs"`` uses L-BFGS-B
throughout; ``optimizer="bobyqa"`` runs the derivative-free search lme4 uses.

One scale for every method: ``objective`` is the full −2 log-likelihood with all
normalising constants (binomial coefficients, log y!), so Laplace, AGQ,
importance-sampling and MCMC numbers compare directly. lme4 agrees for nAGQ ≤ 1;
for nAGQ > 1 lme4 drops the saturated model's log-likelihood (lme4 issue #161;
cbpp: 100.01 vs 184.05). ``fit.lme4_objective`` gives the value on lme4's scale,
``fit.saturated_loglik`` the constant: lme4 value = objective + 2·saturated_loglik.

Standard errors come from the Hessian of the objective in (θ, β) — forward
differences of the exact gradient — and the convergence check at the optimum
follows lme4 (max |H⁻¹g| > 0.002 warns, printing the number). For nAGQ = 0 they
come from R_X, as lme4's. lme4's *default* nAGQ = 1 standard errors differ from
these by up to ~1.4 %: its PIRLS stops at ``tolPwrss = 1e-7`` and its
finite-difference Hessian inherits that noise; with ``tolPwrss = 1e-12`` lme4
reproduces ours (and glmmTMB's) to 1e-5.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.optimize as so

from ..builder.families import Family, FamilyError, get_family
from ..builder.model import Model
from ..errors import ConvergenceWarning, OptionError, SingularFitWarning, check_choice, check_flag, check_keywords
from ..results import MixedModelResults, Summary, format_coef_table
from .optsummary import OptSummary, check_convergence, minimize_bounded
from .pirls import BlockedEngine, LevelEngine, blas_threads, make_engine, single_factor
from .quadrature import MAX_NAGQ, QuadratureError, QuadratureRule, agq, make_rule

__all__ = ["GlmmResults", "fit_glmm", "glmer", "glmm_engine", "BlockedEngine", "LevelEngine", "QuadratureError"]

_METHODS = {"laplace": 1, "agq": None, "fast": 0}


# =============================================================================================
# results
# =============================================================================================
class GlmmResults(MixedModelResults):
    """Results of :func:`glmer` / :func:`fit_glmm` — see :class:`stochmm.results.MixedModelResults`.

    Additional attributes
    ---------------------
    family : Family
    nagq : int
        0 (fast), 1 (Laplace) or the number of quadrature nodes per dimension.
    rule : QuadratureRule or None
    saturated_loglik : float
        Log-likelihood of the saturated model (μ = y), constants included.
    lme4_objective : float
        The objective on lme4's printed scale (nAGQ > 1: without the saturated term).
    vcov_source : str
        ``"hessian"`` (default for nAGQ ≥ 1) or ``"RX"``.
    hessian_kind : str
        The ``hessian=`` the fit used: ``"observed"`` or ``"expected"`` information.
    timing : dict
        Seconds and counts: total, per stage, PIRLS iterations, objective and gradient evaluations.

    Examples
    --------
    >>> import stochmm as sm
    >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"), nagq=25)
    >>> fit.family_label, fit.nagq, round(fit.objective - fit.lme4_objective, 4)
    ('binomial  ( logit )', 25, 83.9567)
    """

    def __init__(self, *args: Any, family: Family, nagq: int, rule: QuadratureRule | None,
                 vcov_source: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.family = family
        self.nagq = int(nagq)
        self.rule = rule
        self.vcov_source = vcov_source
        self.hessian_kind = "observed"
        self.saturated_loglik = float(family.saturated_loglik(self.model))
        self.timing: dict[str, Any] = {}
        self.derivs: dict | None = None

    @property
    def family_label(self) -> str:  # type: ignore[override]
        """The family and link as lme4 prints them, e.g. ``binomial  ( logit )``."""
        return self.family.label

    def _linkinv(self, eta: np.ndarray) -> np.ndarray:
        return self.family.linkinv(eta)

    @property
    def lme4_objective(self) -> float:
        """The objective as lme4 1.1-31 prints it: nAGQ > 1 values omit −2·saturated_loglik."""
        return self.objective + 2.0 * self.saturated_loglik if self.nagq > 1 else self.objective

    @property
    def pearson_residuals(self) -> np.ndarray:
        """(y − μ)√w / √V(μ) — glmer's scaled residuals."""
        m = self.model
        return self.family.pearson_residuals(m.y, self.fitted, m.weights)

    scaled_residuals = pearson_residuals

    @property
    def method_title(self) -> str:
        """The approximation as lme4's summary names it (Laplace, adaptive Gauss-Hermite quadrature)."""
        if self.nagq == 1:
            return "Laplace Approximation"
        return f"Adaptive Gauss-Hermite Quadrature, nAGQ = {self.nagq}"

    def summary(self) -> Summary:
        """summary() -> Summary

        The text lme4's ``summary(glmer(...))`` prints: method, family, AIC/BIC/
        logLik/deviance/df.resid (full −2 log L as ``deviance``), Pearson residuals,
        random effects (no residual row), fixed effects with z values and
        Pr(>|z|), correlations.

        Examples
        --------
        >>> import stochmm as sm
        >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
        >>> print(str(fit.summary()).splitlines()[1])
         Family: binomial  ( logit )
        """
        m = self.model
        head = [f"Generalized linear mixed model fit by maximum likelihood ({self.method_title}) ['glmerMod']",
                f" Family: {self.family.label}", f"Formula: {m.formula}"]
        if self.nagq > 1 and self.rule is not None and self.rule.dim > 1:
            head.append(f"Quadrature: {self.rule.kind} rule, {self.rule.size} nodes per level")
        head.append("")
        head += self._ic_lines(self.deviance)
        table = self.coef_table()
        stars = _signif_stars(table["Pr(>|z|)"].to_numpy())
        lines = format_coef_table(table).splitlines()
        width = max(len(line) for line in lines)
        coef_text = "\n".join([lines[0]] + [(line.ljust(width) + " " + s).rstrip() for line, s in zip(lines[1:], stars)])
        head += ["", "Scaled residuals: ", self._residual_quantiles(self.pearson_residuals), "",
                 "Random effects:", self._random_effects_text(), "", "Fixed effects:", coef_text, "---",
                 "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"]
        corr = self._fixef_corr_text()
        if corr:
            head += ["", corr]
        if self.is_singular:
            head += ["", "boundary (singular) fit: see is_singular"]
        for msg in self.warnings:
            if not msg.startswith("boundary"):
                head.append(msg)
        if m.dropped_columns:
            head.append(f"fixed-effect model matrix is rank deficient so dropping {len(m.dropped_columns)} "
                        "columns / coefficients")
        return Summary("\n".join(head), {"coefficients": table, "varcorr": self.varcorr})

    # -- simulation ---------------------------------------------------------------------------
    def simulate(self, nsim: int = 1, seed: int | np.random.Generator | None = None,
                 use_u: bool = False) -> pd.DataFrame:
        """simulate(nsim=1, seed=None, use_u=False) -> DataFrame

        Responses simulated from the fitted model, one column per simulation
        (``sim_1``, ...), as lme4's ``simulate``: new random effects b ~ N(0, ΛΛ')
        (``use_u=True`` keeps the conditional modes), then the response family on
        μ = g⁻¹(Xβ + Zb + offset). Binomial ``cbind`` models give numbers of
        successes, proportions-with-weights give proportions, binary models 0/1.

        Examples
        --------
        >>> import stochmm as sm
        >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"))
        >>> fit.simulate(3, seed=1).shape
        (56, 3)
        """
        sims = self.model.simulate(self._beta, self.theta, nsim=nsim, seed=seed, family=self.family,
                                   b=self._b if use_u else None)
        return pd.DataFrame(sims, columns=[f"sim_{s + 1}" for s in range(sims.shape[1])])


def _signif_stars(p: np.ndarray) -> list[str]:
    out = []
    for v in p:
        if not np.isfinite(v):
            out.append("")
        elif v < 0.001:
            out.append("***")
        elif v < 0.01:
            out.append("**")
        elif v < 0.05:
            out.append("*")
        elif v < 0.1:
            out.append(".")
        else:
            out.append("")
    return out


# =============================================================================================
# fitting
# =============================================================================================
def _resolve_method(method: str | None, nagq: int | None) -> int:
    if nagq is not None and (isinstance(nagq, (bool, np.bool_)) or not isinstance(nagq, (int, np.integer, float))
                             or not np.isfinite(nagq)):
        raise OptionError(f"nagq must be a non-negative whole number, got {nagq!r}")
    if nagq is not None and nagq > MAX_NAGQ:
        raise QuadratureError(f"nagq={nagq} is above the ceiling of {MAX_NAGQ} nodes per dimension (lme4's "
                              f"too): {MAX_NAGQ} Gauss–Hermite nodes already integrate polynomials of degree "
                              f"{2 * MAX_NAGQ - 1} exactly")
    if method is not None and not isinstance(method, str):
        raise OptionError(f"method must be 'laplace', 'agq' or 'fast', got {method!r}")
    if method is None:
        method = "laplace" if nagq is None else ("fast" if nagq == 0 else "laplace" if nagq == 1 else "agq")
    key = str(method).lower()
    if key in ("nagq0", "nagq=0", "pirls"):
        key = "fast"
    if key == "adaptive":
        key = "agq"
    if key not in _METHODS:
        raise ValueError(f"method for a GLMM is 'laplace', 'agq' or 'fast', not {method!r}")
    if nagq is not None:
        if int(nagq) != nagq or nagq < 0:
            raise ValueError(f"nagq must be a non-negative integer, got {nagq!r}")
        nagq = int(nagq)
    fixed = _METHODS[key]
    if key == "laplace" and nagq is not None and nagq != 1:
        # Model.fit() passes method="laplace" when none is given: an explicit nagq decides
        return _resolve_method(None, nagq)
    if fixed is not None:
        if nagq is not None and nagq != fixed:
            raise ValueError(f"method={method!r} means nagq={fixed}; got nagq={nagq} "
                             f"(use method='agq' for nagq > 1)")
        return fixed
    if nagq is None:
        return 9
    if nagq < 2:
        raise ValueError(f"method='agq' needs nagq >= 2 (nagq=1 is the Laplace approximation), got {nagq}")
    return nagq


def glmm_engine(model: Model, family: Family | None = None, hessian: str = "observed", engine: str = "auto"):
    """glmm_engine(model, family=None, hessian="observed", engine="auto") -> engine

    The PIRLS engine a fit would use (for evaluating the Laplace/AGQ deviance at
    given parameters; see :mod:`stochmm.deterministic.pirls`).

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="binomial")
    >>> eng = glmm_engine(m)
    >>> round(eng.laplace(np.array([0.642]), np.array([-1.3985, -0.9923, -1.1287, -1.5803]))[0], 4)
    184.0526
    """
    fam = family if family is not None else get_family(model.family)
    return make_engine(model, fam, hessian=hessian, engine=engine)


def fit_glmm(model: Model, method: str | None = "laplace", *, nagq: int | None = None, link: str | None = None,
             start: dict | np.ndarray | None = None, optimizer: str = "newton", hessian: str = "observed",
             rule: str = "tensor", max_nodes: int = 10_000, check_derivatives: bool | None = None,
             condvar: bool = True, engine: str = "auto", tol: float = 1e-5, maxiter: int = 500,
             fd: str = "forward", threads: int | str | None = "auto", keep_log: bool = False,
             stage1: bool = True, vcov: str = "hessian", **aliases: Any) -> GlmmResults:
    """fit_glmm(model, method="laplace", *, nagq=None, link=None, start=None, optimizer="newton", ...) -> GlmmResults

    Fit a GLMM built by :class:`~stochmm.builder.model.Model` by maximum likelihood.

    Parameters
    ----------
    model : Model
        With a binomial or Poisson family (a name or a :class:`~stochmm.builder.families.Family`).
    method : {"laplace", "agq", "fast"}
        Laplace approximation (nAGQ = 1), adaptive Gauss–Hermite quadrature
        (``nagq`` > 1 nodes per dimension; default 9) or nAGQ = 0.
    nagq : int, optional
        lme4's ``nAGQ``; with ``method=None`` it picks the method.
    link : str, optional
        Override the family's link (``"probit"``, ``"cloglog"``).
    start : dict or array, optional
        Start values: ``{"theta": ..., "beta": ...}`` or a θ array (stage 1 start).
    optimizer : {"newton", "lbfgs", "bobyqa"}
        Optimizer on the exact gradient: quasi-Newton seeded with a nearly exact
        Hessian (default; stage 1 by a secant–Newton search for one θ, L-BFGS-B for
        several), L-BFGS-B in both stages, or lme4's derivative-free BOBYQA.
    hessian : {"observed", "expected"}
        Weights in the Laplace log-determinant: observed information (exact Laplace,
        as glmmTMB) or expected/Fisher information (lme4's value for probit/cloglog;
        the same for logit and log links). Adaptive quadrature (nAGQ > 1) always
        centres and scales its nodes with the observed Hessian.
    rule : {"tensor", "sparse"}
        Quadrature rule for vector-valued random effects (nAGQ > 1).
    max_nodes : int
        Largest number of quadrature nodes per level.
    check_derivatives : bool, optional
        Gradient and Hessian check at the optimum with lme4's convergence warnings
        (default: on for nAGQ ≥ 1; the Hessian is needed for the SEs anyway).
    condvar : bool
        Make conditional variances of the random effects available (lazily).
    engine : {"auto", "blocked", "level"}
        PIRLS engine (single grouping factor → per-level engine).
    tol : float
        Projected-gradient tolerance of L-BFGS-B in scaled coordinates (stage 2;
        β scaled by its stage-1 standard errors).
    fd : {"forward", "central"}
        Finite differences of the exact gradient for the Hessian (SEs, convergence check).
    threads : int, "auto" or None
        OpenBLAS threads during the fit: ``"auto"`` uses one for models whose dense
        blocks are small (thread hand-off dominates there), None leaves the setting alone.
    keep_log : bool
        Keep every objective evaluation in ``optsum.fitlog``.
    stage1 : bool
        Run the nAGQ = 0 first stage (nAGQ ≥ 1). ``False`` needs a full start
        ``{"theta": ..., "beta": ...}`` and starts the (θ, β) search there: for refits
        from a converged neighbour (bootstrap replicates, simulation studies).
    vcov : {"hessian", "RX"}
        Standard errors from the finite-difference Hessian of the deviance (nAGQ ≥ 1,
        lme4's default) or from R_X at the estimates (no Hessian is computed unless
        ``check_derivatives=True``; nAGQ = 0 always uses R_X).
    **aliases
        ``nAGQ=`` (lme4's spelling) for ``nagq``. Any other name is refused
        (:class:`~stochmm.errors.OptionError`, listing the valid ones).

    Returns
    -------
    GlmmResults

    Raises
    ------
    QuadratureError
        nAGQ > 1 with crossed or several grouping factors, too many nodes, or
        nagq above :data:`~stochmm.deterministic.quadrature.MAX_NAGQ` (25, lme4's ceiling).
    OptionError
        Unknown keywords, flags that are not True/False, choices not in the list.

    Examples
    --------
    >>> import stochmm as sm
    >>> m = sm.Model("incidence ~ period + offset(log(size)) + (1 | herd)", sm.datasets.load("cbpp"),
    ...              family="poisson")
    >>> fit = fit_glmm(m, method="agq", nagq=25)
    >>> round(fit.objective, 3), round(fit.lme4_objective, 3)
    (180.489, 89.316)
    """
    t_start = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"fit_glmm needs a stochmm Model, got {type(model).__name__}")
    nagq = _glmm_keywords(aliases, "fit_glmm", nagq)
    check_flag(check_derivatives, "check_derivatives", allow_none=True)
    check_flag(condvar, "condvar")
    check_flag(keep_log, "keep_log")
    check_flag(stage1, "stage1")
    for name, value, choices in (("optimizer", optimizer, ("newton", "lbfgs", "bobyqa")),
                                 ("hessian", hessian, ("observed", "expected")), ("rule", rule, ("tensor", "sparse")),
                                 ("engine", engine, ("auto", "blocked", "level")), ("fd", fd, ("forward", "central")),
                                 ("vcov", vcov, ("hessian", "RX"))):
        check_choice(value, name, choices)
    for name, value in (("max_nodes", max_nodes), ("maxiter", maxiter)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OptionError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.floating)) or not tol > 0:
        raise OptionError(f"tol must be a positive number, got {tol!r}")
    if not (threads is None or threads == "auto" or (isinstance(threads, (int, np.integer))
                                                      and not isinstance(threads, bool) and threads >= 1)):
        raise OptionError(f"threads must be a positive integer, 'auto' or None, got {threads!r}")
    nq = _resolve_method(method, nagq)
    if not stage1:
        if nq == 0:
            raise OptionError("stage1=False skips the nAGQ = 0 stage, which is the whole fit for nagq=0; "
                              "give a start instead")
        if not (isinstance(start, dict) and start.get("theta") is not None and start.get("beta") is not None):
            raise OptionError('stage1=False needs a full start, start={"theta": ..., "beta": ...}')
    if threads == "auto":
        dense = model.q - model.terms[0].q + model.p + 1 if len(model.terms) > 1 else model.p + 1
        threads = 1 if dense <= 600 else None
    with blas_threads(threads if threads is None else int(threads)):
        return _fit(model, nq, t_start, link=link, start=start, optimizer=optimizer, hessian=hessian, rule=rule,
                    max_nodes=max_nodes, check_derivatives=check_derivatives, condvar=condvar, engine=engine,
                    tol=tol, maxiter=maxiter, fd=fd, keep_log=keep_log, stage1=stage1, vcov_kind=vcov)


def _fit(model: Model, nq: int, t_start: float, *, link, start, optimizer, hessian, rule, max_nodes,
         check_derivatives, condvar, engine, tol, maxiter, fd, keep_log, stage1=True,
         vcov_kind="hessian") -> GlmmResults:
    family = get_family(model.family, link)
    if family.name != model.family_name:
        raise FamilyError(f"family {family.name!r} does not match the model's family {model.family_name!r}")
    if optimizer not in ("newton", "lbfgs", "bobyqa"):
        raise ValueError(f"optimizer must be 'newton', 'lbfgs' or 'bobyqa', not {optimizer!r}")
    if fd not in ("forward", "central"):
        raise ValueError(f"fd must be 'forward' or 'central', not {fd!r}")
    qrule = None
    if nq > 1:
        if not single_factor(model):
            groups = ", ".join(dict.fromkeys(t.group for t in model.terms))
            raise QuadratureError(
                f"adaptive Gauss-Hermite quadrature (nagq={nq}) needs the random effects to share a single "
                f"grouping factor; this model has {len({t.group for t in model.terms})} ({groups}), whose "
                "integral does not factor over levels. Use the Laplace approximation (nagq=1), or importance "
                "sampling of the marginal likelihood (stochmm's importance-sampling path) for a more accurate "
                "integral over crossed or nested random effects"
            )
        k = int(sum(t.k for t in model.terms))
        qrule = make_rule(nq, k, rule=rule, max_nodes=max_nodes)
        if engine == "blocked":
            raise ValueError("adaptive quadrature runs on the per-level engine; use engine='auto'")
    eng = make_engine(model, family, hessian=hessian, engine=engine)
    nt, p = eng.ntheta, eng.p
    lower = np.asarray(model.lower, dtype=float)
    theta_start, beta_start = _parse_start(start, model)
    if check_derivatives is None:
        check_derivatives = nq >= 1 and vcov_kind == "hessian"

    # ---------------------------------------------------------------- stage 1: nAGQ = 0
    t1 = time.perf_counter()
    final = nq == 0
    scalar = all(t.k == 1 for t in model.terms)
    if not stage1:  # full start: one joint PIRLS for R_X (β's scaling in stage 2), no search
        s1 = None
    elif optimizer == "newton" and scalar:
        s1 = _stage1_newton(eng.fast_grad, theta_start, lower, model, final, keep_log)
    elif optimizer == "newton":  # vector-valued terms: θ scale (sign symmetries make log-θ steps unsafe)
        s1 = _minimize_theta(eng.fast_grad, theta_start, lower, model.theta_names,
                             gtol=1e-6 if final else 1e-3, keep_log=keep_log)
    elif optimizer == "lbfgs":
        s1 = _minimize_theta(eng.fast_grad, theta_start, lower, model.theta_names,
                             gtol=1e-6 if final else 1e-3, keep_log=keep_log)
    else:
        opt_kw = dict(ftol_rel=1e-12 if final else 1e-10, ftol_abs=1e-10 if final else 1e-7,
                      xtol_abs=1e-8 if final else 1e-5)
        s1 = minimize_bounded(eng.fast, theta_start, lower, names=model.theta_names, keep_log=keep_log, **opt_kw)
    theta0 = s1.xfinal.copy() if s1 is not None else theta_start.copy()
    near = np.isfinite(lower) & (theta0 - lower < 1e-7) & (theta0 != lower)
    if near.any() and s1 is not None:
        trial = theta0.copy()
        trial[near] = lower[near]
        ft = eng.fast(trial)
        if ft <= s1.fmin:
            theta0, s1.xfinal, s1.fmin = trial, trial, ft
    st0 = eng.pirls_joint(theta0)
    beta0 = st0.beta.copy() if beta_start is None else beta_start
    RX0 = st0.extra["RX"]
    stage1_time = time.perf_counter() - t1
    pirls_stage1 = eng.n_pirls

    if nq == 0:
        theta, beta = theta0, st0.beta.copy()
        objective = st0.pdev + st0.logdet - 2.0 * eng.const
        st = final_state = st0
        if p:
            RXinv = np.linalg.inv(st.extra["RX"])
            vcov = RXinv.T @ RXinv
        else:
            vcov = np.zeros((0, 0))
        optsum = s1
        optsum.names = list(model.theta_names)
        derivs = None
        if check_derivatives:
            _, g0 = eng.fast_grad(theta)
            derivs, _ = _hessian(lambda th: eng.fast_grad(th), theta, g0, lower, fd)
            eng.pirls_joint(theta)
        u = eng.state.u
        vsrc = "RX"
        stage2_time = 0.0
    else:
        # ------------------------------------------------------------ stage 2: (θ, β)
        t2 = time.perf_counter()
        memo: dict = {}

        def vg(phi):  # value and exact gradient; the last point is remembered (the Hessian starts there)
            key = phi.tobytes()
            if key not in memo:
                out = (eng.laplace(phi[:nt], phi[nt:], grad=True) if nq == 1
                       else agq(eng, phi[:nt], phi[nt:], qrule, grad=True))
                memo.clear()
                memo[key] = (out[0], out[1].copy(), eng.state.u.copy())
            f, g, _ = memo[key]
            return f, g.copy()

        if nq == 1:
            def val(phi):
                return eng.laplace(phi[:nt], phi[nt:])[0]
        else:

            def val(phi):
                return agq(eng, phi[:nt], phi[nt:], qrule)[0]
        phi0 = np.concatenate([theta0, beta0])
        scaler = _Scaler(phi0, nt, RX0, lower)
        log: list = []
        if optimizer == "newton":
            phi_qn, fmin, nfev, ret = _quasi_newton(vg, phi0, RX0, nt, scaler.lower_phi, tol=tol, maxiter=maxiter,
                                                    log=log if keep_log else None)
            x = scaler.to_x(phi_qn)
            opt_name = "quasi-Newton (exact gradient)"
            if ret == "BOUND":  # a variance parameter heads for its bound: finish with L-BFGS-B
                scaler = _Scaler(phi_qn, nt, RX0, lower)
                x, fmin2, nfev2, ret = _lbfgs(vg, scaler, tol=tol, maxiter=maxiter, log=log if keep_log else None)
                nfev += nfev2
                fmin = min(fmin, fmin2)
                opt_name = "quasi-Newton + L-BFGS-B (exact gradient)"
        elif optimizer == "lbfgs":
            x, fmin, nfev, ret = _lbfgs(vg, scaler, tol=tol, maxiter=maxiter, log=log if keep_log else None)
            opt_name = "L-BFGS-B (exact gradient)"
        else:
            def fx(x):
                return val(scaler.to_phi(x))

            s2 = minimize_bounded(fx, np.zeros(nt + p), scaler.xlower, initial_step=np.full(nt + p, 0.5),
                                  ftol_rel=1e-12, ftol_abs=1e-9, xtol_abs=1e-7, keep_log=keep_log)
            x, fmin, nfev, ret = s2.xfinal, s2.fmin, s2.feval, s2.returnvalue
            log = [(scaler.to_phi(xx), f) for xx, f in s2.fitlog]
            opt_name = "LN_BOBYQA"
        phi = scaler.to_phi(x)
        # put θ components within 1e-8 of a bound onto it if that is no worse
        nearb = np.isfinite(scaler.lower_phi) & (phi - scaler.lower_phi < 1e-7) & (phi != scaler.lower_phi)
        if nearb.any():
            trial = phi.copy()
            trial[nearb] = scaler.lower_phi[nearb]
            ft = val(trial)
            if ft <= fmin:
                phi, fmin = trial, ft
        theta, beta = phi[:nt].copy(), phi[nt:].copy()
        stage2_time = time.perf_counter() - t2
        lower_phi = scaler.lower_phi
        optsum = OptSummary(optimizer=opt_name, x0=phi0, lower=lower_phi, upper=np.full(nt + p, np.inf),
                            xfinal=phi.copy(), fmin=float(fmin), feval=int(nfev), returnvalue=str(ret),
                            elapsed=stage2_time, ftol_rel=0.0, ftol_abs=0.0, xtol_abs=tol,
                            names=list(model.theta_names) + list(model.xnames), fitlog=log)
        optsum.stage1 = s1
        # -------------------------------------------------------- Hessian and standard errors
        t3 = time.perf_counter()
        objective, g = vg(phi)
        u = memo[phi.tobytes()][2]
        derivs, H = (_hessian(vg, phi, g, lower_phi, fd) if vcov_kind == "hessian" or check_derivatives
                     else (None, None))
        vsrc = "hessian"
        vcov = None
        if H is not None and p and vcov_kind == "hessian":
            free = derivs["free"]
            try:
                np.linalg.cholesky(H)
                Hinv = np.linalg.inv(H)
                fi = np.flatnonzero(free)
                bidx = [list(fi).index(nt + j) for j in range(p)]
                vcov = 2.0 * Hinv[np.ix_(bidx, bidx)]
            except np.linalg.LinAlgError:
                vcov = None
        if vcov is None:
            if p:
                vcov = eng.rx_vcov(theta, beta)
                vsrc = "RX"
                if H is not None and vcov_kind == "hessian":
                    msg = ("variance-covariance matrix computed from the finite-difference Hessian is not positive "
                           "definite: falling back to the one estimated from RX")
                    warnings.warn(msg, ConvergenceWarning, stacklevel=3)
            else:
                vcov = np.zeros((0, 0))
        hess_time = time.perf_counter() - t3

    b = eng.b_from_u(theta, u)

    def b_condvar():
        return eng.cond_cov_b(theta, beta)

    df = p + nt
    label = "fast" if nq == 0 else ("Laplace" if nq == 1 else f"AGQ({nq})")
    res = GlmmResults(model, label, objective, beta, vcov, theta, 1.0, b, b_condvar if condvar else None, optsum,
                      loglik=-objective / 2.0, df=df, dispersion=False, family=family, nagq=nq, rule=qrule,
                      vcov_source=vsrc)
    res.engine = eng
    res.hessian_kind = hessian
    if check_derivatives:
        check_convergence(res, derivs)
    if nq > 0:  # PIRLS at the estimates (also leaves the engine there for the conditional variances)
        final_state = eng.pirls(theta, beta, u0=u)
    if not final_state.converged:
        msg = (f"PIRLS did not converge at the estimates ({final_state.iterations} iterations): the conditional "
               "modes, and so the objective, may be inaccurate")
        res.warnings.append(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    if res.is_singular:
        msg = ("boundary (singular) fit: θ component(s) "
               + ", ".join(f"{n}={v:.3g}" for n, v, d in zip(model.theta_names, theta, np.isfinite(lower))
                           if d and v < 1e-4)
               + " at or within 1e-4 of 0")
        res.warnings.append(msg)
        warnings.warn(msg, SingularFitWarning, stacklevel=3)
    total = time.perf_counter() - t_start
    res.elapsed = total
    res.timing = {
        "total_s": total,
        "stage1_s": stage1_time,
        "stage2_s": stage2_time,
        "hessian_s": 0.0 if nq == 0 else hess_time,
        "pirls_iterations": eng.n_pirls,
        "pirls_iterations_stage1": pirls_stage1,
        "pirls_s": eng.t_pirls,
        "evaluations": eng.n_eval,
        "gradient_evaluations": eng.n_grad,
        "pirls_nonconverged": eng.nonconverged,  # evaluations (during the search) that hit the iteration cap
        "engine": type(eng).__name__,
    }
    return res


def _parse_start(start, model: Model) -> tuple[np.ndarray, np.ndarray | None]:
    theta0 = np.asarray(model.theta0, dtype=float)
    if start is None:
        return theta0, None
    if isinstance(start, dict):
        th = np.asarray(start.get("theta", theta0), dtype=float)
        be = start.get("beta")
        be = None if be is None else np.asarray(be, dtype=float)
    else:
        th, be = np.asarray(start, dtype=float), None
    if th.shape != theta0.shape:
        raise ValueError(f"start theta must have {theta0.size} values ({', '.join(model.theta_names)}), got {th.size}")
    if be is not None and be.shape != (model.p,):
        raise ValueError(f"start beta must have {model.p} values ({', '.join(model.xnames)}), got {be.size}")
    if np.any(th < model.lower):
        raise ValueError(f"start theta {th.tolist()} violates the lower bounds {model.lower.tolist()}")
    return th, be


class _Scaler:
    """φ = φ0 + M x: θ scaled by 1, β by (√2 R_X')⁻¹ so the β-Hessian is ≈ I in x."""

    def __init__(self, phi0: np.ndarray, nt: int, RX: np.ndarray, lower_theta: np.ndarray) -> None:
        self.phi0 = phi0.copy()
        self.nt = nt
        p = phi0.size - nt
        self.p = p
        C = np.sqrt(2.0) * RX.T if p else np.zeros((0, 0))  # upper triangular, C'C ≈ H_ββ
        if p and (not np.all(np.isfinite(C)) or np.any(np.abs(np.diag(C)) < 1e-12)):
            C = np.eye(p)
        self.C = C
        self.lower_phi = np.concatenate([lower_theta, np.full(p, -np.inf)])
        self.xlower = np.concatenate([lower_theta - phi0[:nt], np.full(p, -np.inf)])

    def to_phi(self, x: np.ndarray) -> np.ndarray:
        phi = self.phi0.copy()
        phi[: self.nt] += x[: self.nt]
        if self.p:
            phi[self.nt :] += np.linalg.solve(self.C, x[self.nt :]) if self.C.ndim == 2 else x[self.nt :]
        return phi

    def to_x(self, phi: np.ndarray) -> np.ndarray:
        x = phi - self.phi0
        if self.p:
            x[self.nt :] = self.C @ x[self.nt :]
        return x

    def grad_x(self, g_phi: np.ndarray) -> np.ndarray:
        """∂F/∂x = M' ∂F/∂φ."""
        gx = g_phi.copy()
        if self.p:
            gx[self.nt :] = np.linalg.solve(self.C.T, g_phi[self.nt :])
        return gx


def _lbfgs(vg, scaler: _Scaler, tol: float, maxiter: int, log: list | None):
    count = [0]
    best = {"f": np.inf, "x": np.zeros(scaler.phi0.size)}

    def fun(x):
        phi = scaler.to_phi(x)
        f, g = vg(phi)
        count[0] += 1
        if log is not None:
            log.append((phi.copy(), f))
        if not np.isfinite(f) or not np.all(np.isfinite(g)):
            return 1e300, np.zeros_like(x)
        if f < best["f"]:
            best["f"], best["x"] = f, x.copy()
        return f, scaler.grad_x(g)

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in scaler.xlower]
    r = so.minimize(fun, np.zeros(scaler.phi0.size), jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": maxiter, "ftol": 1e-15, "gtol": tol, "maxcor": 10})
    x = r.x if r.fun <= best["f"] else best["x"]
    return x, min(float(r.fun), best["f"]), count[0], str(r.message)


def _quasi_newton(vg, phi0: np.ndarray, RX: np.ndarray | None, nt: int, lower: np.ndarray, tol: float = 1e-5,
                  maxiter: int = 200, log: list | None = None, max_step: float = np.inf):
    """Stage 2: BFGS on the exact gradient, seeded with a nearly exact Hessian.

    The seed takes the θ rows (and, by symmetry, columns) from forward differences
    of the gradient (nθ evaluations) and the β block from the stage-1 fixed-effects
    factor, 2·R_X R_X' — close enough that the first steps are Newton steps. Steps
    are truncated at the θ bounds; the search stops when the quasi-Newton step is
    below ``tol`` standard errors in every coordinate. Returns ``"BOUND"`` when a
    bound becomes active (the caller finishes with L-BFGS-B).
    """
    n = phi0.size
    count = [0]

    def ev(phi):
        f, g = vg(phi)
        count[0] += 1
        if log is not None:
            log.append((phi.copy(), f))
        return f, g

    f, g = ev(phi0)
    if not (np.isfinite(f) and np.all(np.isfinite(g))):
        return phi0, f, count[0], "BOUND"
    B = np.zeros((n, n))
    if n > nt and RX is not None:
        B[nt:, nt:] = 2.0 * RX @ RX.T
    for j in range(nt):
        h = 1e-4 * max(1.0, abs(phi0[j]))
        e = np.zeros(n)
        e[j] = h
        gj = ev(phi0 + e)[1]
        B[j, :] = (gj - g) / h
    B[:, :nt] = B[:nt, :].T
    B[:nt, :nt] = 0.5 * (B[:nt, :nt] + B[:nt, :nt].T)
    try:
        ev_min = np.linalg.eigvalsh(B).min()
    except np.linalg.LinAlgError:
        ev_min = -1.0
    if not np.isfinite(ev_min) or ev_min <= 1e-8 * max(1.0, np.abs(B).max()):
        d = np.abs(np.diag(B))
        B = np.diag(np.where(d > 0, d, 1.0))
    x = phi0.copy()
    ret = "MAXITER"
    for _ in range(maxiter):
        try:
            step = -np.linalg.solve(B, g)
            Binv_diag = np.diag(np.linalg.inv(B))
        except np.linalg.LinAlgError:
            return x, f, count[0], "BOUND"
        se = np.sqrt(np.maximum(2.0 * Binv_diag, 1e-300))
        if np.max(np.abs(step) / se) < tol:
            ret = "CONVERGED"
            break
        slope = g @ step
        if slope >= 0:
            return x, f, count[0], "BOUND"
        t = min(1.0, max_step / max(float(np.max(np.abs(step))), 1e-300))  # trust region on the step
        neg = (step < 0) & np.isfinite(lower)
        if np.any(neg):
            gap = x - lower
            if np.any(neg & (gap < 1e-6)):
                return x, f, count[0], "BOUND"
            # a bounded parameter may lose at most 80 % of its distance to the bound per step
            room = np.where(neg, -0.8 * gap / np.where(neg, step, 1.0), np.inf)
            t = min(t, float(room.min()))
        for _ in range(40):
            xn = x + t * step
            fn, gn = ev(xn)
            if np.isfinite(fn) and fn <= f + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            ret = "LINESEARCH"
            break
        s, y = xn - x, gn - g
        sy = s @ y
        if sy > 1e-12 * np.linalg.norm(s) * np.linalg.norm(y):
            Bs = B @ s
            B = B + np.outer(y, y) / sy - np.outer(Bs, Bs) / (s @ Bs)
        x, f, g = xn, fn, gn
    return x, f, count[0], ret


def _hessian(vg, phi: np.ndarray, g: np.ndarray, lower: np.ndarray, fd: str = "forward"):
    """Finite differences of the exact gradient over the free parameters (θ off its bounds, β)."""
    free = ~(np.isfinite(lower) & (phi - lower < 1e-4 * np.maximum(1.0, np.abs(lower))))
    idx = np.flatnonzero(free)
    if idx.size == 0:
        return {"free": free, "gradient": np.zeros(0), "Hessian": np.zeros((0, 0))}, None
    H = np.zeros((idx.size, idx.size))
    for a, i in enumerate(idx):
        h = 1e-4 * max(1.0, abs(phi[i]))
        e = np.zeros_like(phi)
        e[i] = h
        gp = vg(phi + e)[1]
        if fd == "central" and not (np.isfinite(lower[i]) and phi[i] - h < lower[i]):
            gm = vg(phi - e)[1]
            H[:, a] = (gp[idx] - gm[idx]) / (2.0 * h)
        else:
            H[:, a] = (gp[idx] - g[idx]) / h
    H = 0.5 * (H + H.T)
    return {"free": free, "gradient": g[idx], "Hessian": H}, H


def _stage1_newton(fg, theta_start: np.ndarray, lower: np.ndarray, model: Model, final: bool,
                   keep_log: bool) -> OptSummary:
    """Stage 1 by quasi-Newton on the exact gradient, with θ on a log scale (scalar terms only).

    Variance components are far closer to quadratic in log θ (one Newton step from
    θ = 1 lands near the optimum where θ-scale steps overshoot to the bound). With
    vector-valued terms the off-diagonal θ has sign symmetries at the boundary and
    log-scale Newton steps can land in the wrong basin; those use L-BFGS-B on θ.
    Components that end below 1e-3 — a fit heading for the boundary — are finished
    by L-BFGS-B on the θ scale, which can reach the bound exactly.
    """
    t0 = time.perf_counter()
    nt = theta_start.size
    diag = np.isfinite(lower) & (lower == 0)
    logd = diag & (theta_start > 0)
    log: list = []

    def to_theta(psi):
        th = psi.copy()
        th[logd] = np.exp(psi[logd])
        return th

    def fg_psi(psi):
        th = to_theta(psi)
        f, g = fg(th)
        if keep_log:
            log.append((th.copy(), f))
        g = g.copy()
        g[logd] *= th[logd]
        return f, g

    psi0 = theta_start.astype(float).copy()
    psi0[logd] = np.log(theta_start[logd])
    lower_psi = np.where(logd, -np.inf, lower)
    psi, f, nf, ret = _quasi_newton(fg_psi, psi0, None, nt, lower_psi, tol=1e-4 if final else 1e-2, max_step=2.0)
    theta = to_theta(psi)
    if ret != "CONVERGED" or np.any(diag & (theta < 1e-3)):
        s1 = _minimize_theta(fg, theta, lower, model.theta_names, gtol=1e-6 if final else 1e-3, keep_log=keep_log)
        s1.feval += nf
        s1.x0 = theta_start
        s1.fitlog = log + s1.fitlog
        s1.optimizer = "quasi-Newton (log θ) + L-BFGS-B (exact gradient)"
        if f < s1.fmin:
            s1.xfinal, s1.fmin = theta, float(f)
        return s1
    return OptSummary(optimizer="quasi-Newton on log θ (exact gradient)", x0=theta_start, lower=lower,
                      upper=np.full(nt, np.inf), xfinal=theta, fmin=float(f), feval=nf, returnvalue=ret,
                      elapsed=time.perf_counter() - t0, ftol_rel=0.0, ftol_abs=0.0, xtol_abs=1e-5,
                      names=list(model.theta_names), fitlog=log)


def _minimize_theta(fg, theta0: np.ndarray, lower: np.ndarray, names: list[str], gtol: float,
                    keep_log: bool = False) -> OptSummary:
    """Stage 1: the nAGQ = 0 criterion over θ by L-BFGS-B on its exact gradient."""
    t0 = time.perf_counter()
    count = [0]
    best = {"f": np.inf, "x": theta0.copy()}
    log: list = []

    def fun(x):
        f, g = fg(x)
        count[0] += 1
        if keep_log:
            log.append((x.copy(), f))
        if not np.isfinite(f) or not np.all(np.isfinite(g)):
            return 1e300, np.zeros_like(x)
        if f < best["f"]:
            best["f"], best["x"] = f, x.copy()
        return f, g

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    r = so.minimize(fun, np.maximum(theta0, lower), jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": 500, "ftol": 1e-15, "gtol": gtol, "maxcor": 10})
    x, f = (r.x, float(r.fun)) if r.fun <= best["f"] else (best["x"], best["f"])
    return OptSummary(optimizer="L-BFGS-B (exact gradient)", x0=theta0, lower=lower, upper=np.full_like(lower, np.inf),
                      xfinal=np.asarray(x, dtype=float).copy(), fmin=f, feval=count[0], returnvalue=str(r.message),
                      elapsed=time.perf_counter() - t0, ftol_rel=0.0, ftol_abs=0.0, xtol_abs=gtol, names=list(names),
                      fitlog=log)


_GLMM_HINTS = {
    "reml": "REML is for linear mixed models (lmer); GLMMs are fitted by maximum likelihood",
    "REML": "REML is for linear mixed models (lmer); GLMMs are fitted by maximum likelihood",
}


def _glmm_keywords(options: dict[str, Any], func: str, nagq: Any, valid: tuple[str, ...] = ()) -> Any:
    """``nAGQ`` (lme4's spelling) -> nagq; other unknown keywords refused with the valid names."""
    options = dict(options)
    if "nAGQ" in options:
        val = options.pop("nAGQ")
        if nagq is not None and nagq != val:
            raise OptionError(f"{func}() got both nagq={nagq!r} and nAGQ={val!r}; give one")
        nagq = val
    import inspect

    known = [k for k in inspect.signature(fit_glmm).parameters if k not in ("model", "aliases")]
    check_keywords(options, [*known, *valid], func, _GLMM_HINTS)
    return nagq


def glmer(formula: str, data: pd.DataFrame, family: Any = "binomial", link: str | None = None,
          nagq: int | None = None, *, weights: Any = None, offset: Any = None, **options: Any) -> GlmmResults:
    """glmer(formula, data, family="binomial", link=None, nagq=None, *, weights=None, offset=None, **options) -> GlmmResults

    Fit a generalized linear mixed model by maximum likelihood, as lme4's ``glmer``.

    Parameters
    ----------
    formula : str
        lme4 formula; binomial responses may be 0/1, bool, a two-level factor,
        ``cbind(successes, failures)`` or proportions with ``weights``.
    data : pandas.DataFrame
        Not modified. Rows with missing values are dropped (with a counted warning).
    family : str or Family
        ``"binomial"`` (default) or ``"poisson"``, or a :class:`~stochmm.builder.families.Family`.
    link : str, optional
        ``"logit"`` (default), ``"probit"``, ``"cloglog"`` for binomial; ``"log"`` for Poisson.
    nagq : int, optional
        0: nAGQ = 0 (fast); 1: Laplace (the default); 2 … 25: adaptive Gauss–Hermite
        quadrature with ``nagq`` nodes per random effect (single grouping factor;
        vector-valued random effects allowed). ``nAGQ=`` is accepted for it.
    weights, offset : str or array-like, optional
        Prior weights (binomial proportions: number of trials) and an offset.
    **options
        Passed to :func:`fit_glmm`: ``method`` (``"laplace"``, ``"agq"``, ``"fast"``;
        with ``nagq`` when ``"agq"``), ``optimizer``, ``hessian``, ``rule``, ``max_nodes``,
        ``start``, ``check_derivatives``, ... Unknown names are refused with the list
        of valid ones.

    Returns
    -------
    GlmmResults

    Examples
    --------
    >>> import stochmm as sm
    >>> cbpp = sm.datasets.load("cbpp")
    >>> fit = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp)
    >>> round(fit.objective, 3), np.round(fit.theta, 3).tolist()
    (184.053, [0.642])
    >>> round(sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, nagq=25).lme4_objective, 3)
    100.01
    """
    nagq = _glmm_keywords(options, "glmer", nagq)
    method = options.pop("method", None)
    _resolve_method(method, nagq)  # bad method/nagq refused before the model is built
    fam = get_family(family, link)
    model = Model(formula, data, family=fam, weights=weights, offset=offset)
    return fit_glmm(model, method=method, nagq=nagq, **options)

