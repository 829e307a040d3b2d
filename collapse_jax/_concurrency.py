"""Several blocks at once in one process: threads calling one compiled kernel.

XLA's CPU backend runs much of a block kernel on one thread (a `lax.scan`
over generations of small arrays, Newton loops, the sampler's rounds), so a
single stream of blocks leaves cores idle: process CPU time / wall time was
1.2-1.6 on two cores.  JAX releases the GIL while a kernel runs, so blocks
dispatched from two Python threads run at once and fill both cores.
Measured on a 2-core AMD EPYC (same blocks, serial against two threads):
limit process 1.35-1.46 -> 2.05-2.15 x 10^8 trajectory-steps/s, OLS fresh
augment 0.50-0.55 -> 0.74 x 10^6 fits/s, logistic fresh augment +40-70%,
OLS subsample +35%, OLS fresh discard +17%; the per-block results were
bitwise identical.  (Dispatching several blocks asynchronously from one
thread does not help: the CPU client runs them one after another.)

Not every kernel may run concurrently on every machine.  jaxlib's CPU
LAPACK kernels (custom calls: batched Cholesky, triangular solves) split a
large batch over XLA's intra-op thread pool and block the pool thread that
runs them until the pieces are done; when concurrent executions hold every
pool thread inside such calls, nothing is left to run the pieces: a
deadlock (`_scaling` meets the same hazard with several CPU devices).
Reproduced here: the OLS augment kernel with a fixed design (one ``trsm``
over a block of 2,041 10 x 10 factors) hung at once with two threads on two
cores, both pool threads in ``jax::ParallelBatchMap`` waiting on a
``BlockingCounter`` (that inverse is now unrolled for small d).
`max_workers` therefore runs such kernels with fewer blocks at once than
the pool has threads (one, on two cores), kernels with any other custom
call one at a time, and the rest as asked.  That is not enough on its own:
XLA runs independent operations of one program at once, so two such calls
in one kernel can hold both pool threads of a 2-core machine by
themselves (the Gaussian model's metrics did, one block at a time).  The
engine's solves and factorisations therefore make one unbatched call per
problem on the CPU (`_small_linalg.one_lapack_call_per_problem`), which
jaxlib never splits, and no engine kernel meets this limit (tested).

Determinism: callers merge the results in schedule order, so a run's
numbers are bitwise those of one block at a time.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import jax

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Blocks run at once by default: min(2, CPUs) on the CPU backend, else 1.

    CPUs: those this process may run on (`_scaling.intra_op_threads`, which
    respects an affinity mask such as a SLURM allocation's).  On a GPU or
    TPU one stream of blocks already keeps the device busy (JAX dispatches
    asynchronously), and each block in flight holds its own share of device
    memory.
    """
    from ._scaling import intra_op_threads

    return min(2, intra_op_threads()) if jax.default_backend() == "cpu" else 1


def check_workers(workers: Any) -> None:
    """Raise ValueError unless `workers` is None or a positive integer."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def custom_calls(lowered: Any) -> list[str]:
    """The custom-call targets of a lowered program (``jax.stages.Lowered``), in order."""
    from ._scaling import custom_call_operands

    return [target for target, _ in custom_call_operands(lowered)]


def max_workers(lowered: Any) -> int:
    """The most blocks of a kernel that may run at once (``sys.maxsize``: no limit).

    `lowered`: the kernel as ``jax.stages.Lowered`` (one block, one device).
    A kernel with a custom call other than jaxlib's LAPACK runs one block at
    a time (what it does with threads is unknown); one whose LAPACK calls
    jaxlib splits over the intra-op pool (`_scaling.splitting_lapack_calls`)
    runs at most ``threads - 1`` at once (1 on two cores); any other has no
    limit.  Callers cache the answer with the compiled kernel.
    """
    from ._scaling import custom_call_operands, intra_op_threads, lapack_call_splits

    calls = custom_call_operands(lowered)
    if any(not target.startswith("lapack_") for target, _ in calls):
        return 1
    if any(lapack_call_splits(target, shapes) for target, shapes in calls):
        return max(1, intra_op_threads() - 1)
    return sys.maxsize


def in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for every item, yielded in the items' order, up to `workers` calls at once.

    `workers` <= 1 calls `fn` in this thread, one item at a time.  More: a
    pool of `workers` threads, with at most ``2 * workers`` calls submitted
    ahead of the consumer (so the next block starts while the consumer
    merges the last).  An exception from `fn` is raised here, in order.
    Closing the generator early (a precision target met, an error, Ctrl-C)
    cancels the calls not yet started and waits for the running ones.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="collapse-jax-block") as pool:
        ahead: collections.deque = collections.deque()
        try:
            for item in items:
                ahead.append(pool.submit(fn, item))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()
