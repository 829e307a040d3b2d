"""Estimators: pure, vmappable fits that report whether they succeeded.

Both fits return a `FitResult`.  A failed fit (singular design, separable
logistic data, non-convergence, non-finite values) has ``converged=False``;
its ``theta`` is then the starting value, so callers never carry NaN or inf
forward.  Nothing here draws random numbers: results are deterministic
functions of the inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular


class FitResult(NamedTuple):
    theta: jax.Array  # shape=(d,), dtype of the data: the estimate.
    iterations: jax.Array  # shape=(), dtype=int32: Newton steps taken (0 for closed forms).
    converged: jax.Array  # shape=(), dtype=bool: the fit is trustworthy.


def _cholesky_ok(chol: jax.Array) -> jax.Array:
    """Whether a Cholesky factor is finite and not numerically singular.

    The design is declared singular when the squared ratio of the smallest to
    the largest diagonal entry of the factor (a cheap proxy for 1/cond) falls
    below d * eps of the dtype.
    """
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    eps = jnp.finfo(chol.dtype).eps
    finite = jnp.all(jnp.isfinite(chol))
    dmin, dmax = jnp.min(diag), jnp.max(diag)
    return finite & (dmin > 0) & ((dmin / dmax) ** 2 > diag.shape[-1] * eps)


def solve_normal_equations(xtx: jax.Array, xty: jax.Array, fallback: jax.Array) -> FitResult:
    """Least squares from sufficient statistics: theta = (X^T X)^{-1} X^T y.

    **Arguments:**

    - `xtx`: shape (d, d), the (weighted) Gram matrix X^T W X.
    - `xty`: shape (d,), X^T W y.
    - `fallback`: shape (d,), returned as theta when the Gram matrix is singular.

    **Returns:** `FitResult` (Cholesky solve; ``converged`` is False for a
    numerically singular or non-finite system).
    """
    chol = jnp.linalg.cholesky(xtx)
    theta = cho_solve((chol, True), xty)
    ok = _cholesky_ok(chol) & jnp.all(jnp.isfinite(theta))
    return FitResult(jnp.where(ok, theta, fallback), jnp.zeros((), jnp.int32), ok)


def least_squares(x: jax.Array, y: jax.Array, weights: jax.Array | None = None,
                  fallback: jax.Array | None = None) -> FitResult:
    """Weighted least squares on explicit data via the normal equations.

    **Arguments:** `x` (m, d); `y` (m,); `weights` (m,) non-negative
    (multiplicities or a 0/1 mask; default ones); `fallback` (d,) default zeros.
    """
    if weights is None:
        weights = jnp.ones(y.shape, x.dtype)
    if fallback is None:
        fallback = jnp.zeros(x.shape[-1], x.dtype)
    xw = x * weights[:, None]
    return solve_normal_equations(xw.T @ x, xw.T @ y, fallback)


def logistic_newton(x: jax.Array, y: jax.Array, weights: jax.Array | None = None,
                    theta_init: jax.Array | None = None, max_iterations: int = 50) -> FitResult:
    """Logistic-regression MLE by Newton's method with Cholesky solves.

    Maximises sum_i w_i [y_i x_i.theta - log(1 + exp(x_i.theta))].  Targets
    may be fractional (label averages over repeated designs with matching
    weights give the pooled MLE).

    Stopping test: a step with max|step| <= sqrt(eps) * (1 + max|theta|) is
    taken and the fit is declared converged (Newton converges quadratically,
    so the error after that step is O(eps)).  It fails (``converged=False``,
    theta = `theta_init`) if the Hessian is numerically singular (separable
    or degenerate data drive it to zero), anything becomes non-finite, or
    `max_iterations` steps pass without meeting the test (divergence along a
    separating direction).

    **Arguments:** `x` (m, d); `y` (m,) in [0, 1]; `weights` (m,) >= 0
    (default ones); `theta_init` (d,) warm start (default zeros);
    `max_iterations` static int.

    **Returns:** `FitResult` with the number of Newton steps taken.
    """
    dtype = x.dtype
    if weights is None:
        weights = jnp.ones(y.shape, dtype)
    if theta_init is None:
        theta_init = jnp.zeros(x.shape[-1], dtype)
    tol = jnp.sqrt(jnp.finfo(dtype).eps)

    def step(theta):
        eta = x @ theta
        p = jax.nn.sigmoid(eta)
        grad = x.T @ (weights * (y - p))
        hess = (x * (weights * p * (1 - p))[:, None]).T @ x
        chol = jnp.linalg.cholesky(hess)
        delta = cho_solve((chol, True), grad)
        return delta, _cholesky_ok(chol)

    def cond(state):
        _, it, done, failed = state
        return (~done) & (~failed) & (it < max_iterations)

    def body(state):
        theta, it, _, _ = state
        delta, ok = step(theta)
        new = theta + delta
        ok = ok & jnp.all(jnp.isfinite(new))
        small = jnp.max(jnp.abs(delta)) <= tol * (1 + jnp.max(jnp.abs(theta)))
        return jnp.where(ok, new, theta), it + 1, ok & small, ~ok

    theta, it, done, _ = jax.lax.while_loop(
        cond, body, (theta_init, jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), bool))
    )
    return FitResult(jnp.where(done, theta, theta_init), it, done)


def triangular_solve_transposed(chol: jax.Array, v: jax.Array) -> jax.Array:
    """Solve L^T u = v for lower-triangular L: (d, d), (d,) -> (d,)."""
    return solve_triangular(chol, v, lower=True, trans="T")
