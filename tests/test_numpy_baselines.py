"""Cross-checks of the numpy baselines in benchmarks/ against theory, scipy and the engine.

The benchmark's ratios only mean something if the baselines compute the same
thing as the engine.  Here: least-squares moments with closed forms, the
logistic Newton solver against scipy.optimize, and (a few small cases) the
engine's per-generation variance ratio and MSE, each within 5 standard errors.
Fixed seeds make every check deterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import collapse_jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import numpy_baselines as nb  # noqa: E402

Z = 5.0  # tolerance in standard errors


def _summary(cfg, res) -> collapse_jax.Summary:
    delta = res.thetas.astype(np.float64) - cfg.theta0_vector
    return collapse_jax.summarize(collapse_jax.block_moments(delta, res.ok))


def _assert_within(value, se, expected, what):
    value, se, expected = (np.asarray(a, np.float64) for a in (value, se, expected))
    assert np.all(np.isfinite(value)) and np.all(se > 0), what
    z = np.abs(value - expected) / se
    assert np.all(z < Z), f"{what}: |z| = {np.round(z, 2)}, values {value}, expected {expected}"


def _config(**kw) -> collapse_jax.SimulationConfig:
    base = dict(model="ols", n=30, d=3, generations=8, trajectories=4000, seed=3)
    return collapse_jax.SimulationConfig(**{**base, **kw})


# -- least squares against closed forms -------------------------------------


@pytest.mark.parametrize("draw", ["auto", "data"])
def test_ols_fresh_discard_ratio_is_g(draw):
    """Fresh-design discard: theta_g - theta0 is a sum of g i.i.d. OLS errors.

    So Var ratio = g exactly, and E||theta_g - theta0||^2 = g sigma^2 d / (n - d - 1)
    (E (X^T X)^{-1} = I / (n - d - 1) for Gaussian X).
    """
    cfg = _config(workflow="discard", design="fresh", draw=draw, sigma=1.5)
    res = nb.simulate_vectorized(cfg)
    assert res.thetas.shape == (cfg.trajectories, cfg.generations, cfg.d)
    assert res.ok.all()
    s = _summary(cfg, res)
    g = np.arange(1, cfg.generations + 1)
    _assert_within(s.variance_ratio[1:], s.variance_ratio_se[1:], g[1:], "variance ratio")
    unit = cfg.sigma**2 * cfg.d / (cfg.n - cfg.d - 1)
    _assert_within(s.mse, s.mse_se, g * unit, "mse")


@pytest.mark.parametrize("draw", ["auto", "data"])
@pytest.mark.parametrize("workflow", ["discard", "augment"])
def test_ols_fixed_design_mse(workflow, draw):
    """One shared design X: theta_g - theta_{g-1} = A eps_g (discard) or A eps_g / g (augment).

    With A = (X^T X)^{-1} X^T: MSE_g = sigma^2 tr((X^T X)^{-1}) * g (discard)
    and sigma^2 tr((X^T X)^{-1}) * sum_{i<=g} 1/i^2 (augment).
    """
    cfg = _config(workflow=workflow, design="fixed", draw=draw)
    x = np.random.default_rng(11).standard_normal((cfg.n, cfg.d))
    res = nb.simulate_vectorized(cfg, design_matrix=x)
    s = _summary(cfg, res)
    g = np.arange(1, cfg.generations + 1)
    growth = g if workflow == "discard" else np.cumsum(1.0 / g**2)
    trace = np.trace(np.linalg.inv(x.T @ x))
    _assert_within(s.mse, s.mse_se, cfg.sigma**2 * trace * growth, "mse")
    _assert_within(s.variance_ratio[1:], s.variance_ratio_se[1:], growth[1:], "variance ratio")


@pytest.mark.parametrize("workflow", ["discard", "augment"])
def test_ols_fixed_random_design_mse(workflow):
    """Each trajectory its own fixed Gaussian X: E tr((X^T X)^{-1}) = d / (n - d - 1)."""
    cfg = _config(workflow=workflow, design="fixed", draw="data")
    s = _summary(cfg, nb.simulate_vectorized(cfg))
    g = np.arange(1, cfg.generations + 1)
    growth = g if workflow == "discard" else np.cumsum(1.0 / g**2)
    _assert_within(s.mse, s.mse_se, cfg.d / (cfg.n - cfg.d - 1) * growth, "mse")


def test_loop_baseline_matches_theory():
    """The research-code loop (pinv on stacked data) obeys the same closed forms."""
    g = np.arange(1, 9)
    cfg = _config(workflow="discard", design="fresh", trajectories=400)
    s = _summary(cfg, nb.simulate_loop(cfg))
    _assert_within(s.variance_ratio[1:], s.variance_ratio_se[1:], g[1:], "loop discard ratio")
    cfg = _config(workflow="augment", design="fixed", trajectories=200)
    x = np.random.default_rng(5).standard_normal((cfg.n, cfg.d))
    s = _summary(cfg, nb.simulate_loop(cfg, design_matrix=x))
    expected = np.trace(np.linalg.inv(x.T @ x)) * np.cumsum(1.0 / g**2)
    _assert_within(s.mse, s.mse_se, expected, "loop augment mse")


def test_float32_baseline_runs_in_float32():
    cfg = _config(workflow="augment", dtype="float32", trajectories=500)
    res = nb.simulate_vectorized(cfg)
    assert res.thetas.dtype == np.float32
    assert res.ok.all()


# -- logistic Newton against scipy.optimize -----------------------------------


def _scipy_mle(x, y, w):
    from scipy.optimize import minimize

    def nll(t):
        eta = x @ t
        return np.sum(w * (np.logaddexp(0.0, eta) - y * eta))

    def grad(t):
        p = 1.0 / (1.0 + np.exp(-(x @ t)))
        return x.T @ (w * (p - y))

    def hess(t):
        p = 1.0 / (1.0 + np.exp(-(x @ t)))
        return (x.T * (w * p * (1 - p))) @ x

    out = minimize(nll, np.zeros(x.shape[1]), jac=grad, hess=hess, method="trust-exact",
                   options={"gtol": 1e-12})
    # trust-exact may stop on float64 resolution of the objective ("bad
    # approximation") before gtol; a score this small still pins theta to
    # ~|grad| / lambda_min(H) ~ 1e-8 here, well inside the 1e-6 comparison.
    assert np.max(np.abs(grad(out.x))) < 1e-6
    return out.x


def test_newton_matches_scipy():
    rng = np.random.default_rng(2)
    B, m, d = 3, 200, 4
    x = rng.standard_normal((B, m, d))
    theta = rng.standard_normal((B, d)) * 0.7
    y = (rng.random((B, m)) < 1 / (1 + np.exp(-np.einsum("bmd,bd->bm", x, theta)))).astype(float)
    # fractional targets with weights: the fixed-design augment reduction
    yf = np.stack([y[0], 0.5 * (y[1] + (rng.random(m) < 0.5)), y[2]])
    w = np.stack([np.ones(m), 2 * np.ones(m), rng.uniform(0.5, 2.0, m)])
    res = nb.newton_logistic(x, yf, np.zeros((B, d)), w)
    assert res.converged.all()
    assert (res.iterations < 15).all()
    refs = [_scipy_mle(x[b], yf[b], w[b]) for b in range(B)]
    np.testing.assert_allclose(res.theta, np.stack(refs), atol=1e-6, rtol=0)
    # the loop baseline's single-problem solver (unit weights: problem 0)
    single, ok = nb._newton_single(x[0], y[0], np.zeros(d), 50)
    assert ok
    np.testing.assert_allclose(single, refs[0], atol=1e-6, rtol=0)


def test_newton_flags_separable_data():
    """Perfectly separated data have no MLE: the fit fails and keeps its start."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 50, 2))
    y = np.stack([(x[0, :, 0] > 0).astype(float),
                  (rng.random(50) < 0.5).astype(float)])
    start = np.full((2, 2), 0.1)
    res = nb.newton_logistic(x, y, start)
    assert not res.converged[0] and res.converged[1]
    np.testing.assert_array_equal(res.theta[0], start[0])
    # A start that separates problem 0 (its labels are the sign of feature 0): as with
    # the engine's `separates`, the first step fails; so does the loop baseline's.
    sep_start = np.array([[0.1, 0.0], [0.1, 0.1]])
    res = nb.newton_logistic(x, y, sep_start)
    assert not res.converged[0] and res.iterations[0] == 1 and res.converged[1]
    engine = collapse_jax.logistic_newton(x[0], y[0], theta_init=sep_start[0])
    assert not bool(engine.converged) and int(engine.iterations) == 1
    single, ok = nb._newton_single(x[0], y[0], sep_start[0], 50)
    assert not ok
    np.testing.assert_array_equal(single, sep_start[0])


# -- the engine, same configuration -------------------------------------------

ENGINE_CASES = [
    # The engine samples sufficient statistics; the baseline draws explicit data.
    (dict(model="ols", workflow="augment", design="fresh"), dict(draw="data")),
    (dict(model="logistic", workflow="discard", design="fixed", n=60, d=2, generations=5,
          trajectories=3000), {}),
]


@pytest.mark.skipif(not hasattr(collapse_jax, "simulate"), reason="engine not available")
@pytest.mark.parametrize("engine_kw, baseline_kw", ENGINE_CASES)
def test_matches_engine(engine_kw, baseline_kw):
    cfg = _config(**engine_kw)
    eng = collapse_jax.simulate(cfg).summary
    base_cfg = cfg.replace(seed=cfg.seed + 1, **baseline_kw)
    res = nb.simulate_vectorized(base_cfg)
    s = _summary(base_cfg, res)
    np.testing.assert_allclose(s.count / cfg.trajectories, eng.count / cfg.trajectories, atol=0.02)
    se = np.hypot(s.variance_ratio_se[1:], eng.variance_ratio_se[1:])
    _assert_within(s.variance_ratio[1:], se, eng.variance_ratio[1:], "variance ratio vs engine")
    _assert_within(s.mse, np.hypot(s.mse_se, eng.mse_se), eng.mse, "mse vs engine")
