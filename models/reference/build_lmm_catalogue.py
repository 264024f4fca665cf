"""Write the LMM entries of models/*.toml from the pinned lme4 reference JSON.

Run from the repository root:  python models/reference/build_lmm_catalogue.py
The JSON files (tests/reference/) came from lme4 1.1-31 (shared reference set, and
models/reference/make_extra_refs.R for the extra models).
"""

import json
from pathlib import Path

from stochmm.catalogue import to_toml

ROOT = Path(__file__).resolve().parents[2]
refs = {}
for f in ("lme4_results.json", "lme4_extra_results.json"):
    for r in json.loads((ROOT / "tests" / "reference" / f).read_text()):
        refs[r["id"]] = r

LMM = [
    ("sleepstudy_slopes_REML", "sleepstudy", "Reaction ~ Days + (Days | Subject)", "Random intercepts and slopes, correlated."),
    ("sleepstudy_slopes_ML", "sleepstudy", "Reaction ~ Days + (Days | Subject)", "Random intercepts and slopes, ML."),
    ("sleepstudy_dblbar_ML", "sleepstudy", "Reaction ~ Days + (Days || Subject)", "Uncorrelated intercept and slope (||)."),
    ("sleepstudy_intercept_REML", "sleepstudy", "Reaction ~ Days + (1 | Subject)", "Random intercepts only."),
    ("dyestuff_ML", "dyestuff", "Yield ~ 1 + (1 | Batch)", "One-way random effects, ML."),
    ("dyestuff_REML", "dyestuff", "Yield ~ 1 + (1 | Batch)", "One-way random effects, REML."),
    ("dyestuff2_ML", "dyestuff2", "Yield ~ 1 + (1 | Batch)", "Singular fit: batch variance estimated as 0."),
    ("pastes_nested_ML", "pastes", "strength ~ 1 + (1 | batch/cask)", "Nested: cask within batch."),
    ("pastes_nested_REML", "pastes", "strength ~ 1 + (1 | batch/cask)", "Nested: cask within batch, REML."),
    ("penicillin_crossed_ML", "penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "Fully crossed plate x sample."),
    ("penicillin_crossed_REML", "penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "Fully crossed, REML."),
    ("oats_splitplot_REML", "oats", "yield ~ nf * Variety + (1 | Block/Variety)", "Split-plot: varieties on whole plots within blocks."),
    ("insteval_ML", "insteval", "y ~ service * dept + (1 | s) + (1 | d)", "Large crossed design: 2972 students x 1128 lecturers."),
    ("insteval_REML", "insteval", "y ~ service * dept + (1 | s) + (1 | d)", "Large crossed design, REML."),
]

for mid, ds, formula, desc in LMM:
    r = refs[mid]
    res = r["results"]
    reml = bool(r["REML"])
    entry = {
        "id": mid,
        "dataset": ds,
        "formula": formula,
        "family": "gaussian",
        "method": "REML" if reml else "ML",
        "source": f"lme4 1.1-31, {'REML' if reml else 'ML'}: {r['call']}",
        "description": desc,
        "reference": {
            "objective": res["objective"],
            "loglik": res["logLik"],
            "sigma": res["sigma"],
            "theta": list(res["theta"].values()),
            "theta_names": list(res["theta"].keys()),
            "is_singular": bool(res["isSingular"]),
            "fixef": res["fixef"],
            "se": res["se"],
        },
    }
    (ROOT / "models" / f"{mid}.toml").write_text(to_toml(entry))
    print("wrote", mid)
