"""Symmetric positive-definite solves, unrolled into scalar code for small d.

XLA's CPU backend runs a batched (vmapped) Cholesky or triangular solve as
one LAPACK call per d x d matrix: about 1.5-2 us each at d = 10, which is
most of an OLS augment fit.  Written instead as d^3/6 scalar multiply-adds
in Python loops, the factorisation and both substitutions become, under
``vmap``, elementwise arithmetic on vectors of length B (one lane per
problem) that XLA fuses into a few loops: about 0.3 us per d = 10 solve.
The code grows as d^3, and so does compile time (about 1.5 s at d = 10,
4 s at d = 16), so above `UNROLL_MAX_D` the LAPACK path is used.

The factor is never materialised as a (d, d) array: stacking the scalars
into a matrix and slicing them out again measured 3x slower.  Results agree
with LAPACK to rounding (same algorithm, different summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

UNROLL_MAX_D = 12


def conditioning_ok(diag, finite, scale) -> jax.Array:
    """Whether a Cholesky factor with diagonal `diag` (d,) of a matrix A is usable.

    Singular when either test fails:

    - the squared ratio of the smallest to the largest diagonal entry (a
      cheap proxy for 1/cond) falls below d * eps;
    - some pivot is rounding noise: ``diag[j]^2 <= 10 (d + 1) eps A[j, j]``
      (`scale` (d,) is A's diagonal).  ``diag[j]^2 / A[j, j]`` is the share of
      column j not explained by columns 0..j-1 (1 - R^2), which is exactly 0
      for a dependent column, and which a computed factor puts at most ~(d + 1)
      eps above 0 (Higham's backward error of Cholesky).  The first test
      alone passed an exactly singular 2 x 2 covariance whose last pivot came
      out at 0.8 eps instead of 0 (0 or NaN on other data and backends).

    `finite` says the factor and solution are finite.
    """
    d = diag.shape[-1]
    eps = jnp.finfo(diag.dtype).eps
    dmin, dmax = jnp.min(diag), jnp.max(diag)
    pivots_ok = jnp.all(diag * diag > 10 * (d + 1) * eps * scale)
    return finite & (dmin > 0) & ((dmin / dmax) ** 2 > d * eps) & pivots_ok


def spd_solve(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Solve a x = b for symmetric positive-definite `a` by Cholesky.

    **Arguments:** `a` (d, d) (only the lower triangle is read); `b` (d,).

    **Returns:** ``(x, ok)``: `x` (d,) in the dtype of `a`; `ok` () bool,
    False when the factor is not finite or numerically singular (see
    `conditioning_ok`); `x` is then meaningless (possibly NaN) and callers
    must substitute a fallback.  Deterministic.
    """
    d = a.shape[-1]
    if d > UNROLL_MAX_D:
        return lapack_spd_solve(a, b)
    low = [[None] * d for _ in range(d)]  # low[i][j], j <= i: the Cholesky factor
    for j in range(d):
        s = a[j, j]
        for k in range(j):
            s = s - low[j][k] * low[j][k]
        low[j][j] = jnp.sqrt(s)
        inv = 1.0 / low[j][j]
        for i in range(j + 1, d):
            s = a[i, j]
            for k in range(j):
                s = s - low[i][k] * low[j][k]
            low[i][j] = s * inv
    y = [None] * d
    for i in range(d):  # L y = b
        s = b[i]
        for k in range(i):
            s = s - low[i][k] * y[k]
        y[i] = s / low[i][i]
    x = [None] * d
    for i in reversed(range(d)):  # L^T x = y
        s = y[i]
        for k in range(i + 1, d):
            s = s - low[k][i] * x[k]
        x[i] = s / low[i][i]
    x = jnp.stack(x)
    diag = jnp.stack([low[i][i] for i in range(d)])
    # A non-finite factor entry reaches x through the substitutions (0 * inf = NaN,
    # and the diagonal divides every entry), so x and the diagonal decide finiteness.
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(diag))
    return x, conditioning_ok(diag, finite, jnp.stack([a[i, i] for i in range(d)]))


def one_lapack_call_per_problem(fn):
    """`fn(a, *rest)` whose LAPACK calls, under ``vmap`` on the CPU, each see one problem.

    jaxlib runs a vmapped Cholesky, triangular solve or eigen-decomposition
    as one batched LAPACK call, which it splits over XLA's intra-op thread
    pool once the batch is large enough (`_scaling.lapack_call_splits`),
    blocking a pool thread until the pieces finish; two kernels doing so at
    once on two cores can deadlock (so such kernels run one block at a time,
    `_concurrency.max_workers`), and so can two independent such calls in
    one kernel, which XLA runs at once.  The returned function is `fn` with a
    batching rule that, on the CPU backend, loops over the batch
    (``lax.map``: one unbatched call per problem, which jaxlib never splits),
    and elsewhere batches as JAX does (one batched call: cuSOLVER, TPU).  The
    per-problem work is what the batched call does anyway (jaxlib loops over
    the batch); the kernel may then run several blocks at once.  When the
    matrix `a` is not batched but other arguments are (one factor, several
    right-hand sides), they batch as JAX does, into one call per matrix,
    itself wrapped for an enclosing vmap.  Each problem's result is `fn`'s
    unbatched result, bit for bit (tested); against the batched call, the
    same to rounding (bit for bit in the engine's kernels but one, ~4e-14
    relative where a factor has several right-hand sides).  ``wrapped.fun``
    is `fn` itself.
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        if not in_batched[0]:  # one matrix, several right-hand sides: one call, wrapped in turn
            axes = tuple(0 if batched else None for batched in in_batched)
            out = one_lapack_call_per_problem(jax.vmap(fn, in_axes=axes))(*args)
        else:
            args = tuple(x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
                         for x, batched in zip(args, in_batched, strict=True))
            out = jax.lax.platform_dependent(
                *args,
                cpu=lambda *xs: jax.lax.map(lambda t: wrapped(*t), xs),
                default=jax.vmap(fn))
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


@one_lapack_call_per_problem
def cholesky(a: jax.Array) -> jax.Array:
    """``jnp.linalg.cholesky(a)`` of one (d, d) matrix: lower factor, NaN where not positive
    definite.  Under vmap on the CPU one LAPACK call per problem (`one_lapack_call_per_problem`);
    use ``jnp.vectorize(cholesky, signature="(d,d)->(d,d)")`` for stacked matrices."""
    return jnp.linalg.cholesky(a)


@one_lapack_call_per_problem
def eigvalsh(a: jax.Array) -> jax.Array:
    """``jnp.linalg.eigvalsh(a)`` of one symmetric (d, d) matrix, ascending; under vmap on
    the CPU one LAPACK call per problem (`one_lapack_call_per_problem`)."""
    return jnp.linalg.eigvalsh(a)


@one_lapack_call_per_problem
def lapack_spd_solve(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`spd_solve` by one LAPACK Cholesky and `cho_solve` whatever d: its path above
    `UNROLL_MAX_D`.  Slower per problem than the unrolled code under vmap for small d,
    but its compiled code does not grow with d: for a solve off the hot path it saves
    the unrolled code's compile time (2.5-2.8 s measured for the pooled fits' start at
    d = 10).  Same arguments, returns and failure test as `spd_solve`.  Under vmap on
    the CPU one LAPACK call per problem (`one_lapack_call_per_problem`)."""
    chol = jnp.linalg.cholesky(a)
    x = cho_solve((chol, True), b)
    finite = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.isfinite(x))
    return x, conditioning_ok(jnp.diagonal(chol), finite, jnp.diagonal(a))


@one_lapack_call_per_problem
def _lapack_transposed_solve(low: jax.Array, b: jax.Array) -> jax.Array:
    return solve_triangular(low, b, lower=True, trans="T")


def lower_transposed_solve(low: jax.Array, b: jax.Array) -> jax.Array:
    """Solve L^T x = b for lower-triangular `low` (d, d); `b` (d,) or (d, k): x shaped as `b`.

    Back substitution unrolled into d(d-1)/2 row updates for d <= `UNROLL_MAX_D`
    (under ``vmap``, vector arithmetic instead of one LAPACK ``trsm`` per problem);
    LAPACK above.  Besides speed, this keeps jaxlib's batched ``trsm``, which splits a
    large batch over XLA's thread pool, out of the kernels that use it, so their
    blocks may run in several threads at once (`_concurrency.max_workers`).  No
    singularity test: callers check the factor.  Deterministic.
    """
    d = low.shape[-1]
    if d > UNROLL_MAX_D:
        return _lapack_transposed_solve(low, b)
    x = [None] * d
    for i in reversed(range(d)):
        s = b[i]
        for k in range(i + 1, d):
            s = s - low[k, i] * x[k]
        x[i] = s / low[i, i]
    return jnp.stack(x)

