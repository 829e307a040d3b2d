"""Samplers: exact laws, checked by KS tests and moments within 5 SE."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from collapse_jax._data import gamma_large_shape, wishart_factor


def test_gamma_large_shape_is_exact():
    shapes = jnp.asarray([1.0, 1.5, 4.5, 50.0])
    keys = jax.random.split(jax.random.key(0), 100_000)
    x = np.asarray(jax.jit(jax.vmap(lambda k: gamma_large_shape(k, shapes)))(keys))
    for j, a in enumerate(np.asarray(shapes)):
        assert stats.kstest(x[:, j], stats.gamma(a).cdf).pvalue > 1e-4
        se = np.sqrt(a / len(x))
        assert abs(x[:, j].mean() - a) < 5 * se


def test_wishart_factor_moments():
    """C C^T ~ X^T X: E = n Sigma and E (X^T X)^{-1} = Sigma^{-1} / (n - d - 1)."""
    n, d = 9, 3
    sigma = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    chol = jnp.asarray(np.linalg.cholesky(sigma))
    keys = jax.random.split(jax.random.key(1), 200_000)
    c = np.asarray(jax.jit(jax.vmap(lambda k: wishart_factor(k, n, chol, False)))(keys))
    assert np.allclose(np.triu(c[0], 1), 0)
    w = c @ np.swapaxes(c, 1, 2)
    se = w.std(0) / np.sqrt(len(w))
    assert np.all(np.abs(w.mean(0) - n * sigma) < 5 * se)
    inv = np.linalg.inv(w)
    se_inv = inv.std(0) / np.sqrt(len(w))
    assert np.all(np.abs(inv.mean(0) - np.linalg.inv(sigma) / (n - d - 1)) < 5 * se_inv)
    # against explicit data: the law of the smallest eigenvalue (KS, two samples)
    x = np.random.default_rng(0).normal(size=(20_000, n, d)) @ np.linalg.cholesky(sigma).T
    lam_data = np.linalg.eigvalsh(np.swapaxes(x, 1, 2) @ x)[:, 0]
    lam_bart = np.linalg.eigvalsh(w[:20_000])[:, 0]
    assert stats.ks_2samp(lam_data, lam_bart).pvalue > 1e-4


def test_gamma_batching_rule_draws_what_each_key_draws_alone():
    """Under vmap the repeat rounds run on a gathered subset; each row must still get the
    draws its own key gives unbatched (up to rounding of differently fused code)."""
    shapes = jnp.asarray([1.0, 1.5, 3.0, 50.0])  # a = 1: acceptance ~0.95, many repeat rounds
    keys = jax.random.split(jax.random.key(5, impl="philox4x32"), 600)
    batched = np.asarray(jax.jit(jax.vmap(lambda k: gamma_large_shape(k, shapes)))(keys))
    one = jax.jit(lambda k: gamma_large_shape(k, shapes))  # unbatched: no vmap rule
    alone = np.stack([np.asarray(one(k)) for k in keys[:40]])
    np.testing.assert_allclose(batched[:40], alone, rtol=1e-14, atol=0)
    # nested vmap (e.g. a vmapped engine inside another vmap) takes the same rows
    draw = jax.vmap(jax.vmap(lambda k: gamma_large_shape(k, shapes)))
    nested = jax.jit(draw)(keys.reshape(20, 30))
    np.testing.assert_allclose(np.asarray(nested).reshape(600, 4), batched, rtol=1e-14, atol=0)
