"""The models: how each draws one batch from a parameter, fits it, and what it reports.

=========  ==========================================  ===============================  ======
model      one batch of n points drawn from theta      fit (`FitResult`)                p
=========  ==========================================  ===============================  ======
ols        x ~ N(0, S), y = x.theta + sigma eps        `least_squares`                  d
ridge      as ols                                      `ridge_regression` (penalty lam) d
logistic   x ~ N(0, S), y ~ Bernoulli(sigmoid(x.th))   `logistic_newton`                d
poisson    x ~ N(0, S), y ~ Poisson(exp(x.theta))      `poisson_newton`                 d
gaussian   x ~ N(mu, Sigma), no labels                 `gaussian_fit` (mean, unbiased   d + d(d+1)/2
                                                       covariance)
median     x ~ N(theta, sigma^2 S), no labels          `sample_median` (coordinatewise) d
=========  ==========================================  ===============================  ======

S is the feature covariance (``feature_cov``).  The gaussian parameter is
theta = (mu, vech Sigma) (`vech`: the lower triangle row by row), and its
true value is (theta0, vech(sigma^2 S)).  `fit` is the one entry point the
engine calls for explicit data; the engine's workflow code chooses the data
(a batch, pooled batches, a subsample) and the weights.

Per-generation metrics (`metric_names`, `metrics`) are model-specific scalar
functions of theta_g, averaged over trajectories by the engine's block
reduction (sums and sums of squares, so means and standard errors):
gaussian reports ||mu_g - mu0||^2, tr Sigma_g / tr Sigma0,
det Sigma_g / det Sigma0 and W_2^2(N(mu_g, Sigma_g), N(mu0, Sigma0)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._config import POINT_MODELS
from ._data import ModelParams, sample_features
from ._data import sample_labels as _sample_labels
from ._small_linalg import cholesky, eigvalsh
from ._estimators import (
    FitResult,
    gaussian_fit,
    least_squares,
    logistic_newton,
    poisson_newton,
    ridge_regression,
    sample_median,
    unvech,
)

_METRICS = {"gaussian": ("mean_sq_error", "trace_ratio", "det_ratio", "w2_squared")}


def metric_names(model: str) -> tuple[str, ...]:
    """Names of the per-generation metrics of `model` (empty for most models)."""
    return _METRICS.get(model, ())


def is_point_model(model: str) -> bool:
    """Whether the model's data are points in R^d (no labels, no design)."""
    return model in POINT_MODELS


def sample_points(key: jax.Array, model: str, n: int, theta: jax.Array, params: ModelParams,
                  isotropic: bool) -> jax.Array:
    """n points of a point model drawn from parameter `theta`: shape (n, d).

    gaussian: x = mu + z L^T with L = chol(Sigma), theta = (mu, vech Sigma);
    median: x = theta + sigma z L_S^T (L_S = chol(feature_cov)); z ~ N(0, I_d)
    rows from `sample_features`.
    """
    if model == "gaussian":
        d = params.feature_chol.shape[0]
        chol = cholesky(unvech(theta[d:], d))
        return theta[None, :d] + sample_features(key, n, chol, False)
    return theta[None, :] + params.sigma * sample_features(key, n, params.feature_chol, isotropic)


def sample_labels(key: jax.Array, model: str, x: jax.Array, theta: jax.Array,
                  params: ModelParams) -> jax.Array:
    """Labels of a regression model for features `x` (n, d) under `theta` (d,): shape (n,).

    ols and logistic draw exactly as `collapse_jax._data.sample_labels`;
    ridge draws ols labels; poisson draws `sample_poisson(key, exp(x.theta))`.
    """
    if model in ("ols", "logistic"):
        return _sample_labels(key, model, x, theta, params.sigma)
    if model == "ridge":
        return _sample_labels(key, "ols", x, theta, params.sigma)
    return sample_poisson(key, jnp.exp(x @ theta))


def fit(model: str, params: ModelParams, x: jax.Array, y: jax.Array | None,
        weights: jax.Array | None, theta_prev: jax.Array, max_newton_iterations: int) -> FitResult:
    """Fit `model` to data (x, y) with multiplicities `weights` (None: all ones).

    `theta_prev` is the warm start of the Newton fits and the value returned
    by a failed fit.  `y` is ignored by the point models.
    """
    if model == "median":
        return sample_median(x, weights, theta_prev)  # None: the plain sort
    if weights is None:
        weights = jnp.ones((x.shape[0],), x.dtype)
    if model == "ols":
        return least_squares(x, y, weights, fallback=theta_prev)
    if model == "logistic":
        return logistic_newton(x, y, weights, theta_prev, max_newton_iterations)
    if model == "poisson":
        return poisson_newton(x, y, weights, theta_prev, max_newton_iterations)
    if model == "ridge":
        return ridge_regression(x, y, params.ridge_penalty, weights, theta_prev)
    return gaussian_fit(x, weights, theta_prev)


def metrics(model: str, theta: jax.Array, theta0: jax.Array) -> jax.Array:
    """Per-generation metrics of estimates `theta` (..., p) against the truth `theta0` (p,).

    **Returns:** (..., k) float64, k = len(metric_names(model)) (0 for most
    models).  gaussian, with d from p = d + d(d+1)/2:

    - ``mean_sq_error`` ||mu - mu0||^2;
    - ``trace_ratio`` tr Sigma / tr Sigma0;
    - ``det_ratio`` det Sigma / det Sigma0 (from Cholesky log-determinants);
    - ``w2_squared`` the squared Wasserstein-2 distance between N(mu, Sigma)
      and N(mu0, Sigma0): ||mu - mu0||^2 + tr Sigma + tr Sigma0
      - 2 tr (Sigma0^{1/2} Sigma Sigma0^{1/2})^{1/2}, the last trace as the sum of
      the square roots of the eigenvalues of L0^T Sigma L0 (L0 = chol Sigma0;
      the same spectrum).
    """
    names = metric_names(model)
    theta = theta.astype(jnp.float64)
    if not names:
        return jnp.zeros(theta.shape[:-1] + (0,), jnp.float64)
    theta0 = theta0.astype(jnp.float64)
    p = theta.shape[-1]
    d = int(round((-3 + (9 + 8 * p) ** 0.5) / 2))  # p = d + d(d+1)/2
    lead = (1,) * (theta.ndim - 1)  # explicit broadcasting of the truth over (...)
    mu, cov = theta[..., :d], unvech(theta[..., d:], d)
    mu0, cov0 = theta0[:d], unvech(theta0[d:], d)
    chol0 = jnp.linalg.cholesky(cov0)
    err = jnp.sum((mu - mu0.reshape(lead + (d,))) ** 2, axis=-1)
    tr, tr0 = jnp.trace(cov, axis1=-2, axis2=-1), jnp.trace(cov0)
    # Stacked matrices, one LAPACK call each on the CPU (`one_lapack_call_per_problem`).
    chol = jnp.vectorize(cholesky, signature="(d,d)->(d,d)")(cov)
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
    logdet0 = 2 * jnp.sum(jnp.log(jnp.diagonal(chol0)))
    c0 = jnp.broadcast_to(chol0, cov.shape)
    middle = jnp.swapaxes(c0, -1, -2) @ cov @ c0
    eigenvalues = jnp.vectorize(eigvalsh, signature="(d,d)->(d)")(middle)
    root = jnp.sum(jnp.sqrt(jnp.clip(eigenvalues, 0.0, None)), axis=-1)
    w2 = err + tr + tr0 - 2 * root
    return jnp.stack([err, tr / tr0, jnp.exp(logdet - logdet0), w2], axis=-1)


# ---------------------------------------------------------------------------
# Poisson counts
# ---------------------------------------------------------------------------

_PTRS_MIN = 10.0
_UNROLLED = 32  # inversion steps in one fused pass; P(K >= 32 | lam < 10) < 1e-7
_TRIES = 4  # PTRS candidates per slot and pass; P(none accepted) < 3e-4


def sample_poisson(key: jax.Array, lam: jax.Array) -> jax.Array:
    """Exact Poisson(lam) draws, elementwise, as floats of `lam`'s dtype.

    ``jax.random.poisson`` accepts threefry keys only and rounds the rate to
    float32; this works for any key implementation in the rate's dtype.

    - Rates below 10: inversion by sequential search from one uniform u,
      K = #{k : u > F(k)} with F(k) = sum_{j<=k} p_j, p_j = p_{j-1} lam / j:
      32 steps as one fused elementwise pass, then (only if some u is still
      above F(31)) a loop continuing the search until u <= F(k) or p_k
      underflows.
    - Rates of 10 or more: Hormann's (1993) transformed rejection with
      squeeze (PTRS, numpy's method; acceptance about 0.9), on compacted
      slots: pass c takes the next ``m = 8 + size // 16`` waiting
      large-rate elements (in index order) into m slots and tries 4 fresh
      candidates per slot at once (uniforms from ``fold_in(k_ptrs, c)``);
      a slot takes its first accepted candidate, a slot with none waits for
      a later pass.  Each element gets the first accepted of its own i.i.d.
      attempts: exact.  The rejection work is per slot, not per element,
      and there is one random draw per pass (a loop-nested draw measured
      ~4 s more compile time).
    - A non-finite rate gives NaN (the fit then fails, flagged).

    **Arguments:** `key`; `lam` (...) >= 0.  **Returns:** counts, shape and dtype of `lam`.
    """
    dtype = lam.dtype
    rates = lam.reshape(-1)
    size = rates.shape[0]
    finite = jnp.isfinite(rates)
    small = finite & (rates < _PTRS_MIN)
    k_inv, k_ptrs = jax.random.split(key)

    # Inversion (large and non-finite rates run with rate 0 and are discarded).
    rate = jnp.where(small, rates, 0.0)
    u = jax.random.uniform(k_inv, rates.shape, dtype)
    p = jnp.exp(-rate)
    cdf = p
    count = jnp.zeros_like(rate)
    for j in range(1, _UNROLLED + 1):
        count = count + (u > cdf).astype(dtype)
        p = p * rate / j
        cdf = cdf + p

    def more(s):
        _, _, p, cdf = s
        return jnp.any((u > cdf) & (p > 0))

    def step(s):
        j, count, p, cdf = s
        count = count + (u > cdf).astype(dtype)
        j = j + 1
        p = p * rate / j.astype(dtype)
        return j, count, p, cdf + p

    # cdf here is F(32) and p = p_32; F(0..31) are counted.
    start = jnp.asarray(_UNROLLED, jnp.int32)
    _, count, _, _ = jax.lax.while_loop(more, step, (start, count, p, cdf))

    # PTRS for the large rates, compacted: each pass takes the next `spare` waiting elements
    # (in index order) into slots and tries _TRIES fresh candidates per slot at once.
    spare = min(size, 8 + size // 16)
    big = jnp.where(finite & ~small, rates, _PTRS_MIN)

    def attempts(key, lam_s):  # (_TRIES, spare): accepted?, candidate
        uv = jax.random.uniform(key, (2, _TRIES, spare), dtype)
        uu, v = uv[0] - 0.5, uv[1]
        lam_s = jnp.broadcast_to(lam_s[None, :], uu.shape)
        slam, loglam = jnp.sqrt(lam_s), jnp.log(lam_s)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        vr = 0.9277 - 3.6224 / (b - 2)
        us = 0.5 - jnp.abs(uu)
        k = jnp.floor((2 * a / us + b) * uu + lam_s + 0.43)
        quick = (us >= 0.07) & (v <= vr)
        reject = (k < 0) | ((us < 0.013) & (v > us))
        log_ratio = jnp.log(v) + jnp.log(1.1239 + 1.1328 / (b - 3.4)) - jnp.log(a / (us * us) + b)
        target = -lam_s + k * loglam - jax.lax.lgamma(jnp.maximum(k, 0.0) + 1)
        return quick | (~reject & (log_ratio <= target)), k

    def serve(state):
        c, pending, value = state
        rank = jnp.cumsum(pending) - 1
        served = pending & (rank < spare)
        owner = jnp.zeros((spare,), jnp.int32).at[jnp.where(served, rank, spare)].set(
            jnp.arange(size, dtype=jnp.int32), mode="drop"
        )
        ok, k = attempts(jax.random.fold_in(k_ptrs, c), big[owner])
        first = jnp.argmax(ok, axis=0)  # the first accepted try of each slot
        k_slot = jnp.take_along_axis(k, first[None, :], axis=0)[0]
        slot = jnp.clip(rank, 0, spare - 1)
        done = served & jnp.any(ok, axis=0)[slot]
        return c + 1, pending & ~done, jnp.where(done, k_slot[slot], value)

    init = (jnp.zeros((), jnp.int32), finite & ~small, jnp.zeros_like(rates))
    _, _, k_big = jax.lax.while_loop(lambda s: jnp.any(s[1]), serve, init)
    out = jnp.where(small, count, jnp.where(finite, k_big, jnp.nan))
    return out.reshape(lam.shape)
