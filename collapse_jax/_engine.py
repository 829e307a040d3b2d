"""The trajectory kernel: one trajectory is a ``lax.scan`` over generations.

``build_trajectory(static)`` returns a pure function ``(key, params) ->
Trajectory``; ``build_block(static)`` vmaps it over a fixed-size block of
global trajectory indices and reduces the block to float64 moment sums.

Keys: trajectory r uses ``k_r = fold_in(key(seed), r)``; generation g uses
``fold_in(k_r, g)`` (g = 1..G) and a per-trajectory fixed design uses
``fold_in(k_r, 0)``.  A trajectory's path therefore depends only on (seed, r,
config), never on the block size, the block it falls in or the device count.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _models, _random
from ._config import SimulationConfig
from ._data import ModelParams, ols_error, sample_features, wishart_factor
from ._estimators import (
    FitResult,
    extended_pool_start,
    glm_newton_pooled,
    gaussian_from_scatter,
    merge_scatter,
    order_keys,
    pooled_median,
    solve_normal_equations,
    unvech,
    _cholesky_ok,
)
from ._small_linalg import cholesky, lower_transposed_solve
from ._statistics import Moments, block_moments


@dataclasses.dataclass(frozen=True)
class StaticSpec:
    """The part of a configuration that fixes compiled shapes and code paths.

    Two configurations with equal `StaticSpec` share one compiled kernel;
    sigma, theta0, the feature covariance values, the seed and the number of
    trajectories are traced arguments, and so is n for the sufficient-statistic
    kernels (`n` is then None here and ``ModelParams.n`` holds it): they draw
    nothing of size n, so a sweep over n compiles them once.
    """

    model: str
    workflow: str
    design: str
    n: int | None  # None: traced (ModelParams.n)
    d: int
    generations: int
    dtype: str
    sufficient_statistics: bool
    max_newton_iterations: int
    isotropic: bool
    user_design: bool
    block_size: int
    prng: str = "philox4x32"

    @classmethod
    def from_config(cls, config: SimulationConfig, block_size: int, user_design: bool) -> StaticSpec:
        return cls(
            model=config.model,
            workflow=config.workflow,
            design=config.design,
            # Traced (ModelParams.n) where nothing of size n is drawn; a user design's
            # shape still fixes it.
            n=None if config.uses_sufficient_statistics and not user_design else config.n,
            d=config.d,
            generations=config.generations,
            dtype=config.dtype,
            sufficient_statistics=config.uses_sufficient_statistics,
            max_newton_iterations=config.max_newton_iterations,
            isotropic=config.feature_cov is None,
            user_design=user_design,
            block_size=block_size,
            prng=config.prng,
        )


class Trajectory(NamedTuple):
    theta: jax.Array  # shape=(..., G, p): theta_g (the previous value after a failed fit).
    converged: jax.Array  # shape=(..., G), bool: the fit at generation g succeeded.
    alive: jax.Array  # shape=(..., G), bool: every fit up to and including g succeeded.
    iterations: jax.Array  # shape=(..., G), int32: Newton steps (0 for least squares).


class BlockResult(NamedTuple):
    moments: Moments  # float64 moment sums over trajectories alive at each generation.
    failed: jax.Array  # shape=(G,), float64: fits that failed at g (trajectory alive before g).
    iterations: jax.Array  # shape=(G,), float64: sum of Newton steps over trajectories alive at g.
    # shape=(G, 2, k), float64: sums and sums of squares, over the trajectories alive at g,
    # of the model's k per-generation metrics (`_models.metric_names`; k = 0 for most models).
    metrics: jax.Array


def _fixed_design(spec: StaticSpec, key, params: ModelParams):
    if spec.user_design:
        return params.design_matrix
    return sample_features(jax.random.fold_in(key, 0), spec.n, params.feature_chol, spec.isotropic)


def _fixed_gram_factor(spec: StaticSpec, key, params: ModelParams):
    if spec.user_design:
        x = params.design_matrix
        return jnp.linalg.cholesky(x.T @ x)
    return wishart_factor(jax.random.fold_in(key, 0), params.n, params.feature_chol, spec.isotropic)


def build_trajectory(spec: StaticSpec):
    """Pure function ``(key, params) -> Trajectory`` for one trajectory.

    `key` is the trajectory's typed PRNG key; `params` a `ModelParams` in the
    spec's dtype.  Generation 1 is fitted on the n real points (labels drawn
    from theta0), generation g + 1 on data that include labels drawn from
    theta_g, as the workflow says.
    """
    n, d, G = spec.n, spec.d, spec.generations
    dtype = jnp.dtype(spec.dtype)
    steps = jnp.arange(1, G + 1)
    points = _models.is_point_model(spec.model)
    ridge = spec.model == "ridge"

    def fit(x, y, w, theta_prev, params) -> FitResult:
        return _models.fit(spec.model, params, x, y, w, theta_prev, spec.max_newton_iterations)

    def run(key, params: ModelParams) -> Trajectory:
        theta0 = params.theta0
        sigma = params.sigma
        eye = jnp.eye(d, dtype=dtype)

        if spec.sufficient_statistics and spec.model == "gaussian":
            return _gaussian_sufficient(spec, key, params)

        if spec.sufficient_statistics:
            fresh = spec.design == "fresh"
            if not fresh:
                c_fixed = _fixed_gram_factor(spec, key, params)
                # One batch's OLS error is sigma C^{-T} z: precompute C^{-T} once per trajectory.
                ct_inv = lower_transposed_solve(c_fixed, jnp.eye(d, dtype=dtype))
                design_ok = _cholesky_ok(c_fixed)
                gram_fixed = c_fixed @ c_fixed.T

            def body(carry, g):
                theta_prev, alive, a_sum, b_sum = carry
                kx, kz = jax.random.split(jax.random.fold_in(key, g))
                zero = jnp.zeros((), jnp.int32)
                if ridge:
                    # Ridge is linear in (X^T X, X^T y): the same exact draws,
                    # X^T y = C C^T theta + sigma C z.
                    if fresh:
                        c = wishart_factor(kx, params.n, params.feature_chol, spec.isotropic)
                        gram = c @ c.T
                    else:
                        c, gram = c_fixed, gram_fixed
                    z = _random.normal(kz, (d,), dtype)
                    b = gram @ theta_prev + sigma * (c @ z)
                    penalty = params.ridge_penalty * eye
                    if spec.workflow == "discard":
                        res = solve_normal_equations(gram + penalty, b, theta_prev)
                    else:
                        a_sum = a_sum + gram
                        b_sum = b_sum + b
                        res = solve_normal_equations(a_sum + penalty, b_sum, theta_prev)
                elif fresh and spec.workflow == "discard":
                    error = ols_error(kx, params.n, params.feature_chol, spec.isotropic)
                    theta = theta_prev + sigma * error
                    ok = jnp.all(jnp.isfinite(theta))
                    res = FitResult(jnp.where(ok, theta, theta_prev), zero, ok)
                elif fresh:
                    # Augment: X_g^T X_g = C C^T (Bartlett), X_g^T eps = C z, exactly in law.
                    c = wishart_factor(kx, params.n, params.feature_chol, spec.isotropic)
                    z = _random.normal(kz, (d,), dtype)
                    gram = c @ c.T
                    a_sum = a_sum + gram
                    b_sum = b_sum + gram @ theta_prev + sigma * (c @ z)
                    res = solve_normal_equations(a_sum, b_sum, theta_prev)
                else:
                    u = sigma * (ct_inv @ _random.normal(kz, (d,), dtype))
                    if spec.workflow == "discard":
                        theta = theta_prev + u
                    else:
                        # Pooled normal equations g X^T X theta = sum_i X^T y_i reduce to a mean.
                        b_sum = b_sum + theta_prev + u
                        theta = b_sum / g.astype(dtype)
                    ok = design_ok & jnp.all(jnp.isfinite(theta))
                    res = FitResult(jnp.where(ok, theta, theta_prev), zero, ok)
                alive = alive & res.converged
                return (res.theta, alive, a_sum, b_sum), (res.theta, res.converged, alive, res.iterations)

            init = (theta0, jnp.ones((), bool), jnp.zeros((d, d), dtype), jnp.zeros((d,), dtype))
            _, out = jax.lax.scan(body, init, steps)
            return Trajectory(*out)

        fresh = spec.design == "fresh"
        x_fixed = None if fresh else _fixed_design(spec, key, params)
        use_pool = spec.workflow in ("subsample", "subsample-replace") or (
            spec.workflow == "augment" and spec.model in ("logistic", "poisson") and fresh
        )
        pool_x = jnp.zeros((G, n, d), dtype) if (use_pool and fresh) else jnp.zeros((0,), dtype)
        pool_y = jnp.zeros((G, n), dtype) if (use_pool and not points) else jnp.zeros((0,), dtype)
        pooled_fit = use_pool and spec.workflow == "augment"
        if pooled_fit:  # the pool as chunks of whole batches, read in place by the fit
            chunk = pool_chunk(n, G)
            pool_x = tuple(pool_x[i:i + chunk] for i in range(0, G, chunk))
            pool_y = tuple(pool_y[i:i + chunk] for i in range(0, G, chunk))
        a_sum = jnp.zeros((d, d), dtype)
        hess_pool = jnp.zeros((d, d), dtype)  # pooled GLM fits: the pool's last Newton Hessian
        b_sum = jnp.zeros((d,), dtype)
        y_sum = jnp.zeros((n,), dtype)
        # Median augment: every batch's sorted order keys; unused batches hold the largest key.
        median_pool = spec.model == "median" and spec.workflow == "augment"
        key_pool = jnp.zeros((0,), jnp.uint8)
        if median_pool:
            kdt = order_keys(jnp.zeros((), dtype)).dtype
            key_pool = jnp.full((G, n, d), jnp.iinfo(kdt).max, kdt)

        def body(carry, g):
            theta_prev, alive, pool_x, pool_y, a_sum, b_sum, y_sum, key_pool, hess_pool = carry
            kx, ky, ks = jax.random.split(jax.random.fold_in(key, g), 3)
            if points:
                x = _models.sample_points(kx, spec.model, n, theta_prev, params, spec.isotropic)
                y = None
            else:
                x = sample_features(kx, n, params.feature_chol, spec.isotropic) if fresh else x_fixed
                y = _models.sample_labels(ky, spec.model, x, theta_prev, params)
            ones = jnp.ones((n,), dtype)
            if spec.workflow == "discard":
                res = fit(x, y, None if points else ones, theta_prev, params)
            elif spec.workflow == "augment" and spec.model in ("ols", "ridge"):
                xw = x.T
                a_sum = a_sum + xw @ x
                b_sum = b_sum + xw @ y
                a = a_sum + params.ridge_penalty * eye if ridge else a_sum
                res = solve_normal_equations(a, b_sum, theta_prev)
            elif spec.workflow == "augment" and spec.model == "gaussian":
                # Pooled mean and scatter (b_sum, a_sum) of the (g - 1) n earlier points,
                # then this batch's.
                mean = jnp.mean(x, axis=0)
                xc = x - mean[None, :]
                gf = g.astype(dtype)
                _, b_sum, a_sum = merge_scatter((gf - 1) * n, b_sum, a_sum, n, mean, xc.T @ xc)
                res = gaussian_from_scatter(b_sum, a_sum, gf * n, theta_prev)
            elif median_pool:
                key_pool = key_pool.at[g - 1].set(jnp.sort(order_keys(x), axis=0))
                med = pooled_median(key_pool, g * n, dtype)
                ok = jnp.all(jnp.isfinite(med))
                res = FitResult(jnp.where(ok, med, theta_prev), jnp.zeros((), jnp.int32), ok)
            elif spec.workflow == "augment" and not fresh:
                # Logistic/Poisson, fixed design: the log-likelihood is linear in y, so g copies
                # of X with label sums s -> weights g, targets s/g.
                y_sum = y_sum + y
                gf = g.astype(dtype)
                res = fit(x, y_sum / gf, gf * ones, theta_prev, params)
            else:
                if pooled_fit:
                    pool_x = _store_batch(pool_x, g - 1, x)
                    pool_y = _store_batch(pool_y, g - 1, y)
                    # Newton on the g batches of the pool (work ~ g, not ~ G), from the step
                    # that the new batch and the pool's last Hessian predict.
                    start = extended_pool_start(spec.model, x, y, theta_prev, hess_pool)
                    res, hess_pool = glm_newton_pooled(pool_x, pool_y, g, start,
                                                       spec.max_newton_iterations, spec.model)
                    res = res._replace(theta=jnp.where(res.converged, res.theta, theta_prev))
                else:
                    if not points:
                        pool_y = pool_y.at[g - 1].set(y)
                    if fresh:
                        pool_x = pool_x.at[g - 1].set(x)
                    size = g * n
                    if spec.workflow == "subsample":
                        # Generation 1's draw is discarded below; a pool of >= 2n keeps
                        # `_first_distinct` from collecting all n of n (~ln n rounds).
                        size = jnp.maximum(size, min(2 * n, G * n))
                        idx = _sample_without_replacement(ks, n, size, G * n)
                    else:
                        idx = jax.random.randint(ks, (n,), 0, size)
                    idx = jnp.where(g == 1, jnp.arange(n), idx)  # generation 1: the real batch
                    ys = None if points else pool_y.reshape(G * n)[idx]
                    xs = pool_x.reshape(G * n, d)[idx] if fresh else x_fixed[idx % n]
                    res = fit(xs, ys, None if points else ones, theta_prev, params)
            alive = alive & res.converged
            carry = (res.theta, alive, pool_x, pool_y, a_sum, b_sum, y_sum, key_pool, hess_pool)
            return carry, (res.theta, res.converged, alive, res.iterations)

        init = (theta0, jnp.ones((), bool), pool_x, pool_y, a_sum, b_sum, y_sum, key_pool,
                hess_pool)
        _, out = jax.lax.scan(body, init, steps)
        return Trajectory(*out)

    return run


def _gaussian_sufficient(spec: StaticSpec, key, params: ModelParams) -> Trajectory:
    """Gaussian fitting, discard or augment, from exactly drawn batch statistics.

    A batch of n points from N(mu, Sigma) has mean ~ N(mu, Sigma / n) and,
    independently, scatter matrix sum (x_i - mean)(x_i - mean)^T ~
    Wishart_d(n - 1, Sigma), drawn as C C^T with C = `wishart_factor` (Bartlett):
    d(d+1)/2 + d draws per generation, whatever n.  Generation g uses
    ``kx, kz = split(fold_in(key, g))`` (kx: the scatter, kz: the mean).
    Augment pools the batches' (count, mean, scatter) with `merge_scatter`.
    """
    d, G = spec.d, spec.generations
    dtype = jnp.dtype(spec.dtype)
    n = params.n.astype(dtype)  # traced (`StaticSpec`)

    def body(carry, g):
        theta_prev, alive, mean_pool, scatter_pool = carry
        kx, kz = jax.random.split(jax.random.fold_in(key, g))
        chol = cholesky(unvech(theta_prev[d:], d))
        c = wishart_factor(kx, params.n - 1, chol, False)
        z = _random.normal(kz, (d,), dtype)
        mean = theta_prev[:d] + chol @ z / jnp.sqrt(n)
        scatter = c @ c.T
        if spec.workflow == "discard":
            res = gaussian_from_scatter(mean, scatter, n, theta_prev)
        else:
            gf = g.astype(dtype)
            count, mean_pool, scatter_pool = merge_scatter(
                (gf - 1) * n, mean_pool, scatter_pool, n, mean, scatter
            )
            res = gaussian_from_scatter(mean_pool, scatter_pool, count, theta_prev)
        alive = alive & res.converged
        out = (res.theta, res.converged, alive, res.iterations)
        return (res.theta, alive, mean_pool, scatter_pool), out

    init = (params.theta0, jnp.ones((), bool), jnp.zeros((d,), dtype), jnp.zeros((d, d), dtype))
    _, out = jax.lax.scan(body, init, jnp.arange(1, G + 1))
    return Trajectory(*out)


# Pooled fits (logistic/Poisson augment, fresh design) keep their pool in chunks of
# about this many points (whole batches), and at most `POOL_MAX_CHUNKS` chunks: each
# chunk is a branch of code in every pass of the fit (compile time).
POOL_CHUNK_POINTS = 1024
POOL_MAX_CHUNKS = 4


def pool_chunk(n: int, generations: int) -> int:
    """Batches per chunk of a pooled fit: ~`POOL_CHUNK_POINTS` points, at least one batch,
    at most `POOL_MAX_CHUNKS` chunks."""
    return max(1, min(generations, round(POOL_CHUNK_POINTS / n)), -(-generations // POOL_MAX_CHUNKS))


def _store_batch(chunks: tuple[jax.Array, ...], i, batch: jax.Array) -> tuple[jax.Array, ...]:
    """Write `batch` into slot `i` (()-int, counted across chunks) of the chunked pool.

    Every chunk rewrites one slot (its own batch where it holds slot i, the
    slot's current value elsewhere): n d reads and writes per chunk, no
    branch, each chunk updated in place.
    """
    out, start = [], 0
    for chunk in chunks:
        size = chunk.shape[0]
        j = jnp.clip(i - start, 0, size - 1)
        current = jax.lax.dynamic_index_in_dim(chunk, j, keepdims=False)
        mine = (i >= start) & (i < start + size)
        out.append(jax.lax.dynamic_update_index_in_dim(chunk, jnp.where(mine, batch, current), j, 0))
        start += size
    return tuple(out)


# From this sample size on, `_first_distinct` is cheaper than `_floyd` (measured
# per trajectory: n = 100, 7-10 vs 19-26 us; n = 1,000, 420 vs 150-210 us).
FIRST_DISTINCT_FROM = 300


def _sample_without_replacement(key, n: int, size, capacity: int):
    """n distinct indices, uniformly from [0, size): shape (n,), int32.

    n <= size <= capacity; `size` is traced (an int array), `capacity` a
    static bound on it (the pool's length).  Every n-subset is equally
    likely; the order is not uniform (callers use the set).  `_floyd` for
    n < `FIRST_DISTINCT_FROM`, else `_first_distinct`: the same law, other
    draws.
    """
    if n < FIRST_DISTINCT_FROM:
        return _floyd(key, n, size)
    return _first_distinct(key, n, size, capacity)


def _floyd(key, n: int, size):
    """Floyd's algorithm (Bentley & Floyd 1987): O(n^2) work, no pool-sized array.

    For i = 0..n-1 with j = size - n + i, draw t uniform on [0, j]; take t
    unless an earlier step took it, else take j.  The n draws are one
    ``randint`` call; the n steps are a loop whose membership test is O(n),
    vectorized across a vmapped batch.  Measured ~10x cheaper than sorting
    random keys over a 5,000-slot pool (XLA's CPU sort costs ~35 ns per
    element, and a cumsum compaction was not much cheaper).
    """
    i = jnp.arange(n, dtype=jnp.int32)
    j = size.astype(jnp.int32) - n + i
    picks = jax.random.randint(key, (n,), 0, j + 1, dtype=jnp.int32)

    def step(i, taken):
        t = picks[i]
        return taken.at[i].set(jnp.where(jnp.any(taken == t), j[i], t))

    return jax.lax.fori_loop(0, n, step, jnp.full((n,), -1, jnp.int32))


def _first_distinct(key, n: int, size, capacity: int):
    """The first n distinct values of an i.i.d. uniform sequence on [0, size): O(n) per round.

    The set of the first n distinct values of an exchangeable sequence of
    uniform indices is a uniform n-subset (relabelling the indices maps the
    sequence's law to itself).  The sequence is drawn n at a time (round r:
    ``randint(fold_in(key, r))``, positions r n .. r n + n - 1); a
    scatter-min of positions into `capacity` slots finds each value's first
    occurrence, and the first occurrences are taken in position order until
    there are n.  Rounds repeat while fewer than n are taken: about 2 when
    n is not small against size (at size = 2 n, 2n draws hold ~1.26 n
    distinct values).
    """
    size = size.astype(jnp.int32)
    j = jnp.arange(n, dtype=jnp.int32)

    def body(state):
        r, have, first, out = state
        c = jax.random.randint(jax.random.fold_in(key, r), (n,), 0, size, dtype=jnp.int32)
        pos = r * n + j
        first = first.at[c].min(pos, mode="promise_in_bounds")
        new = first.at[c].get(mode="promise_in_bounds") == pos
        slot = have + jnp.cumsum(new, dtype=jnp.int32) - 1
        # Unique indices (the dropped ones distinct too): no ordered writes needed.
        put = jnp.where(new & (slot < n), slot, n + j)
        out = out.at[put].set(c, mode="drop", unique_indices=True)
        return r + 1, jnp.minimum(have + jnp.sum(new, dtype=jnp.int32), n), first, out

    big = jnp.iinfo(jnp.int32).max
    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
            jnp.full((capacity,), big, jnp.int32), jnp.zeros((n,), jnp.int32))
    return jax.lax.while_loop(lambda s: s[1] < n, body, init)[3]


def trajectory_keys(seed, indices, impl: str = "philox4x32"):
    """Typed keys ``fold_in(key(seed, impl), r)`` for global trajectory indices (B,)."""
    base = jax.random.key(seed, impl=impl)
    return jax.vmap(jax.random.fold_in, (None, 0))(base, indices.astype(jnp.uint32))


def build_trajectories(spec: StaticSpec):
    """``(seed, indices (B,), params) -> Trajectory`` batched over the indices."""
    run = build_trajectory(spec)

    def many(seed, indices, params):
        return jax.vmap(run, (0, None))(trajectory_keys(seed, indices, spec.prng), params)

    return many


def build_block(spec: StaticSpec):
    """``(seed, start, total, params) -> BlockResult`` for indices start..start+B-1.

    Indices >= `total` are padding: computed (fixed shapes) but given weight 0.
    """
    many = build_trajectories(spec)

    def block(seed, start, total, params):
        idx = start + jnp.arange(spec.block_size, dtype=start.dtype)
        traj = many(seed, idx, params)
        valid = idx < total
        weight = traj.alive & valid[:, None]
        delta = traj.theta - params.theta0[None, None, :]
        moments = block_moments(delta, weight)
        alive_before = jnp.concatenate([jnp.ones_like(traj.alive[:, :1]), traj.alive[:, :-1]], axis=1)
        failed = (valid[:, None] & alive_before & ~traj.converged).astype(jnp.float64).sum(0)
        iterations = jnp.where(weight, traj.iterations, 0).astype(jnp.float64).sum(0)
        # Model metrics of theta_g; dead or padding trajectories get exactly 0 (never NaN * 0).
        values = _models.metrics(spec.model, traj.theta, params.theta0)
        values = jnp.where(weight[..., None], values, 0.0)
        metrics = jnp.stack([values.sum(0), (values * values).sum(0)], axis=1)  # (G, 2, k)
        return BlockResult(moments, failed, iterations, metrics)

    return block

