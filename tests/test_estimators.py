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


@pytest.mark.parametrize("family", ["logistic", "poisson"])
def test_glm_terms_are_the_weighted_gradient_and_hessian(family):
    """`_glm_terms` (gradient and Hessian from one product) against the float64
    formulas x^T w (y - mu) and x^T diag(w mu') x, batched under vmap as the engine
    calls it; `_glm_gradient` gives the same gradient."""
    import jax

    from collapse_jax._estimators import _glm_gradient, _glm_terms

    rng = np.random.default_rng(11)
    b, n, d = 3, 257, 4
    x = rng.normal(size=(b, n, d))
    theta = rng.normal(size=(b, d)) / 2
    w = (rng.uniform(size=(b, n)) < 0.7).astype(float)
    eta = np.einsum("bnd,bd->bn", x, theta)
    mu = 1 / (1 + np.exp(-eta)) if family == "logistic" else np.exp(eta)
    y = rng.binomial(1, mu) if family == "logistic" else rng.poisson(mu)
    y = y.astype(float)
    slope = mu * (1 - mu) if family == "logistic" else mu
    grad_ref = np.einsum("bnd,bn->bd", x, w * (y - mu))
    hess_ref = np.einsum("bni,bn,bnj->bij", x, w * slope, x)
    args = tuple(map(jnp.asarray, (x, y, w, theta)))
    grad, hess, separated = jax.vmap(lambda *a: _glm_terms(family, *a))(*args)
    assert not np.any(np.asarray(separated))  # random labels: no problem is separated
    grad_only = jax.vmap(lambda *a: _glm_gradient(family, *a))(*args)
    scale = np.abs(x).max() ** 2 * n
    np.testing.assert_allclose(np.asarray(grad), grad_ref, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(np.asarray(grad_only), grad_ref, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(np.asarray(hess), hess_ref, rtol=0, atol=1e-13 * scale)


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
    # theta = 0 separates nothing (every eta is 0); the first Newton step does:
    # its iterate is where the fit stops, on its second step.
    assert int(res.iterations) == 2
    # A start that separates the data fails the first step.
    res = logistic_newton(x, y, theta_init=jnp.asarray([0.0, 0.1]))
    assert not bool(res.converged) and int(res.iterations) == 1


def test_separates_is_complete_separation():
    from collapse_jax._estimators import separates

    y = jnp.asarray([0.0, 0.0, 1.0, 1.0])
    w = jnp.ones(4)
    eta = jnp.asarray([-2.0, -0.5, 0.5, 3.0])

    def sep(y=y, w=w, eta=eta, family="logistic"):
        return bool(separates(family, jnp.asarray(y), jnp.asarray(w), jnp.asarray(eta)))

    assert sep()
    assert not sep(eta=eta.at[1].set(0.5))  # a point on the wrong side
    assert not sep(eta=eta.at[1].set(0.0))  # on the boundary: at most quasi-complete
    assert sep(eta=eta.at[1].set(0.5), w=w.at[1].set(0.0))  # ... unless it has no weight
    assert not sep(y=y.at[3].set(0.5))  # a fractional target is never separated
    assert not sep(family="poisson")


def _lp_separable(x, y):
    """Whether some theta has (2y - 1) x.theta >= 1 for every point (linear programming)."""
    from scipy.optimize import linprog

    a = -(2 * y - 1)[:, None] * x
    res = linprog(np.zeros(x.shape[1]), A_ub=a, b_ub=-np.ones(len(y)),
                  bounds=[(None, None)] * x.shape[1], method="highs")
    assert res.status in (0, 2), res.message  # 0: feasible, 2: infeasible
    return res.status == 0


def test_logistic_newton_fails_exactly_on_separable_problems():
    """Small problems, about a fifth of them completely separable (checked by an LP, not by
    the fit): those fail, in fewer steps than the iteration cap, and every other one
    converges to the float64 reference MLE.  Continuous features make quasi-complete
    separation a probability-0 event."""
    import jax

    rng = np.random.default_rng(5)
    b, n, d = 120, 10, 3
    x = rng.normal(size=(b, n, d))
    theta = np.array([1.0, -0.5, 0.5])
    y = (rng.uniform(size=(b, n)) < 1 / (1 + np.exp(-x @ theta))).astype(float)
    separable = np.array([_lp_separable(x[i], y[i]) for i in range(b)])
    assert 10 <= separable.sum() <= 110
    res = jax.vmap(logistic_newton)(jnp.asarray(x), jnp.asarray(y))
    converged, iterations = np.asarray(res.converged), np.asarray(res.iterations)
    np.testing.assert_array_equal(converged, ~separable)
    assert iterations[separable].max() < 50
    for i in np.flatnonzero(~separable):
        np.testing.assert_allclose(np.asarray(res.theta[i]), numpy_logistic_mle(x[i], y[i]),
                                   rtol=0, atol=1e-7)


def test_separation_counts_only_weighted_points_and_not_under_a_ridge():
    x = jnp.asarray([[1.0, -2.0], [1.0, -1.0], [1.0, 1.0], [1.0, 2.0], [1.0, 1.5]])
    y = jnp.asarray([0.0, 0.0, 1.0, 1.0, 0.0])  # the last point breaks the separation
    assert bool(logistic_newton(x, y).converged)
    ref = numpy_logistic_mle(np.asarray(x), np.asarray(y))
    np.testing.assert_allclose(np.asarray(logistic_newton(x, y).theta), ref, atol=1e-8)
    weightless = logistic_newton(x, y, jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert not bool(weightless.converged) and int(weightless.iterations) == 2
    # A ridge penalty makes the MLE exist: converged, at a zero of the penalised gradient.
    ridge = jnp.asarray([0.0, 1.0])  # the intercept unpenalised
    fit = logistic_newton(x[:4], y[:4], ridge=ridge)
    assert bool(fit.converged)
    t = np.asarray(fit.theta)
    xs, ys = np.asarray(x[:4]), np.asarray(y[:4])
    grad = xs.T @ (ys - 1 / (1 + np.exp(-xs @ t))) - np.asarray(ridge) * t
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)


def _pool(family, slots, n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(slots, n, d)) / np.sqrt(d)
    theta = np.array([0.5, -0.3, 0.2])[:d]
    mean = 1 / (1 + np.exp(-x @ theta)) if family == "logistic" else np.exp(x @ theta)
    if family == "logistic":
        y = (rng.uniform(size=(slots, n)) < mean) * 1.0
    else:
        y = rng.poisson(mean) * 1.0
    return x, y


def _chunked(a, sizes):
    edges = np.cumsum((0,) + sizes)
    return tuple(jnp.asarray(a[lo:hi]) for lo, hi in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("family", ["logistic", "poisson"])
@pytest.mark.parametrize("batches,sizes", [(1, (9,)), (7, (1,) * 9), (7, (3, 3, 3)), (9, (3, 3, 3)),
                                           (2, (4, 5)), (5, (4, 5))])
def test_pooled_newton_finds_the_mle_of_the_used_batches(family, batches, sizes):
    """The pooled fit on the first `batches` batches, whatever the later slots hold and
    however the pool is chunked: glm_newton's estimate within the stopping rule's
    tolerance sqrt(eps) (1 + max|theta|), and the exact MLE to the same tolerance."""
    from collapse_jax._estimators import glm_newton, glm_newton_pooled

    slots, n, d = 9, 40, 3
    x, y = _pool(family, slots, n, d, seed=batches * 10 + len(sizes))
    x[batches:] *= 50.0  # later slots: data that would change the fit if they were used
    y[batches:] = 1.0 - y[batches:] if family == "logistic" else y[batches:] + 7
    start = jnp.asarray([0.1, 0.0, -0.1])
    used = (jnp.asarray(x[:batches].reshape(-1, d)), jnp.asarray(y[:batches].reshape(-1)))
    ref = glm_newton(*used, None, start, 50, None, family)
    res, _ = glm_newton_pooled(_chunked(x, sizes), _chunked(y, sizes), jnp.asarray(batches),
                               start, 50, family)
    assert bool(ref.converged) and bool(res.converged)
    tol = np.sqrt(np.finfo(np.float64).eps) * (1 + np.max(np.abs(np.asarray(ref.theta))))
    np.testing.assert_allclose(np.asarray(res.theta), np.asarray(ref.theta), rtol=0, atol=tol)
    if family == "logistic":
        mle = numpy_logistic_mle(np.asarray(used[0]), np.asarray(used[1]))
        np.testing.assert_allclose(np.asarray(res.theta), mle, rtol=0, atol=tol)


def test_pooled_newton_reuses_hessians_and_visits_only_used_chunks():
    """Counted eagerly (jax.disable_jit runs the loops in Python): from a warm start the
    pooled fit evaluates fewer Hessians than glm_newton takes Newton steps, and its
    passes skip the chunks past `batches`."""
    import jax

    from collapse_jax import _estimators
    from collapse_jax._estimators import glm_newton, glm_newton_pooled

    x, y = _pool("logistic", 6, 100, 3, seed=5)
    used = (jnp.asarray(x[:4].reshape(-1, 3)), jnp.asarray(y[:4].reshape(-1)))
    warm = glm_newton(jnp.asarray(x[:3].reshape(-1, 3)), jnp.asarray(y[:3].reshape(-1))).theta
    calls = {"hessian": 0, "gradient": 0, "points": 0}
    terms, gradient = _estimators._glm_terms, _estimators._glm_gradient

    def counting(kind, fn):
        def wrapped(family, x, *rest):
            calls[kind] += 1
            calls["points"] += x.shape[0]
            return fn(family, x, *rest)
        return wrapped

    with jax.disable_jit(), pytest.MonkeyPatch.context() as mp:
        ref = glm_newton(*used, None, warm)
        mp.setattr(_estimators, "_glm_terms", counting("hessian", terms))
        mp.setattr(_estimators, "_glm_gradient", counting("gradient", gradient))
        res, _ = glm_newton_pooled(_chunked(x, (2, 2, 2)), _chunked(y, (2, 2, 2)),
                                   jnp.asarray(4), warm)
    assert bool(res.converged) and int(ref.iterations) >= 3
    hessians = calls["hessian"] // 2  # two chunks (batches 0-3) per pass
    assert calls["hessian"] % 2 == 0 and calls["gradient"] % 2 == 0
    assert calls["points"] == 200 * (calls["hessian"] + calls["gradient"])  # never chunk 3
    assert 1 <= hessians < int(ref.iterations)
    assert calls["gradient"] >= 2
    np.testing.assert_allclose(np.asarray(res.theta), np.asarray(ref.theta), rtol=0, atol=1e-10)


def _numpy_glm_terms(family, x, y, theta):
    eta = x @ theta
    p = 1 / (1 + np.exp(-eta)) if family == "logistic" else np.exp(eta)
    c = p * (1 - p) if family == "logistic" else p
    return x.T @ (y - p), (x * c[:, None]).T @ x


@pytest.mark.parametrize("family", ["logistic", "poisson"])
def test_extended_pool_start_is_the_newton_step_on_the_extended_pool(family):
    """From the MLE of a pool and that pool's Hessian there, the start is the first Newton
    step on the pool plus one batch (the pool's gradient vanishes at its MLE); from an
    empty pool (zero Hessian) it is the first Newton step on the batch; a singular system
    returns theta itself."""
    from collapse_jax._estimators import extended_pool_start, glm_newton

    x, y = _pool(family, 4, 50, 3, seed=21)
    old_x, old_y = x[:3].reshape(-1, 3), y[:3].reshape(-1)
    mle = np.asarray(glm_newton(jnp.asarray(old_x), jnp.asarray(old_y), family=family).theta)
    g_old, h_old = _numpy_glm_terms(family, old_x, old_y, mle)
    assert np.abs(g_old).max() < 1e-9
    all_x, all_y = x.reshape(-1, 3), y.reshape(-1)
    g_all, h_all = _numpy_glm_terms(family, all_x, all_y, mle)
    want = mle + np.linalg.solve(h_all, g_all)
    got = extended_pool_start(family, jnp.asarray(x[3]), jnp.asarray(y[3]), jnp.asarray(mle),
                              jnp.asarray(h_old))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12)
    assert np.abs(want - mle).max() > 1e-3  # a real step, not theta

    theta = np.array([0.1, -0.2, 0.05])
    g_b, h_b = _numpy_glm_terms(family, x[0], y[0], theta)
    got = extended_pool_start(family, jnp.asarray(x[0]), jnp.asarray(y[0]), jnp.asarray(theta),
                              jnp.zeros((3, 3)))
    np.testing.assert_allclose(np.asarray(got), theta + np.linalg.solve(h_b, g_b), rtol=0,
                               atol=1e-12)

    flat = x[0].copy()
    flat[:, 2] = 0.0  # the third coefficient is not identified: H_b singular
    got = extended_pool_start(family, jnp.asarray(flat), jnp.asarray(y[0]), jnp.asarray(theta),
                              jnp.zeros((3, 3)))
    np.testing.assert_array_equal(np.asarray(got), theta)


def test_pooled_fit_from_the_extended_pool_start_needs_fewer_hessians():
    """Counted eagerly: the fit on 4 batches from `extended_pool_start` (built from the
    3-batch fit's returned Hessian) evaluates fewer pool Hessians than from the 3-batch
    MLE, and reaches the same MLE within the stopping rule's tolerance."""
    import jax

    from collapse_jax import _estimators
    from collapse_jax._estimators import extended_pool_start, glm_newton_pooled

    x, y = _pool("logistic", 4, 200, 3, seed=8)
    chunks_x, chunks_y = _chunked(x, (2, 2)), _chunked(y, (2, 2))
    three, hess = glm_newton_pooled(chunks_x, chunks_y, jnp.asarray(3), jnp.zeros(3))
    assert bool(three.converged)
    start = extended_pool_start("logistic", jnp.asarray(x[3]), jnp.asarray(y[3]), three.theta,
                                hess)
    hessians = {}
    terms = _estimators._glm_terms
    for name, init in (("previous", three.theta), ("predicted", start)):
        calls = []

        def counting(*args):
            calls.append(1)
            return terms(*args)

        with jax.disable_jit(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(_estimators, "_glm_terms", counting)
            res, _ = glm_newton_pooled(chunks_x, chunks_y, jnp.asarray(4), init)
        assert bool(res.converged)
        hessians[name] = (len(calls) // 2, np.asarray(res.theta))  # two chunks per pass
    tol = np.sqrt(np.finfo(np.float64).eps) * (1 + np.abs(hessians["previous"][1]).max())
    np.testing.assert_allclose(hessians["predicted"][1], hessians["previous"][1], rtol=0,
                               atol=2 * tol)
    assert hessians["predicted"][0] < hessians["previous"][0]


def test_newton_reusing_hessian_falls_back_to_newton_when_reuse_stalls():
    """A root where the curvature vanishes: g(t) = -(t - 1)^3 - 1e-6 (t - 1).  A
    reused Hessian from far away stops contracting, so the fit must go back to
    Newton steps (counted) and still meet the stopping rule at t = 1."""
    import jax

    from collapse_jax._estimators import _newton_reusing_hessian

    calls = []

    def gradient(t):
        calls.append("g")
        return -((t - 1) ** 3) - 1e-6 * (t - 1)

    def gradient_and_hessian(t):
        calls.append("H")
        return (-((t - 1) ** 3) - 1e-6 * (t - 1), (3 * (t - 1) ** 2 + 1e-6)[:, None],
                jnp.zeros((), bool))

    with jax.disable_jit():
        res, _ = _newton_reusing_hessian(gradient_and_hessian, gradient, jnp.asarray([1.5]), 50,
                                         jnp.float64)
    assert bool(res.converged)
    assert abs(float(res.theta[0]) - 1) < np.sqrt(np.finfo(np.float64).eps) * 2
    order = "".join(calls)
    # Newton alone contracts by 2/3 a step until the linear term takes over; then reused
    # Hessians, and Newton steps again after a reused step failed to halve the last one.
    assert order.startswith("HHH") and "gH" in order and order.endswith("g")
    assert int(res.iterations) < 50


def test_pooled_newton_flags_separable_pools():
    from collapse_jax._estimators import glm_newton_pooled

    x = np.array([[[1.0, -2.0], [1.0, -1.0]], [[1.0, 1.0], [1.0, 2.0]], [[5.0, 5.0], [1.0, 0.0]]])
    y = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # batches 0-1 separated by feature 2
    start = jnp.asarray([0.0, 0.1])
    res, _ = glm_newton_pooled(_chunked(x, (2, 1)), _chunked(y, (2, 1)), jnp.asarray(2), start)
    assert not bool(res.converged)
    np.testing.assert_array_equal(np.asarray(res.theta), np.asarray(start))
    assert int(res.iterations) == 1  # the start separates batches 0-1 (batch 2 weighs 0)
    # Chunked (1, 1, 1) the separation spans two chunks; from zeros, the first step finds it.
    res, _ = glm_newton_pooled(_chunked(x, (1, 1, 1)), _chunked(y, (1, 1, 1)), jnp.asarray(2),
                               jnp.zeros(2))
    assert not bool(res.converged) and int(res.iterations) == 2
    both, _ = glm_newton_pooled(_chunked(x, (2, 1)), _chunked(y, (2, 1)), jnp.asarray(3), start)
    assert bool(both.converged)  # batch 2 breaks the separation


def test_pooled_newton_rejects_chunks_that_do_not_match():
    from collapse_jax._estimators import glm_newton_pooled

    with pytest.raises(ValueError, match="same batches"):
        glm_newton_pooled((jnp.zeros((2, 4, 2)),), (jnp.zeros((3, 4)),), jnp.asarray(2),
                          jnp.zeros(2))


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
