"""Workflows against exact finite-sample results and the large-n limit.

Every Monte Carlo check uses a fixed seed and a tolerance of 5 standard
errors of the estimate itself (plus, where stated, an O(1/n) allowance).
"""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import collapse_jax as cj

BASEL = np.cumsum(1.0 / np.arange(1, 200) ** 2)


def within(est, se, target, k=5.0, extra=0.0):
    est, se, target = map(np.asarray, (est, se, target))
    bad = np.abs(est - target) > k * se + extra
    assert not bad.any(), f"est={est[bad]} target={target[bad]} se={se[bad]}"


@pytest.mark.parametrize("draw", ["auto", "data"])
def test_ols_fresh_discard_ratio_is_g(draw):
    G = 8
    cfg = cj.SimulationConfig(model="ols", workflow="discard", design="fresh", n=12, d=3,
                              generations=G, trajectories=20_000, seed=1, draw=draw)
    s = cj.simulate(cfg).summary
    within(s.variance_ratio, s.variance_ratio_se, np.arange(1, G + 1))
    # and the MSE: sigma^2 g E tr (X^T X)^{-1} = g d / (n - d - 1)
    within(s.mse, s.mse_se, np.arange(1, G + 1) * 3 / (12 - 3 - 1))
    assert s.variance_ratio_se[-1] > 0  # the check above is not vacuous


@pytest.mark.parametrize("workflow", ["discard", "augment"])
@pytest.mark.parametrize("draw", ["auto", "data"])
def test_ols_fixed_user_design_exact_mse(workflow, draw):
    rng = np.random.default_rng(7)
    n, d, G, sigma = 15, 4, 6, 0.7
    x = rng.normal(size=(n, d)) @ np.diag([1.0, 2.0, 0.5, 1.5])
    tr = np.trace(np.linalg.inv(x.T @ x))
    factor = np.arange(1, G + 1) if workflow == "discard" else BASEL[:G]
    cfg = cj.SimulationConfig(model="ols", workflow=workflow, design="fixed", n=n, d=d, generations=G,
                              trajectories=20_000, sigma=sigma, seed=2, draw=draw)
    s = cj.simulate(cfg, design_matrix=x).summary
    within(s.mse, s.mse_se, sigma**2 * tr * factor)
    # Given X, theta_g is Gaussian with covariance c_g sigma^2 (X^T X)^{-1}: full matrix check.
    cov_exact = sigma**2 * factor[-1] * np.linalg.inv(x.T @ x)
    # Gaussian sample covariance: entry (i, j) scaled by sqrt(c_ii c_jj) has SE <= sqrt(2 / R).
    scale = np.sqrt(np.outer(np.diag(cov_exact), np.diag(cov_exact)))
    assert np.all(np.abs(s.cov[-1] - cov_exact) / scale < 5 * np.sqrt(2 / cfg.trajectories))


@pytest.mark.parametrize("workflow", ["discard", "augment"])
def test_ols_fixed_random_design_average(workflow):
    """A design drawn once per trajectory: E tr (X^T X)^{-1} = d / (n - d - 1)."""
    n, d, G = 20, 3, 5
    factor = np.arange(1, G + 1) if workflow == "discard" else BASEL[:G]
    for draw in ("auto", "data"):
        cfg = cj.SimulationConfig(model="ols", workflow=workflow, design="fixed", n=n, d=d,
                                  generations=G, trajectories=30_000, seed=3, draw=draw)
        s = cj.simulate(cfg).summary
        within(s.mse, s.mse_se, factor * d / (n - d - 1))


@pytest.mark.parametrize("model", ["ols", "logistic"])
def test_large_n_fresh_augment_and_discard_approach_limit(model):
    G = 5
    n = 2000
    for workflow, target in [("augment", BASEL[:G]), ("discard", np.arange(1.0, G + 1))]:
        cfg = cj.SimulationConfig(model=model, workflow=workflow, design="fresh", n=n, d=2,
                                  generations=G, trajectories=3000, seed=4)
        r = cj.simulate(cfg)
        s = r.summary
        assert r.failed_fits.sum() == 0
        # O(1/n) allowance: finite-n corrections are of relative order d/n (here 1e-3 x g).
        within(s.variance_ratio, s.variance_ratio_se, target, extra=20 * target / n)


def test_subsample_plateaus_above_augment():
    common = dict(model="ols", design="fresh", n=100, d=2, generations=6, trajectories=3000, seed=5)
    aug = cj.simulate(cj.SimulationConfig(workflow="augment", **common)).summary
    sub = cj.simulate(cj.SimulationConfig(workflow="subsample", **common)).summary
    rep = cj.simulate(cj.SimulationConfig(workflow="subsample-replace", **common)).summary
    g = -1
    assert sub.variance_ratio[g] - aug.variance_ratio[g] > 5 * np.hypot(sub.variance_ratio_se[g], aug.variance_ratio_se[g])
    assert rep.variance_ratio[g] - sub.variance_ratio[g] > 3 * np.hypot(rep.variance_ratio_se[g], sub.variance_ratio_se[g])
    assert sub.variance_ratio[g] < 0.5 * 6  # far below discard's g


def test_large_n_subsample_uses_first_distinct_and_approaches_limit():
    """At n = FIRST_DISTINCT_FROM the engine samples with `_first_distinct`.

    Fresh-design OLS subsample against the limit ratios (1, 1.75, 2.083),
    with the O(g/n) allowance of the test above; sampling with replacement
    instead would give (1, 2.25, 2.472), outside the tolerance at g = 2.
    """
    from collapse_jax import _engine
    from collapse_jax._limit import limit_ratio

    n, G = _engine.FIRST_DISTINCT_FROM, 3
    cfg = cj.SimulationConfig(model="ols", workflow="subsample", design="fresh", n=n, d=1,
                              generations=G, trajectories=8000, seed=14)
    s = cj.simulate(cfg).summary
    target = limit_ratio("subsample", G)
    within(s.variance_ratio, s.variance_ratio_se, target, extra=20 * target / n)
    replace = limit_ratio("subsample-replace", G)
    assert abs(s.variance_ratio[1] - replace[1]) > 5 * s.variance_ratio_se[1] + 20 * replace[1] / n


@pytest.mark.parametrize("workflow", ["augment", "subsample"])
def test_block_size_does_not_change_results(workflow):
    # augment: n = 300, G = 7 keeps the pool in 3 chunks (3, 3, 1 batches)
    n, G = (300, 7) if workflow == "augment" else (40, 4)
    base = dict(model="logistic", workflow=workflow, design="fresh", n=n, d=2, generations=G,
                trajectories=300, seed=11)
    a = cj.simulate(cj.SimulationConfig(block_size=64, **base))
    b = cj.simulate(cj.SimulationConfig(block_size=256, **base))
    for x, y in zip(a.summary, b.summary):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(a.failed_fits, b.failed_fits)
    # per-trajectory paths do not depend on which other trajectories share the batch
    cfg = cj.SimulationConfig(**base)
    full = cj.simulate_trajectories(cfg, np.arange(0, 40))
    part = cj.simulate_trajectories(cfg, np.arange(17, 29))
    np.testing.assert_array_equal(full.theta[17:29], part.theta)
    np.testing.assert_array_equal(full.alive[17:29], part.alive)


def test_pooled_augment_paths_do_not_depend_on_the_chunking(monkeypatch):
    """Logistic augment (fresh) with the pool in 1, 2 and 4 chunks: the same paths up to
    the order of the sums inside the fits (the Newton stopping tolerance bounds the rest)."""
    from collapse_jax import _driver, _engine

    cfg = cj.SimulationConfig(model="logistic", workflow="augment", design="fresh", n=50, d=3,
                              generations=8, trajectories=16, seed=12)
    paths = []
    for points in (400, 200, 100):  # chunks of 8, 4 and 2 batches
        monkeypatch.setattr(_engine, "POOL_CHUNK_POINTS", points)
        monkeypatch.setattr(_driver, "_COMPILED", {})  # else the first chunking's kernel is reused
        assert _engine.pool_chunk(cfg.n, cfg.generations) == points // cfg.n
        paths.append(cj.simulate_trajectories(cfg))
    for other in paths[1:]:
        np.testing.assert_array_equal(other.alive, paths[0].alive)
        np.testing.assert_allclose(other.theta, paths[0].theta, rtol=0, atol=1e-9)


@pytest.mark.parametrize("model", ["logistic", "poisson"])
def test_pooled_augment_start_saves_passes_not_accuracy(model, monkeypatch):
    """Pooled augment fits start from `extended_pool_start` (one pass over the new batch):
    the same paths as starting from theta_{g-1}, within the stopping rule's tolerance,
    and fewer passes over the pool (the Newton steps counted per fit)."""
    from collapse_jax import _driver, _engine

    cfg = cj.SimulationConfig(model=model, workflow="augment", design="fresh", n=60, d=3,
                              generations=10, trajectories=24, seed=5)
    runs = {}
    for start in ("predicted", "previous"):
        monkeypatch.setattr(_driver, "_COMPILED", {})
        if start == "previous":
            monkeypatch.setattr(_engine, "extended_pool_start", lambda f, x, y, theta, h: theta)
        runs[start] = cj.simulate_trajectories(cfg)
    new, old = runs["predicted"], runs["previous"]
    assert old.alive.all()
    np.testing.assert_array_equal(new.alive, old.alive)
    # Both meet max|step| <= sqrt(eps) (1 + max|theta|) at the MLE, whose error is below the
    # step; the paths then carry the gaps on, so allow a few tolerances.
    tol = np.sqrt(np.finfo(np.float64).eps) * (1 + np.abs(old.theta).max())
    np.testing.assert_allclose(new.theta, old.theta, rtol=0, atol=10 * tol)
    assert new.iterations.sum() <= old.iterations.sum() - cfg.trajectories * cfg.generations // 2


def test_moments_of_paths_match_summary():
    cfg = cj.SimulationConfig(model="ols", workflow="subsample-replace", n=30, d=2, generations=3,
                              trajectories=500, seed=6, block_size=128)
    s = cj.simulate(cfg).summary
    paths = cj.simulate_trajectories(cfg)
    delta = paths.theta - cfg.theta0_vector
    v = delta.var(axis=0, ddof=1).sum(-1)
    np.testing.assert_allclose(s.variance_ratio, v / v[0], rtol=1e-10)
    np.testing.assert_allclose(s.mse, (delta**2).sum(-1).mean(0), rtol=1e-10)


def test_separable_logistic_fits_are_counted_not_nan(tmp_path):
    cfg = cj.SimulationConfig(model="logistic", workflow="discard", n=8, d=2, generations=5,
                              trajectories=400, seed=8, theta0_scale=2.0)
    r = cj.simulate(cfg, out=tmp_path)
    assert r.failed_fits[0] > 20  # tiny n: many separable real batches
    assert r.summary.count[0] == 400 - r.failed_fits[0]
    np.testing.assert_array_equal(np.diff(r.summary.count) <= 0, True)
    assert r.summary.count[-1] == 400 - r.failed_fits.sum()
    text = (tmp_path / "summary.csv").read_text().lower()
    assert "nan" not in text and "inf" not in text
    assert r.summary.count[-1] >= 2 and np.all(np.isfinite(r.summary.variance_ratio))
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [int(row["failed_fits"]) for row in rows] == r.failed_fits.tolist()


def test_traced_parameters_do_not_recompile():
    from collapse_jax._driver import compile_count

    base = cj.SimulationConfig(model="ols", workflow="augment", n=25, d=3, generations=4,
                               trajectories=200, block_size=64)
    cj.simulate(base)
    before = compile_count()
    for sigma, seed, scale in [(0.5, 1, 1.0), (2.0, 2, 3.0), (1.0, 3, 0.1)]:
        cj.simulate(base.replace(sigma=sigma, seed=seed, theta0_scale=scale, trajectories=300))
    assert compile_count() == before


@pytest.mark.parametrize("model", ["ols", "gaussian"])
def test_sufficient_statistic_kernels_trace_n(model):
    """One compiled kernel serves every n, and each run still uses its own n.

    OLS: E||theta_1 - theta0||^2 = sigma^2 d / (n - d - 1) (isotropic features).
    Gaussian: the mean part of theta_1 is N(mu, Sigma / n), Sigma = I, so the
    squared error of its d coordinates has mean d / n; the covariance part
    adds E||vech(S - I)||^2 = sum over i <= j of (1 + [i = j]) / (n - 1).
    """
    from collapse_jax._driver import compile_count

    d, R = 2, 4000
    kernels = compile_count()
    for n in (12, 1200):
        cfg = cj.SimulationConfig(model=model, workflow="augment", n=n, d=d, generations=2,
                                  trajectories=R, block_size=500, seed=n)
        s = cj.simulate(cfg).summary
        if model == "ols":
            exact = d / (n - d - 1)
        else:
            exact = d / n + (d * (d + 1) / 2 + d) / (n - 1)
        assert abs(s.mse[0] - exact) < 5 * s.mse_se[0], (n, s.mse[0], exact, s.mse_se[0])
    assert compile_count() == kernels + 1


def test_feature_covariance_scales_ols_error():
    """With Sigma = diag(s^2), Var(theta_1j) = sigma^2 / (s_j^2 (n - d - 1))."""
    s2 = np.array([1.0, 4.0])
    n, d = 14, 2
    cfg = cj.SimulationConfig(model="ols", workflow="discard", n=n, d=d, generations=2, trajectories=40_000,
                              feature_cov=tuple(map(tuple, np.diag(s2))), seed=9)
    r = cj.simulate(cfg).summary
    var = np.diagonal(r.cov[0])
    expected = 1 / (s2 * (n - d - 1))
    # theta_1 - theta0 is multivariate t with n - d + 1 = 13 dof (excess kurtosis 6/9), so the
    # sample variance has relative SE sqrt((2 + 6/9) / R) = 0.0082: 5 SE = 4.1%.
    np.testing.assert_allclose(var, expected, rtol=5 * np.sqrt((2 + 6 / 9) / cfg.trajectories))


@pytest.mark.parametrize("workflow", ["discard", "augment"])
def test_sufficient_statistics_match_explicit_data_beyond_variance(workflow):
    """The O(d) / Bartlett samplers give the law of explicit data, not just its variance:
    the fourth moment E||theta_g - theta0||^4 (heavy-tailed at small n) agrees too."""
    # n - d + 1 = 12 degrees of freedom: the 8th moment behind the SE of the 4th is finite.
    base = cj.SimulationConfig(model="ols", workflow=workflow, design="fresh", n=14, d=3,
                               generations=3, trajectories=40_000, seed=12)
    q = {}
    for draw in ("auto", "data"):
        paths = cj.simulate_trajectories(base.replace(draw=draw, seed=12 if draw == "auto" else 13))
        sq = ((paths.theta - base.theta0_vector) ** 2).sum(-1)  # (R, G)
        q[draw] = (sq.mean(0), sq.var(0, ddof=1), (sq**2).mean(0), (sq**2).var(0, ddof=1))
    R = base.trajectories
    for k in (0, 2):  # second and fourth moments of the error norm, each generation
        diff = q["auto"][k] - q["data"][k]
        se = np.sqrt((q["auto"][k + 1] + q["data"][k + 1]) / R)
        assert np.all(np.abs(diff) < 5 * se), (k, diff / se)


@pytest.mark.parametrize("method", ["floyd", "first_distinct"])
def test_sample_without_replacement_is_uniform_over_subsets(method):
    """Both samplers: distinct indices in range, every n-subset equally likely.

    n = 2 of size 5: 10 subsets, each with probability 1/10;
    counts over N draws are checked within 5 binomial SE, and the chi-square
    statistic against its 9 degrees of freedom.  Then n = 100 of 250, each
    index included with probability 2/5, and n = 100 of 100: the whole pool
    (for `_first_distinct`, rounds until every index has come up).
    """
    from collapse_jax import _engine

    def draw(n, size, keys):
        if method == "floyd":
            one = lambda k: _engine._floyd(k, n, jnp.asarray(size))  # noqa: E731
        else:
            one = lambda k: _engine._first_distinct(k, n, jnp.asarray(size), 2 * size)  # noqa: E731
        return np.asarray(jax.jit(jax.vmap(one))(keys))

    n, size, N = 2, 5, 40_000
    keys = jax.random.split(jax.random.key(2, impl="philox4x32"), N)
    idx = draw(n, size, keys)
    assert idx.min() >= 0 and idx.max() < size and np.all(idx[:, 0] != idx[:, 1])
    code = np.sort(idx, axis=1) @ np.array([size, 1])
    pairs = [a * size + b for a in range(size) for b in range(a + 1, size)]
    counts = np.bincount(code, minlength=size * size)[pairs]
    assert counts.sum() == N
    p = 1 / 10
    assert np.all(np.abs(counts - N * p) < 5 * np.sqrt(N * p * (1 - p)))
    chi2 = ((counts - N * p) ** 2 / (N * p)).sum()
    assert stats.chi2(9).sf(chi2) > 1e-4
    # A pool-sized case: n = 100 of 250; each index is included w.p. n / size.
    keys = jax.random.split(jax.random.key(3, impl="philox4x32"), 4000)
    idx = draw(100, 250, keys)
    assert all(len(set(row)) == 100 for row in idx[:200]) and idx.max() < 250
    freq = np.bincount(idx.ravel(), minlength=250) / len(idx)
    q = 100 / 250
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / len(idx)))
    # The whole pool: every row is a permutation of range(100).
    idx = draw(100, 100, keys[:50])
    assert np.all(np.sort(idx, axis=1) == np.arange(100))


def test_sample_without_replacement_picks_the_sampler_by_n():
    """The dispatch: `_floyd` below `FIRST_DISTINCT_FROM`, `_first_distinct` from it."""
    from collapse_jax import _engine

    key = jax.random.key(4, impl="philox4x32")
    for n in (_engine.FIRST_DISTINCT_FROM - 1, _engine.FIRST_DISTINCT_FROM):
        size = jnp.asarray(3 * n)
        got = _engine._sample_without_replacement(key, n, size, 4 * n)
        want = (_engine._floyd(key, n, size) if n < _engine.FIRST_DISTINCT_FROM
                else _engine._first_distinct(key, n, size, 4 * n))
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert len(set(np.asarray(got).tolist())) == n
