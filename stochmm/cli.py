"""Command line: ``stochmm demo`` and ``stochmm validate``.

``stochmm demo``      fits real models on the bundled data and prints lme4-style summaries,
                      with each headline number next to lme4's pinned value.
``stochmm validate``  fits every model of the ``models/`` catalogue and prints ours vs the
                      reference with the differences; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import pandas as pd

__all__ = ["main"]


def _rule(title: str) -> None:
    print("\n" + "=" * 100 + f"\n{title}\n" + "=" * 100)


def _versus(fit, entry_id: str) -> None:
    try:
        from .catalogue import compare, load_catalogue

        entry = next(e for e in load_catalogue() if e.id == entry_id)
    except (FileNotFoundError, StopIteration):
        return
    cmp = compare(entry, fit)
    print(f"\nAgainst {entry.source}:")
    for _, r in cmp.iterrows():
        print(f"  {r['quantity']:<34s} ours {r['ours']:>16.8g}   reference {r['reference']:>16.8g}   "
              f"diff {r['difference']:+.2e}   {'ok' if r['pass'] else 'FAIL'} {r['note']}")


def demo(args: argparse.Namespace) -> int:
    import stochmm as sm

    from .results import format_coef_table

    _rule("sleepstudy: Reaction ~ Days + (Days | Subject), REML")
    d = sm.datasets.load("sleepstudy")
    t0 = time.perf_counter()
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", d)
    el = time.perf_counter() - t0
    print(fit.summary())
    print(f"\nfit in {el * 1000:.1f} ms ({fit.optsum.feval} deviance evaluations)")
    _versus(fit, "sleepstudy_slopes_REML")
    print("\nConditional modes (first 5 subjects) with conditional SDs:")
    print(fit.ranef_table().head(5).to_string(index=False))

    _rule("Dyestuff2: Yield ~ 1 + (1 | Batch), ML  (a singular fit)")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fit = sm.lmer("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff2"), reml=False)
    for x in w:
        print(f"warning: {x.message}")
    print(fit.varcorr.to_string(index=False))
    _versus(fit, "dyestuff2_ML")

    _rule("InstEval: y ~ service * dept + (1 | s) + (1 | d), ML  (73,421 ratings, 2,972 x 1,128 crossed)")
    d = sm.datasets.load("insteval")
    t0 = time.perf_counter()
    fit = sm.lmer("y ~ service * dept + (1 | s) + (1 | d)", d, reml=False)
    el = time.perf_counter() - t0
    text = str(fit.summary()).split("\nFixed effects:")[0]
    print(text)
    print(f"\nFixed effects (first 6 of {len(fit.fixef)}):")
    print(format_coef_table(fit.coef_table().head(6)))
    print(f"\nwhole call (DataFrame -> fitted model) in {el:.2f} s ({fit.optsum.feval} deviance evaluations)")
    _versus(fit, "insteval_ML")

    try:
        from .deterministic.glmm import glmer  # noqa: F401  (GLMM path, when present)
    except ImportError:
        return 0
    _rule("cbpp: cbind(incidence, size - incidence) ~ period + (1 | herd), binomial: Laplace vs AGQ(25)")
    d = sm.datasets.load("cbpp")
    f1 = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", d, family="binomial")
    print(f1.summary())
    f25 = sm.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", d, family="binomial", nagq=25)
    print("\n            Laplace       AGQ(25)")
    print(f"loglik  {f1.loglik:12.4f}  {f25.loglik:12.4f}")
    for n, a, b in zip(f1.fixef.index, f1.fixef.values, f25.fixef.values):
        print(f"{n:<11s} {a:9.5f}  {b:12.5f}")
    print(f"theta   {f1.theta[0]:12.5f}  {f25.theta[0]:12.5f}")
    _versus(f1, "cbpp_laplace")
    _versus(f25, "cbpp_agq25")

    _rule("VerbAgg: r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), binomial, Laplace (316 x 24 crossed)")
    d = sm.datasets.load("verbagg")
    t0 = time.perf_counter()
    fv = sm.glmer("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", d, family="binomial")
    el = time.perf_counter() - t0
    print(format_coef_table(fv.coef_table()))
    print(fv.varcorr.to_string(index=False))
    print(f"\nwhole call in {el * 1000:.0f} ms")
    _versus(fv, "verbagg_laplace")

    _rule("cbpp, the stochastic half: how good is Laplace? (importance sampling at the estimates, AGQ refit)")
    print(f1.check_approximation(draws=4000, seed=1))
    print()
    print(sm.compare_likelihoods(f1, seed=1).round(5).to_string(index=False))

    _rule("cbpp posterior of the same model: NumPyro NUTS, 4 x 500 draws")
    t0 = time.perf_counter()
    post = sm.sample("cbind(incidence, size - incidence) ~ period + (1 | herd)", sm.datasets.load("cbpp"), family="binomial",
                     draws=500, warmup=500, chains=4, seed=1, progress=False)
    el = time.perf_counter() - t0
    print(post.summary())
    print(f"\n{post.sampler}; whole call (compilation included) in {el:.1f} s")

    _rule("VerbAgg: the Laplace log-likelihood against importance sampling (crossed: joint proposal)")
    t0 = time.perf_counter()
    ll = fv.model.loglik(fv, method="is", draws=2000, seed=1)
    el = time.perf_counter() - t0
    print(f"log-likelihood at the Laplace estimates: Laplace {fv.loglik:.3f}, importance sampling {ll.value:.3f} "
          f"(MC SE {ll.mcse:.3f}, k-hat {ll.khat:.2f}, {ll.draws} draws, {el:.1f} s)")
    print(f"-2 log-likelihood: Laplace is {2 * (ll.value - fv.loglik):+.2f} off")

    _rule("Oats split-plot by moments: ANOVA table with expected mean squares")
    a = sm.anova_components("yield ~ nf * Variety + (1 | Block/Variety)", sm.datasets.load("oats"))
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(a.table[["df", "SS", "MS", "EMS", "F"]].round(3).to_string())
    print("\nvariance components (method of moments):", a.varcomp.round(4).to_dict())
    reml = sm.lmer("yield ~ nf * Variety + (1 | Block/Variety)", sm.datasets.load("oats"))
    vc = reml.varcorr.set_index("group")["variance"]
    print("variance components (REML, sm.lmer):     ", vc.round(4).to_dict())
    return 0


def validate_cmd(args: argparse.Namespace) -> int:
    import pandas as pd

    from .catalogue import validate

    with pd.option_context("display.width", 200):
        table = validate(args.dir, ids=args.ids or None)
    n_fail = int((~table["pass"].astype(bool)).sum())
    print(f"\n{len(table) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


def main(argv: list[str] | None = None) -> int:
    """main(argv=None) -> int: entry point of the ``stochmm`` command."""
    p = argparse.ArgumentParser(prog="stochmm", description="Mixed-effects models: lme4-grade fits in Python.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="fit real models on bundled data and print lme4-style summaries")
    v = sub.add_parser("validate", help="fit the models/ catalogue and compare with the reference values")
    v.add_argument("ids", nargs="*", help="catalogue ids to run (default: all)")
    v.add_argument("--dir", default=None, help="catalogue directory (default: ./models)")
    args = p.parse_args(argv)
    np.set_printoptions(linewidth=120)
    if args.cmd == "demo":
        return demo(args)
    return validate_cmd(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
