"""The Gaussian-process limit: exact covariance propagation and Monte Carlo.

Monte Carlo checks compare with the exact values within 5 standard errors
(the delta-method SEs of `Summary`), at fixed seeds: a correct
implementation fails a single such check with probability ~6e-7.
"""

import math

import numpy as np
import pytest

import collapse_jax  # noqa: F401  (turns on float64)
from collapse_jax._limit import (
    MEDIAN_EFFICIENCY,
    LimitConfig,
    limit_exact,
    limit_monte_carlo,
    limit_ratio,
    limit_trajectories,
    trace_count,
)
from collapse_jax._statistics import block_moments, merge_moments, zero_moments

WORKFLOWS = ("discard", "augment", "subsample", "subsample-replace")
G = 30
# The shared Monte Carlo configuration: one compiled kernel serves most tests.
BASE = LimitConfig(workflows=WORKFLOWS, generations=G, draws=100_000, block_size=5_000, seed=1)


@pytest.fixture(scope="module")
def base_result():
    return limit_monte_carlo(BASE)


@pytest.fixture(scope="module")
def base_paths():
    """Per-draw paths of BASE's first 40,000 draws: {workflow: (40000, G, 1)}."""
    return limit_trajectories(BASE.replace(draws=40_000))


# ---------------------------------------------------------------------------
# Exact propagation
# ---------------------------------------------------------------------------


def test_exact_discard_and_augment_closed_forms():
    g = np.arange(1, 201)
    np.testing.assert_allclose(limit_ratio("discard", 200), g, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        limit_ratio("augment", 200), np.cumsum(1.0 / g**2), rtol=0, atol=1e-12
    )
    # Cross-generation covariances: discard is a random walk, augment a
    # martingale (U_g = U_h + independent increments): Cov(U_g, U_h) = Var(U_min).
    gg, hh = np.meshgrid(g[:50], g[:50], indexing="ij")
    np.testing.assert_allclose(limit_exact("discard", 50), np.minimum(gg, hh), rtol=0, atol=1e-12)
    var = np.cumsum(1.0 / g[:50] ** 2)
    np.testing.assert_allclose(
        limit_exact("augment", 50), var[np.minimum(gg, hh) - 1], rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("workflow", ["subsample", "subsample-replace"])
def test_exact_subsample_matches_independent_derivation(workflow):
    # docs/limit_process.md: with T_g = S_g / g,  T_g = T_{g-1} + (A_g + s_{g-1} C_{g-1}) / g,
    # so Var(T_g) = sum_k (1 + s_{k-1}^2) / k^2, Var(U_g) = Var(T_g) + s_g^2 and,
    # for h < g, Cov(U_g, U_h) = Var(T_h) + s_h^2 / (h + 1).  Computed here from
    # those sums, independently of the propagation in limit_exact.
    n = 120
    k = np.arange(1, n + 1)
    s2 = 1 - 1 / k if workflow == "subsample" else (k >= 2).astype(float)
    s2_prev = np.concatenate([[0.0], s2[:-1]])
    var_t = np.cumsum((1 + s2_prev) / k**2)
    expected = np.empty((n, n))
    for g in range(n):
        for h in range(n):
            lo = min(g, h)
            expected[g, h] = var_t[g] + s2[g] if g == h else var_t[lo] + s2[lo] / (lo + 2)
    np.testing.assert_allclose(limit_exact(workflow, n), expected, rtol=0, atol=1e-12)


def test_exact_plateaus_and_structure():
    # The G -> infinity plateaus (closed forms in the docs) and the 1/G approach
    # to them: the tails sum_{k>G} 1/k^2 ~ 1/G, plus 1 - s_G^2 = 1/G for subsample.
    big = 3000
    for w, plateau, gap in (
        ("augment", math.pi**2 / 6, 1.0),
        ("subsample", math.pi**2 / 2 - 2, 3.0),
        ("subsample-replace", math.pi**2 / 3 - 0.25, 2.0),
    ):
        assert big * (plateau - limit_ratio(w, big)[-1]) == pytest.approx(gap, rel=2e-3), w
    for w in WORKFLOWS:
        c = limit_exact(w, 40)
        assert c[0, 0] == 1.0
        np.testing.assert_array_equal(c, c.T)
        assert np.linalg.eigvalsh(c).min() > -1e-12  # a covariance matrix
        # Prefix property: G' generations are the first G' of G.
        np.testing.assert_allclose(limit_exact(w, 15), c[:15, :15], rtol=0, atol=1e-13)
    ratios = {w: limit_ratio(w, 100) for w in WORKFLOWS}
    # The ordering Dey & Donoho report: augment < subsample < subsample-replace < discard.
    assert np.all(ratios["augment"][1:] < ratios["subsample"][1:])
    assert np.all(ratios["subsample"][1:] < ratios["subsample-replace"][1:])
    assert np.all(ratios["subsample-replace"][3:] < ratios["discard"][3:])


# ---------------------------------------------------------------------------
# Monte Carlo against exact
# ---------------------------------------------------------------------------


def test_monte_carlo_matches_exact_every_generation(base_result):
    assert base_result.draws == BASE.draws and base_result.blocks == 20
    for w in WORKFLOWS:
        s = base_result.summaries[w]
        exact = limit_ratio(w, G)
        assert s.variance_ratio[0] == pytest.approx(1.0, abs=1e-12)
        z = (s.variance_ratio[1:] - exact[1:]) / s.variance_ratio_se[1:]
        assert np.all(np.abs(z) < 5), (w, z)
        np.testing.assert_array_equal(s.count, BASE.draws)
        # Var(U_1) = V = 1: the estimator covariance itself, not just ratios.
        var1 = s.cov[0, 0, 0]
        assert abs(var1 - 1.0) < 5 * math.sqrt(2.0 / BASE.draws)


def test_cross_generation_covariance_matches_exact(base_paths):
    for w in WORKFLOWS:
        u = base_paths[w][:, :, 0]  # (N, G)
        n = u.shape[0]
        u = u - u.mean(0)
        emp = u.T @ u / n
        se = np.sqrt(
            np.clip((u * u).T @ (u * u) / n - emp**2, 0, None) / n
        )  # sd(u_g u_h) / sqrt(n)
        exact = limit_exact(w, G)
        assert np.all(np.abs(emp - exact) < 5 * se + 1e-12), w


def test_paths_feed_the_same_moments_as_the_kernel(base_result, base_paths):
    # The compiled block kernel's moment sums are block_moments of exactly
    # the paths limit_trajectories returns.
    ref = limit_monte_carlo(BASE.replace(draws=10_000))
    for w in WORKFLOWS:
        m = merge_moments(
            zero_moments(G, 1), block_moments(base_paths[w][:10_000], np.ones((10_000, G)))
        )
        for a, b in zip(m, ref.moments[w], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)


def test_ratio_does_not_depend_on_efficiency(base_result):
    # Exact: c does not involve V at all; the covariances scale with V.
    # Monte Carlo with the sample median's V = (pi/2) I^{-1} (residual R_g drawn).
    cfg = BASE.replace(efficiency=MEDIAN_EFFICIENCY, draws=60_000, seed=2)
    assert cfg.has_residual
    med = limit_monte_carlo(cfg)
    for w in WORKFLOWS:
        s, ref = med.summaries[w], base_result.summaries[w]
        exact = limit_ratio(w, G)
        assert np.all(np.abs(s.variance_ratio[1:] - exact[1:]) < 5 * s.variance_ratio_se[1:]), w
        diff = s.variance_ratio[1:] - ref.variance_ratio[1:]
        assert np.all(
            np.abs(diff) < 5 * np.hypot(s.variance_ratio_se[1:], ref.variance_ratio_se[1:])
        ), w
        # Var(U_g) = c_gg * pi/2.
        v = s.cov[:, 0, 0]
        target = np.diag(limit_exact(w, G)) * MEDIAN_EFFICIENCY
        assert np.all(np.abs(v - target) < 5 * target * math.sqrt(2.0 / cfg.draws)), w


def test_multivariate_with_fisher_information():
    fisher = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
    v = np.linalg.inv(fisher) + np.diag([0.5, 0.1, 0.3])  # an inefficient estimator
    cfg = LimitConfig(
        workflows=("augment", "subsample-replace"),
        generations=6,
        d=3,
        fisher=fisher,
        estimator_cov=v,
        draws=60_000,
        block_size=20_000,
        seed=3,
    )
    res = limit_monte_carlo(cfg)
    n = cfg.draws
    for w, s in res.summaries.items():
        c = np.diag(limit_exact(w, 6))
        z_trace = (s.variance_ratio[1:] - c[1:]) / s.variance_ratio_se[1:]
        assert np.all(np.abs(z_trace) < 5), (w, z_trace)
        z_coord = (s.coord_ratio[1:] - c[1:, None]) / s.coord_ratio_se[1:]
        assert np.all(np.abs(z_coord) < 5), (w, z_coord)
        # Cov(U_g) = c_gg V, entrywise, with the Wishart standard errors.
        target = c[:, None, None] * v[None]
        se = c[:, None, None] * np.sqrt((np.outer(np.diag(v), np.diag(v)) + v**2) / n)[None]
        assert np.all(np.abs(s.cov - target) < 5 * se), w


def test_multivariate_paths_feed_the_same_moments_as_the_kernel():
    # d = 3, two workflows, a residual R_g: the kernel's per-workflow sums
    # (read off one Gram matrix of every workflow's [U_g, U_g^2] rows and the shared U_1's)
    # are block_moments of the paths, entry for entry.
    fisher = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
    cfg = LimitConfig(
        workflows=("subsample", "discard"),
        generations=4,
        d=3,
        fisher=fisher,
        estimator_cov=np.linalg.inv(fisher) + np.diag([0.5, 0.1, 0.3]),
        draws=3_000,
        block_size=3_000,
        seed=5,
    )
    assert cfg.has_residual
    ref = limit_monte_carlo(cfg)
    paths = limit_trajectories(cfg)
    for w in cfg.workflows:
        m = merge_moments(zero_moments(4, 3), block_moments(paths[w], np.ones((3_000, 4))))
        for a, b in zip(m, ref.moments[w], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)


def test_float32_matches_exact():
    cfg = LimitConfig(
        workflows=("subsample",),
        generations=5,
        draws=20_000,
        block_size=10_000,
        dtype="float32",
        seed=4,
    )
    s = limit_monte_carlo(cfg).summary
    exact = limit_ratio("subsample", 5)
    assert np.all(np.abs(s.variance_ratio[1:] - exact[1:]) < 5 * s.variance_ratio_se[1:])


# ---------------------------------------------------------------------------
# Determinism, compilation, precision mode
# ---------------------------------------------------------------------------


def test_block_size_invariance(base_result, base_paths):
    cfg = BASE.replace(draws=12_345)
    a = limit_monte_carlo(cfg)  # block 5000: 3 blocks, the last one padded
    b = limit_monte_carlo(cfg.replace(block_size=3_000))  # 5 blocks
    for w in WORKFLOWS:
        for x, y in zip(a.summaries[w], b.summaries[w], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)
    # Per-draw paths: a draw's path is the same in any batch (here: every 7th
    # draw, in batches of 500, against the contiguous 40,000-draw batch).
    idx = np.arange(0, 40_000, 7)[:1_000]
    parts = [limit_trajectories(cfg, part) for part in np.split(idx, 2)]
    for w in WORKFLOWS:
        np.testing.assert_array_equal(np.concatenate([p[w] for p in parts]), base_paths[w][idx])
    # And a shorter run's generations are the prefix of a longer one's.
    short = limit_trajectories(cfg.replace(generations=7), idx[:500])
    for w in WORKFLOWS:
        np.testing.assert_array_equal(short[w], base_paths[w][idx[:500], :7])


def test_more_blocks_do_not_recompile(base_result):
    limit_monte_carlo(BASE.replace(draws=5_000))
    before = trace_count()
    # More blocks, another seed, another (efficient) Fisher information: same kernel.
    res = limit_monte_carlo(BASE.replace(draws=35_000, seed=9, fisher=((2.0,),)))
    assert res.blocks == 7
    assert res.compile_time == 0.0
    assert trace_count() == before


def test_precision_mode_stops_when_target_holds(base_result):
    target = 0.02
    cfg = BASE.replace(draws=5_000)
    lines = []
    res = limit_monte_carlo(cfg, precision=target, progress=lines.append)
    assert res.worst_halfwidth < target
    assert res.draws > cfg.draws and res.draws % cfg.block_size == 0
    assert len(lines) == res.blocks and "draws/s" in lines[-1]
    # One block fewer would not have met the target ...
    fewer = limit_monte_carlo(cfg.replace(draws=res.draws - cfg.block_size))
    assert fewer.worst_halfwidth >= target
    # ... and the result is that of a fixed run of the same size.
    fixed = limit_monte_carlo(cfg.replace(draws=res.draws))
    for w in WORKFLOWS:
        np.testing.assert_allclose(
            fixed.summaries[w].variance_ratio, res.summaries[w].variance_ratio, rtol=1e-12
        )
    # The cap wins over an unreachable target.
    capped = limit_monte_carlo(cfg, precision=1e-4, max_draws=15_000)
    assert capped.draws == 15_000 and capped.worst_halfwidth > 1e-4


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"workflows": "augmnet"}, "did you mean 'augment'"),
        ({"workflows": ("augment", "augment")}, "duplicates"),
        ({"workflows": ()}, "at least one"),
        ({"generations": 0}, "generations must be a positive integer"),
        ({"draws": -5}, "draws must be a positive integer"),
        ({"block_size": 2.5}, "block_size must be a positive integer"),
        ({"d": 2, "fisher": ((1.0, 2.0), (2.0, 1.0))}, "positive definite"),
        ({"d": 2, "fisher": ((1.0, 0.5), (0.0, 1.0))}, "symmetric"),
        ({"d": 2, "fisher": ((1.0,),)}, "must be 2 x 2"),
        ({"efficiency": 0.9}, "efficiency must be a finite number >= 1"),
        ({"estimator_cov": ((0.5,),)}, "positive semidefinite"),
        ({"estimator_cov": ((2.0,),), "efficiency": 2.0}, "not both"),
        ({"dtype": "float16"}, "unknown dtype"),
        ({"seed": -1}, "seed"),
        ({"draws": 2**32}, "at most 2\\*\\*32"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LimitConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="did you mean 'subsample'"):
        limit_exact("subsampel", 5)
    with pytest.raises(ValueError, match="generations"):
        limit_ratio("augment", 0)
    before = trace_count()
    with pytest.raises(ValueError, match="precision"):
        limit_monte_carlo(BASE, precision=1.5)
    with pytest.raises(ValueError, match="max_draws"):
        limit_monte_carlo(BASE, precision=0.1, max_draws=10)
    with pytest.raises(ValueError, match="workers"):
        limit_monte_carlo(BASE, workers=0)
    with pytest.raises(ValueError, match="workers"):
        limit_monte_carlo(BASE, workers=1.5)
    with pytest.raises(ValueError, match="draws must be"):
        limit_trajectories(BASE, np.array([-1]))
    assert trace_count() == before  # rejected before anything was traced
