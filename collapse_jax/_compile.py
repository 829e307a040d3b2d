"""How collapse_jax compiles its kernels: `jit`, with one set of XLA options.

XLA's GPU backend autotunes some kernels (matrix products, reductions) per
process and may pick a differently rounding one in another process, so the
same program gave different last bits in two processes on an H100 (measured:
a killed-and-resumed run, and the Figure 1 worker processes, differed from a
one-process run in the 15th digit).  ``xla_gpu_deterministic_ops`` makes the
compiled kernels a function of the program alone; with it, two processes
gave bitwise-identical moment sums.  It is an XLA debug option that the CPU
and TPU backends accept and ignore.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

COMPILER_OPTIONS = {"xla_gpu_deterministic_ops": True}


def jit(fn: Callable) -> Callable:
    """``jax.jit(fn)`` with `COMPILER_OPTIONS` (which ``.lower().compile()`` keeps too)."""
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS)
