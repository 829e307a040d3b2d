"""Streaming moments: exact agreement with direct formulas, honest standard errors."""

import jax.numpy as jnp
import numpy as np

from collapse_jax import block_moments, merge_moments, summarize
from collapse_jax._statistics import zero_moments


def correlated_paths(rng, r, g=4, d=3):
    steps = rng.normal(size=(r, g, d)) * np.array([1.0, 0.5, 2.0])
    return np.cumsum(steps, axis=1) + 0.2  # non-zero mean: exercises the centring terms


def test_summary_matches_direct_computation_and_is_split_invariant():
    rng = np.random.default_rng(0)
    x = correlated_paths(rng, 1000)
    w = np.ones(x.shape[:2])
    w[::7, 2:] = 0  # some trajectories dropped from generation 3 on
    whole = summarize(block_moments(jnp.asarray(x), jnp.asarray(w)))
    parts = zero_moments(4, 3)
    for lo in range(0, 1000, 300):
        parts = merge_moments(parts, block_moments(jnp.asarray(x[lo:lo + 300]), jnp.asarray(w[lo:lo + 300])))
    split = summarize(parts)
    for a, b in zip(whole, split):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)

    for g in range(4):
        keep = w[:, g] > 0
        xg, x1 = x[keep, g], x[keep, 0]
        np.testing.assert_allclose(whole.cov[g], np.cov(xg.T), rtol=1e-12)
        ratio = xg.var(0, ddof=1).sum() / x1.var(0, ddof=1).sum()
        np.testing.assert_allclose(whole.variance_ratio[g], ratio, rtol=1e-12)
        np.testing.assert_allclose(whole.coord_ratio[g], xg.var(0) / x1.var(0), rtol=1e-12)
        np.testing.assert_allclose(whole.mse[g], (xg**2).sum(1).mean(), rtol=1e-12)
        assert whole.count[g] == keep.sum()


def test_delta_method_se_matches_replicate_spread():
    """The reported SE is the spread of the estimate over independent replicates."""
    rng = np.random.default_rng(1)
    reps, r = 400, 2000
    est, ses, mses, mse_ses = [], [], [], []
    for _ in range(reps):
        s = summarize(block_moments(jnp.asarray(correlated_paths(rng, r)), jnp.ones((r, 4))))
        est.append(s.variance_ratio[-1])
        ses.append(s.variance_ratio_se[-1])
        mses.append(s.mse[-1])
        mse_ses.append(s.mse_se[-1])
    # The standard deviation of 400 replicates is itself known to ~ 1/sqrt(2*400) = 3.5%:
    # a 5-sigma band is 18%.
    np.testing.assert_allclose(np.std(est, ddof=1), np.mean(ses), rtol=0.18)
    np.testing.assert_allclose(np.std(mses, ddof=1), np.mean(mse_ses), rtol=0.18)
    # and the intervals cover: 95% nominal, binomial SE ~1.1% over 400 replicates
    truth = np.sum(np.array([1.0, 0.25, 4.0]) * 4) / np.sum([1.0, 0.25, 4.0])
    cover = np.mean(np.abs(np.array(est) - truth) <= 1.96 * np.array(ses))
    assert abs(cover - 0.95) < 5 * np.sqrt(0.95 * 0.05 / reps)


def test_generation_one_ratio_is_exactly_one():
    rng = np.random.default_rng(2)
    s = summarize(block_moments(jnp.asarray(correlated_paths(rng, 50)), jnp.ones((50, 4))))
    assert s.variance_ratio[0] == 1.0 and s.variance_ratio_se[0] == 0.0
    np.testing.assert_array_equal(s.coord_ratio[0], 1.0)
