"""Adaptive Gauss–Hermite quadrature (stochmm.deterministic.quadrature).

Reference numbers:
* tests/reference/lme4_devfun_points.json, cbpp_agq25: lme4 1.1-31's 25-point AGQ deviance at
  fixed (θ, β), with the saturated term restored (``value_abs``) and an independent 50-node
  AGQ (``numint_minus2logLik``);
* tests/reference/lme4_glmm_extra.json, glmmadaptive_slopes: an independent plain-R 2-D adaptive
  GH (models/reference/make_glmm_refs.R) at fixed parameters for 1–40 nodes per dimension.
"""

from __future__ import annotations

import json
from math import factorial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stochmm as sm
from stochmm.builder.families import get_family
from stochmm.deterministic.pirls import LevelEngine
from stochmm.deterministic.quadrature import QuadratureError, agq, gh_rule, make_rule, sparse_rule, tensor_rule

REF = Path(__file__).resolve().parents[1] / "reference"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


def _normal_moment(k: int) -> float:
    return 0.0 if k % 2 else factorial(k) / (2 ** (k // 2) * factorial(k // 2))


def test_gh_rule_is_exact_to_degree_2n_minus_1():
    for n in (1, 2, 5, 11, 25):
        z, w = gh_rule(n)
        assert w.sum() == pytest.approx(1.0, abs=1e-14)
        for k in range(2 * n):
            scale = float(w @ np.abs(z) ** k)
            assert float(w @ z**k) == pytest.approx(_normal_moment(k), rel=1e-9, abs=1e-13 * scale), (n, k)


def test_tensor_and_sparse_rules():
    t = tensor_rule(4, 3)
    assert t.size == 64 and t.dim == 3
    # product moments E[z1^6 z2^4 z3^2] = 15 * 3 * 1
    assert float(t.weights @ (t.nodes[:, 0] ** 6 * t.nodes[:, 1] ** 4 * t.nodes[:, 2] ** 2)) == pytest.approx(45.0)
    s = sparse_rule(5, 4)
    assert s.size < tensor_rule(5, 4).size  # 385 < 625 nodes
    assert s.weights.sum() == pytest.approx(1.0)
    # exact for total degree 2·5 − 1 = 9
    mom = s.weights @ (s.nodes[:, 0] ** 4 * s.nodes[:, 1] ** 2 * s.nodes[:, 2] ** 2)
    assert float(mom) == pytest.approx(3.0, rel=1e-10)


def test_rule_guard_counts_nodes():
    with pytest.raises(QuadratureError, match="15625 nodes per level"):
        make_rule(25, 3, max_nodes=10_000)
    with pytest.raises(QuadratureError, match="sparse-grid rule of level 9 in 5 dimensions has 28553 nodes"):
        make_rule(9, 5, rule="sparse", max_nodes=10_000)
    assert make_rule(9, 2).size == 81
    with pytest.raises(ValueError):
        make_rule(0, 1)


@pytest.fixture(scope="module")
def cbpp_engine():
    m = sm.Model(CBPP, sm.datasets.load("cbpp"), family="binomial")
    return LevelEngine(m, get_family("binomial"))


def test_agq25_matches_lme4_devfun_with_saturated_term(cbpp_engine):
    pts = json.loads((REF / "lme4_devfun_points.json").read_text())["cbpp_agq25"]
    sat = pts["saturated_minus2logLik"]  # 83.9567075378711: lme4's nAGQ > 1 deviance omits it
    for pt in pts["points"]:
        th, be = np.array(pt["params"][:1]), np.array(pt["params"][1:])
        val = agq(cbpp_engine, th, be, tensor_rule(25, 1))[0]
        assert val == pytest.approx(pt["value_abs"], abs=1e-8), pt["label"]
        assert val - sat == pytest.approx(pt["value"], abs=1e-8)
        assert val == pytest.approx(pt["numint_minus2logLik"], abs=1e-6)


def test_one_node_is_laplace(cbpp_engine):
    th, be = np.array([1.0]), np.array([-1.0, -1.0, -1.0, -1.0])
    v1, g1 = agq(cbpp_engine, th, be, tensor_rule(1, 1), grad=True)
    vl, gl = cbpp_engine.laplace(th, be, grad=True)
    assert v1 == pytest.approx(vl, abs=1e-10)
    np.testing.assert_allclose(g1, gl, rtol=1e-8, atol=1e-9)


def test_poisson_agq_matches_independent_quadrature():
    # lme4_extra_results.json cbpp_pois_agq25: 50-node independent AGQ at lme4's estimates (log y! included)
    e = {r["id"]: r for r in json.loads((REF / "lme4_extra_results.json").read_text())}["cbpp_pois_agq25"]["results"]
    m = sm.Model("incidence ~ period + offset(log(size)) + (1 | herd)", sm.datasets.load("cbpp"), family="poisson")
    eng = LevelEngine(m, get_family("poisson"))
    th, be = np.array(list(e["theta"].values())), np.array(list(e["fixef"].values()))
    val = agq(eng, th, be, tensor_rule(25, 1))[0]
    assert val == pytest.approx(e["independent_at_estimates"]["numint_minus2logLik"], abs=1e-7)
    assert val == pytest.approx(e["minus2logLik_abs"], abs=1e-6)


@pytest.fixture(scope="module")
def slopes():
    d = json.loads((REF / "lme4_glmm_extra.json").read_text())["glmmadaptive_slopes"]
    D = d["data"]
    df = pd.DataFrame(dict(id=pd.Categorical([str(i) for i in D["id"]], categories=[str(i) for i in range(1, 101)]),
                           time=D["time"], sex=pd.Categorical(D["sex"], categories=["male", "female"]), y=D["y"]))
    m = sm.Model("y ~ sex * time + (time | id)", df, family="binomial")
    return d, m, LevelEngine(m, get_family("binomial"))


def _theta(sd, corr):
    return np.array([sd[0], sd[1] * corr, sd[1] * np.sqrt(1 - corr * corr)])


def test_vector_agq_converges_to_independent_quadrature(slopes):
    # independent plain-R 2-D AGQ (b-space Cholesky scaling) at fixed parameters: the integrals agree once
    # converged (25, 40 nodes per dimension); one node is the exact Laplace value in any scaling
    d, m, eng = slopes
    for key in ("independent_agq_at_glmmadaptive_estimates", "independent_agq_at_tmb_estimates"):
        e = d[key]
        th, be = _theta(e["sd"], e["corr"]), np.array(e["beta"])
        vals = {v["nodes_per_dim"]: v["minus2logLik"] for v in e["values"]}
        assert agq(eng, th, be, tensor_rule(1, 2))[0] == pytest.approx(vals[1], abs=1e-8)
        assert agq(eng, th, be, tensor_rule(25, 2))[0] == pytest.approx(vals[25], abs=1e-5)
        if 40 in vals:
            assert agq(eng, th, be, tensor_rule(40, 2))[0] == pytest.approx(vals[40], abs=1e-6)
    # GLMMadaptive 0.5.26 published log-Lik −358.8142 at its (rounded) estimates with 11 points per dimension:
    # our 11-point rule is scaled in the spherical u-space, theirs in b-space (a rotation of the nodes), so
    # the 11-point values differ by the rule error, 0.007, while the converged integrals agree
    e = d["independent_agq_at_glmmadaptive_estimates"]
    v11 = agq(eng, _theta(e["sd"], e["corr"]), np.array(e["beta"]), tensor_rule(11, 2))[0]
    assert abs(v11 - (-2 * d["glmmadaptive_published"]["logLik"])) < 0.01


@pytest.mark.parametrize("rule", [tensor_rule(1, 2), tensor_rule(5, 2), sparse_rule(5, 2)], ids=["t1", "t5", "s5"])
def test_vector_agq_gradient_matches_finite_differences(slopes, rule):
    d, m, eng = slopes
    phi = np.array([0.6, 0.15, 0.15, -2.0, -1.1, 0.25, 0.0])

    def f(x):
        return agq(eng, x[:3], x[3:], rule)[0]

    v, g = agq(eng, phi[:3], phi[3:], rule, grad=True)
    fd = np.array([(f(phi + e) - f(phi - e)) / 2e-5 for e in np.eye(7) * 1e-5])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5)


def test_scalar_fast_path_equals_general_path(cbpp_engine):
    th, be = np.array([0.8]), np.array([-1.2, -1.0, -1.1, -1.5])
    for n in (3, 25):
        v1, g1 = agq(cbpp_engine, th, be, tensor_rule(n, 1), grad=True)
        v2, g2 = agq(cbpp_engine, th, be, tensor_rule(n, 1), grad=True, max_chunk=10)  # general, chunked
        assert v1 == pytest.approx(v2, abs=1e-10)
        np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-10)


def test_rules_stop_at_lme4s_nagq_ceiling():
    from stochmm.deterministic.quadrature import MAX_NAGQ

    assert MAX_NAGQ == 25 and make_rule(25, 1).size == 25
    z, w = gh_rule(25)
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    with pytest.raises(QuadratureError, match="above the ceiling of 25"):
        make_rule(26, 1)
