"""Coverage of the bootstrap percentile and the profile interval of a between-group SD (issue 11: "the
percentile interval of an SD covers like the profile interval on a simulated design").

Balanced one-way design with 40 groups x 5 (sd_b = sigma = 1, REML fits), the SAME simulated data sets for
both intervals, so the difference in coverage is judged by its paired Monte Carlo SE (sd of the paired
differences of the hit indicators / sqrt(nrep)). With 12 groups the percentile interval undercovers
(benchmarks/bench_inference.py --coverage: 0.911 vs 0.932, paired difference -0.021 +- 0.007); on the larger
design the claim holds at the 3-MC-SE level, though not by a wide margin (measured: profile 0.948, percentile
0.935, paired difference -0.013 +- 0.005, i.e. 2.6 paired SEs; 19 vs 6 discordant pairs), so a residual
undercoverage of the percentile interval of about one point is plausible even with 40 groups; with 80
groups (500 data sets) the gap is -0.004 +- 0.006 (profile 0.936, percentile 0.932).
1,000 data sets so the paired comparison has power (SE 0.005); marked slow (10 minutes on 2 idle cores,
21 minutes measured with a load average of 5-8): run with ``pytest -m slow``."""

import warnings

import numpy as np
import pandas as pd
import pytest

import stochmm as sm

# the 40 x 5 design of benchmarks/bench_inference.py --coverage (same seed and draws: the same 1,000 data sets)
GROUPS, PER, NREP, NBOOT, SEED = 40, 5, 1000, 500, 2026 + 40
SD = "sd_(Intercept)|g"


@pytest.mark.slow
def test_percentile_interval_of_an_sd_covers_like_the_profile_interval():
    rng = np.random.default_rng(SEED)
    idx = np.repeat(np.arange(GROUPS), PER)
    g = idx.astype(str)
    prof, perc = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(NREP):
            y = 10 + 1.0 * rng.standard_normal(GROUPS)[idx] + 1.0 * rng.standard_normal(idx.size)
            fit = sm.lmer("y ~ 1 + (1 | g)", pd.DataFrame({"y": y, "g": g}))
            a, b = fit.profile(which=SD).confint().loc[SD]
            prof.append(a <= 1.0 <= b)
            a, b = fit.bootstrap(nsim=NBOOT, seed=int(rng.integers(1 << 31)), progress=False).confint().loc[SD]
            perc.append(a <= 1.0 <= b)
    prof, perc = np.asarray(prof, float), np.asarray(perc, float)
    d = perc - prof
    se_d = d.std(ddof=1) / np.sqrt(NREP)
    assert abs(d.mean()) <= 3 * se_d, (perc.mean(), prof.mean(), se_d)
    for c in (prof.mean(), perc.mean()):
        assert abs(c - 0.95) <= 3 * np.sqrt(0.95 * 0.05 / NREP), (prof.mean(), perc.mean())
