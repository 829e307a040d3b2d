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


@pytest.mark.parametrize("family", ["logistic", "poisson"])
@pytest.mark.parametrize("batches,chunk", [(1, 1), (7, 1), (7, 3), (9, 3), (2, 9)])
def test_pooled_newton_equals_newton_on_the_used_batches(family, batches, chunk):
    """The chunked pooled fit takes glm_newton's steps on the first `batches` batches
    only: whatever the later slots hold, the same estimate, step count and flag."""
    from collapse_jax._estimators import glm_newton, glm_newton_pooled

    rng = np.random.default_rng(batches * 10 + chunk)
    slots, n, d = 9, 40, 3
    x = rng.normal(size=(slots, n, d)) / np.sqrt(d)
    theta = np.array([0.5, -0.3, 0.2])
    mean = 1 / (1 + np.exp(-x @ theta)) if family == "logistic" else np.exp(x @ theta)
    if family == "logistic":
        y = (rng.uniform(size=(slots, n)) < mean) * 1.0
    else:
        y = rng.poisson(mean) * 1.0
    x[batches:] *= 50.0  # later slots: data that would change the fit if they were used
    y[batches:] = 1.0 - y[batches:] if family == "logistic" else y[batches:] + 7
    start = jnp.asarray([0.1, 0.0, -0.1])
    used = (jnp.asarray(x[:batches].reshape(-1, d)), jnp.asarray(y[:batches].reshape(-1)))
    ref = glm_newton(*used, None, start, 50, None, family)
    res = glm_newton_pooled(jnp.asarray(x), jnp.asarray(y), jnp.asarray(batches), start, 50,
                            family, chunk)
    assert bool(ref.converged) and bool(res.converged)
    assert int(res.iterations) == int(ref.iterations)
    np.testing.assert_allclose(np.asarray(res.theta), np.asarray(ref.theta), rtol=0, atol=1e-13)
    if family == "logistic":
        mle = numpy_logistic_mle(np.asarray(used[0]), np.asarray(used[1]))
        np.testing.assert_allclose(np.asarray(res.theta), mle, rtol=0, atol=1e-9)


def test_pooled_newton_rejects_a_pool_not_in_whole_chunks():
    from collapse_jax._estimators import glm_newton_pooled

    with pytest.raises(ValueError, match="multiple of chunk"):
        glm_newton_pooled(jnp.zeros((5, 4, 2)), jnp.zeros((5, 4)), jnp.asarray(2), jnp.zeros(2), 50,
                          "logistic", 2)


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
