"""Data models: features, labels, and sufficient statistics drawn directly.

Features x ~ N(0, Sigma) with Sigma = L L^T; labels y = x.theta + sigma*eps
(``"ols"``) or y ~ Bernoulli(sigmoid(x.theta)) (``"logistic"``).

Every function takes its PRNG key first and is a pure function of its inputs:
the same key gives the same draws on every backend with the same PRNG
implementation (threefry by default).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _random


class ModelParams(NamedTuple):
    """Traced (non-shape) parameters of a simulation; changing them never recompiles."""

    theta0: jax.Array  # shape=(p,): the true parameter (p = d but for gaussian, see _models).
    sigma: jax.Array  # shape=(): label-noise sd (ols, ridge); point scale (gaussian, median).
    feature_chol: jax.Array  # shape=(d, d): lower Cholesky factor L of Sigma.
    design_matrix: jax.Array  # shape=(n, d) user design for design="fixed", else shape (0, d).
    # shape=(), int64: points per batch.  Read (traced) only by the sufficient-statistic
    # kernels, which draw nothing of size n, so one compiled kernel serves every n.
    n: jax.Array
    ridge_penalty: jax.Array | float = 0.0  # shape=(): lambda of model="ridge".


def sample_features(key: jax.Array, n: int, chol: jax.Array, isotropic: bool) -> jax.Array:
    """x_i ~ N(0, L L^T): shape (n, d), dtype of `chol`."""
    z = _random.normal(key, (n, chol.shape[0]), chol.dtype)
    return z if isotropic else z @ chol.T


def sample_labels(key: jax.Array, model: str, x: jax.Array, theta: jax.Array,
                  sigma: jax.Array) -> jax.Array:
    """Labels for features `x` (n, d) under parameter `theta` (d,): shape (n,)."""
    eta = x @ theta
    if model == "ols":
        return eta + sigma * _random.normal(key, eta.shape, eta.dtype)
    u = _random.uniform_open(key, eta.shape, eta.dtype)
    return (u < jax.nn.sigmoid(eta)).astype(eta.dtype)


def wishart_factor(key: jax.Array, n: int | jax.Array, chol: jax.Array,
                   isotropic: bool) -> jax.Array:
    """A lower-triangular C with C C^T distributed as X^T X, X (n, d) rows N(0, L L^T).

    Bartlett's decomposition: X^T X = L W L^T with W ~ Wishart_d(n, I) = B B^T,
    B lower triangular, B_ii = sqrt(chi^2_{n-i}) (i = 0..d-1), B_ij ~ N(0, 1)
    for i > j, all independent.  C = L B is then the Cholesky factor of
    X^T X.  Costs d(d+1)/2 draws instead of n d.  Shape (d, d).
    """
    d = chol.shape[0]
    kc, kz = jax.random.split(key)
    df = (n - jnp.arange(d)).astype(chol.dtype)
    chi2 = 2.0 * gamma_large_shape(kc, df / 2)
    z = _random.normal(kz, (d * (d - 1) // 2,), chol.dtype)  # the entries below the diagonal
    # Placed by a gather with constant indices, not a scatter: XLA's GPU backend runs
    # scatters serially under deterministic ops (`_compile`), 4.8x slower for OLS augment.
    entries = jnp.concatenate([z, jnp.sqrt(chi2), jnp.zeros((1,), chol.dtype)])
    b = entries[_bartlett_layout(d)]
    return b if isotropic else chol @ b


@functools.cache
def _bartlett_layout(d: int) -> np.ndarray:
    """(d, d) indices into [z (tril_indices(d, -1) order), sqrt(chi2) (d,), 0] giving B."""
    layout = np.full((d, d), d * (d - 1) // 2 + d)
    rows, cols = np.tril_indices(d, -1)
    layout[rows, cols] = np.arange(rows.size)
    layout[np.arange(d), np.arange(d)] = d * (d - 1) // 2 + np.arange(d)
    return layout


def ols_error(key: jax.Array, n: int | jax.Array, chol: jax.Array, isotropic: bool) -> jax.Array:
    """The error (X^T X)^{-1} X^T eps of one least-squares fit, drawn in O(d): shape (d,).

    For X (n, d) with rows N(0, L L^T) and eps ~ N(0, I_n), the error given X
    is N(0, (X^T X)^{-1}); for isotropic rows its law is rotation invariant
    with squared norm z^T W^{-1} z, W ~ Wishart_d(n, I), whose (1,1) inverse
    entry is 1 / chi^2_{n-d+1} independently of z.  Hence exactly

        (X^T X)^{-1} X^T eps  =_d  L^{-T} z / sqrt(chi^2_{n-d+1}),   z ~ N(0, I_d),

    a multivariate t with n - d + 1 degrees of freedom (mean 0, covariance
    Sigma^{-1} / (n - d - 1)).  d normals and one chi-square instead of n d
    normals or a Wishart draw.
    """
    d = chol.shape[0]
    kc, kz = jax.random.split(key)
    chi2 = 2.0 * gamma_large_shape(kc, jnp.full((1,), (n - d + 1) / 2, chol.dtype))
    u = _random.normal(kz, (d,), chol.dtype) / jnp.sqrt(chi2)
    if isotropic:
        return u
    return jax.scipy.linalg.solve_triangular(chol, u, lower=True, trans="T")


def _gamma_attempt(key: jax.Array, i, a: jax.Array):
    """Round `i` of Marsaglia-Tsang for shapes `a` (k,): (accepted (k,), candidate (k,))."""
    dd = a - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * dd)
    kx, ku = jax.random.split(jax.random.fold_in(key, i))
    x = _random.normal(kx, a.shape, a.dtype)
    u = _random.uniform_open(ku, a.shape, a.dtype)
    t = 1.0 + c * x
    v = t * t * t
    safe_v = jnp.where(t > 0, v, 1.0)
    ok = (t > 0) & (jnp.log(u) < 0.5 * x * x + dd - dd * safe_v + dd * jnp.log(safe_v))
    return ok, dd * safe_v


def _gamma_one(key: jax.Array, a: jax.Array) -> jax.Array:
    """One key: rounds 0, 1, 2, ... until every element of `a` (k,) has accepted."""
    ok, value = _gamma_attempt(key, 0, a)

    def body(state):
        i, done, value = state
        ok, cand = _gamma_attempt(key, i, a)
        return i + 1, done | ok, jnp.where(done, value, cand)

    init = (jnp.ones((), jnp.int32), ok, value)
    return jax.lax.while_loop(lambda s: ~jnp.all(s[1]), body, init)[2]


def _gamma_many(keys: jax.Array, a: jax.Array) -> jax.Array:
    """Keys (B,), shapes (B, k): the same draws as ``vmap(_gamma_one)``, cheaper.

    Round 0 runs for every row; rows with a rejected element then repeat,
    each with its own round counter, in a loop over at most B/8 rows at a
    time (gathered by ``nonzero``).  A vmapped while loop would instead run
    every round on all B rows while any row is left (3-4 rounds for B k =
    2 x 10^4 elements at acceptance ~0.99).  Each row draws exactly what
    `_gamma_one` draws for its key: results do not depend on the batch.
    """
    rows_total = a.shape[0]
    cap = max(1, rows_total // 8)
    done, value = jax.vmap(_gamma_attempt, (0, None, 0))(keys, 0, a)
    rounds = jnp.ones((rows_total,), jnp.int32)

    def body(state):
        done, value, rounds = state
        (rows,) = jnp.nonzero(~jnp.all(done, axis=1), size=cap, fill_value=rows_total)
        r = jnp.minimum(rows, rows_total - 1)  # padding rows compute, then are dropped below
        ok, cand = jax.vmap(_gamma_attempt)(keys[r], rounds[r], a[r])
        # Padding gets distinct out-of-range rows: all indices unique, so XLA need not
        # order the writes (its GPU backend serialises scatters that may collide).
        rows = jnp.where(rows < rows_total, rows, rows_total + jnp.arange(cap))
        put = dict(mode="drop", unique_indices=True)
        value = value.at[rows].set(jnp.where(done[r], value[r], cand), **put)
        done = done.at[rows].set(done[r] | ok, **put)
        rounds = rounds.at[rows].add(1, **put)
        return done, value, rounds

    return jax.lax.while_loop(lambda s: ~jnp.all(s[0]), body, (done, value, rounds))[1]


@jax.custom_batching.custom_vmap
def gamma_large_shape(key: jax.Array, shape_param: jax.Array) -> jax.Array:
    """Exact Gamma(a, 1) draws for a >= 1 by Marsaglia & Tsang's (2000) method.

    Each round draws one normal and one uniform per element and accepts with
    probability >= 0.95 (> 0.98 for a >= 5); rounds repeat until every
    element has accepted, so the result is exact, not truncated.  Round i
    uses ``fold_in(key, i)``.  Much cheaper than ``jax.random.gamma`` for
    these shapes, whose generic sampler carries per-element key splitting.
    Under ``vmap`` a batching rule runs the rare repeat rounds only on the
    rows that need them (see `_gamma_many`); each row's draws are the ones
    it gets unbatched (up to floating-point rounding of differently fused
    code, ~1e-16 relative).

    **Arguments:** `key`; `shape_param` (k,) float, every entry >= 1.
    **Returns:** (k,) draws, dtype of `shape_param`.
    """
    return _gamma_one(key, shape_param)


@gamma_large_shape.def_vmap
def _gamma_large_shape_vmap(axis_size, in_batched, key, shape_param):
    key_batched, shape_batched = in_batched
    if not key_batched:
        key = jnp.broadcast_to(key, (axis_size,) + key.shape)
    if not shape_batched:
        shape_param = jnp.broadcast_to(shape_param, (axis_size,) + shape_param.shape)
    return _gamma_many(key, shape_param), True
