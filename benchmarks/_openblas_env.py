"""Run a benchmark without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (stdlib only).

On some processors these variables slow OpenBLAS, which numpy uses and which
jaxlib's CPU LAPACK kernels come from (scipy's bundled OpenBLAS).  OpenBLAS
reads them when it loads, so a benchmark that wants them gone must restart
itself before numpy is imported: `reexec_without_openblas_env()` does that
once, recording the removed values in ``os.environ[REEXEC_MARK]`` (JSON).
This module imports nothing but the standard library so that a script can
call it first.
"""

from __future__ import annotations

import json
import os
import sys

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
REEXEC_MARK = "COLLAPSE_BENCH_REMOVED_OPENBLAS_ENV"
REPORTED_ENV = (*OPENBLAS_VARS, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "XLA_FLAGS")


def reexec_without_openblas_env() -> None:
    """Restart this command with OPENBLAS_CORETYPE/L2_SIZE removed (call before numpy loads).

    Does nothing when ``--keep-openblas-env`` is on the command line, when
    this process is already the restarted one, or when neither is set.
    """
    if "--keep-openblas-env" in sys.argv or REEXEC_MARK in os.environ:
        return
    found = {k: os.environ[k] for k in OPENBLAS_VARS if k in os.environ}
    if not found:
        return
    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_VARS}
    env[REEXEC_MARK] = json.dumps(found)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def removed_openblas_env() -> dict[str, str]:
    """The variables this run removed ({} if none)."""
    return json.loads(os.environ.get(REEXEC_MARK, "{}"))
