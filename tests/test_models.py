"""The poisson, gaussian, ridge and median models: fits against float64 references,
degenerate data flagged (never NaN), exact finite-n laws, and the large-n limit.

Monte Carlo checks use fixed seeds and 5 standard errors (plus, where stated,
an O(1/n) allowance), as in test_engine.py.  Engine runs share static shapes
(n, d, G, block size) where they can, so kernels compile once per session.
"""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg, optimize, stats

import collapse_jax as cj
from collapse_jax._driver import compile_count
from collapse_jax._estimators import (
    gaussian_fit,
    order_keys,
    poisson_newton,
    pooled_median,
    ridge_regression,
    sample_median,
)
from collapse_jax._models import metrics, sample_poisson
from collapse_jax._theory import (
    asymptotic_covariance,
    gaussian_discard_exact,
    linear_fixed_design_exact,
)

BASEL = np.cumsum(1.0 / np.arange(1, 200) ** 2)


def within(est, se, target, k=5.0, extra=0.0):
    est, se, target = map(np.asarray, (est, se, target))
    bad = np.abs(est - target) > k * se + extra
    assert not bad.any(), f"est={est[bad]} target={target[bad]} se={se[bad]}"


# ---------------------------------------------------------------------------
# Fits against independent float64 references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_newton_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n, d = 300, 4
    x = rng.normal(size=(n, d))
    theta = rng.normal(size=d) / np.sqrt(d)
    y = rng.poisson(np.exp(x @ theta)).astype(float)
    w = rng.integers(1, 4, size=n).astype(float)

    def nll(t):
        eta = x @ t
        return np.sum(w * (np.exp(eta) - y * eta))

    def grad(t):
        return x.T @ (w * (np.exp(x @ t) - y))

    def hess(t):
        return (x * (w * np.exp(x @ t))[:, None]).T @ x

    ref = optimize.minimize(nll, np.zeros(d), jac=grad, hess=hess, method="trust-exact",
                            options={"gtol": 1e-13}).x
    res = poisson_newton(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    assert bool(res.converged) and 2 <= int(res.iterations) <= 15
    np.testing.assert_allclose(np.asarray(res.theta), ref, rtol=0, atol=1e-8)
    # weights are multiplicities: the same fit as the replicated data
    rep = poisson_newton(jnp.asarray(np.repeat(x, w.astype(int), 0)),
                         jnp.asarray(np.repeat(y, w.astype(int))))
    np.testing.assert_allclose(np.asarray(rep.theta), ref, rtol=0, atol=1e-8)


def test_ridge_matches_closed_form():
    rng = np.random.default_rng(3)
    n, d, lam = 40, 5, 2.5
    x, y = rng.normal(size=(n, d)), rng.normal(size=n)
    w = rng.integers(0, 3, size=n).astype(float)
    res = ridge_regression(jnp.asarray(x), jnp.asarray(y), jnp.asarray(lam), jnp.asarray(w))
    ref = np.linalg.solve((x * w[:, None]).T @ x + lam * np.eye(d), (x * w[:, None]).T @ y)
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.theta), ref, rtol=0, atol=1e-12)
    # overparameterised (n < d) is fine with a penalty
    small = ridge_regression(jnp.asarray(x[:3]), jnp.asarray(y[:3]), jnp.asarray(lam))
    ref = np.linalg.solve(x[:3].T @ x[:3] + lam * np.eye(d), x[:3].T @ y[:3])
    np.testing.assert_allclose(np.asarray(small.theta), ref, rtol=0, atol=1e-12)


def test_gaussian_fit_matches_numpy_cov():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 3)) @ np.array([[1.0, 0, 0], [0.5, 1, 0], [0, 0.3, 2]])
    w = rng.integers(0, 3, size=60)
    res = gaussian_fit(jnp.asarray(x), jnp.asarray(w, float))
    mean = np.average(x, axis=0, weights=w)
    cov = np.cov(x.T, fweights=w)  # unbiased: normaliser sum(w) - 1
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.theta), np.r_[mean, cov[np.tril_indices(3)]],
                               rtol=0, atol=1e-12)
    plain = gaussian_fit(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(plain.theta),
                               np.r_[x.mean(0), np.cov(x.T)[np.tril_indices(3)]], atol=1e-12)


def test_medians_match_numpy_exactly():
    rng = np.random.default_rng(5)
    plain, weighted = jax.jit(sample_median), jax.jit(sample_median)
    for m in (7, 8):
        for _ in range(5):
            x = rng.normal(size=(m, 3))
            assert np.array_equal(np.asarray(plain(jnp.asarray(x)).theta), np.median(x, 0))
            w = rng.integers(0, 4, size=m)
            w[0] = max(w[0], 1)
            res = weighted(jnp.asarray(x), jnp.asarray(w, float))
            assert np.array_equal(np.asarray(res.theta), np.median(np.repeat(x, w, 0), 0))
    # the pooled median of sorted batches (augment), ties and unused batches included
    top = jnp.uint64(2**64 - 1)
    f = jax.jit(pooled_median, static_argnums=2)
    B, n, d = 4, 7, 2  # one compiled shape; totals g n odd and even
    for trial in range(40):
        g = trial % B + 1
        x = rng.normal(size=(B, n, d)) * 10.0 ** rng.integers(-3, 4)
        if trial % 3 == 0:
            x = np.round(x, 1)
        keys = jnp.sort(order_keys(jnp.asarray(x)), axis=1)
        keys = jnp.where(jnp.arange(B)[:, None, None] < g, keys, top)
        med = np.asarray(f(keys, jnp.asarray(g * n), jnp.float64))
        assert np.array_equal(med, np.median(x[:g].reshape(-1, d), 0)), trial


def test_gaussian_metrics_match_scipy():
    rng = np.random.default_rng(6)
    d = 3
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov0, cov = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.5 * np.eye(d)
    mu0, mu = rng.normal(size=d), rng.normal(size=d)
    th0, th = np.r_[mu0, cov0[np.tril_indices(d)]], np.r_[mu, cov[np.tril_indices(d)]]
    got = np.asarray(metrics("gaussian", jnp.asarray(th)[None], jnp.asarray(th0)))[0]
    root0 = linalg.sqrtm(cov0)
    w2 = np.sum((mu - mu0) ** 2) + np.trace(cov + cov0 - 2 * linalg.sqrtm(root0 @ cov @ root0)).real
    ref = [np.sum((mu - mu0) ** 2), np.trace(cov) / np.trace(cov0),
           np.linalg.det(cov) / np.linalg.det(cov0), w2]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert np.asarray(metrics("ols", jnp.zeros((4, 2)), jnp.zeros(2))).shape == (4, 0)


def test_poisson_sampler_is_exact():
    """Inversion below rate 10, PTRS from 10 on: chi-square goodness of fit per rate."""
    lams = np.array([0.4, 3.0, 9.99, 10.0, 55.0, 2e4])
    N = 30_000
    key = jax.random.key(7, impl="philox4x32")
    draws = np.asarray(jax.jit(sample_poisson)(key, jnp.asarray(np.tile(lams, (N, 1)))))
    for j, lam in enumerate(lams):
        c = draws[:, j]
        assert np.all(c == np.round(c)) and c.min() >= 0
        dist = stats.poisson(lam)
        ks = np.arange(dist.ppf(1e-3), dist.ppf(1 - 1e-3) + 1)
        obs = np.array([(c == k).sum() for k in ks])
        p = dist.pmf(ks)
        obs, p = np.append(obs, N - obs.sum()), np.append(p, 1 - p.sum())
        chi2 = np.sum((obs - N * p) ** 2 / (N * p))
        assert stats.chi2(len(ks)).sf(chi2) > 1e-4, lam
    odd = np.asarray(sample_poisson(key, jnp.asarray([0.0, np.inf])))
    assert odd[0] == 0 and np.isnan(odd[1])  # a non-finite rate: NaN, so the fit fails


# ---------------------------------------------------------------------------
# Degenerate data: flagged, never NaN
# ---------------------------------------------------------------------------


def test_degenerate_fits_are_flagged():
    rng = np.random.default_rng(8)
    x = np.c_[np.ones(50), rng.normal(size=(50, 2))]  # with an intercept
    init = jnp.asarray([0.1, -0.2, 0.3])
    # All-zero counts: the intercept's MLE is -inf; Newton walks away and is stopped.
    res = poisson_newton(jnp.asarray(x), jnp.zeros(50), theta_init=init)
    assert not bool(res.converged) and np.array_equal(np.asarray(res.theta), np.asarray(init))
    # No intercept, but every point in a half-space (x_2 > 0) and all counts zero: no MLE.
    x_half = np.c_[x[:, 1], np.abs(x[:, 2])]
    assert not bool(poisson_newton(jnp.asarray(x_half), jnp.zeros(50)).converged)
    # (Centred features without an intercept and all-zero counts do have a finite MLE.)
    assert bool(poisson_newton(jnp.asarray(x[:, 1:]), jnp.zeros(50)).converged)
    # Singular sample covariance: points on a line, or too few distinct points.
    line = np.outer(rng.normal(size=20), [1.0, 2.0])
    fb = jnp.arange(5.0)
    for pts in (line, np.repeat(rng.normal(size=(1, 2)), 6, 0)):
        res = gaussian_fit(jnp.asarray(pts), fallback=fb)
        assert not bool(res.converged) and np.array_equal(np.asarray(res.theta), np.asarray(fb))


def _no_nan_csv(path):
    text = path.read_text().lower()
    assert "nan" not in text and "inf" not in text, path
    return list(csv.DictReader(path.open()))


def test_degenerate_runs_count_failures_and_write_no_nan(tmp_path):
    # Gaussian, d = 1, n = 3, subsample with replacement: all three draws of one point
    # (probability 1/(3g)^2) give a zero variance.
    cfg = cj.SimulationConfig(model="gaussian", workflow="subsample-replace", n=3, d=1,
                              generations=4, trajectories=1000, seed=1)
    r = cj.simulate(cfg, out=tmp_path / "gaussian")
    assert r.failed_fits[1] > 10 and r.failed_fits.sum() == 1000 - r.summary.count[-1]
    rows = _no_nan_csv(tmp_path / "gaussian" / "summary.csv")
    assert [int(row["failed_fits"]) for row in rows] == r.failed_fits.tolist()
    met = _no_nan_csv(tmp_path / "gaussian" / "metrics.csv")
    names = {"mean_sq_error", "trace_ratio", "det_ratio", "w2_squared"}
    assert {row["metric"] for row in met} == names
    count = r.summary.count
    assert all(int(row["trajectories"]) == count[int(row["generation"]) - 1] for row in met)
    assert np.all(np.isfinite(r.metrics.mean)) and np.all(r.metrics.mean[:, 1] > 0)


def test_validation_is_one_line_and_early():
    bad = [
        (dict(model="gaussian", design="fixed"), "design='fresh'"),
        (dict(model="median", design="fixed"), "no features"),
        (dict(model="gaussian", n=3, d=2), "n >= d + 2"),
        (dict(model="poisson", n=2, d=2), "n > d"),
        (dict(model="ridge", ridge_penalty=-1.0), "ridge_penalty must be >= 0"),
        (dict(model="ridge", ridge_penalty=0.0, n=3, d=2), "n >= d + 2"),
        (dict(model="poison"), "did you mean 'poisson'"),
    ]
    for kwargs, fragment in bad:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
            cj.SimulationConfig(**kwargs)
    small = cj.SimulationConfig(model="ridge", n=3, d=5)  # a penalty makes n < d fine,
    assert not small.uses_sufficient_statistics  # with explicit data (no Bartlett factor)


# ---------------------------------------------------------------------------
# Exact finite-n laws
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("draw, n, d", [("auto", 8, 2), ("data", 6, 1)])
def test_gaussian_discard_closed_forms(draw, n, d):
    """Unbiased covariance under discard: E Sigma_g = Sigma0, E det ratio = q^g,
    E||mu_g - mu0||^2 = g tr Sigma0 / n, the exact variance ratio (the Wishart
    second-moment recursion), and for d = 1 the expected W2^2."""
    G, sigma = 4, 1.5
    cov = ((1.0, 0.4), (0.4, 0.5)) if d == 2 else None
    cfg = cj.SimulationConfig(model="gaussian", workflow="discard", n=n, d=d, generations=G,
                              trajectories=20_000, sigma=sigma, feature_cov=cov, seed=10, draw=draw)
    r = cj.simulate(cfg)
    assert r.failed_fits.sum() == 0
    cov0 = sigma**2 * (np.eye(1) if cov is None else np.asarray(cov))
    ex = gaussian_discard_exact(n, G, cov0)
    m, se = r.metrics.mean, r.metrics.se
    within(m[:, 0], se[:, 0], ex.mean_sq_error)
    within(m[:, 1], se[:, 1], ex.trace_ratio)
    within(m[:, 2], se[:, 2], ex.det_ratio)
    if d == 1:
        within(m[:, 3], se[:, 3], ex.w2_squared)
    s = r.summary
    within(s.mse, s.mse_se, ex.cov_trace)
    within(s.variance_ratio, s.variance_ratio_se, ex.variance_ratio)
    assert np.abs(ex.variance_ratio - np.arange(1, G + 1)).max() > 0.1  # finite n, not the limit


@pytest.mark.parametrize("workflow", ["discard", "augment"])
def test_ridge_fixed_design_exact_recursions(workflow):
    """Fixed design: theta_g is linear in the labels; its exact mean (shrunk towards 0)
    and covariance recursions hold, and the traced penalty never recompiles.  (The
    sufficient-statistic paths; the explicit-data fit is `ridge_regression`, tested above.)"""
    rng = np.random.default_rng(11)
    n, d, G, sigma = 12, 3, 5, 0.8
    x = rng.normal(size=(n, d)) @ np.diag([1.0, 2.0, 0.5])
    R = 10_000
    base = cj.SimulationConfig(model="ridge", workflow=workflow, design="fixed", n=n, d=d,
                               generations=G, trajectories=R, sigma=sigma, seed=12,
                               theta0_scale=2.0, block_size=4096)
    before = None
    for lam in (3.0, 0.5):
        r = cj.simulate(base.replace(ridge_penalty=lam), design_matrix=x)
        if before is None:
            before = compile_count()
        ex = linear_fixed_design_exact(x, base.theta0_vector, sigma, lam, workflow, G)
        s = r.summary
        # bias: E theta_g - theta0, per coordinate, SE sqrt(Var / R)
        se_mean = np.sqrt(np.diagonal(ex.cov, axis1=1, axis2=2) / R)
        within(s.mean, se_mean, ex.mean - base.theta0_vector)
        within(s.mse, s.mse_se, ex.mse)
        # Gaussian given X: entry (i, j) of the sample covariance has SE <= sqrt(2 / R) scaled
        var = np.diagonal(ex.cov, axis1=1, axis2=2)
        scale = np.sqrt(var[:, :, None] * var[:, None, :])
        assert np.all(np.abs(s.cov - ex.cov) / scale < 5 * np.sqrt(2 / R))
        assert np.abs(ex.mean[-1] - base.theta0_vector).max() > 5 * se_mean[-1].max()  # biased
    assert compile_count() == before


def test_median_discard_ratio_is_exactly_g():
    """theta_g = theta_{g-1} + (median of n standard normals): i.i.d. increments at any n."""
    cfg = cj.SimulationConfig(model="median", workflow="discard", n=9, d=1, generations=5,
                              trajectories=10_000, seed=13)
    s = cj.simulate(cfg).summary
    within(s.variance_ratio, s.variance_ratio_se, np.arange(1, 6))


# ---------------------------------------------------------------------------
# Large n: the limit process, whatever the model
# ---------------------------------------------------------------------------

# One static shape for every large-n run here and in test_universality.py: kernels compile once.
LARGE = dict(n=2000, d=2, generations=4, block_size=512)
LIMIT_CELLS = [("poisson", "discard"), ("poisson", "augment"), ("gaussian", "augment"),
               ("ridge", "augment"), ("median", "augment")]


@pytest.mark.parametrize("model, workflow", LIMIT_CELLS)
def test_large_n_ratios_match_the_limit(model, workflow):
    """n = 2000, d = 2, g <= 4 against the exact limit within 5 SE + 20 g / n (finite-n
    corrections are of relative order d / n), and the scale n E||theta_g - theta0||^2 against
    c_gg tr V (the median's pi/2 efficiency shows there, not in the ratio).  Gaussian and
    median discard are exact at finite n (tests above); the n = 2000 agreement of every
    model and workflow is measured by ``collapse-jax universality`` (docs/universality.md)."""
    cfg = cj.SimulationConfig(model=model, workflow=workflow, trajectories=512, seed=14, **LARGE)
    r = cj.simulate(cfg)
    s = r.summary
    assert r.failed_fits.sum() == 0
    g = np.arange(1, cfg.generations + 1)
    c = cj.limit_ratio(workflow, cfg.generations)
    within(s.variance_ratio, s.variance_ratio_se, c, extra=20 * g / cfg.n)
    tr_v = np.trace(asymptotic_covariance(cfg))
    within(cfg.n * s.mse, cfg.n * s.mse_se, c * tr_v, extra=20 * g * tr_v / cfg.n)
    if model == "median":
        assert np.isclose(tr_v, cfg.d * cj.MEDIAN_EFFICIENCY)


def test_overflowing_poisson_rates_are_flagged_not_nan(tmp_path):
    """|theta0| = 1000: exp(x.theta) overflows, the counts are NaN, every fit fails; the CSV
    has empty fields, never nan.  (Same compiled kernel as the limit test: theta0 is traced.)"""
    cfg = cj.SimulationConfig(model="poisson", workflow="discard", trajectories=64, seed=15,
                              theta0_scale=1000.0, **LARGE)
    r = cj.simulate(cfg, out=tmp_path)
    assert r.failed_fits[0] == 64 and r.summary.count[0] == 0
    rows = _no_nan_csv(tmp_path / "summary.csv")
    assert rows[0]["variance_ratio"] == "" and rows[0]["failed_fits"] == "64"
