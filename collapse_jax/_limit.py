"""The sequential Gaussian-process limit of the workflows (Dey & Donoho 2024, Thm 5.1).

As n -> infinity the normalised estimates ``U_g = sqrt(n) (theta_g - theta0)``
of every workflow converge to a Gaussian process driven by independent
N(0, V) noises (V: the estimator's asymptotic covariance).  With ``I`` the
Fisher information, the paper's form of one generation is

    W_T(g) = Z_g + I U_{g-1},            Z_g ~ N(0, I)           (score part)
    P_g    = I^{-1} W_T(g) + R_g,        R_g ~ N(0, V - I^{-1})  (residual)
           = A_g + U_{g-1},              A_g = I^{-1} Z_g + R_g ~ N(0, V)

and the workflows (U_0 = 0, S_0 = 0; derivation in docs/limit_process.md):

    discard             U_g = P_g
    augment             S_g = S_{g-1} + P_g,  U_g = S_g / g
    subsample           S_g as above,         U_g = S_g / g + sqrt(1 - 1/g) C_g
    subsample-replace   S_g as above,         U_g = S_g / g + [g >= 2] C_g

with C_g ~ N(0, V) fresh each generation.  Every coefficient is a scalar, so
Cov(U_g, U_h) = c_gh V with a G x G matrix c that depends on the workflow only
(not on I, V or d): the variance ratio Var(U_g) / Var(U_1) = c_gg / c_11 is
the same for every coordinate, for the trace, and for every efficiency.

Two ways to get the numbers:

- `limit_exact` propagates the covariance of the state (S_g, U_g) through the
  recursion in float64 numpy: the whole matrix c, no Monte Carlo.
- `limit_monte_carlo` simulates the process literally in d dimensions with a
  given I and V (`LimitConfig`): a `lax.scan` over generations on a batch
  of draws, a block of draws is one compiled call, and each generation's
  estimates are reduced to the same moment sums (`features`,
  `merge_moments`, `summarize`) as the finite-n engine's.  All the
  workflows of a config run in the same kernel on common random numbers (the
  same Z_g, R_g, C_g): each workflow's estimates and intervals are those of
  a separate run, at a third of the random-number cost; the curves of
  different workflows are positively correlated.

Randomness: draw r uses the key ``k_r = fold_in(key(seed), r)`` and all its
normals are ``normal(k_r, (G, k, d))``, generation g taking slice g - 1
(threefry is counter-based, so the generation indexes the counter).  A
draw's path therefore does not depend on the block size or on which draws
share its block, and the first G' generations of a G-generation run are
those of a G'-generation run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _random
from ._compile import jit
from ._concurrency import check_workers, default_workers, in_order, max_workers
from ._config import DTYPES, WORKFLOWS, _choice, _positive_int
from ._statistics import Moments, Summary, merge_moments, summarize, zero_moments

MEDIAN_EFFICIENCY = math.pi / 2
"""V / I^{-1} for the sample median of N(theta, 1): use as `LimitConfig.efficiency`."""

MAX_DRAWS = 2**32
"""Draw indices are folded into the key as uint32: at most 2^32 draws per run."""

_Matrix = tuple[tuple[float, ...], ...]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _matrix(name: str, value: Any, d: int) -> _Matrix:
    try:
        a = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a {d} x {d} matrix of numbers") from None
    if a.shape != (d, d):
        raise ValueError(f"{name} must be {d} x {d}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite entries")
    if not np.allclose(a, a.T, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(a).max())):
        raise ValueError(f"{name} must be symmetric")
    return tuple(tuple(float(v) for v in row) for row in a)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """A square root L (L L^T = a) of a symmetric PSD matrix, by eigendecomposition."""
    w, q = np.linalg.eigh((a + a.T) / 2)
    return q * np.sqrt(np.clip(w, 0.0, None))[None, :]


@dataclasses.dataclass(frozen=True)
class LimitConfig:
    """What limit process to simulate.  Immutable, hashable, validated on construction.

    **Fields:**

    - `workflows`: a workflow name or a tuple of them, simulated together on
      common random numbers: ``"discard"``, ``"augment"``, ``"subsample"``
      (n points without replacement from the pool of g n) and
      ``"subsample-replace"`` (with replacement).  Generation 1 is always the
      fit on the real batch.  Default: all four.
    - `generations`: G >= 1.
    - `d`: dimension of theta.
    - `fisher`: the Fisher information I per data point, d x d symmetric
      positive definite (nested tuples or an array; default identity).
    - `estimator_cov`: the estimator's asymptotic covariance V, d x d, with
      V - I^{-1} positive semidefinite (the convolution theorem for regular
      estimators).  Default: ``efficiency * I^{-1}``.
    - `efficiency`: V = efficiency * I^{-1} when `estimator_cov` is not given;
      1 for the MLE, `MEDIAN_EFFICIENCY` (pi/2) for the sample median of
      N(theta, 1).  Must be >= 1.  Give `estimator_cov` or `efficiency`, not both.
    - `draws`: Monte Carlo draws (independent trajectories).
    - `seed`: base PRNG seed (draw r: ``k_r = fold_in(key(seed), r)``, whose
      normals are ``normal(k_r, (G, k, d))``).
    - `block_size`: draws per compiled call (one host merge and progress line
      each).  Results do not depend on it beyond float64 rounding of the
      merged sums.  Memory does not grow with it: a block runs in chunks of
      2,500 draws.  The default 62,500 divides 10^6.
    - `dtype`: ``"float64"`` (default) or ``"float32"`` for the noises and the
      recursion; the moment sums are float64 either way.
    """

    workflows: tuple[str, ...] | str = WORKFLOWS
    generations: int = 100
    d: int = 1
    fisher: _Matrix | None = None
    estimator_cov: _Matrix | None = None
    efficiency: float = 1.0
    draws: int = 1_000_000
    seed: int = 0
    block_size: int = 62_500
    dtype: str = "float64"

    def __post_init__(self) -> None:
        wf = (self.workflows,) if isinstance(self.workflows, str) else self.workflows
        try:
            wf = tuple(wf)
        except TypeError:
            raise ValueError(
                f"workflows must be a workflow name or a tuple of them, got {self.workflows!r}"
            ) from None
        if not wf:
            raise ValueError("workflows must name at least one workflow")
        for w in wf:
            _choice("workflow", w, WORKFLOWS)
        if len(set(wf)) != len(wf):
            raise ValueError(f"workflows has duplicates: {wf}")
        object.__setattr__(self, "workflows", wf)
        _choice("dtype", self.dtype, DTYPES)
        for name in ("generations", "d", "draws", "block_size"):
            _positive_int(name, getattr(self, name))
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63
        ):
            raise ValueError(f"seed must be a non-negative integer below 2**63, got {self.seed!r}")
        if self.draws > MAX_DRAWS - self.block_size:
            raise ValueError(f"draws must be at most 2**32 - block_size, got {self.draws}")
        try:
            eff = float(self.efficiency)
        except (TypeError, ValueError):
            raise ValueError(f"efficiency must be a number, got {self.efficiency!r}") from None
        if not math.isfinite(eff) or eff < 1.0:
            raise ValueError(
                f"efficiency must be a finite number >= 1 (V >= I^-1 for a regular estimator), "
                f"got {self.efficiency!r}"
            )
        object.__setattr__(self, "efficiency", eff)
        if self.fisher is not None:
            object.__setattr__(self, "fisher", _matrix("fisher", self.fisher, self.d))
            if np.linalg.eigvalsh(np.asarray(self.fisher)).min() <= 0:
                raise ValueError("fisher must be positive definite")
        if self.estimator_cov is not None:
            if eff != 1.0:
                raise ValueError("give estimator_cov or efficiency, not both")
            object.__setattr__(
                self, "estimator_cov", _matrix("estimator_cov", self.estimator_cov, self.d)
            )
            v = np.asarray(self.estimator_cov)
            low = np.linalg.eigvalsh(v - np.linalg.inv(self.fisher_matrix)).min()
            if low < -1e-10 * max(1.0, np.abs(v).max()):
                raise ValueError(
                    f"estimator_cov - fisher^-1 must be positive semidefinite (smallest eigenvalue "
                    f"{low:.3g}): no regular estimator beats the inverse Fisher information"
                )

    @property
    def fisher_matrix(self) -> np.ndarray:
        """I as a float64 (d, d) numpy array."""
        return np.eye(self.d) if self.fisher is None else np.asarray(self.fisher, np.float64)

    @property
    def estimator_cov_matrix(self) -> np.ndarray:
        """V as a float64 (d, d) numpy array."""
        if self.estimator_cov is not None:
            return np.asarray(self.estimator_cov, np.float64)
        return self.efficiency * np.linalg.inv(self.fisher_matrix)

    @property
    def has_residual(self) -> bool:
        """Whether V - I^{-1} is nonzero (an inefficient estimator), so R_g is drawn."""
        v = self.estimator_cov_matrix
        excess = v - np.linalg.inv(self.fisher_matrix)
        return bool(np.abs(excess).max() > 1e-12 * max(1.0, np.abs(v).max()))

    def replace(self, **changes: Any) -> LimitConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Exact covariance propagation
# ---------------------------------------------------------------------------


def _noise_scale(workflow: str, g: int) -> float:
    """s_g: the coefficient of the fresh C_g in U_g (0 for discard and augment)."""
    if workflow == "subsample":
        return math.sqrt(1.0 - 1.0 / g)
    if workflow == "subsample-replace":
        return 1.0 if g >= 2 else 0.0
    return 0.0


def limit_exact(workflow: str, generations: int) -> np.ndarray:
    """The covariance of the limit process, in units of V, by exact propagation.

    Propagates, generation by generation, Var(S_g), Cov(S_g, U_h) and
    Cov(U_g, U_h) for h <= g through the recursion (module docstring), in
    float64: O(G^2) time and memory, no sampling.  A_g and C_g are
    independent of everything before generation g, which is all it uses.

    **Arguments:**

    - `workflow`: one of ``discard``, ``augment``, ``subsample``,
      ``subsample-replace``.
    - `generations`: G >= 1.

    **Returns:** `c`, float64 numpy array of shape (G, G), symmetric, with
    ``Cov(U_g, U_h) = c[g-1, h-1] * V`` for any d, I and V; ``c[0, 0] = 1``.
    """
    _choice("workflow", workflow, WORKFLOWS)
    _positive_int("generations", generations)
    G = generations
    c = np.zeros((G, G))  # c[g-1, h-1] = Cov(U_g, U_h) / V
    cov_su = np.zeros(G)  # cov_su[h-1] = Cov(S_{g-1}, U_h) / V for h <= g - 1
    var_s = 0.0  # Var(S_{g-1}) / V
    for i in range(G):  # i = g - 1
        g = i + 1
        prev = c[i - 1, :i] if i else np.zeros(0)  # Cov(U_{g-1}, U_h), h < g
        prev_var = c[i - 1, i - 1] if i else 0.0  # Var(U_{g-1})
        if workflow == "discard":
            # U_g = U_{g-1} + A_g.
            c[i, :i] = prev
            c[i, i] = prev_var + 1.0
        else:
            # S_g = S_{g-1} + U_{g-1} + A_g.
            prev_cov_s = cov_su[i - 1] if i else 0.0  # Cov(S_{g-1}, U_{g-1})
            var_s = var_s + 2.0 * prev_cov_s + prev_var + 1.0
            cov_su[:i] = cov_su[:i] + prev  # Cov(S_g, U_h), h < g
            # U_g = S_g / g + s_g C_g.
            s = _noise_scale(workflow, g)
            c[i, :i] = cov_su[:i] / g
            c[i, i] = var_s / g**2 + s * s
            cov_su[i] = var_s / g  # Cov(S_g, U_g)
        c[:i, i] = c[i, :i]
    return c


def limit_ratio(workflow: str, generations: int) -> np.ndarray:
    """Exact variance ratios Var(U_g) / Var(U_1), g = 1..G: float64 array of shape (G,)."""
    c = limit_exact(workflow, generations)
    return np.diag(c) / c[0, 0]


# ---------------------------------------------------------------------------
# Monte Carlo: pure kernels
# ---------------------------------------------------------------------------


class LimitParams(NamedTuple):
    """Runtime matrices of the process (arrays, so changing them never recompiles)."""

    score_sqrt: jax.Array  # shape=(d, d): L with L L^T = I (draws Z ~ N(0, I)).
    fisher: jax.Array  # shape=(d, d): I.
    fisher_inv: jax.Array  # shape=(d, d): I^{-1}.
    residual_sqrt: jax.Array  # shape=(d, d): a square root of V - I^{-1}.
    cov_sqrt: jax.Array  # shape=(d, d): a square root of V (draws C_g).


class LimitState(NamedTuple):
    """State of one trajectory after generation g, for each simulated workflow."""

    total: jax.Array  # shape=(W, d): S_g = sum_{i<=g} P_i (discard: P_g).
    estimate: jax.Array  # shape=(W, d): U_g = sqrt(n) (theta_g - theta0).


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a compiled kernel (the compile-cache key)."""

    workflows: tuple[str, ...]
    generations: int
    d: int
    dtype: str
    has_residual: bool
    block_size: int

    @classmethod
    def from_config(cls, config: LimitConfig) -> _Spec:
        return cls(
            config.workflows,
            config.generations,
            config.d,
            config.dtype,
            config.has_residual,
            config.block_size,
        )

    @property
    def has_subsample(self) -> bool:
        return any(w.startswith("subsample") for w in self.workflows)

    @property
    def noise_rows(self) -> int:
        return 1 + int(self.has_residual) + int(self.has_subsample)


def limit_params(config: LimitConfig) -> LimitParams:
    """The `LimitParams` of a config, in its dtype."""
    dt = jnp.dtype(config.dtype)
    fisher = config.fisher_matrix
    fisher_inv = np.linalg.inv(fisher)
    cov = config.estimator_cov_matrix
    return LimitParams(
        score_sqrt=jnp.asarray(np.linalg.cholesky(fisher), dt),
        fisher=jnp.asarray(fisher, dt),
        fisher_inv=jnp.asarray(fisher_inv, dt),
        residual_sqrt=jnp.asarray(_psd_sqrt(cov - fisher_inv), dt),
        cov_sqrt=jnp.asarray(_psd_sqrt(cov), dt),
    )


def _matvec(m: jax.Array, v: jax.Array) -> jax.Array:
    """m (d, d) times v (..., d, R) along d, for R trajectories: shape (..., d, R).

    Multiply-and-sum instead of a dot: d is small, and this fuses with the
    rest of the step (a batched dot does not).
    """
    m = m.reshape((1,) * (v.ndim - 2) + m.shape + (1,))
    return jnp.sum(m * v[..., None, :, :], axis=-2)


def build_noise(spec: _Spec) -> Callable[[jax.Array], jax.Array]:
    """All standard-normal noise of a batch of trajectories.

    Returns `noise(keys) -> array (G, k, d, R)` (spec dtype): `keys` shape
    (R,), the trajectories' typed keys ``k_r = fold_in(key(seed), r)``;
    ``noise[..., r] = _random.normal(k_r, (G, k, d))``, generation g's slice
    ``[g-1]`` holding the standard normals behind Z_g, then R_g (if V !=
    I^{-1}), then C_g (if a subsample workflow is simulated).  Drawn in this
    generation-major, trajectory-minor layout (``vmap(..., out_axes=3)``), so
    each scan step reads one contiguous (k, d, R) slice and no transpose is
    needed: 2-8% faster than drawing (R, G, k, d) and transposing (measured
    on the AMD EPYC host, alternating runs), the same numbers.

    Threefry is counter-based: entry (g, j, i) is a hash of k_r and its flat
    index, so the generation is the counter.  With JAX's default
    ``jax_threefry_partitionable`` the first G' generations of a G-generation
    draw are those of a G'-generation draw (tested).  One ``normal`` call per
    draw instead of a ``fold_in(k_r, g)`` per generation halves the cost of
    the random numbers on CPU (measured: 65 vs 125 ns per generation with two
    normals).
    """
    rows, G, d, dt = spec.noise_rows, spec.generations, spec.d, jnp.dtype(spec.dtype)

    def noise(keys: jax.Array) -> jax.Array:
        return jax.vmap(lambda k: _random.normal(k, (G, rows, d), dt), out_axes=3)(keys)

    return noise


def build_step(
    spec: _Spec,
) -> Callable[[LimitParams, LimitState, jax.Array, jax.Array], LimitState]:
    """One generation of the limit process, every workflow of `spec`, a batch of trajectories.

    Returns `step(params, state, noise, g) -> state`: `state` the `LimitState`
    after generation g - 1 (arrays (W, d, R) for R trajectories: the
    trajectories are the minor axis, so every operation is a contiguous
    vector operation), `noise` shape (k, d, R) standard normals (rows as in
    `build_noise`), `g` the generation (uint32 scalar, 1-based).  Implements
    W_T(g) = Z_g + I U_{g-1}, P_g = I^{-1} W_T(g) + R_g and the workflow
    updates of the module docstring, for all W workflows at once: each
    workflow's update is a where/scale over the workflow axis, the same
    arithmetic as updating it alone.
    """
    dt = jnp.dtype(spec.dtype)
    workflows = np.asarray(spec.workflows)
    discard = jnp.asarray(workflows == "discard")[:, None, None]  # (W, 1, 1)
    sub = jnp.asarray(workflows == "subsample", dt)[:, None, None]
    rep = jnp.asarray(workflows == "subsample-replace", dt)[:, None, None]

    def step(params: LimitParams, state: LimitState, noise: jax.Array, g: jax.Array) -> LimitState:
        def row(i):  # (1, d, R): broadcast over the workflows
            return noise[None, i]

        z = _matvec(params.score_sqrt, row(0))  # Z_g ~ N(0, I), shared by the workflows
        w_t = z + _matvec(params.fisher, state.estimate)  # W_T(g) = Z_g + I U_{g-1}
        p = _matvec(params.fisher_inv, w_t)  # P_g = A_g + U_{g-1}
        if spec.has_residual:
            p = p + _matvec(params.residual_sqrt, row(1))  # + R_g
        gf = g.astype(dt)
        total = jnp.where(discard, p, state.total + p)  # S_g = S_{g-1} + P_g (discard: P_g)
        u = total / gf
        if spec.has_subsample:
            fresh = _matvec(params.cov_sqrt, row(-1))  # C_g ~ N(0, V)
            u = u + (sub * jnp.sqrt(1 - 1 / gf) + rep * (g >= 2).astype(dt)) * fresh
        return LimitState(total=total, estimate=jnp.where(discard, p, u))

    return step


def _scan_generations(spec: _Spec, params: LimitParams, noise: jax.Array, emit):
    """Run the recursion over generations for a batch of trajectories.

    `noise` (G, k, d, R) from `build_noise`; after every generation,
    ``emit(U_g, U_1) -> y`` (U_g (W, d, R); U_1 (d, R), the same in every
    workflow: U_1 = P_1); returns the ``y`` stacked along a leading
    generation axis.
    """
    step = build_step(spec)
    R, W, d, dt = noise.shape[-1], len(spec.workflows), spec.d, jnp.dtype(spec.dtype)

    def body(carry, x):
        state, u1 = carry
        state = step(params, state, *x)
        u1 = jnp.where(x[1] == 1, state.estimate[0], u1)
        return (state, u1), emit(state.estimate, u1)

    zero = jnp.zeros((W, d, R), dt)
    g = jnp.arange(1, spec.generations + 1, dtype=jnp.uint32)
    _, ys = jax.lax.scan(body, (LimitState(zero, zero), zero[0]), (noise, g))
    return ys


def _draw_keys(key: jax.Array, draws: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, draws)


def build_trajectories(spec: _Spec) -> Callable[[jax.Array, jax.Array, LimitParams], jax.Array]:
    """Whole trajectories of the limit process for a batch of draw indices.

    Returns `trajectories(key, draws, params) -> U`: `key` the base typed key
    ``jax.random.key(seed)``, `draws` uint32 array (R,) of global draw
    indices, `U` shape (R, W, G, d) in the spec's dtype (``U[r, w, g-1]`` is
    U_g of draw r under workflow ``spec.workflows[w]``).  Pure; draw r's
    path depends only on (seed, r, params), not on R.
    """
    noise_fn = build_noise(spec)

    def trajectories(key: jax.Array, draws: jax.Array, params: LimitParams) -> jax.Array:
        u = _scan_generations(spec, params, noise_fn(_draw_keys(key, draws)), lambda u, u1: u)
        return jnp.transpose(u, (3, 1, 0, 2))  # (G, W, d, R) -> (R, W, G, d)

    return trajectories


# A block runs its draws in chunks of _CHUNK (noise, then the recursion with
# each generation's moment sums taken inside the scan step): a step then
# touches (W, d, _CHUNK) arrays, large enough to amortise XLA's per-operation
# overhead and small enough to stay in cache.  Measured on this CPU against
# chunks of 500 with the moments taken after the scan: ~2x faster per block.
_CHUNK = 2500
_TRACES = 0


def _sum_moments(m: Moments) -> Moments:
    return Moments(*(x.sum(0) for x in m))


def build_block(spec: _Spec) -> Callable[[jax.Array, jax.Array, jax.Array, LimitParams], Moments]:
    """One block of draws reduced to `Moments`, one per workflow (float64).

    Returns `block(key, start, count, params) -> Moments` with a leading
    workflow axis (count (W, G), sum (W, G, 4d), outer (W, G, 4d, 4d)), over
    the draws ``start .. start + block_size - 1`` (`start` uint32 scalar)
    whose index is below `count` (uint32 scalar: the run's total); the other
    draws, and the padding up to whole chunks, get weight 0.  Workflow w's
    entry holds the same sums as `block_moments` of its paths (delta = U_g,
    theta_ref = theta0), summed in another order.
    """
    noise_fn = build_noise(spec)
    B, W, d = spec.block_size, len(spec.workflows), spec.d
    n_chunks = -(-B // _CHUNK)

    def block(key: jax.Array, start: jax.Array, count: jax.Array, params: LimitParams) -> Moments:
        global _TRACES
        _TRACES += 1  # runs once per trace: counts (re)compilations
        stop = jnp.minimum(count.astype(jnp.uint64), start.astype(jnp.uint64) + B)

        def chunk(offset: jax.Array) -> Moments:
            index = start.astype(jnp.uint64) + offset + jnp.arange(_CHUNK, dtype=jnp.uint64)
            # Padding past 2^32 wraps around in uint32: it gets weight 0.
            noise = noise_fn(_draw_keys(key, index.astype(jnp.uint32)))
            weight = (index < stop).astype(jnp.float64)

            def emit(u: jax.Array, u1: jax.Array):
                # This generation's sums over the chunk, every workflow at once.  U_1 = P_1
                # in every workflow (module docstring), so the features of all workflows are
                # the rows [U_g, U_g^2] of each and one shared [U_1, U_1^2]; with the weight
                # row appended, one Gram matrix of those rows holds every workflow's outer
                # sums and, in its last column, the plain sums (weights are 0/1).  Its
                # blocks between two workflows are wasted, but one plain matmul of
                # 2d(W + 1) + 1 rows beats a batched one, and the earlier Gram of 4dW
                # rows (W = 4, d = 1: 11 rows against 16) did twice the work.
                u = u.astype(jnp.float64) * weight[None, None, :]  # (W, d, R)
                u1 = u1.astype(jnp.float64) * weight[None, :]  # (d, R)
                rows = jnp.concatenate([
                    jnp.concatenate([u, u * u], axis=1).reshape(W * 2 * d, _CHUNK),
                    u1, u1 * u1, weight[None, :],
                ])
                gram = rows @ rows.T
                first = slice(2 * d * W, 2 * d * (W + 1))  # the [U_1, U_1^2] rows

                def features_of(w, matrix):  # rows (and columns) [U_g, U_g^2, U_1, U_1^2] of w
                    own = matrix[2 * d * w:2 * d * (w + 1)]
                    return jnp.concatenate([own, matrix[first]])

                outer = jnp.stack([features_of(w, features_of(w, gram).T) for w in range(W)])
                sums = jnp.stack([features_of(w, gram[:-1, -1]) for w in range(W)])
                return sums, outer  # (W, 4d), (W, 4d, 4d): `features` order

            sums, outer = _scan_generations(spec, params, noise, emit)  # (G, W, ...)
            count = jnp.broadcast_to(weight.sum(), (W, spec.generations))
            return Moments(count, jnp.swapaxes(sums, 0, 1), jnp.swapaxes(outer, 0, 1))

        offsets = jnp.arange(n_chunks, dtype=jnp.uint64) * _CHUNK
        return _sum_moments(jax.lax.map(chunk, offsets))

    return block


def trace_count() -> int:
    """How many times a limit block kernel has been traced in this process (for tests)."""
    return _TRACES


@functools.lru_cache(maxsize=64)
def _compiled(spec: _Spec) -> tuple[Any, float, int]:
    """The ahead-of-time compiled block kernel for `spec`, the seconds compiling took, and
    the most blocks that may run at once (`_concurrency.max_workers`)."""
    t0 = time.perf_counter()
    eye = jnp.eye(spec.d, dtype=jnp.dtype(spec.dtype))
    args = (jax.random.key(0), jnp.uint32(0), jnp.uint32(1), LimitParams(eye, eye, eye, eye, eye))
    lowered = jit(build_block(spec)).lower(*args)
    return lowered.compile(), time.perf_counter() - t0, max_workers(lowered)


@functools.lru_cache(maxsize=16)
def _jitted_trajectories(spec: _Spec):
    return jit(build_trajectories(spec))


# ---------------------------------------------------------------------------
# Monte Carlo: driver
# ---------------------------------------------------------------------------


class LimitResult(NamedTuple):
    config: LimitConfig
    summaries: dict[str, Summary]  # per workflow: per-generation statistics of U_g.
    moments: dict[str, Moments]  # per workflow: the merged float64 sums.
    draws: int  # draws used (config.draws, or more with a precision target).
    blocks: int  # compiled calls run.
    wall_time: float  # seconds, this call, including compilation.
    compile_time: float  # seconds compiling in this call (0 when cached).
    worst_halfwidth: float  # max over workflows and g of the relative 95% half-width.
    workers: int = 1  # blocks that ran at once (threads).

    @property
    def summary(self) -> Summary:
        """The `Summary` of a single-workflow run."""
        if len(self.summaries) != 1:
            raise ValueError(f"several workflows {tuple(self.summaries)}: use summaries[workflow]")
        return next(iter(self.summaries.values()))


def _split(config: LimitConfig, m: Moments) -> dict[str, Moments]:
    return {w: Moments(*(np.asarray(x[i]) for x in m)) for i, w in enumerate(config.workflows)}


def _worst(summaries: dict[str, Summary]) -> tuple[float, str]:
    """The largest relative 95% half-width over workflows and generations (NaN counts as inf)."""
    worst, where = -math.inf, ""
    for w, s in summaries.items():
        h = np.nan_to_num(s.relative_halfwidth, nan=math.inf)
        if h.max() > worst:
            worst, where = float(h.max()), w
    return worst, where


def _blocks(draws: int, block: int, cap: int | None):
    """The block schedule: (start, stop) covering [0, draws), then (if `cap`) more up to `cap`."""
    start, end = 0, draws
    while start < end:
        stop = min(end, start + block)
        yield start, stop
        start = stop
        if start == draws and cap is not None:
            end = cap


def _block_runner(config: LimitConfig) -> tuple[Callable[[tuple[int, int]], Moments], float, int]:
    """``run((start, stop)) -> Moments`` (numpy) for one block (thread-safe), the seconds
    compiling took in this call (0 when cached) and the most blocks that may run at once."""
    hits = _compiled.cache_info().hits
    compiled, compile_time, most = _compiled(_Spec.from_config(config))
    if _compiled.cache_info().hits > hits:
        compile_time = 0.0
    key, params = jax.random.key(config.seed), limit_params(config)

    def run(block: tuple[int, int]) -> Moments:
        start, stop = block
        m = compiled(key, jnp.uint32(start), jnp.uint32(stop), params)
        return Moments(*(np.asarray(x) for x in jax.device_get(m)))

    return run, compile_time, most


def limit_monte_carlo(
    config: LimitConfig,
    precision: float | None = None,
    *,
    max_draws: int | None = None,
    progress: bool | Callable[[str], None] = False,
    workers: int | None = None,
) -> LimitResult:
    """Monte Carlo of the limit process, streamed through the moment statistics.

    **Arguments:**

    - `config`: a `LimitConfig`.
    - `precision`: optional target P in (0, 1).  After `config.draws` draws,
      keep adding blocks until the relative 95% half-width of every
      generation's variance ratio (`Summary.relative_halfwidth`), for every
      workflow, is below P, or `max_draws` draws are done.
    - `max_draws`: cap for the precision mode (default 2^32 - block_size).
    - `progress`: True prints a line per block to stderr (draws done, draws/s,
      worst relative half-width); a callable receives the line instead.
    - `workers`: blocks run at once, in threads of this process
      (`_concurrency`).  Default: `default_workers` (min(2, CPUs) on the CPU
      backend, where XLA runs much of this kernel on one thread: two blocks
      at once ran 1.4-1.6x as many draws per second on two cores; 1 on a
      GPU/TPU).  Fewer where `_concurrency.max_workers` says so (this
      kernel has no custom calls; `LimitResult.workers` tells).  Each block
      in flight holds its own buffers.  The numbers do not depend on it.

    **Returns:** `LimitResult`.  Deterministic in (config, precision,
    max_draws): the same draws for any block size, summaries equal to
    float64 rounding (a precision run stops at a block boundary, so its
    draw count depends on the block size); bitwise the same for any `workers`.
    """
    B = config.block_size
    if precision is not None:
        try:
            ok = 0 < float(precision) < 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"precision must be a number in (0, 1), got {precision!r}")
    cap = MAX_DRAWS - B if max_draws is None else max_draws
    if (
        isinstance(cap, bool)
        or not isinstance(cap, int)
        or not config.draws <= cap <= MAX_DRAWS - B
    ):
        raise ValueError(
            f"max_draws must be an integer in [draws, 2**32 - block_size], got {max_draws!r}"
        )
    check_workers(workers)
    say = (
        (lambda s: print(s, file=sys.stderr, flush=True))
        if progress is True
        else (progress or None)
    )

    t_start = time.perf_counter()
    W, G, d = len(config.workflows), config.generations, config.d
    moments = Moments(*(np.broadcast_to(x, (W, *x.shape)).copy() for x in zero_moments(G, d)))
    done = blocks = 0
    schedule = _blocks(config.draws, B, cap if precision is not None else None)
    run, compile_time, most = _block_runner(config)
    workers = min(default_workers() if workers is None else workers, most)
    results = in_order(lambda block: (block[1], run(block)), schedule, workers)
    try:
        for stop, m in results:
            moments = merge_moments(moments, m)
            done, blocks = stop, blocks + 1
            check = precision is not None and done >= config.draws
            if say is not None or check:
                worst, where = _worst({w: summarize(x) for w, x in _split(config, moments).items()})
            if say is not None:
                rate = done / max(time.perf_counter() - t_start - compile_time, 1e-9)
                say(
                    f"[limit] {done:,} draws  {rate:,.0f} draws/s  "
                    f"worst 95% rel. half-width {worst:.3g} ({where})"
                )
            if check and worst < precision:
                break
    finally:
        results.close()  # discards the blocks run ahead
    per = _split(config, moments)
    summaries = {w: summarize(x) for w, x in per.items()}
    return LimitResult(
        config=config,
        summaries=summaries,
        moments=per,
        draws=done,
        blocks=blocks,
        wall_time=time.perf_counter() - t_start,
        compile_time=compile_time,
        worst_halfwidth=_worst(summaries)[0],
        workers=workers,
    )


def limit_trajectories(
    config: LimitConfig, draws: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-draw paths of the given draw indices, as used by `limit_monte_carlo`.

    **Arguments:**

    - `config`: a `LimitConfig` (its block size is irrelevant here).
    - `draws`: integer array (R,) of draw indices in [0, 2^32); default
      ``arange(config.draws)``.

    **Returns:** per workflow, a numpy array (R, G, d) in the config dtype:
    ``U[r, g-1]`` = U_g of draw ``draws[r]``.  For tests and for
    cross-generation covariances, which the moment sums do not keep.
    """
    idx = np.arange(config.draws) if draws is None else np.asarray(draws)
    if (
        idx.ndim != 1
        or not np.issubdtype(idx.dtype, np.integer)
        or (idx.size and (idx.min() < 0 or idx.max() >= MAX_DRAWS))
    ):
        raise ValueError("draws must be a 1-d integer array of indices in [0, 2**32)")
    spec = dataclasses.replace(_Spec.from_config(config), block_size=0)
    u = _jitted_trajectories(spec)(
        jax.random.key(config.seed), jnp.asarray(idx, jnp.uint32), limit_params(config)
    )
    u = np.asarray(u)
    return {w: u[:, i] for i, w in enumerate(config.workflows)}
