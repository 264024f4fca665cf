"""Moment fits on Dask DataFrames (a dask.distributed LocalCluster) and parquet files.

The Dask path reduces each partition to sufficient statistics and combines them
exactly, so every number must equal the in-memory (pandas) fit to round-off.
"""

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.errors import DesignError, MissingColumnError, MissingDataWarning, RankDeficiencyWarning

dask = pytest.importorskip("dask")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl:
        with distributed.Client(cl) as c:
            yield c


def make_oneway(seed=0, G=300):
    rng = np.random.default_rng(seed)
    N = 1 + rng.poisson(5, G)
    g = np.repeat(np.arange(G), N)
    n = len(g)
    trt = rng.choice(["ctl", "low", "high"], n)
    x = rng.normal(size=n)
    y = 3 + 0.5 * x + (trt == "high") + rng.normal(0, 1, G)[g] + rng.normal(0, 0.8, n)
    df = pd.DataFrame({"y": y, "x": x, "trt": pd.array(trt, dtype=object), "g": [f"c{i}" for i in g],
                       "unused": "zzz"})
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # clusters split over partitions


def gen_crossed(i, n=4000, La=100, Lb=40):
    """Partition i of a crossed data set; levels of `a` live in one partition only."""
    rng = np.random.default_rng(i)
    a = rng.integers(0, La, n)
    b = rng.integers(0, Lb, n)
    beff = np.random.default_rng(123).normal(0, 0.7, Lb)  # the same b effects in every partition
    x = rng.normal(size=n)
    y = 1 + 2 * x + rng.normal(0, 1, La)[a] + beff[b] + rng.normal(0, 0.5, n)
    return pd.DataFrame({"y": y, "x": x, "a": a + i * La, "b": b})


def assert_same(f1, f2, rel=1e-9):
    assert f1.varcomp.index.tolist() == f2.varcomp.index.tolist()
    assert f1.varcomp.to_numpy() == pytest.approx(f2.varcomp.to_numpy(), rel=rel)
    assert f1.fixef.index.tolist() == f2.fixef.index.tolist()
    assert f1.fixef.to_numpy() == pytest.approx(f2.fixef.to_numpy(), rel=rel)
    assert f1.se.to_numpy() == pytest.approx(f2.se.to_numpy(), rel=rel)


@pytest.mark.parametrize("method", ["matloff", "anova"])
def test_oneway_dask_equals_pandas(client, method):
    df = make_oneway()
    ddf = dd.from_pandas(df, npartitions=5)
    f = "y ~ x + trt + (1 | g)"
    pdf_fit = sm.mom(f, df, method=method)
    dask_fit = sm.mom(f, ddf, method=method)
    assert dask_fit.info["backend"] == "dask" and dask_fit.info["npartitions"] == 5
    assert dask_fit.info["max_partitions_per_cluster"] > 1  # clusters really were split
    assert_same(dask_fit, pdf_fit)
    assert dask_fit.varcomp_se.to_numpy() == pytest.approx(pdf_fit.varcomp_se.to_numpy(), rel=1e-6)
    se = sm.mom(f, ddf, method=method, size_effect=True)
    assert_same(se, sm.mom(f, df, method=method, size_effect=True))


def test_oneway_dask_missing_values_and_rank(client):
    df = make_oneway(1)
    df.loc[[3, 50, 99], "y"] = np.nan
    df.loc[7, "g"] = None
    df["x2"] = 2 * df["x"]
    with pytest.warns(MissingDataWarning), pytest.warns(RankDeficiencyWarning):
        ref = sm.mom("y ~ x + x2 + (1 | g)", df, se=None)
    with pytest.warns(MissingDataWarning, match="4 of"), pytest.warns(RankDeficiencyWarning, match="x2"):
        fit = sm.mom("y ~ x + x2 + (1 | g)", dd.from_pandas(df, npartitions=4), se=None)
    assert fit.nobs == ref.nobs == len(df) - 4
    assert_same(fit, ref)


def test_crossed_dask_equals_pandas_unaligned_and_aligned(client):
    ie = sm.datasets.load("insteval")
    for f in ["y ~ 1 + (1 | s) + (1 | d)", "y ~ service + lectage + (1 | s) + (1 | d)"]:
        ref = sm.mom(f, ie)
        fit = sm.mom(f, dd.from_pandas(ie, npartitions=6))
        assert fit.info["cells_exact"] == "global groupby"
        assert_same(fit, ref, rel=1e-8)
    ddf = dd.from_map(gen_crossed, range(6))
    fit = sm.mom("y ~ x + (1 | a) + (1 | b)", ddf)
    assert fit.info["cells_exact"] == "partition-aligned"
    ref = sm.mom("y ~ x + (1 | a) + (1 | b)", ddf.compute())
    assert_same(fit, ref, rel=1e-8)
    assert fit.ngroups == {"a": 600, "b": 40}
    assert fit.varcomp.to_numpy() == pytest.approx([1.0, 0.49, 0.25], rel=0.25)


def test_fit_parquet(client, tmp_path):
    df = make_oneway(2)
    df.to_parquet(tmp_path / "part0.parquet")
    make_oneway(3).assign(g=lambda d: d["g"] + "b").to_parquet(tmp_path / "part1.parquet")
    both = pd.concat([df, make_oneway(3).assign(g=lambda d: d["g"] + "b")], ignore_index=True)
    fit = sm.moments.fit_parquet(str(tmp_path), "y ~ x + (1 | g)", method="anova")
    assert_same(fit, sm.mom("y ~ x + (1 | g)", both, method="anova"))
    pen = sm.datasets.load("penicillin")
    pen.to_parquet(tmp_path / "pen.parquet")
    fit = sm.moments.fit_parquet(str(tmp_path / "pen.parquet"), "diameter ~ 1 + (1 | plate) + (1 | sample)")
    assert_same(fit, sm.mom("diameter ~ 1 + (1 | plate) + (1 | sample)", pen))


def test_software_alchemy_on_partitions(client):
    parts = [make_oneway(10 + i, G=200).assign(g=lambda d, i=i: d["g"] + f"p{i}") for i in range(4)]
    ddf = dd.from_delayed([dask.delayed(p) for p in parts], meta=parts[0])
    fit = sm.mom("y ~ x + (1 | g)", ddf, alchemy=True)
    each = np.array([np.r_[sm.mom("y ~ x + (1 | g)", p, se=None).varcomp_raw.to_numpy()] for p in parts])
    assert fit.chunks.shape[0] == 4
    assert fit.varcomp_raw.to_numpy() == pytest.approx(each.mean(axis=0), rel=1e-9)
    assert fit.varcomp_se.to_numpy() == pytest.approx(each.std(axis=0, ddof=1) / 2, rel=1e-9)
    exact = sm.mom("y ~ x + (1 | g)", ddf, se=None)
    assert fit.varcomp.to_numpy() == pytest.approx(exact.varcomp.to_numpy(), rel=0.1)
    crossed = sm.mom("y ~ x + (1 | a) + (1 | b)", dd.from_map(gen_crossed, range(4)), alchemy=True)
    assert crossed.varcomp.to_numpy() == pytest.approx([1.0, 0.49, 0.25], rel=0.3)


def test_cluster_bootstrap_on_dask(client):
    df = make_oneway(4)
    fit = sm.mom("y ~ x + (1 | g)", dd.from_pandas(df, npartitions=3), se="bootstrap", nboot=100, seed=1,
                 progress=False)
    ref = sm.mom("y ~ x + (1 | g)", df)
    assert fit.boot.shape == (100, 4)
    assert fit.varcomp_se.to_numpy() == pytest.approx(ref.varcomp_se.to_numpy(), rel=0.35)


def test_dask_bad_input(client):
    ddf = dd.from_pandas(sm.datasets.load("sleepstudy"), npartitions=2)
    with pytest.raises(MissingColumnError):
        sm.mom("Reaction ~ days + (1 | Subject)", ddf)
    with pytest.raises(DesignError, match="random intercepts"):
        sm.mom("Reaction ~ Days + (Days | Subject)", ddf)
    with pytest.raises(DesignError, match="not available for two crossed"):
        sm.mom("y ~ 1 + (1 | s) + (1 | d)", dd.from_pandas(sm.datasets.load("insteval"), npartitions=2),
               se="bootstrap")
