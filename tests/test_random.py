"""Uniforms and normals by inversion: float64 references (scipy), laws within 5 SE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from collapse_jax import _random


def test_ndtri_matches_scipy_to_float64_precision():
    rng = np.random.default_rng(0)
    tail = 10.0 ** rng.uniform(-16, np.log10(0.075), 200_000)  # the two tail regions
    p = np.concatenate([rng.uniform(0, 1, 200_000), tail, 1 - tail,
                        [2.0**-53, 1 - 2.0**-53, 0.075, 0.925, 0.5, 1e-11, 1.4e-11]])
    got = np.asarray(jax.jit(_random.ndtri)(jnp.asarray(p)))
    ref = special.ndtri(p)
    # relative error, measured against the spacing at |z| >= 1e-3 and absolute below
    err = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-3)
    assert err.max() < 4e-15, err.max()
    assert got[np.argmin(p)] < -8.2  # the smallest uniform, 2^-53, reaches -8.21 sigma


@pytest.mark.parametrize("dtype, bits", [(jnp.float64, 52), (jnp.float32, 23)])
def test_uniform_open_lies_on_the_half_offset_grid_inside_0_1(dtype, bits):
    u = np.asarray(_random.uniform_open(jax.random.key(1, impl="philox4x32"), (400_000,), dtype),
                   np.float64)
    assert u.min() > 0 and u.max() < 1
    k = u * 2.0**bits - 0.5
    np.testing.assert_array_equal(k, np.round(k))  # (k + 1/2) 2^-bits exactly
    n = len(u)
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)


@pytest.mark.parametrize("impl", ["philox4x32", "threefry2x32"])
def test_normal_is_standard_normal(impl):
    n = 1_000_000
    z = np.asarray(jax.jit(lambda k: _random.normal(k, (n,)))(jax.random.key(2, impl=impl)))
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs((z**4).mean() - 3) < 5 * np.sqrt(96 / n)
    # tail mass beyond 3 sigma (where the tail rational takes over) against 2 Q(3)
    q = 2 * stats.norm.sf(3)
    assert abs(np.mean(np.abs(z) > 3) - q) < 5 * np.sqrt(q * (1 - q) / n)


def test_normal_prefix_property():
    """Counter-based keys: a longer draw starts with the shorter draw (the limit process
    relies on this across generation counts)."""
    for impl in ("philox4x32", "threefry2x32"):
        key = jax.random.key(3, impl=impl)
        long = np.asarray(_random.normal(key, (7, 3, 2)))
        short = np.asarray(_random.normal(key, (4, 3, 2)))
        np.testing.assert_array_equal(long[:4], short)


def test_uniform_open_rejects_other_dtypes():
    with pytest.raises(ValueError, match="float32 and float64"):
        _random.uniform_open(jax.random.key(0), (3,), jnp.int32)


@pytest.mark.parametrize("impl", ["philox4x32", "threefry2x32"])
def test_normal_inverts_the_bits_jax_random_normal_uses(impl):
    """Same key, same 52 bits, midpoint instead of left edge of the grid cell: the draws
    agree with float64 jax.random.normal far below any Monte Carlo error, not bit for bit."""
    key = jax.random.key(4, impl=impl)
    ours = np.asarray(_random.normal(key, (200_000,)))
    theirs = np.asarray(jax.random.normal(key, (200_000,), jnp.float64))
    assert np.max(np.abs(ours - theirs)) < 1e-9
    assert not np.array_equal(ours, theirs)
