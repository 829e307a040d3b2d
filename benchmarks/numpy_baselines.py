"""Plain-numpy reference implementations of the collapse_jax simulation.

Two baselines, both driven by the same `collapse_jax.SimulationConfig` the
engine takes, so that a benchmark row compares like with like:

- `simulate_vectorized`: an honest, reasonably optimised numpy program.
  Batched over a block of trajectories (arrays of shape (B, n, d)), with
  stacked `np.matmul` Gram matrices and batched `np.linalg.solve`; the same
  algorithms as the engine (sufficient-statistic sampling for OLS where
  ``config.uses_sufficient_statistics``; OLS augment through accumulated
  X^T X and X^T y; logistic augment on a fixed design through averaged
  labels; Newton's method warm-started from the previous generation).
- `simulate_loop`: the per-trajectory Python loop of published research code
  (Gerstgrasser et al. 2024; Kazdan et al. 2024): for each trajectory and
  generation draw the data, stack every batch kept so far, and refit with
  ``np.linalg.pinv`` (OLS) or a single-problem Newton loop (logistic).

Model (as in `SimulationConfig`): features x ~ N(0, Sigma), labels
y = x.theta + sigma*eps (OLS) or y ~ Bernoulli(sigmoid(x.theta)) (logistic).
Generation 1 is fitted on n real points (labels from theta0); the labels of
generation g + 1's new batch are drawn from theta_g.  Workflows: ``discard``
(fit the newest batch), ``augment`` (fit every batch so far: g n points at
generation g), ``subsample`` / ``subsample-replace`` (n points drawn without /
with replacement from that pool of g n points; generation 1 uses the real
batch).  Designs: ``fresh`` (new features every generation) or ``fixed``
(one design per trajectory, or the shared `design_matrix`, reused).

Random numbers come from numpy's PCG64, so paths differ from the engine's
(a JAX counter-based PRNG); only distributions agree.  The vectorized baseline's draws also
depend on its block size.

Both functions return `BaselineResult(thetas (R, G, d), ok (R, G))` where
``ok[r, g]`` says that fits 1..g of trajectory r all succeeded (the engine's
``alive``); after a failed fit theta keeps its previous value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["BaselineResult", "newton_logistic", "simulate_loop", "simulate_vectorized"]


class BaselineResult(NamedTuple):
    thetas: np.ndarray  # shape=(R, G, d), dtype of the config: theta_g per trajectory.
    ok: np.ndarray  # shape=(R, G), bool: fits 1..g all succeeded.


class NewtonResult(NamedTuple):
    theta: np.ndarray  # shape=(B, d): the MLE (the start value where not converged).
    iterations: np.ndarray  # shape=(B,), int: Newton steps taken.
    converged: np.ndarray  # shape=(B,), bool.


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def _sigmoid(eta: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |eta|, one transcendental call.
    return 0.5 + 0.5 * np.tanh(0.5 * eta)


def _separates(y: np.ndarray, eta: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """collapse_jax's `separates` for logistic data (..., m): every point of positive weight
    has y = 1 and eta > 0 or y = 0 and eta < 0, so no MLE exists.  Shape (...,)."""
    right = ((y == 1) & (eta > 0)) | ((y == 0) & (eta < 0))
    return (right if w is None else right | (w <= 0)).all(-1)


def _batched_solve(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve a[i] x[i] = b[i] for a (B, d, d), b (B, d); returns (x, ok (B,)).

    numpy's batched solve raises if any system is singular; then fall back to
    one solve per system so that a single bad trajectory only fails itself.
    """
    with np.errstate(all="ignore"):
        try:
            x = np.linalg.solve(a, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            x = np.full_like(b, np.nan)
            for i in range(len(b)):
                try:
                    x[i] = np.linalg.solve(a[i], b[i])
                except np.linalg.LinAlgError:
                    pass
    return x, np.isfinite(x).all(-1)


def _cholesky_ok(a: np.ndarray) -> np.ndarray:
    """Whether each of a (B, d, d) is numerically positive definite: (B,) bool.

    The engine's test (collapse_jax._estimators): the Cholesky factor is
    finite and (min diag / max diag)^2 > d * eps.  Separable logistic data
    drive the Hessian to singular, and this is what flags that.
    """
    with np.errstate(all="ignore"):
        try:
            chol = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            chol = np.full_like(a, np.nan)
            for i in range(len(a)):
                try:
                    chol[i] = np.linalg.cholesky(a[i])
                except np.linalg.LinAlgError:
                    pass
        diag = np.diagonal(chol, axis1=-2, axis2=-1)
        dmin, dmax = diag.min(-1), diag.max(-1)
        eps = np.finfo(a.dtype).eps
        finite = np.isfinite(chol).all((-2, -1))
        return finite & (dmin > 0) & ((dmin / dmax) ** 2 > a.shape[-1] * eps)


def newton_logistic(
    x: np.ndarray,
    y: np.ndarray,
    theta_init: np.ndarray,
    weights: np.ndarray | float = 1.0,
    max_iterations: int = 50,
) -> NewtonResult:
    """Batched logistic-regression MLE by Newton's method.

    Maximises sum_i w_i [y_i x_i.theta - log(1 + exp(x_i.theta))] for each of
    B problems, stopping a problem after the first step with
    max|step| <= sqrt(eps) * (1 + max|theta|) (theta before the step; eps of
    the dtype), or failing it after `max_iterations` steps, a numerically
    singular Hessian (`_cholesky_ok`), a non-finite value, or an iterate
    that separates the data (as `collapse_jax`'s `separates`: no MLE).
    Problems that have stopped are dropped from later iterations.

    **Arguments:**

    - `x`: (B, m, d) features; `y`: (B, m) targets in [0, 1] (fractional
      targets with matching weights give the MLE on repeated designs).
    - `theta_init`: (B, d) warm start.
    - `weights`: (B, m) or (B, 1) array, or a scalar, >= 0; default 1.
    - `max_iterations`: cap on Newton steps.

    **Returns:** `NewtonResult`; theta is `theta_init` where not converged.
    """
    dtype = x.dtype
    tol = np.sqrt(np.finfo(dtype).eps)
    batch = x.shape[0]
    theta = np.array(theta_init, dtype=dtype, copy=True)
    w_full = np.broadcast_to(np.asarray(weights, dtype), y.shape) if np.ndim(weights) else None
    w_scalar = None if w_full is not None else dtype.type(weights)
    converged = np.zeros(batch, bool)
    iterations = np.zeros(batch, np.int64)
    active = np.arange(batch)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        every = active.size == batch
        xa = x if every else x[active]
        ya = y if every else y[active]
        ta = theta if every else theta[active]
        with np.errstate(all="ignore"):
            eta = np.matmul(xa, ta[..., None])[..., 0]
            p = _sigmoid(eta)
            if w_full is None:
                resid = w_scalar * (ya - p)
                curv = w_scalar * (p * (1 - p))
            else:
                wa = w_full if every else w_full[active]
                resid = wa * (ya - p)
                curv = wa * (p * (1 - p))
            grad = np.matmul(resid[:, None, :], xa)[:, 0, :]
            hess = np.matmul(xa.transpose(0, 2, 1) * curv[:, None, :], xa)
            # An iterate that separates the data ends the fit.
            separated = _separates(ya, eta, None if w_full is None else wa)
        step, ok = _batched_solve(hess, grad)
        ok &= _cholesky_ok(hess) & ~separated
        new = ta + step
        ok &= np.isfinite(new).all(-1)
        iterations[active] += 1
        with np.errstate(invalid="ignore"):
            done = ok & (np.abs(step).max(-1) <= tol * (1 + np.abs(ta).max(-1)))
        theta[active] = np.where(ok[:, None], new, ta)
        converged[active[done]] = True
        active = active[ok & ~done]
    theta_out = np.where(converged[:, None], theta, np.asarray(theta_init, dtype))
    return NewtonResult(theta_out, iterations, converged)


def _feature_factor(config) -> np.ndarray | None:
    """Lower Cholesky factor of Sigma, or None for isotropic features."""
    if config.feature_cov is None:
        return None
    return np.linalg.cholesky(np.asarray(config.feature_cov, np.float64))


def _check_design(config, design_matrix) -> np.ndarray | None:
    if design_matrix is None:
        return None
    if config.design != "fixed":
        raise ValueError("a design_matrix requires design='fixed'")
    x = np.asarray(design_matrix, np.float64)
    if x.shape != (config.n, config.d):
        raise ValueError(f"design_matrix has shape {x.shape}, expected ({config.n}, {config.d})")
    return x


def default_block_size(config) -> int:
    """Trajectories per numpy block: the block's largest arrays within ~128 MB."""
    n, d, G = config.n, config.d, config.generations
    item = np.dtype(config.dtype).itemsize
    per = item * (4 * n * d + 4 * n) + 8 * G * d
    pooled = config.workflow in ("subsample", "subsample-replace") or (
        config.workflow == "augment" and config.model == "logistic" and config.design == "fresh"
    )
    if pooled:
        # pool (G n (d + 1)) plus, for augment, the weighted copy made per Newton step
        per += item * G * n * (2 * d + 3)
    return int(max(1, min(config.trajectories, (128 * 2**20) // per, 8192)))


# --------------------------------------------------------------------------
# (a) vectorized numpy
# --------------------------------------------------------------------------


class _Block:
    """Random draws for one block of B trajectories."""

    def __init__(self, config, rng: np.random.Generator, size: int, chol):
        self.config, self.rng, self.size, self.chol = config, rng, size, chol
        self.dtype = np.dtype(config.dtype)

    def features(self, m: int) -> np.ndarray:
        z = self.rng.standard_normal((self.size, m, self.config.d), dtype=self.dtype)
        return z if self.chol is None else z @ self.chol.T.astype(self.dtype)

    def labels(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        eta = np.matmul(x, theta[..., None])[..., 0]
        if self.config.model == "ols":
            eps = self.rng.standard_normal(eta.shape, dtype=self.dtype)
            return eta + self.dtype.type(self.config.sigma) * eps
        u = self.rng.random(eta.shape, dtype=self.dtype)
        return (u < _sigmoid(eta)).astype(self.dtype)

    def wishart_factor(self) -> np.ndarray:
        """(B, d, d) lower-triangular C, C C^T ~ X^T X (Bartlett decomposition)."""
        d, n = self.config.d, self.config.n
        c = np.zeros((self.size, d, d), self.dtype)
        rows, cols = np.tril_indices(d, -1)
        c[:, rows, cols] = self.rng.standard_normal((self.size, rows.size), dtype=self.dtype)
        diag = np.arange(d)
        chi2 = self.rng.chisquare(n - diag, size=(self.size, d))
        c[:, diag, diag] = np.sqrt(chi2).astype(self.dtype)
        return c if self.chol is None else self.chol.astype(self.dtype) @ c


def _gram(x: np.ndarray) -> np.ndarray:
    return np.matmul(x.transpose(0, 2, 1), x)


def _xty(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.matmul(y[:, None, :], x)[:, 0, :]


def _ols_block_stats(config, blk: _Block, design) -> tuple[np.ndarray, np.ndarray]:
    """OLS discard/augment from sufficient statistics (no n-sized arrays)."""
    B, d, G = blk.size, config.d, config.generations
    dt = blk.dtype
    sigma = dt.type(config.sigma)
    theta = np.broadcast_to(config.theta0_vector.astype(dt), (B, d)).copy()
    thetas = np.empty((B, G, d), dt)
    ok = np.ones((B, G), bool)
    alive = np.ones(B, bool)
    if config.design == "fixed":
        if design is not None:
            c_fixed = np.broadcast_to(np.linalg.cholesky(design.T @ design).astype(dt), (B, d, d))
        else:
            c_fixed = blk.wishart_factor()
        gram_fixed = np.matmul(c_fixed, c_fixed.transpose(0, 2, 1))
    a_sum = np.zeros((B, d, d), dt)
    b_sum = np.zeros((B, d), dt)
    for g in range(G):
        if config.design == "fixed":
            c, gram = c_fixed, gram_fixed
        else:
            c = blk.wishart_factor()
            gram = np.matmul(c, c.transpose(0, 2, 1))
        # X^T eps ~ N(0, sigma^2 X^T X) = sigma C z in law, given X^T X = C C^T.
        xte = sigma * np.matmul(c, blk.rng.standard_normal((B, d, 1), dtype=dt))[..., 0]
        if config.workflow == "discard":
            step, good = _batched_solve(gram, xte)
            new = theta + step
        else:
            a_sum += gram
            b_sum += np.matmul(gram, theta[..., None])[..., 0] + xte
            new, good = _batched_solve(a_sum, b_sum)
        theta = np.where(good[:, None], new, theta)
        alive &= good
        thetas[:, g], ok[:, g] = theta, alive
    return thetas, ok


def _block_data(config, blk: _Block, design) -> tuple[np.ndarray, np.ndarray]:
    """Every workflow from explicit data (X, y)."""
    B, n, d, G = blk.size, config.n, config.d, config.generations
    dt = blk.dtype
    ols = config.model == "ols"
    fresh = config.design == "fresh"
    wf = config.workflow
    theta0 = config.theta0_vector.astype(dt)
    theta = np.broadcast_to(theta0, (B, d)).copy()
    thetas = np.empty((B, G, d), dt)
    ok = np.ones((B, G), bool)
    alive = np.ones(B, bool)

    x_fixed = None
    if not fresh:
        x_fixed = (np.broadcast_to(design.astype(dt), (B, n, d)) if design is not None
                   else blk.features(n))
        gram_fixed = _gram(x_fixed) if ols else None
    pooled = wf in ("subsample", "subsample-replace") or (wf == "augment" and not ols and fresh)
    pool_x = np.empty((B, G * n, d), dt) if pooled and fresh else None
    pool_y = np.empty((B, G * n), dt) if pooled else None
    a_sum = np.zeros((B, d, d), dt)
    b_sum = np.zeros((B, d), dt)
    y_sum = np.zeros((B, n), dt)
    rows = np.arange(B)[:, None]

    def fit(x, y, start, gram=None):
        if ols:
            return _batched_solve(_gram(x) if gram is None else gram, _xty(x, y))
        res = newton_logistic(x, y, start, max_iterations=config.max_newton_iterations)
        return res.theta, res.converged

    for g in range(1, G + 1):
        x = blk.features(n) if fresh else x_fixed
        y = blk.labels(x, theta)
        start = theta if g > 1 else np.zeros_like(theta)
        if wf == "discard":
            new, good = fit(x, y, start, gram=None if fresh else gram_fixed)
        elif wf == "augment" and ols:
            a_sum += gram_fixed if not fresh else _gram(x)
            b_sum += _xty(x, y)
            new, good = _batched_solve(a_sum, b_sum)
        elif wf == "augment" and not fresh:
            # g copies of one design: the pooled MLE solves the same score
            # equations as averaged labels (weights cancel in the Newton step).
            y_sum += y
            new, good = fit(x, y_sum / dt.type(g), start)
        else:
            lo, hi = (g - 1) * n, g * n
            pool_y[:, lo:hi] = y
            if fresh:
                pool_x[:, lo:hi] = x
            if wf == "augment":
                new, good = fit(pool_x[:, :hi], pool_y[:, :hi], start)
            else:
                if g == 1:
                    idx = np.broadcast_to(np.arange(n), (B, n))
                elif wf == "subsample":
                    keys = blk.rng.random((B, hi))
                    idx = np.argpartition(keys, n - 1, axis=1)[:, :n]
                else:
                    idx = blk.rng.integers(0, hi, size=(B, n))
                ys = pool_y[rows, idx]
                xs = pool_x[rows, idx] if fresh else x_fixed[rows, idx % n]
                new, good = fit(xs, ys, start)
        theta = np.where(good[:, None], new, theta)
        alive &= good
        thetas[:, g - 1], ok[:, g - 1] = theta, alive
    return thetas, ok


def simulate_vectorized(config, *, design_matrix=None,
                        block_size: int | None = None) -> BaselineResult:
    """Batched numpy simulation of `config` (a `collapse_jax.SimulationConfig`).

    Trajectories run in blocks of `block_size` (default: memory-bounded, see
    `default_block_size`); block k draws from ``default_rng([seed, k])``.
    Uses sufficient statistics exactly where the engine does
    (``config.uses_sufficient_statistics``).

    **Returns:** `BaselineResult` with thetas (R, G, d) in ``config.dtype``.
    """
    design = _check_design(config, design_matrix)
    chol = _feature_factor(config)
    R = config.trajectories
    B = block_size or default_block_size(config)
    thetas = np.empty((R, config.generations, config.d), np.dtype(config.dtype))
    ok = np.empty((R, config.generations), bool)
    run = _ols_block_stats if config.uses_sufficient_statistics else _block_data
    for k, start in enumerate(range(0, R, B)):
        size = min(B, R - start)
        blk = _Block(config, np.random.default_rng([config.seed, k]), size, chol)
        thetas[start:start + size], ok[start:start + size] = run(config, blk, design)
    return BaselineResult(thetas, ok)


# --------------------------------------------------------------------------
# (b) per-trajectory loop, research-code style
# --------------------------------------------------------------------------


def _newton_single(x, y, theta, max_iterations):
    """One logistic problem, x (m, d), y (m,); same stopping and failure rules."""
    tol = np.sqrt(np.finfo(x.dtype).eps)
    start = theta
    for _ in range(max_iterations):
        eta = x @ theta
        if _separates(y, eta):
            return start, False  # theta separates the data: no MLE
        p = _sigmoid(eta)
        grad = x.T @ (y - p)
        hess = (x.T * (p * (1 - p))) @ x
        if not _cholesky_ok(hess[None])[0]:
            return start, False
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            return start, False
        if not np.all(np.isfinite(step)):
            return start, False
        small = np.max(np.abs(step)) <= tol * (1 + np.max(np.abs(theta)))
        theta = theta + step
        if small:
            return theta, True
    return start, False


def simulate_loop(config, *, design_matrix=None) -> BaselineResult:
    """One trajectory and one generation at a time, as published code does it.

    Trajectory r draws from ``default_rng([seed, r])``.  OLS fits are
    ``np.linalg.pinv(X) @ y`` on the stacked data (augment refits on all
    batches so far); logistic fits are Newton iterations on one problem,
    warm-started from the previous generation.  Always draws explicit data.
    """
    design = _check_design(config, design_matrix)
    chol = _feature_factor(config)
    dt = np.dtype(config.dtype)
    R, n, d, G = config.trajectories, config.n, config.d, config.generations
    thetas = np.empty((R, G, d), dt)
    ok = np.ones((R, G), bool)
    theta0 = config.theta0_vector.astype(dt)
    for r in range(R):
        rng = np.random.default_rng([config.seed, r])

        def draw_x():
            z = rng.standard_normal((n, d), dtype=dt)
            return z if chol is None else z @ chol.T.astype(dt)

        x_fixed = None
        if config.design == "fixed":
            x_fixed = design.astype(dt) if design is not None else draw_x()
        theta = theta0.copy()
        xs, ys = [], []
        alive = True
        for g in range(G):
            x = x_fixed if x_fixed is not None else draw_x()
            if config.model == "ols":
                y = x @ theta + dt.type(config.sigma) * rng.standard_normal(n, dtype=dt)
            else:
                y = (rng.random(n, dtype=dt) < _sigmoid(x @ theta)).astype(dt)
            if config.workflow == "discard":
                x_fit, y_fit = x, y
            else:
                xs.append(x)
                ys.append(y)
                x_all, y_all = np.vstack(xs), np.concatenate(ys)
                if config.workflow == "augment" or g == 0:
                    x_fit, y_fit = x_all, y_all
                else:
                    replace = config.workflow == "subsample-replace"
                    idx = rng.choice(len(y_all), size=n, replace=replace)
                    x_fit, y_fit = x_all[idx], y_all[idx]
            if config.model == "ols":
                new = np.linalg.pinv(x_fit) @ y_fit
                good = bool(np.all(np.isfinite(new)))
            else:
                start = theta if g > 0 else np.zeros(d, dt)
                new, good = _newton_single(x_fit, y_fit, start, config.max_newton_iterations)
            if good:
                theta = new
            alive = alive and good
            thetas[r, g], ok[r, g] = theta, alive
    return BaselineResult(thetas, ok)
