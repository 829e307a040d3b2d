"""Blocks at once in threads: order, errors, early stop, the deadlock guard, same numbers."""

import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import SimulationConfig, simulate
from collapse_jax._compile import jit
from collapse_jax._concurrency import (
    check_workers,
    custom_calls,
    default_workers,
    in_order,
    max_workers,
)
from collapse_jax._scaling import intra_op_threads


def _slow_square(i):
    time.sleep(0.02 * ((7 * i) % 5))  # later items often finish first
    return i * i


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_in_order_yields_in_item_order(workers):
    assert list(in_order(_slow_square, range(12), workers)) == [i * i for i in range(12)]


def test_in_order_runs_calls_at_once():
    running, most, lock = [0], [0], threading.Lock()

    def fn(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i

    assert list(in_order(fn, range(8), 2)) == list(range(8))
    assert most[0] == 2  # never more than `workers`, and that many at once


def test_in_order_raises_in_order_and_early_close_cancels():
    def fn(i):
        if i == 3:
            raise RuntimeError("block 3 failed")
        return i

    got = []
    with pytest.raises(RuntimeError, match="block 3 failed"):
        for x in in_order(fn, range(10), 2):
            got.append(x)
    assert got == [0, 1, 2]

    calls = []

    def record(i):
        calls.append(i)
        time.sleep(0.01)
        return i

    gen = in_order(record, range(100), 2)
    assert [next(gen), next(gen)] == [0, 1]
    gen.close()  # a precision target met: the rest is not run
    assert len(calls) <= 2 + 2 * 2


def test_check_workers():
    check_workers(None)
    check_workers(3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            check_workers(bad)


def test_default_workers():
    cpu = jax.default_backend() == "cpu"
    assert default_workers() == (min(2, intra_op_threads()) if cpu else 1)


def test_max_workers_follows_the_lapack_hazard():
    x = jnp.zeros((4096, 10, 10))  # a batched Cholesky jaxlib splits over the pool
    big = jit(jnp.linalg.cholesky).lower(x)
    small = jit(jnp.linalg.cholesky).lower(x[:8])  # below jaxlib's split threshold
    plain = jit(lambda a: (a * a).sum(0)).lower(x)
    assert any(t.startswith("lapack_") for t in custom_calls(big))
    assert custom_calls(plain) == []
    assert max_workers(big) == max(1, intra_op_threads() - 1)
    assert max_workers(small) == sys.maxsize
    assert max_workers(plain) == sys.maxsize


def test_simulate_workers_give_bitwise_identical_numbers():
    # Six blocks of a kernel with no custom call: two at once, merged in block order.
    cfg = SimulationConfig(model="ols", workflow="augment", design="fresh", n=20, d=3,
                           generations=6, trajectories=60, block_size=10, seed=5)
    one, two = simulate(cfg, workers=1), simulate(cfg, workers=2)
    assert (one.workers, two.workers) == (1, 2)
    for a, b in zip(one.moments, two.moments, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.failed_fits, two.failed_fits)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        simulate(cfg, workers=0)


def test_simulate_holds_back_kernels_that_could_deadlock(monkeypatch):
    # No engine kernel has a call jaxlib splits (next tests), so stand in for one: the
    # driver runs a kernel with at most `max_workers(lowered)` blocks at once.
    from collapse_jax import _driver

    monkeypatch.setattr(_driver, "_COMPILED", {})
    monkeypatch.setattr(_driver, "_MAX_WORKERS", {})
    monkeypatch.setattr(_driver, "max_workers", lambda lowered: 1)
    cfg = SimulationConfig(model="ols", workflow="augment", design="fresh", n=20, d=3,
                           generations=4, trajectories=40, block_size=10, seed=2)
    r = simulate(cfg, workers=2)
    assert r.workers == 1
    assert r.summary.count[-1] == 40


def _engine_configs():
    from collapse_jax._config import MODELS, POINT_MODELS, WORKFLOWS

    for model in MODELS:
        for workflow in WORKFLOWS:
            for design in ("fresh",) if model in POINT_MODELS else ("fresh", "fixed"):
                yield model, workflow, design


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="jaxlib's CPU LAPACK kernels")
def test_no_engine_kernel_makes_a_lapack_call_jaxlib_splits():
    # A batched LAPACK call that jaxlib splits over the intra-op pool blocks a pool thread
    # until its pieces finish, and XLA runs independent calls of one program at once: the
    # Gaussian model's metrics (a batched Cholesky and a batched eigvalsh over the block)
    # hung a single block on two cores at d = 13, B = 512, whatever `workers` was.  Every
    # kernel, at a d and block size where a batched call would split, makes none.
    from collapse_jax import _driver
    from collapse_jax._engine import build_block
    from collapse_jax._scaling import splitting_lapack_calls

    scalars = (jnp.asarray(0, jnp.int64),) * 3
    for model, workflow, design in _engine_configs():
        cfg = SimulationConfig(model=model, workflow=workflow, design=design, n=40, d=13,
                               generations=3, trajectories=512, block_size=512)
        spec, params = _driver._spec(cfg, None), _driver._params(cfg, None)
        lowered = jit(build_block(spec)).lower(*scalars, params)
        assert splitting_lapack_calls(lowered) == [], (model, workflow, design)


def test_lapack_solves_one_per_problem_let_large_d_kernels_run_at_once():
    # OLS augment with a fixed design inverts each trajectory's 13 x 13 Gram factor by
    # LAPACK (d > UNROLL_MAX_D): as one batched trsm over 256 factors it hung at once
    # with two threads on two cores (at d = 10, before that inverse was unrolled); one
    # call per problem (`one_lapack_call_per_problem`) is never split, so two blocks
    # run at once, with the numbers of one block at a time.
    cfg = SimulationConfig(model="ols", workflow="augment", design="fixed", n=30, d=13,
                           generations=3, trajectories=512, block_size=256, seed=2)
    one, two = simulate(cfg, workers=1), simulate(cfg, workers=2)
    assert two.workers == min(2, intra_op_threads())
    for a, b in zip(one.moments, two.moments, strict=True):
        np.testing.assert_array_equal(a, b)
    assert two.summary.count[-1] == 512
