import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax._scaling import splitting_lapack_calls
from collapse_jax._small_linalg import (
    UNROLL_MAX_D,
    lapack_spd_solve,
    lower_transposed_solve,
    spd_solve,
)


@pytest.mark.parametrize("d", [1, 3, UNROLL_MAX_D, UNROLL_MAX_D + 1])
def test_spd_solve_matches_float64_reference(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((64, 3 * d + 2, d))
    a = np.einsum("bni,bnj->bij", x, x)
    b = rng.standard_normal((64, d))
    sol, ok = jax.jit(jax.vmap(spd_solve))(jnp.asarray(a), jnp.asarray(b))
    ref = np.linalg.solve(a, b[..., None])[..., 0]
    assert np.all(np.asarray(ok))
    np.testing.assert_allclose(np.asarray(sol), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [4, UNROLL_MAX_D + 2])
def test_spd_solve_flags_singular_and_non_finite(d):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((d + 3, d))
    good = x.T @ x
    rank_deficient = x[:, :-1].T @ x[:, :-1]
    singular = np.zeros((d, d))
    singular[:-1, :-1] = rank_deficient  # exactly zero last row and column
    collinear = good.copy()
    collinear[:, -1] = collinear[:, 0]
    collinear[-1, :] = collinear[0, :]
    collinear[-1, -1] = collinear[0, 0]  # last feature = first: rank d - 1
    nan = good.copy()
    nan[1, 0] = np.nan
    negative = -good
    a = jnp.asarray(np.stack([good, singular, collinear, nan, negative]))
    _, ok = jax.vmap(spd_solve)(a, jnp.ones((5, d)))
    assert np.asarray(ok).tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("d", [2, 3, 5, UNROLL_MAX_D + 2])
def test_exactly_dependent_column_is_flagged_whatever_the_rounding(d):
    # Gram matrices with the last column exactly twice the first: rank d - 1.  The
    # computed last pivot is rounding noise of either sign; the min/max diagonal test
    # alone passed 51 of these 200 at d = 2 and 27 at d = 3 (measured).  A column
    # whose 1 - R^2 is 1e-10, small but real, stays usable.
    dependent, nearly = [], []
    for seed in range(200):
        x = np.random.default_rng(seed).standard_normal((d + 5, d))
        x[:, -1] = 2.0 * x[:, 0]
        dependent.append(x.T @ x)
        x[:, -1] += 1e-5 * np.random.default_rng(seed + 1000).standard_normal(d + 5)
        nearly.append(x.T @ x)
    solve = jax.vmap(spd_solve)
    _, ok = solve(jnp.asarray(np.stack(dependent)), jnp.ones((200, d)))
    assert not np.any(np.asarray(ok))
    sol, ok = solve(jnp.asarray(np.stack(nearly)), jnp.ones((200, d)))
    assert np.all(np.asarray(ok))
    # cond(A) ~ 1e10 here, so compare backward errors, not solutions.
    a, x = np.stack(nearly), np.asarray(sol)
    residual = np.abs(np.einsum("bij,bj->bi", a, x) - 1.0).max(axis=1)
    scale = np.abs(a).max(axis=(1, 2)) * np.abs(x).max(axis=1)
    assert np.all(residual <= 1e-12 * scale)


def test_gaussian_fit_flags_points_on_a_line():
    # These 20 points on a line gave a last pivot of 0.8 eps, not 0: accepted before.
    from collapse_jax import gaussian_fit

    line = np.outer(np.random.default_rng(8).normal(size=20), [1.0, 2.0])
    res = gaussian_fit(jnp.asarray(line), fallback=jnp.arange(5.0))
    assert not bool(res.converged)
    assert np.array_equal(np.asarray(res.theta), np.arange(5.0))


@pytest.mark.parametrize("d", [1, 4, UNROLL_MAX_D, UNROLL_MAX_D + 1])
def test_lower_transposed_solve_matches_float64_reference(d):
    # Vector and matrix right-hand sides (the fixed-design kernels solve L^T X = I),
    # vmapped: unrolled up to UNROLL_MAX_D, LAPACK above; no LAPACK call below it.
    rng = np.random.default_rng(10 + d)
    x = rng.standard_normal((32, 2 * d + 3, d))
    low = np.linalg.cholesky(np.einsum("bni,bnj->bij", x, x))
    v = rng.standard_normal((32, d))
    eye = np.broadcast_to(np.eye(d), (32, d, d))
    solve = jax.jit(jax.vmap(lower_transposed_solve))
    got_v = np.asarray(solve(jnp.asarray(low), jnp.asarray(v)))
    got_m = np.asarray(solve(jnp.asarray(low), jnp.asarray(eye)))
    np.testing.assert_allclose(got_v, np.linalg.solve(np.swapaxes(low, 1, 2), v[..., None])[..., 0],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_m, np.linalg.inv(np.swapaxes(low, 1, 2)), rtol=1e-10, atol=1e-12)
    hlo = solve.lower(jnp.asarray(low), jnp.asarray(eye)).as_text()
    assert ("lapack" in hlo) == (d > UNROLL_MAX_D)


def _spd_batch(batch: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 2 * d, d))
    return jnp.asarray(np.einsum("bni,bnj->bij", x, x)), jnp.asarray(rng.standard_normal((batch, d)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering is the one tested")
def test_lapack_solves_under_vmap_make_one_unsplit_call_per_problem():
    # 300 problems of 13 x 13: over jaxlib's split threshold as one batched call (the raw
    # function's lowering has it), so a kernel holding it could not run two blocks at once.
    d = UNROLL_MAX_D + 1
    a, b = _spd_batch(300, d)
    raw_solve = lapack_spd_solve.fun  # the function without the batching rule
    low = jnp.linalg.cholesky(a)  # lower-triangular factors for the transposed solve
    raw = jax.jit(jax.vmap(raw_solve)).lower(a, b)
    assert splitting_lapack_calls(raw) == ["lapack_dpotrf_ffi", "lapack_dtrsm_ffi",
                                           "lapack_dtrsm_ffi"]
    nested_a, nested_b = a.reshape(30, 10, d, d), b.reshape(30, 10, d)
    for fn, args in [
        (jax.vmap(lapack_spd_solve), (a, b)),
        (jax.vmap(jax.vmap(lapack_spd_solve)), (nested_a, nested_b)),
        (jax.vmap(lower_transposed_solve), (low, b)),
        # one factor, several right-hand sides (`_estimators`' inverse), inside a batch
        (jax.vmap(jax.vmap(lapack_spd_solve, in_axes=(None, 0))), (a, jnp.stack([b] * 3, 1))),
    ]:
        assert splitting_lapack_calls(jax.jit(fn).lower(*args)) == []

    x, ok = jax.jit(jax.vmap(lapack_spd_solve))(a, b)
    x2, ok2 = jax.jit(jax.vmap(jax.vmap(lapack_spd_solve)))(nested_a, nested_b)
    for i in (0, 137, 299):  # each problem's result is its unbatched result, bit for bit
        xi, oki = jax.jit(raw_solve)(a[i], b[i])
        np.testing.assert_array_equal(np.asarray(x[i]), np.asarray(xi))
        assert bool(ok[i]) and bool(oki)
    np.testing.assert_array_equal(np.asarray(x2).reshape(300, d), np.asarray(x))
    assert bool(jnp.all(ok)) and bool(jnp.all(ok2))
    ref = np.linalg.solve(np.asarray(a), np.asarray(b)[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-10, atol=1e-12)
    several, _ = jax.jit(jax.vmap(jax.vmap(lapack_spd_solve, in_axes=(None, 0))))(
        a, jnp.stack([b, 2 * b, -b], 1))
    np.testing.assert_allclose(np.asarray(several), np.stack([ref, 2 * ref, -ref], 1),
                               rtol=1e-10, atol=1e-12)
    t = jax.jit(jax.vmap(lower_transposed_solve))(low, b)
    np.testing.assert_allclose(np.einsum("bji,bj->bi", np.asarray(low), np.asarray(t)),
                               np.asarray(b), rtol=1e-10, atol=1e-10)
