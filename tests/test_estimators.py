"""Fits against independent float64 references."""

import numpy as np
import jax.numpy as jnp
import pytest

from collapse_jax import least_squares, logistic_newton


def numpy_logistic_mle(x, y, w=None, iters=100):
    """Plain float64 numpy Newton (independent reference), run to machine precision."""
    w = np.ones(len(y)) if w is None else w
    theta = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ theta))
        grad = x.T @ (w * (y - p))
        hess = (x * (w * p * (1 - p))[:, None]).T @ x
        theta = theta + np.linalg.solve(hess, grad)
    return theta


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_newton_matches_numpy_and_scipy(seed):
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    n, d = 400, 5
    x = rng.normal(size=(n, d))
    theta_true = rng.normal(size=d) / np.sqrt(d)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ theta_true))).astype(float)
    res = logistic_newton(jnp.asarray(x), jnp.asarray(y))
    assert bool(res.converged)
    ref = numpy_logistic_mle(x, y)
    np.testing.assert_allclose(np.asarray(res.theta), ref, rtol=0, atol=1e-8)

    def nll(t):
        eta = x @ t
        return np.sum(np.logaddexp(0, eta) - y * eta)

    def grad(t):
        return -x.T @ (y - 1 / (1 + np.exp(-x @ t)))

    sp = minimize(nll, np.zeros(d), jac=grad, method="BFGS", options={"gtol": 1e-11}).x
    np.testing.assert_allclose(np.asarray(res.theta), sp, atol=1e-6)
    assert 3 <= int(res.iterations) <= 12


def test_logistic_weights_equal_replication():
    """Fractional targets with weights reproduce the pooled fit on repeated designs."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 3))
    y1 = (rng.uniform(size=200) < 0.5).astype(float)
    y2 = (rng.uniform(size=200) < 0.6).astype(float)
    pooled = logistic_newton(jnp.asarray(np.vstack([x, x])), jnp.asarray(np.concatenate([y1, y2])))
    summed = logistic_newton(jnp.asarray(x), jnp.asarray((y1 + y2) / 2), 2 * jnp.ones(200))
    np.testing.assert_allclose(np.asarray(summed.theta), np.asarray(pooled.theta), atol=1e-12)
    ref = numpy_logistic_mle(x, (y1 + y2) / 2, 2 * np.ones(200))
    np.testing.assert_allclose(np.asarray(summed.theta), ref, atol=1e-10)


def test_logistic_separable_is_flagged_not_nan():
    x = jnp.asarray([[1.0, -2.0], [1.0, -1.0], [1.0, 1.0], [1.0, 2.0]])
    y = jnp.asarray([0.0, 0.0, 1.0, 1.0])  # perfectly separated by the second feature
    res = logistic_newton(x, y)
    assert not bool(res.converged)
    assert np.all(np.isfinite(np.asarray(res.theta)))
    np.testing.assert_array_equal(np.asarray(res.theta), 0.0)  # the starting value


def test_least_squares_matches_lstsq_and_flags_singular():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 4))
    y = rng.normal(size=50)
    w = rng.integers(0, 3, size=50).astype(float)
    res = least_squares(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    sw = np.sqrt(w)
    ref = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(res.theta), ref, atol=1e-12)
    assert bool(res.converged)

    singular = np.column_stack([x[:, :3], x[:, 0]])  # a repeated column
    bad = least_squares(jnp.asarray(singular), jnp.asarray(y), fallback=jnp.full(4, 7.0))
    assert not bool(bad.converged)
    np.testing.assert_array_equal(np.asarray(bad.theta), 7.0)
