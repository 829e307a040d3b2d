import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax._small_linalg import UNROLL_MAX_D, spd_solve


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
