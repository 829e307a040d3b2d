"""Estimators: pure, vmappable fits that report whether they succeeded.

Every fit returns a `FitResult`: least squares and ridge (Cholesky of the
normal equations), logistic and Poisson regression (one canonical-link GLM
Newton routine), the Gaussian sample mean and covariance, the sample median
(also exactly over a pool of sorted batches).  A failed fit (singular design
or covariance, separable logistic or all-zero Poisson data, non-convergence,
non-finite values) has ``converged=False``;
its ``theta`` is then the starting value, so callers never carry NaN or inf
forward.  Nothing here draws random numbers: results are deterministic
functions of the inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._small_linalg import cholesky, conditioning_ok, lapack_spd_solve, spd_solve


class FitResult(NamedTuple):
    theta: jax.Array  # shape=(d,), dtype of the data: the estimate.
    iterations: jax.Array  # shape=(), dtype=int32: Newton steps taken (0 for closed forms).
    converged: jax.Array  # shape=(), dtype=bool: the fit is trustworthy.


def _cholesky_ok(chol: jax.Array) -> jax.Array:
    """Whether a Cholesky factor is finite and not numerically singular (`conditioning_ok`;
    the factored matrix's diagonal is the squared row norms of the factor)."""
    return conditioning_ok(jnp.diagonal(chol, axis1=-2, axis2=-1), jnp.all(jnp.isfinite(chol)),
                           jnp.sum(chol * chol, axis=-1))


def solve_normal_equations(xtx: jax.Array, xty: jax.Array, fallback: jax.Array) -> FitResult:
    """Least squares from sufficient statistics: theta = (X^T X)^{-1} X^T y.

    **Arguments:**

    - `xtx`: shape (d, d), the (weighted) Gram matrix X^T W X.
    - `xty`: shape (d,), X^T W y.
    - `fallback`: shape (d,), returned as theta when the Gram matrix is singular.

    **Returns:** `FitResult` (Cholesky solve by `spd_solve`; ``converged`` is
    False for a numerically singular or non-finite system).
    """
    theta, ok = spd_solve(xtx, xty)
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
                    theta_init: jax.Array | None = None, max_iterations: int = 50,
                    ridge: jax.Array | None = None) -> FitResult:
    """Logistic-regression MLE by Newton's method with Cholesky solves.

    Maximises sum_i w_i [y_i x_i.theta - log(1 + exp(x_i.theta))].  Targets
    may be fractional (label averages over repeated designs with matching
    weights give the pooled MLE).

    Stopping test: a step with max|step| <= sqrt(eps) * (1 + max|theta|) is
    taken and the fit is declared converged (Newton converges quadratically,
    so the error after that step is O(eps)).  It fails (``converged=False``,
    theta = `theta_init`) as soon as an iterate separates the data (see
    `separates`: then no MLE exists; without a ridge only), if the Hessian
    is numerically singular (degenerate data, or separable data that no
    iterate has separated yet), anything becomes non-finite, or
    `max_iterations` steps pass without meeting the test (divergence along a
    direction that separates the data only weakly).

    **Arguments:** `x` (m, d); `y` (m,) in [0, 1]; `weights` (m,) >= 0
    (default ones); `theta_init` (d,) warm start (default zeros);
    `max_iterations` static int; `ridge` (d,) >= 0 or None (default): per-
    coordinate penalties, maximising the objective above minus
    (1/2) sum_j ridge_j theta_j^2 (a zero entry leaves that coordinate, e.g.
    an intercept, unpenalised; None is the plain MLE, the same code path).

    **Returns:** `FitResult` with the number of Newton steps taken.
    """
    return glm_newton(x, y, weights, theta_init, max_iterations, ridge, family="logistic")


def poisson_newton(x: jax.Array, y: jax.Array, weights: jax.Array | None = None,
                   theta_init: jax.Array | None = None, max_iterations: int = 50) -> FitResult:
    """Poisson-regression (log link) MLE by Newton's method with Cholesky solves.

    Maximises sum_i w_i [y_i x_i.theta - exp(x_i.theta)] (counts y_i >= 0;
    fractional targets with matching weights give pooled fits, as for
    `logistic_newton`).  Same stopping rule and failure flags as
    `logistic_newton`: the MLE does not exist when the counts are all zero
    (or zero on one side of a hyperplane through the data); Newton then
    drives exp(x.theta) to zero, the Hessian becomes numerically singular or
    the iteration cap is hit, and ``converged`` is False.

    **Arguments / Returns:** as `logistic_newton` (`y` (m,) >= 0).
    """
    return glm_newton(x, y, weights, theta_init, max_iterations, None, family="poisson")


def glm_newton(x: jax.Array, y: jax.Array, weights: jax.Array | None = None,
               theta_init: jax.Array | None = None, max_iterations: int = 50,
               ridge: jax.Array | None = None, family: str = "logistic") -> FitResult:
    """Canonical-link GLM MLE by Newton's method: the routine behind `logistic_newton`
    and `poisson_newton` (see their docstrings for the objective, stopping rule
    and failure flags).

    With cumulant b (``family="logistic"``: b(eta) = log(1 + e^eta);
    ``"poisson"``: b(eta) = e^eta) it maximises
    sum_i w_i [y_i eta_i - b(eta_i)] - (1/2) sum_j ridge_j theta_j^2, eta = x theta:
    gradient x^T w (y - b'(eta)) - ridge theta, Hessian x^T diag(w b''(eta)) x + diag(ridge).
    `family` is static.
    """
    _check_family(family)
    dtype = x.dtype
    if weights is None:
        weights = jnp.ones(y.shape, dtype)
    if theta_init is None:
        theta_init = jnp.zeros(x.shape[-1], dtype)
    return _newton(lambda theta: _glm_terms(family, x, y, weights, theta), theta_init,
                   max_iterations, ridge, dtype)


def separates(family: str, y: jax.Array, weights: jax.Array, eta: jax.Array) -> jax.Array:
    """Whether linear predictors `eta` = x theta separate the data: then no MLE exists.

    Logistic: True when every point of positive weight has y = 1 and eta > 0,
    or y = 0 and eta < 0 (complete separation).  Each term of the
    log-likelihood sum_i w_i [y_i eta_i - log(1 + e^eta_i)] then increases
    strictly to 0 along t theta as t grows, and every finite theta has a
    log-likelihood below 0, so no finite maximiser exists (Albert & Anderson
    1984).  A certificate: False whenever the MLE exists; a fractional
    target (0 < y < 1) never separates.  Data separable only with some
    eta_i = 0 (quasi-complete separation) have no MLE either but are not
    caught here: Newton fails on them by its other tests.  Poisson: always
    False (not checked).

    **Arguments:** `family` (static); `y`, `weights`, `eta` (m,).
    **Returns:** () bool.  Under vmap, per problem.
    """
    if family != "logistic":
        return jnp.zeros((), bool)
    right = ((y == 1) & (eta > 0)) | ((y == 0) & (eta < 0))
    return jnp.all(right | (weights <= 0))


# A Newton step of the pooled fit that moves theta by at most this much (relative to
# 1 + max|theta|) hands over to steps that reuse its Hessian (`_newton_reusing_hessian`).
HESSIAN_REUSE_BELOW = 1e-3


def glm_newton_pooled(x_chunks: tuple[jax.Array, ...], y_chunks: tuple[jax.Array, ...],
                      batches: jax.Array, theta_init: jax.Array, max_iterations: int = 50,
                      family: str = "logistic") -> tuple[FitResult, jax.Array]:
    """The `glm_newton` MLE (unit weights, no ridge) on the first `batches` batches of a pool.

    The fit of the pooled workflows (augment with fresh features).  The pool
    is stored as chunks of whole batches: chunk k holds the batches after
    those of chunks 0..k-1.  Every pass over the data visits only the chunks
    that hold one of the first `batches` batches (a `lax.cond` per chunk;
    batches past `batches` in the last visited chunk get weight 0), so a fit
    on g batches costs ~g batches of work however large the pool, and one
    compiled step serves every g.  Chunks are separate arrays so that a pass
    reads them in place (slicing one buffer copied the data on every pass).

    Newton's method, reusing a Hessian while it contracts
    (`_newton_reusing_hessian`): Newton steps until one moves theta by at
    most ``HESSIAN_REUSE_BELOW (1 + max|theta|)``, then steps
    ``H^{-1} gradient(theta)`` with that step's Hessian H, each one gradient
    pass instead of a gradient-and-Hessian pass (~3.4x the cost at d = 10),
    back to Newton steps whenever such a step fails to halve the previous
    step.  It stops on `glm_newton`'s rule, max|step| <= sqrt(eps)(1 +
    max|theta|), at the same MLE: within ~tol of `glm_newton`'s iterate
    (tested), since a reused-Hessian step that halves the previous step
    leaves an error below its own size.  Failure flags as in `glm_newton`
    (a Newton step from an iterate that separates the pool, `separates`; a
    non-finite or singular Newton step; or `max_iterations` steps of either
    kind without meeting the rule).

    **Arguments:** `x_chunks`: (c_k, n, d) arrays; `y_chunks`: (c_k, n), the
    same c_k; every entry finite (unused batches included); `batches` ()
    int, 1 <= batches <= sum c_k; `theta_init` (d,); `max_iterations`,
    `family` static.  Under `vmap`, an unbatched `batches` (the generation
    counter) keeps the conds real branches, the same for every trajectory.

    **Returns:** ``(FitResult, hessian)``: `iterations` counts steps of both
    kinds (passes over the pool); `hessian` (d, d) is the Hessian of the last
    Newton step, taken within ``HESSIAN_REUSE_BELOW (1 + max|theta|)`` of the
    returned estimate (meaningless where the fit failed), which
    `extended_pool_start` uses to start the fit on the pool with one more
    batch.  Deterministic; a trajectory's iterates do not depend on which
    others share its vmapped block.
    """
    _check_family(family)
    if len(x_chunks) != len(y_chunks) or any(
        xc.shape[:2] != yc.shape for xc, yc in zip(x_chunks, y_chunks)
    ):
        raise ValueError("x_chunks and y_chunks must hold the same batches: shapes "
                         f"{[xc.shape for xc in x_chunks]} vs {[yc.shape for yc in y_chunks]}")
    n, d = x_chunks[0].shape[1:]
    dtype = x_chunks[0].dtype
    starts = np.cumsum([0] + [xc.shape[0] for xc in x_chunks[:-1]])

    def over_chunks(per_chunk, zero):
        acc = zero
        for start, xc, yc in zip(starts, x_chunks, y_chunks):
            def add(acc, xc=xc, yc=yc, start=int(start)):
                size = xc.shape[0]
                w = jnp.repeat((start + jnp.arange(size) < batches).astype(dtype), n)
                terms = per_chunk(xc.reshape(size * n, d), yc.reshape(size * n), w)
                return jax.tree.map(jnp.add, acc, terms)

            acc = jax.lax.cond(start < batches, add, lambda acc: acc, acc)
        return acc

    def gradient_and_hessian(theta):
        def per_chunk(x, y, w):
            grad, hess, separated = _glm_terms(family, x, y, w, theta)
            return grad, hess, (~separated).astype(jnp.int32)

        zero = (jnp.zeros((d,), dtype), jnp.zeros((d, d), dtype), jnp.zeros((), jnp.int32))
        grad, hess, unseparated_chunks = over_chunks(per_chunk, zero)
        return grad, hess, unseparated_chunks == 0

    def gradient(theta):
        return over_chunks(lambda x, y, w: _glm_gradient(family, x, y, w, theta),
                           jnp.zeros((d,), dtype))

    return _newton_reusing_hessian(gradient_and_hessian, gradient, theta_init, max_iterations,
                                   dtype)


def _check_family(family: str) -> None:
    if family not in ("logistic", "poisson"):
        raise ValueError(f"unknown GLM family {family!r}")


def _glm_terms(family: str, x, y, weights, theta):
    """Gradient x^T w (y - b'(eta)) and Hessian x^T diag(w b''(eta)) x at theta, and
    `separates` at theta: ``(gradient (d,), Hessian (d, d), separated () bool)``.

    Both from one product x^T [diag(w b''(eta)) x | w (y - b'(eta))], (d, d + 1).
    With a product of its own, XLA's GPU backend lowered the gradient as a
    reduction over the points fused with writing diag(c) x out, 5.5-6.7 ms a
    call on (8,192, 1,300, 10) (profiled on an H100); this way the pooled
    logistic fit ran 2.75x faster there, and level on the CPU
    (docs/performance.md).
    """
    eta = x @ theta
    p = _glm_mean(family, eta)
    curvature = weights * p * (1 - p) if family == "logistic" else weights * p
    both = x.T @ jnp.concatenate([x * curvature[:, None], (weights * (y - p))[:, None]], axis=1)
    return both[:, -1], both[:, :-1], separates(family, y, weights, eta)


def _glm_gradient(family: str, x, y, weights, theta):
    """The gradient of `_glm_terms` alone."""
    return x.T @ (weights * (y - _glm_mean(family, x @ theta)))


def _glm_mean(family: str, eta):
    """The mean b'(eta): sigmoid (logistic) or exp (Poisson)."""
    return jax.nn.sigmoid(eta) if family == "logistic" else jnp.exp(eta)


def _newton(terms, theta_init, max_iterations: int, ridge, dtype) -> FitResult:
    """Newton's method on `terms(theta) -> (gradient, Hessian, separated)` with
    `glm_newton`'s rules (tolerance from the data's `dtype`); a step from a theta
    that separates the data fails the fit."""
    tol = jnp.sqrt(jnp.finfo(dtype).eps)

    def step(theta):
        grad, hess, separated = terms(theta)
        if ridge is not None:  # a penalised MLE exists whatever the data
            grad = grad - ridge * theta
            hess = hess + jnp.diag(ridge)
            separated = jnp.zeros((), bool)
        delta, ok = spd_solve(hess, grad)
        return delta, ok & ~separated

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


def _newton_reusing_hessian(gradient_and_hessian, gradient, theta_init, max_iterations: int,
                            dtype) -> tuple[FitResult, jax.Array]:
    """Newton's method that reuses a Hessian while it contracts (a chord or Shamanskii method).

    Rounds of: Newton steps (`gradient_and_hessian(theta) -> (gradient, H,
    separated)`, keeping H and H^{-1}; a step from a separating theta fails the
    fit) until a step is below ``HESSIAN_REUSE_BELOW (1 + max|theta|)``; then steps
    ``H^{-1} gradient(theta)`` while each is at most half the one before (a
    step that is not is discarded and the next round starts with a Newton
    step at the same theta).  Near the MLE such steps contract by a factor
    ~|H^{-1}(H - H*)|, so the error after a step is below the step itself and
    `_newton`'s stopping rule keeps its meaning.  Under `vmap` the rounds and
    both inner loops run until the block's slowest problem is done; finished
    problems are frozen, so each problem's iterates are its own.

    Returns ``(FitResult, H)``, H (d, d) the last Newton step's Hessian.
    """
    tol = jnp.sqrt(jnp.finfo(dtype).eps)
    d = theta_init.shape[-1]
    eye = jnp.eye(d, dtype=dtype)
    inverse = jax.vmap(spd_solve, in_axes=(None, 0), out_axes=(1, 0))  # solves against I's columns

    # State: theta, H, H^{-1}, last step's max|.|, steps, done, failed, reusing (the round's phase).
    def active(s):
        _, _, _, _, it, done, failed, _ = s
        return ~done & ~failed & (it < max_iterations)

    def newton_step(s):
        theta, _, _, _, it, _, _, _ = s
        grad, hess, separated = gradient_and_hessian(theta)
        hess_inv, ok = inverse(hess, eye)
        delta = hess_inv @ grad
        new = theta + delta
        ok = jnp.all(ok) & jnp.all(jnp.isfinite(new)) & ~separated
        size = jnp.max(jnp.abs(delta))
        scale = 1 + jnp.max(jnp.abs(theta))
        return (jnp.where(ok, new, theta), hess, hess_inv, size, it + 1,
                ok & (size <= tol * scale), ~ok, ok & (size <= HESSIAN_REUSE_BELOW * scale))

    def reused_step(s):
        theta, hess, hess_inv, last, it, _, failed, _ = s
        delta = hess_inv @ gradient(theta)
        new = theta + delta
        size = jnp.max(jnp.abs(delta))
        keep = jnp.all(jnp.isfinite(new)) & (size <= 0.5 * last)
        small = size <= tol * (1 + jnp.max(jnp.abs(theta)))
        return (jnp.where(keep, new, theta), hess, hess_inv, size, it + keep.astype(jnp.int32),
                keep & small, failed, keep)

    def round_(s):
        s = jax.lax.while_loop(lambda s: active(s) & ~s[-1], newton_step,
                               s[:-1] + (jnp.zeros((), bool),))
        return jax.lax.while_loop(lambda s: active(s) & s[-1], reused_step, s)

    false = jnp.zeros((), bool)
    init = (theta_init, eye, eye, jnp.asarray(jnp.inf, dtype), jnp.zeros((), jnp.int32), false,
            false, false)
    theta, hess, _, _, it, done, _, _ = jax.lax.while_loop(active, round_, init)
    return FitResult(jnp.where(done, theta, theta_init), it, done), hess


def extended_pool_start(family: str, x: jax.Array, y: jax.Array, theta: jax.Array,
                        hessian: jax.Array) -> jax.Array:
    """Where to start the MLE of a pool extended by the batch (x, y): one step from `theta`.

    `theta` is the MLE of the pool before the batch and `hessian` that
    pool's Hessian near it (what `glm_newton_pooled` returns; zeros for an
    empty pool).  The pool's own gradient vanishes at `theta` up to the
    stopping rule, so the first Newton step on the extended pool is
    ``(H_pool + H_b)^{-1} g_b``, with g_b and H_b the batch's gradient and
    Hessian at `theta`; this is that step with H_pool taken at the last
    Newton iterate (within ``HESSIAN_REUSE_BELOW (1 + max|theta|)``): one
    pass over the n points of the batch instead of a Newton pass over the
    whole pool.  For an empty pool it is the exact first Newton step.  The
    fit from there meets the same stopping rule at the same MLE; only the
    number of passes changes.

    **Arguments:** `family` (static), `x` (n, d), `y` (n,), `theta` (d,),
    `hessian` (d, d).  **Returns:** (d,); `theta` itself where the solve is
    singular or the step not finite (after a failed fit, say).
    """
    grad, hess, _ = _glm_terms(family, x, y, jnp.ones(y.shape, x.dtype), theta)
    # Once per generation, off the Newton loop: LAPACK, whose code does not grow with d
    # (the unrolled solve added ~2.5 s to the kernel's compile time at d = 10).
    step, ok = lapack_spd_solve(hessian + hess, grad)
    return jnp.where(ok, theta + step, theta)


def ridge_regression(x: jax.Array, y: jax.Array, penalty: jax.Array,
                     weights: jax.Array | None = None,
                     fallback: jax.Array | None = None) -> FitResult:
    """Ridge regression with a fixed penalty: the minimiser of

        sum_i w_i (y_i - x_i.theta)^2 + penalty ||theta||^2,
        theta = (X^T W X + penalty I)^{-1} X^T W y,

    over the data given (the penalty is not rescaled with the number of
    points).  Linear in y.  ``penalty = 0`` is `least_squares`.

    **Arguments:** `x` (m, d); `y` (m,); `penalty` () >= 0 (traced);
    `weights` (m,) >= 0 multiplicities (default ones); `fallback` (d,)
    (default zeros).  **Returns:** `FitResult` (flagged as `least_squares`).
    """
    if weights is None:
        weights = jnp.ones(y.shape, x.dtype)
    if fallback is None:
        fallback = jnp.zeros(x.shape[-1], x.dtype)
    xw = x * weights[:, None]
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return solve_normal_equations(xw.T @ x + penalty * eye, xw.T @ y, fallback)


# ---------------------------------------------------------------------------
# Gaussian location-scale: theta = (mu, vech Sigma)
# ---------------------------------------------------------------------------


def vech(s: jax.Array) -> jax.Array:
    """The lower triangle of symmetric (..., d, d) matrices, row by row: (..., d(d+1)/2).

    Entries (i, j), i >= j, in ``numpy.tril_indices(d)`` order.
    """
    rows, cols = np.tril_indices(s.shape[-1])
    return s[..., rows, cols]


def unvech(v: jax.Array, d: int) -> jax.Array:
    """Inverse of `vech`: (..., d(d+1)/2) -> symmetric (..., d, d) (exactly symmetric)."""
    rows, cols = np.tril_indices(d)
    index = np.zeros((d, d), np.int64)
    index[rows, cols] = np.arange(rows.size)
    index[cols, rows] = np.arange(rows.size)
    return v[..., index]


def gaussian_from_scatter(mean: jax.Array, scatter: jax.Array, count: jax.Array,
                          fallback: jax.Array) -> FitResult:
    """theta = (mean, vech(scatter / (count - 1))): the unbiased sample covariance.

    Fails (``converged=False``, theta = `fallback`) when the covariance is
    numerically singular by the Cholesky test of `least_squares` (all points
    on a hyperplane: too few distinct points) or anything is non-finite.

    **Arguments:** `mean` (d,); `scatter` (d, d) = sum_i w_i (x_i - mean)(x_i - mean)^T;
    `count` () = sum_i w_i > 1; `fallback` (d + d(d+1)/2,).
    """
    cov = scatter / (count - 1)
    chol = cholesky(cov)
    theta = jnp.concatenate([mean, vech(cov)])
    ok = _cholesky_ok(chol) & jnp.all(jnp.isfinite(theta))
    return FitResult(jnp.where(ok, theta, fallback), jnp.zeros((), jnp.int32), ok)


def merge_scatter(count_a, mean_a, scatter_a, count_b, mean_b, scatter_b):
    """(count, mean, scatter) of the union of two samples (Chan, Golub & LeVeque's update).

    Numerically stable (no sum of squares minus a squared sum): shapes (), (d,), (d, d).
    """
    count = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    scatter = scatter_a + scatter_b + jnp.outer(delta, delta) * (count_a * count_b / count)
    return count, mean, scatter


def gaussian_fit(x: jax.Array, weights: jax.Array | None = None,
                 fallback: jax.Array | None = None) -> FitResult:
    """Sample mean and unbiased sample covariance (normaliser 1 / (m - 1)) of points.

    With integer multiplicities `weights` (0 drops a point) this is the fit
    on the expanded multiset (``numpy.cov(x.T, fweights=w)``), m = sum w.

    **Arguments:** `x` (m, d); `weights` (m,) (default ones); `fallback`
    (d + d(d+1)/2,) (default zeros).  **Returns:** `FitResult` with theta =
    (mu, vech Sigma) (see `gaussian_from_scatter` for the failure flag).
    """
    m, d = x.shape
    if weights is None:
        weights = jnp.ones((m,), x.dtype)
    if fallback is None:
        fallback = jnp.zeros(d + d * (d + 1) // 2, x.dtype)
    count = jnp.sum(weights)
    mean = (weights @ x) / count
    xc = x - mean[None, :]
    return gaussian_from_scatter(mean, (xc * weights[:, None]).T @ xc, count, fallback)


# ---------------------------------------------------------------------------
# Location by the sample median
# ---------------------------------------------------------------------------


def sample_median(x: jax.Array, weights: jax.Array | None = None,
                  fallback: jax.Array | None = None) -> FitResult:
    """Coordinatewise sample median, numpy's convention (mean of the two middle values).

    With integer multiplicities `weights` (0 drops a point) it is the median
    of the expanded multiset.  Fails only on non-finite input or zero total weight.

    **Arguments:** `x` (m, d); `weights` (m,) or None (all ones: one sort);
    `fallback` (d,) (default zeros).  **Returns:** `FitResult` with theta (d,).
    """
    m = x.shape[0]
    if fallback is None:
        fallback = jnp.zeros(x.shape[-1], x.dtype)
    if weights is None:
        xs = jnp.sort(x, axis=0)
        med = 0.5 * (xs[(m - 1) // 2] + xs[m // 2])
        ok = jnp.all(jnp.isfinite(med))
    else:
        order = jnp.argsort(x, axis=0)
        xs = jnp.take_along_axis(x, order, axis=0)
        cw = jnp.cumsum(weights[order], axis=0)  # (m, d); cw[-1] = W in every column
        total = cw[-1]
        # e_k (0-based, expanded sorted list) sits at the first i with cw_i > k.
        i_lo = jnp.sum(cw <= jnp.floor((total - 1) / 2)[None, :], axis=0)
        i_hi = jnp.sum(cw <= jnp.floor(total / 2)[None, :], axis=0)

        def take(i):
            return jnp.take_along_axis(xs, jnp.minimum(i, m - 1)[None, :], axis=0)[0]

        med = 0.5 * (take(i_lo) + take(i_hi))
        ok = jnp.all(jnp.isfinite(med)) & jnp.all(total >= 1)
    return FitResult(jnp.where(ok, med, fallback), jnp.zeros((), jnp.int32), ok)


def _key_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.uint64 if jnp.dtype(dtype).itemsize == 8 else jnp.uint32)


def order_keys(x: jax.Array) -> jax.Array:
    """Unsigned integers ordered as the floats `x` are (uint64 for float64, uint32 for float32).

    Positive floats get the sign bit set, negative ones all bits flipped;
    -0.0 sorts just below +0.0.  Inverse: `from_order_keys`.
    """
    kdt = _key_dtype(x.dtype)
    bits = jax.lax.bitcast_convert_type(x, kdt)
    sign = kdt.type(1) << kdt.type(8 * kdt.itemsize - 1)
    return jnp.where(bits & sign, ~bits, bits | sign)


def from_order_keys(keys: jax.Array, dtype) -> jax.Array:
    """Inverse of `order_keys`."""
    kdt = keys.dtype
    sign = kdt.type(1) << kdt.type(8 * kdt.itemsize - 1)
    bits = jnp.where(keys & sign, keys ^ sign, ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype))


def pooled_median(keys: jax.Array, total: jax.Array, dtype) -> jax.Array:
    """Exact coordinatewise median of the union of sorted batches, without sorting the pool.

    Pooling every batch and sorting it costs O(B n log(B n)) per fit; here
    each batch is sorted once when it arrives.  The k-th smallest pooled
    value (k = (total - 1) // 2) is bracketed, lo < x_(k) <= hi, with the
    counts c(t) = #{pool <= t} (a binary search in every batch, O(B log n))
    satisfying c(lo) <= k < c(hi); the bracket shrinks by a safeguarded
    interpolation search (even rounds: the value where the linear
    interpolation of c between lo and hi crosses k + 1/2; odd rounds: the
    midpoint of the integer order keys, so the key range at least halves
    every two rounds: at most 2b rounds for b-bit keys, typically ~10) until
    it holds one data point or one representable value.  x_(k) is then the
    smallest key above lo; x_(k+1) that or the next one.  Exact: the result is
    a data value (or the mean of two), equal to ``numpy.median`` of the pool.

    **Arguments:** `keys` (B, n, d) `order_keys` of the batches, each
    column ``keys[b, :, j]`` sorted ascending, batches not yet drawn filled
    with the largest key (never selected); `total` () int, the number of
    real points (1 <= total <= B n); `dtype` of the data.
    **Returns:** (d,) the medians, numpy's convention.
    """
    B, n, d = keys.shape
    kdt = keys.dtype
    top = jnp.full((d,), jnp.iinfo(kdt).max, kdt)
    # The unrolled binary search measured ~25x faster than the default scan under vmap (CPU).
    def search_one(a, v):
        return jnp.searchsorted(a, v, side="right", method="scan_unrolled")

    search = jax.vmap(jax.vmap(search_one, (1, 0)), (0, None))
    total = total.astype(jnp.int64)
    k = (total - 1) // 2

    def count(t):
        return search(keys, t).astype(jnp.int64).sum(0)

    def next_above(t):  # the smallest key > t, and c(t)
        pos = search(keys, t)  # (B, d)
        nxt = jnp.take_along_axis(keys, jnp.minimum(pos, n - 1)[:, None, :], axis=1)[:, 0, :]
        return jnp.where(pos < n, nxt, top[None, :]).min(0), pos.astype(jnp.int64).sum(0)

    real = keys[:, 0, :] != top[None, :]  # (B, d): batches drawn so far
    lo = keys[:, 0, :].min(0) - 1  # just below the smallest point: c(lo) = 0
    hi = jnp.where(real, keys[:, n - 1, :], 0).max(0)  # the largest point: c(hi) = total
    c_lo, c_hi = jnp.zeros((d,), jnp.int64), jnp.broadcast_to(total, (d,))

    def undone(lo, hi, c_lo, c_hi):
        return (c_hi - c_lo > 1) & (hi - lo > 1)

    def body(state):
        i, lo, hi, c_lo, c_hi = state
        lv, hv = from_order_keys(lo, dtype), from_order_keys(hi, dtype)
        frac = ((k + 0.5 - c_lo) / (c_hi - c_lo)).astype(dtype)
        guess = order_keys(lv + (hv - lv) * frac)
        inside = (guess > lo) & (guess < hi) & jnp.isfinite(hv - lv)
        t = jnp.where((i % 2 == 0) & inside, guess, lo + (hi - lo) // 2)
        c = count(t)
        active = undone(lo, hi, c_lo, c_hi)
        left = active & (c <= k)  # x_(k) > t: t is the new lo
        right = active & (c > k)
        return (i + 1, jnp.where(left, t, lo), jnp.where(right, t, hi),
                jnp.where(left, c, c_lo), jnp.where(right, c, c_hi))

    _, lo, _, _, _ = jax.lax.while_loop(
        lambda s: jnp.any(undone(*s[1:])), body, (jnp.zeros((), jnp.int32), lo, hi, c_lo, c_hi)
    )
    t_lo, _ = next_above(lo)  # x_(k): (lo, hi] holds one point or one value
    t_next, c_at = next_above(t_lo)
    t_hi = jnp.where(c_at >= total // 2 + 1, t_lo, t_next)  # x_(k+1) (= x_(k) for odd totals)
    return 0.5 * (from_order_keys(t_lo, dtype) + from_order_keys(t_hi, dtype))
